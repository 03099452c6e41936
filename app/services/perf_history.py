"""Time series behind the Performance panel: bounded ring buffers, CSV export. Qt-free.

Two series share one clock (seconds since the history started or was last cleared):

* request points, one per finished request (from an ``engine.api.FinishedEvent``):
  TTFT, decode tokens/s, token counts;
* sample points, one per panel tick (~4 Hz): the latest ``engine.api.EngineStats``
  (aggregate tokens/s, KV-cache usage, running / waiting) joined with a
  ``TelemetrySample`` (per-GPU memory, process RSS and CPU, system RAM).

Both are ring buffers: a sample buffer holds ``max_age_s * sample_hz`` points (10 minutes
at 4 Hz by default) and anything older than ``max_age_s`` behind the newest point is
dropped, so memory stays bounded however long the app runs.

CSV format (``PerfHistory.to_csv``): ONE file, one header row, rows in time order. The
``series`` column says what a row is: ``request`` or ``sample``; columns that do not apply
to a row's series are empty, as are values that were unknown (e.g. no model loaded).
Units are in the column names (``_s``, ``_ms``, ``_tok_s``, ``_pct``, ``_bytes``); per-GPU
columns are ``gpu<N>_used_bytes`` etc. for every NVML GPU index N seen in the buffer.
"""

from __future__ import annotations

import csv
import math
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from app.services.telemetry import GpuSample, TelemetrySample, gpu_for_device

__all__ = ["RequestPoint", "GpuMemory", "SamplePoint", "PerfHistory", "split_vram",
           "kv_usage_pct", "REQUEST_COLUMNS", "SAMPLE_COLUMNS", "GPU_COLUMNS"]


@dataclass(slots=True, frozen=True)
class RequestPoint:
    """One finished request. ``ttft_ms`` is None when no token came out, ``decode_tok_s``
    when fewer than two did (the engine reports 0.0 then, which would draw as a false dip)."""

    t: float
    request_id: str
    reason: str
    ttft_ms: float | None
    decode_tok_s: float | None
    completion_tokens: int
    prompt_tokens: int


@dataclass(slots=True, frozen=True)
class GpuMemory:
    """Memory of one GPU. The split (weights / KV cache / other) is only known on the GPU
    that holds the model; elsewhere those three are None and only ``used`` is meaningful."""

    index: int
    name: str
    used_bytes: int
    total_bytes: int
    weights_bytes: int | None = None
    kv_cache_bytes: int | None = None
    other_bytes: int | None = None
    util_pct: float | None = None

    @property
    def holds_model(self) -> bool:
        return self.weights_bytes is not None


@dataclass(slots=True, frozen=True)
class SamplePoint:
    """One tick. Engine fields are None while no model is loaded."""

    t: float
    gen_tok_s: float | None
    prompt_tok_s: float | None
    kv_usage_pct: float | None
    running: int | None
    waiting: int | None
    weights_bytes: int | None  # the model's weights / KV cache wherever they live
    kv_cache_bytes: int | None
    gpus: tuple[GpuMemory, ...]
    process_rss_bytes: int
    process_cpu_pct: float
    system_cpu_pct: float
    ram_used_bytes: int
    ram_total_bytes: int


def kv_usage_pct(stats: Any) -> float | None:
    """Share of KV-cache blocks in use, in percent (None when the cache has no blocks)."""
    total = getattr(stats, "kv_blocks_total", 0) or 0
    if total <= 0:
        return None
    return 100.0 * (getattr(stats, "kv_blocks_used", 0) or 0) / total


def split_vram(gpus: Sequence[GpuSample], memory: dict | None, device: str | None,
               cuda_visible_devices: str | None = None) -> tuple[GpuMemory, ...]:
    """Per-GPU memory, split into weights / KV cache / other on the GPU holding the model.

    On that GPU (``device`` is ``"cuda:N"``): weights = ``memory["weights_bytes"]``,
    kv = ``memory["kv_cache_bytes"]``, other = used - weights - kv, clamped at 0 (activations,
    CUDA context, the allocator's cache and other processes all land in "other").
    Without NVML but with a CUDA model, the engine's own ``device_used_bytes`` /
    ``device_total_bytes`` stand in for that one GPU, so the chart still works.
    """
    memory = memory or {}
    holder = gpu_for_device(device, list(gpus), cuda_visible_devices) if memory else None
    out = []
    for g in gpus:
        out.append(_with_split(g.index, g.name, g.memory_used_bytes, g.memory_total_bytes,
                               memory if holder is not None and g.index == holder.index else None,
                               g.utilization_pct))
    if not gpus and device and device.startswith("cuda") and memory.get("device_total_bytes"):
        index = _cuda_ordinal(device)
        out.append(_with_split(index, f"{device} (torch)", int(memory.get("device_used_bytes", 0)),
                               int(memory["device_total_bytes"]), memory, None))
    return tuple(out)


def _with_split(index, name, used, total, memory, util) -> GpuMemory:
    if memory is None:
        return GpuMemory(index, name, used, total, util_pct=util)
    weights = int(memory.get("weights_bytes", 0) or 0)
    kv = int(memory.get("kv_cache_bytes", 0) or 0)
    return GpuMemory(index, name, used, total, weights, kv, max(0, used - weights - kv), util)


def _cuda_ordinal(device: str) -> int:
    _, _, num = device.partition(":")
    return int(num) if num.isdigit() else 0


class PerfHistory:
    """Bounded history of request and sample points. Not thread-safe: use from one thread.

    ``version`` increases on every change, so a view can skip redrawing unchanged data;
    ``requests_version`` and ``samples_version`` do the same for each series alone.
    """

    def __init__(self, max_age_s: float = 600.0, sample_hz: float = 4.0,
                 max_requests: int = 10_000, clock=time.monotonic) -> None:
        if max_age_s <= 0 or sample_hz <= 0 or max_requests <= 0:
            raise ValueError("max_age_s, sample_hz and max_requests must all be positive")
        self.max_age_s = float(max_age_s)
        self._clock = clock
        self._samples: deque[SamplePoint] = deque(maxlen=max(1, math.ceil(max_age_s * sample_hz)))
        self._requests: deque[RequestPoint] = deque(maxlen=max_requests)
        self._t0 = clock()
        self.version = 0
        self.requests_version = 0
        self.samples_version = 0

    # -- recording ---------------------------------------------------------------------
    def now(self) -> float:
        """Seconds since the history started (or was last cleared)."""
        return self._clock() - self._t0

    def add_request(self, event: Any, t: float | None = None) -> RequestPoint:
        """Record a finished request (an ``engine.api.FinishedEvent`` or look-alike)."""
        usage, timings = event.usage, event.timings
        n_out = int(usage.completion_tokens)
        p = RequestPoint(
            t=self.now() if t is None else float(t),
            request_id=str(event.request_id),
            reason=str(event.reason),
            ttft_ms=float(timings.ttft_ms) if n_out >= 1 else None,
            decode_tok_s=float(timings.decode_tok_s) if n_out >= 2 else None,
            completion_tokens=n_out,
            prompt_tokens=int(usage.prompt_tokens),
        )
        self._requests.append(p)
        self._prune(self._requests, p.t)
        self.version += 1
        self.requests_version += 1
        return p

    def add_sample(self, stats: Any | None, telemetry: TelemetrySample,
                   device: str | None = None, t: float | None = None) -> SamplePoint:
        """Record one tick: the latest ``EngineStats`` (None without a model) and a telemetry
        sample; ``device`` (the loaded model's ``model_info.device``) says which GPU holds
        the model."""
        memory = dict(getattr(stats, "memory", None) or {}) if stats is not None else {}
        p = SamplePoint(
            t=self.now() if t is None else float(t),
            gen_tok_s=_opt_float(stats, "generation_tok_s"),
            prompt_tok_s=_opt_float(stats, "prompt_tok_s"),
            kv_usage_pct=kv_usage_pct(stats) if stats is not None else None,
            running=_opt_int(stats, "num_running"),
            waiting=_opt_int(stats, "num_waiting"),
            weights_bytes=int(memory["weights_bytes"]) if "weights_bytes" in memory else None,
            kv_cache_bytes=int(memory["kv_cache_bytes"]) if "kv_cache_bytes" in memory else None,
            gpus=split_vram(telemetry.gpus, memory, device),
            process_rss_bytes=telemetry.process_rss_bytes,
            process_cpu_pct=telemetry.process_cpu_pct,
            system_cpu_pct=telemetry.system_cpu_pct,
            ram_used_bytes=telemetry.system_ram_used_bytes,
            ram_total_bytes=telemetry.system_ram_total_bytes,
        )
        self._samples.append(p)
        self._prune(self._samples, p.t)
        self.version += 1
        self.samples_version += 1
        return p

    def clear(self) -> None:
        """Forget everything and restart the clock at 0."""
        self._samples.clear()
        self._requests.clear()
        self._t0 = self._clock()
        self.version += 1
        self.requests_version += 1
        self.samples_version += 1

    def _prune(self, buf: deque, newest: float) -> None:
        while buf and buf[0].t < newest - self.max_age_s:
            buf.popleft()

    # -- reading -----------------------------------------------------------------------
    @property
    def requests(self) -> list[RequestPoint]:
        return list(self._requests)

    @property
    def samples(self) -> list[SamplePoint]:
        return list(self._samples)

    @property
    def first_request(self) -> RequestPoint | None:
        return self._requests[0] if self._requests else None

    @property
    def first_sample(self) -> SamplePoint | None:
        return self._samples[0] if self._samples else None

    @property
    def last_request(self) -> RequestPoint | None:
        return self._requests[-1] if self._requests else None

    @property
    def last_sample(self) -> SamplePoint | None:
        return self._samples[-1] if self._samples else None

    def gpu_indices(self) -> list[int]:
        """Every GPU index present in the buffered samples, sorted."""
        return sorted({g.index for s in self._samples for g in s.gpus})

    def __len__(self) -> int:
        return len(self._samples) + len(self._requests)

    # -- export ------------------------------------------------------------------------
    def csv_header(self) -> list[str]:
        gpu_cols = [f"gpu{i}_{c}" for i in self.gpu_indices() for c in GPU_COLUMNS]
        return ["series", "t_s", *REQUEST_COLUMNS, *SAMPLE_COLUMNS, *gpu_cols]

    def csv_rows(self) -> Iterable[list[str]]:
        """Rows matching ``csv_header()``, in time order (requests after samples on ties)."""
        gpus = self.gpu_indices()
        blank_req = [""] * len(REQUEST_COLUMNS)
        blank_sample = [""] * (len(SAMPLE_COLUMNS) + len(gpus) * len(GPU_COLUMNS))
        tagged = [(s.t, 0, s) for s in self._samples] + [(r.t, 1, r) for r in self._requests]
        tagged.sort(key=lambda x: (x[0], x[1]))
        for t, kind, p in tagged:
            if kind == 1:
                yield ["request", _cell(t), p.request_id, p.reason, _cell(p.ttft_ms),
                       _cell(p.decode_tok_s), _cell(p.completion_tokens), _cell(p.prompt_tokens),
                       *blank_sample]
                continue
            by_index = {g.index: g for g in p.gpus}
            gpu_cells = []
            for i in gpus:
                g = by_index.get(i)
                gpu_cells += ([""] * len(GPU_COLUMNS) if g is None else
                              [_cell(g.used_bytes), _cell(g.total_bytes), _cell(g.weights_bytes),
                               _cell(g.kv_cache_bytes), _cell(g.other_bytes), _cell(g.util_pct)])
            yield ["sample", _cell(t), *blank_req, _cell(p.gen_tok_s), _cell(p.prompt_tok_s),
                   _cell(p.kv_usage_pct), _cell(p.running), _cell(p.waiting),
                   _cell(p.weights_bytes), _cell(p.kv_cache_bytes), _cell(p.process_rss_bytes),
                   _cell(p.process_cpu_pct), _cell(p.system_cpu_pct), _cell(p.ram_used_bytes),
                   _cell(p.ram_total_bytes), *gpu_cells]

    def to_csv(self, path: str | Path) -> int:
        """Write the whole buffer as one CSV file (format in the module docstring).
        Returns the number of data rows. Raises OSError if the file cannot be written."""
        n = 0
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(self.csv_header())
            for row in self.csv_rows():
                w.writerow(row)
                n += 1
        return n


REQUEST_COLUMNS = ("request_id", "reason", "ttft_ms", "decode_tok_s", "completion_tokens",
                   "prompt_tokens")
SAMPLE_COLUMNS = ("gen_tok_s", "prompt_tok_s", "kv_usage_pct", "running", "waiting",
                  "weights_bytes", "kv_cache_bytes", "process_rss_bytes", "process_cpu_pct",
                  "system_cpu_pct", "ram_used_bytes", "ram_total_bytes")
GPU_COLUMNS = ("used_bytes", "total_bytes", "weights_bytes", "kv_cache_bytes", "other_bytes",
               "util_pct")


def _cell(v) -> str:
    # repr() of a float is its shortest exact round-trip form, so CSV -> float is lossless.
    if v is None:
        return ""
    return repr(float(v)) if isinstance(v, float) else str(v)


def _opt_float(obj, name) -> float | None:
    v = getattr(obj, name, None) if obj is not None else None
    return None if v is None else float(v)


def _opt_int(obj, name) -> int | None:
    v = getattr(obj, name, None) if obj is not None else None
    return None if v is None else int(v)
