"""The runner puts decode rows (one token at or past its request's prompt) first in an eager
step (so attention can send them to its decode kernel; a prompt's single-token chunk is no
decode row) and must still hand back sampled tokens in the scheduler's order."""

from __future__ import annotations

import random
import threading
from types import SimpleNamespace

import torch

from engine.runner.io import RunnerInput, RunnerOutput, StepRow
from engine.runner.model_runner import ModelRunner


class _EchoModel:
    """Hidden state of each row = (its token id, its position): sampling echoes them back."""

    def __init__(self) -> None:
        self.meta = None

    def __call__(self, ids, positions, kv_caches, meta):
        self.meta = meta
        return torch.stack([ids.double(), positions.double()], dim=1)

    def compute_logits(self, hidden):
        return hidden


def _runner() -> ModelRunner:
    r = ModelRunner.__new__(ModelRunner)  # only what execute() touches
    r.device, r.block_size, r.graphs, r._ahead, r.kv_caches = torch.device("cpu"), 4, None, None, []
    r.prompt_graphs, r._requests = None, {}
    r.model = _EchoModel()
    r.sample = lambda logits, rows: RunnerOutput([(int(l[0]), int(l[1]), row.request_id)
                                                  for l, row in zip(logits, rows)], None)
    return r


def test_sampled_rows_follow_the_scheduler_order_whatever_the_mix():
    r, rng = _runner(), random.Random(0)
    saw_one_token_chunk = saw_last_prompt_token = False
    for _ in range(500):
        rows = []
        decodes = 0
        for j in range(rng.randint(1, 7)):
            n = rng.choice([1, 1, 1, 2, 3, 7])
            start = rng.randint(0, 20)
            total = start + n + rng.choice([0, 0, 3])  # 3 more: a chunk that does not sample
            # a single token reads the prompt (its last token, the rest cached) or decodes
            prompt_len = rng.choice([total, start]) if n == 1 and start + n == total else total
            r._requests[f"r{j}"] = SimpleNamespace(prompt_len=prompt_len)
            tokens = [rng.randint(0, 10**6) for _ in range(total)]
            rows.append(StepRow(f"r{j}", tokens[start:start + n], start,
                                list(range(100 * j, 100 * j + total // 4 + 2)), start + n == total))
            saw_one_token_chunk |= n == 1 and start + n != total
            saw_last_prompt_token |= n == 1 and start < prompt_len
            decodes += n == 1 and start >= prompt_len
        out = r.execute(RunnerInput(rows))
        want = [(row.token_ids[-1], row.start + len(row.token_ids) - 1, row.request_id)
                for row in rows if row.sample]
        assert out.token_ids == want
        meta = r.model.meta
        nd = meta.num_decode
        order = [int(t) // 100 for t in meta.block_tables[:, 0]]  # row j's table starts at block 100j
        is_decode = [len(rows[j].token_ids) == 1 and rows[j].start >= r._requests[f"r{j}"].prompt_len
                     for j in order]
        assert nd == decodes and is_decode == [True] * nd + [False] * (len(rows) - nd)
        assert meta.block_tables.shape[1] % 16 == 0
    assert saw_one_token_chunk  # a 1-token prefill chunk that samples nothing was covered
    assert saw_last_prompt_token  # a prompt's last token alone: read as a prompt, not a decode


def test_attention_warm_up_runs_on_the_engine_thread(tiny_models, monkeypatch):
    """torch keeps cuDNN plans per thread: the warm-up must run where the steps run."""
    from engine.api import Engine

    seen = {}
    monkeypatch.setattr(ModelRunner, "attention_warmup_tokens", lambda self, n: 48)

    def warm(self, n, should_stop=None):
        seen.update(thread=threading.current_thread().name, tokens=n)
        return 3

    monkeypatch.setattr(ModelRunner, "warm_attention", warm)
    eng = Engine.load(str(tiny_models["llama-tied"]), device="cpu", dtype="float32", num_blocks=16,
                      max_model_len=64)
    try:
        assert seen == {"thread": "hearth-engine", "tokens": 48}
        assert eng.model_info.prompt_attention_lengths == 3
    finally:
        eng.shutdown()
