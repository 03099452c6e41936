"""``Engine.add_step_listener``: the supported way to watch engine steps (how ``hearth
bench`` times batch decode and samples KV-cache use, instead of patching the scheduler)."""

from __future__ import annotations

import logging

import pytest

from engine.api import Engine, Request, SamplingParams, StepInfo


@pytest.fixture(scope="module")
def engine():
    eng = Engine.load("shape:tiny", device="cpu", max_model_len=64, block_size=16)
    yield eng
    eng.shutdown()


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0, ignore_eos=True, max_tokens=max_tokens)


def test_listeners_hear_every_step_until_removed(engine):
    heard, also = [], []
    engine.add_step_listener(heard.append)
    engine.add_step_listener(also.append)
    engine.generate([Request(prompt_token_ids=list(range(10, 30)), params=greedy(4)),
                     Request(prompt_token_ids=list(range(40, 45)), params=greedy(2))])
    engine.remove_step_listener(heard.append)  # the same bound method: this registration goes
    assert heard == also and all(isinstance(s, StepInfo) for s in heard)
    # Every sampled token is counted once: one first token per request, then the later ones.
    assert sum(s.first_tokens for s in heard) == 2
    assert sum(s.later_tokens for s in heard) == (4 - 1) + (2 - 1)
    assert [s.finished_at for s in heard] == sorted(s.finished_at for s in heard)
    assert all(0 < s.kv_slots_used <= s.kv_slots_allocated for s in heard)
    steps = len(heard)
    engine.generate([Request(prompt_token_ids=[1, 2, 3], params=greedy(2))])
    assert len(heard) == steps and len(also) == steps + 2  # removed one hears no more
    engine.remove_step_listener(also.append)
    engine.remove_step_listener(also.append)  # never registered (any more): nothing happens


def test_a_listener_that_raises_is_dropped_and_the_engine_goes_on(engine, caplog):
    calls = []

    def broken(info: StepInfo) -> None:
        calls.append(info)
        raise RuntimeError("listener bug")

    engine.add_step_listener(broken)
    with caplog.at_level(logging.ERROR, logger="hearth.engine"):
        (done,) = engine.generate([Request(prompt_token_ids=[5, 6, 7], params=greedy(3))])
    assert (done.finish_reason, done.completion_tokens, done.error) == ("length", 3, None)
    assert len(calls) == 1  # called once, then no longer
    assert "step listener failed" in caplog.text
