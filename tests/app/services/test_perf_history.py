"""PerfHistory: ring-buffer bounds, the VRAM split, and a CSV that reads back exactly."""

from __future__ import annotations

import csv

import pytest

from app.services.perf_history import (GPU_COLUMNS, REQUEST_COLUMNS, SAMPLE_COLUMNS, GpuMemory,
                                       PerfHistory, kv_usage_pct, split_vram)
from app.services.telemetry import GpuSample, TelemetrySample
from engine.api import EngineStats, FinishedEvent
from engine.events import Timings, Usage

GIB = 1 << 30


@pytest.fixture(autouse=True)
def _no_visible_devices(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


def finished(rid="r", n_out=10, ttft=120.5, tok_s=55.25, prompt=7, reason="stop"):
    return FinishedEvent(rid, reason, Usage(prompt, n_out, 0), Timings(3.0, ttft, 18.1, tok_s, 400.0))


def stats(running=2, waiting=1, used=30, total=120, gen=123.4, memory=None):
    return EngineStats(running, waiting, total, used, total - used, 16, 0.25, gen, 800.0, 0, 5,
                       memory=dict(memory or {}))


def telemetry(gpus=(), rss=1 * GIB, cpu=150.0, why=None):
    return TelemetrySample(t=0.0, gpus=list(gpus), why_no_gpu=why, process_rss_bytes=rss,
                           process_cpu_pct=cpu, system_cpu_pct=33.5, system_ram_used_bytes=9 * GIB,
                           system_ram_total_bytes=32 * GIB, cpu_count=8)


def h100(used=30 * GIB):
    return GpuSample(0, "H100", used, 80 * GIB, 90.0, "GPU-a")


def rtx(used=2 * GIB):
    return GpuSample(1, "4090", used, 24 * GIB, None, "GPU-b")


# -- the VRAM split -----------------------------------------------------------------------
def test_split_on_the_model_gpu_only():
    mem = {"weights_bytes": 10 * GIB, "kv_cache_bytes": 15 * GIB}
    a, b = split_vram([h100(), rtx()], mem, "cuda:0", "")
    assert a == GpuMemory(0, "H100", 30 * GIB, 80 * GIB, 10 * GIB, 15 * GIB, 5 * GIB, 90.0)
    assert b == GpuMemory(1, "4090", 2 * GIB, 24 * GIB) and not b.holds_model
    a, b = split_vram([h100(), rtx(used=20 * GIB)], {"weights_bytes": 3 * GIB, "kv_cache_bytes": 4 * GIB},
                      "cuda:1", "")
    assert not a.holds_model and (b.weights_bytes, b.kv_cache_bytes, b.other_bytes) == (3 * GIB, 4 * GIB, 13 * GIB)


def test_split_other_is_clamped_at_zero_and_absent_without_a_model():
    (a,) = split_vram([h100(used=20 * GIB)], {"weights_bytes": 12 * GIB, "kv_cache_bytes": 9 * GIB}, "cuda:0", "")
    assert a.other_bytes == 0 and a.weights_bytes + a.kv_cache_bytes > a.used_bytes
    (a,) = split_vram([h100()], {}, None, "")  # no model loaded
    assert not a.holds_model and a.used_bytes == 30 * GIB
    (a,) = split_vram([h100()], {"weights_bytes": GIB, "kv_cache_bytes": GIB}, "cpu", "")
    assert not a.holds_model  # a CPU model splits no GPU


def test_split_falls_back_to_torch_figures_without_nvml():
    mem = {"weights_bytes": 2 * GIB, "kv_cache_bytes": 3 * GIB, "device_used_bytes": 7 * GIB,
           "device_total_bytes": 16 * GIB}
    (g,) = split_vram([], mem, "cuda:1", "")
    assert (g.index, g.used_bytes, g.total_bytes, g.other_bytes) == (1, 7 * GIB, 16 * GIB, 2 * GIB)
    assert split_vram([], mem, "cpu", "") == ()


def test_kv_usage_pct():
    assert kv_usage_pct(stats(used=30, total=120)) == pytest.approx(25.0)
    assert kv_usage_pct(stats(used=0, total=0)) is None


# -- ring buffers ---------------------------------------------------------------------------
def test_sample_buffer_keeps_the_last_n_points():
    h = PerfHistory(max_age_s=10, sample_hz=4)
    for i in range(100):
        h.add_sample(stats(), telemetry(), t=i * 0.25)
    ts = [s.t for s in h.samples]
    assert len(ts) == 40 and ts[0] == 15.0 and ts[-1] == 24.75


def test_buffers_drop_points_older_than_max_age():
    h = PerfHistory(max_age_s=10, sample_hz=4, max_requests=5)
    h.add_sample(None, telemetry(), t=0.0)
    h.add_sample(None, telemetry(), t=1.0)
    h.add_request(finished("old"), t=0.5)
    h.add_sample(None, telemetry(), t=100.0)
    h.add_request(finished("new"), t=100.0)
    assert [s.t for s in h.samples] == [100.0]
    assert [r.request_id for r in h.requests] == ["new"]
    for i in range(8):
        h.add_request(finished(f"r{i}"), t=101.0 + i)
    assert [r.request_id for r in h.requests] == [f"r{i}" for i in range(3, 8)]


def test_clear_empties_and_restarts_the_clock():
    now = [1000.0]
    h = PerfHistory(clock=lambda: now[0])
    now[0] = 1005.0
    h.add_sample(stats(), telemetry())
    h.add_request(finished())
    assert h.now() == 5.0 and len(h) == 2 and h.last_sample.t == 5.0
    v = h.version
    h.clear()
    assert len(h) == 0 and h.samples == [] and h.requests == [] and h.last_sample is None
    assert h.now() == 0.0 and h.version > v


def test_request_points_hide_meaningless_zeros():
    h = PerfHistory()
    none_out = h.add_request(finished(n_out=0, ttft=0.0, tok_s=0.0, reason="abort"))
    one_out = h.add_request(finished(n_out=1, tok_s=0.0))
    assert none_out.ttft_ms is None and none_out.decode_tok_s is None
    assert one_out.ttft_ms == 120.5 and one_out.decode_tok_s is None


# -- CSV ------------------------------------------------------------------------------------
def _num(text):
    return None if text == "" else float(text)


def test_csv_reads_back_what_went_in(tmp_path):
    h = PerfHistory()
    mem = {"weights_bytes": 10 * GIB, "kv_cache_bytes": 15 * GIB, "process_rss_bytes": 5}
    # What goes in, written down independently of the history's own structures:
    samples_in = [
        # t, stats or None, gpus
        (0.25, None, [h100(used=1 * GIB)]),
        (0.5, stats(running=3, waiting=4, used=7, total=64, gen=1 / 3, memory=mem), [h100(), rtx()]),
        (0.75, stats(running=0, waiting=0, used=0, total=64, gen=0.0, memory=mem), [h100(used=26 * GIB)]),
    ]
    requests_in = [(0.5, finished("req-a", n_out=12, ttft=98.123456789, tok_s=41.7)),
                   (0.6, finished("req,\"b\"", n_out=0, ttft=0.0, tok_s=0.0, reason="error"))]
    for t, st, gpus in samples_in:
        h.add_sample(st, telemetry(gpus, rss=int(1.5 * GIB) + int(t * 4)), "cuda:0", t=t)
    for t, ev in requests_in:
        h.add_request(ev, t=t)
    path = tmp_path / "perf.csv"
    assert h.to_csv(path) == 5

    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["series", "t_s", *REQUEST_COLUMNS, *SAMPLE_COLUMNS,
                             *[f"gpu{i}_{c}" for i in (0, 1) for c in GPU_COLUMNS]]
    assert [(r["series"], float(r["t_s"])) for r in rows] == [
        ("sample", 0.25), ("sample", 0.5), ("request", 0.5), ("request", 0.6), ("sample", 0.75)]

    samples = [r for r in rows if r["series"] == "sample"]
    for row, (t, st, gpus) in zip(samples, samples_in):
        assert all(row[c] == "" for c in REQUEST_COLUMNS)
        assert _num(row["process_rss_bytes"]) == int(1.5 * GIB) + int(t * 4)
        assert _num(row["process_cpu_pct"]) == 150.0 and _num(row["ram_total_bytes"]) == 32 * GIB
        if st is None:
            assert all(row[c] == "" for c in ("gen_tok_s", "kv_usage_pct", "running", "waiting",
                                              "weights_bytes"))
            assert row["gpu0_weights_bytes"] == "" and _num(row["gpu0_used_bytes"]) == 1 * GIB
        else:
            assert _num(row["gen_tok_s"]) == st.generation_tok_s  # exact, even for 1/3
            assert _num(row["kv_usage_pct"]) == 100 * st.kv_blocks_used / st.kv_blocks_total
            assert (_num(row["running"]), _num(row["waiting"])) == (st.num_running, st.num_waiting)
            used = gpus[0].memory_used_bytes
            assert _num(row["gpu0_used_bytes"]) == used and _num(row["gpu0_total_bytes"]) == 80 * GIB
            assert _num(row["gpu0_weights_bytes"]) == 10 * GIB
            assert _num(row["gpu0_kv_cache_bytes"]) == 15 * GIB
            assert _num(row["gpu0_other_bytes"]) == max(0, used - 25 * GIB)
        present = {g.index for g in gpus}
        assert (row["gpu1_used_bytes"] != "") == (1 in present)
        if 1 in present:
            assert _num(row["gpu1_used_bytes"]) == 2 * GIB and row["gpu1_weights_bytes"] == ""
            assert row["gpu1_util_pct"] == ""

    reqs = [r for r in rows if r["series"] == "request"]
    assert reqs[0]["request_id"] == "req-a" and reqs[0]["reason"] == "stop"
    assert _num(reqs[0]["ttft_ms"]) == 98.123456789 and _num(reqs[0]["decode_tok_s"]) == 41.7
    assert _num(reqs[0]["completion_tokens"]) == 12 and _num(reqs[0]["prompt_tokens"]) == 7
    assert reqs[1]["request_id"] == "req,\"b\"" and reqs[1]["ttft_ms"] == "" and reqs[1]["reason"] == "error"
    assert all(r[c] == "" for r in reqs for c in SAMPLE_COLUMNS)


def test_csv_of_an_empty_history_is_just_the_header(tmp_path):
    path = tmp_path / "empty.csv"
    assert PerfHistory().to_csv(path) == 0
    with open(path, newline="") as f:
        assert list(csv.reader(f)) == [["series", "t_s", *REQUEST_COLUMNS, *SAMPLE_COLUMNS]]
