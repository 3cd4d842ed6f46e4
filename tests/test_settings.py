# SPDX-License-Identifier: AGPL-3.0-or-later
"""One place reads SharedLLM's settings (``sharedllm.settings``): the ``SHAREDLLM_*`` variable wins, then Dask's
``sharedllm`` configuration, then the defaults in ``sharedllm/sharedllm.yaml``."""

from __future__ import annotations

import subprocess
import sys

import dask.config
import pytest

from sharedllm import settings


def test_defaults_come_from_the_packaged_yaml():
    d = settings.defaults()
    assert d["relay.prefetch"] is True and d["model-dir"] is None and d["tls.ca-file"] is None
    assert set(settings.ENV) <= set(d)  # every variable names a key that has a default


def test_the_variable_wins_then_daskconfig_then_the_default(monkeypatch):
    monkeypatch.delenv("SHAREDLLM_MODEL_DIR", raising=False)
    assert settings.get("model-dir") is None
    with dask.config.set({"sharedllm.model-dir": "/from/dask"}):
        assert settings.get("model-dir") == "/from/dask"
        monkeypatch.setenv("SHAREDLLM_MODEL_DIR", "/from/env")
        assert settings.get("model-dir") == "/from/env"


@pytest.mark.parametrize(("raw", "value"), [("0", False), ("false", False), ("off", False), ("1", True), ("yes", True)])
def test_a_boolean_from_the_environment(monkeypatch, raw, value):
    monkeypatch.setenv("SHAREDLLM_RELAY_PREFETCH", raw)
    assert settings.flag("relay.prefetch") is value


def test_an_unknown_key_names_the_known_ones():
    with pytest.raises(KeyError, match=r"relay\.prefetch"):
        settings.get("relay.prefech")


def test_a_process_without_dask_reads_them_without_importing_dask():
    code = ("import sys; from sharedllm import settings; "
            "assert settings.flag('relay.coalesce') and 'dask' not in sys.modules; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "ok", out.stderr
