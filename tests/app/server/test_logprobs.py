"""logprobs in OpenAI's shapes through the official client: chat (``logprobs`` +
``top_logprobs``) and completions (``logprobs`` = N), streamed and not. Under greedy
decoding the chosen token is the most likely one, every value is <= 0, and a token's
``bytes`` are its text's UTF-8."""

from __future__ import annotations

import math

import pytest

MESSAGES = [{"role": "user", "content": "Tell me a story."}]
GREEDY = {"temperature": 0, "max_tokens": 6, "extra_body": {"ignore_eos": True}}


def check_chat_entries(content, top: int) -> None:
    assert len(content) == 6
    for entry in content:
        assert entry.logprob <= 0 and entry.bytes == list(entry.token.encode("utf-8"))
        assert len(entry.top_logprobs) == top
        best = max(t.logprob for t in entry.top_logprobs)
        assert math.isclose(entry.logprob, best, abs_tol=1e-5)  # greedy: the chosen one is the top
        assert entry.top_logprobs[0].token == entry.token
        assert all(t.logprob <= 0 and t.bytes == list(t.token.encode("utf-8")) for t in entry.top_logprobs)


def test_chat_logprobs_streamed_and_not(client, model_name):
    r = client.chat.completions.create(model=model_name, messages=MESSAGES, logprobs=True, top_logprobs=3, **GREEDY)
    content = r.choices[0].logprobs.content
    check_chat_entries(content, 3)
    chunks = list(client.chat.completions.create(model=model_name, messages=MESSAGES, logprobs=True, top_logprobs=3,
                                                 stream=True, **GREEDY))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, round(e.logprob, 4)) for e in streamed] == [(e.token, round(e.logprob, 4)) for e in content]


def test_chat_logprobs_without_top(client, model_name):
    r = client.chat.completions.create(model=model_name, messages=MESSAGES, logprobs=True, **GREEDY)
    assert all(e.top_logprobs == [] and e.logprob <= 0 for e in r.choices[0].logprobs.content)
    plain = client.chat.completions.create(model=model_name, messages=MESSAGES, **GREEDY)
    assert plain.choices[0].logprobs is None


def test_top_logprobs_0_without_logprobs_asks_for_nothing(client, model_name):
    """(vLLM takes it; a client may always send the field) - no logprobs, not a 400."""
    r = client.chat.completions.create(model=model_name, messages=MESSAGES, top_logprobs=0, **GREEDY)
    assert r.choices[0].logprobs is None


def test_completion_logprobs_streamed_and_not(client, model_name):
    r = client.completions.create(model=model_name, prompt="Once upon a time", logprobs=2, **GREEDY)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert value <= 0 and len(top) <= 2 and math.isclose(value, max(top.values()), abs_tol=1e-5)
        assert top[token] == value
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    chunks = list(client.completions.create(model=model_name, prompt="Once upon a time", logprobs=2, stream=True,
                                            **GREEDY))
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert streamed == lp.tokens


def test_text_offsets_skip_tokens_the_text_leaves_out():
    """A BOS (special: not in the echoed or answered text) takes no room: offsets index the
    text as the client gets it."""
    from app.server.logprobs import Logprobs
    from engine.api import TokenLogprob

    class BosTokenizer:
        special_token_ids = frozenset({0})
        pieces = {0: "<s>", 1: "Once", 2: " upon", 3: " a", 4: " time"}

        def decode(self, ids, skip_special_tokens=True):
            return "".join(self.pieces[i] for i in ids)

    lp = Logprobs(chat=False, tokenizer=BosTokenizer())
    echoed = lp.prompt([0, 1, 2], [TokenLogprob(1, -1.0, 1), TokenLogprob(2, -2.0, 1)])
    assert echoed["tokens"] == ["<s>", "Once", " upon"] and echoed["text_offset"] == [0, 0, 4]
    answer = lp.format([TokenLogprob(3, -0.5, 1), TokenLogprob(4, -0.5, 1)], offset=len("Once upon"))
    assert answer["text_offset"] == [9, 11]


def test_text_offsets_count_a_character_split_between_tokens_once():
    """Byte-level tokens each holding half of a character (their own decoding is U+FFFD): the
    text has the character once, so the offsets after it advance by one, not by two (they ran
    past the end of the text); the echoed prompt's offsets lead into the answer's."""
    from app.server.logprobs import Logprobs
    from engine.api import TokenLogprob

    raw = {0: b"<s>", 1: b"I ", 2: "家".encode()[:2], 3: "家".encode()[2:], 4: b" x", 5: "🍕".encode()[:1],
           6: "🍕".encode()[1:]}

    class ByteTokenizer:
        special_token_ids = frozenset({0})

        def decode(self, ids, skip_special_tokens=True):
            return b"".join(raw[i] for i in ids).decode("utf-8", errors="replace")

        def token_bytes(self, token_id):
            return raw[token_id]

    lp = Logprobs(chat=False, tokenizer=ByteTokenizer())
    answer = lp.format([TokenLogprob(i, -0.5, 1) for i in (2, 3, 4, 5, 6)], offset=10)
    assert answer["tokens"][:2] == ["\ufffd", "\ufffd"]
    assert answer["text_offset"] == [10, 10, 11, 13, 13]  # "家" at 10, " x" at 11, "🍕" at 13
    echoed = lp.prompt([0, 1, 2, 3, 4], [TokenLogprob(i, -1.0, 1) for i in (1, 2, 3, 4)])
    text = ByteTokenizer().decode([1, 2, 3, 4])
    assert echoed["text_offset"] == [0, 0, 2, 2, 3] and len(text) == 5  # "I 家 x"


def test_echo_offsets_of_a_sentencepiece_prompt_index_its_text(tmp_path):
    """A sentencepiece tokenizer ("▁hello" is " hello" as bytes, but the prompt's text starts
    "hello"): each echoed token's offset is where its text starts in the decoded prompt."""
    from app.server.logprobs import Logprobs
    from engine.api import TokenLogprob
    from engine.tokenizer import Tokenizer
    from tests.engine.conftest import build_tiny_tokenizer

    tok = Tokenizer.from_pretrained(build_tiny_tokenizer(tmp_path / "sp"))
    ids = tok.encode("Hello world the café", add_special_tokens=False)
    text = tok.decode(ids)
    assert text == "Hello world the café"
    echoed = Logprobs(chat=False, tokenizer=tok).prompt(ids, [TokenLogprob(i, -1.0, 1) for i in ids[1:]])
    starts = echoed["text_offset"]
    assert starts[0] == 0 and starts == sorted(starts) and starts[-1] < len(text)
    for i, start in enumerate(starts):  # the text up to each token is the decoding of the tokens before it
        assert text[:start] == tok.decode(ids[:i]).lstrip() or text[:start] == tok.decode(ids[:i]), (i, start)


SAMPLED = {"temperature": 1.0, "max_tokens": 8, "seed": 7, "extra_body": {"ignore_eos": True}}


def check_chosen_in_top(lp, top: int, first: int = 0) -> int:
    """Every step (from ``first``) has its chosen token among its top_logprobs, with its own
    value, and at most ``top`` + 1 entries; returns how many steps needed the extra one."""
    extra = 0
    for token, value, best in list(zip(lp.tokens, lp.token_logprobs, lp.top_logprobs))[first:]:
        assert best[token] == pytest.approx(value, abs=1e-6) and top <= len(best) <= top + 1, (token, best)
        extra += len(best) == top + 1
    return extra


def test_completion_top_logprobs_hold_the_sampled_token(client, model_name):
    """OpenAI's legacy rule (vLLM's too): the sampled token is always in its step's
    top_logprobs, so a step may have logprobs + 1 entries. The tiny model's random weights
    make sampling at temperature 1 pick tokens outside the top 1 nearly every step."""
    lp = client.completions.create(model=model_name, prompt="Hello", logprobs=1, **SAMPLED).choices[0].logprobs
    assert check_chosen_in_top(lp, 1) > 0  # some step needed the extra entry: the case is tested
    chunks = list(client.completions.create(model=model_name, prompt="Hello", logprobs=1, stream=True, **SAMPLED))
    streamed = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
    assert [t for s in streamed for t in s.top_logprobs] == lp.top_logprobs  # (seeded: the same tokens)
    only = client.completions.create(model=model_name, prompt="Hello", logprobs=0, **SAMPLED).choices[0].logprobs
    assert [list(t) for t in only.top_logprobs] == [[t] for t in only.tokens]  # logprobs 0: the chosen alone


def test_echoed_prompt_tokens_are_in_their_top_logprobs(client, model_name):
    prompt = "Once upon a time there was"
    lp = client.completions.create(model=model_name, prompt=prompt, echo=True, logprobs=1,
                                   **SAMPLED).choices[0].logprobs
    assert lp.top_logprobs[0] is None  # the first prompt token is not scored
    assert check_chosen_in_top(lp, 1, first=1) > 0
    chunks = list(client.completions.create(model=model_name, prompt=prompt, echo=True, logprobs=1, stream=True,
                                            **SAMPLED))
    streamed = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
    assert [t for s in streamed for t in s.top_logprobs] == lp.top_logprobs
