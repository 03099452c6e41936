"""The numbers a comparison computes itself: agreement, word-level divergence, peak memory."""

from __future__ import annotations

import mmap

import pytest

from app.services import compare_metrics
from app.services.compare_metrics import (PeakMemoryMeter, agreement, divergent_spans, first_divergence, mean,
                                          prefix_agreement, word_diff)


@pytest.mark.parametrize("ref, out, whole, prefix", [
    ([1, 2, 3, 4], [1, 2, 3, 4], 1.0, 1.0),        # itself
    ([1, 2, 3, 4], [1, 9, 3, 4], 0.75, 0.25),      # one token differs: the rest still matches by position
    ([1, 2, 3, 4], [9, 2, 3, 4], 0.75, 0.0),       # differs at once
    ([1, 2, 3, 4], [1, 2], 0.5, 0.5),              # stops early: the missing tokens count as different
    ([1, 2], [1, 2, 3, 4], 0.5, 0.5),              # runs on past the reference's end
    ([], [], 1.0, 1.0),
    ([1, 2], [], 0.0, 0.0),
])
def test_agreement_and_prefix_agreement(ref, out, whole, prefix):
    assert agreement(ref, out) == pytest.approx(whole)
    assert prefix_agreement(ref, out) == pytest.approx(prefix)
    assert 0.0 <= prefix_agreement(ref, out) <= agreement(ref, out) <= 1.0


def test_mean_skips_missing_values():
    assert mean([1.0, None, 3.0]) == 2.0
    assert mean([None, None]) is None
    assert mean([]) is None


def test_divergent_spans_mark_the_changed_and_added_words_of_the_output():
    ref = "The cat sat on the mat."
    out = "The dog sat on the red mat."
    spans = divergent_spans(ref, out)
    assert [out[a:b] for a, b in spans] == ["dog", "red"]
    kinds = [d.kind for d in word_diff(ref, out)]
    assert kinds == ["replace", "insert"]
    replace = word_diff(ref, out)[0]
    assert ref[replace.ref_start:replace.ref_end] == "cat"


def test_words_missing_from_the_output_leave_an_empty_span_at_their_place():
    ref = "one two three four"
    out = "one two four"
    (d,) = word_diff(ref, out)
    assert d.kind == "delete" and ref[d.ref_start:d.ref_end] == "three"
    assert d.out_start == d.out_end == out.index("four")
    assert divergent_spans(ref, out) == []  # nothing in the output to highlight
    # a truncated output: the missing words sit at its end
    (d,) = word_diff(ref, "one two")
    assert d.out_start == d.out_end == len("one two")


def test_spacing_alone_is_no_divergence_and_first_divergence_finds_the_offset():
    assert word_diff("a  b\nc", "a b c") == []
    assert first_divergence("a b c", "a b c") is None
    assert first_divergence("def f(x):\n    return x", "def f(y):\n    return x") == 4
    assert first_divergence("", "") is None
    assert divergent_spans("", "all new") == [(0, 7)]


def test_peak_memory_on_the_cpu_is_the_spans_own_high_water_mark():
    before = compare_metrics._rss()
    meter = PeakMemoryMeter()
    meter.start()
    block = mmap.mmap(-1, 64 * 2**20)  # touch 64 MiB, then give it back to the system
    for i in range(0, len(block), 4096):
        block[i] = 1
    block.close()
    peak = meter.stop("cpu")
    assert peak is not None and peak >= before + 60 * 2**20
    assert compare_metrics._rss() < peak  # freed again: the peak is not the RSS now
    assert meter.source  # says how it was measured

    later = PeakMemoryMeter()  # a new span does not inherit the last one's peak
    later.start()
    second = later.stop("cpu")
    if later.source.endswith("(VmHWM)"):
        assert second < peak


def test_peak_memory_samples_the_rss_where_the_high_water_mark_cannot_be_reset(monkeypatch):
    monkeypatch.setattr(compare_metrics, "_reset_hwm", lambda: False)
    meter = PeakMemoryMeter()
    meter.start()
    peak = meter.stop("cpu")
    assert peak and peak > 0
    assert meter.source.startswith("process RSS sampled every")


def test_peak_memory_on_a_cuda_device_is_none_without_cuda(monkeypatch):
    monkeypatch.setattr(compare_metrics, "peak_device_memory_bytes", lambda device: None)
    meter = PeakMemoryMeter()
    meter.start()
    assert meter.stop("cuda:0") is None


def test_engine_peak_device_memory_is_none_off_cuda():
    from engine.api import peak_device_memory_bytes, reset_peak_device_memory

    reset_peak_device_memory()  # a no-op without CUDA
    assert peak_device_memory_bytes("cpu") is None


@pytest.mark.gpu
def test_engine_peak_device_memory_is_the_spans_own_peak_on_cuda():
    import torch

    from engine.api import peak_device_memory_bytes, reset_peak_device_memory

    torch.zeros(1, device="cuda")  # set CUDA up
    reset_peak_device_memory()
    block = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    peak = peak_device_memory_bytes("cuda:0")
    del block
    assert peak >= 256 * 2**20
    reset_peak_device_memory()
    assert peak_device_memory_bytes("cuda:0") < peak


def test_engine_peak_device_memory_keeps_what_a_load_held_before_the_engine_restarted_the_counter(monkeypatch):
    """The KV sizing restarts torch's peak counter (engine.device.restart_cuda_peak) to
    measure one forward pass; a comparison's peak must still see the load's earlier peak
    (e.g. the float model held while AWQ calibrates). torch.cuda faked: this runs on CPU."""
    import torch

    from engine import device as engine_device
    from engine.api import peak_device_memory_bytes, reset_peak_device_memory

    counter = {"peak": 0}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda index=None: counter["peak"])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda index=None: counter.update(peak=0))
    reset_peak_device_memory()
    counter["peak"] = 16 * 2**30  # calibration holds the float model
    engine_device.restart_cuda_peak(torch.device("cuda", 0))  # the KV sizing's restart
    counter["peak"] = 6 * 2**30  # the quantized model's own peak afterwards
    assert peak_device_memory_bytes("cuda:0") == 16 * 2**30
    reset_peak_device_memory()  # the next configuration starts from nothing
    assert peak_device_memory_bytes("cuda") == 0


@pytest.mark.gpu
def test_engine_peak_device_memory_survives_the_engines_own_restart_on_cuda():
    import torch

    from engine.api import peak_device_memory_bytes, reset_peak_device_memory
    from engine.device import restart_cuda_peak

    torch.zeros(1, device="cuda")
    reset_peak_device_memory()
    block = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    del block
    restart_cuda_peak(torch.device("cuda", 0))
    assert peak_device_memory_bytes("cuda:0") >= 256 * 2**20
