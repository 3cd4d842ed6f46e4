# SPDX-License-Identifier: AGPL-3.0-or-later
"""The GGUF header of a remote model, read with HTTP ``Range`` requests: enough to plan a placement (which machines
would hold what, or ``ModelTooLarge`` with the shortfall) before a byte of weights moves.

The header (metadata, vocabulary, tensor table) is a few MB at the start of the file: a 70B model's is about as small
as a 1B model's with the same vocabulary. The first request asks for ``start`` bytes; when the header runs past
them, the next asks for twice as many, up to ``limit``. A server that ignores ``Range`` answers the whole file:
only the bytes needed are read before the connection is closed.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import struct
import urllib.error
import urllib.request

from sharedllm.errors import InvalidModel, ModelError, ModelNotFound
from sharedllm.gguf import Cursor, GGUFFile, parse

logger = logging.getLogger(__name__)

START_BYTES = 8 << 20
LIMIT_BYTES = 256 << 20


class _NeedMore(Exception):
    pass


class _PrefixCursor(Cursor):
    """A cursor over the first ``len(buf)`` bytes of a file of ``size`` bytes: sizes are checked against the file,
    reads against what was fetched (:class:`_NeedMore` past it)."""

    __slots__ = ()

    def need(self, n: int) -> None:
        super().need(n)
        if self.pos + n > len(self.buf):
            raise _NeedMore

    def skip_strings(self, n: int) -> None:
        try:
            super().skip_strings(n)
        except struct.error:
            raise _NeedMore from None
        if self.pos > len(self.buf):
            raise _NeedMore


def _fetch(url: str, n: int, timeout: float) -> tuple[bytes, int]:
    """The first ``n`` bytes of ``url`` (fewer if the file is shorter) and the file's size."""
    req = urllib.request.Request(url, headers={"Range": f"bytes=0-{n - 1}", "User-Agent": "sharedllm"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            if resp.status == 206:
                m = re.fullmatch(r"bytes \d+-\d+/(\d+)", resp.headers.get("Content-Range", "") or "")
                if not m:
                    raise ModelError(f"{url}: the server answered a range without its total size "
                                     f"(Content-Range {resp.headers.get('Content-Range')!r}); download the model")
                size = int(m[1])
            else:  # the whole file: read what we need and hang up
                size = int(resp.headers.get("Content-Length") or 0)
                if not size:
                    raise ModelError(f"{url}: the server sends neither ranges nor the file's size; download the "
                                     "model to plan it")
            return resp.read(n), size
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403, 404, 410):
            raise ModelNotFound(f"{url}: HTTP {exc.code} {exc.reason}; check the URL", url) from None
        raise ModelError(f"{url}: HTTP {exc.code} {exc.reason} while reading the model's header; try again") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ModelError(f"{url}: cannot read the model's header ({reason}); check the URL and the network") from None


def read_gguf_url(url: str, *, start: int = START_BYTES, limit: int = LIMIT_BYTES,
                  timeout: float = 30.0) -> GGUFFile:
    """Read and validate the header of the GGUF at ``url`` (http or https) without downloading its weights.

    ``GGUFFile.path`` is the URL; :attr:`header_bytes` of the result says how many bytes were fetched.
    Raises ``ModelNotFound`` (HTTP 4xx), ``InvalidModel`` (not a GGUF, corrupt, or a header over ``limit`` bytes),
    ``ModelError`` (network)."""
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"read_gguf_url reads http(s) URLs, not {url!r}")
    n, fetched = start, 0
    while True:
        buf, size = _fetch(url, n, timeout)
        fetched += len(buf)
        if not buf:
            raise InvalidModel(f"{url}: empty file, not a GGUF model", url)
        cur = _PrefixCursor(buf, size, url)
        try:
            parsed = parse(cur)
        except (_NeedMore, struct.error):
            if len(buf) >= size:  # the whole file was there: the header really is cut short
                raise InvalidModel(f"{url}: truncated GGUF header; the file on the server is incomplete", url) from None
            if n >= limit:
                raise InvalidModel(f"{url}: the GGUF header is larger than {limit >> 20} MiB; download the model to "
                                   "plan it", url) from None
            logger.info("the header of %s is longer than %d MiB; reading %d MiB", url, n >> 20, min(2 * n, limit) >> 20)
            n = min(2 * n, limit)
            continue
        if cur.pos > len(buf):  # the last string read ran past what was fetched
            n = min(2 * n, limit)
            continue
        parsed = dataclasses.replace(parsed, header_bytes=fetched)
        logger.info("read the GGUF header of %s: %d bytes of %d fetched (%.2f%%)", url, fetched, size,
                    100.0 * fetched / size)
        return parsed
