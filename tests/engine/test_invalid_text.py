"""Issue 12: text that is not valid Unicode (lone surrogates: what Python makes of
undecodable bytes from argv or a terminal) is refused with InvalidRequestError naming the
field and the byte, not a TypeError from inside the tokenizer."""

from __future__ import annotations

import pytest

from engine.api import Engine, InvalidRequestError, Request, SamplingParams
from tests.conftest import engine_device

PARAMS = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
BAD = "hi \udcff there"  # what argv holds for the bytes b"hi \xff there"


@pytest.fixture(scope="module")
def engine(tiny_models):
    e = Engine.load(str(tiny_models["llama-tied"]), device=engine_device(), dtype="float32",
                    max_model_len=128, num_blocks=32)
    yield e
    e.shutdown()


CASES = {
    "prompt": (Request(prompt=BAD, params=PARAMS), "the prompt"),
    "message": (Request(messages=[{"role": "user", "content": "ok"},
                                  {"role": "assistant", "content": "fine"},
                                  {"role": "user", "content": BAD}], params=PARAMS),
                "messages[2].content"),
    "system": (Request(messages=[{"role": "user", "content": "ok"}], system=BAD, params=PARAMS),
               "the system prompt"),
    "stop": (Request(prompt="Hello", params=SamplingParams(max_tokens=2, stop=("\udcff",))),
             "stop string"),
    "json-surrogate": (Request(prompt="a\n\ud800b", params=PARAMS), "U+D800"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_submit_refuses_text_that_is_not_utf8(engine, name):
    request, mention = CASES[name]
    with pytest.raises(InvalidRequestError) as info:
        engine.submit(request)
    msg = str(info.value)
    assert mention in msg and "UTF-8" in msg, msg
    if name != "json-surrogate":
        assert "0xFF" in msg, msg
    else:
        assert "line 2, character 1" in msg, msg
    # the engine is fine afterwards
    assert engine.submit(Request(prompt="Hello", params=PARAMS)).result().completion_tokens == 2


def test_tokenizer_encode_refuses_lone_surrogates(tiny_tok):
    with pytest.raises(InvalidRequestError, match="byte 0xFF at character 4"):
        tiny_tok.encode(BAD)


def test_chat_template_names_the_message_not_the_rendered_prompt(smol_tok):
    """Callers that render before submitting (the chat's history trimming) hear which
    message is bad, not a position in the rendered template."""
    msgs = [{"role": "user", "content": "ok"}, {"role": "user", "content": BAD}]
    with pytest.raises(InvalidRequestError, match=r"messages\[1\]\.content is not valid UTF-8"):
        smol_tok.apply_chat_template(msgs)
    with pytest.raises(InvalidRequestError, match="the system prompt is not valid UTF-8"):
        smol_tok.apply_chat_template(msgs[:1], system=BAD)
