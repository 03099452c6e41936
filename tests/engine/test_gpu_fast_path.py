"""The GPU fast path (triton backend + fused kernels + CUDA-graph decode) against the
torch reference backend, on every fixture family. Runs only with a CUDA device."""

from __future__ import annotations

import pytest
import torch

from engine.api import Engine, Request, SamplingParams
from tests.engine.test_engine_batching import ids_of

pytestmark = pytest.mark.gpu

FAMILIES = ["llama3", "llama-tied", "mistral", "qwen2", "qwen3"]
GREEDY64 = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)


def _engine(path, attention, dtype="float32", **kw):
    kw.setdefault("max_model_len", 512)
    kw.setdefault("kv_cache_memory", "64MiB")
    kw.setdefault("max_num_seqs", 16)
    kw.setdefault("max_num_batched_tokens", 96)  # long prompts go in chunks
    return Engine.load(str(path), device="cuda", dtype=dtype, attention=attention, **kw)


def _run(engine, prompts):
    handles = [engine.submit(Request(prompt_token_ids=p, params=GREEDY64)) for p in prompts]
    return [h.result().token_ids for h in handles]


@pytest.mark.parametrize("family", FAMILIES)
def test_triton_with_graphs_matches_torch_token_for_token(tiny_models, family):
    """fp32: the same 64 greedy tokens for a batch of mixed lengths (block boundaries,
    chunked prefill, decode batches that land in different graph buckets)."""
    prompts = [ids_of(n, seed=n) for n in (1, 15, 16, 17, 150)]
    ref = _engine(tiny_models[family], "torch")
    want = _run(ref, prompts)
    ref.shutdown()
    fast = _engine(tiny_models[family], "triton")
    assert fast.model_info.cuda_graphs is True, fast.model_info.cuda_graphs_off
    got = _run(fast, prompts)
    replays = fast.runner.graphs.replays
    ahead = fast.runner.steps_ahead_used
    fast.shutdown()
    assert replays > 0 and ahead > 0  # graphs served decode, and greedy steps were pipelined
    assert got == want


@pytest.mark.parametrize("family", ["llama-tied", "mistral"])
def test_enforce_eager_triton_matches_graphs(tiny_models, family):
    prompts = [ids_of(n, seed=n) for n in (5, 33)]
    eager = _engine(tiny_models[family], "triton", enforce_eager=True)
    assert eager.model_info.cuda_graphs is False and "enforce_eager" in eager.model_info.cuda_graphs_off
    a = _run(eager, prompts)
    eager.shutdown()
    graphs = _engine(tiny_models[family], "triton")
    b = _run(graphs, prompts)
    graphs.shutdown()
    assert a == b


def test_bf16_fast_path_close_to_reference_logits(tiny_models):
    """bf16: token identity is not guaranteed (different summation order flips near-ties),
    so compare the first step's logits within bf16 tolerance instead, and require most of
    a 64-token greedy run to agree."""
    _assert_bf16_triton_close_to_torch(tiny_models["llama3"], ids_of(40, seed=1))


def _assert_bf16_triton_close_to_torch(path, prompt, **load):
    """A bf16 load with the triton backend against the torch reference on one prompt: the
    first token's log-probability within 0.05, and the first 16 of 64 greedy tokens equal."""
    outs = {}
    for attention in ("torch", "triton"):
        e = _engine(path, attention, dtype="bfloat16", **load)
        params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True, logprobs=5)
        outs[attention] = e.submit(Request(prompt_token_ids=prompt, params=params)).result()
        e.shutdown()
    ref, fast = outs["torch"], outs["triton"]
    lead = next((i for i, (x, y) in enumerate(zip(ref.token_ids, fast.token_ids)) if x != y), 64)
    assert lead >= 16, f"bf16 paths ({load or 'bf16 cache'}) diverged after {lead} tokens"
    assert abs(ref.logprobs[0].logprob - fast.logprobs[0].logprob) < 0.05


def _compiled_variants() -> int:
    import hearth_kernels.activation as act
    import hearth_kernels.gemv as gemv
    import hearth_kernels.kv_cache as kv
    import hearth_kernels.paged_decode as dec
    import hearth_kernels.paged_prefill as pre
    import hearth_kernels.rmsnorm as rms
    import hearth_kernels.rotary as rot

    total = 0
    for mod in (act, gemv, kv, dec, pre, rms, rot):
        for obj in vars(mod).values():
            cache = getattr(obj, "device_caches", None) or getattr(obj, "cache", None)
            if isinstance(cache, dict):
                for per_dev in cache.values():
                    total += len(per_dev[0]) if isinstance(per_dev, tuple) else len(per_dev)
    return total


_FRESH_PROCESS_SERVE = """
import sys
from engine.api import Engine, Request, SamplingParams
from tests.engine.test_engine_batching import ids_of
from tests.engine.test_gpu_fast_path import _compiled_variants

e = Engine.load(sys.argv[1], device="cuda", dtype=sys.argv[2], attention="triton", max_model_len=512,
                kv_cache_memory="64MiB", max_num_seqs=16, max_num_batched_tokens=int(sys.argv[3]),
                kv_cache_dtype=sys.argv[4])
before = _compiled_variants()
params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
waves = [(1, 7, 16, 31, 64, 200), (3, 2, 90, 5, 17, 33, 48, 120, 9, 250), (130,), (6, 6, 6)]
for wave in waves:  # prompts arriving while others decode: mixed steps of every kind
    hs = [e.submit(Request(prompt_token_ids=ids_of(n, seed=n + len(wave)), params=params)) for n in wave]
    [h.result() for h in hs]
after = _compiled_variants()
e.shutdown()
print("VARIANTS", before, after)
"""


@pytest.mark.parametrize("dtype,budget,kv", [("bfloat16", 96, "auto"), ("float32", 256, "auto"),
                                             ("bfloat16", 96, "fp8")])
def test_no_compilation_on_the_request_path(tiny_models, dtype, budget, kv):
    """In a fresh process (no kernel compiled by earlier tests), serving varied requests
    after load compiles no new Triton kernel variant: a compile stalls the step 1-2 s.
    Load must have compiled (or warmed) everything: graphs, GEMV tuning, fresh-prompt SDPA
    and the synthetic mixed/chunked steps."""
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-c", _FRESH_PROCESS_SERVE, str(tiny_models["llama-tied"]),
                          dtype, str(budget), kv], capture_output=True, text=True, timeout=600)
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("VARIANTS")]
    assert res.returncode == 0 and line, res.stderr[-3000:]
    _, before, after = line[0].split()
    assert int(before) > 0
    assert after == before, f"{int(after) - int(before)} kernel variants compiled while serving"


@pytest.mark.parametrize("family", ["llama3", "qwen2"])
def test_batch1_gemv_matches_torch_token_for_token(tiny_models, family):
    """One sequence (graph bucket 1): every linear layer and the head on the Triton GEMV
    (forced, whatever the load-time tuning chose), fp32, same 64 greedy tokens."""
    from engine.runner.gemv_tuning import _kinds

    prompt = [ids_of(37, seed=3)]
    ref = _engine(tiny_models[family], "torch")
    want = _run(ref, prompt)
    ref.shutdown()
    fast = _engine(tiny_models[family], "triton", enforce_eager=True)
    choices = fast.model_info.batch1_matmul
    assert set(choices) == {"qkv", "o", "gate_up", "down", "lm_head"}, choices
    assert 0 < fast.model_info.batch1_tune_s < 600  # the load's time choosing them, recorded
    for mods in _kinds(fast.runner.model).values():
        for m in mods:
            m.use_kernel(m.gemv_kernel((1, 1024, 4)))
    fast.runner.capture_graphs(1, 512)  # recapture bucket 1 with the GEMV path in it
    got = _run(fast, prompt)
    replays = fast.runner.graphs.replays
    fast.shutdown()
    assert replays > 0  # the captured GEMV path served the decode steps
    assert got == want


def test_rerouted_buckets_match_torch_token_for_token(tiny_models):
    """Every decode batch served by the largest graph (as a measured cuBLAS cliff would
    route it): the padding rows must not change any real row's tokens."""
    prompts = [ids_of(n, seed=n) for n in (3, 16, 40)]
    ref = _engine(tiny_models["llama3"], "torch")
    want = _run(ref, prompts)
    ref.shutdown()
    fast = _engine(tiny_models["llama3"], "triton")
    graphs = fast.runner.graphs
    assert set(graphs.bucket_ms) == set(graphs.buckets) and all(t > 0 for t in graphs.bucket_ms.values())
    graphs.routes = {b: graphs.max_batch for b in graphs.buckets}
    got = _run(fast, prompts)
    replays = graphs.replays
    fast.shutdown()
    assert replays > 0
    assert got == want


def test_fp8_kv_cache_triton_with_graphs_matches_torch_over_fp8(tiny_models):
    """fp32 model, fp8 KV cache: the triton backend (fresh-prompt SDPA rounding its K/V
    through fp8, paged kernels widening the stored bytes, CUDA graphs) gives the torch
    reference's greedy tokens over the same fp8 cache."""
    prompts = [ids_of(n, seed=n) for n in (1, 16, 17, 150)]
    ref = _engine(tiny_models["llama3"], "torch", kv_cache_dtype="fp8")
    want = _run(ref, prompts)
    ref.shutdown()
    fast = _engine(tiny_models["llama3"], "triton", kv_cache_dtype="fp8")
    assert fast.model_info.kv_cache_dtype == "float8_e4m3fn"
    got = _run(fast, prompts)
    replays = fast.runner.graphs.replays
    fast.shutdown()
    assert replays > 0
    assert got == want


def test_bf16_model_over_an_fp8_cache_stays_close_to_the_torch_reference(tiny_models):
    """bf16 weights, fp8 cache: the triton path runs its attention dots in fp16 (bf16
    queries widened tiles), the torch reference in fp32 over the same bytes; first-token
    log-probabilities agree within bf16 noise and most of 64 greedy tokens match."""
    _assert_bf16_triton_close_to_torch(tiny_models["llama3"], ids_of(40, seed=2), kv_cache_dtype="fp8")


@pytest.mark.parametrize("kv", ["auto", "fp8"])
def test_prompt_graphs_match_torch_token_for_token(tiny_models, kv):
    """One prompt at a time (the chat case), fp32: fresh prompts inside a bucket, at block
    edges, chunked (budget 96: 150 = 96 eagerly + 54 replayed), and a follow-up turn over
    a cached prefix all replay prompt graphs and give the torch reference's 64 tokens."""
    base = ids_of(40, seed=4)
    prompts = [ids_of(n, seed=n) for n in (2, 15, 16, 17, 150)] + [base, base + ids_of(30, seed=5)]
    ref = _engine(tiny_models["llama3"], "torch", kv_cache_dtype=kv)
    want = [_run(ref, [p])[0] for p in prompts]
    ref.shutdown()
    fast = _engine(tiny_models["llama3"], "triton", kv_cache_dtype=kv)
    # Buckets 16, 32, 64 fit the budget of 96; which pay is timed at load (all, on a tiny model).
    assert fast.model_info.prompt_graph_tokens > 0, fast.model_info.prompt_graph_ms
    got = [_run(fast, [p])[0] for p in prompts]
    replays = fast.runner.prompt_graphs.replays
    fast.shutdown()
    assert replays >= len(prompts)
    assert got == want


@pytest.mark.parametrize("seqs,quant", [(64, "none"), (256, "none"), (256, "int4"), (256, "int8")])
def test_graph_memory_stays_within_what_the_kv_pool_left_for_it(seqs, quant):
    """The KV cache is sized after setting aside graph_reserve_bytes: the captured graphs
    (prompt and decode, one pool) must fit in it. Llama-1B shape (random weights), so the
    activations, not the slack, dominate the reserve; at 256 sequences there are 35 decode
    buckets (a [bs, vocab] output kept per bucket would hold 4,231 rows of logits). int4 and
    int8: buckets over 128 rows and prompt buckets dequantize each weight into a scratch
    (freed after its matmul) inside the graphs' pool."""
    from engine.runner.memory import graph_reserve_bytes

    e = Engine.load("shape:llama-1b", device="cuda", max_model_len=4096, max_num_seqs=seqs,
                    max_num_batched_tokens=2048, quantization=quant)
    info, runner = e.model_info, e.runner
    reserve = graph_reserve_bytes(runner, seqs, 2048)
    e.shutdown()
    assert info.prompt_graph_tokens > 0
    assert 0 < info.cuda_graph_bytes <= reserve, (info.cuda_graph_bytes, reserve)
