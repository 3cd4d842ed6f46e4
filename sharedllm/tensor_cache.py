# SPDX-License-Identifier: AGPL-3.0-or-later
"""The rpc-server's tensor cache (the upstream ``-c``): a size cap with least-recently-used eviction. No Dask.

How llama.cpp uses the directory (``ggml/src/ggml-rpc/ggml-rpc.cpp`` in the vendored llama.cpp):

- Only weight tensors of more than ``HASH_THRESHOLD`` (10 MiB upstream; 1 MiB in the build ``scripts/setup.sh``
  makes, a client-side constant) take the cache path. The client sends
  ``SET_TENSOR_HASH`` with the 64-bit FNV-1a hash of the data; the server looks for ``<cache_dir>/<hash>`` (16
  lowercase hex digits, no extension). On a hit it reads the whole file with an ``ifstream`` and copies it into the
  tensor; on a miss the client sends the data with ``SET_TENSOR`` and a flag that makes the server write that file.
- Upstream never deletes anything, so the directory grows with every model (and every quantization) ever loaded.

Recency. A hit only opens and reads the file, so nothing but the filesystem's access time records it, and the
server cannot be told to touch files on a hit. ``prune`` therefore orders entries by ``max(atime, mtime)``: the
write of a miss sets mtime; a hit sets atime where the filesystem updates it. With Linux's default ``relatime`` the
first read after a write updates atime, then at most once a day, so recency is exact for "written, then used again"
and accurate to a day after that; with ``noatime`` it degrades to insertion order (FIFO). Ties go to the larger
file first. Deleting an entry is always safe: an open reader keeps its data, and the next load of that tensor is a
miss that sends the data again and rewrites the file.

Files whose name is not 16 hex digits are not cache entries: they are neither counted nor deleted.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

_ENTRY = re.compile(r"[0-9a-f]{16}")


@dataclass(frozen=True)
class CacheEntry:
    """One cached tensor: ``path``, its size, and when it was last used (seconds since the epoch)."""

    path: Path
    size: int
    last_used: float


def entries(cache_dir: str | os.PathLike) -> list[CacheEntry]:
    """The cache entries in ``cache_dir``, least recently used first. A missing directory has none."""
    out = []
    try:
        it = os.scandir(cache_dir)
    except (FileNotFoundError, NotADirectoryError):
        return []
    with it:
        for de in it:
            if not _ENTRY.fullmatch(de.name):
                continue
            try:
                if not de.is_file(follow_symlinks=False):
                    continue
                st = de.stat(follow_symlinks=False)
            except FileNotFoundError:  # evicted or replaced meanwhile
                continue
            out.append(CacheEntry(Path(de.path), st.st_size, max(st.st_atime, st.st_mtime)))
    out.sort(key=lambda e: (e.last_used, -e.size, e.path.name))
    return out


def stats(cache_dir: str | os.PathLike) -> dict[str, int]:
    """``{"files": N, "bytes": B}`` of the cache entries in ``cache_dir``."""
    es = entries(cache_dir)
    return {"files": len(es), "bytes": sum(e.size for e in es)}


def prune(cache_dir: str | os.PathLike, cap_bytes: int) -> list[Path]:
    """Delete least-recently-used entries until the cache holds at most ``cap_bytes``; return the deleted paths.

    ``cap_bytes=0`` empties the cache. Safe to call while the rpc-server runs (see the module docstring).
    """
    if cap_bytes < 0:
        raise ValueError(f"cap_bytes must be >= 0, got {cap_bytes}")
    es = entries(cache_dir)
    total = sum(e.size for e in es)
    evicted: list[Path] = []
    for e in es:
        if total <= cap_bytes:
            break
        try:
            e.path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            logger.warning("could not evict %s from the tensor cache: %s", e.path, exc)
            continue
        total -= e.size
        evicted.append(e.path)
    if evicted:
        logger.info("tensor cache %s: evicted %d least recently used file(s) to stay under %d bytes (%d left)",
                    cache_dir, len(evicted), cap_bytes, total)
    return evicted


def discard_since(cache_dir: str | os.PathLike, since: float) -> list[Path]:
    """Delete the entries written at or after ``since`` (seconds since the epoch); return them.

    Upstream writes an entry with a plain ``ofstream`` and never checks it: a server killed mid-write (or a full disk)
    leaves a truncated file that a later load takes as a hit, silently loading wrong weights. After an rpc-server
    exits uncleanly, call this with the time it started: whatever it wrote may be incomplete, and the next load
    simply sends those tensors again.
    """
    gone = []
    for e in entries(cache_dir):
        try:
            if e.path.stat().st_mtime >= since:
                e.path.unlink()
                gone.append(e.path)
        except FileNotFoundError:
            continue
    if gone:
        logger.warning("tensor cache %s: discarded %d file(s) written by an rpc-server that did not exit cleanly",
                       cache_dir, len(gone))
    return gone
