# SPDX-License-Identifier: AGPL-3.0-or-later
"""Tests of sharedllm.resources with a fake NVML module, plus one real probe of this machine."""

from __future__ import annotations

import json
import threading
from types import SimpleNamespace

import pytest

from sharedllm import resources
from sharedllm.resources import GPUInfo, MachineResources, machine_id, probe, probe_gpus

GiB = 1 << 30


class FakeNVML:
    """Mimics the parts of pynvml that resources.py uses. ``gpus`` are dicts; a value that is an exception is raised."""

    NVML_TEMPERATURE_GPU = 0
    NVML_ERROR_NOT_SUPPORTED = 3
    NVML_ERROR_DRIVER_NOT_LOADED = 9
    NVML_ERROR_LIBRARY_NOT_FOUND = 12
    NVML_ERROR_NO_PERMISSION = 4

    class NVMLError(Exception):
        _strings = {3: "Not Supported", 4: "Insufficient Permissions", 9: "Driver Not Loaded",
                    12: "NVML Shared Library Not Found", 15: "GPU is lost"}

        def __init__(self, value: int):
            super().__init__(value)
            self.value = value

        def __str__(self) -> str:
            return self._strings.get(self.value, f"NVML Error with code {self.value}")

    def __init__(self, gpus=(), init_error: int | None = None, name_as_bytes: bool = False):
        self.gpus = [dict(g) for g in gpus]
        self.init_error = init_error
        self.name_as_bytes = name_as_bytes
        self.init_calls = 0
        self.shutdown_calls = 0
        self.util_reads: list[int] = []

    def _get(self, handle, key):
        v = self.gpus[handle.i][key]
        if isinstance(v, BaseException):
            raise v
        return v

    def nvmlInit(self):
        self.init_calls += 1
        if self.init_error is not None:
            raise self.NVMLError(self.init_error)

    def nvmlShutdown(self):
        self.shutdown_calls += 1

    def nvmlDeviceGetCount(self):
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i):
        if not 0 <= i < len(self.gpus):
            raise self.NVMLError(2)
        return SimpleNamespace(i=i)

    def nvmlDeviceGetName(self, h):
        name = self._get(h, "name")
        return name.encode() if self.name_as_bytes else name

    def nvmlDeviceGetUUID(self, h):
        return self._get(h, "uuid")

    def nvmlDeviceGetMemoryInfo(self, h):
        total, used = self._get(h, "total"), self._get(h, "used")
        return SimpleNamespace(total=total, free=total - used, used=used)

    def nvmlDeviceGetUtilizationRates(self, h):
        self.util_reads.append(h.i)
        return SimpleNamespace(gpu=self._get(h, "util"), memory=0)

    def nvmlDeviceGetTemperature(self, h, sensor):
        assert sensor == self.NVML_TEMPERATURE_GPU
        return self._get(h, "temp")


def gpu(i: int, name: str = "NVIDIA H100 80GB HBM3", total: int = 80 * GiB, used: int = 2 * GiB, util: object = 0,
        temp: object = 40) -> dict:
    return {"name": name, "uuid": f"GPU-{i:08x}-aaaa-bbbb-cccc-{i:012x}", "total": total, "used": used,
            "util": util, "temp": temp}


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("SHAREDLLM_MACHINE_ID", raising=False)


# --- GPUs ---------------------------------------------------------------------------------------------------------


def test_zero_gpus():
    nvml = FakeNVML([])
    assert probe_gpus(nvml) == ((), None)


def test_one_gpu():
    nvml = FakeNVML([gpu(0, name="NVIDIA L4", total=24 * GiB, used=1 * GiB, util=37, temp=55)])
    gpus, err = probe_gpus(nvml)
    assert err is None
    assert gpus == (GPUInfo(0, "NVIDIA L4", "GPU-00000000-aaaa-bbbb-cccc-000000000000", 24 * GiB, 23 * GiB, 1 * GiB,
                            37, 55),)


def test_four_gpus_every_one_read_in_order():
    nvml = FakeNVML([gpu(i, name=f"GPU model {i}", used=(i + 1) * GiB, util=10 * i, temp=30 + i) for i in range(4)],
                    name_as_bytes=True)
    gpus, err = probe_gpus(nvml)
    assert err is None
    assert [g.index for g in gpus] == [0, 1, 2, 3]
    assert [g.name for g in gpus] == [f"GPU model {i}" for i in range(4)]  # bytes names decoded
    assert [g.memory_used for g in gpus] == [GiB, 2 * GiB, 3 * GiB, 4 * GiB]
    assert [g.memory_free for g in gpus] == [79 * GiB, 78 * GiB, 77 * GiB, 76 * GiB]
    assert all(g.memory_total == 80 * GiB for g in gpus)
    assert [g.utilization for g in gpus] == [0, 10, 20, 30]
    assert [g.temperature for g in gpus] == [30, 31, 32, 33]
    assert sorted(nvml.util_reads) == [0, 1, 2, 3]
    assert len({g.uuid for g in gpus}) == 4


def test_unsupported_readings_become_none():
    nvml = FakeNVML([gpu(0, util=5), gpu(1, util=FakeNVML.NVMLError(3), temp=FakeNVML.NVMLError(3)), gpu(2, util=7)])
    gpus, err = probe_gpus(nvml)
    assert err is None
    assert [g.utilization for g in gpus] == [5, None, 7]
    assert [g.temperature for g in gpus] == [40, None, 40]
    assert gpus[1].memory_total == 80 * GiB


def test_gpu_whose_memory_cannot_be_read_is_left_out_and_named():
    nvml = FakeNVML([gpu(0), gpu(1, total=FakeNVML.NVMLError(15)), gpu(2)])
    gpus, err = probe_gpus(nvml)
    assert [g.index for g in gpus] == [0, 2]  # indices stay the CUDA positions
    assert err is not None and "GPU 1" in err and "GPU is lost" in err


@pytest.mark.parametrize("code", [FakeNVML.NVML_ERROR_LIBRARY_NOT_FOUND, FakeNVML.NVML_ERROR_DRIVER_NOT_LOADED])
def test_no_nvidia_library_or_driver_means_no_gpu(code):
    nvml = FakeNVML([gpu(0)], init_error=code)
    assert probe_gpus(nvml) == ((), None)


def test_nvml_fault_is_reported_not_raised():
    nvml = FakeNVML([gpu(0)], init_error=FakeNVML.NVML_ERROR_NO_PERMISSION)
    gpus, err = probe_gpus(nvml)
    assert gpus == ()
    assert err is not None and "Insufficient Permissions" in err


def test_device_count_failure_is_reported_not_raised():
    nvml = FakeNVML([gpu(0)])

    def broken_count():
        raise FakeNVML.NVMLError(999)

    nvml.nvmlDeviceGetCount = broken_count
    gpus, err = probe_gpus(nvml)
    assert gpus == () and err is not None and "999" in err


def test_nvml_init_once_no_shutdown():
    nvml = FakeNVML([gpu(0), gpu(1)])
    threads = [threading.Thread(target=probe_gpus, args=(nvml,)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    probe_gpus(nvml)
    assert nvml.init_calls == 1
    assert nvml.shutdown_calls == 0


def test_failed_init_is_not_retried_every_probe():
    nvml = FakeNVML([], init_error=FakeNVML.NVML_ERROR_LIBRARY_NOT_FOUND)
    probe_gpus(nvml)
    probe_gpus(nvml)
    assert nvml.init_calls == 1


@pytest.mark.parametrize(
    ("visible", "expected_uuid_order"),
    [
        ("2,0", [2, 0]),
        (" 3 , 1 ", [3, 1]),
        ("", []),
        ("1,7,2", [1]),  # like CUDA, stop at the first entry that names no device
        ("-1", []),
        ("0,0,1", [0, 1]),
    ],
)
def test_cuda_visible_devices_indices(monkeypatch, visible, expected_uuid_order):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    nvml = FakeNVML([gpu(i) for i in range(4)])
    gpus, err = probe_gpus(nvml)
    assert err is None
    assert [g.uuid for g in gpus] == [gpu(i)["uuid"] for i in expected_uuid_order]
    assert [g.index for g in gpus] == list(range(len(expected_uuid_order)))


def test_cuda_visible_devices_uuids(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", f"{gpu(3)['uuid']},{gpu(1)['uuid'][:12]}")
    nvml = FakeNVML([gpu(i, util=i) for i in range(4)])
    gpus, _ = probe_gpus(nvml)
    assert [(g.index, g.uuid, g.utilization) for g in gpus] == [(0, gpu(3)["uuid"], 3), (1, gpu(1)["uuid"], 1)]


def test_cuda_visible_devices_unknown_form_reports_all(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "MIG-1234")
    gpus, _ = probe_gpus(FakeNVML([gpu(i) for i in range(2)]))
    assert [g.index for g in gpus] == [0, 1]


def test_default_nvml_import_does_not_raise():
    gpus, err = probe_gpus()
    assert isinstance(gpus, tuple)
    assert err is None or isinstance(err, str)


# --- machine identity ---------------------------------------------------------------------------------------------


def test_machine_id_override_and_env(monkeypatch):
    assert machine_id("node-7.lab_A") == "node-7.lab_A"
    monkeypatch.setenv("SHAREDLLM_MACHINE_ID", "from-env")
    assert machine_id() == "from-env"
    assert machine_id("explicit") == "explicit"  # the override beats the environment


def test_machine_id_default_is_stable_and_valid():
    a, b = machine_id(), machine_id()
    assert a == b
    assert resources._MACHINE_ID_RE.fullmatch(a)


def test_machine_id_without_machine_id_file(monkeypatch):
    monkeypatch.setattr(resources, "_MACHINE_ID_FILES", ("/nonexistent/machine-id",))
    monkeypatch.setattr(resources.socket, "gethostname", lambda: "box")
    a = machine_id()
    assert a == machine_id()
    assert a.startswith("box-") and len(a) == len("box-") + 12


def test_machine_id_uses_machine_id_file(monkeypatch, tmp_path):
    f = tmp_path / "machine-id"
    f.write_text("1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d\n")
    monkeypatch.setattr(resources, "_MACHINE_ID_FILES", (str(f),))
    monkeypatch.setattr(resources.socket, "gethostname", lambda: "myhost")
    assert machine_id() == "myhost-1a2b3c4d5e6f"


@pytest.mark.parametrize("bad", ["", "a" * 65, "has space", "slash/y", "émoji", "semi;colon"])
def test_machine_id_validation(monkeypatch, bad):
    with pytest.raises(ValueError, match="64 characters") as exc:
        machine_id(bad)
    assert repr(bad) in str(exc.value)
    if bad:
        monkeypatch.setenv("SHAREDLLM_MACHINE_ID", bad)
        with pytest.raises(ValueError, match="SHAREDLLM_MACHINE_ID"):
            machine_id()


# --- serialisation and summary ------------------------------------------------------------------------------------


def _sample() -> MachineResources:
    gpus, _ = probe_gpus(FakeNVML([gpu(0, util=3), gpu(1, util=FakeNVML.NVMLError(3), temp=FakeNVML.NVMLError(3))]))
    return MachineResources("host-abc", "host", 16, 128 * GiB, 100 * GiB, gpus, None)


def test_json_round_trip():
    m = _sample()
    back = MachineResources.from_dict(json.loads(json.dumps(m.to_dict())))
    assert back == m
    assert isinstance(back.gpus, tuple) and back.gpus[1].utilization is None
    err = MachineResources("x", "x", 1, GiB, GiB, (), "NVML init failed: Unknown Error")
    assert MachineResources.from_dict(json.loads(json.dumps(err.to_dict()))) == err


def test_from_dict_rejects_bad_records():
    d = _sample().to_dict()
    del d["ram_total"]
    with pytest.raises(ValueError):
        MachineResources.from_dict(d)
    d = _sample().to_dict()
    d["gpus"][0]["memory_free"] = "lots"
    with pytest.raises(ValueError):
        MachineResources.from_dict(d)


def test_describe():
    m = MachineResources("host-abc", "host", 2, 24 * GiB, 23 * GiB, ())
    assert str(m) == "host-abc: 2 CPUs, 23.00 GiB/24.00 GiB RAM free, no GPU"
    four = MachineResources("h", "h", 8, 64 * GiB, 60 * GiB,
                            probe_gpus(FakeNVML([gpu(i, name="NVIDIA H100") for i in range(4)]))[0])
    assert four.describe().endswith("4 GPUs: NVIDIA H100 (78.00 GiB/80.00 GiB free) x4")
    broken = MachineResources("h", "h", 1, GiB, GiB, (), "NVML init failed: x")
    assert "no GPU" in broken.describe() and "NVML init failed" in broken.describe()


# --- this machine -------------------------------------------------------------------------------------------------


def test_probe_this_machine():
    m = probe()
    assert m.cpu_count >= 1
    assert m.ram_total > m.ram_available > 0
    assert isinstance(m.gpus, tuple)
    assert m.machine_id == machine_id()
    json.dumps(m.to_dict())
    assert m.describe().startswith(m.machine_id + ": ")


def test_probe_with_override_and_fake_nvml():
    m = probe("worker-1", nvml=FakeNVML([gpu(0)]))
    assert m.machine_id == "worker-1" and len(m.gpus) == 1 and m.nvml_error is None
