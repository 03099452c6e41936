"""``echo`` on /v1/completions through the official client: each answer begins with its
own prompt, streamed and not; with logprobs it is a clear 400 (the engine does not
score prompt tokens while answering)."""

from __future__ import annotations

import openai
import pytest

GREEDY = {"temperature": 0, "max_tokens": 6}
PROMPT = "Once upon a time"


def test_echo_puts_the_prompt_before_the_answer(client, model_name):
    plain = client.completions.create(model=model_name, prompt=PROMPT, **GREEDY).choices[0].text
    echoed = client.completions.create(model=model_name, prompt=PROMPT, echo=True, **GREEDY)
    assert echoed.choices[0].text == PROMPT + plain
    chunks = list(client.completions.create(model=model_name, prompt=PROMPT, echo=True, stream=True, **GREEDY))
    assert chunks[0].choices[0].text == PROMPT  # the prompt comes first, on its own
    assert "".join(c.choices[0].text for c in chunks) == PROMPT + plain


def test_echo_of_several_prompts_and_token_ids(client, model_name, host):
    prompts = ["The sky", "A cat"]
    r = client.completions.create(model=model_name, prompt=prompts, n=2, echo=True, **GREEDY)
    assert [c.text.startswith(prompts[c.index // 2]) for c in r.choices] == [True] * 4
    ids = host.engine.tokenizer.encode("Hello there", add_special_tokens=False)
    r = client.completions.create(model=model_name, prompt=ids, echo=True, **GREEDY)
    assert r.choices[0].text.startswith(host.engine.tokenizer.decode(ids))
    chunks = list(client.completions.create(model=model_name, prompt=prompts, echo=True, stream=True, **GREEDY))
    for i, prompt in enumerate(prompts):
        assert "".join(c.choices[0].text for c in chunks if c.choices[0].index == i).startswith(prompt)


def test_echo_with_logprobs_is_a_400(client, model_name):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model_name, prompt=PROMPT, echo=True, logprobs=1, **GREEDY)
    assert e.value.body["param"] == "echo" and "logprobs" in e.value.body["message"]
