# SPDX-License-Identifier: AGPL-3.0-or-later
"""The engine child's process: how it is started (its environment), and a standby started ahead of need."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile


def _child_env() -> dict[str, str]:
    # GGML_NO_BACKTRACE: on abort, ggml would attach gdb to print a backtrace, which takes seconds.
    env = dict(os.environ, PYTHONUNBUFFERED="1", GGML_NO_BACKTRACE="1")
    # The engine's own CPU work is tiny (embedding rows, sampling) between network waits: its OpenMP threads
    # should sleep soon after, not spin ~300k times and take the CPU from the rest of the user's process.
    env.setdefault("GOMP_SPINCOUNT", "10000")
    return env


def spawn_child(log) -> subprocess.Popen:
    """Start ``python -m sharedllm.engine``: frames on its stdin and stdout, everything else it prints in ``log``."""
    return subprocess.Popen(
        [sys.executable, "-m", "sharedllm.engine", str(os.getpid())],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=log,
        env=_child_env(),
        start_new_session=True,  # Ctrl-C in the user's terminal reaches the user's code, not the engine
    )


class Standby:
    """An engine process started ahead of need: its interpreter up and llama-cpp-python imported, waiting for the
    spec of the model it will load. A recovery that takes it skips those ~0.3-0.8 s (``MeshModel`` keeps one).

    It costs an idle process (~50 MB) and nothing else; it exits with its parent, or on :meth:`close`."""

    def __init__(self):
        self.log = tempfile.NamedTemporaryFile(prefix="sharedllm-engine-", suffix=".log", delete=False)
        self.proc = spawn_child(self.log)

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        """Stop the process (it holds nothing) and remove its log."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(Exception):
                f.close()
        self.log.close()
        with contextlib.suppress(OSError):
            os.unlink(self.log.name)
