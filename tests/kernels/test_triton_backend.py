"""The ``triton`` attention backend against the ``torch`` reference backend.

Layer level (same metadata, same cache) and engine level (same greedy tokens on tiny
models, batched with mixed prompt lengths and chunked prefill). On CPU the kernels run
under TRITON_INTERPRET=1 (set by tests/conftest.py), so everything here is kept tiny.
"""

from __future__ import annotations

import os

import pytest
import torch

from engine.layers.attention import (AttentionMetadata, TorchAttention, backend_names, backend_reasons,
                                     get_backend)
from tests.conftest import engine_device
from tests.kernels.reference import DEVICE


def metadata(tables: list[list[int]], starts: list[int], qlens: list[int],
             block_size: int) -> AttentionMetadata:
    """Built the way engine.runner.model_runner.ModelRunner._metadata builds it."""
    slots, seq_lens = [], []
    for table, start, n in zip(tables, starts, qlens):
        slots += [table[p // block_size] * block_size + p % block_size for p in range(start, start + n)]
        seq_lens.append(start + n)
    width = max(len(t) for t in tables)
    qstart = [0]
    for n in qlens:
        qstart.append(qstart[-1] + n)
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.long, device=DEVICE),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32,
                                  device=DEVICE),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
        query_start=torch.tensor(qstart, dtype=torch.int32, device=DEVICE),
        seq_lens_cpu=seq_lens, query_lens_cpu=list(qlens), max_seq_len=max(seq_lens), block_size=block_size,
    )


@pytest.mark.parametrize("window", [None, 6], ids=["full", "window6"])
def test_layer_matches_torch_backend_over_prefill_chunks_and_decodes(window):
    heads, kv_heads, dim, bs = 4, 2, 32, 8
    triton_cls = get_backend("triton")
    ours = triton_cls(heads, kv_heads, dim, dim ** -0.5, window)
    ref = TorchAttention(heads, kv_heads, dim, dim ** -0.5, window)
    caches = [torch.zeros(2, 24, bs, kv_heads, dim, device=DEVICE) for _ in range(2)]
    tables = [[5, 2, 17], [9, 0, 11, 3], [20]]
    g = torch.Generator(device=DEVICE).manual_seed(0)
    # Step 1 prefills chunks; step 2 mixes a chunk with decodes; step 3 is decode only.
    steps = [([0, 0, 0], [9, 12, 3]), ([9, 12, 3], [10, 1, 1]), ([19, 13, 4], [1, 1, 1])]
    for starts, qlens in steps:
        meta = metadata(tables, starts, qlens, bs)
        t = sum(qlens)
        q, k, v = (torch.randn(t, h, dim, generator=g, device=DEVICE) for h in (heads, kv_heads, kv_heads))
        got = ours.forward(q, k, v, caches[0], meta)
        want = ref.forward(q, k, v, caches[1], meta)
        assert torch.equal(caches[0], caches[1])  # identical cache writes
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_mixed_step_with_decode_rows_first_uses_both_kernels_and_matches(monkeypatch):
    """num_decode > 0: the leading single-token rows go to the decode kernel, the rest to the
    prefill kernel, and the result equals the reference on the same step."""
    heads, kv_heads, dim, bs = 4, 2, 32, 8
    ours = get_backend("triton")(heads, kv_heads, dim, dim ** -0.5)
    ref = TorchAttention(heads, kv_heads, dim, dim ** -0.5)
    calls = {"decode": 0, "prefill": 0}
    for name in calls:
        fn = getattr(ours, f"_{name}")

        def counted(*a, _fn=fn, _name=name, **kw):
            calls[_name] += 1
            return _fn(*a, **kw)
        monkeypatch.setattr(ours, f"_{name}", counted)
    caches = [torch.zeros(2, 24, bs, kv_heads, dim, device=DEVICE) for _ in range(2)]
    tables = [[9, 0, 11, 3], [20, 4], [5, 2, 17]]
    g = torch.Generator(device=DEVICE).manual_seed(1)
    steps = [([0, 0, 0], [12, 9, 3], 0), ([12, 9, 3], [1, 1, 10], 2), ([13, 10, 13], [1, 1, 1], 0)]
    for starts, qlens, nd in steps:
        meta = metadata(tables, starts, qlens, bs)
        meta.num_decode = nd
        t = sum(qlens)
        q, k, v = (torch.randn(t, h, dim, generator=g, device=DEVICE) for h in (heads, kv_heads, kv_heads))
        got = ours.forward(q, k, v, caches[0], meta)
        want = ref.forward(q, k, v, caches[1], meta)
        assert torch.equal(caches[0], caches[1])
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert calls == {"decode": 2, "prefill": 2}  # step 2 used both kernels


@pytest.mark.parametrize("fused_layout", [False, True])
def test_fresh_prompt_sdpa_padded_to_a_bucket_matches_reference(fused_layout, monkeypatch):
    """A fresh prompt's SDPA runs padded to a length bucket (so cuDNN reuses one plan per
    bucket); the real rows equal the reference, whatever the padding holds."""
    from engine.layers.triton_attention import sdpa_bucket, sdpa_buckets

    heads, kv_heads, dim, t = 4, 2, 32, 29
    ours = get_backend("triton")(heads, kv_heads, dim, dim ** -0.5)
    ref = TorchAttention(heads, kv_heads, dim, dim ** -0.5)
    g = torch.Generator(device=DEVICE).manual_seed(3)
    if fused_layout:  # q/k/v as views of one [T, H + 2 KVH, D] buffer, as the model makes them
        qkv = torch.randn(t, heads + 2 * kv_heads, dim, generator=g, device=DEVICE)
        q, k, v = qkv[:, :heads], qkv[:, heads:heads + kv_heads], qkv[:, heads + kv_heads:]
    else:
        q, k, v = (torch.randn(t, h, dim, generator=g, device=DEVICE) for h in (heads, kv_heads, kv_heads))
    want = ref.forward(q, k, v, torch.zeros(2, 8, 8, kv_heads, dim, device=DEVICE),
                       metadata([[0, 1, 2, 3]], [0], [t], 8))
    for bucket in (t, 40, 64):
        got = ours._fresh_prefill(q, k, v, bucket=bucket)
        assert got.shape == (t, heads, dim)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # Stale memory in the padding (here NaN) must not reach the real rows: P @ V multiplies
    # even masked values, and 0 * NaN is NaN.
    import engine.layers.triton_attention as ta

    monkeypatch.setattr(ta, "_new_buffer", lambda like, *shape: torch.full(shape, float("nan"),
                                                                           dtype=like.dtype, device=like.device))
    got = ours._fresh_prefill(q, k, v, bucket=64)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (sdpa_bucket(1), sdpa_bucket(256), sdpa_bucket(257), sdpa_bucket(2049)) == (256, 256, 512, 2560)
    assert sdpa_buckets(8192)[-3:] == [7168, 7680, 8192] and len(sdpa_buckets(8192)) == 20


def test_static_decode_bound_is_read_from_metadata(monkeypatch):
    # The lead's CUDA-graph path will carry a static bound; the backend must pass it on.
    import hearth_kernels.paged_decode as decode_mod

    seen = {}
    real = decode_mod.paged_decode_attention

    def spy(*args, **kw):
        seen["max_seq_len"] = kw["max_seq_len"]
        return real(*args, **kw)

    ours = get_backend("triton")(4, 2, 32, 0.2)
    ours._decode = spy
    meta = metadata([[1, 2]], [9], [1], 8)
    cache = torch.zeros(2, 4, 8, 2, 32, device=DEVICE)
    q = torch.randn(1, 4, 32, device=DEVICE)
    k, v = torch.randn(1, 2, 32, device=DEVICE), torch.randn(1, 2, 32, device=DEVICE)
    ours.forward(q, k, v, cache, meta)
    assert seen["max_seq_len"] == 10

    class WithBound:  # AttentionMetadata has slots; a later version may add the field
        def __getattr__(self, name):
            return 64 if name == "max_seq_len_bound" else getattr(meta, name)

    ours.forward(q, k, v, cache, WithBound())
    assert seen["max_seq_len"] == 64


def test_available_reasons(monkeypatch):
    assert "triton" in backend_names()
    if DEVICE == "cpu":
        assert backend_reasons("triton", torch.device("cpu")) == []  # interpreter mode
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        reasons = backend_reasons("triton", torch.device("cpu"))
        assert reasons and "CUDA" in reasons[0] and "torch backend" in reasons[0]
    else:
        assert backend_reasons("triton", torch.device("cuda")) == []
    assert get_backend("triton").available("mps")  # never usable there


# -- engine level -------------------------------------------------------------------------

def _ids(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 49152, (n,), generator=g).tolist()


@pytest.mark.parametrize("model", ["llama-tied", "mistral"])
def test_engine_greedy_tokens_match_torch_backend(tiny_models, model):
    from engine.api import Engine, Request, SamplingParams

    if engine_device() != DEVICE and DEVICE == "cuda":
        pytest.skip("the engine tests run on CPU in this pass")
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    # Mixed lengths (block edges 15/16/17 and, for mistral, past its 24-token window);
    # a 24-token budget splits the long prompts into chunks riding along with decodes.
    prompts = [_ids(n, seed=n) for n in (3, 17, 40, 16, 29)]
    results = {}
    for attention in ("torch", "triton"):
        eng = Engine.load(str(tiny_models[model]), device=DEVICE, dtype="float32", attention=attention,
                          num_blocks=64, max_model_len=128, max_num_batched_tokens=24)
        try:
            handles = [eng.submit(Request(prompt_token_ids=p, params=params)) for p in prompts]
            results[attention] = [h.result().token_ids for h in handles]
        finally:
            eng.shutdown()
    assert results["triton"] == results["torch"]
    assert all(len(t) == 6 for t in results["triton"])


def test_interpreter_flag_is_set_without_cuda():
    if not torch.cuda.is_available():
        assert os.environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.parametrize("model", ["llama-tied", "qwen2"])
def test_batch1_gemv_path_gives_the_torch_backend_tokens(tiny_models, model):
    """Every linear layer (and the head) on the Triton GEMV for one-row steps, as the load-time
    tuner would choose on a GPU; greedy tokens unchanged. qwen2 has qkv biases."""
    from engine.api import Engine, Request, SamplingParams
    from engine.runner.gemv_tuning import _kinds

    if engine_device() != DEVICE and DEVICE == "cuda":
        pytest.skip("the engine tests run on CPU in this pass")
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    prompt = _ids(13, seed=5)
    results = {}
    for attention in ("torch", "triton"):
        eng = Engine.load(str(tiny_models[model]), device=DEVICE, dtype="float32", attention=attention,
                          num_blocks=32, max_model_len=64)
        try:
            if attention == "triton":
                for mods in _kinds(eng.runner.model).values():
                    for m in mods:
                        m.use_kernel(m.gemv_kernel((64, 32, 2)))  # few programs: the interpreter is slow
            results[attention] = eng.submit(Request(prompt_token_ids=prompt, params=params)).result().token_ids
        finally:
            eng.shutdown()
    assert results["triton"] == results["torch"] and len(results["torch"]) == 8


def test_load_time_warm_steps_write_nothing_and_reach_both_prefill_tiles(tiny_models):
    """The synthetic steps that compile the mixed/chunked kernel variants at load read
    block 0 as a prefix, must leave the KV cache as it was, and must reach both tile
    shapes of the paged prefill kernel (short chunks and long ones)."""
    from engine.api import Engine
    from hearth_kernels.paged_prefill import SHORT_Q

    if engine_device() != DEVICE and DEVICE == "cuda":
        pytest.skip("the engine tests run on CPU in this pass")
    eng = Engine.load(str(tiny_models["llama3"]), device=DEVICE, dtype="float32", attention="triton",
                      num_blocks=16, max_model_len=128)
    try:
        runner = eng.runner
        attn = runner.model.model.layers[0].self_attn.attn
        seen, real = [], attn._prefill

        def spy(*a, **k):
            seen.append(k["max_query_len"])
            return real(*a, **k)

        attn._prefill = spy
        for cache in runner.kv_caches:
            cache.normal_()
        before = [c.clone() for c in runner.kv_caches]
        with torch.inference_mode():
            runner._warm_steps()
        assert all(torch.equal(a, b) for a, b in zip(before, runner.kv_caches))
        assert min(seen) <= SHORT_Q < max(seen), seen
    finally:
        eng.shutdown()
