"""Prompt-reading progress: a request that asks for it hears how much of its prompt the
model has read, chunk by chunk, before the first token; other requests see no new events."""

from __future__ import annotations

import pytest
import torch

from engine.api import (Engine, FinishedEvent, PromptProgressEvent, Request, SamplingParams,
                        TokenEvent)
from tests.conftest import engine_device

CHUNK = 16  # max_num_batched_tokens: a 50-token prompt is read in four chunks
PARAMS = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)


def ids_of(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 49152, (n,), generator=g).tolist()


@pytest.fixture(scope="module")
def engine(tiny_models):
    e = Engine.load(str(tiny_models["llama-tied"]), device=engine_device(), dtype="float32",
                    max_model_len=256, num_blocks=64, max_num_batched_tokens=CHUNK)
    yield e
    e.shutdown()


def test_progress_comes_chunk_by_chunk_before_the_first_token(engine):
    prompt = ids_of(50, seed=1)
    events = list(engine.submit(Request(prompt_token_ids=prompt, params=PARAMS,
                                        prompt_progress=True)))
    progress = [ev for ev in events if isinstance(ev, PromptProgressEvent)]
    first_token = next(i for i, ev in enumerate(events) if isinstance(ev, TokenEvent))
    assert all(isinstance(ev, PromptProgressEvent) for ev in events[:first_token])
    assert [(p.done, p.total) for p in progress] == [(0, 50), (16, 50), (32, 50), (48, 50), (50, 50)]
    assert isinstance(events[-1], FinishedEvent) and events[-1].reason == "length"
    # The same request without asking: only token and finished events, the same tokens.
    plain = list(engine.submit(Request(prompt_token_ids=prompt, params=PARAMS)))
    assert not any(isinstance(ev, PromptProgressEvent) for ev in plain)
    assert [t for ev in plain[:-1] for t in ev.token_ids] == \
        [t for ev in events if isinstance(ev, TokenEvent) for t in ev.token_ids]


def test_cached_prefix_counts_as_read_and_result_ignores_progress(engine):
    prompt = ids_of(40, seed=2)
    engine.submit(Request(prompt_token_ids=prompt, params=PARAMS)).result()
    handle = engine.submit(Request(prompt_token_ids=prompt, params=PARAMS, prompt_progress=True))
    events = list(handle)
    progress = [(ev.done, ev.total) for ev in events if isinstance(ev, PromptProgressEvent)]
    assert progress[0][0] >= 32 and progress[-1] == (40, 40)  # two full blocks were cached
    # result() collects the same answer whether or not progress was asked for.
    again = engine.submit(Request(prompt_token_ids=prompt, params=PARAMS, prompt_progress=True))
    assert again.result().token_ids == [t for ev in events if isinstance(ev, TokenEvent)
                                        for t in ev.token_ids]
