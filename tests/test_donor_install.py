# SPDX-License-Identifier: AGPL-3.0-or-later
"""A donor's path from nothing: SharedLLM's wheel, built from this checkout, installed with the documented command
(``python3 scripts/install.py WHEEL --venv DIR``: llama-cpp-python built with RPC from the same cache as
``scripts/setup.sh``, then the wheel and its dependencies) into a fresh virtual environment outside the checkout; a
worker started from that environment, in a network namespace of its own behind a firewall that takes no inbound
connection, joins the mesh and serves a session with the oracle's greedy text."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sharedllm.netlab import unavailable
from tests.helpers import N_CTX, PROMPT, wait_for

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.mesh, pytest.mark.timeout(900)]


def _run(cmd: list[str], cwd: Path) -> str:
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=800)
    assert out.returncode == 0, f"{' '.join(cmd)}:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    return out.stdout + out.stderr


@pytest.fixture(scope="module")
def donor_python(tmp_path_factory) -> str:
    """The interpreter of a donor's installation, made as the README says."""
    work = tmp_path_factory.mktemp("donor")
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(work), str(ROOT)], cwd=work)
    [wheel] = work.glob("sharedllm-*.whl")
    # The base interpreter, as a donor has it: not this checkout's virtual environment.
    base = subprocess.run([sys.executable, "-c", "import sys; print(sys._base_executable)"], capture_output=True,
                          text=True, check=True).stdout.strip()
    said = _run([base, str(ROOT / "scripts" / "install.py"), str(wheel), "--venv", str(work / "venv")], cwd=work)
    # the next step, spelled out
    assert "dask worker tcp://SCHEDULER:8786 --preload-nanny sharedllm.nanny --preload sharedllm.worker" in said
    python = work / "venv" / "bin" / "python"
    where = _run([str(python), "-c", "import sharedllm, llama_cpp; print(sharedllm.__file__, "
                  "llama_cpp.llama_supports_rpc())"], cwd=work)
    assert str(work / "venv") in where and "True" in where and str(ROOT) not in where
    return str(python)


@pytest.mark.skipif(unavailable() is not None and not os.environ.get("SHAREDLLM_REQUIRE_NETLAB"),
                                 reason=f"no separate network stacks: {unavailable()}")
def test_a_donor_installed_from_nothing_serves_a_session(donor_python, local_greedy):
    from sharedllm.local import LocalMesh

    with LocalMesh(machines=0, netlab=True, behind_nat=["donor"], no_inbound=["donor"]) as lm:
        lm.add_machine("donor", python=donor_python)
        mesh = lm.mesh()
        wait_for(lambda: [m["machine_id"] for m in mesh.machines().ready()] == ["donor"], 120,
                 what="the donor's machine ready")
        worker = next(p for p in lm.workers if p.machine_id == "donor")
        assert worker.popen.args[worker.popen.args.index("-m") - 1] == donor_python
        with mesh.load("gemma-3-270m", n_ctx=N_CTX, machines=["donor"]) as llm:
            text = llm.create_completion(PROMPT, max_tokens=64, temperature=0)["choices"][0]["text"]
        assert text == local_greedy["completion"]
        assert lm.lab.drops("donor") == 0
