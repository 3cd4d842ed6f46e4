# SPDX-License-Identifier: AGPL-3.0-or-later
"""What a wheel holds: setuptools packages only what pyproject.toml lists, so a subpackage left out of the list
installs nowhere but in an editable checkout (sharedllm.engine and sharedllm.relay were missing from wheels)."""

from __future__ import annotations

from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parent.parent


def test_every_package_of_the_source_tree_is_in_the_wheel():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    dirs = config["package-dir"]
    listed = set(config["packages"])
    found = set()
    for name, folder in dirs.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            if "__pycache__" not in rel.parts:
                found.add(".".join([name, *rel.parts]))
    assert found == listed, f"packages to add to (or drop from) pyproject.toml: {sorted(found ^ listed)}"
    # Every Python file of the repository carries the licence's SPDX header (a wheel's files as much as the tests').
    header = "SPDX-License-Identifier: AGPL-3.0-or-later"
    files = [p for folder in ("sharedllm", "scheduler_plugins", "cli", "tests", "bench")
             for p in (ROOT / folder).rglob("*.py") if "__pycache__" not in p.parts]
    missing = [str(p.relative_to(ROOT)) for p in files if header not in p.read_text()[:200]]
    assert not missing, missing
