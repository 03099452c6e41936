"""A side-by-side comparison (``ComparePlan.side_by_side``) of the tiny model on the CPU: the
groups decided before loading, answers streaming together, the same tokens as one after
another, a group that doesn't fit, a load that fails inside a group, and a cancel that
shuts the whole group down."""

from __future__ import annotations

import threading
from dataclasses import replace

import pytest

from app.services import compare_fit
from app.services.compare import run_comparison
from app.services.compare_events import (ConfigFinished, ConfigProgress, ConfigStarted, PromptFinished, RunFinished,
                                         SideBySidePlanned, TokenDelta)
from app.services.compare_fit import arrange
from app.services.compare_results import ConfigResult
from engine.api import InvalidRequestError, ModelCheck, OutOfMemoryError
from tests.app.services.test_compare_run import engines, fail_quant, tiny, tiny_plan  # noqa: F401 (fixtures)

GIB = 2**30


def sized_by_quant(monkeypatch, gib_by_quant: dict[str, float], free_gib: float = 10.0, device: str = "cpu"):
    """check_model says each quantization needs ``gib_by_quant[q]`` GiB (weights, no KV
    cache) of ``free_gib`` free; a quantization not listed is refused."""
    def fake(config):
        q = config.model.quantization
        if q not in gib_by_quant:
            raise InvalidRequestError(f"{q} can't be used here (test)")
        return ModelCheck("tiny", device, int(gib_by_quant[q] * GIB), 0, int(free_gib * GIB), True)

    monkeypatch.setattr(compare_fit, "check_model", fake)
    return fake


# -- the groups ------------------------------------------------------------------------
def test_groups_are_greedy_in_plan_order_with_a_headroom_per_engine(tiny, monkeypatch):
    # 10 GiB free: each engine also reserves max(512 MiB, 5% of free) = 512 MiB
    fake = sized_by_quant(monkeypatch, {"bf16": 4.0, "int8": 4.0, "int4": 1.0})
    plan = tiny_plan(tiny, "bf16", "int8", "int4", side_by_side=True).checked()
    got = arrange(plan, check=fake)
    assert got.groups == ((0, 1), (2,))  # 4.5 + 4.5 fit; + 1.5 would be 10.5
    assert len(got.notes) == 1 and got.notes[0].startswith("int4 does not fit beside bf16 and int8")
    # without the headroom all three would have fitted (9 GiB of 10): the margin decided;
    # a smaller int4 fits with it (4.5 + 4.5 + 1.0)
    fake = sized_by_quant(monkeypatch, {"bf16": 4.0, "int8": 4.0, "int4": 0.5})
    assert arrange(plan, check=fake) == compare_fit.Arrangement(((0, 1, 2),))


def test_a_configuration_the_check_refuses_runs_alone_and_the_others_still_group(tiny, monkeypatch):
    fake = sized_by_quant(monkeypatch, {"bf16": 1.0, "int4": 1.0})
    plan = tiny_plan(tiny, "bf16", "int8", "int4", side_by_side=True).checked()
    got = arrange(plan, check=fake)
    assert got.groups == ((0,), (1,), (2,))  # groups are neighbours in plan order: int4 doesn't join bf16
    assert got.notes == ("int8 runs alone: int8 can't be used here (test)",)


def test_a_gpu_pool_that_takes_the_rest_of_the_card_never_shares_it(tiny, monkeypatch):
    fake = sized_by_quant(monkeypatch, {"bf16": 1.0, "int8": 1.0}, free_gib=80, device="cuda:0")
    one_seq = tiny_plan(tiny, "bf16", "int8", side_by_side=True).checked()
    assert arrange(one_seq, check=fake).groups == ((0, 1),)  # one sequence: the pool is one context
    many = replace(one_seq, load_options={"max_num_seqs": 4})
    got = arrange(many, check=fake)
    assert got.groups == ((0,), (1,)) and "takes what the GPU has left" in got.notes[0]


def test_the_plan_option_round_trips_and_is_checked(tiny):
    from app.services.compare_plan import ComparePlan

    plan = tiny_plan(tiny, "int8", "int4", side_by_side=True)
    assert ComparePlan.from_dict(plan.to_dict()).side_by_side is True
    assert tiny_plan(tiny, "int8").side_by_side is False  # off by default
    with pytest.raises(InvalidRequestError, match="side_by_side must be true or false"):
        replace(plan, side_by_side="yes").checked()


# -- running ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def together(tiny):
    """bf16 and int8 side by side, with the events, and the same plan one after another."""
    events = []
    sbs = run_comparison(tiny_plan(tiny, "bf16", "int8", max_tokens=24, side_by_side=True), on_event=events.append)
    alone = run_comparison(tiny_plan(tiny, "bf16", "int8", max_tokens=24))
    return sbs, events, alone


def test_two_configurations_side_by_side_both_answer_together(together):
    result, events, _ = together
    assert isinstance(events[0], SideBySidePlanned) and events[0].groups == ((0, 1),)
    assert isinstance(events[-1], RunFinished) and not result.cancelled
    assert [r.status for r in result.results] == ["ok", "ok"]
    kinds = [(type(e).__name__, getattr(e, "index", None)) for e in events]
    # both started (loaded) before either finished
    assert max(kinds.index(("ConfigStarted", i)) for i in (0, 1)) < min(kinds.index(("ConfigFinished", i))
                                                                          for i in (0, 1))
    for p in range(2):
        # every token of both answers to prompt p streams before either is done with it:
        # one after another, configuration 0 finished prompt p before 1 had a token
        streamed = [n for n, e in enumerate(events) if isinstance(e, TokenDelta) and e.prompt_index == p]
        done = [n for n, e in enumerate(events) if isinstance(e, PromptFinished) and e.prompt_index == p]
        assert {events[n].index for n in streamed} == {0, 1} and max(streamed) < min(done)
        for i in (0, 1):
            text = "".join(events[n].text for n in streamed if events[n].index == i)
            assert text == result.results[i].prompts[p].text


def test_side_by_side_gives_the_same_tokens_and_says_it_shared_the_device(together):
    result, _, alone = together
    for sbs, seq in zip(result.results, alone.results):
        assert [p.token_ids for p in sbs.prompts] == [p.token_ids for p in seq.prompts]  # greedy: the same
        assert sbs.perplexity == pytest.approx(seq.perplexity, rel=1e-5)
        assert sbs.agreement == seq.agreement and sbs.weight_bytes == seq.weight_bytes
        assert sbs.kv_bytes == seq.kv_bytes  # the KV pool beside the other is the one it gets alone
        assert not seq.side_by_side and seq.row()["ran_with"] == [] and seq.row()["side_by_side"] is False
    bf16, int8 = result.results
    assert bf16.ran_with == [1] and int8.ran_with == [0] and bf16.is_reference and bf16.agreement == 1.0
    row = int8.row()
    assert row["side_by_side"] is True and row["ran_with"] == [0]
    assert ConfigResult.from_row(row).ran_with == [0]  # a saved comparison reopens with it
    assert bf16.peak_vram_bytes == int8.peak_vram_bytes  # the group's peak, said so
    assert int8.peak_memory_source.endswith("the side-by-side group's peak")
    assert int8.ttft_ms > 0 and int8.decode_tok_s > 0 and int8.load_s > 0


def test_a_group_that_does_not_fit_runs_one_after_another(tiny, monkeypatch, engines):
    loaded, shut = engines
    sized_by_quant(monkeypatch, {"bf16": 6.0, "int8": 6.0})
    events = []
    result = run_comparison(tiny_plan(tiny, "bf16", "int8", perplexity=False, side_by_side=True),
                            on_event=events.append)
    assert events[0].groups == ((0,), (1,)) and "int8 does not fit beside bf16" in events[0].notes[0]
    assert [r.status for r in result.results] == ["ok", "ok"]
    assert all(not r.side_by_side for r in result.results)
    kinds = [(type(e).__name__, getattr(e, "index", None)) for e in events]
    assert kinds.index(("ConfigFinished", 0)) < kinds.index(("ConfigStarted", 1))  # unloaded before the next
    assert "group" not in result.results[0].peak_memory_source
    assert len(loaded) == 2 and shut == loaded


def test_a_configuration_that_fails_to_load_in_a_group_and_the_others_go_on(tiny, monkeypatch, engines):
    loaded, shut = engines
    fail_quant(monkeypatch, "int8", RuntimeError("boom"))
    result = run_comparison(tiny_plan(tiny, "bf16", "int8", "int4", perplexity=False, side_by_side=True))
    assert [r.status for r in result.results] == ["ok", "error", "ok"]
    assert result.results[1].error == "unexpected error (RuntimeError): boom"
    assert result.results[0].ran_with == [2] and result.results[2].ran_with == [0]
    assert result.results[2].agreement is not None and len(result.results[2].prompts) == 2
    assert shut == loaded  # every engine that loaded was shut down


def test_out_of_memory_beside_the_others_loads_again_alone_after_them(tiny, monkeypatch, engines):
    from engine.api import Engine

    loaded, shut = engines

    patched = Engine.from_config.__func__
    attempts = []

    def from_config(cls, config, **kw):  # int8 runs out of memory while bf16 is loaded, not alone
        if config.model.quantization == "int8":
            attempts.append(len(loaded) - len(shut))
            if len(loaded) > len(shut):
                raise OutOfMemoryError("out of memory for the KV cache (test)")
        return patched(cls, config, **kw)

    monkeypatch.setattr(Engine, "from_config", classmethod(from_config))
    events = []
    result = run_comparison(tiny_plan(tiny, "bf16", "int8", perplexity=False, side_by_side=True),
                            on_event=events.append)
    assert [r.status for r in result.results] == ["ok", "ok"] and attempts == [1, 0]
    assert result.results[0].ran_with == [] and result.results[1].ran_with == []  # nobody ran beside bf16
    assert any(isinstance(e, ConfigProgress) and e.index == 1 and "loads again alone" in e.message for e in events)
    assert [e.index for e in events if isinstance(e, ConfigStarted)] == [0, 1, 1]
    assert [e.index for e in events if isinstance(e, ConfigFinished)] == [0, 1]
    assert result.results[1].agreement is not None and shut == loaded


def test_cancel_mid_run_shuts_down_every_engine_of_the_group(tiny, engines):
    loaded, shut = engines
    cancel = threading.Event()
    events = []

    def on_event(ev):
        events.append(ev)
        if isinstance(ev, TokenDelta) and ev.index == 1:
            cancel.set()  # both loaded, answering the first prompt

    result = run_comparison(tiny_plan(tiny, "bf16", "int8", max_tokens=200, side_by_side=True), on_event=on_event,
                            cancel=cancel)
    assert [r.status for r in result.results] == ["cancelled", "cancelled"] and result.cancelled
    assert all(r.error == "cancelled" and r.prompts[0].finish_reason == "abort" for r in result.results)
    assert isinstance(events[-1], RunFinished) and events[-1].cancelled
    assert len(loaded) == 2 and shut == loaded  # both engines shut down


def test_cancel_in_a_later_group_keeps_the_finished_group(tiny, monkeypatch, engines):
    loaded, shut = engines
    sized_by_quant(monkeypatch, {"bf16": 4.0, "int8": 4.0, "int4": 4.0})  # (0, 1) then (2,)
    cancel = threading.Event()

    def on_event(ev):
        if isinstance(ev, ConfigStarted) and ev.index == 2:
            cancel.set()

    result = run_comparison(tiny_plan(tiny, "bf16", "int8", "int4", perplexity=False, side_by_side=True),
                            on_event=on_event, cancel=cancel)
    assert [r.status for r in result.results] == ["ok", "ok", "cancelled"]
    assert result.results[1].ran_with == [0] and result.results[1].agreement is not None
    assert shut == loaded and len(loaded) == 2
