# SPDX-License-Identifier: AGPL-3.0-or-later
"""Dask-native deployment: a cluster whose scheduler and workers get SharedLLM from Dask configuration and the
environment only, as dask-jobqueue, dask-kubernetes or a ``SpecCluster`` start them (no ``--preload`` anywhere)."""

from __future__ import annotations

import logging
import secrets

import dask
import pytest

from tests.helpers import N_CTX, PROMPT, wait_for

pytestmark = [pytest.mark.mesh, pytest.mark.timeout(300)]


def test_spec_cluster_with_preloads_from_configuration_only(tmp_path, monkeypatch, local_greedy):
    from distributed import Client, Nanny, Scheduler, SpecCluster
    from distributed.comm import get_address_host

    from sharedllm import Mesh
    from sharedllm.client.control import admin_security
    from sharedllm.security import new_user_key, write_private

    logging.getLogger("sharedllm").setLevel(logging.INFO)
    # The secret and the scheduler's options come from the environment, the preloads and the workers' options from
    # Dask's configuration (what DASK_DISTRIBUTED__WORKER__PRELOAD and ..._PRELOAD_ARGV set), each machine's identity
    # from its worker's environment. The admin's key is provisioned ahead in a file (a deployment's secret), which the
    # scheduler adopts at its first start: the cluster's own connection to its scheduler and the operator's client
    # prove it (the Dask port of a mesh with a cluster secret takes nothing else).
    monkeypatch.setenv("SHAREDLLM_CLUSTER_SECRET", secrets.token_urlsafe(32))
    monkeypatch.setenv("SHAREDLLM_MAX_LEASES", "3")
    admin_key = new_user_key()[1]
    key_file = tmp_path / "admin.key"
    write_private(key_file, admin_key + "\n")
    config = {
        "distributed.scheduler.preload": ["sharedllm.scheduler"],
        "distributed.scheduler.preload-argv": [["--reconcile-interval", "0.2", "--user-port", "0",
                                                "--admin-key-file", str(key_file)]],
        "distributed.worker.preload": ["sharedllm.worker"],
        "distributed.nanny.preload": ["sharedllm.nanny"],
        "distributed.worker.preload-argv": [["--rpc-threads", "1", "--label", "via=config"]],
    }
    workers = {
        name: {"cls": Nanny, "options": {"nthreads": 1, "local_directory": str(tmp_path / name),
                                          "env": {"SHAREDLLM_MACHINE_ID": name, "SHAREDLLM_ORPHAN_TIMEOUT": "30"}}}
        for name in ("cfg-1", "cfg-2")
    }
    with dask.config.set(config), SpecCluster(
        scheduler={"cls": Scheduler, "options": {"dashboard_address": ":0"}}, workers=workers,
        security=admin_security(admin_key),
    ) as cluster, Client(cluster) as client:
        plugin = cluster.scheduler.plugins["sharedllm-mesh"]
        # the scheduler preload read its option from the environment
        assert plugin.data.rate.limits.concurrent_leases == 3
        assert plugin.data.admission is not None  # ... and the cluster secret: only vouched-for workers can join
        assert key_file.read_text().strip() == admin_key  # the provisioned key was adopted, not replaced
        with pytest.warns(DeprecationWarning):  # the operator's Dask client proves the admin's key
            assert Mesh(client).whoami()["role"] == "admin"
        user_port = f"{get_address_host(cluster.scheduler.address)}:{plugin.user_port.port}"
        with Mesh(user_port, key=admin_key) as mesh:
            assert mesh.whoami() == {"name": "admin", "role": "admin", "via": "user-port"}
            # ready(): placement's own test (a ready rpc-server behind a relay the scheduler has reached)
            wait_for(lambda: len([m for m in mesh.machines().ready() if m["rpc"].get("relay")]) == 2, timeout=120,
                     what="both configured machines with ready rpc-servers and relays")
            machines = {m["machine_id"]: m for m in mesh.machines()}
            assert sorted(machines) == ["cfg-1", "cfg-2"]
            assert all(m["labels"] == {"via": "config"} for m in machines.values())
            with mesh.load("gemma-3-270m", n_ctx=N_CTX, machines=["cfg-1", "cfg-2"]) as llm:
                assert llm.topology.machines == ["cfg-1", "cfg-2"]
                out = llm.create_completion(PROMPT, max_tokens=64, temperature=0)
                assert out["choices"][0]["text"] == local_greedy["completion"]
