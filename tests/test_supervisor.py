# SPDX-License-Identifier: AGPL-3.0-or-later
"""The rpc-server supervisor on its own (no Dask): start, restart after a crash, crash loop -> failed."""

from __future__ import annotations

import asyncio
import os
import signal
import time

from sharedllm import ggml
from sharedllm.actor import RPCServerConfig, RPCServerSupervisor


async def _wait_state(sup: RPCServerSupervisor, want: str, timeout: float = 60.0, reason: str = "", **match) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        st = sup.status.to_dict()
        if st["state"] == want and reason in (st["reason"] or "") and all(st[k] == v for k, v in match.items()):
            return st
        assert time.monotonic() < deadline, f"supervisor stuck in {st}"
        await asyncio.sleep(0.05)


def test_restarts_a_killed_server_on_the_same_endpoint(tmp_path):
    async def scenario():
        seen = []
        cfg = RPCServerConfig(threads=1, backoff=0.1)
        sup = RPCServerSupervisor(cfg, tmp_path, on_change=lambda s: seen.append(s.state))
        st = (await sup.start()).to_dict()
        assert st["state"] == "ready" and st["protocol"] == ".".join(map(str, ggml.rpc_protocol_version()))
        assert st["devices"][0]["name"] == "CPU"
        os.kill(st["pid"], signal.SIGKILL)
        again = await _wait_state(sup, "ready", restarts=1)
        assert again["endpoint"] == st["endpoint"] and again["pid"] != st["pid"]
        assert await asyncio.to_thread(ggml.rpc_hello, again["endpoint"], 5.0)
        assert "restarting" in seen
        stopped = (await sup.stop()).to_dict()
        assert stopped["state"] == "stopped"
        await asyncio.sleep(0.3)
        try:
            os.kill(again["pid"], 0)
            raise AssertionError("rpc-server still running after stop()")
        except ProcessLookupError:
            pass

    asyncio.run(scenario())


def test_crash_loop_is_marked_failed_with_the_reason(tmp_path):
    async def scenario():
        cfg = RPCServerConfig(threads=1, devices=("NOPE0",), max_restarts=2, backoff=0.05, cooldown=3600,
                              start_timeout=20)
        sup = RPCServerSupervisor(cfg, tmp_path)
        await sup.start()
        st = await _wait_state(sup, "failed", timeout=90, reason="crash loop")
        assert "crash loop" in st["reason"] and "unknown device NOPE0" in st["reason"]
        assert st["restarts"] == 2
        await sup.stop()

    asyncio.run(scenario())
