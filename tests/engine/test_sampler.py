"""Sampler tests against naive float64 per-row reference implementations."""

from __future__ import annotations

import math

import pytest
import torch

from engine.runner.sampler import Sampler, SamplerOutput, TokenLogprobs, make_generator
from engine.sampling_params import SamplingParams

V = 50
sampler = Sampler()


def call(logits, params, prompts=None, outputs=None, gens=None) -> SamplerOutput:
    n = logits.shape[0]
    return sampler(
        logits,
        params,
        prompts if prompts is not None else [[] for _ in range(n)],
        outputs if outputs is not None else [[] for _ in range(n)],
        gens if gens is not None else [None] * n,
    )


# --------------------------------------------------------------------------- reference


def ref_penalised(row, p: SamplingParams, prompt, output):
    x = [float(v) for v in row.double().tolist()]
    if p.repetition_penalty != 1.0:
        for t in set(prompt) | set(output):
            x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
    for t in set(output):
        c = output.count(t)
        x[t] -= p.presence_penalty + p.frequency_penalty * c
    return x


def ref_probs(row, p: SamplingParams, prompt=(), output=()):
    """Final sampling distribution (float64, plain Python loops)."""
    x = ref_penalised(row, p, list(prompt), list(output))
    x = [v / p.temperature for v in x]
    n = len(x)
    keep = [True] * n
    if 0 < p.top_k < n:
        kth = sorted(x, reverse=True)[p.top_k - 1]
        keep = [v >= kth for v in x]

    def softmax(vals, mask):
        m = max(v for v, k in zip(vals, mask) if k)
        e = [math.exp(v - m) if k else 0.0 for v, k in zip(vals, mask)]
        s = sum(e)
        return [v / s for v in e]

    if p.top_p < 1.0:
        pr = softmax(x, keep)
        order = sorted(range(n), key=lambda i: -pr[i])
        cum = 0.0
        new_keep = [False] * n
        for i in order:
            if not keep[i]:
                continue
            new_keep[i] = True
            cum += pr[i]
            if cum >= p.top_p:
                break
        keep = new_keep
    pr = softmax(x, keep)
    if p.min_p > 0:
        mx = max(pr)
        keep = [k and v >= p.min_p * mx for v, k in zip(pr, keep)]
        pr = softmax(x, keep)
    return pr


def empirical(logits_row, p, draws, prompt=(), output=()):
    """Sample `draws` rows of the same logits in one batch (shared default generator)."""
    torch.manual_seed(1234)
    logits = logits_row[None].repeat(draws, 1)
    out = call(logits, [p] * draws, [list(prompt)] * draws, [list(output)] * draws)
    return torch.bincount(torch.tensor(out.token_ids), minlength=logits_row.numel()).double() / draws


def chi_square(freq, probs, draws):
    stat = 0.0
    for f, q in zip(freq.tolist(), probs):
        if q == 0:
            assert f == 0, "a filtered-out token was sampled"
        else:
            stat += (f * draws - q * draws) ** 2 / (q * draws)
    return stat


# --------------------------------------------------------------------------- tests


def test_greedy_is_argmax_any_dtype():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, V, generator=g)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        lg = logits.to(dtype)
        out = call(lg, [SamplingParams(temperature=0.0)] * 6)
        assert out.token_ids == lg.float().argmax(-1).tolist()
        assert out.logprobs is None
    # The caller's logits are not modified by penalties.
    before = logits.clone()
    call(logits, [SamplingParams(temperature=0.0, repetition_penalty=2.0)] * 6,
         prompts=[[1, 2, 3]] * 6)
    assert torch.equal(logits, before)


def test_tiny_temperature_is_greedy_not_token_zero():
    # logits / 1e-300 (0 in float32) or / 1e-40 overflowed to inf, the softmax to NaN, and
    # every draw was token 0 (the tokenizer's <|endoftext|> on SmolLM2).
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(1)) * 30
    logits[:, 0] = -5.0
    for t in (1e-300, 1e-40, 1e-6):
        params = [SamplingParams(temperature=t, seed=3), SamplingParams(temperature=t),
                  SamplingParams(temperature=t, logprobs=1)]
        out = call(logits, params, gens=[make_generator(3, logits.device), None, None])
        assert out.token_ids == logits.argmax(-1).tolist()


def test_extreme_penalty_and_top_p_keep_the_likeliest_token():
    # repetition_penalty 1e-300 (0 in float32) made a seen positive logit +inf and a tiny
    # top_p (0 in float32) filtered every token: both rows' softmax was NaN, the draw token 0.
    logits = torch.full((2, V), -1.0)
    logits[:, 7] = 2.0
    params = [SamplingParams(temperature=1.0, repetition_penalty=1e-300),
              SamplingParams(temperature=1.0, top_p=1e-300)]
    out = call(logits, params, prompts=[[7, 9], []])
    assert out.token_ids == [7, 7]


def test_greedy_uses_penalised_logits():
    logits = torch.zeros(1, V)
    logits[0, 7] = 3.0
    logits[0, 9] = 2.0
    p = SamplingParams(temperature=0.0, repetition_penalty=2.0)
    assert call(logits, [p], prompts=[[7]]).token_ids == [9]  # 3/2 < 2
    p = SamplingParams(temperature=0.0, frequency_penalty=0.6)
    assert call(logits, [p], outputs=[[7, 7]]).token_ids == [9]  # 3 - 1.2 < 2


@pytest.mark.parametrize("p", [
    SamplingParams(temperature=0.0, repetition_penalty=1.7),
    SamplingParams(temperature=0.0, repetition_penalty=0.6),
    SamplingParams(temperature=0.0, presence_penalty=0.8),
    SamplingParams(temperature=0.0, frequency_penalty=-0.5, presence_penalty=1.5),
    SamplingParams(temperature=0.0, repetition_penalty=1.3, presence_penalty=-1.0,
                   frequency_penalty=0.7),
])
def test_penalties_match_reference(p, monkeypatch):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, V, generator=g) * 3
    prompts = [[1, 2, 2, 30], [], [5, 6]]
    outputs = [[2, 2, 2, 7, 49], [0, 0, 11], []]
    captured = {}
    real_argmax = torch.Tensor.argmax

    # Greedy rows take argmax of the penalised logits; capture them to compare values.
    def spy(self, *a, **k):
        captured["x"] = self.clone()
        return real_argmax(self, *a, **k)

    monkeypatch.setattr(torch.Tensor, "argmax", spy)
    # A row without penalties in the same batch must be left untouched.
    plain = SamplingParams(temperature=0.0)
    out = call(torch.cat([logits, logits[:1]]), [p, p, p, plain],
               prompts=prompts + [[1, 2]], outputs=outputs + [[2]])
    monkeypatch.undo()
    x = captured["x"].double()
    for i in range(3):
        ref = torch.tensor(ref_penalised(logits[i], p, prompts[i], outputs[i]), dtype=torch.float64)
        torch.testing.assert_close(x[i], ref, rtol=1e-5, atol=1e-5)
        assert out.token_ids[i] == int(ref.argmax())
    torch.testing.assert_close(x[3], logits[0].double())


@pytest.mark.parametrize("p", [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.5),
    SamplingParams(temperature=1.3, top_k=5),
    SamplingParams(temperature=1.0, top_p=0.6),
    SamplingParams(temperature=0.8, min_p=0.15),
    SamplingParams(temperature=1.2, top_k=10, top_p=0.8, min_p=0.05),
    SamplingParams(temperature=1.0, repetition_penalty=1.5, presence_penalty=0.5,
                   frequency_penalty=0.3, top_p=0.9),
])
def test_filters_and_distribution_match_reference(p):
    g = torch.Generator().manual_seed(2)
    row = torch.randn(12, generator=g) * 1.5
    prompt, output = [0, 3], [3, 5, 5]
    probs = ref_probs(row, p, prompt, output)
    draws = 20000
    freq = empirical(row, p, draws, prompt, output)
    stat = chi_square(freq, probs, draws)
    dof = sum(q > 0 for q in probs) - 1
    # Deterministic seed; mean of chi2 is dof, this bound is far in the tail.
    assert stat < dof + 6 * math.sqrt(2 * max(dof, 1)) + 10, (stat, dof)


def test_filter_masks_exactly_match_reference():
    sampler_probs = Sampler._filtered_probs
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(8, 200, generator=g) * 2
    params = [
        SamplingParams(temperature=1.0, top_k=1),
        SamplingParams(temperature=0.7, top_k=17),
        SamplingParams(temperature=1.0, top_p=0.3),
        SamplingParams(temperature=2.0, top_p=0.95),
        SamplingParams(temperature=1.0, min_p=0.3),
        SamplingParams(temperature=0.9, top_k=50, top_p=0.5, min_p=0.1),
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=1.0, top_k=500),  # k > vocab: no-op
    ]
    got = sampler_probs(logits.clone(), params).double()
    got = got / got.sum(-1, keepdim=True)  # min-p leaves them unnormalised (argmax is scale-free)
    for i, p in enumerate(params):
        ref = torch.tensor(ref_probs(logits[i], p), dtype=torch.float64)
        assert torch.equal(got[i] > 0, ref > 0), f"row {i} keeps a different token set"
        torch.testing.assert_close(got[i], ref, rtol=1e-4, atol=1e-6)


def test_top_p_always_keeps_top_token():
    logits = torch.tensor([[10.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    p = SamplingParams(temperature=1.0, top_p=1e-9)
    probs = Sampler._filtered_probs(logits.clone(), [p, p])
    assert (probs > 0).sum(-1).tolist() == [1, 1]
    torch.manual_seed(0)
    for _ in range(20):
        assert call(logits[:1], [p]).token_ids == [0]


def test_seeded_row_independent_of_batch():
    g = torch.Generator().manual_seed(4)
    target = torch.randn(V, generator=g)
    p = SamplingParams(temperature=1.0, seed=42)

    def sequence(batch_size: int, position: int, others_seeded: bool) -> list[int]:
        gens = [make_generator(7 + j if others_seeded else None, "cpu") for j in range(batch_size)]
        gens[position] = make_generator(42, "cpu")
        params = [SamplingParams(temperature=0.9, top_p=0.9)] * batch_size
        params = list(params)
        params[position] = p
        toks = []
        for step in range(15):
            logits = torch.randn(batch_size, V, generator=g)
            logits[position] = target
            out = call(logits, params, gens=gens)
            toks.append(out.token_ids[position])
        return toks

    base = sequence(1, 0, False)
    assert len(set(base)) > 1  # actually sampling, not stuck on one token
    assert sequence(5, 3, False) == base
    assert sequence(4, 0, True) == base
    assert sequence(7, 6, True) == base


def test_make_generator():
    assert make_generator(None, "cpu") is None
    a, b = make_generator(3, "cpu"), make_generator(3, torch.device("cpu"))
    assert torch.equal(torch.rand(5, generator=a), torch.rand(5, generator=b))


def test_logprobs_match_log_softmax():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(4, V, generator=g) * 2
    params = [
        SamplingParams(temperature=0.0, logprobs=5),
        SamplingParams(temperature=1.0),  # did not ask
        SamplingParams(temperature=0.7, logprobs=0, repetition_penalty=3.0),
        SamplingParams(temperature=1.0, logprobs=20, presence_penalty=2.0),
    ]
    out = call(logits, params, prompts=[[1], [2], [3, 4], [5]], outputs=[[], [], [9], [9]])
    assert out.logprobs is not None and out.logprobs[1] is None
    ref = torch.log_softmax(logits.double(), dim=-1)
    for i in (0, 2, 3):
        lp = out.logprobs[i]
        assert isinstance(lp, TokenLogprobs)
        tok = out.token_ids[i]
        assert lp.token_id == tok
        # Raw model distribution: no temperature or penalties.
        assert lp.logprob == pytest.approx(float(ref[i, tok]), abs=1e-5)
        assert lp.rank == int((ref[i] > ref[i, tok]).sum()) + 1
        n = params[i].logprobs
        assert len(lp.top) == n
        order = torch.argsort(ref[i], descending=True)[:n].tolist()
        assert [t for t, _ in lp.top] == order
        for t, v in lp.top:
            assert v == pytest.approx(float(ref[i, t]), abs=1e-5)
    assert out.logprobs[0].rank == 1  # greedy picks the top token


def test_no_logprobs_when_nobody_asks():
    out = call(torch.randn(2, V), [SamplingParams(temperature=1.0)] * 2)
    assert out.logprobs is None and len(out.token_ids) == 2


def test_mismatched_lengths_rejected():
    with pytest.raises(ValueError):
        sampler(torch.randn(2, V), [SamplingParams()], [[]], [[]], [None])
