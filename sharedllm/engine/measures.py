# SPDX-License-Identifier: AGPL-3.0-or-later
"""The engine's measures of its machines' kernels (:mod:`sharedllm.engine.invariance`), kept on the user's disk
between loads: a second load of the same model with the same options on the same machines takes them instead of
measuring again (about 2 s of a 4 s load of Gemma 3 270M on two machines here).

The key holds everything the measures depend on: the model file (its real path, size and modification time), the
kernels of every party (a fingerprint of llama.cpp's libraries on this machine and on every machine, from their
heartbeats, with their devices and threads), the layer split, where the output layer runs, llama.cpp's context
options, and the engine's batching and drafting options. A machine whose build changed, or whose build the mesh
does not know, is measured again. ``$XDG_CACHE_HOME/sharedllm/measures.json`` (delete it to measure everything
again); at most ``MAX_ENTRIES`` keys, the oldest dropped first."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

from sharedllm import settings
from sharedllm.dataplane import read_json, write_json
from sharedllm.engine.spec import EngineSpec

logger = logging.getLogger("sharedllm.engine")

MAX_ENTRIES = 256
VERSION = 1


def path() -> Path:
    return settings.cache_root() / "measures.json"


def key(spec: EngineSpec, kernels: str, machines: dict[str, dict]) -> str | None:
    """The key of ``spec``'s measures (``kernels``: this machine's :func:`sharedllm.ggml.kernels_fingerprint`;
    ``machines``: each machine of the stages as the mesh knows it, its kernels' fingerprint, devices and threads), or
    None where a machine's build is unknown (measure)."""
    used = sorted({st.machine_id for st in spec.stages})
    if any(not (machines.get(m) or {}).get("kernels") for m in used):
        return None
    try:
        st = Path(spec.model_path).stat()
    except OSError:
        return None
    parts = {
        "version": VERSION,
        "model": [str(Path(spec.model_path).resolve()), st.st_size, st.st_mtime_ns],
        "client": kernels,
        "stages": [[s.machine_id, s.device_index, s.cpu] for s in spec.stages],
        "machines": {m: machines[m] for m in used},
        "tensor_split": list(spec.tensor_split),
        "output_on_client": spec.output_on_client,
        "llama": spec.llama_kwargs,
        "use_extra_bufts": spec.use_extra_bufts,
        "parallel": spec.parallel,
        "exact_batches": spec.exact_batches,
        "chunked": spec.max_stall_ms > 0,
        "unified_kv": spec.unified_kv,
        "draft": spec.draft is not None,
        "draft_max": spec.draft_max if spec.draft is not None else None,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def recall(k: str | None) -> dict | None:
    """The measures kept under ``k``, or None."""
    if k is None:
        return None
    entry = (read_json(path()) or {}).get(k)
    return entry.get("invariance") if isinstance(entry, dict) and isinstance(entry.get("invariance"), dict) else None


def remember(k: str | None, invariance: dict) -> None:
    """Keep ``invariance`` under ``k`` (a failed write only costs the next load its measures)."""
    if k is None or not invariance:
        return
    file = path()
    data = read_json(file) or {}
    data[k] = {"invariance": invariance, "at": time.time()}
    if len(data) > MAX_ENTRIES:
        for old in sorted(data, key=lambda x: data[x].get("at", 0) if isinstance(data[x], dict) else 0)[
                :len(data) - MAX_ENTRIES]:
            del data[old]
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        write_json(file, data)
    except OSError as exc:
        logger.debug("could not keep the engine's measures in %s: %s", file, exc)
