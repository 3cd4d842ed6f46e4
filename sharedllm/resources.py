# SPDX-License-Identifier: AGPL-3.0-or-later
"""What a machine has: CPUs, RAM and NVIDIA GPUs. No Dask here; the result travels in heartbeats as a plain dict.

GPUs are read through NVML (``pynvml`` from nvidia-ml-py). A machine without NVIDIA hardware, driver or library simply
reports no GPU; NVML is initialised once per process and never shut down by a probe.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import socket
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sharedllm.errors import gib

log = logging.getLogger(__name__)

MACHINE_ID_ENV = "SHAREDLLM_MACHINE_ID"  # sharedllm.settings: "machine-id"
_MACHINE_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
_MACHINE_ID_RULE = "1 to 64 characters of A-Z, a-z, 0-9, '.', '_' or '-'"
_MACHINE_ID_FILES = ("/etc/machine-id", "/var/lib/dbus/machine-id")

# NVML return codes (stable across NVML versions) that mean "no NVIDIA GPU here" rather than a fault.
_NVML_ERROR_DRIVER_NOT_LOADED = 9
_NVML_ERROR_LIBRARY_NOT_FOUND = 12
_NO_GPU_MESSAGES = ("shared library not found", "driver not loaded")


@dataclass(frozen=True)
class GPUInfo:
    """One GPU as llama.cpp's CUDA backend will number it: ``index`` is the position among the visible devices."""

    index: int
    name: str
    uuid: str
    memory_total: int  # bytes
    memory_free: int  # bytes
    memory_used: int  # bytes
    utilization: int | None  # percent; None when NVML cannot say
    temperature: int | None = None  # degrees Celsius; None when NVML cannot say

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict; :meth:`from_dict` reads it back."""
        return {
            "index": self.index,
            "name": self.name,
            "uuid": self.uuid,
            "memory_total": self.memory_total,
            "memory_free": self.memory_free,
            "memory_used": self.memory_used,
            "utilization": self.utilization,
            "temperature": self.temperature,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GPUInfo:
        """Build a GPUInfo from :meth:`to_dict` output. Unknown keys are ignored; a missing or mistyped key raises
        ValueError."""
        try:
            return cls(
                index=int(d["index"]),
                name=str(d["name"]),
                uuid=str(d["uuid"]),
                memory_total=int(d["memory_total"]),
                memory_free=int(d["memory_free"]),
                memory_used=int(d["memory_used"]),
                utilization=_opt_int(d.get("utilization")),
                temperature=_opt_int(d.get("temperature")),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"invalid GPU record {d!r}: {e!r}") from e


@dataclass(frozen=True)
class MachineResources:
    """A snapshot of one machine's resources. ``nvml_error`` says why GPUs could not be read on a machine that has
    the NVIDIA library; it is None both when NVML works and when the machine has no NVIDIA GPU at all."""

    machine_id: str
    hostname: str
    cpu_count: int  # logical CPUs usable by this process
    ram_total: int  # bytes
    ram_available: int  # bytes
    gpus: tuple[GPUInfo, ...] = field(default_factory=tuple)
    nvml_error: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.gpus, tuple):
            object.__setattr__(self, "gpus", tuple(self.gpus))

    @property
    def gpu_memory_free(self) -> int:
        """Free memory over all GPUs, in bytes."""
        return sum(g.memory_free for g in self.gpus)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (it travels in Dask heartbeats); :meth:`from_dict` reads it back."""
        return {
            "machine_id": self.machine_id,
            "hostname": self.hostname,
            "cpu_count": self.cpu_count,
            "ram_total": self.ram_total,
            "ram_available": self.ram_available,
            "gpus": [g.to_dict() for g in self.gpus],
            "nvml_error": self.nvml_error,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MachineResources:
        """Build a MachineResources from :meth:`to_dict` output. Unknown keys are ignored; a missing or mistyped key
        raises ValueError."""
        try:
            nvml_error = d.get("nvml_error")
            return cls(
                machine_id=str(d["machine_id"]),
                hostname=str(d["hostname"]),
                cpu_count=int(d["cpu_count"]),
                ram_total=int(d["ram_total"]),
                ram_available=int(d["ram_available"]),
                gpus=tuple(GPUInfo.from_dict(g) for g in d.get("gpus") or ()),
                nvml_error=None if nvml_error is None else str(nvml_error),
            )
        except (KeyError, TypeError) as e:
            raise ValueError(f"invalid machine record: {e!r}") from e

    def describe(self) -> str:
        """One line for humans, e.g. ``host-abc: 2 CPUs, 23.10 GiB/24.00 GiB RAM free, no GPU``."""
        cpus = f"{self.cpu_count} CPU" + ("" if self.cpu_count == 1 else "s")
        ram = f"{gib(self.ram_available)}/{gib(self.ram_total)} RAM free"
        if self.gpus:
            groups: dict[str, int] = {}
            for g in self.gpus:
                key = f"{g.name} ({gib(g.memory_free)}/{gib(g.memory_total)} free)"
                groups[key] = groups.get(key, 0) + 1
            n = len(self.gpus)
            gpus = f"{n} GPU{'' if n == 1 else 's'}: " + ", ".join(
                key if count == 1 else f"{key} x{count}" for key, count in groups.items()
            )
        else:
            gpus = "no GPU"
        line = f"{self.machine_id}: {cpus}, {ram}, {gpus}"
        if self.nvml_error:
            line += f" (NVML: {self.nvml_error})"
        return line

    def __str__(self) -> str:
        return self.describe()


def _opt_int(v: Any) -> int | None:
    return None if v is None else int(v)


# --- machine identity ---------------------------------------------------------------------------------------------


def _validate_machine_id(value: str, source: str) -> str:
    if not isinstance(value, str) or not _MACHINE_ID_RE.fullmatch(value):
        raise ValueError(f"invalid machine id {value!r} (from {source}): it must be {_MACHINE_ID_RULE}")
    return value


def _read_machine_id_file() -> str | None:
    for path in _MACHINE_ID_FILES:
        try:
            with open(path, encoding="ascii") as f:
                text = f.read().strip().lower()
        except (OSError, UnicodeDecodeError):
            continue
        if re.fullmatch(r"[0-9a-f]{12,}", text):
            return text
    return None


def _sanitize_hostname(host: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", host).strip("-.") or "host"


def _default_machine_id() -> str:
    host = _sanitize_hostname(socket.gethostname())
    suffix = _read_machine_id_file()
    if suffix is None:
        node = uuid.getnode()
        # uuid.getnode() sets the multicast bit when it had to invent a random address: that would not be stable
        # across restarts, so the hostname alone feeds the hash then.
        mac = "" if (node >> 40) & 1 else f"{node:012x}"
        suffix = hashlib.sha256(f"{socket.gethostname()}|{mac}".encode()).hexdigest()
    suffix = suffix[:12]
    return f"{host[: 64 - len(suffix) - 1]}-{suffix}"


def machine_id(override: str | None = None) -> str:
    """The stable identity of this machine in the mesh.

    ``override`` wins, then the ``SHAREDLLM_MACHINE_ID`` environment variable (an empty value counts as unset), then
    ``<hostname>-<first 12 hex digits of /etc/machine-id>``; without a machine-id file the suffix is a hash of the
    hostname and MAC address. The hostname is part of the default because containers cloned from one image may share
    a machine-id. Raises ValueError for an override or environment value that is not 1-64 of ``[A-Za-z0-9._-]``.
    """
    if override is not None:
        return _validate_machine_id(override, "override")
    from sharedllm import settings

    env = settings.get("machine-id")
    if env:
        return _validate_machine_id(env, MACHINE_ID_ENV)
    return _default_machine_id()


# --- GPUs ---------------------------------------------------------------------------------------------------------

_nvml_lock = threading.Lock()
# id(module) -> (module, init error or None). The module is kept so that its id cannot be reused by another object.
_nvml_init: dict[int, tuple[Any, BaseException | None]] = {}


def _nvml_initialised(nvml: Any) -> BaseException | None:
    """Call ``nvml.nvmlInit()`` once per process (per module object); return the exception it raised, if any."""
    with _nvml_lock:
        entry = _nvml_init.get(id(nvml))
        if entry is not None and entry[0] is nvml:
            return entry[1]
        try:
            nvml.nvmlInit()
            err: BaseException | None = None
        except Exception as e:
            err = e
        _nvml_init[id(nvml)] = (nvml, err)
        return err


def _means_no_gpu(nvml: Any, err: BaseException) -> bool:
    if isinstance(err, OSError):  # the shared library could not be loaded at all
        return True
    value = getattr(err, "value", None)
    codes = {
        getattr(nvml, "NVML_ERROR_LIBRARY_NOT_FOUND", _NVML_ERROR_LIBRARY_NOT_FOUND),
        getattr(nvml, "NVML_ERROR_DRIVER_NOT_LOADED", _NVML_ERROR_DRIVER_NOT_LOADED),
    }
    if isinstance(value, int) and value in codes:
        return True
    text = str(err).lower()
    return any(m in text for m in _NO_GPU_MESSAGES)


def _short(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _text(v: Any) -> str:
    return v.decode("utf-8", "replace") if isinstance(v, (bytes, bytearray)) else str(v)


def _visible_order(uuids: Sequence[str]) -> list[int] | None:
    """NVML indices visible to CUDA, in CUDA's order, per ``CUDA_VISIBLE_DEVICES``; None when it does not filter.

    Integer indices and ``GPU-`` UUIDs (or unique UUID prefixes) are understood. As in CUDA, parsing stops at the
    first entry that names no device. Any other form (MIG UUIDs...) cannot be mapped: a warning, and no filtering.
    Integer indices are NVML (PCI bus) order, which matches CUDA when ``CUDA_DEVICE_ORDER=PCI_BUS_ID``.
    """
    raw = os.environ.get("CUDA_VISIBLE_DEVICES")
    if raw is None:
        return None
    order: list[int] = []
    for entry in (e.strip() for e in raw.split(",")):
        if not entry:
            break
        if re.fullmatch(r"-?[0-9]+", entry):
            i = int(entry)
            if not 0 <= i < len(uuids):
                break
        elif entry.upper().startswith("GPU-"):
            matches = [i for i, u in enumerate(uuids) if u and u.lower().startswith(entry.lower())]
            if len(matches) != 1:
                break
            i = matches[0]
        else:
            log.warning("CUDA_VISIBLE_DEVICES=%r: entry %r is neither an index nor a GPU UUID; reporting every GPU",
                        raw, entry)
            return None
        if i not in order:
            order.append(i)
    return order


def probe_gpus(nvml: Any = None) -> tuple[tuple[GPUInfo, ...], str | None]:
    """Read every NVIDIA GPU visible to this process. Never raises.

    ``nvml`` is a module-like object with the pynvml API (default: ``pynvml``, imported here). Returns
    ``(gpus, error)``: ``((), None)`` when the machine has no NVIDIA GPU, driver or library; ``((), reason)`` when
    NVML is there but fails. GPUs follow ``CUDA_VISIBLE_DEVICES`` and ``index`` is the position among the visible
    ones, so GPU ``i`` is llama.cpp's ``CUDA<i>``. Utilisation and temperature are None where NVML cannot read them;
    a GPU whose name, UUID or memory cannot be read is left out and named in the error.
    """
    if nvml is None:
        try:
            import pynvml as nvml
        except ImportError:
            return (), None
    err = _nvml_initialised(nvml)
    if err is not None:
        if _means_no_gpu(nvml, err):
            return (), None
        return (), f"NVML init failed: {_short(err)}"
    try:
        count = int(nvml.nvmlDeviceGetCount())
    except Exception as e:
        return (), f"NVML device count failed: {_short(e)}"
    handles: list[Any] = []
    uuids: list[str] = []
    broken: dict[int, str] = {}  # NVML index -> why its handle or UUID could not be read
    for i in range(count):
        try:
            h = nvml.nvmlDeviceGetHandleByIndex(i)
            u = _text(nvml.nvmlDeviceGetUUID(h))
        except Exception as e:
            h, u = None, ""
            broken[i] = _short(e)
        handles.append(h)
        uuids.append(u)

    order = _visible_order(uuids)
    if order is None:
        order = list(range(count))
    temp_sensor = getattr(nvml, "NVML_TEMPERATURE_GPU", 0)
    gpus: list[GPUInfo] = []
    errors: list[str] = []
    for index, nvml_index in enumerate(order):
        h = handles[nvml_index]
        if nvml_index in broken:
            errors.append(f"GPU {index} (NVML index {nvml_index}): {broken[nvml_index]}")
            continue
        try:
            name = _text(nvml.nvmlDeviceGetName(h))
            mem = nvml.nvmlDeviceGetMemoryInfo(h)
            total, free, used = int(mem.total), int(mem.free), int(mem.used)
        except Exception as e:
            errors.append(f"GPU {index} ({uuids[nvml_index]}): {_short(e)}")
            continue
        try:
            utilization: int | None = int(nvml.nvmlDeviceGetUtilizationRates(h).gpu)
        except Exception as e:
            log.debug("GPU %d: no utilisation reading: %s", index, e)
            utilization = None
        try:
            temperature: int | None = int(nvml.nvmlDeviceGetTemperature(h, temp_sensor))
        except Exception as e:
            log.debug("GPU %d: no temperature reading: %s", index, e)
            temperature = None
        gpus.append(GPUInfo(index, name, uuids[nvml_index], total, free, used, utilization, temperature))
    if errors:
        log.warning("could not read %d GPU(s): %s", len(errors), "; ".join(errors))
    return tuple(gpus), ("; ".join(errors) if errors else None)


# --- the whole machine --------------------------------------------------------------------------------------------


def _cpu_count() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def probe(machine_id_override: str | None = None, nvml: Any = None) -> MachineResources:
    """Take a snapshot of this machine: identity, usable CPUs, RAM and GPUs (see :func:`probe_gpus`)."""
    import psutil

    vm = psutil.virtual_memory()
    gpus, nvml_error = probe_gpus(nvml)
    return MachineResources(
        machine_id=machine_id(machine_id_override),
        hostname=socket.gethostname(),
        cpu_count=_cpu_count(),
        ram_total=int(vm.total),
        ram_available=int(vm.available),
        gpus=gpus,
        nvml_error=nvml_error,
    )
