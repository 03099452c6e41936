"""``Request(fit_context=True)``: a conversation longer than the context loses its oldest
turns inside the engine (the rule ``hearth chat``, the desktop app and the server share),
the system prompt and the last message are kept, and a last message that can't fit even
alone is refused with the message that says how long it is and what the limit is."""

from __future__ import annotations

import pytest

from engine.api import Engine, InvalidRequestError, Request, SamplingParams

PARAMS = SamplingParams(max_tokens=8, temperature=0.0)
TURN = "alpha beta gamma delta epsilon"


@pytest.fixture(scope="module")
def engine(tiny_models):
    eng = Engine.load(str(tiny_models["llama-tied"]), device="cpu", dtype="float32", max_model_len=96,
                      num_blocks=16)
    yield eng
    eng.shutdown()


def conversation(turns: int = 6) -> list[dict]:
    history = []
    for i in range(turns):
        history += [{"role": "user", "content": f"{i} {TURN}"}, {"role": "assistant", "content": f"answer {i}"}]
    return history + [{"role": "user", "content": "last"}]


def prompt_tokens(engine, messages, system=None) -> int:
    return len(engine.tokenizer.apply_chat_template(messages, system=system))


def fit(engine, messages, system=None):
    """(the handle's dropped_messages, the prompt tokens the model read)."""
    handle = engine.submit(Request(messages=messages, system=system, params=PARAMS, fit_context=True))
    return handle.dropped_messages, handle.result().prompt_tokens


def test_a_conversation_that_fits_is_sent_whole(engine):
    history = conversation()[:3]
    assert fit(engine, history) == (0, prompt_tokens(engine, history))


def test_the_oldest_turns_go_until_the_prompt_leaves_room_for_an_answer(engine):
    history = conversation()
    before = [dict(m) for m in history]
    assert prompt_tokens(engine, history) + 8 > 96  # too long whole
    dropped, read = fit(engine, history)
    assert dropped > 0 and dropped % 2 == 0  # whole turns: a question and its answer
    kept = history[dropped:]
    assert read == prompt_tokens(engine, kept) and read + 8 <= 96
    assert prompt_tokens(engine, history[dropped - 2:]) + 8 > 96  # no more than needed went
    assert kept[-1]["content"] == "last" and history == before  # the caller's list is left alone
    # Off (the default), the same conversation is refused as too long for the context.
    with pytest.raises(InvalidRequestError, match="context holds 96"):
        engine.submit(Request(messages=history, params=PARAMS))


def test_the_system_prompt_is_kept_given_apart_or_as_the_first_message(engine):
    history = conversation()
    dropped, read = fit(engine, history, system="Be brief.")
    assert dropped > 0 and read == prompt_tokens(engine, history[dropped:], system="Be brief.")
    system = {"role": "system", "content": "Be brief."}
    dropped_too, read_too = fit(engine, [system, *history])
    assert (dropped_too, read_too) == (dropped, prompt_tokens(engine, [system, *history[dropped:]]))


def test_a_last_message_too_long_even_alone_is_refused_with_how_long_it_is(engine):
    too_long = conversation() + [{"role": "user", "content": "word " * 100}]
    with pytest.raises(InvalidRequestError, match=r"this message is \d+ tokens long") as info:
        engine.submit(Request(messages=too_long, system="Be brief.", params=PARAMS, fit_context=True))
    assert "system prompt" in str(info.value) and "context holds 96" in str(info.value)
    assert info.value.options == ("max_model_len",)
    with pytest.raises(InvalidRequestError, match="shorten the system prompt"):
        engine.submit(Request(messages=[{"role": "user", "content": "last"}], system="Be brief. " * 60,
                              params=PARAMS, fit_context=True))
    assert engine.stats().num_waiting == 0  # nothing was queued for either


def test_fit_context_is_for_conversations(engine):
    with pytest.raises(InvalidRequestError, match="give messages"):
        engine.submit(Request(prompt="Hello", params=PARAMS, fit_context=True))


def test_a_context_the_template_alone_fills_says_so_in_a_sentence():
    """(it said "the chat template take 30 of the context's 40 tokens")"""
    from engine.context_fit import fit_messages

    def render(messages):  # a 30-token template around each message's words
        return [0] * (30 + sum(len(str(m.get("content", "")).split()) for m in messages))

    message = [{"role": "user", "content": "Hi"}]
    with pytest.raises(InvalidRequestError) as e:
        fit_messages(render, message, system=None, max_tokens=256, max_model_len=40)
    assert str(e.value).startswith("the chat template takes 30 of the context's 40 tokens, leaving no room "
                                   "for a message and a 64-token answer"), str(e.value)
    with pytest.raises(InvalidRequestError, match="^the chat template and the system prompt take 30 of"):
        fit_messages(render, message, system="Be brief.", max_tokens=256, max_model_len=40)
