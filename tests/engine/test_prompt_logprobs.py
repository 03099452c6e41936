"""engine.api.prompt_logprobs (completions' echo with logprobs): each prompt token's
log-probability, rank and the most likely tokens equal transformers' own (float64
log-softmax over its logits), on the native runner (two prefill chunks) and the fallback."""

from __future__ import annotations

import pytest
import torch

from engine.api import InvalidRequestError, prompt_logprobs
from tests.engine.test_perplexity import load, text_sample

TOP = 3


@pytest.fixture(scope="module")
def prompt_and_reference(tiny_models):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tiny_models["llama-tied"]
    ids = AutoTokenizer.from_pretrained(str(folder))(text_sample()[:300]).input_ids[:70]
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].double()
    return ids, torch.log_softmax(logits, dim=-1)


@pytest.mark.parametrize("fallback", [False, True], ids=["native", "fallback"])
def test_prompt_logprobs_equal_transformers(tiny_models, prompt_and_reference, fallback):
    ids, ref = prompt_and_reference
    eng = load(tiny_models["llama-tied"], force_fallback=fallback)
    try:
        got = prompt_logprobs(eng, ids, TOP)
        plain = prompt_logprobs(eng, ids)  # no top: the same values, no top list
        with pytest.raises(InvalidRequestError):
            prompt_logprobs(eng, [0, 10**7])
    finally:
        eng.shutdown()
    assert len(got) == len(ids) - 1 > 40  # more than one 40-token prefill chunk
    for k, lp in enumerate(got):
        row, target = ref[k], ids[k + 1]
        assert lp.token_id == target
        assert lp.logprob == pytest.approx(float(row[target]), abs=1e-4)
        # rank: 1 + the tokens more likely (float32 vs float64: ties within 1e-4 either way)
        assert int((row > row[target] + 1e-4).sum()) + 1 <= lp.rank <= int((row > row[target] - 1e-4).sum()) + 1
        top_ids = row.topk(TOP).indices.tolist()
        assert [t for t, _ in lp.top] == top_ids
        assert [v for _, v in lp.top] == pytest.approx(row.topk(TOP).values.tolist(), abs=1e-4)
    assert [(p.token_id, round(p.logprob, 5)) for p in plain] == [(p.token_id, round(p.logprob, 5)) for p in got]
    assert all(p.top == () for p in plain)
