"""Prompt graphs (one sequence's prompt or chunk replayed from a CUDA graph).

On CPU the graph itself can't exist, so a stand-in "graph" runs the very forward that
would be captured (the static buffers, the padding rows, the captured metadata, the
triton backend's paged prefill kernel through Triton's interpreter) each time it is
replayed: the row layout, the prefix handling and the runner's routing are checked
against the torch reference backend, token for token. The GPU tests replay real graphs.
"""

from __future__ import annotations

import pytest
import torch

from engine.api import Engine, Request, SamplingParams
from engine.runner.prompt_graphs import BUCKETS, PromptGraphs, keep_buckets, prompt_buckets, reserve_bytes
from tests.conftest import needs_triton_on_cpu
from tests.engine.test_engine_batching import ids_of


def test_buckets_up_to_the_budget():
    assert prompt_buckets(15) == []
    assert prompt_buckets(16) == [16]
    assert prompt_buckets(96) == [16, 32, 64]
    assert prompt_buckets(10**6) == list(BUCKETS)
    assert all(b2 <= 2 * b1 for b1, b2 in zip(BUCKETS, BUCKETS[1:]))
    assert all(b2 <= 1.5 * b1 for b1, b2 in zip(BUCKETS, BUCKETS[1:]) if b1 >= 128)


def test_kept_buckets_beat_eager_at_the_bucket_below():
    eager = {16: 20.0, 32: 20.0, 64: 20.5, 128: 21.0, 256: 22.0, 512: 24.0}
    # Launch-bound up to 256 (the graph wins), then GPU-bound: 512 padded from just over
    # 256 (22 ms eagerly) would take 23 ms, so 512 goes, and nothing above it is kept.
    graph = {16: 4.0, 32: 4.2, 64: 5.0, 128: 7.0, 256: 12.0, 512: 23.0}
    assert keep_buckets(graph, eager) == [16, 32, 64, 128, 256]
    # A bucket within the margin of its rival is not worth it either.
    assert keep_buckets({16: 19.5}, {16: 20.0}) == []
    assert keep_buckets({16: 18.9}, {16: 20.0}) == [16]
    # The first loser ends the list even if a larger bucket would pass.
    assert keep_buckets({16: 4.0, 32: 30.0, 64: 5.0}, {16: 20.0, 32: 20.0, 64: 20.0}) == [16]


def test_reserve_grows_with_the_largest_bucket():
    assert reserve_bytes(0, 4096, 14336, 2) == 0
    assert reserve_bytes(2048, 4096, 14336, 2) == 2048 * (8 * 4096 + 3 * 14336) * 2


class _ForwardAsGraph:
    """Stands in for a captured graph on CPU: replay() runs the captured forward."""

    def __init__(self, graphs: PromptGraphs, q: int) -> None:
        self.graphs, self.q = graphs, q

    def replay(self) -> None:
        self.graphs.logits[self.q].copy_(self.graphs._forward(self.q))


def _poison_attention_output(engine: Engine) -> None:
    """The paged prefill kernel leaves rows it doesn't own (the padding) as they were: make
    them NaN rather than whatever torch.empty returned, so that a padding row reaching a
    real one shows."""
    for layer in engine.runner.model.model.layers:
        attn = layer.self_attn.attn
        real = attn._prefill

        def poisoned(q, *a, _real=real, **k):
            if k.get("out") is None:
                k["out"] = torch.full_like(q, float("nan"))
            return _real(q, *a, **k)

        attn._prefill = poisoned


def _install(engine: Engine, max_tokens: int) -> PromptGraphs:
    runner = engine.runner
    _poison_attention_output(engine)
    pg = PromptGraphs(runner.model, runner.kv_caches, runner.device, runner.block_size, max_tokens,
                      engine.max_model_len)
    for q in pg.buckets:
        pg.logits[q] = torch.empty(1, runner.spec.vocab_size)
        pg.graphs[q] = _ForwardAsGraph(pg, q)
    runner.prompt_graphs = pg
    return pg


@needs_triton_on_cpu
@pytest.mark.parametrize("family", ["llama3", "mistral", "qwen3"])
def test_replayed_prompts_give_the_reference_tokens(tiny_models, family):
    """Sequential single prompts: lengths inside a bucket (padding rows), at a block edge,
    split in chunks (budget 24), a follow-up turn over a cached prefix, and a prompt whose
    second chunk replays after its first. Mistral's 24-token window cuts into the longer
    contexts; Qwen3 norms q and k per head."""
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    base = ids_of(21, seed=7)
    prompts = [ids_of(5, seed=1), ids_of(16, seed=2), ids_of(40, seed=3), base,
               base + ids_of(11, seed=8), ids_of(27, seed=9)]
    results, replays = {}, 0
    for attention in ("torch", "triton"):
        eng = Engine.load(str(tiny_models[family]), device="cpu", dtype="float32", attention=attention,
                          num_blocks=64, max_model_len=128, max_num_batched_tokens=24)
        try:
            pg = _install(eng, 32) if attention == "triton" else None
            assert pg is None or pg.buckets == [16, 32]
            results[attention] = [eng.submit(Request(prompt_token_ids=p, params=params)).result().token_ids
                                  for p in prompts]
            if pg is not None:
                replays = pg.replays
                # The follow-up turn reused the cached block of `base` (a prefix, not a fresh prompt).
                assert eng.block_manager._hit_tokens >= 16
        finally:
            eng.shutdown()
    assert results["triton"] == results["torch"]
    # Every prompt step replayed: 5, 16, 24 + 16 (budget 24), 21, 16 after the cached 16,
    # 24 + 3.
    assert replays == 8


@needs_triton_on_cpu
def test_runner_leaves_batches_and_long_chunks_to_the_eager_path(tiny_models):
    """Every step, whatever the engine thread happened to batch: a replay exactly when the
    step is one sequence with 2..16 new tokens (the largest bucket here is 16)."""
    eng = Engine.load(str(tiny_models["llama3"]), device="cpu", dtype="float32", attention="triton",
                      num_blocks=64, max_model_len=128)
    try:
        pg = _install(eng, 16)
        runner, seen = eng.runner, []
        execute = runner.execute

        def spy(inp):
            before = pg.replays
            res = execute(inp)
            seen.append(([len(row.token_ids) for row in inp.rows], pg.replays - before))
            return res

        runner.execute = spy
        params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
        handles = [eng.submit(Request(prompt_token_ids=ids_of(n, seed=n), params=params)) for n in (4, 6)]
        [h.result() for h in handles]
        for n in (17, 9):
            eng.submit(Request(prompt_token_ids=ids_of(n, seed=n), params=params)).result()
        for qlens, replayed in seen:
            assert replayed == int(len(qlens) == 1 and 1 < qlens[0] <= 16), seen
        assert ([17], 0) in seen and ([9], 1) in seen
    finally:
        eng.shutdown()


@needs_triton_on_cpu
@pytest.mark.parametrize("n", [1, 16])
def test_run_lays_out_rows_and_padding(tiny_models, n):
    """The static buffers after run(): real rows first, padding rows write nowhere."""
    eng = Engine.load(str(tiny_models["llama3"]), device="cpu", dtype="float32", attention="triton",
                      num_blocks=16, max_model_len=64)
    try:
        pg = _install(eng, 16)
        pg.graphs[16].replay = lambda: None
        table = [3, 5, 7]
        start = 20
        pg.run(list(range(100, 100 + n)), start, table)
        bs = pg.block_size
        slots = [table[p // bs] * bs + p % bs for p in range(start, start + n)]
        assert pg.longs[0, :n].tolist() == list(range(100, 100 + n))
        assert pg.longs[1, :n].tolist() == list(range(start, start + n))
        assert pg.longs[2, :16].tolist() == slots + [-1] * (16 - n)
        assert pg.longs[3, 0].item() == n - 1
        assert pg.seq_lens.tolist() == [start + n] and pg.query_start.tolist() == [0, n]
        assert pg.block_table[0, :3].tolist() == table
        assert pg.run(list(range(17)), 0, table) is None  # no bucket holds 17 tokens
        too_wide = [0] * (pg.block_table.shape[1] + 1)
        assert pg.run([1, 2], 0, too_wide) is None
    finally:
        eng.shutdown()
