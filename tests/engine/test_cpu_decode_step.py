"""The CPU decode step (one C call per token, engine/runner/cpu_step.py): its logits equal
the eager model's for the same step on every family it takes (untied + Llama 3 RoPE
scaling, tied GQA, a sliding window shorter than the context, q/k/v biases, Qwen3's per-head
q/k norms and a head_dim other than hidden / heads), float32 and
quantized, past several KV blocks; the engine's greedy tokens are the same with it on and
off; what it can't run is refused with the reason and runs eagerly."""

from __future__ import annotations

import pytest
import torch

from engine.config import load_config
from engine.loader.engine_loader import load_model
from engine.runner.cpu_step import CpuDecodeStep
from engine.runner.lifecycle import release_runner

PROMPT = [5, 17, 99, 3, 1024, 7, 42, 8, 300, 11, 12, 13, 2048, 77, 19, 23, 4000, 31, 37, 41, 43, 47, 53, 59,
          61, 67, 71, 73]  # 28 tokens: past the mistral model's window of 24
TABLE = [6, 2, 9, 0, 4, 11, 3, 8, 1]  # out of order: the step must follow the table (blocks of 4)
STEPS = [500, 9, 1234, 88, 7, 6]  # decode inputs: positions 28..33, the 8th and 9th blocks


def _load(path, quant, **options):
    options.setdefault("num_blocks", 12)
    config = load_config(str(path), device="cpu", dtype="float32", attention="torch",
                         block_size=4, max_model_len=128, quantization=quant, **options)
    return load_model(config)


def _eager_step(runner, ids, start):
    meta = runner._metadata([TABLE], [start], [len(ids)])
    hidden = runner.model(torch.tensor(ids), torch.arange(start, start + len(ids)), runner.kv_caches, meta)
    return runner.model.compute_logits(hidden[-1:]).float().clone()


@pytest.mark.parametrize("family,quant,kv", [("llama3", "none", "auto"), ("llama3", "int4", "auto"),
                                             ("llama-tied", "none", "auto"), ("llama-tied", "int8", "auto"),
                                             ("mistral", "int4", "auto"), ("qwen2", "none", "auto"),
                                             ("qwen2", "int8", "auto"), ("qwen3", "none", "fp8"),
                                             ("mistral", "int4", "fp8")])
def test_the_c_step_gives_the_eager_steps_logits(tiny_models, family, quant, kv):
    loaded = _load(tiny_models[family], quant, quant_head=family == "llama-tied" and quant in ("int8", "int4"),
                   kv_cache_dtype=kv)
    runner = loaded.runner
    if kv == "fp8":
        assert runner.kv_caches[0].dtype == torch.float8_e4m3fn
    try:
        assert loaded.info.cpu_decode is True and runner.cpu_step is not None
        with torch.inference_mode():
            _eager_step(runner, PROMPT, 0)
            pos = len(PROMPT)
            for token in STEPS:
                want = _eager_step(runner, [token], pos)
                # the C step writes this position's K/V again (the same values, up to rounding)
                got = runner.cpu_step.run(token, pos, TABLE)
                assert got.shape == want.shape
                err = (got - want).abs().max().item()
                # fp32 rounding; quantized: an int8 activation code may round the other way
                # (an e4m3 cache: ~1e-6 here; a tie in this step's k or v could round apart)
                tol = 1e-4 if quant == "none" and kv == "auto" else 2e-3
                assert err <= tol * max(1.0, want.abs().max().item()), (pos, err)
                assert got.argmax() == want.argmax()
                pos += 1
    finally:
        release_runner(runner)


def test_it_reads_the_cache_it_was_given(tiny_models):
    """A wrong context (a cleared cache) changes the logits: the step attends to the cache."""
    loaded = _load(tiny_models["llama-tied"], "none")
    runner = loaded.runner
    try:
        with torch.inference_mode():
            _eager_step(runner, PROMPT, 0)
            want = _eager_step(runner, [STEPS[0]], len(PROMPT))
            for cache in runner.kv_caches:
                cache[:, TABLE[0]].zero_()
            got = runner.cpu_step.run(STEPS[0], len(PROMPT), TABLE)
        assert (got - want).abs().max() > 1e-3
    finally:
        release_runner(runner)


def _both_ways(monkeypatch, model, quantization, prompts, params, heads=None):
    """``prompts`` generated with the C decode step off, then on: (each run's completions,
    each run's ``model_info.cpu_decode``, per row the C step ran in the second run, the
    number of rows its call had); each run's
    ``model_info.cpu_head`` goes into ``heads`` when given."""
    from engine.api import Engine

    outputs, infos, calls = [], [], []
    for switch in ("0", "1"):
        monkeypatch.setenv("HEARTH_CPU_DECODE", switch)
        engine = Engine.load(str(model), device="cpu", dtype="float32", attention="torch",
                             quantization=quantization, max_model_len=128, block_size=4)
        try:
            step = engine.runner.cpu_step
            if step is not None:  # count the rows it runs (and how many each call had)
                run, run_rows = step.run, step.run_rows
                step.run = lambda *a: calls.append(1) or run(*a)
                step.run_rows = lambda rows, run_rows=run_rows: calls.extend([len(rows)] * len(rows)) or run_rows(rows)
            outputs.append(engine.generate(prompts, params))
            infos.append(engine.model_info.cpu_decode)
            if heads is not None:
                heads.append(engine.model_info.cpu_head)
        finally:
            engine.shutdown()
    return outputs, infos, calls


def test_greedy_tokens_are_the_same_with_and_without_the_c_step(tiny_models, monkeypatch):
    from engine.api import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    heads = []
    runs, infos, calls = _both_ways(monkeypatch, tiny_models["mistral"], "int4",
                                    ["The quick brown fox jumps over the lazy dog and runs"], params, heads)
    outputs = [run[0] for run in runs]
    assert infos == ["turned off (HEARTH_CPU_DECODE=0)", True]
    # the float head's C kernel goes with the switch (this int4 model's head is quantized)
    assert heads == ["turned off (HEARTH_CPU_DECODE=0)", "the LM head is quantized (its own kernel)"]
    assert outputs[0].token_ids == outputs[1].token_ids
    assert len(calls) == 23  # every decode step (the prompt step sampled the first token)
    assert len(outputs[1].token_ids) == 24


def test_what_it_cannot_run_is_refused_with_the_reason(tiny_models):
    config = load_config(str(tiny_models["qwen3"]), device="cpu", dtype="bfloat16", attention="torch",
                         num_blocks=12, block_size=4, max_model_len=128)
    loaded = load_model(config)
    try:
        assert loaded.runner.cpu_step is None
        assert "runs in bfloat16" in loaded.info.cpu_decode
        assert loaded.info.cpu_head == "the LM head is bfloat16, not float32"  # (torch's matmul runs it)
        step, reason = CpuDecodeStep.build(loaded.runner)
        assert step is None and "not float32" in reason
    finally:
        release_runner(loaded.runner)


def test_its_e4m3_codes_are_torchs():
    """The C step writes an e4m3 cache as engine.layers.attention.to_fp8 does (saturating at
    +-448, to nearest, ties to even, signed zeros, NaN) and reads each code's exact value."""
    from engine.layers.attention import to_fp8
    from hearth_kernels.cpu_decode import e4m3_codes, e4m3_values

    codes = torch.arange(256, dtype=torch.uint8)
    want = codes.view(torch.float8_e4m3fn).float()
    got = e4m3_values(codes)
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got[~want.isnan()], want[~want.isnan()])
    finite = want[~want.isnan()].unique()
    mids = (finite[1:] + finite[:-1]) / 2  # every tie, and a float either side of it
    g = torch.Generator().manual_seed(0)
    x = torch.cat([finite, mids, torch.nextafter(mids, finite[1:]), torch.nextafter(mids, finite[:-1]),
                   torch.randn(20000, generator=g) * 10.0 ** torch.randint(-4, 3, (20000,), generator=g),
                   torch.tensor([0.0, -0.0, 448.0, 449.0, 464.0, 1e9, -1e9, float("inf"), -float("inf"),
                                 2.0 ** -10, -(2.0 ** -10), 2.0 ** -12, 1.98, float("nan")])])
    assert torch.equal(e4m3_codes(x), to_fp8(x).view(torch.uint8))


def test_qwen3s_q_k_norms_matter_to_the_c_step(tiny_models):
    """Its q/k norms are read: with other norm weights the same step gives other logits."""
    loaded = _load(tiny_models["qwen3"], "none")
    runner = loaded.runner
    try:
        with torch.inference_mode():
            _eager_step(runner, PROMPT, 0)
            want = runner.cpu_step.run(STEPS[0], len(PROMPT), TABLE).clone()
            for layer in runner.model.model.layers:
                layer.self_attn.k_norm.weight.mul_(1.5)  # in place: the C step holds its pointer
            got = runner.cpu_step.run(STEPS[0], len(PROMPT), TABLE)
        assert (got - want).abs().max() > 1e-3
    finally:
        release_runner(runner)


@pytest.mark.parametrize("quant,kv", [("none", "auto"), ("int4", "auto"), ("int8", "fp8")])
@pytest.mark.parametrize("isa,split_min", [("avx2", 0), ("avx2", 1 << 30), ("scalar", 0)])
def test_several_sequences_in_one_call_get_the_bits_each_gets_alone(tiny_models, quant, kv, isa, split_min):
    """``step_rows``: three or four sequences of different lengths (one past the sliding
    window, in blocks out of order) decoded in one C call give, row for row, the logits
    ``step`` gives each alone, bit for bit, and write the same K/V: on both paths, split
    attention or not, 1 to 3 threads, float32 (pairs of rows and a row alone), int4 and int8
    (tiles of 4 rows and of fewer), an e4m3 cache too."""
    from hearth_kernels import cpu_quant

    if isa == "avx2" and cpu_quant.isa() != "avx2":
        pytest.skip("this CPU has no AVX2")
    loaded = _load(tiny_models["mistral"], quant, kv_cache_dtype=kv, num_blocks=24)
    runner = loaded.runner
    seqs = [(PROMPT, TABLE), (PROMPT[:5], [10, 12]), (PROMPT[3:14], [5, 7, 13, 14]), (PROMPT[:1], [15])]
    try:
        model = runner.cpu_step._model
        model.configure(isa=isa, split_min=split_min)
        with torch.inference_mode():
            for ids, table in seqs:  # each prompt into its blocks
                meta = runner._metadata([table], [0], [len(ids)])
                runner.model(torch.tensor(ids), torch.arange(len(ids)), runner.kv_caches, meta)
            tokens, positions, tables = [500, 9, 1234, 88], [len(ids) for ids, _ in seqs], [t for _, t in seqs]
            for step, (rows, threads) in enumerate(((4, 2), (3, 1), (3, 3))):
                tokens, positions, tables = tokens[:rows], positions[:rows], tables[:rows]
                cache = [kv.clone() for kv in runner.kv_caches]
                alone = torch.cat([model.step(t, p, tb, threads=threads)
                                   for t, p, tb in zip(tokens, positions, tables)])
                after_alone = [kv.clone() for kv in runner.kv_caches]
                for kv, saved in zip(runner.kv_caches, cache):
                    kv.copy_(saved)
                together = model.step_rows(tokens, positions, tables, threads=threads)
                assert torch.equal(together, alone), step
                assert all(torch.equal(a, b) for a, b in zip(runner.kv_caches, after_alone))
                tokens = together.argmax(-1).tolist()
                positions = [p + 1 for p in positions]
    finally:
        release_runner(runner)


@pytest.mark.parametrize("quant,kv", [("none", "auto"), ("int4", "auto"), ("none", "fp8")])
@pytest.mark.parametrize("isa,split_min", [("avx2", 0), ("scalar", 0), ("scalar", 1 << 30)])
def test_the_split_attention_and_the_portable_path_give_the_same_logits(tiny_models, quant, kv, isa, split_min):
    """Long contexts split attention's keys over 2 threads (here forced at any length), and
    CPUs without AVX2 run the portable C: both give the eager step's logits (an e4m3 cache too)."""
    from hearth_kernels import cpu_quant

    if isa == "avx2" and cpu_quant.isa() != "avx2":
        pytest.skip("this CPU has no AVX2")
    loaded = _load(tiny_models["mistral"], quant, kv_cache_dtype=kv)
    runner = loaded.runner
    try:
        runner.cpu_step._model.configure(isa=isa, split_min=split_min)
        with torch.inference_mode():
            _eager_step(runner, PROMPT, 0)
            pos = len(PROMPT)
            for token in STEPS[:3]:
                want = _eager_step(runner, [token], pos)
                got = runner.cpu_step._model.step(token, pos, TABLE, threads=2)
                tol = 1e-4 if quant == "none" and kv == "auto" else 2e-3
                assert (got - want).abs().max().item() <= tol * max(1.0, want.abs().max().item())
                pos += 1
    finally:
        release_runner(runner)


def test_a_batch_of_sequences_decodes_in_one_c_call_with_the_eager_batchs_tokens(tiny_models, monkeypatch):
    """Several sequences decoding together: one C call per step for all of them (faster on a
    CPU than one eager batched step, engine/runner/execute.py), the same greedy tokens as
    the eager batch, every decode step of every sequence through the C step. In float32:
    with int8 activations a near-tie may round the other way depending on which prompts an
    eager step happened to read together, and that made token equality flaky."""
    from engine.api import SamplingParams

    prompts = ["The quick brown fox jumps over", "Once upon a time there was", "In 1492 Columbus", "Hello"]
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    runs, _, calls = _both_ways(monkeypatch, tiny_models["llama-tied"], "none", prompts, params)
    outputs = [[c.token_ids for c in run] for run in runs]
    assert outputs[0] == outputs[1]
    # the prompts are read eagerly (sampling each one's first token; "Hello" is one token, read
    # as a prompt even if it arrived among decodes); the 15 later tokens of each by C calls
    # (test_a_mixed_step_... covers steps that mix the two)
    assert len(calls) == 4 * 15 and max(calls) == 4  # (once all four decode, in one call)


@pytest.mark.parametrize("quant", ["none", "int4"])
def test_a_mixed_step_decodes_by_c_calls_beside_the_eager_prompt_rows(tiny_models, quant):
    """Runner steps mixing decode rows with prompt chunks (sampled or not), a one-token prompt
    and a prompt's last token alone: exactly the true decode rows (one token at or past the
    prompt) go to C calls, at their positions; the rest run eagerly beside them; every sampled
    row's token (and logprob, to float rounding) is the one an all-eager runner gives."""
    from engine.runner.io import NewRequest, RunnerInput, StepRow
    from engine.sampling_params import SamplingParams

    loaded = _load(tiny_models["llama-tied"], quant)
    runner = loaded.runner
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, logprobs=0)
    a, b, c = [5, 17, 99, 3, 1024, 7, 42], [8, 300, 11, 12, 13, 2048, 77, 19, 23], [400, 401, 402]
    ta, tb, tc, td = [0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]  # (12 blocks of 4 tokens)

    def scenario():
        runner._requests.clear()
        out = [runner.execute(RunnerInput(
            [StepRow("a", a, 0, ta, True), StepRow("b", b[:5], 0, tb, False)],
            new_requests=[NewRequest("a", params, len(a)), NewRequest("b", params, len(b))]))]
        out.append(runner.execute(RunnerInput(
            [StepRow("a", [out[0].token_ids[0]], len(a), ta, True), StepRow("b", b[5:], 5, tb, True),
             StepRow("c", c[:2], 0, tc, False), StepRow("d", [77], 0, td, True)],
            new_requests=[NewRequest("c", params, len(c)), NewRequest("d", params, 1)])))
        na, nb, nd = out[1].token_ids
        out.append(runner.execute(RunnerInput(
            [StepRow("c", c[2:], 2, tc, True), StepRow("a", [na], len(a) + 1, ta, True),
             StepRow("b", [nb], len(b), tb, True), StepRow("d", [nd], 1, td, True)])))
        return [o.token_ids for o in out], [[t.logprob for t in o.logprobs] for o in out]

    try:
        step = runner.cpu_step
        assert step is not None
        calls = []
        groups = []  # rows per C call
        run, run_rows = step.run, step.run_rows
        step.run = lambda *args: groups.append(1) or calls.append(args[1]) or run(*args)
        step.run_rows = lambda rows: groups.append(len(rows)) or calls.extend(r.start for r in rows) or run_rows(rows)
        with torch.inference_mode():
            tokens, logprobs = scenario()
            runner.cpu_step = None
            eager_tokens, eager_logprobs = scenario()
        # step 2: A's decode (d's one-token prompt reads as a prompt); step 3: A, B and D decode
        # (C's last prompt token alone reads as a prompt)
        assert calls == [len(a), len(a) + 1, len(b), 1] and groups == [1, 3]  # step 3's three in one call
        assert tokens == eager_tokens
        for got, want in zip(logprobs, eager_logprobs):
            torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=2e-3, rtol=0)
    finally:
        release_runner(runner)
