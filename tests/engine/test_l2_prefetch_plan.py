"""engine/runner/l2_prefetch.py: which projections get their weights prefetched into L2 at
the start of the projection before them, issued only for one row while a CUDA graph is
captured (CPU: the GPU checks are stood in for; the kernel's lanes are tested in
tests/kernels/test_l2_prefetch.py, the real launch on the GPU)."""

from __future__ import annotations

import pytest
import torch

import hearth_kernels.l2_prefetch as kernel
from engine.config import load_config
from engine.models.spec import ModelSpec, read_config
from engine.runner import l2_prefetch as plan
from engine.runner.model_runner import ModelRunner

BUDGET = 40_000  # bytes: with L2 = BUDGET / FRACTION, q/k/v (32.8 kB), o (16 kB), down (24.6 kB) fit, gate/up (49 kB) not


@pytest.fixture(scope="module")
def runner(tiny_models):
    path = tiny_models["qwen2"]  # (q/k/v with a bias: two ranges)
    spec = ModelSpec.from_config(read_config(path))
    config = load_config(device="cpu", dtype="float32", attention="torch", num_blocks=8)
    r = ModelRunner.create(config, spec, path, device=torch.device("cpu"), dtype=torch.float32,
                           attention="torch", max_model_len=64)
    yield r
    r.model._l2_prefetch_hooks = [h.remove() for h in r.model._l2_prefetch_hooks][:0]


@pytest.fixture
def gpu_like(monkeypatch):
    """A GPU with PDL and an L2 of BUDGET / FRACTION bytes, as far as the planner knows; the
    launches are recorded (their ranges) instead of run."""
    issued = []
    monkeypatch.setattr(kernel, "l2_prefetch_on", lambda device: True)
    monkeypatch.setattr(kernel, "l2_bytes", lambda index: BUDGET / plan.FRACTION)
    monkeypatch.setattr(kernel.L2Prefetch, "__call__", lambda self: issued.append(("prefetch", self.ranges)))
    monkeypatch.delenv("HEARTH_L2_PREFETCH", raising=False)
    return issued


@pytest.fixture
def record_runs(runner, gpu_like):
    """Record each projection's start too (hooks registered after the planner's run after them)."""
    def record():
        for name, m in plan.projections(runner.model):
            handles.append(m.register_forward_pre_hook(lambda mod, args, name=name: gpu_like.append(("run", name))))
    handles = []
    yield record
    for h in handles:
        h.remove()


def _forward(runner, tokens: int):
    with torch.inference_mode():
        meta = runner._metadata([[0]], [0], [tokens])
        runner.model(torch.arange(5, 5 + tokens), torch.arange(tokens), runner.kv_caches, meta)


def test_on_cpu_there_is_no_plan(runner, monkeypatch):
    monkeypatch.delenv("HEARTH_L2_PREFETCH", raising=False)
    assert plan.plan_l2_prefetch(runner.model) is None
    assert runner.model._l2_prefetch_hooks == []


def test_small_projections_are_prefetched_when_the_one_before_starts(runner, gpu_like, record_runs, monkeypatch):
    model = runner.model
    order = plan.projections(model)
    assert [n for n, _ in order] == [f"layers.{i}.{p}" for i in range(2) for p in
                                     ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")]
    assert plan.plan_l2_prefetch(model) == ["o_proj", "down_proj", "qkv_proj"]
    ranges = {n: kernel.byte_ranges(plan.read_tensors(m)) for n, m in order}
    assert len(ranges["layers.0.self_attn.qkv_proj"]) == 2  # weight and bias
    monkeypatch.setattr(plan, "_capturing", lambda x: True)
    record_runs()
    _forward(runner, 1)
    want = []
    for (name, _), (target, _) in zip(order, order[1:] + [(None, None)]):
        if target is not None and not target.endswith("gate_up_proj"):  # (49 kB: over the budget)
            want.append(("prefetch", ranges[target]))
        want.append(("run", name))
    assert gpu_like == want


def test_nothing_is_issued_eagerly_or_for_more_rows(runner, gpu_like, monkeypatch):
    assert plan.plan_l2_prefetch(runner.model)
    _forward(runner, 1)  # not capturing a graph (a CPU tensor never is)
    monkeypatch.setattr(plan, "_capturing", lambda x: True)
    _forward(runner, 3)  # a prompt
    assert gpu_like == []
    _forward(runner, 1)
    assert len(gpu_like) == 5


def test_a_second_plan_replaces_the_first_and_the_switch_turns_it_off(runner, gpu_like, monkeypatch):
    model = runner.model
    plan.plan_l2_prefetch(model)
    plan.plan_l2_prefetch(model)
    assert len(model._l2_prefetch_hooks) == 6  # five prefetches and the join
    monkeypatch.setattr(plan, "_capturing", lambda x: True)
    _forward(runner, 1)
    assert len(gpu_like) == 5  # once each, not twice
    monkeypatch.setenv("HEARTH_L2_PREFETCH", "0")
    assert plan.plan_l2_prefetch(model) is None
    gpu_like.clear()
    _forward(runner, 1)
    assert gpu_like == []


def test_a_tight_l2_prefetches_nothing(runner, gpu_like, monkeypatch):
    monkeypatch.setattr(kernel, "l2_bytes", lambda index: 10_000 / plan.FRACTION)  # under o's 16 kB
    assert plan.plan_l2_prefetch(runner.model) == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                    reason="the bulk L2 prefetch needs a Hopper (sm_90) or newer GPU")
@pytest.mark.parametrize("quant", ["bf16", "int8"])
def test_graphs_with_prefetches_give_the_same_tokens_as_without(tiny_models, monkeypatch, quant):
    """A real load on the GPU: the decode graphs hold the forked prefetches and their join,
    and batch-1 decode gives the same tokens as with prefetching off."""
    import engine.runner.gemv_tuning as tuning
    from engine.api import Engine, Request, SamplingParams

    # Both loads must run the same batch-1 kernels: every candidate "times" the same, so the
    # tuner keeps its baseline (two timed loads may pick different configs, whose sums round
    # differently).
    monkeypatch.setattr(tuning, "_time", lambda *a, **k: 1.0)
    params = SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True)
    out = {}
    for on in ("1", "0"):
        monkeypatch.setenv("HEARTH_L2_PREFETCH", on)
        e = Engine.load(str(tiny_models["llama3"]), device="cuda", dtype="bfloat16", attention="triton",
                        quantization=quant, max_model_len=256, kv_cache_memory="64MiB", max_num_seqs=4)
        try:
            assert e.model_info.cuda_graphs is True, e.model_info.cuda_graphs_off
            out[on] = (e.model_info.l2_prefetch,
                       e.submit(Request(prompt_token_ids=[5, 17, 99, 3, 1024], params=params)).result().token_ids)
        finally:
            e.shutdown()
    assert out["1"][0] and "o_proj" in out["1"][0] and out["0"][0] is None
    assert out["1"][1] == out["0"][1]
