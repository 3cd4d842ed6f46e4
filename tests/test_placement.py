# SPDX-License-Identifier: AGPL-3.0-or-later
"""Placement tests: synthetic estimates, no model file, no network."""

from __future__ import annotations

import dataclasses
import json
import random
import re
import struct
import time
from pathlib import Path

import pytest

from sharedllm import gguf
from sharedllm.errors import MeshError, ModelTooLarge, NoMachines
from sharedllm.gguf import ModelEstimate
from sharedllm.placement import DeviceSlot, Stage, Topology, plan
from tests.helpers import estimate

MB = 1 << 20
GiB = 1 << 30
GEMMA = Path("/root/.cache/sharedllm/models/gemma-3-270m-q4_k_m.gguf")


def device(machine: str, free: int, index: int = 0, port: int | None = None, kind: str = "cpu") -> DeviceSlot:
    port = port if port is not None else 50052
    return DeviceSlot(
        machine_id=machine,
        endpoint=f"{machine}:{port}",
        device_index=index,
        name="CPU" if kind == "cpu" else f"CUDA{index}",
        free_bytes=free,
        total_bytes=free * 2,
        kind=kind,
    )


def f32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


def llama_cpp_assignment(tensor_split: list[float], n_layer: int) -> list[int]:
    """Device index of each slot, as src/llama-model.cpp computes it (float32 cumulative split, upper_bound)."""
    splits = []
    acc = f32(0.0)
    for s in tensor_split:
        acc = f32(acc + f32(s))
        splits.append(acc)
    splits = [f32(s / acc) for s in splits]
    act = n_layer + 1
    out = []
    for il in range(act):
        x = f32(f32(float(il)) / f32(float(act)))
        out.append(next(i for i, s in enumerate(splits) if s > x))  # std::upper_bound
    return out


def check_invariants(topo: Topology, est: ModelEstimate, devices: list[DeviceSlot], headroom: float = 0.10) -> None:
    """Every slot exactly once, contiguous, consistent bytes, every stage fits its device, llama.cpp agrees."""
    assert sum(topo.tensor_split) == est.n_layer + 1
    assert topo.tensor_split == [float(s.n_slots) for s in topo.stages]
    start = 0
    slots = est.slot_bytes()
    by_key = {(d.endpoint, d.device_index): d for d in devices}
    for s in topo.stages:
        assert s.first_slot == start and s.n_slots >= 1
        start += s.n_slots
        assert s.weight_bytes + s.kv_bytes == sum(slots[s.first_slot : s.first_slot + s.n_slots])
        # The stage's own compute buffer, within the bound placement plans with.
        assert s.compute_bytes == est.stage_compute_bytes(s.first_slot, s.end_slot, len(topo.stages))
        assert s.compute_bytes <= est.compute_bytes + (est.output_compute_bytes if s.has_output else 0)
        dev = by_key[(s.endpoint, s.device_index)]
        assert s.total_bytes <= dev.free_bytes * (1 - headroom)
    assert start == est.n_layer + 1
    assert topo.stages[-1].has_output and not any(s.has_output for s in topo.stages[:-1])
    claimed = [i for i, s in enumerate(topo.stages) for _ in range(s.n_slots)]
    assert llama_cpp_assignment(topo.tensor_split, topo.n_layer) == claimed
    # Stages follow the mesh order, except that the output layer's device may be moved to the end as a last resort.
    keys = [(s.machine_id, s.device_index) for s in topo.stages]
    assert keys[:-1] == sorted(keys[:-1])


def same(a: Topology, b: Topology) -> bool:
    return dataclasses.replace(a, planning_ms=0.0) == dataclasses.replace(b, planning_ms=0.0)


def test_two_equal_machines_split_proportionally():
    est = estimate()
    devs = [device("alpha", 1 * GiB), device("beta", 1 * GiB)]
    topo = plan(devs, est)
    check_invariants(topo, est, devs)
    assert len(topo.stages) == 2
    assert topo.endpoints == ["alpha:50052", "beta:50052"]
    assert topo.machines == ["alpha", "beta"]
    # Half the bytes each, to within one slot: the 170 MiB output slot weighs as much as 17 layers.
    half = est.device_bytes / 2
    for s in topo.stages:
        assert abs(s.weight_bytes + s.kv_bytes - half) <= max(est.slot_bytes())
    assert topo.stages[0].layers == range(0, topo.stages[0].n_slots)
    assert topo.stages[1].has_output
    assert topo.planning_ms > 0


def test_equal_machines_uniform_slots_get_equal_counts():
    est = estimate(n_layer=23, output=10 * MB)  # 24 slots of 10 MiB
    devs = [device(m, 1 * GiB) for m in ("m1", "m2", "m3", "m4")]
    topo = plan(devs, est)
    check_invariants(topo, est, devs)
    assert topo.tensor_split == [6.0, 6.0, 6.0, 6.0]


def test_heterogeneous_machines_get_shares_proportional_to_capacity():
    est = estimate(n_layer=100, layer_weight=40 * MB, layer_kv=10 * MB, output=120 * MB, compute=64 * MB)
    sizes = {"a": 8 * GiB, "b": 2 * GiB, "c": 4 * GiB}
    devs = [device(m, f) for m, f in sizes.items()]
    topo = plan(devs, est, headroom=0.1)
    check_invariants(topo, est, devs)
    caps = {m: f * 0.9 - est.compute_bytes for m, f in sizes.items()}
    total_cap = sum(caps.values())
    largest = max(est.slot_bytes())
    assert topo.machines == ["a", "b", "c"]
    for s in topo.stages:
        target = est.device_bytes * caps[s.machine_id] / total_cap
        assert abs(s.weight_bytes + s.kv_bytes - target) <= largest, s
    counts = {s.machine_id: s.n_slots for s in topo.stages}
    assert counts["a"] > counts["c"] > counts["b"]


def test_one_machine_takes_everything():
    est = estimate()
    devs = [device("solo", 4 * GiB)]
    topo = plan(devs, est)
    check_invariants(topo, est, devs)
    (stage,) = topo.stages
    assert stage.first_slot == 0 and stage.n_slots == est.n_layer + 1
    assert stage.layers == range(0, est.n_layer) and stage.has_output
    assert stage.weight_bytes == sum(est.layer_weight_bytes) + est.output_bytes
    assert stage.kv_bytes == sum(est.layer_kv_bytes)
    assert topo.tensor_split == [float(est.n_layer + 1)]


def test_refuses_a_model_too_large_with_the_way_out():
    est = estimate(layer_weight=50 * MB, output=300 * MB, compute=16 * MB)  # ~1.2 GiB
    devs = [device("alpha", 300 * MB), device("beta", 300 * MB)]
    with pytest.raises(ModelTooLarge) as info:
        plan(devs, est)
    err = info.value
    assert isinstance(err, MeshError)
    assert err.needed > err.available > 0
    msg = str(err)
    assert "gemma-3-270m-q4_k_m.gguf" in msg and "n_ctx=2048" in msg
    assert "2 machines" in msg
    assert "add machines with more free memory" in msg and "lower n_ctx" in msg and "smaller quantization" in msg
    assert "\n" not in msg


def test_refuses_when_one_slot_is_larger_than_any_device():
    est = estimate(output=600 * MB)  # 780 MiB in all, but the output slot alone needs 600 MiB
    devs = [device(m, 400 * MB) for m in ("a", "b", "c")]
    with pytest.raises(ModelTooLarge) as info:
        plan(devs, est, headroom=0.0)
    assert "output layer" in str(info.value)
    assert info.value.needed > info.value.available


def test_max_devices_caps_stages_and_can_refuse():
    est = estimate(n_layer=23, output=10 * MB)  # 240 MiB
    devs = [device(m, 100 * MB) for m in ("a", "b", "c", "d")]
    topo = plan(devs, est, headroom=0.0, max_devices=3)
    check_invariants(topo, est, devs, headroom=0.0)
    assert len(topo.stages) == 3
    with pytest.raises(ModelTooLarge, match="max_devices=2"):
        plan(devs, est, headroom=0.0, max_devices=2)


def test_device_too_small_for_its_share_falls_back():
    # Proportional split puts the 170 MiB output slot on b (100 MiB): it does not fit there, but a can hold it all.
    est = estimate()  # 18 x 10 MiB + 170 MiB = 350 MiB
    devs = [device("a", 400 * MB), device("b", 100 * MB), device("c", 100 * MB)]
    topo = plan(devs, est, headroom=0.0)
    check_invariants(topo, est, devs, headroom=0.0)
    assert topo.machines == ["a"]


def test_fallback_balances_when_it_can():
    # Proportional gives b 3 layers (30 MiB > 25 MiB); a plain greedy fill would fill a to the brim with [3, 2, 1].
    est = estimate(n_layer=5, layer_weight=10 * MB, layer_kv=0, output=40 * MB)  # 90 MiB
    devs = [device("a", 30 * MB), device("b", 25 * MB), device("c", 55 * MB)]
    topo = plan(devs, est, headroom=0.0)
    check_invariants(topo, est, devs, headroom=0.0)
    assert topo.tensor_split == [2.0, 2.0, 2.0]


def test_output_device_moves_to_the_end_when_mesh_order_cannot_fit():
    # Only a can hold the 100 MiB output slot, and a sorts first: in mesh order no contiguous split exists.
    est = estimate(n_layer=10, layer_weight=10 * MB, layer_kv=0, output=100 * MB)  # 200 MiB
    devs = [device("a", 150 * MB), device("b", 60 * MB), device("c", 60 * MB)]
    topo = plan(devs, est, headroom=0.0)
    check_invariants(topo, est, devs, headroom=0.0)
    assert topo.machines == ["b", "c", "a"] and topo.stages[-1].has_output
    assert topo.endpoints == ["b:50052", "c:50052", "a:50052"]


def test_mesh_order_is_kept_when_it_fits():
    est = estimate()
    for names in (("a", "b", "c"), ("c", "b", "a")):
        devs = [device(m, GiB) for m in names]
        keys = [(s.machine_id, s.device_index) for s in plan(devs, est).stages]
        assert keys == sorted(keys)


def test_contiguity_failure_is_refused():
    # 3 slots of 3 fit 10 in total but not as contiguous ranges on two devices of 5.
    est = estimate(n_layer=2, layer_weight=3 * MB, layer_kv=0, output=3 * MB)
    devs = [device("a", 5 * MB), device("b", 5 * MB)]
    with pytest.raises(ModelTooLarge, match="contiguous"):
        plan(devs, est, headroom=0.0)


def test_no_devices_raises_no_machines():
    preloads = "dask worker ADDR --preload-nanny sharedllm.nanny --preload sharedllm.worker"
    with pytest.raises(NoMachines, match=re.escape(preloads)):
        plan([], estimate())


def test_device_without_usable_memory_is_skipped():
    est = estimate(compute=64 * MB)
    devs = [device("a", 2 * GiB), device("b", 60 * MB), device("c", 2 * GiB)]
    topo = plan(devs, est)
    check_invariants(topo, est, devs)
    assert "b" not in topo.machines


def test_only_unusable_devices_is_too_large():
    est = estimate(compute=64 * MB)
    with pytest.raises(ModelTooLarge) as info:
        plan([device("a", 50 * MB)], est)
    # Reported against what the device has (45 MiB after headroom), not a misleading "0 B usable".
    assert info.value.needed > info.value.available == int(50 * MB * 0.9)


def test_pack_uses_the_fewest_devices():
    est = estimate(n_layer=40, layer_weight=20 * MB, layer_kv=0, output=100 * MB)  # 900 MiB
    devs = [device("a", 500 * MB), device("b", 600 * MB), device("c", 300 * MB), device("d", 200 * MB)]
    packed = plan(devs, est, headroom=0.0, strategy="pack")
    check_invariants(packed, est, devs, headroom=0.0)
    assert packed.machines == ["a", "b"]  # the two largest, kept in mesh order
    spread = plan(devs, est, headroom=0.0)
    check_invariants(spread, est, devs, headroom=0.0)
    assert spread.machines == ["a", "b", "c", "d"]
    single = plan([device(m, 2 * GiB) for m in "wxyz"], est, strategy="pack")
    assert single.machines == ["w"]  # ties break by machine id


def test_gpu_devices_in_machine_and_index_order():
    est = estimate(n_layer=23, output=10 * MB)
    devs = [
        device("m2", 1 * GiB, index=1, kind="gpu"),
        device("m1", 1 * GiB, index=0, kind="cpu"),
        device("m2", 1 * GiB, index=0, kind="gpu"),
    ]
    topo = plan(devs, est)
    check_invariants(topo, est, devs)
    assert [(s.machine_id, s.device_index) for s in topo.stages] == [("m1", 0), ("m2", 0), ("m2", 1)]
    assert topo.endpoints == ["m1:50052", "m2:50052"]
    assert topo.machines == ["m1", "m2"]


@pytest.mark.parametrize(
    "kwargs",
    [{"headroom": -0.1}, {"headroom": 1.0}, {"headroom": float("nan")}, {"strategy": "fastest"}, {"max_devices": 0}],
)
def test_bad_arguments_raise_value_error(kwargs):
    with pytest.raises(ValueError):
        plan([device("a", GiB)], estimate(), **kwargs)


def test_duplicate_device_raises_value_error():
    with pytest.raises(ValueError, match="listed twice"):
        plan([device("a", GiB), device("a", GiB)], estimate())


def test_round_trip_through_json():
    est = estimate()
    topo = plan([device("alpha", GiB), device("beta", GiB, index=1, kind="gpu")], est)
    back = Topology.from_dict(json.loads(json.dumps(topo.to_dict())))
    assert back == topo
    assert back.tensor_split == topo.tensor_split and back.endpoints == topo.endpoints


def test_from_dict_refuses_a_broken_topology():
    d = plan([device("alpha", GiB), device("beta", GiB)], estimate()).to_dict()
    d["stages"][1]["first_slot"] += 1
    with pytest.raises(ValueError, match="contiguous"):
        Topology.from_dict(d)


def test_str_is_a_readable_table():
    est = estimate(n_layer=23, output=10 * MB)
    topo = plan([device("alpha", GiB), device("beta", GiB), device("gamma", GiB)], est)
    text = str(topo)
    for m in ("alpha", "beta", "gamma"):
        assert m in text
    assert "0-7" in text and "8-15" in text and "16-22 + output" in text
    assert "gemma-3-270m-q4_k_m.gguf" in text and "MiB" in text
    assert len(text.splitlines()) == 2 + len(topo.stages)


def test_stage_describes_output_only():
    s = Stage("m", "m:1", 0, "CPU", 18, 1, 170 * MB, 0, 0, True)
    assert s.layers == range(18, 18) and s.describe_layers() == "output"


def test_output_layer_on_the_client_splits_the_layers_evenly():
    # The output slot weighs nothing on the mesh (sharedllm.gguf.estimate_memory(output_on_client=True)).
    est = dataclasses.replace(estimate(output=0), output_on_client=True)
    devs = [device("alpha", GiB), device("beta", GiB)]
    topo = plan(devs, est)
    check_invariants(topo, est, devs)
    assert topo.output_on_client and [s.describe_layers() for s in topo.stages] == ["0-8", "9-17"]
    assert "18 layers + output (on the client)" in str(topo)
    assert Topology.from_dict(topo.to_dict()) == topo
    # Against the output on the mesh, where the 170 MiB output slot pulls the split towards the first machine.
    on_mesh = plan(devs, estimate())
    assert not on_mesh.output_on_client and on_mesh.stages[-1].describe_layers().endswith("output")
    assert on_mesh.stages[0].n_slots > topo.stages[0].n_slots


def test_no_device_holds_only_the_output_slot_of_an_output_layer_on_the_client():
    # A split that leaves the last device only the output slot: with the output layer on the client that slot is
    # empty, and llama.cpp would neither allocate nor compute anything there. The device before takes the slot.
    from sharedllm.placement import _stages

    est = dataclasses.replace(estimate(n_layer=4, output=0, compute=10 * MB), output_on_client=True)
    devs = [device(f"m{i}", GiB) for i in range(5)]
    stages = _stages(devs, list(range(5)), [1] * 5, est)
    topo = Topology(model=est.path, n_layer=4, n_ctx=est.n_ctx, stages=stages)
    assert [s.describe_layers() for s in stages] == ["0", "1", "2", "3"]
    assert topo.machines == ["m0", "m1", "m2", "m3"] and topo.tensor_split == [1.0, 1.0, 1.0, 2.0]
    assert stages[-1].has_output and stages[-1].compute_bytes == est.compute_bytes
    # On the mesh the output slot holds the output layer itself: it keeps its device.
    on_mesh = _stages(devs, list(range(5)), [1] * 5, estimate(n_layer=4, output=8 * MB, compute=10 * MB))
    assert len(on_mesh) == 5 and on_mesh[-1].describe_layers() == "output"


def test_shuffled_input_gives_the_same_topology():
    est = estimate(n_layer=60, layer_weight=30 * MB, output=200 * MB, compute=32 * MB)
    rng = random.Random(7)
    devs = [device(f"m{i:02d}", rng.randrange(200 * MB, 3 * GiB), index=i % 2, port=50052 + i) for i in range(12)]
    for strategy in ("spread", "pack"):
        ref = plan(devs, est, strategy=strategy)
        for _ in range(5):
            shuffled = devs[:]
            rng.shuffle(shuffled)
            assert same(plan(shuffled, est, strategy=strategy), ref)


def test_split_reproduces_llama_cpp_assignment():
    rng = random.Random(20240521)
    placed = moved = 0
    for _ in range(300):
        n_layer = rng.randrange(1, 130)
        weights = [rng.randrange(1, 60) * MB for _ in range(n_layer)]
        kvs = [rng.randrange(0, 10) * MB for _ in range(n_layer)]
        est = estimate(
            n_layer=n_layer, weights=weights, kvs=kvs, output=rng.randrange(1, 400) * MB, compute=rng.randrange(64) * MB
        )
        # Capacities around the model's size, so that rounding, fallbacks and refusals all happen.
        n_dev = rng.randrange(1, 17)
        share = est.device_bytes / n_dev
        devs = [
            device(
                f"m{rng.randrange(20):02d}",
                int(share * rng.uniform(0.3, 2.5)) + 2 * est.compute_bytes,
                index=i,
                kind=rng.choice(["cpu", "gpu"]),
            )
            for i in range(n_dev)
        ]
        headroom = rng.choice([0.0, 0.1, 0.25])
        strategy = rng.choice(["spread", "pack"])
        max_devices = rng.choice([None, None, rng.randrange(1, 8)])
        try:
            topo = plan(devs, est, headroom=headroom, strategy=strategy, max_devices=max_devices)
        except ModelTooLarge as err:
            assert err.needed > 0
            continue
        check_invariants(topo, est, devs, headroom=headroom)
        if max_devices is not None:
            assert len(topo.stages) <= max_devices
        keys = [(s.machine_id, s.device_index) for s in topo.stages]
        moved += keys != sorted(keys)
        placed += 1
    assert placed > 150 and moved > 0


def test_planning_is_fast():
    est = estimate(n_layer=100, layer_weight=200 * MB, layer_kv=20 * MB, output=1 * GiB, compute=256 * MB)
    rng = random.Random(1)
    devs = [device(f"m{i:02d}", rng.randrange(2 * GiB, 24 * GiB)) for i in range(64)]
    plan(devs, est)  # warm up
    for strategy in ("spread", "pack"):
        t0 = time.perf_counter()
        topo = plan(devs, est, strategy=strategy)
        elapsed_ms = (time.perf_counter() - t0) * 1000
        check_invariants(topo, est, devs)
        assert elapsed_ms < 50 and topo.planning_ms < 50


def test_real_gemma_estimate():
    read_gguf = getattr(gguf, "read_gguf", None)
    estimate_memory = getattr(gguf, "estimate_memory", None)
    if read_gguf is None or estimate_memory is None:
        pytest.skip("sharedllm.gguf has no read_gguf/estimate_memory yet")
    if not GEMMA.exists():
        pytest.skip(f"{GEMMA} is not there (scripts/setup.sh downloads it)")
    est = estimate_memory(read_gguf(str(GEMMA)), n_ctx=2048)
    assert isinstance(est, ModelEstimate)
    devs = [device("alpha", 2 * GiB), device("beta", 2 * GiB)]
    topo = plan(devs, est)
    check_invariants(topo, est, devs)
    with pytest.raises(ModelTooLarge, match=re.escape("gemma-3-270m-q4_k_m.gguf")):
        plan([device("alpha", est.device_bytes // 4), device("beta", est.device_bytes // 4)], est)


def test_pack_prefers_machines_with_the_model_warm():
    est = estimate()  # ~350 MiB: any one of these devices holds it
    devs = [device("a", 2 * GiB), device("b", 8 * GiB), device("c", 4 * GiB)]
    assert plan(devs, est, strategy="pack").machines == ["b"]  # the largest, without a preference
    assert plan(devs, est, strategy="pack", prefer={"c"}).machines == ["c"]  # the warm one, memory allowing
    assert plan(devs, est, max_devices=1, prefer={"a"}).machines == ["a"]
    assert plan(devs, est, prefer={"a"}).machines == ["a", "b", "c"]  # spread still uses every device


def test_of_equal_devices_the_direct_ones_are_chosen_before_those_behind_the_hub():
    est = estimate()
    nat = dataclasses.replace(device("a-nat", 4 * GiB), endpoint="hub/a-nat", via_hub=True)
    devs = [nat, device("b", 4 * GiB), device("c", 2 * GiB)]
    assert plan(devs, est, strategy="pack").machines == ["b"]  # "a-nat" sorts first by name and is as large
    assert plan(devs, est, max_devices=2).machines == ["a-nat", "b"]  # larger than c: still used, in mesh order
    bigger = dataclasses.replace(nat, free_bytes=8 * GiB)
    assert plan([bigger, *devs[1:]], est, strategy="pack").machines == ["a-nat"]  # memory first, then the path
    assert plan([nat, device("b", 4 * GiB)], est, max_devices=1, prefer={"a-nat"}).machines == ["a-nat"]  # warm first


def test_the_output_device_holds_its_extra_compute():
    """output_compute_bytes (logits, more input copies) lands on the device with the output slot, and counts when
    deciding what fits there: the output slot moves to a device that can hold it."""
    est = dataclasses.replace(estimate(n_layer=4, layer_weight=10 * MB, layer_kv=0, output=10 * MB,
                                       compute=10 * MB), output_compute_bytes=100 * MB)
    # In mesh order beta, the last device, holds the output slot; with the extra only alpha can, and moves to the end.
    devs = [device("alpha", int(150 * MB / 0.9)), device("beta", int(40 * MB / 0.9))]
    assert plan(devs, dataclasses.replace(est, output_compute_bytes=0)).stages[-1].machine_id == "beta"
    topo = plan(devs, est)
    check_invariants(topo, est, devs)
    last = topo.stages[-1]
    assert last.machine_id == "alpha" and last.has_output
    assert last.compute_bytes == 110 * MB and topo.stages[0].compute_bytes == 10 * MB
    assert last.total_bytes <= 150 * MB
    with pytest.raises(ModelTooLarge):
        plan([device("beta", int(40 * MB / 0.9)), device("gamma", int(40 * MB / 0.9))], est)
