"""An answer cut inside a multi-byte character ends before it, never in U+FFFD.

Engine level, with SmolLM2's real (byte-level BPE) tokenizer: the tiny random model's
sampled tokens are replaced by a script (an emoji split over byte tokens, cut after its
first bytes), so the cut lands mid-character on purpose.
"""

from __future__ import annotations

import pytest

from engine.api import Engine, FinishedEvent, Request, SamplingParams, TokenEvent
from tests.conftest import engine_device

TEXT = "Hi 😀"


@pytest.fixture(scope="module")
def engine(tiny_models):
    # Eager: scripted tokens must be the ones the host decides (CUDA-graph decode would
    # feed the model its own sampled token a step ahead; harmless, but not this test's).
    e = Engine.load(str(tiny_models["llama-tied"]), device=engine_device(), dtype="float32",
                    max_model_len=256, num_blocks=64, enforce_eager=True)
    yield e
    e.shutdown()


def script_output(engine: Engine, ids: list[int]) -> None:
    """Make the next request's sampled tokens ``ids``, in order (the model still runs)."""
    real = engine.runner.execute
    script = iter(ids)

    def execute(out):
        res = real(out)
        res.token_ids = [next(script) for _ in res.token_ids]
        return res

    engine.runner.execute = execute


@pytest.mark.parametrize("ending", ["max_tokens", "stop_token"])
def test_an_answer_cut_mid_character_drops_the_broken_tail(engine, ending):
    ids = engine.tokenizer.encode(TEXT, add_special_tokens=False)
    cut = ids[:-1]  # the emoji's last byte token never comes
    assert engine.tokenizer.decode(cut).endswith("\ufffd")  # what used to reach the user
    if ending == "max_tokens":
        params = SamplingParams(max_tokens=len(cut), temperature=0.0, ignore_eos=True)
        script_output(engine, cut)
    else:
        params = SamplingParams(max_tokens=50, temperature=0.0, stop_token_ids=[2])
        script_output(engine, cut + [2])
    try:
        handle = engine.submit(Request(prompt="Say hi", params=params))
        events = list(handle)
    finally:
        del engine.runner.execute  # the class's own method again
    deltas = [ev.text for ev in events if isinstance(ev, TokenEvent)]
    finished = events[-1]
    assert isinstance(finished, FinishedEvent)
    assert finished.reason == ("length" if ending == "max_tokens" else "stop")
    assert not any("\ufffd" in d for d in deltas)
    assert "".join(deltas) == "Hi "
    assert [t for ev in events[:-1] for t in ev.token_ids][:len(cut)] == cut


def test_a_complete_character_at_the_cut_is_kept(engine):
    ids = engine.tokenizer.encode(TEXT, add_special_tokens=False)
    script_output(engine, ids)
    try:
        params = SamplingParams(max_tokens=len(ids), temperature=0.0, ignore_eos=True)
        result = engine.submit(Request(prompt="Say hi", params=params)).result()
    finally:
        del engine.runner.execute
    assert result.finish_reason == "length" and result.text == TEXT
