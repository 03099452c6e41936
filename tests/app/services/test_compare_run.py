"""``run_comparison`` on a tiny random model on the CPU: the measurements, the events, a
configuration that fails while the others complete, and a cancel mid-run."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from app.services.compare import CompareConfig, ComparePlan, run_comparison
from app.services.compare_events import (ConfigFinished, ConfigProgress, ConfigStarted, PromptFinished, RunFinished,
                                         TokenDelta)
from engine.api import Engine, OutOfMemoryError

PROMPTS = ("Once upon a time", "The capital of France is")


@pytest.fixture(scope="module")
def tiny(tiny_models) -> Path:
    return tiny_models["llama-tied"]


def tiny_plan(tiny, *quants, **kw) -> ComparePlan:
    kw.setdefault("prompts", PROMPTS)
    kw.setdefault("max_tokens", 6)
    kw.setdefault("eval_tokens", 48)
    return ComparePlan(configs=tuple(CompareConfig(q) for q in quants), model=str(tiny), device="cpu", **kw)


@pytest.fixture
def engines(monkeypatch):
    """Every engine the comparison loads, and how often each was shut down."""
    loaded: list[Engine] = []
    shut: list[Engine] = []
    real_load, real_shutdown = Engine.from_config.__func__, Engine.shutdown

    def from_config(cls, config, **kw):
        engine = real_load(cls, config, **kw)
        loaded.append(engine)
        return engine

    def shutdown(self):
        shut.append(self)
        real_shutdown(self)

    monkeypatch.setattr(Engine, "from_config", classmethod(from_config))
    monkeypatch.setattr(Engine, "shutdown", shutdown)
    return loaded, shut


def fail_quant(monkeypatch, quant: str, error: Exception) -> None:
    """Loading configuration ``quant`` raises ``error`` (as an out-of-memory load would)."""
    real = Engine.from_config.__func__

    def from_config(cls, config, **kw):
        if config.model.quantization == quant:
            raise error
        return real(cls, config, **kw)

    monkeypatch.setattr(Engine, "from_config", classmethod(from_config))


@pytest.fixture(scope="module")
def finished(tiny):
    """One comparison of three configurations, with the events it sent."""
    events = []
    result = run_comparison(tiny_plan(tiny, "bf16", "int8", "int4"), on_event=events.append)
    return result, events


def test_each_configuration_is_measured(finished):
    result, _ = finished
    assert [r.status for r in result.results] == ["ok", "ok", "ok"]
    assert result.reference_index == 0 and not result.cancelled
    for r in result.results:
        assert r.error is None
        assert len(r.prompts) == len(PROMPTS) and all(p.complete for p in r.prompts)
        assert r.ttft_ms > 0 and r.decode_tok_s > 0 and r.load_s > 0
        assert r.kv_bytes > 0 and r.peak_vram_bytes > r.weight_bytes
        assert r.peak_memory_source
        assert r.perplexity > 1 and r.perplexity_tokens == 48
        assert 0.0 <= r.prefix_agreement <= r.agreement <= 1.0
        assert r.output == r.prompts[0].text and r.outputs == [p.text for p in r.prompts]
        assert r.device == "cpu" and r.quant_used == r.config.quant
    bf16, int8, int4 = result.results
    assert bf16.weight_bytes > int8.weight_bytes > int4.weight_bytes
    assert bf16.is_reference and bf16.agreement == bf16.prefix_agreement == 1.0
    # the means are over the prompts
    assert int8.ttft_ms == pytest.approx(sum(p.ttft_ms for p in int8.prompts) / len(PROMPTS))


def test_events_arrive_in_order_for_each_configuration(finished):
    result, events = finished
    assert isinstance(events[-1], RunFinished) and events[-1].result is result and not events[-1].cancelled
    for i in range(3):
        mine = [e for e in events if getattr(e, "index", None) == i]
        assert isinstance(mine[0], ConfigStarted) and mine[0].total == 3
        assert isinstance(mine[-1], ConfigFinished) and mine[-1].result is result.results[i]
        assert any(isinstance(e, ConfigProgress) and e.stage == "load" for e in mine)
        assert any(isinstance(e, ConfigProgress) and e.stage == "perplexity" for e in mine)
        for p in range(len(PROMPTS)):
            streamed = "".join(e.text for e in mine if isinstance(e, TokenDelta) and e.prompt_index == p)
            assert streamed == result.results[i].prompts[p].text
            done = [e for e in mine if isinstance(e, PromptFinished) and e.prompt_index == p]
            assert len(done) == 1
    # a prompt's agreement is known when it finishes, once a reference has run
    later = [e for e in events if isinstance(e, PromptFinished) and e.index > 0]
    assert all(e.result.agreement is not None for e in later)
    # an event's objects are never changed once sent (another thread may hold them): the
    # reference's prompts had no reference yet when they finished; its final result has 1.0
    first = [e.result for e in events if isinstance(e, PromptFinished) and e.index == 0]
    assert all(r.agreement is None for r in first)
    assert all(p.agreement == 1.0 for p in result.results[0].prompts)


def test_a_configuration_that_fails_shows_why_and_the_others_complete(tiny, monkeypatch, engines):
    loaded, shut = engines
    fail_quant(monkeypatch, "int8", OutOfMemoryError("not enough memory for the weights: 9 GiB needed, 2 free"))
    result = run_comparison(tiny_plan(tiny, "bf16", "int8", "int4", perplexity=False))
    assert [r.status for r in result.results] == ["ok", "error", "ok"]
    failed = result.results[1]
    assert failed.error == "not enough memory for the weights: 9 GiB needed, 2 free"
    assert failed.agreement is None and failed.weight_bytes is None and failed.prompts == []
    assert failed.row()["error"] == failed.error and result.results[2].row()["error"] is None
    assert result.results[2].agreement is not None and result.results[2].perplexity is None
    assert len(loaded) == 2 and shut == loaded  # every engine that loaded was shut down


def test_when_the_first_configuration_fails_the_next_that_runs_is_the_reference(tiny, monkeypatch):
    fail_quant(monkeypatch, "bf16", RuntimeError("boom"))
    result = run_comparison(tiny_plan(tiny, "bf16", "int8", "int4", perplexity=False))
    first = result.results[0]
    assert first.status == "error" and first.error == "unexpected error (RuntimeError): boom"
    assert result.reference_index == 1 and result.results[1].is_reference
    assert result.results[1].agreement == 1.0 and 0 <= result.results[2].agreement <= 1


def test_a_choice_not_available_here_fails_alone(tiny):
    from engine.api import get_choice

    if get_choice("quantization", "fp8", "cpu").available:
        pytest.skip("fp8 weights run on the CPU now: no unavailable quantization to try")
    result = run_comparison(tiny_plan(tiny, "fp8", "int8", perplexity=False, prompts=PROMPTS[:1]))
    assert result.results[0].status == "error" and "can't be used here" in result.results[0].error
    assert result.results[1].ok and result.reference_index == 1
    # it never loaded: no peak memory of its own (the process's was shown beside the error)
    assert result.results[0].peak_vram_bytes is None and result.results[0].peak_memory_source is None
    assert result.results[1].peak_vram_bytes > 0


def test_a_prompt_too_long_for_the_context_fails_alone(tiny):
    result = run_comparison(tiny_plan(tiny, "int8", perplexity=False, prompts=("word " * 600, "Hello")))
    (r,) = result.results
    assert r.ok and r.prompts[0].error and "context" in r.prompts[0].error
    assert r.prompts[1].complete and r.agreement == 1.0  # over the prompt that ran


def test_cancel_mid_run_keeps_the_finished_and_marks_the_rest(tiny, engines):
    loaded, shut = engines
    cancel = threading.Event()
    events = []

    def on_event(ev):
        events.append(ev)
        if isinstance(ev, TokenDelta) and ev.index == 1:
            cancel.set()  # the second configuration's first token

    result = run_comparison(tiny_plan(tiny, "bf16", "int8", "int4", max_tokens=200), on_event=on_event, cancel=cancel)
    assert [r.status for r in result.results] == ["ok", "cancelled", "cancelled"]
    assert result.cancelled and isinstance(events[-1], RunFinished) and events[-1].cancelled
    assert result.results[0].prompts and result.results[0].perplexity is not None  # kept
    partial = result.results[1]
    assert partial.error == "cancelled" and len(partial.prompts) == 1
    assert partial.prompts[0].finish_reason == "abort" and 1 <= partial.prompts[0].output_tokens < 200
    assert result.results[2].error == "cancelled before it ran"
    assert [e.index for e in events if isinstance(e, ConfigFinished)] == [0, 1, 2]
    assert not any(isinstance(e, ConfigStarted) and e.index == 2 for e in events)
    assert len(loaded) == 2 and shut == loaded  # the engine in flight was shut down


def test_cancel_takes_a_callable_and_stops_before_anything_loads(tiny, engines):
    loaded, _ = engines
    result = run_comparison(tiny_plan(tiny, "int8", "int4"), cancel=lambda: True)
    assert [r.error for r in result.results] == ["cancelled before it ran"] * 2 and not loaded


def test_an_exception_in_on_event_stops_the_run_and_is_raised(tiny, engines):
    loaded, shut = engines

    def on_event(ev):
        if isinstance(ev, PromptFinished):
            raise ValueError("a bug in the page")

    with pytest.raises(ValueError, match="a bug in the page"):
        run_comparison(tiny_plan(tiny, "int8", "int4"), on_event=on_event)
    assert len(loaded) == 1 and shut == loaded


def test_one_after_another_each_is_unloaded_and_its_memory_given_back_before_the_next_loads(tiny, monkeypatch):
    """The sequential run: load, measure, shut down, release memory, then the next load:
    two configurations are never in memory at once (side by side is opt-in)."""
    import app.services.compare as compare

    log: list[str] = []
    real_load, real_shutdown = Engine.from_config.__func__, Engine.shutdown
    real_release = compare.release_memory

    def from_config(cls, config, **kw):
        log.append(f"load {config.model.quantization}")
        return real_load(cls, config, **kw)

    def shutdown(self):
        log.append("shutdown")
        real_shutdown(self)

    def release(**kw):
        log.append("release")
        real_release(**kw)

    monkeypatch.setattr(Engine, "from_config", classmethod(from_config))
    monkeypatch.setattr(Engine, "shutdown", shutdown)
    monkeypatch.setattr(compare, "release_memory", release)
    result = run_comparison(tiny_plan(tiny, "bf16", "int8", "int4", perplexity=False))
    assert [r.status for r in result.results] == ["ok"] * 3
    assert log == ["load bf16", "shutdown", "release", "load int8", "shutdown", "release",
                   "load int4", "shutdown", "release"]
