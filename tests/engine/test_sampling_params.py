"""``SamplingParams`` refuses every value the sampler can't use, with the valid range.

Issue 12: ``temperature=nan`` sampled token 0 forever, ``repetition_penalty=nan`` repeated
silently, and a seed of 2**64 or 10**23 was accepted and failed mid-step.
"""

from __future__ import annotations

import math

import pytest
import torch

from engine.errors import InvalidRequestError
from engine.runner.sampler import make_generator
from engine.sampling_params import MAX_SEED, SamplingParams

NAN, INF = math.nan, math.inf

BAD = [
    # field, value, what the message must say (the valid range or what to use)
    ("temperature", NAN, ">= 0"),
    ("temperature", INF, ">= 0"),
    ("temperature", -INF, ">= 0"),
    ("top_p", NAN, "(0, 1]"),
    ("top_p", INF, "(0, 1]"),
    ("min_p", NAN, "[0, 1]"),
    ("repetition_penalty", NAN, "> 0"),
    ("repetition_penalty", INF, "> 0"),
    ("presence_penalty", NAN, "[-2, 2]"),
    ("presence_penalty", INF, "[-2, 2]"),
    ("frequency_penalty", NAN, "[-2, 2]"),
    ("frequency_penalty", -INF, "[-2, 2]"),
    ("top_k", NAN, "top_k"),
    ("top_k", 2.5, "top_k"),
    ("top_k", -2, ">= 0"),
    ("max_tokens", NAN, "positive integer"),
    ("max_tokens", True, "positive integer"),
    ("logprobs", NAN, "[0, 20]"),
    ("logprobs", 2.5, "[0, 20]"),
    ("logprobs", 21, "[0, 20]"),
    ("temperature", "0.7", "number"),
    ("seed", 2**64, str(MAX_SEED)),
    ("seed", 10**23, str(MAX_SEED)),
    ("seed", -1, str(MAX_SEED)),
    ("seed", 1.5, "integer"),
    ("seed", True, "integer"),
]


@pytest.mark.parametrize("field, value, mention", BAD, ids=[f"{f}={v!r}" for f, v, _ in BAD])
def test_bad_values_are_refused_with_the_range(field, value, mention):
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(**{field: value})
    msg = str(info.value)
    assert field in msg and mention in msg, msg


def test_good_edge_values_are_accepted():
    SamplingParams(temperature=0, top_p=1, min_p=0, repetition_penalty=1e-3,
                   presence_penalty=-2, frequency_penalty=2, top_k=0, logprobs=0)
    SamplingParams(temperature=5, top_p=1e-6, min_p=1.0, top_k=10**6, logprobs=20)
    # -1: vLLM's (and transformers') "top-k off", which clients written for them send
    assert SamplingParams(top_k=-1) == SamplingParams(top_k=0)
    # Every seed the params accept is one the sampler's generator takes.
    for seed in (0, 1, 2**63, MAX_SEED):
        assert make_generator(SamplingParams(seed=seed).seed, "cpu").initial_seed() == seed


def test_the_seed_bound_is_the_generators():
    torch.Generator().manual_seed(MAX_SEED)
    with pytest.raises((ValueError, RuntimeError, OverflowError)):
        torch.Generator().manual_seed(MAX_SEED + 1)
