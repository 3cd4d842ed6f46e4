# SPDX-License-Identifier: AGPL-3.0-or-later
"""Resumable, verified downloads (sharedllm.download) and model references (sharedllm.models.resolve).

Everything runs against a loopback HTTP server in a thread, with a few MB of random bytes made here: connections
dropped at random offsets, a killed downloader, two concurrent downloaders, a wrong checksum, a changed remote, a
full disk.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from sharedllm import download as dl
from sharedllm import models
from sharedllm.errors import InvalidModel, ModelError, ModelNotFound
from tests.helpers import MODEL_KVS, MODEL_TENSORS, gguf_bytes

ROOT = Path(__file__).resolve().parents[1]


def blob(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _child(url: str, dest: Path, digest: str, log_level: str = "INFO") -> subprocess.Popen:
    code = textwrap.dedent(f"""
        import logging, sys
        logging.basicConfig(level=logging.{log_level}, stream=sys.stderr, format="%(message)s")
        from sharedllm.download import download
        print(download({url!r}, {str(dest)!r}, sha256={digest!r}, progress=False, backoff=0.05, timeout=10))
    """)
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


# --- interruptions ----------------------------------------------------------------------------------------------


def test_twenty_drops_resume_with_ranges(server, tmp_path):
    data = blob(4 << 20)
    url = server.put("/m.gguf", data)
    server.drops = 20
    path = dl.download(url, tmp_path, sha256=sha(data), expected_size=len(data), retries=3, backoff=0.001,
                       progress=False, timeout=5)
    assert path == tmp_path / "m.gguf" and sha(path.read_bytes()) == sha(data)
    assert server.drops == 0 and len(server.requests) == 21
    assert all(r["range"] and r["if_range"] for r in server.requests[1:])  # every retry resumed
    assert server.sent < 1.1 * len(data), f"{server.sent} bytes sent for a {len(data)}-byte file"
    assert not (tmp_path / "m.gguf.part").exists() and not (tmp_path / "m.gguf.part.json").exists()
    assert dl.verified_sha256(path) == sha(data)
    # A second call finds the verified file and sends no request.
    assert dl.download(url, tmp_path, sha256=sha(data), progress=False) == path
    assert len(server.requests) == 21


def test_gives_up_after_retries_and_keeps_the_part(server, tmp_path):
    data = blob(1 << 20)
    url = server.put("/m.gguf", data)
    server.drops = 1
    with pytest.raises(ModelError, match=r"failed 1 times in a row.*received are kept in .*run again to resume"):
        dl.download(url, tmp_path, sha256=sha(data), retries=0, backoff=0.001, progress=False, timeout=5)
    have = (tmp_path / "m.gguf.part").stat().st_size
    assert 0 < have < len(data)
    assert dl.download(url, tmp_path, sha256=sha(data), progress=False, timeout=5).read_bytes() == data
    assert server.requests[-1]["range"] == f"bytes={have}-"


def test_retry_after_is_honoured(server, tmp_path):
    data = blob(256 << 10)
    url = server.put("/m.gguf", data)
    server.busy = [(503, "1"), (429, None)]  # said when, then did not: the backoff (1 ms here) applies again
    path = dl.download(url, tmp_path, sha256=sha(data), backoff=0.001, progress=False, timeout=5)
    assert path.read_bytes() == data
    at = [r["at"] for r in server.requests]
    assert len(at) == 3
    assert at[1] - at[0] >= 1.0, "retried before the server's Retry-After"
    assert at[2] - at[1] < 1.0


def test_a_retry_after_beyond_the_limit_is_a_clear_error(server, tmp_path):
    data = blob(64 << 10)
    url = server.put("/m.gguf", data)
    server.busy = [(503, "3600")]
    t0 = time.monotonic()
    with pytest.raises(ModelError, match=r"asks to retry after 3600s \(HTTP 503.*run again later"):
        dl.download(url, tmp_path, sha256=sha(data), backoff=0.001, progress=False, timeout=5)
    assert time.monotonic() - t0 < dl.MAX_RETRY_AFTER


def test_retry_after_values():
    import email.utils

    from sharedllm.sources import _retry_after

    assert _retry_after("120") == 120.0
    assert _retry_after(None) is None and _retry_after("soon") is None
    date = email.utils.formatdate(1_000_030, usegmt=True)
    assert _retry_after(date, now=1_000_000) == 30.0
    assert _retry_after(date, now=1_000_100) == 0.0


def test_kill_9_then_resume(server, tmp_path):
    data = blob(3 << 20, seed=1)
    url = server.put("/slow.gguf", data)
    server.rate = 2 << 20  # 2 MB/s: the download takes ~1.5 s
    proc = _child(url, tmp_path, sha(data))
    part = tmp_path / "slow.gguf.part"
    deadline = time.monotonic() + 30
    while not (part.exists() and part.stat().st_size > 512 << 10):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the child never started downloading"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    proc.stdout.close()
    proc.stderr.close()
    have = part.stat().st_size
    assert 0 < have < len(data)
    server.rate = 0
    before = len(server.requests)
    path = dl.download(url, tmp_path, sha256=sha(data), progress=False, timeout=5)
    assert sha(path.read_bytes()) == sha(data)
    resumed = server.requests[before]
    assert resumed["range"] == f"bytes={have}-", resumed
    assert resumed["if_range"] == server.etags["/slow.gguf"]
    assert resumed["sent"] == len(data) - have and len(server.requests) == before + 1  # only the rest


def test_two_processes_pull_the_same_model(server, tmp_path):
    data = blob(2 << 20, seed=2)
    url = server.put("/shared.gguf", data)
    server.rate = 1 << 20  # ~2 s
    first = _child(url, tmp_path, sha(data))
    part = tmp_path / "shared.gguf.part"
    deadline = time.monotonic() + 30
    while not (part.exists() and part.stat().st_size > 0):  # the first holds the lock: the second must wait
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()
        time.sleep(0.01)
    procs = [first, _child(url, tmp_path, sha(data))]
    outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert {out.strip() for out, _ in outs} == {str(tmp_path / "shared.gguf")}
    assert sha((tmp_path / "shared.gguf").read_bytes()) == sha(data)
    assert "waiting for another download of shared.gguf" in outs[1][1], outs
    assert len(server.requests) == 1 and server.sent == len(data)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shared.gguf", "shared.gguf.lock", "shared.gguf.sha256"]


# --- verification -----------------------------------------------------------------------------------------------


def test_wrong_sha256_deletes_the_part(server, tmp_path):
    data = blob(1 << 20, seed=3)
    url = server.put("/m.gguf", data)
    wrong = "0" * 64
    with pytest.raises(InvalidModel) as err:
        dl.download(url, tmp_path, sha256=wrong, progress=False, timeout=5)
    msg = str(err.value)
    assert f"sha256 mismatch: expected {wrong} got {sha(data)}; the partial download was deleted, retry" in msg
    assert "\n" not in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf.lock"]


def test_wrong_size_is_refused(server, tmp_path):
    data = blob(1 << 20, seed=3)
    url = server.put("/m.gguf", data)
    with pytest.raises(InvalidModel, match=f"has {len(data)} bytes but 5 were expected"):
        dl.download(url, tmp_path, expected_size=5, progress=False, timeout=5)


@pytest.mark.parametrize("honor_if_range", [True, False])
def test_changed_remote_restarts_cleanly(server, tmp_path, honor_if_range):
    old, new = blob(2 << 20, seed=4), blob(2 << 20, seed=5)
    url = server.put("/m.gguf", old, etag='"v1"')
    server.drops = 1
    with pytest.raises(ModelError):
        dl.download(url, tmp_path, retries=0, progress=False, timeout=5)
    assert (tmp_path / "m.gguf.part").exists()
    server.put("/m.gguf", new, etag='"v2"')
    server.honor_if_range = honor_if_range
    path = dl.download(url, tmp_path, sha256=sha(new), progress=False, timeout=5)
    assert path.read_bytes() == new
    assert server.requests[-1 if honor_if_range else -2]["if_range"] == '"v1"'


def test_resumed_part_of_another_version_is_redownloaded_once(server, tmp_path):
    """No ETag to tell the versions apart: the sha256 mismatch after resuming triggers one fresh download."""
    old, new = blob(2 << 20, seed=6), blob(2 << 20, seed=7)
    url = server.put("/m.gguf", old, etag='"same"')
    server.drops = 1
    with pytest.raises(ModelError):
        dl.download(url, tmp_path, retries=0, progress=False, timeout=5)
    server.put("/m.gguf", new, etag='"same"')  # a server that reuses its ETag
    path = dl.download(url, tmp_path, sha256=sha(new), progress=False, timeout=5)
    assert path.read_bytes() == new
    assert server.requests[-1]["range"] is None  # the fresh try


def test_http_404_is_model_not_found(server, tmp_path):
    url = server.put("/m.gguf", b"x")
    with pytest.raises(ModelNotFound, match=r"HTTP 404.*check the URL"):
        dl.download(url.replace("m.gguf", "other.gguf"), tmp_path, progress=False, timeout=5)


def test_disk_full_is_a_clear_error(server, tmp_path, monkeypatch):
    """An ENOSPC from the part file's write: one clear line naming the missing bytes; the part is kept to resume."""
    data = blob(2 << 20, seed=8)
    url = server.put("/m.gguf", data)

    class FillsUp:
        def __init__(self, f):
            self.f, self.writes = f, 0

        def write(self, b):
            self.writes += 1
            if self.writes > 3:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(b)

        def __getattr__(self, name):
            return getattr(self.f, name)

    real_init = dl._Part.__init__

    def init(self, *a):
        real_init(self, *a)
        self.f = FillsUp(self.f)

    monkeypatch.setattr(dl._Part, "__init__", init)
    with pytest.raises(ModelError) as err:
        dl.download(url, tmp_path, sha256=sha(data), progress=False, timeout=5)
    have = (tmp_path / "m.gguf.part").stat().st_size
    assert str(err.value) == (f"disk full while downloading m.gguf to {tmp_path} (need {len(data) - have} more "
                              "bytes); free space or set SHAREDLLM_MODEL_DIR")
    monkeypatch.undo()
    assert dl.download(url, tmp_path, sha256=sha(data), progress=False, timeout=5).read_bytes() == data
    assert server.requests[-1]["range"] == f"bytes={have}-"


def test_disk_full_before_starting(server, tmp_path, monkeypatch):
    data = blob(1 << 20, seed=9)
    url = server.put("/m.gguf", data)
    monkeypatch.setattr(dl.shutil, "disk_usage", lambda p: _Usage(free=1000))
    with pytest.raises(ModelError, match=rf"need {len(data)} more bytes\); free space or set SHAREDLLM_MODEL_DIR"):
        dl.download(url, tmp_path, progress=False, timeout=5)


class _Usage:
    def __init__(self, free: int):
        self.free = free


def test_logs_progress_without_a_terminal(server, tmp_path, monkeypatch, caplog):
    data = blob(1 << 20, seed=10)
    url = server.put("/m.gguf", data)
    server.rate = 2 << 20
    monkeypatch.setattr(dl, "LOG_EVERY", 0.1)
    with caplog.at_level(logging.INFO, logger="sharedllm.download"):
        dl.download(url, tmp_path, progress=True, timeout=5)
    lines = [r.getMessage() for r in caplog.records if "%)" in r.getMessage()]
    assert lines and re.search(r"of 1.00 MiB \(\d+%\), [\d.]+ [KM]iB/s, ETA \dm\d\ds", lines[0]), lines


def test_file_and_pypi_sources(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(blob(100_000, seed=11))
    path = dl.download(src.as_uri(), tmp_path / "cache", sha256=sha(src.read_bytes()), progress=False)
    assert path.read_bytes() == src.read_bytes() and path.name == "src.bin"
    with pytest.raises(ModelNotFound, match="pip install no-such-model-pkg"):
        dl.download("pypi://no-such-model-pkg", tmp_path / "cache", progress=False)
    with pytest.raises(ValueError, match="use an http"):
        dl.download("ftp://x/y", tmp_path)


# --- model references -------------------------------------------------------------------------------------------


@pytest.fixture
def model_dir(tmp_path, monkeypatch):
    d = tmp_path / "models"
    monkeypatch.setenv("SHAREDLLM_MODEL_DIR", str(d))
    return d


def test_resolve_url_with_sha256(server, model_dir):
    gguf = gguf_bytes(MODEL_KVS, MODEL_TENSORS)
    url = server.put("/tiny.gguf", gguf)
    path = models.resolve(f"{url}#sha256={sha(gguf)}", progress=False)
    assert path == model_dir / "tiny.gguf" and path.read_bytes() == gguf
    with pytest.raises(InvalidModel, match="sha256 mismatch"):
        models.resolve(f"{server.put('/tiny2.gguf', gguf)}#sha256={'1' * 64}", progress=False)
    with pytest.raises(ValueError, match="#sha256="):
        models.resolve(f"{url}#md5=abc", progress=False)


def test_resolve_refuses_a_download_that_is_not_gguf(server, model_dir):
    url = server.put("/bad.gguf", b"<html>not found</html>" * 100)
    with pytest.raises(InvalidModel, match=r"not a usable model.*not a GGUF file.*it was deleted"):
        models.resolve(url, progress=False)
    assert not (model_dir / "bad.gguf").exists() and not (model_dir / "bad.gguf.part").exists()
    # A truncated GGUF fails validation the same way and never lands in the cache.
    url = server.put("/cut.gguf", gguf_bytes(MODEL_KVS, MODEL_TENSORS)[:300])
    with pytest.raises(InvalidModel, match="it was deleted"):
        models.resolve(url, progress=False)
    assert not (model_dir / "cut.gguf").exists()


def test_resolve_catalog_names(server, model_dir):
    gguf = gguf_bytes(MODEL_KVS, MODEL_TENSORS)
    url = server.put("/files/weights.bin", gguf)
    entry = {"name": "tiny", "url": url, "sha256": sha(gguf), "size": len(gguf), "architecture": "llama",
             "quantization": None, "layers": 2}
    handler_reply = {"models": [entry, *models.default_catalog().values()]}
    assert models.needs_catalog("tiny") and not models.needs_catalog(url) and not models.needs_catalog("x.gguf")
    assert not models.needs_catalog(models.DEFAULT_MODEL)
    for catalog in (handler_reply, {"tiny": entry}, [entry]):
        path = models.resolve("tiny", catalog, progress=False)
        assert path == models.cached_path(entry) == model_dir / "tiny.gguf"  # named after the entry, not the URL
    assert len(server.requests) == 1
    assert models.describe(path) == {"size": len(gguf), "sha256": sha(gguf), "architecture": "llama",
                                     "layers": 2, "quantization": None}
    with pytest.raises(ModelNotFound, match=r"no model named 'huge' in the catalog \(it has: tiny\)"):
        models.resolve("huge", {"tiny": entry})
    with pytest.raises(ModelNotFound, match="does not exist"):  # unchanged for paths
        models.resolve(str(model_dir / "nope.gguf"))


def test_resolve_default_name_and_paths(tmp_path):
    p = tmp_path / "m.gguf"
    p.write_bytes(gguf_bytes(MODEL_KVS, MODEL_TENSORS))
    assert models.resolve(str(p)) == p.resolve() == models.resolve(p, {"x": {}})
    default = models.resolve("gemma-3-270m")
    assert default == models.default_model_path() == models.resolve(models.DEFAULT_MODEL, models.default_catalog())
    assert default.stat().st_size == models.DEFAULT_MODEL_SIZE


# --- the command line, against a real scheduler (no workers) ----------------------------------------------------


@pytest.mark.mesh
def test_models_cli(server, model_dir):
    from click.testing import CliRunner

    from sharedllm.cli.main import cli
    from sharedllm.local import LocalMesh

    gguf = gguf_bytes(MODEL_KVS, MODEL_TENSORS)
    url = server.put("/tiny.gguf", gguf)
    runner = CliRunner()
    with LocalMesh(machines=0, dashboard=False) as lm:
        def run(*args: str):
            return runner.invoke(cli, ["--key-file", str(lm.admin_key_file), "models", *args,
                                       "--scheduler", lm.user_address], catch_exceptions=False)

        out = run("add", "tiny", url, "--pull")
        assert out.exit_code == 0, out.output
        assert f"added tiny: {url} (sha256 {sha(gguf)})" in out.output
        listed = {e["name"]: e for e in json.loads(run("list", "--json").stdout)}
        assert listed["tiny"] == {"name": "tiny", "url": url, "sha256": sha(gguf), "size": len(gguf),
                                  "architecture": "llama", "quantization": None, "layers": 2}
        assert models.DEFAULT_MODEL in listed
        table = run("list").stdout
        assert "tiny" in table and "llama" in table and "yes" in table
        (model_dir / "tiny.gguf").unlink()
        pulled = run("pull", "tiny")
        assert pulled.exit_code == 0 and pulled.stdout.strip() == str(model_dir / "tiny.gguf")
        assert (model_dir / "tiny.gguf").read_bytes() == gguf
        bad = run("add", "bad", "ftp://x/y.gguf")
        assert bad.exit_code == 1 and bad.output.startswith("error: 'ftp://x/y.gguf' is not a URL")
        missing = run("pull", "huge")
        assert missing.exit_code == 1 and "no model named 'huge' in the catalog" in missing.output
        rm = run("rm", "tiny", "--delete-file")
        assert rm.exit_code == 0 and not (model_dir / "tiny.gguf").exists(), rm.output
        assert "tiny" not in {e["name"] for e in json.loads(run("list", "--json").stdout)}
        assert run("rm", "tiny").exit_code == 1
