"""The official ``openai`` client against a live Hearth server (tiny model, CPU): chat and
completions, streamed and not, include_usage, stop, seeds, n > 1, Hearth's timings."""

from __future__ import annotations

import pytest

MESSAGES = [{"role": "user", "content": "Tell me a story."}]
GREEDY = {"temperature": 0, "max_tokens": 8}


def test_models_lists_the_loaded_model(client, model_name, host):
    models = client.models.list().data
    assert [m.id for m in models] == [model_name]
    assert models[0].model_extra["max_model_len"] == host.model_info.max_model_len


def test_chat_completion(client, model_name):
    r = client.chat.completions.create(model=model_name, messages=MESSAGES, **GREEDY)
    assert r.object == "chat.completion" and r.model == model_name
    (choice,) = r.choices
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 8 and r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.usage.prompt_tokens_details.cached_tokens >= 0
    hearth = r.model_extra["hearth"]
    assert hearth["ttft_ms"] > 0 and hearth["tokens_per_s"] >= 0


def test_chat_stream_matches_the_whole_answer_and_ends_with_usage(client, model_name):
    whole = client.chat.completions.create(model=model_name, messages=MESSAGES, **GREEDY)
    chunks = list(client.chat.completions.create(model=model_name, messages=MESSAGES, stream=True,
                                                 stream_options={"include_usage": True}, **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == whole.usage.completion_tokens
    assert last.usage.prompt_tokens == whole.usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])
    assert last.model_extra["hearth"]["ttft_ms"] > 0


def test_stream_without_include_usage_has_no_usage_chunk(client, model_name):
    chunks = list(client.chat.completions.create(model=model_name, messages=MESSAGES, stream=True, **GREEDY))
    assert all(c.choices for c in chunks) and all(getattr(c, "usage", None) is None for c in chunks)


def test_completions_streamed_and_not(client, model_name):
    r = client.completions.create(model=model_name, prompt="Once upon a time", **GREEDY)
    assert r.object == "text_completion" and r.choices[0].text and r.usage.completion_tokens <= 8
    chunks = list(client.completions.create(model=model_name, prompt="Once upon a time", stream=True,
                                            stream_options={"include_usage": True}, **GREEDY))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_completions_default_max_tokens_is_openais_16(client, model_name):
    r = client.completions.create(model=model_name, prompt="Once upon a time", temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens <= 16


def test_max_completion_tokens(client, model_name):
    r = client.chat.completions.create(model=model_name, messages=MESSAGES, temperature=0, max_completion_tokens=3)
    assert r.usage.completion_tokens <= 3


def test_stop_string_ends_the_answer_without_it(client, model_name):
    free = client.completions.create(model=model_name, prompt="Once upon a time", temperature=0, max_tokens=12)
    text = free.choices[0].text
    stop = text[len(text) // 2:][:3]
    assert stop.strip(), f"need some text to stop at: {text!r}"
    for given in (stop, [stop, "zzzz-never"]):
        r = client.completions.create(model=model_name, prompt="Once upon a time", temperature=0, max_tokens=12,
                                      stop=given)
        assert r.choices[0].finish_reason == "stop"
        assert r.choices[0].text == text[:text.index(stop)]


def test_seed_gives_the_same_answer_again(client, model_name):
    def ask(seed):
        return client.chat.completions.create(model=model_name, messages=MESSAGES, temperature=1.0,
                                              max_tokens=10, seed=seed).choices[0].message.content

    assert ask(1234) == ask(1234)
    assert len({ask(s) for s in (1, 2, 3)}) > 1  # random weights, high temperature: seeds differ


def test_n_two_gives_two_choices_and_counts_the_prompt_once(client, model_name):
    one = client.chat.completions.create(model=model_name, messages=MESSAGES, temperature=1.0, max_tokens=6,
                                         seed=7)
    r = client.chat.completions.create(model=model_name, messages=MESSAGES, temperature=1.0, max_tokens=6,
                                       seed=7, n=2)
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[0].message.content == one.choices[0].message.content  # choice 0 uses the seed itself
    assert r.usage.prompt_tokens == one.usage.prompt_tokens
    assert len(r.model_extra["hearth"]["choices"]) == 2
    chunks = list(client.chat.completions.create(model=model_name, messages=MESSAGES, temperature=1.0,
                                                 max_tokens=6, seed=7, n=2, stream=True))
    for i, choice in enumerate(r.choices):
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices[0].index == i)
        assert streamed == choice.message.content


def test_sampling_parameters_are_taken(client, model_name):
    r = client.chat.completions.create(model=model_name, messages=MESSAGES, max_tokens=4, temperature=0.7,
                                       top_p=0.9, presence_penalty=0.5, frequency_penalty=0.5, user="u1",
                                       extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1})
    assert r.choices[0].message.content is not None


def test_omitted_model_means_the_loaded_one(live, model_name):
    import httpx

    from tests.app.server.conftest import API_KEY

    r = httpx.post(f"{live.base_url}/v1/chat/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                   json={"messages": MESSAGES, "max_tokens": 2})
    assert r.status_code == 200 and r.json()["model"] == model_name
