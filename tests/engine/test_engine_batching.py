"""Engine behaviour: batching, prefix cache, preemption, seeds, stops, aborts, bad input."""

from __future__ import annotations

import threading

import pytest
import torch

from engine.api import Engine, InvalidRequestError, Request, SamplingParams
from tests.conftest import engine_device

GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


def ids_of(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 49152, (n,), generator=g).tolist()


def load(path, **kw) -> Engine:
    kw.setdefault("num_blocks", 256)
    kw.setdefault("max_model_len", 512)
    return Engine.load(str(path), device=engine_device(), dtype="float32", **kw)


@pytest.fixture(scope="module")
def engine(tiny_models):
    e = load(tiny_models["llama-tied"], max_num_batched_tokens=64)
    yield e
    e.shutdown()


def alone(engine, ids, params=GREEDY):
    return engine.submit(Request(prompt_token_ids=ids, params=params)).result()


def test_batch_equals_alone(engine):
    prompts = [ids_of(n, seed=n) for n in (3, 17, 40, 90, 5, 130)]
    solo = [alone(engine, p).token_ids for p in prompts]
    # All at once: mixed lengths, chunked prefill (budget 64 tokens) mixed with decodes.
    handles = [engine.submit(Request(prompt_token_ids=p, params=GREEDY)) for p in prompts]
    batched = [h.result().token_ids for h in handles]
    assert batched == solo


def test_prefix_cache_hits_give_same_tokens(engine):
    shared = ids_of(64, seed=7)
    first = alone(engine, shared + [11, 12, 13])
    before = engine.block_manager.prefix_cache_hit_rate
    second = alone(engine, shared + [11, 12, 13])
    assert second.cached_prompt_tokens >= 64  # four full blocks reused
    assert second.token_ids == first.token_ids
    other = alone(engine, shared + [99])
    assert other.cached_prompt_tokens >= 48
    assert engine.block_manager.prefix_cache_hit_rate > before


def test_prefix_hit_equals_cold_engine(tiny_models):
    shared = ids_of(50, seed=3)
    cold = load(tiny_models["llama-tied"], enable_prefix_caching=False)
    warm = load(tiny_models["llama-tied"])
    try:
        ref = alone(cold, shared + [42]).token_ids
        alone(warm, shared + [7])
        hit = alone(warm, shared + [42])
        assert hit.cached_prompt_tokens >= 48 and hit.token_ids == ref
    finally:
        cold.shutdown()
        warm.shutdown()


def test_preempted_requests_resume_identically(tiny_models):
    prompts = [ids_of(30 + 7 * i, seed=100 + i) for i in range(6)]
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    roomy = load(tiny_models["llama-tied"])
    # 12 blocks of 16 tokens cannot hold six ~70-token sequences at once: preemption.
    tight = load(tiny_models["llama-tied"], num_blocks=12, max_model_len=128)
    try:
        ref = [alone(roomy, p, params).token_ids for p in prompts]
        got = [h.result().token_ids for h in [tight.submit(Request(prompt_token_ids=p, params=params)) for p in prompts]]
        assert tight.stats().num_preemptions > 0
        assert got == ref
        assert tight.block_manager.num_used_blocks == 0
    finally:
        roomy.shutdown()
        tight.shutdown()


def test_seeded_sampling_is_reproducible_whatever_the_batch(engine):
    p = SamplingParams(max_tokens=20, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
    ids = ids_of(12, seed=1)
    a = alone(engine, ids, p).token_ids
    noise = [engine.submit(Request(prompt_token_ids=ids_of(20 + i, seed=50 + i),
                                   params=SamplingParams(max_tokens=15, temperature=1.0, ignore_eos=True)))
             for i in range(3)]
    b = engine.submit(Request(prompt_token_ids=ids, params=p)).result().token_ids
    for h in noise:
        h.result()
    assert a == b
    c = alone(engine, ids, SamplingParams(max_tokens=20, temperature=1.0, top_p=0.9, seed=99, ignore_eos=True))
    assert c.token_ids != a  # a different seed gives a different sample (20 tokens, vocab 49k)


def test_stop_strings_and_stop_ids(engine):
    ids = ids_of(10, seed=5)
    full = alone(engine, ids)
    # choose a stop string from the middle of the greedy text
    text = full.text
    assert len(text) > 10
    stop = text[5:9]
    got = alone(engine, ids, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop=(stop,)))
    assert got.finish_reason == "stop"
    assert got.text == text[: text.index(stop)]
    tok = full.token_ids[3]
    got = alone(engine, ids, SamplingParams(max_tokens=24, temperature=0, stop_token_ids=(tok,)))
    assert got.finish_reason == "stop" and got.token_ids == full.token_ids[: full.token_ids.index(tok) + 1]


def test_logprobs(engine):
    ids = ids_of(9, seed=8)
    res = alone(engine, ids, SamplingParams(max_tokens=4, temperature=0, logprobs=3, ignore_eos=True))
    assert len(res.logprobs) == 4
    for tok, lp in zip(res.token_ids, res.logprobs):
        assert lp.token_id == tok and lp.rank == 1
        assert len(lp.top) == 3 and lp.top[0][0] == tok
        assert abs(lp.top[0][1] - lp.logprob) < 1e-5


@pytest.mark.parametrize("bad", [
    dict(prompt=""),
    dict(prompt="   "),
    dict(prompt_token_ids=[]),
    dict(prompt_token_ids=[1, 10**7]),
    dict(prompt="hi", system="be brief"),
    dict(),
])
def test_bad_requests_are_rejected_and_engine_keeps_serving(engine, bad):
    running = engine.submit(Request(prompt_token_ids=ids_of(8, seed=2), params=GREEDY))
    with pytest.raises(InvalidRequestError):
        engine.submit(Request(**bad))
    assert running.result().finish_reason == "length"


def test_prompt_longer_than_context(engine):
    with pytest.raises(InvalidRequestError, match="context"):
        engine.submit(Request(prompt_token_ids=ids_of(600, seed=1)))


@pytest.mark.parametrize("kw", [dict(max_tokens=0), dict(max_tokens=-3), dict(temperature=-0.5),
                                dict(top_p=0.0), dict(top_p=1.5)])
def test_bad_sampling_params(kw):
    with pytest.raises(InvalidRequestError):
        SamplingParams(**kw)


def test_abort_at_any_time(engine):
    long = SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)
    h = engine.submit(Request(prompt_token_ids=ids_of(10, seed=4), params=long))
    other = engine.submit(Request(prompt_token_ids=ids_of(10, seed=6), params=GREEDY))
    it = iter(h)
    next(it)  # first token arrived
    h.abort()
    reasons = [ev.reason for ev in it if hasattr(ev, "reason")]
    assert reasons == ["abort"]
    assert other.result().finish_reason == "length"
    # aborting a waiting request, and an unknown id, are harmless
    engine.abort("no-such-request")
    h2 = engine.submit(Request(prompt_token_ids=ids_of(10, seed=9), params=long))
    h2.abort()
    assert h2.result().finish_reason in ("abort",)


def test_submit_from_many_threads(engine):
    results = {}

    def worker(i):
        results[i] = alone(engine, ids_of(5 + i, seed=i), SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 8
    for i, r in results.items():
        assert r.token_ids == alone(engine, ids_of(5 + i, seed=i),
                                    SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)).token_ids


def test_stats(engine):
    s = engine.stats()
    assert s.kv_blocks_total == 256 and s.kv_blocks_used + s.kv_blocks_free == 256
    assert s.num_running == 0 and s.requests_finished > 0


def test_unknown_model_is_a_clear_error(tmp_path):
    from engine.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="no such"):
        Engine.load(str(tmp_path / "nope"), device="cpu")


@pytest.mark.parametrize("quant,group", [("int4", 32), ("int8", None)])
def test_a_quantized_cpu_model_gives_the_same_tokens_cold_cached_and_batched(tiny_models, quant, group):
    """On the CPU a quantized model's projections run the C kernel for any number of rows
    (int8 activation blocks, a row's product the same bits however many rows share the call),
    its float LM head too (``CpuRowsF32``: torch's sgemm gives a row other bits at 1, 2-3 and
    4+ rows), and a prompt's last token reads as a prompt even when the rest of it is cached,
    so the same request gives the same tokens and the same logprobs, bit for bit, cold, after
    prefix-cache hits that leave 1 to 13 prompt rows, and beside 1, 2, 3 or 14 other requests
    whose prompts share its first step and whose decodes share the rest. (On the bundled
    model, 12 rows or fewer once took the C kernel and more a dequantized sgemm, and the next
    layer's int8 rounding turned their last-bit differences into 0.04-0.13 nats of the first
    token after a hit; with torch's head, the int8 case's first logprob here moved by an ulp
    beside one other request.)"""
    if engine_device() != "cpu":
        pytest.skip("the CPU kernel's paths")
    shared = ids_of(64, seed=5)  # four whole blocks
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=0)
    cold = load(tiny_models["llama-tied"], quantization=quant, quant_group_size=group, enable_prefix_caching=False)
    warm = load(tiny_models["llama-tied"], quantization=quant, quant_group_size=group)
    lp = lambda r: [t.logprob for t in r.logprobs]  # noqa: E731
    try:
        from hearth_kernels import cpu_quant

        if cpu_quant.available() is not None or cpu_quant.isa() != "avx2":
            pytest.skip("the C LM head needs AVX2")
        assert warm.model_info.cpu_head is True
        alone(warm, shared + [7], params)  # caches the shared blocks
        for tail in ([42], [42, 43], [42, 43, 44], ids_of(5, seed=9), ids_of(13, seed=11)):
            ref = alone(cold, shared + tail, params)
            hit = alone(warm, shared + tail, params)
            assert hit.cached_prompt_tokens == 64
            assert hit.token_ids == ref.token_ids and lp(hit) == lp(ref), f"tail of {len(tail)}"
        ref = alone(cold, shared + [42], params)
        for k in (1, 2, 3, 14):
            others = [Request(prompt_token_ids=ids_of(20 + i, seed=70 + i), params=params) for i in range(k)]
            *_, got = (h.result() for h in submitted_together(warm, others + [Request(prompt_token_ids=shared + [42],
                                                                                       params=params)]))
            assert got.cached_prompt_tokens == 64
            assert got.token_ids == ref.token_ids and lp(got) == lp(ref), f"beside {k}"
    finally:
        cold.shutdown()
        warm.shutdown()


def submitted_together(engine, requests):
    """Submit ``requests`` while the engine's loop is held between two steps, so its next
    step schedules them together (not as the loop's thread happens to wake); their handles."""
    held, release = threading.Event(), threading.Event()

    def hold():
        held.set()
        release.wait(30)

    holder = threading.Thread(target=engine.run_on_engine_thread, args=(hold,))
    holder.start()
    try:
        assert held.wait(30)
        return [engine.submit(r) for r in requests]
    finally:
        release.set()
        holder.join()


def test_a_prefix_cached_by_a_prompt_of_another_length_gives_the_same_tokens(tiny_models):
    """A shared 200-token prefix written into the cache by prompts of other lengths (one
    chunk of 207, 350 or 490 tokens, or 96-token steps: other chunk sizes, against other
    numbers of keys) or by a prompt read beside another one: the request that reuses it
    gets the tokens and logprobs it gets cold, bit for bit (the torch backend's prompt
    tiles at fixed positions, engine.layers.attention.PROMPT_TILE; torch's CPU SDPA alone
    changed the bits with the chunk's length and its keys, and the int8 blocks of the next
    layer magnified them)."""
    if engine_device() != "cpu":
        pytest.skip("the CPU backend's tiles")
    shared, tail = ids_of(200, seed=6), ids_of(9, seed=8)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=0)
    lp = lambda r: [t.logprob for t in r.logprobs]  # noqa: E731
    cold = load(tiny_models["llama-tied"], quantization="int8", enable_prefix_caching=False)
    try:
        ref = alone(cold, shared + tail, params)
        for writer, budget in ((7, None), (150, None), (290, None), (150, 96), (None, None)):
            warm = load(tiny_models["llama-tied"], quantization="int8", max_num_batched_tokens=budget)
            try:
                if writer is None:  # written while another prompt shared the steps
                    other = warm.submit(Request(prompt_token_ids=ids_of(250, seed=4), params=params))
                    alone(warm, shared + [5], params)
                    other.result()
                else:
                    alone(warm, shared + ids_of(writer, seed=writer), params)
                hit = alone(warm, shared + tail, params)
                assert hit.cached_prompt_tokens == 192  # (whole blocks)
                assert hit.token_ids == ref.token_ids and lp(hit) == lp(ref), f"writer {writer}, budget {budget}"
            finally:
                warm.shutdown()
    finally:
        cold.shutdown()
