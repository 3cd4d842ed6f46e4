# SPDX-License-Identifier: AGPL-3.0-or-later
"""How the engine child builds its ``Llama``: the remote devices (through client relays, or an emulated link), the
output layer on the client, the progress of the weights' upload, a chat format for GGUFs without a template, and the
timestamps of each load phase."""

from __future__ import annotations

import ctypes
import itertools
import os
import time
from typing import Any

from sharedllm.engine.framing import write_frame
from sharedllm.engine.spec import EngineSpec


class LoadProgress(float):
    """How far a model load has come: the fraction of the model's tensor data loaded (llama.cpp's own count: sent to
    the rpc-servers, or mapped for the client's CPU), and the same in bytes, ``done_bytes`` of ``total_bytes`` (the
    tensor data in the GGUF file). A float, so a callback written for the bare fraction keeps working. The values a
    load reports never decrease."""

    __slots__ = ("done_bytes", "total_bytes")

    def __new__(cls, fraction: float, done_bytes: int | None = None, total_bytes: int | None = None) -> LoadProgress:
        self = super().__new__(cls, fraction)
        self.done_bytes = done_bytes
        self.total_bytes = total_bytes
        return self

    def __repr__(self) -> str:
        return f"LoadProgress({float(self):.3f}, done_bytes={self.done_bytes}, total_bytes={self.total_bytes})"


# The output layer's tensors (its norm, and the projection: ``output.weight``, or ``token_embd.weight`` loaded a second
# time when the embeddings are tied) as a ``tensor_buft_overrides`` pattern. With them on the client's CPU the mesh's
# last machine returns the final hidden state (n_embd floats) instead of the logits (n_vocab floats: 1 MiB a token
# for a 262k vocabulary) and holds neither the projection nor the logits' compute buffer; the client computes the
# projection with the same CPU kernels an rpc-server would, so greedy output is unchanged. Tied embeddings cost the
# client no extra weight memory: the duplicate maps the same file pages as the input embeddings.
OUTPUT_ON_CLIENT = r"^(output|output_norm|token_embd)\.weight$"


def build_llama(model_path: str, *, devices: list[int] = (), use_extra_bufts: bool = False, progress=None,
                output_on_client: bool = False, parallel: int = 1, unified: bool = False, **kwargs):
    """Construct ``llama_cpp.Llama`` with the model parameters its constructor does not expose.

    ``devices`` (raw ggml device handles) become ``llama_model_params.devices``; ``use_extra_bufts=False`` gives the
    CPU kernels an rpc-server uses, which makes local greedy output the oracle for mesh output (see NOTES).
    ``output_on_client`` keeps the output layer on this process's CPU (:data:`OUTPUT_ON_CLIENT`).
    Flash attention unless ``flash_attn=False`` (the engine's default, :data:`sharedllm.options.FLASH_ATTN`).
    ``parallel`` > 1: a context for that many sequences (``n_seq_max``), each with its own KV cache stream
    (``kv_unified=False``) of ``n_ctx`` cells; ``n_ctx`` is per sequence, the context holds ``parallel * n_ctx``.
    ``unified``: one KV cache of ``parallel * n_ctx`` cells shared by the sequences instead (``kv_unified=True``,
    llama-server's default: any mix of sequences and prompt tokens in one pass, see ``sharedllm.engine.batch``).
    Call it in a process that may die: with RPC devices llama.cpp aborts on a lost server.
    """

    import llama_cpp
    import llama_cpp.llama_cpp as lib

    from sharedllm.options import FLASH_ATTN

    kwargs.setdefault("flash_attn", FLASH_ATTN)  # the engine's default, so that a local oracle computes as the mesh

    class _Override(ctypes.Structure):  # struct llama_model_tensor_buft_override
        _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]

    dev_array = (ctypes.c_void_p * (len(devices) + 1))(*devices, None)
    overrides = None
    if output_on_client and devices:
        from sharedllm import ggml

        overrides = (_Override * 2)(_Override(OUTPUT_ON_CLIENT.encode(), ggml.cpu_buffer_type()), _Override(None, None))
    original = lib.llama_model_default_params
    original_ctx = lib.llama_context_default_params

    def patched():
        params = original()
        if devices:
            params.devices = ctypes.cast(dev_array, ctypes.c_void_p)
        if overrides is not None:
            params.tensor_buft_overrides = ctypes.cast(overrides, ctypes.c_void_p)
        params.use_extra_bufts = use_extra_bufts
        if progress is not None:
            params.progress_callback = progress
        return params

    def patched_ctx():
        params = original_ctx()
        params.n_seq_max = parallel
        params.kv_unified = unified
        return params

    kwargs.setdefault("verbose", False)
    if parallel > 1:
        kwargs["n_ctx"] = kwargs.get("n_ctx", 512) * parallel
        lib.llama_context_default_params = patched_ctx
    lib.llama_model_default_params = patched
    try:
        llm = llama_cpp.Llama(model_path=model_path, **kwargs)
    finally:
        lib.llama_model_default_params = original
        lib.llama_context_default_params = original_ctx
    llm._sharedllm_keepalive = (dev_array, overrides, progress)  # the C side keeps pointers to them
    if "chat_format" not in kwargs and "chat_handler" not in kwargs:
        fallback = _fallback_chat_format(llm.metadata)
        if fallback:
            llm.chat_format = fallback  # create_chat_completion resolves the format by name at call time
    return llm


def build_engine_llama(spec: EngineSpec, out_fd: int, phases: dict[str, float]):
    """Build the engine's ``Llama``. ``phases`` receives monotonic timestamps: ``imported`` (llama-cpp-python),
    ``connected`` (every rpc-server added), ``weights_start``/``weights_end`` (first and last progress callback: the
    weights being uploaded, or mapped for a local model) and ``built`` (context created)."""

    import llama_cpp  # noqa: F401  (imported already by the child's start, see child_main)

    from sharedllm import ggml

    phases["imported"] = time.monotonic()
    handles: list[int] = []
    devices: list[dict] = []
    servers: dict[str, list] = {}
    local = _open_tunnels(spec)
    for st in spec.stages:
        if st.endpoint not in servers:
            servers[st.endpoint] = ggml.add_server(local.get(st.endpoint, st.endpoint))
        devs = servers[st.endpoint]
        if st.device_index >= len(devs):
            raise RuntimeError(f"rpc-server {st.endpoint} has {len(devs)} device(s), no device {st.device_index}")
        dev, h = devs[st.device_index]
        handles.append(h)
        devices.append({"endpoint": st.endpoint, "machine_id": st.machine_id, **dev.to_dict()})
    phases["connected"] = time.monotonic()

    total = spec.tensor_bytes if spec.tensor_bytes is not None else _tensor_bytes(spec.model_path)

    @ctypes.CFUNCTYPE(ctypes.c_bool, ctypes.c_float, ctypes.c_void_p)
    def progress(fraction, _user):
        now = time.monotonic()
        phases.setdefault("weights_start", now)
        phases["weights_end"] = now
        # llama.cpp's fraction is bytes of tensor data done over the file's tensor data: the same bytes, counted.
        fraction = min(max(float(fraction), 0.0), 1.0)
        done = round(fraction * total) if total else None
        write_frame(out_fd, ("progress", fraction, done, total))
        return True

    kwargs = dict(spec.llama_kwargs)
    if handles:
        kwargs["n_gpu_layers"] = -1
        kwargs["tensor_split"] = spec.tensor_split or None
        if spec.output_on_client:
            # The projection is the client's largest matmul (Gemma 3 270M: 168M of its 268M weights); llama-cpp-python
            # would give it half the cores. The rest of a token's time the client waits on the network.
            kwargs.setdefault("n_threads", os.cpu_count() or 1)
    # Fast batches give up a request's solo text anyway: they take llama-server's CPU kernels too (repacked weights
    # for this process's layers, the output projection above all: an 8-sequence step 10-20% faster here).
    llm = build_llama(spec.model_path, devices=handles, use_extra_bufts=spec.use_extra_bufts or spec.unified_kv,
                      progress=progress, output_on_client=spec.output_on_client, parallel=spec.parallel,
                      unified=spec.unified_kv, **kwargs)
    phases["built"] = time.monotonic()
    return llm, devices


def _tensor_bytes(model_path: str) -> int | None:
    """The bytes of tensor data in the GGUF file (what llama.cpp's load progress counts), None if unreadable: then
    llama.cpp reports the file's problem itself. For a spec that does not say (a client that read the header
    already passes ``EngineSpec.tensor_bytes``)."""
    from sharedllm.gguf import read_gguf

    try:
        return sum(t.nbytes for t in read_gguf(model_path).tensors)
    except Exception:
        return None


def phase_seconds(started_at: float, init_at: float, marks: dict[str, float]) -> dict[str, float]:
    """Durations of the child's load phases from its timestamps (see ``build_engine_llama``); ``started_at`` stays a
    timestamp, for the parent to turn into the spawn time (interpreter start and the import of llama-cpp-python)."""
    order = [("init", init_at), *((k, marks[k]) for k in ("imported", "connected", "weights_start", "weights_end",
                                                             "built", "measured") if k in marks)]
    names = {"imported": "import", "connected": "connect", "weights_start": "model_metadata",
             "weights_end": "weights", "built": "context", "measured": "invariance"}
    out = {"started_at": started_at, "wait_init": init_at - started_at}
    for (_, prev), (key, t) in itertools.pairwise(order):
        out[names[key]] = t - prev
    return out


TUNNELS: dict[str, Any] = {}  # machine endpoint -> the engine's client relay to it (they live as long as the engine)


def _open_tunnels(spec: EngineSpec) -> dict[str, str]:
    """Start a client relay for every stage behind a relay; ``{machine endpoint: local endpoint}`` for llama.cpp.

    The tokens were checked by the parent (:func:`probe_stage`) just before; a relay that refuses now would make
    llama.cpp abort, which the parent turns into ``WorkerLost`` like any other lost machine. A spec's
    ``tunnel_hook`` may then put something between llama.cpp and each machine (benchmarks: an emulated link)."""
    local: dict[str, str] = {}
    for st in spec.stages:
        if st.relay and st.endpoint not in local:
            cpus = {s.device_index for s in spec.stages if s.endpoint == st.endpoint and s.cpu}
            cr = TUNNELS[st.endpoint] = st.client_relay(cpu_devices=cpus).start()
            local[st.endpoint] = cr.endpoint
    local.update({st.endpoint: st.endpoint for st in spec.stages if st.endpoint not in local})
    if spec.tunnel_hook is not None:
        local = run_tunnel_hook(spec.tunnel_hook, local)
    return local


def call_hook(hook: tuple[str, str | None, dict], *args: Any) -> Any:
    """Call ``hook`` (``("module:function", sys.path entry or None, kwargs)``) in this engine process with ``args``
    and its kwargs."""
    import importlib
    import sys

    target, path, kwargs = hook
    module, _, name = target.partition(":")
    if path and path not in sys.path:
        sys.path.append(path)
    return getattr(importlib.import_module(module), name)(*args, **kwargs)


def run_tunnel_hook(hook: tuple[str, str | None, dict], endpoints: dict[str, str]) -> dict[str, str]:
    """Call ``hook`` with the local endpoint of every machine and the engine's client relays; it returns the
    endpoints llama.cpp connects to."""
    return call_hook(hook, dict(endpoints), dict(TUNNELS))


def _fallback_chat_format(metadata: dict[str, str]) -> str | None:
    """A chat format for GGUFs that carry no ``tokenizer.chat_template`` (llama-cpp-python would pick llama-2).

    ``metadata`` is ``Llama.metadata``: the scalar keys llama.cpp read while loading, so the file is not parsed twice.
    """
    if metadata.get("tokenizer.chat_template"):
        return None
    from sharedllm.engine.chat import GEMMA  # registers it

    arch = metadata.get("general.architecture") or ""
    return GEMMA if arch.startswith("gemma") else None
