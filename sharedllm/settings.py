# SPDX-License-Identifier: AGPL-3.0-or-later
"""SharedLLM's settings, read in one place.

Each setting is a key of Dask's configuration namespace ``sharedllm`` (its defaults in ``sharedllm/sharedllm.yaml``)
and, for most, a ``SHAREDLLM_*`` environment variable. The variable wins; then Dask's configuration (YAML files under
``~/.config/dask``, ``DASK_SHAREDLLM__*`` variables) where the process runs Dask (the scheduler, the workers, a client);
then the default. Processes that run no Dask (the engine, the rpc-server, the relays) read the variables and the
defaults only, and never import Dask for it.

    from sharedllm import settings
    settings.get("model-dir")          # None unless set
    settings.env("model-dir")          # "SHAREDLLM_MODEL_DIR", for a click option's envvar=
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Any

# key -> the environment variable that sets it (keys without one are set through Dask's configuration only)
ENV: dict[str, str] = {
    "machine-id": "SHAREDLLM_MACHINE_ID",
    "model-dir": "SHAREDLLM_MODEL_DIR",
    "scheduler": "SHAREDLLM_SCHEDULER",
    "key": "SHAREDLLM_KEY",
    "key-file": "SHAREDLLM_KEY_FILE",
    "cluster-secret": "SHAREDLLM_CLUSTER_SECRET",
    "cluster-secret-file": "SHAREDLLM_CLUSTER_SECRET_FILE",
    "state-path": "SHAREDLLM_STATE_PATH",
    "api-key": "SHAREDLLM_API_KEY",
    "tls.ca-file": "SHAREDLLM_TLS_CA_FILE",
    "tls.cert": "SHAREDLLM_TLS_CERT",
    "tls.key": "SHAREDLLM_TLS_KEY",
    "relay.coalesce": "SHAREDLLM_RELAY_COALESCE",
    "relay.prefetch": "SHAREDLLM_RELAY_PREFETCH",
    "relay.alloc-sizes": "SHAREDLLM_RELAY_ALLOC_SIZES",
    "relay.trace": "SHAREDLLM_RELAY_TRACE",
}
_FALSE = ("0", "false", "no", "off", "")


@functools.cache
def defaults() -> dict[str, Any]:
    """The ``sharedllm`` namespace of ``sharedllm.yaml``, flattened to dotted keys."""
    import yaml

    with open(Path(__file__).with_name("sharedllm.yaml")) as f:
        tree = yaml.safe_load(f)["sharedllm"]
    out: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            out[prefix] = node

    walk("", tree)
    return out


def env(key: str) -> str:
    """The environment variable of ``key`` (for a click option's ``envvar=``)."""
    return ENV[key]


def get(key: str) -> Any:
    """The value of ``key``: its environment variable, else Dask's configuration (where Dask runs), else the default.
    A boolean setting read from the environment is False for ``0``, ``false``, ``no``, ``off`` or empty."""
    base = defaults()
    if key not in base:
        raise KeyError(f"no SharedLLM setting {key!r}; the settings are {', '.join(sorted(base))}")
    default = base[key]
    raw = os.environ.get(ENV[key]) if key in ENV else None
    if raw is not None:
        return raw.strip().lower() not in _FALSE if isinstance(default, bool) else raw
    if "dask" in sys.modules:  # a process that runs Dask: its configuration files count too
        import dask.config

        register_with_dask()
        return dask.config.get(f"sharedllm.{key}", default=default)
    return default


def flag(key: str) -> bool:
    """A boolean setting."""
    return bool(get(key))


def cache_root() -> Path:
    """SharedLLM's folder in the user's cache, ``$XDG_CACHE_HOME/sharedllm`` (``~/.cache/sharedllm``): models, tensor
    caches, the engine's measures, the RPC protocol probe."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sharedllm"


@functools.cache
def register_with_dask() -> None:
    """Make ``sharedllm.yaml`` the defaults of Dask's ``sharedllm`` namespace (``dask config get sharedllm``)."""
    import dask.config
    import yaml

    with open(Path(__file__).with_name("sharedllm.yaml")) as f:
        dask.config.update_defaults(yaml.safe_load(f))
