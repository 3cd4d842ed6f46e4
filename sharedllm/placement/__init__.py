# SPDX-License-Identifier: AGPL-3.0-or-later
"""Placement: which device of which machine holds which layers of a model.

Pure data in, data out: no Dask, no network, no llama.cpp.

llama.cpp (``n_gpu_layers=-1``) splits ``n_layer + 1`` slots over the devices it is given: the repeating layers
``0..n_layer-1`` and the output layer as slot ``n_layer``. With ``splits`` the cumulative ``tensor_split`` normalised
to 1, slot ``il`` goes to device ``upper_bound(splits, il / (n_layer + 1))``. When ``tensor_split`` holds integer slot
counts ``c_0..c_k`` summing to ``n_layer + 1``, device ``d`` therefore gets exactly the slots
``[c_0 + .. + c_{d-1}, c_0 + .. + c_d)``. Placement picks an ordered list of devices and those integer counts; devices
that get no slot are left out of the topology, because llama.cpp would still allocate a compute buffer on them.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields

from sharedllm.errors import ModelTooLarge, NoMachines, gib
from sharedllm.gguf import ModelEstimate
from sharedllm.placement.layers import place_layers

log = logging.getLogger(__name__)

STRATEGIES = ("spread", "pack")
DEVICE_KINDS = ("cpu", "gpu")

_NO_MACHINES = (
    "no machine in the mesh has a ready rpc-server; start workers with "
    "`dask worker ADDR --preload-nanny sharedllm.nanny --preload sharedllm.worker`"
)
_WAY_OUT = "add machines with more free memory, lower n_ctx, or use a smaller quantization"


@dataclass(frozen=True)
class DeviceSlot:
    """One device of one machine's rpc-server, as the scheduler sees it."""

    machine_id: str
    endpoint: str  # "host:port" of that machine's rpc-server
    device_index: int  # index of the device within that rpc-server (0 for a CPU-only server)
    name: str  # e.g. "CPU", "CUDA0"
    free_bytes: int
    total_bytes: int
    kind: str = "cpu"  # "cpu" or "gpu"
    via_hub: bool = False  # reached through the relay hub (the machine takes no inbound connections)


@dataclass(frozen=True)
class Stage:
    """What one device holds in a topology: the contiguous slot range ``[first_slot, first_slot + n_slots)``."""

    machine_id: str
    endpoint: str
    device_index: int
    device_name: str
    first_slot: int
    n_slots: int
    weight_bytes: int
    kv_bytes: int
    compute_bytes: int
    has_output: bool  # holds slot n_layer (the output layer)
    output_on_client: bool = False  # slot n_layer is empty here: the output layer runs on the client

    @classmethod
    def from_dict(cls, d: dict) -> Stage:
        """A stage from ``asdict``'s output (unknown keys are ignored)."""
        return cls(**{k: v for k, v in d.items() if k in _STAGE_KEYS})

    @property
    def total_bytes(self) -> int:
        """Weights, KV cache and compute buffer: what this stage takes on its device."""
        return self.weight_bytes + self.kv_bytes + self.compute_bytes

    @property
    def end_slot(self) -> int:
        """One past the last slot held."""
        return self.first_slot + self.n_slots

    @property
    def layers(self) -> range:
        """The repeating layers held, without the output slot."""
        return range(self.first_slot, self.end_slot - 1 if self.has_output else self.end_slot)

    def describe_layers(self) -> str:
        """The slot range for humans: ``"0-8"``, ``"9-17 + output"``, ``"output"``. The output slot is not named
        when the output layer runs on the client."""
        layers = self.layers
        if not layers:
            text = ""
        elif len(layers) == 1:
            text = str(layers.start)
        else:
            text = f"{layers.start}-{layers.stop - 1}"
        if self.has_output and (not self.output_on_client or not text):
            text = f"{text} + output" if text else "output"
        return text


_STAGE_KEYS = frozenset(f.name for f in fields(Stage))


@dataclass(frozen=True)
class Topology:
    """An ordered list of stages that together hold every slot of a model exactly once."""

    model: str  # the model path the estimate was made for
    n_layer: int
    n_ctx: int
    stages: tuple[Stage, ...]
    planning_ms: float = 0.0

    def __post_init__(self) -> None:
        # A topology crosses Dask RPC as a dict: refuse one that llama.cpp would place differently from what it claims.
        if not self.stages:
            raise ValueError("a topology needs at least one stage")
        expected = 0
        for i, stage in enumerate(self.stages):
            if stage.n_slots < 1:
                raise ValueError(f"stage {i} ({stage.machine_id}/{stage.device_name}) holds no slot")
            if stage.first_slot != expected:
                raise ValueError(f"stage {i} starts at slot {stage.first_slot}, expected {expected} (not contiguous)")
            if stage.has_output != (stage.end_slot == self.n_layer + 1):
                raise ValueError(f"stage {i} has_output={stage.has_output} disagrees with its slot range")
            expected = stage.end_slot
        if expected != self.n_layer + 1:
            raise ValueError(f"the stages hold {expected} slots, the model has {self.n_layer + 1}")
        keys = [(s.endpoint, s.device_index) for s in self.stages]
        if len(set(keys)) != len(keys):
            raise ValueError("a device appears in more than one stage")

    @property
    def output_on_client(self) -> bool:
        """The output layer runs on the client: no logits cross the network (every stage says the same)."""
        return self.stages[-1].output_on_client

    @property
    def tensor_split(self) -> list[float]:
        """Slot counts in stage order, as llama.cpp's ``tensor_split`` wants them."""
        return [float(s.n_slots) for s in self.stages]

    @property
    def endpoints(self) -> list[str]:
        """Unique rpc-server endpoints in order of first appearance."""
        return list(dict.fromkeys(s.endpoint for s in self.stages))

    @property
    def machines(self) -> list[str]:
        """Unique machine ids in order of first appearance."""
        return list(dict.fromkeys(s.machine_id for s in self.stages))

    @property
    def total_bytes(self) -> int:
        """Everything the topology puts on mesh devices, compute buffers included."""
        return sum(s.total_bytes for s in self.stages)

    def to_dict(self) -> dict:
        """A JSON-safe dict (it crosses Dask RPC); :meth:`from_dict` reverses it."""
        return {
            "model": self.model,
            "n_layer": self.n_layer,
            "n_ctx": self.n_ctx,
            "planning_ms": self.planning_ms,
            "stages": [asdict(s) for s in self.stages],
        }

    @classmethod
    def from_dict(cls, d: dict) -> Topology:
        """Rebuild a topology from :meth:`to_dict`'s output (unknown keys are ignored)."""
        stages = tuple(Stage.from_dict(s) for s in d["stages"])
        return cls(
            model=d["model"],
            n_layer=int(d["n_layer"]),
            n_ctx=int(d["n_ctx"]),
            stages=stages,
            planning_ms=float(d.get("planning_ms", 0.0)),
        )

    def __str__(self) -> str:
        header = (
            f"model {os.path.basename(self.model)}: {self.n_layer} layers + output"
            f"{' (on the client)' if self.output_on_client else ''}, n_ctx={self.n_ctx}, "
            f"{len(self.stages)} device(s) on {len(self.machines)} machine(s), {gib(self.total_bytes)} in all"
        )
        head = ("machine", "endpoint", "device", "layers", "weights", "kv cache", "compute", "total")
        rows = [
            (
                s.machine_id,
                s.endpoint,
                f"{s.device_name}#{s.device_index}",
                s.describe_layers(),
                gib(s.weight_bytes),
                gib(s.kv_bytes),
                gib(s.compute_bytes),
                gib(s.total_bytes),
            )
            for s in self.stages
        ]
        widths = [max(len(r[i]) for r in (head, *rows)) for i in range(len(head))]
        lines = [header]
        for r in (head, *rows):
            # Text columns left-aligned, byte columns right-aligned.
            cells = [c.ljust(w) if i < 4 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))]
            lines.append("  ".join(cells).rstrip())
        return "\n".join(lines)


def output_on_client(devices: Sequence[DeviceSlot]) -> bool:
    """Where the output layer of a model that ties its embeddings runs when the user leaves it to placement
    (``output_layer="auto"``): on the client when every device it may go to is a CPU (the client maps that matrix for
    the input embeddings anyway, and the mesh then sends back n_embd floats a token instead of n_vocab logits), on
    the mesh when one is a GPU (it does the projection faster than the client's CPU)."""
    return all(d.kind == "cpu" for d in devices)


def plan(
    devices: Sequence[DeviceSlot],
    estimate: ModelEstimate,
    *,
    headroom: float = 0.10,
    strategy: str = "spread",
    max_devices: int | None = None,
    prefer: frozenset[str] | set[str] = frozenset(),
) -> Topology:
    """Decide which devices hold which slots of ``estimate``'s model.

    ``prefer`` names machines chosen first when not every device is used (``pack``, ``max_devices``): those with
    the model's weights warm in their tensor cache, so a load re-sends less.

    ``headroom`` is the fraction of each device's free memory left alone. A device's usable capacity is
    ``free_bytes * (1 - headroom) - estimate.compute_bytes``; devices with none are skipped. Devices keep the order
    ``(machine_id, device_index)`` so a mesh's topology is stable across calls; only when no contiguous split exists
    in that order is a device large enough for the output layer moved to the end.

    ``strategy="spread"`` gives every usable device a share of the slots proportional to its usable capacity;
    when rounding to slot boundaries overloads a device, a greedy fill (balanced as far as contiguity allows) takes
    over. ``"pack"`` uses the fewest devices (largest first) that hold the model, split the same way. ``max_devices``
    caps the number of stages: the largest devices are kept.

    Raises ``ValueError`` on bad arguments, :class:`NoMachines` when ``devices`` is empty and :class:`ModelTooLarge`
    when the model cannot be placed; that check runs before anything is uploaded anywhere.
    """
    t0 = time.perf_counter()
    _validate(devices, estimate, headroom, strategy, max_devices)
    if not devices:
        raise NoMachines(_NO_MACHINES)

    ordered = sorted(devices, key=lambda d: (d.machine_id, d.device_index))
    budget = [d.free_bytes * (1.0 - headroom) for d in ordered]  # what may be used, compute buffer included
    capacity = [b - estimate.compute_bytes for b in budget]
    usable = [i for i, c in enumerate(capacity) if c > 0]
    skipped = len(ordered) - len(usable)
    if skipped:
        log.debug("skipping %d device(s) without usable memory for %s", skipped, estimate.path)

    slots = estimate.slot_bytes()
    # The device holding the output slot may also need room for the logits (see gguf.ComputeBuffers).
    slots = (*slots[:-1], slots[-1] + estimate.output_compute_bytes)
    prefix = [0]
    for b in slots:
        prefix.append(prefix[-1] + b)
    total = prefix[-1]

    # The largest devices first: the ones pack uses and the ones max_devices keeps.
    # Of devices alike, those reached directly before those behind the relay hub (one hop less per round trip).
    by_size = sorted(usable, key=lambda i: (ordered[i].machine_id not in prefer, -capacity[i], ordered[i].via_hub,
                                            ordered[i].machine_id, ordered[i].device_index))
    limit = len(by_size) if max_devices is None else min(max_devices, len(by_size))
    _check_fits(
        ordered, budget, capacity, by_size[:limit], slots, estimate, max_devices, _n_machines(ordered), headroom
    )

    if strategy == "pack":
        # Fewest devices whose total holds the model, then more until a contiguous split exists.
        k, acc = 0, 0.0
        while k < limit and acc < total:
            acc += capacity[by_size[k]]
            k += 1
        candidates = range(k, limit + 1)
    else:
        candidates = range(limit, limit + 1)

    placed: tuple[list[int], list[int]] | None = None
    chosen: list[int] = []
    for k in candidates:
        # back to mesh order (all the usable devices: that is ``usable`` itself, no sort of 10,000 indices)
        chosen = list(usable) if k == len(usable) else sorted(by_size[:k])
        placed = place_layers(chosen, capacity, prefix)
        if placed is not None:
            break
    if placed is None:
        raise ModelTooLarge(
            f"model {_name(estimate)} needs {gib(total)} plus compute buffers and the mesh has enough memory in "
            f"total, but it cannot be cut into contiguous layer ranges that each fit one device "
            f"(the output layer alone is {gib(slots[-1])}); {_WAY_OUT}",
            needed=total + estimate.compute_bytes * len(chosen),
            available=int(sum(budget[i] for i in chosen)),
        )
    order, counts = placed
    if order != chosen:
        log.debug("%s: no contiguous split in mesh order; %s holds the output layer", estimate.path, ordered[order[-1]])

    stages = _stages(ordered, order, counts, estimate)
    topology = Topology(
        model=estimate.path,
        n_layer=estimate.n_layer,
        n_ctx=estimate.n_ctx,
        stages=stages,
        planning_ms=(time.perf_counter() - t0) * 1000.0,
    )
    log.debug("planned %s with %s in %.2f ms: %s", estimate.path, strategy, topology.planning_ms, topology.tensor_split)
    return topology


def _n_machines(devices: Sequence[DeviceSlot]) -> int:
    return len({d.machine_id for d in devices})


def _name(estimate: ModelEstimate) -> str:
    return os.path.basename(estimate.path) or estimate.path


def _validate(
    devices: Sequence[DeviceSlot],
    estimate: ModelEstimate,
    headroom: float,
    strategy: str,
    max_devices: int | None,
) -> None:
    if isinstance(headroom, bool) or not isinstance(headroom, (int, float)) or not 0.0 <= headroom < 1.0:
        raise ValueError(f"headroom must be a number in [0, 1), got {headroom!r}")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    bad_int = isinstance(max_devices, bool) or not isinstance(max_devices, int)
    if max_devices is not None and (bad_int or max_devices < 1):
        raise ValueError(f"max_devices must be None or an integer >= 1, got {max_devices!r}")
    if not isinstance(estimate, ModelEstimate):
        raise ValueError(f"estimate must be a ModelEstimate, got {type(estimate).__name__}")
    if estimate.n_layer < 1:
        raise ValueError(f"estimate for {estimate.path} has n_layer={estimate.n_layer}, expected >= 1")
    if len(estimate.layer_weight_bytes) != estimate.n_layer or len(estimate.layer_kv_bytes) != estimate.n_layer:
        raise ValueError(
            f"estimate for {estimate.path} has {len(estimate.layer_weight_bytes)} weight and "
            f"{len(estimate.layer_kv_bytes)} KV entries for n_layer={estimate.n_layer}"
        )
    if (estimate.compute_bytes < 0 or estimate.output_compute_bytes < 0 or estimate.output_bytes < 0
            or any(b < 0 for b in estimate.slot_bytes())):
        raise ValueError(f"estimate for {estimate.path} has negative byte counts")
    seen: set[tuple[str, int]] = set()
    for d in devices:
        if not isinstance(d, DeviceSlot):
            raise ValueError(f"devices must be DeviceSlot objects, got {type(d).__name__}")
        if d.free_bytes < 0 or d.total_bytes < 0:
            raise ValueError(f"device {d.machine_id}/{d.name} has negative memory (free {d.free_bytes})")
        if d.device_index < 0:
            raise ValueError(f"device {d.machine_id}/{d.name} has device_index {d.device_index} < 0")
        if d.kind not in DEVICE_KINDS:
            raise ValueError(f"device {d.machine_id}/{d.name} has kind {d.kind!r}, expected one of {DEVICE_KINDS}")
        key = (d.endpoint, d.device_index)
        if key in seen:
            raise ValueError(f"device {d.device_index} of rpc-server {d.endpoint} is listed twice")
        seen.add(key)


def _check_fits(
    ordered: list[DeviceSlot],
    budget: list[float],
    capacity: list[float],
    pool: list[int],
    slots: tuple[int, ...],
    estimate: ModelEstimate,
    max_devices: int | None,
    machines: int,
    headroom: float,
) -> None:
    """Raise ModelTooLarge when the devices in ``pool`` cannot hold the model, before anything else happens."""
    total = sum(slots)
    # With no usable device (each one's compute buffer alone is too big), report against every device.
    counted = pool or list(range(len(ordered)))
    n = len(counted)
    needed = total + estimate.compute_bytes * n
    # Both sides count the compute buffers, so needed > available exactly when the usable capacity is short.
    available = int(sum(budget[i] for i in counted))
    if not pool or total > sum(capacity[i] for i in pool):
        weights = sum(estimate.layer_weight_bytes) + estimate.output_bytes
        kv = sum(estimate.layer_kv_bytes)
        where = f"the mesh's {machines} machines have" if machines != 1 else "the mesh's only machine has"
        if max_devices is not None and len(pool) == max_devices:
            where = where.replace(" ha", f" (max_devices={max_devices}) ha")
        raise ModelTooLarge(
            f"model {_name(estimate)} needs {gib(needed)} (weights {gib(weights)} + KV cache for "
            f"n_ctx={estimate.n_ctx} {gib(kv)} + compute buffers {n} x {gib(estimate.compute_bytes)}) but {where} "
            f"{gib(available)} usable after {headroom:.0%} headroom; {_WAY_OUT}",
            needed=needed,
            available=max(0, available),
        )
    biggest = max(pool, key=lambda i: capacity[i])
    largest_slot = max(range(len(slots)), key=lambda s: slots[s])
    if slots[largest_slot] > capacity[biggest]:
        what = "the output layer" if largest_slot == estimate.n_layer else f"layer {largest_slot}"
        dev = ordered[biggest]
        raise ModelTooLarge(
            f"model {_name(estimate)}: {what} alone needs {gib(slots[largest_slot] + estimate.compute_bytes)} "
            f"(with its compute buffer) but the largest device ({dev.machine_id} {dev.name}) has "
            f"{gib(budget[biggest])} usable; {_WAY_OUT}",
            needed=slots[largest_slot] + estimate.compute_bytes,
            available=max(0, int(budget[biggest])),
        )


def _stages(
    ordered: list[DeviceSlot], chosen: list[int], counts: list[int], estimate: ModelEstimate
) -> tuple[Stage, ...]:
    n_layer = estimate.n_layer
    # A device without slots is left out: llama.cpp would still allocate a compute buffer on a device it is given.
    used = [(i, n) for i, n in zip(chosen, counts, strict=True) if n]
    # A device left with only the (empty) output slot of an output layer on the client would hold nothing and compute
    # nothing: the slot goes to the device before it.
    if estimate.output_on_client and len(used) > 1 and used[-1][1] == 1:
        (i, n), _ = used[-2], used.pop()
        used[-1] = (i, n + 1)
    stages = []
    start = 0
    for i, n in used:
        end = start + n
        layer_end = min(end, n_layer)
        has_output = end == n_layer + 1
        weights = sum(estimate.layer_weight_bytes[start:layer_end]) + (estimate.output_bytes if has_output else 0)
        dev = ordered[i]
        stages.append(
            Stage(
                machine_id=dev.machine_id,
                endpoint=dev.endpoint,
                device_index=dev.device_index,
                device_name=dev.name,
                first_slot=start,
                n_slots=n,
                weight_bytes=weights,
                kv_bytes=sum(estimate.layer_kv_bytes[start:layer_end]),
                # The stage's own: a first stage receives one hidden state, a later one two, a stage without the
                # last layers no logits (placement's capacity check used the bound of any stage).
                compute_bytes=estimate.stage_compute_bytes(start, end, len(used)),
                has_output=has_output,
                output_on_client=estimate.output_on_client,
            )
        )
        start = end
    return tuple(stages)
