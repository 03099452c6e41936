"""Telemetry: fake NVML GPUs, a missing driver, and failures that must never escape."""

from __future__ import annotations

import os
import sys
from types import SimpleNamespace

import pytest

from app.services.telemetry import GpuSample, Telemetry, gpu_for_device
from tests.app.services.fake_nvml import GIB, FakeNvml, FakeNVMLError, no_driver, two_gpus

NVML_CALLS = ("nvmlInit", "nvmlDeviceGetCount", "nvmlDeviceGetHandleByIndex", "nvmlDeviceGetName",
              "nvmlDeviceGetUUID", "nvmlDeviceGetMemoryInfo", "nvmlDeviceGetUtilizationRates")


def _statm_rss() -> int:
    """Independent reference for RSS on Linux: resident pages from /proc."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_two_fake_gpus_are_reported_with_their_values():
    nvml = two_gpus()
    tel = Telemetry(nvml=nvml)
    s = tel.sample()
    assert s.why_no_gpu is None
    assert s.gpus == [
        GpuSample(0, "NVIDIA H100 80GB HBM3", 30 * GIB, 80 * GIB, 87.0, "GPU-aaaa-0001"),
        GpuSample(1, "NVIDIA RTX 4090", 1 * GIB, 24 * GIB, 3.0, "GPU-bbbb-0002"),
    ]
    nvml.gpus[0]["used"] = 41 * GIB  # memory moves between samples; the name is asked once
    s2 = tel.sample()
    assert s2.gpus[0].memory_used_bytes == 41 * GIB
    assert s2.t >= s.t
    assert nvml.calls["nvmlInit"] == 1
    assert nvml.calls["nvmlDeviceGetName"] == 2  # once per GPU, not once per sample
    tel.close()
    tel.close()
    assert nvml.calls["nvmlShutdown"] == 1


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc reference is Linux-only")
def test_failing_nvml_gives_a_reason_and_process_memory():
    nvml = no_driver()
    tel = Telemetry(nvml=nvml)
    s = tel.sample()
    assert s.gpus == []
    assert "no NVIDIA driver" in s.why_no_gpu and "NVML Shared Library Not Found" in s.why_no_gpu
    ref = _statm_rss()
    assert 0.5 * ref < s.process_rss_bytes < 2.0 * ref
    phys = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert s.system_ram_total_bytes == phys
    assert 0 < s.system_ram_used_bytes <= phys
    assert s.process_cpu_pct >= 0.0 and s.cpu_count >= 1
    tel.sample()
    assert nvml.calls["nvmlInit"] == 1  # a missing driver is not retried 4 times a second
    tel.close()
    assert "nvmlShutdown" not in nvml.calls


def test_missing_nvidia_ml_py_is_explained(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` fail
    s = Telemetry().sample()
    assert s.gpus == [] and "nvidia-ml-py is not installed" in s.why_no_gpu
    assert s.process_rss_bytes > 0


def test_driver_without_gpus_is_explained():
    s = Telemetry(nvml=FakeNvml([])).sample()
    assert s.gpus == [] and "reports no GPU" in s.why_no_gpu


@pytest.mark.parametrize("call", NVML_CALLS)
@pytest.mark.parametrize("exc", [FakeNVMLError("boom"), RuntimeError(), OSError("gone")])
def test_sample_never_raises_whichever_nvml_call_fails(call, exc):
    nvml = two_gpus()
    nvml.fail[call] = exc
    s = Telemetry(nvml=nvml).sample()
    if call in ("nvmlInit", "nvmlDeviceGetCount", "nvmlDeviceGetHandleByIndex", "nvmlDeviceGetMemoryInfo"):
        assert s.gpus == [] and s.why_no_gpu
    else:  # optional facts degrade, the GPU stays
        assert [g.memory_used_bytes for g in s.gpus] == [30 * GIB, 1 * GIB]
        if call == "nvmlDeviceGetName":
            assert [g.name for g in s.gpus] == ["GPU 0", "GPU 1"]
        if call == "nvmlDeviceGetUtilizationRates":
            assert [g.utilization_pct for g in s.gpus] == [None, None]
    assert s.process_rss_bytes > 0


def test_one_gpu_that_stops_answering_is_left_out():
    nvml = two_gpus()
    tel = Telemetry(nvml=nvml)
    original = nvml.nvmlDeviceGetMemoryInfo

    def flaky(h):
        if h[1] == 0:
            raise FakeNVMLError("GPU is lost")
        return original(h)

    nvml.nvmlDeviceGetMemoryInfo = flaky
    s = tel.sample()
    assert [g.index for g in s.gpus] == [1] and s.why_no_gpu is None


class _BrokenPsutil:
    def __getattr__(self, name):
        raise RuntimeError(f"psutil.{name} is broken")


def test_sample_never_raises_when_psutil_and_clock_fail():
    def bad_clock():
        raise ValueError("no clock")

    s = Telemetry(nvml=no_driver(), psutil_module=_BrokenPsutil(), clock=bad_clock).sample()
    assert s.gpus == [] and s.why_no_gpu
    assert s.process_rss_bytes == 0 and s.t > 0


def test_process_figures_come_from_psutil():
    proc = SimpleNamespace(memory_info=lambda: SimpleNamespace(rss=123 * 2**20),
                           cpu_percent=lambda interval=None: 150.0)
    ps = SimpleNamespace(Process=lambda pid: proc, cpu_count=lambda: 8,
                         cpu_percent=lambda interval=None: 40.0,
                         virtual_memory=lambda: SimpleNamespace(total=64 * GIB, available=48 * GIB,
                                                                used=10 * GIB))
    s = Telemetry(nvml=no_driver(), psutil_module=ps).sample()
    assert (s.process_rss_bytes, s.process_cpu_pct, s.system_cpu_pct, s.cpu_count) == \
        (123 * 2**20, 150.0, 40.0, 8)
    assert (s.system_ram_used_bytes, s.system_ram_total_bytes) == (16 * GIB, 64 * GIB)


def test_gpu_for_device_follows_cuda_visible_devices():
    gpus = Telemetry(nvml=two_gpus()).sample().gpus
    assert gpu_for_device("cuda:1", gpus, "").index == 1
    assert gpu_for_device("cuda", gpus, "").index == 0
    assert gpu_for_device("cuda:0", gpus, "1").index == 1
    assert gpu_for_device("cuda:1", gpus, "1,0").index == 0
    assert gpu_for_device("cuda:0", gpus, "GPU-bbbb").index == 1
    assert gpu_for_device("cuda:0", gpus, "GPU-") is None  # ambiguous prefix
    assert gpu_for_device("cuda:1", gpus, "0") is None  # not visible to torch
    assert gpu_for_device("cpu", gpus, "") is None
    assert gpu_for_device("cuda:0", [], "") is None


def test_cpu_readings_are_clamped_and_not_remeasured_microseconds_apart():
    readings = iter([0.0, 1e6, 40.0])
    proc = SimpleNamespace(memory_info=lambda: SimpleNamespace(rss=1),
                           cpu_percent=lambda interval=None: next(readings))
    ps = SimpleNamespace(Process=lambda pid: proc, cpu_count=lambda: 4,
                         cpu_percent=lambda interval=None: 250.0,
                         virtual_memory=lambda: SimpleNamespace(total=2, available=1))
    tel = Telemetry(nvml=no_driver(), psutil_module=ps)
    first = tel.sample()  # the priming call consumes 0.0; the measured 1e6 is clamped
    assert (first.process_cpu_pct, first.system_cpu_pct) == (400.0, 100.0)
    second = tel.sample()  # immediately after: the same reading, psutil not asked again
    assert second.process_cpu_pct == 400.0 and next(readings) == 40.0
