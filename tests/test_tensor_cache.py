# SPDX-License-Identifier: AGPL-3.0-or-later
"""The rpc-server tensor cache's size cap: least recently used entries go first (sharedllm.tensor_cache)."""

from __future__ import annotations

import os
import time

import pytest

from sharedllm import tensor_cache


def entry(d, name: str, size: int, used: float, written: float | None = None):
    """A cache file as llama.cpp writes it (16 hex digits), last written at ``written`` and read at ``used``."""
    p = d / name
    p.write_bytes(b"\0" * size)
    os.utime(p, (used, written if written is not None else used))
    return p


def test_cap_evicts_least_recently_used(tmp_path):
    now = time.time()
    a = entry(tmp_path, "00000000000000aa", 400, now - 400)
    b = entry(tmp_path, "00000000000000bb", 300, now - 10, written=now - 500)  # old write, recent hit (atime)
    c = entry(tmp_path, "00000000000000cc", 200, now - 300)
    d = entry(tmp_path, "00000000000000dd", 100, now - 200)
    other = tmp_path / "not-a-cache-entry.txt"
    other.write_bytes(b"x" * 10_000)
    assert [e.path for e in tensor_cache.entries(tmp_path)] == [a, c, d, b]
    assert tensor_cache.stats(tmp_path) == {"files": 4, "bytes": 1000}

    assert tensor_cache.prune(tmp_path, 1000) == []  # at the cap: nothing to do
    assert tensor_cache.prune(tmp_path, 450) == [a, c]  # 1000 -> 600 -> 400
    assert tensor_cache.stats(tmp_path) == {"files": 2, "bytes": 400}
    assert b.exists() and d.exists() and other.exists()

    os.utime(d, (now, now - 200))  # d is read again: now b is the oldest
    assert tensor_cache.prune(tmp_path, 100) == [b]
    assert tensor_cache.prune(tmp_path, 0) == [d]
    assert tensor_cache.stats(tmp_path) == {"files": 0, "bytes": 0} and other.exists()


def test_ties_evict_the_bigger_file_first(tmp_path):
    t = time.time() - 100
    small = entry(tmp_path, "0000000000000001", 10, t)
    big = entry(tmp_path, "0000000000000002", 50, t)
    assert tensor_cache.prune(tmp_path, 40) == [big]
    assert small.exists()


def test_missing_directory_and_bad_cap(tmp_path):
    assert tensor_cache.stats(tmp_path / "none") == {"files": 0, "bytes": 0}
    assert tensor_cache.prune(tmp_path / "none", 0) == []
    with pytest.raises(ValueError, match="cap_bytes must be >= 0"):
        tensor_cache.prune(tmp_path, -1)


def test_a_read_counts_as_a_use_where_the_filesystem_records_atime(tmp_path):
    """llama.cpp serves a hit by reading the file: with relatime, that first read after the write moves atime."""
    old = tmp_path / "000000000000000a"
    old.write_bytes(b"a" * 100)
    past = time.time() - 60
    os.utime(old, (past, past))
    new = entry(tmp_path, "000000000000000b", 100, time.time() - 30)
    with open(old, "rb") as f:  # what rpc_server::get_cached_file does on a hit
        f.read()
    if os.stat(old).st_atime <= past:
        pytest.skip("this filesystem does not update atime (noatime): recency falls back to write order")
    assert tensor_cache.prune(tmp_path, 100) == [new]


def test_discard_what_a_crashed_server_wrote(tmp_path):
    started = time.time() - 50
    before = entry(tmp_path, "00000000000000b0", 10, started - 10)
    during = entry(tmp_path, "00000000000000d0", 10, started - 100, written=started + 5)  # an old hit, a new write
    assert tensor_cache.discard_since(tmp_path, started) == [during]
    assert before.exists()


def test_cap_zero_turns_the_cache_off(tmp_path, monkeypatch):
    from sharedllm.worker import MachineReporter

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert MachineReporter("m-1").tensor_cache_dir() == str(tmp_path / "sharedllm" / "tensor-cache" / "m-1")
    assert MachineReporter("m-1", cache_dir=str(tmp_path / "c")).tensor_cache_dir() == str(tmp_path / "c")
    # cap 0: no --cache-dir for the rpc-server at all (a load would write every big weight there first)
    assert MachineReporter("m-1", cache_cap=0).tensor_cache_dir() is None
    assert MachineReporter("m-1", cache_dir=str(tmp_path / "c"), cache_cap=0).tensor_cache_dir() is None
    with pytest.raises(ValueError, match="cache_cap"):
        MachineReporter("m-1", cache_cap=-1)
