# SPDX-License-Identifier: AGPL-3.0-or-later
"""GGUF reader and memory estimate. Pure Python: no llama.cpp, no Dask.

``reader``: ``read_gguf`` validates a model file completely (header, metadata, tensor infos, tensor data bounds)
before anything else touches it, so that a bad download fails here with one clear line instead of deep inside an
rpc-server. ``estimate``: ``estimate_memory`` turns the tensor table into what each llama.cpp layer slot needs on a
mesh device. The reader's limits (``MAX_*``) and known assertions (``_ASSERTED``) live in ``sharedllm.gguf.reader``:
change them there.
"""

from sharedllm.gguf.estimate import ComputeBuffers, ModelEstimate, estimate_memory, placement_estimates
from sharedllm.gguf.reader import (
    ARRAY,
    BOOL,
    DEFAULT_ALIGNMENT,
    FLOAT32,
    FLOAT64,
    GGML_TYPES,
    GGUF_MAGIC,
    INT8,
    INT16,
    INT32,
    INT64,
    MAX_ARRAY_DEPTH,
    MAX_ARRAY_KEEP,
    MAX_DIMS,
    MAX_KEY,
    MAX_KEYS,
    MAX_NAME,
    MAX_STRING_KEEP,
    MAX_TENSORS,
    STRING,
    SUPPORTED_VERSIONS,
    UINT8,
    UINT16,
    UINT32,
    UINT64,
    Cursor,
    GGUFFile,
    Skipped,
    TensorInfo,
    parse,
    read_gguf,
    ties_embeddings,
)

__all__ = [
    "ARRAY",
    "BOOL",
    "DEFAULT_ALIGNMENT",
    "FLOAT32",
    "FLOAT64",
    "GGML_TYPES",
    "GGUF_MAGIC",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "MAX_ARRAY_DEPTH",
    "MAX_ARRAY_KEEP",
    "MAX_DIMS",
    "MAX_KEY",
    "MAX_KEYS",
    "MAX_NAME",
    "MAX_STRING_KEEP",
    "MAX_TENSORS",
    "STRING",
    "SUPPORTED_VERSIONS",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "ComputeBuffers",
    "Cursor",
    "GGUFFile",
    "ModelEstimate",
    "Skipped",
    "TensorInfo",
    "estimate_memory",
    "parse",
    "placement_estimates",
    "read_gguf",
    "ties_embeddings",
]
