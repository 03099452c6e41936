"""``echo`` on /v1/completions through the official client: each answer begins with its
own prompt, streamed and not; with logprobs, the prompt's tokens are scored too."""

from __future__ import annotations

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


def test_echo_with_logprobs_scores_the_prompt(client, model_name, host, tiny_models):
    """The prompt's tokens come first in logprobs (the first unscored, as OpenAI gives it),
    their values equal transformers' log-softmax on the same weights; the answer's follow,
    as they are without echo; the offsets index the echoed text."""
    import torch
    from transformers import AutoModelForCausalLM

    ids = host.engine.tokenizer.encode(PROMPT)
    plain = client.completions.create(model=model_name, prompt=PROMPT, logprobs=2, **GREEDY).choices[0]
    r = client.completions.create(model=model_name, prompt=PROMPT, echo=True, logprobs=2, **GREEDY).choices[0]
    lp = r.logprobs
    n = len(ids)
    assert r.text == PROMPT + plain.text
    assert lp.tokens == [host.engine.tokenizer.decode([t]) for t in ids] + plain.logprobs.tokens
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[n:] == pytest.approx(plain.logprobs.token_logprobs, abs=1e-5)
    assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(len(lp.tokens))]
    assert "".join(lp.tokens) == r.text
    model = AutoModelForCausalLM.from_pretrained(str(tiny_models["llama-tied"]), dtype=torch.float32).eval()
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].double(), dim=-1)
    assert lp.token_logprobs[1:n] == pytest.approx([float(ref[k, ids[k + 1]]) for k in range(n - 1)], abs=1e-4)
    for k in range(1, n):
        # the two most likely, and the prompt's own token when it is not one of them
        assert len(lp.top_logprobs[k]) in (2, 3) and max(lp.top_logprobs[k].values()) == pytest.approx(
            float(ref[k - 1].max()), abs=1e-4)
        assert lp.top_logprobs[k][lp.tokens[k]] == lp.token_logprobs[k]
    # streamed: the prompt's chunk carries the prompt's logprobs, then the answer's follow
    chunks = list(client.completions.create(model=model_name, prompt=PROMPT, echo=True, logprobs=2, stream=True,
                                            **GREEDY))
    streamed = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
    assert [t for s in streamed for t in s.tokens] == lp.tokens
    assert [o for s in streamed for o in s.text_offset] == lp.text_offset


def test_echo_with_max_tokens_0_scores_the_prompt_without_generating(client, model_name, host):
    """Legacy OpenAI's (and vLLM's) way to score a prompt: the echoed prompt is the whole
    text, finish_reason "length", no completion tokens; its logprobs as echo gives them."""
    ids = host.engine.tokenizer.encode(PROMPT)
    r = client.completions.create(model=model_name, prompt=PROMPT, echo=True, max_tokens=0)
    (choice,) = r.choices
    assert choice.text == PROMPT and choice.finish_reason == "length" and choice.logprobs is None
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 0
    assert r.usage.total_tokens == len(ids)
    scored = client.completions.create(model=model_name, prompt=PROMPT, echo=True, max_tokens=0, logprobs=2)
    full = client.completions.create(model=model_name, prompt=PROMPT, echo=True, logprobs=2, **GREEDY)
    lp, ref = scored.choices[0].logprobs, full.choices[0].logprobs
    assert scored.choices[0].text == PROMPT and len(lp.tokens) == len(ids)
    assert lp.tokens == ref.tokens[:len(ids)] and lp.text_offset == ref.text_offset[:len(ids)]
    assert lp.token_logprobs[0] is None and lp.token_logprobs[1:] == pytest.approx(ref.token_logprobs[1:len(ids)])
    # several prompts, n each: every choice its prompt's
    many = client.completions.create(model=model_name, prompt=["The sky", "A cat"], n=2, echo=True, max_tokens=0)
    assert [c.text for c in many.choices] == ["The sky", "The sky", "A cat", "A cat"]
    assert many.usage.completion_tokens == 0


def test_echo_with_max_tokens_0_streamed(client, model_name, host):
    chunks = list(client.completions.create(model=model_name, prompt=PROMPT, echo=True, max_tokens=0, logprobs=1,
                                            stream=True, stream_options={"include_usage": True}))
    answer = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in answer) == PROMPT
    assert [c.choices[0].finish_reason for c in answer][-1] == "length"
    tokens = [t for c in answer if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert len(tokens) == len(host.engine.tokenizer.encode(PROMPT))
    assert chunks[-1].usage.completion_tokens == 0 and chunks[-1].usage.prompt_tokens == len(tokens)


def test_max_tokens_0_without_echo_is_a_400_that_says_echo_scores(client, model_name):
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model_name, prompt=PROMPT, max_tokens=0)
    assert e.value.body["param"] == "max_tokens" and "echo: true" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:  # chat has no echo: nothing said of it
        client.chat.completions.create(model=model_name, messages=[{"role": "user", "content": "Hi"}], max_tokens=0)
    assert e.value.body["param"] == "max_tokens" and "echo" not in e.value.body["message"]
