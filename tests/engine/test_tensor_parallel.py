"""Tensor-parallel sharding (issue 18, groundwork): two gloo ranks on the CPU give the
logits of one process, for a prompt and the decode step after it, on every fixture family
(MHA, GQA, MQA with its one KV head replicated, qkv bias, q/k norms, tied and untied
heads); world size 1 is the plain model exactly; heads or MLP widths that don't divide are
refused clearly. (The engine's rank processes build on this: not wired yet.)"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

FAMILIES = ["llama3", "llama-tied", "mistral", "qwen2", "qwen3"]
PROMPT = [5, 900, 17, 3001, 42, 7, 12000, 64, 31, 2048, 77, 8]


def forward(path: str, rank: int, world: int, init_file: str | None, out_file: str | None,
            shard_world_one: bool = False):
    """Logits of ``PROMPT`` and of one decode step after it (token 99), on rank ``rank``."""
    from engine.layers.attention import get_backend
    from engine.layers.kernel_plan import KernelPlan, apply_kernel_plan
    from engine.models.spec import ModelSpec
    from engine.runner.bring_up import build_on_meta, materialize_weights
    from engine.runner.model_runner import ModelRunner
    from engine.layers.parallel import TPGroup
    from engine.runner.tensor_parallel import shard_transform

    torch.set_num_threads(1)
    if world > 1:
        torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                             world_size=world)
    try:
        from pathlib import Path

        spec = ModelSpec.from_config(json.loads((Path(path) / "config.json").read_text()))
        tp = TPGroup(rank, world, torch.distributed.group.WORLD if world > 1 else None)
        transforms = [shard_transform(tp)] if world > 1 or shard_world_one else []
        model = build_on_meta(spec, torch.float32, 256, transforms)
        materialize_weights(model, Path(path), torch.device("cpu"), 0)
        apply_kernel_plan(model, KernelPlan.for_backend(get_backend("torch")))
        ms = model.spec
        caches = [torch.zeros(2, 4, 16, ms.num_kv_heads, ms.head_dim) for _ in range(ms.num_layers)]
        fake = SimpleNamespace(block_size=16, device=torch.device("cpu"), graphs=None)
        n = len(PROMPT)
        with torch.inference_mode():
            meta = ModelRunner._metadata(fake, [[0]], [0], [n])
            prefill = model.compute_logits(model(torch.tensor(PROMPT), torch.arange(n), caches, meta))
            meta = ModelRunner._metadata(fake, [[0]], [n], [1])
            decode = model.compute_logits(model(torch.tensor([99]), torch.tensor([n]), caches, meta))
        result = {"prefill": prefill.clone(), "decode": decode.clone(), "kv_heads": ms.num_kv_heads}
        if out_file is not None and rank == 0:
            torch.save(result, out_file)
        return result
    finally:
        if world > 1:
            torch.distributed.destroy_process_group()


def _rank_main(rank: int, path: str, world: int, init_file: str, out_file: str) -> None:
    forward(path, rank, world, init_file, out_file)


@pytest.mark.parametrize("family", FAMILIES)
def test_two_gloo_ranks_give_one_process_logits(tiny_models, tmp_path, family):
    import torch.multiprocessing as mp

    path = str(tiny_models[family])
    want = forward(path, 0, 1, None, None)
    out = tmp_path / "rank0.pt"
    mp.spawn(_rank_main, args=(path, 2, str(tmp_path / "pg"), str(out)), nprocs=2, join=True)
    got = torch.load(out)
    for key in ("prefill", "decode"):
        assert got[key].shape == want[key].shape
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-4)
        assert torch.equal(got[key].argmax(-1), want[key].argmax(-1))
    if family == "mistral":  # one KV head, two ranks: each holds it
        assert got["kv_heads"] == 1


def test_world_size_one_is_the_plain_model(tiny_models):
    path = str(tiny_models["llama-tied"])
    plain = forward(path, 0, 1, None, None)
    one = forward(path, 0, 1, None, None, shard_world_one=True)
    assert torch.equal(plain["prefill"], one["prefill"]) and torch.equal(plain["decode"], one["decode"])


def test_heads_that_do_not_divide_are_refused():
    from engine.api import InvalidRequestError
    from engine.layers.parallel import kv_heads_of_rank
    from engine.runner.tensor_parallel import rank_spec
    from engine.models.spec import ModelSpec
    from engine.layers.rope_spec import RopeSpec

    spec = ModelSpec("llama", 1000, 96, 192, 2, 6, 2, 16, 1e-5, 256, RopeSpec())
    # (the rank counts named take the whole model: 3 divides the heads but not the 2 KV heads)
    with pytest.raises(InvalidRequestError, match="attention heads divisible by 4.*6: use 1 or 2 or 6 ranks"):
        rank_spec(spec, 0, 4)
    # SmolLM2-135M: 9 heads, 3 KV heads, MLP 1536: 2, 4, 6 and 8 divide the MLP, not the heads
    smol = ModelSpec("llama", 1000, 576, 1536, 2, 9, 3, 64, 1e-5, 256, RopeSpec())
    with pytest.raises(InvalidRequestError, match="MLP width divisible by 9.*1536: use 1 or 3 ranks"):
        rank_spec(smol, 0, 9)
    assert [kv_heads_of_rank(2, r, 4) for r in range(4)] == [(0, 1), (0, 1), (1, 1), (1, 1)]
    assert [kv_heads_of_rank(8, r, 2) for r in range(2)] == [(0, 4), (4, 4)]
    with pytest.raises(InvalidRequestError):
        kv_heads_of_rank(2, 0, 3)
