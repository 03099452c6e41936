"""Machine telemetry for the Performance panel: NVIDIA GPUs through NVML, plus this process.

Qt-free. ``Telemetry().sample()`` is cheap (NVML queries take microseconds and
``psutil``'s CPU percentages are non-blocking), so the GUI may call it on its UI thread
a few times a second. It never raises: whatever cannot be read is reported as missing,
and ``why_no_gpu`` says, in words a user can act on, why no GPU is shown.

The NVML layer is injectable (``Telemetry(nvml=...)``): any object with pynvml's
function names works, which is how the tests fake one or two GPUs without a driver.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

__all__ = ["GpuSample", "TelemetrySample", "Telemetry", "gpu_for_device"]

log = logging.getLogger("hearth.app.telemetry")

MIN_CPU_INTERVAL_S = 0.05


@dataclass(slots=True, frozen=True)
class GpuSample:
    """One NVIDIA GPU as NVML sees it (``index`` is NVML's, i.e. PCI bus order)."""

    index: int
    name: str
    memory_used_bytes: int
    memory_total_bytes: int
    utilization_pct: float | None = None  # None when the driver does not report it
    uuid: str | None = None


@dataclass(slots=True)
class TelemetrySample:
    """One reading. ``gpus`` is empty when NVML is unavailable; ``why_no_gpu`` then says why.

    ``process_cpu_pct`` is psutil's per-process figure: 100 means one core fully busy, so
    it can exceed 100 on a multi-core machine (like ``top``). ``system_cpu_pct`` is the
    whole machine, 0..100. Byte counts are 0 and percentages 0.0 when they could not be
    read (psutil missing or failing), never an exception.
    """

    t: float  # time.monotonic() when taken
    gpus: list[GpuSample] = field(default_factory=list)
    why_no_gpu: str | None = None
    process_rss_bytes: int = 0
    process_cpu_pct: float = 0.0
    system_cpu_pct: float = 0.0
    system_ram_used_bytes: int = 0
    system_ram_total_bytes: int = 0
    cpu_count: int = 1


class Telemetry:
    """Samples GPUs (NVML, initialised once, lazily) and this process (psutil).

    ``nvml``: a pynvml-like object (default: ``import pynvml``); ``psutil_module``: a
    psutil-like object (default: ``import psutil``). Call ``close()`` when done.
    """

    def __init__(self, nvml: Any = None, psutil_module: Any = None, clock=time.monotonic) -> None:
        self._nvml = nvml
        self._ps = psutil_module
        self._clock = clock
        self._handles: list[Any] | None = None  # None: NVML not initialised yet
        self._nvml_up = False  # nvmlInit succeeded: close() must shut it down
        self._why_no_gpu: str | None = None
        self._cpu_count = 1
        self._cpu_at: float | None = None  # when CPU use was last measured
        self._cpu_last = (0.0, 0.0)
        self._process = None
        self._static: dict[int, tuple[str, str | None]] = {}  # index -> (name, uuid)

    # -- public ------------------------------------------------------------------------
    def sample(self) -> TelemetrySample:
        """Read everything once. Never raises."""
        try:
            s = TelemetrySample(t=self._clock())
        except Exception:  # a broken injected clock must not take the panel down
            s = TelemetrySample(t=time.monotonic())
        try:
            s.gpus = self._sample_gpus()
        except Exception as e:  # belt and braces: _sample_gpus already guards each call
            log.debug("GPU sampling failed", exc_info=True)
            s.gpus = []
            self._why_no_gpu = f"reading the GPUs failed ({_describe(e)})"
        s.why_no_gpu = None if s.gpus else (self._why_no_gpu or "NVML reported no GPUs")
        try:
            self._sample_process(s)
        except Exception:
            log.debug("process sampling failed", exc_info=True)
        return s

    @property
    def why_no_gpu(self) -> str | None:
        """Why no GPU is reported (after the first ``sample()``), or None when there are GPUs."""
        return self._why_no_gpu

    def close(self) -> None:
        """Release NVML (safe to call twice, and when NVML never started)."""
        if self._nvml_up:
            try:
                self._nvml.nvmlShutdown()
            except Exception:
                pass
        self._nvml_up = False
        self._handles = None
        self._why_no_gpu = None

    # -- GPUs --------------------------------------------------------------------------
    def _init_nvml(self) -> None:
        """Initialise once; a failure is remembered (a missing driver does not come back)."""
        self._handles = []
        if self._nvml is None:
            try:
                import pynvml
            except Exception as e:
                self._why_no_gpu = (f"nvidia-ml-py is not installed ({_describe(e)}); "
                                    "install it with `pip install nvidia-ml-py` to see GPU memory")
                return
            self._nvml = pynvml
        try:
            self._nvml.nvmlInit()
        except Exception as e:
            self._why_no_gpu = f"no NVIDIA driver found (NVML: {_describe(e)})"
            return
        self._nvml_up = True
        try:
            count = int(self._nvml.nvmlDeviceGetCount())
            self._handles = [self._nvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        except Exception as e:
            self._handles = []
            self._why_no_gpu = f"the NVIDIA driver could not list the GPUs (NVML: {_describe(e)})"
            return
        if not self._handles:
            self._why_no_gpu = "the NVIDIA driver is loaded but reports no GPU"

    def _sample_gpus(self) -> list[GpuSample]:
        if self._handles is None:
            self._init_nvml()
        out = []
        for i, h in enumerate(self._handles or ()):
            name, uuid = self._static_info(i, h)
            try:
                mem = self._nvml.nvmlDeviceGetMemoryInfo(h)
                used, total = int(mem.used), int(mem.total)
            except Exception:
                # A GPU that stops answering (fell off the bus, reset) is left out of this
                # sample rather than drawn as 0 bytes.
                log.debug("NVML memory query failed for GPU %d", i, exc_info=True)
                continue
            try:
                util = float(self._nvml.nvmlDeviceGetUtilizationRates(h).gpu)
            except Exception:  # not supported on some boards / vGPUs
                util = None
            out.append(GpuSample(i, name, used, total, util, uuid))
        if self._handles and not out:
            self._why_no_gpu = "NVML lists GPUs but none answered a memory query"
        elif out:
            self._why_no_gpu = None
        return out

    def _static_info(self, i: int, handle: Any) -> tuple[str, str | None]:
        """Name and UUID never change: ask once."""
        if i not in self._static:
            name, uuid = f"GPU {i}", None
            try:
                name = _text(self._nvml.nvmlDeviceGetName(handle))
            except Exception:
                pass
            try:
                uuid = _text(self._nvml.nvmlDeviceGetUUID(handle))
            except Exception:
                pass
            self._static[i] = (name, uuid)
        return self._static[i]

    # -- this process ------------------------------------------------------------------
    def _sample_process(self, s: TelemetrySample) -> None:
        ps = self._ps
        if ps is False:  # psutil could not be imported: RSS and CPU stay 0
            return
        if ps is None:
            try:
                import psutil as ps
            except ImportError:
                self._ps = False
                return
            self._ps = ps
        if self._process is None:
            self._process = ps.Process(os.getpid())
            # The first cpu_percent(None) call only starts the measurement and returns 0.0;
            # prime both counters so the second sample (250 ms later) is already meaningful.
            self._process.cpu_percent(interval=None)
            ps.cpu_percent(interval=None)
            self._cpu_count = int(ps.cpu_count() or 1)
        s.cpu_count = self._cpu_count
        for fill in (self._read_rss, self._read_cpu, self._read_ram):
            try:
                fill(s)
            except Exception:
                log.debug("psutil query failed", exc_info=True)

    def _read_rss(self, s: TelemetrySample) -> None:
        s.process_rss_bytes = int(self._process.memory_info().rss)

    def _read_cpu(self, s: TelemetrySample) -> None:
        # psutil divides CPU time by the wall time since the previous call; two samples a
        # few microseconds apart would give a meaningless spike (thousands of percent), so
        # closely spaced samples repeat the last reading instead of measuring again.
        now = time.monotonic()
        if self._cpu_at is not None and now - self._cpu_at < MIN_CPU_INTERVAL_S:
            s.process_cpu_pct, s.system_cpu_pct = self._cpu_last
            return
        proc = float(self._process.cpu_percent(interval=None))
        system = float(self._ps.cpu_percent(interval=None))
        proc = min(max(proc, 0.0), 100.0 * self._cpu_count)
        system = min(max(system, 0.0), 100.0)
        self._cpu_at, self._cpu_last = now, (proc, system)
        s.process_cpu_pct, s.system_cpu_pct = proc, system

    def _read_ram(self, s: TelemetrySample) -> None:
        vm = self._ps.virtual_memory()
        s.system_ram_total_bytes = int(vm.total)
        # total - available counts what programs really hold (used excludes some caches
        # on Linux, and means something else on macOS / Windows).
        s.system_ram_used_bytes = int(vm.total - vm.available)


def gpu_for_device(device: str | None, gpus: list[GpuSample],
                   cuda_visible_devices: str | None = None) -> GpuSample | None:
    """The NVML GPU behind a torch device string such as ``"cuda:1"`` (None for cpu/unknown).

    torch numbers only the GPUs in ``CUDA_VISIBLE_DEVICES`` (default: read from the
    environment), NVML numbers all of them, so ``cuda:N`` maps through that list (indices
    or ``GPU-...`` UUIDs). Assumes ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` order, which matches
    CUDA's default on single-model machines; on mixed-GPU boxes without it, torch's
    "fastest first" order may differ.
    """
    if not device or not device.startswith("cuda") or not gpus:
        return None
    _, _, num = device.partition(":")
    try:
        n = int(num) if num else 0
    except ValueError:
        return None
    if cuda_visible_devices is None:
        cuda_visible_devices = os.environ.get("CUDA_VISIBLE_DEVICES")
    if cuda_visible_devices:
        entries = [e.strip() for e in cuda_visible_devices.split(",") if e.strip()]
        if n >= len(entries):
            return None
        entry = entries[n]
        if entry.isdigit():
            return next((g for g in gpus if g.index == int(entry)), None)
        # UUIDs may be given in full or as an unambiguous prefix ("GPU-3f2a").
        matches = [g for g in gpus if g.uuid and g.uuid.startswith(entry)]
        return matches[0] if len(matches) == 1 else None
    return next((g for g in gpus if g.index == n), None)


def _text(value: Any) -> str:
    """Old pynvml versions return bytes, new ones str."""
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _describe(e: BaseException) -> str:
    msg = str(e).strip()
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__
