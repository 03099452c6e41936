"""Tensor parallel in the engine (issue 18, ``--split tensor``): rank 0 in the test's own
process, rank 1 a worker process, over gloo on the CPU. Two ranks give one process's tokens
and logprobs on every fixture family (GQA with one KV head replicated included), batched,
with prefix-cache hits and preemption; world size 1 runs the same code path; a rank that
dies fails the requests in flight with an error naming it, leaves no process behind, and
the model loads again; what tensor parallel can't do is refused before anything starts."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from engine.api import Engine, SamplingParams
from engine.errors import EngineDeadError, HearthError
# the layer split's helpers: the same tiny models, prompts and engine settings
from tests.engine.test_layer_split import GREEDY, LOGPROBS, ids_of, load, run


def workers(engine: Engine):
    return list(engine.runner.ranks.procs.values())


def assert_same(want, got, tol=1e-4):
    for a, b in zip(want, got):
        assert a.token_ids == b.token_ids
        for la, lb in zip(a.logprobs or (), b.logprobs or ()):
            assert la.token_id == lb.token_id
            assert la.logprob == pytest.approx(lb.logprob, abs=tol)


@pytest.mark.parametrize("family", ["llama3", "llama-tied", "mistral", "qwen2", "qwen3"])
def test_two_gloo_ranks_match_one_process(tiny_models, family):
    prompts = [ids_of(n, seed=n) for n in (5, 37, 70)]
    one = load(tiny_models[family], device="cpu")
    try:
        want = run(one, prompts, LOGPROBS)
    finally:
        one.shutdown()
    tp = load(tiny_models[family], devices="cpu,cpu", split="tensor")
    try:
        assert tp.model_info.tensor_parallel == {"world": 2, "devices": ["cpu", "cpu"], "backend": "gloo"}
        got = run(tp, prompts, LOGPROBS)
        procs = workers(tp)
    finally:
        tp.shutdown()
    assert_same(want, got)
    assert all(p.poll() is not None for p in procs)  # the worker ended with the engine


def test_tensor_parallel_batches_prefix_hits_preemption_sampling_and_scores(tiny_models):
    from engine.evaluate import perplexity

    path = tiny_models["llama3"]  # GQA
    shared = ids_of(40, seed=1)
    prompts = [shared + ids_of(n, seed=n) for n in (3, 9, 21)] + [ids_of(60, seed=7)]
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    seeded = SamplingParams(max_tokens=8, temperature=0.9, top_p=0.9, seed=5, ignore_eos=True)
    text = ids_of(150, seed=11)
    one = load(path, device="cpu", num_blocks=128, block_size=8)
    try:
        want = [r.token_ids for r in run(one, prompts, params)]
        want_sampled = run(one, prompts[:1], seeded)[0].token_ids
        want_ppl = perplexity(one, text, window=64, stride=32).perplexity
    finally:
        one.shutdown()
    # Few blocks: four sequences of 100 tokens can't all be held, so some are preempted.
    tp = load(path, devices="cpu,cpu", split="tensor", num_blocks=30, block_size=8)
    try:
        got = [r.token_ids for r in run(tp, prompts, params)]
        again = run(tp, prompts[:2], params)  # prefix-cache hits
        stats = tp.stats()
        sampled = run(tp, prompts[:1], seeded)[0].token_ids  # rank 0's sampler and RNG
        ppl = perplexity(tp, text, window=64, stride=32).perplexity  # scores run on both ranks
    finally:
        tp.shutdown()
    assert got == want
    assert [r.token_ids for r in again] == want[:2]
    assert all(r.cached_prompt_tokens > 0 for r in again)
    assert stats.num_preemptions > 0
    assert sampled == want_sampled
    assert ppl == pytest.approx(want_ppl, rel=1e-4)


@pytest.fixture(scope="module")
def wide_mlp_models(tmp_path_factory, tokenizer_files):
    """llama3, qwen3 and llama-tied fixtures with an MLP of 128 (each rank's 64 columns: two
    int4 groups of 32)."""
    import copy

    from tests.conftest import family_configs, save_tiny

    out = {}
    for i, family in enumerate(("llama3", "qwen3", "llama-tied")):
        cfg = copy.deepcopy(family_configs()[family])
        cfg.intermediate_size = 128
        out[family] = save_tiny(cfg, tmp_path_factory.mktemp(f"wide-{family}"), tokenizer_files, seed=40 + i)
    return out


@pytest.mark.parametrize("family, head", [("llama3", {}), ("qwen3", {}), ("llama-tied", dict(quant_head=True))])
def test_int4_and_int8_weights_shard(wide_mlp_models, family, head, monkeypatch):
    """Each rank quantizes its slice as it streams in and holds what one process would:
    int4's groups fall on the same columns, int8's per-row scale is the whole row's, an
    untied LM head's int8 rows (and with ``--quant-head`` a tied embedding's and head's,
    by vocabulary rows) are one process's rows (same tokens and logprobs as one process,
    with the reference kernel's float activations: the CPU kernel rounds them to int8
    blocks, where the all-reduce's own rounding can flip a code)."""
    from engine.layers.parallel import VocabParallelLMHead
    from engine.layers.quant_parallel import (QuantizedVocabParallelEmbedding, QuantizedVocabParallelHead,
                                              QuantizedVocabParallelTiedHead)

    monkeypatch.setenv("HEARTH_QUANT_KERNEL", "reference")  # (the worker inherits it)
    path = wide_mlp_models[family]
    prompts = [ids_of(n, seed=n) for n in (5, 37)]
    for quant in ("int8",) if head else ("int4", "int8"):
        group = dict(quant_group_size=32) if quant == "int4" else {}
        one = load(path, device="cpu", quantization=quant, **group, **head)
        try:
            want = run(one, prompts, LOGPROBS)
        finally:
            one.shutdown()
        tp = load(path, devices="cpu,cpu", split="tensor", quantization=quant, **group, **head)
        try:
            assert tp.model_info.quantization == quant and "int" in tp.model_info.quant_detail
            model = tp.runner.model
            if head:  # the embedding and its tied head quantized, by vocabulary rows
                assert isinstance(model.model.embed_tokens, QuantizedVocabParallelEmbedding)
                assert isinstance(model.lm_head, QuantizedVocabParallelTiedHead)
            elif model.lm_head.tied:  # a tied head stays float with its embedding
                assert type(model.lm_head) is VocabParallelLMHead
            else:  # an untied head int8, as one process makes it
                assert isinstance(model.lm_head, QuantizedVocabParallelHead) and model.lm_head.bits == 8
            got = run(tp, prompts, LOGPROBS)
        finally:
            tp.shutdown()
        assert_same(want, got)


@pytest.mark.slow
def test_a_gguf_runs_on_its_own_quantized_weights_over_three_ranks(default_model, tmp_path, monkeypatch):
    """The bundled GGUF's layout (Q4_1 projections, a Q8_0 token embedding tied to the
    head; 9 heads, 3 KV heads), cut to three layers, over three CPU ranks: every tensor
    kept in its own quantized form, split by rows, columns and vocabulary rows; one
    process's tokens and logprobs."""
    from engine.layers.quant_parallel import QuantizedVocabParallelEmbedding, QuantizedVocabParallelTiedHead
    from tests.models.test_gguf_kquants_kept import write_cut

    monkeypatch.setenv("HEARTH_QUANT_KERNEL", "reference")
    path = write_cut(tmp_path / "smol-3layer.gguf", {})
    prompts = [ids_of(n, seed=n) for n in (5, 37)]
    one = load(path, device="cpu")
    try:
        want = run(one, prompts, LOGPROBS)
    finally:
        one.shutdown()
    tp = load(path, devices="cpu,cpu,cpu", split="tensor")
    try:
        assert tp.model_info.quantization == "gguf"
        embed = tp.runner.model.model.embed_tokens
        assert isinstance(embed, QuantizedVocabParallelEmbedding) and embed.bits == 8
        assert (embed.vocab, embed.num_embeddings, embed.start) == (49152, 16384, 0)
        assert isinstance(tp.runner.model.lm_head, QuantizedVocabParallelTiedHead)
        got = run(tp, prompts, LOGPROBS)
    finally:
        tp.shutdown()
    assert_same(want, got)


def test_published_checkpoints_shard_as_written(wide_mlp_models, tmp_path, monkeypatch):
    """A GPTQ (int4, groups of 32) and a compressed-tensors (int8 per channel) checkpoint
    written by ``hearth quantize``: each rank reads every tensor into the canonical layout
    and keeps its slice, giving one process's tokens and logprobs."""
    from engine.api import quantize_model

    monkeypatch.setenv("HEARTH_QUANT_KERNEL", "reference")  # float activations (see above)
    prompts = [ids_of(n, seed=n) for n in (5, 37)]
    for quant, layout, group in (("int4", "gptq", 32), ("int8", "compressed-tensors", None)):
        out = tmp_path / layout
        quantize_model(str(wide_mlp_models["llama-tied"]), out, quantization=quant, layout=layout, group_size=group)
        one = load(out, device="cpu")
        try:
            want = run(one, prompts, LOGPROBS)
            method = one.model_info.quantization
        finally:
            one.shutdown()
        tp = load(out, devices="cpu,cpu", split="tensor")
        try:
            assert tp.model_info.quantization == method != "none"
            got = run(tp, prompts, LOGPROBS)
        finally:
            tp.shutdown()
        assert_same(want, got)


@pytest.mark.parametrize("group", [False, True])
def test_world_size_one_runs_the_tensor_parallel_path(tiny_models, group, monkeypatch):
    """World size 1: no group (every collective the identity), or with
    ``HEARTH_TP_ONE_RANK_GROUP`` a gloo group of one rank whose collectives run and whose
    steps keep the lock-step of several ranks."""
    path = tiny_models["qwen2"]
    prompts = [ids_of(n, seed=n) for n in (5, 37)]
    one = load(path, device="cpu")
    try:
        want = run(one, prompts, LOGPROBS)
    finally:
        one.shutdown()
    if group:
        monkeypatch.setenv("HEARTH_TP_ONE_RANK_GROUP", "1")
    tp = load(path, devices="cpu", split="tensor")
    try:
        assert tp.model_info.tensor_parallel == {"world": 1, "devices": ["cpu"], "backend": "gloo" if group else None}
        assert tp.runner.tp.world == 1 and tp.runner.tp.collective == group
        assert (tp.runner.ranks is not None) == group
        got = run(tp, prompts, LOGPROBS)
    finally:
        tp.shutdown()
    assert_same(want, got)


def test_a_rank_that_dies_fails_its_requests_and_the_model_loads_again(tiny_models):
    path = tiny_models["llama-tied"]
    tp = load(path, devices="cpu,cpu", split="tensor")
    try:
        assert run(tp, [ids_of(8, seed=1)])[0].token_ids
        (proc,) = workers(tp)
        assert os.getsid(proc.pid) != os.getsid(0)  # a terminal's Ctrl+C doesn't reach it
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        r = run(tp, [ids_of(8, seed=2)])[0]
        assert r.finish_reason == "error"
        assert "rank 1 (cpu) ended (killed by signal 9)" in r.error and "reload" in r.error
        # The engine is dead with it: a later request is refused at once (no step waits on the
        # dead rank), and says why, as the server's /health does.
        assert "rank 1 (cpu) ended" in tp.dead
        with pytest.raises(EngineDeadError, match=r"rank 1 \(cpu\) ended .*reload"):
            run(tp, [ids_of(5, seed=3)])
    finally:
        tp.shutdown()
    again = load(path, devices="cpu,cpu", split="tensor")
    try:
        assert len(run(again, [ids_of(8, seed=1)])[0].token_ids) == GREEDY.max_tokens
        procs = workers(again)
    finally:
        again.shutdown()
    assert all(p.poll() is not None for p in procs)


def test_a_killed_rank_is_named_not_a_peer_that_reported_the_collective_it_left():
    """Rank 2 killed (SIGKILL) mid-step: rank 1 reports its collective's "connection reset by
    peer" and exits, maybe before rank 2 is seen ended; the error names rank 2, killed, not
    rank 1's gloo message (which rank it named was a race)."""
    from types import SimpleNamespace

    from engine.errors import ModelLoadError
    from engine.runner.tp_host import Ranks

    class Conn:
        def __init__(self, msgs):
            self.msgs = list(msgs)

        def poll(self, _timeout=0):
            return bool(self.msgs)

        def recv(self):
            return self.msgs.pop(0)

    ranks = Ranks(("cpu", "cpu", "cpu"))
    polls = iter([None, None])  # rank 2 is seen ended only after rank 1's report came

    ranks.procs = {1: SimpleNamespace(poll=lambda: 1),
                   2: SimpleNamespace(poll=lambda: next(polls, -signal.SIGKILL))}
    ranks.conns = {1: Conn([("error", "RuntimeError", "Read error: Connection reset by peer")]), 2: Conn([])}
    error = ranks.dead(RuntimeError("Connection closed by peer"))
    assert "rank 2 (cpu) ended (killed by signal 9)" in str(error), error
    assert "reset by peer" not in str(error)
    # a rank killed by a signal leaves no log: the error said "its log above says why"
    assert "out of memory is the usual cause" in str(error) and "log above" not in str(error)
    # one that exited (an error of its own) has a log, wherever the host saw it end
    ranks.procs = {1: SimpleNamespace(poll=lambda: 1), 2: SimpleNamespace(poll=lambda: None)}
    ranks.conns = {1: Conn([]), 2: Conn([])}
    with pytest.raises(ModelLoadError, match=r"rank 1 \(cpu\) ended \(exit code 1\) while loading; its log above"):
        ranks.wait_ready(None)
    ranks.procs = {1: SimpleNamespace(poll=lambda: -signal.SIGKILL), 2: SimpleNamespace(poll=lambda: None)}
    with pytest.raises(ModelLoadError, match=r"killed by signal 9\) while loading, outside Hearth: out of memory"):
        ranks.wait_ready(None)


def test_a_step_failed_by_a_worded_error_logs_one_line_not_a_traceback(tiny_models, monkeypatch, caplog):
    """A step that fails with an error worded for a user (a rank that ended: EngineDeadError)
    logs it in one line; its traceback (a page of gloo frames on the terminal, before the
    request's own error) only with -v."""
    import logging

    from tests.engine.rank_ended import end_steps

    tp = load(tiny_models["llama-tied"], device="cpu")
    try:
        end_steps(monkeypatch, "tensor parallel: rank 1 (cpu) ended (killed by signal 9). reload it.")
        with caplog.at_level(logging.WARNING, logger="hearth.engine"):
            r = run(tp, [ids_of(8, seed=1)])[0]
    finally:
        tp.shutdown()
    assert r.finish_reason == "error" and "rank 1 (cpu) ended" in r.error
    (record,) = [rec for rec in caplog.records if "model step failed" in rec.getMessage()]
    assert "rank 1 (cpu) ended" in record.getMessage() and not record.exc_info


@pytest.mark.parametrize("when", ["at start", "while loading"])
def test_a_rank_that_dies_while_loading_fails_the_load_at_once(tiny_models, monkeypatch, when):
    """Killed before it connects, or while it loads: the load fails naming it (not after a
    collective's timeout), and nothing is left running. "while loading" kills it from rank
    0's first progress line after the ranks' group is made (both connected, rank 0 loading):
    a fixed delay raced a fast load."""
    import subprocess
    import threading

    import engine.runner.tp_host as tp_host

    started, said, killed = [], [], []

    class Recorded(subprocess.Popen):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            started.append(self)

    monkeypatch.setattr(tp_host.subprocess, "Popen", Recorded)

    def kill_at_start() -> None:
        while not started:
            time.sleep(0.01)
        started[0].kill()

    def progress(message: str) -> None:
        if when == "while loading" and not killed and any(m.startswith("tensor parallel: starting") for m in said):
            started[0].kill()
            killed.append(message)
        said.append(message)

    if when == "at start":
        threading.Thread(target=kill_at_start, daemon=True).start()
    before = time.monotonic()
    with pytest.raises(HearthError, match=r"rank 1 \(cpu\)"):
        load(tiny_models["llama3"], devices="cpu,cpu", split="tensor", progress=progress)
    assert time.monotonic() - before < 60
    assert started[0].wait(10) is not None
    assert when == "at start" or killed, said  # (killed while rank 0 was loading)


@pytest.mark.parametrize("options, words", [
    (dict(devices="cpu,cpu", split="tensor", quantization="bnb-int8"), "can't shard bitsandbytes"),
    # each rank's 48 MLP columns: int4 groups of 32 don't fit (refused on the rank's slice)
    (dict(devices="cpu,cpu", split="tensor", quantization="int4", quant_group_size=32), "its 48 input features"),
    (dict(devices="cpu,cpu,cpu", split="tensor"), "divisible by 3"),
    (dict(devices="cpu,cpu", split="tensor", split_ratio="1,2"), "--split-ratio sizes a layer split"),
    (dict(devices="cpu,cpu", split="tensor", force_fallback=True), "native models only"),
])
def test_what_tensor_parallel_cannot_do_is_refused_before_it_starts(tiny_models, options, words):
    before = time.monotonic()
    with pytest.raises(HearthError) as e:
        load(tiny_models["llama3"], **options)
    assert words in str(e.value)
    assert time.monotonic() - before < 30


@pytest.mark.gpu
@pytest.mark.parametrize("group", [False, True])
def test_world_size_one_on_a_gpu_matches_the_plain_load_with_graphs(tiny_models, group, monkeypatch):
    """On a GPU: the tensor-parallel path at world size 1 captures its decode graphs,
    launches greedy steps ahead (the broadcast of their tokens is the identity) and gives
    the plain load's tokens (float32). With ``HEARTH_TP_ONE_RANK_GROUP`` it does so in an
    NCCL group of one rank: the decode graphs hold NCCL's all-reduces, all-gathers of the
    logits and broadcasts of the tokens launched ahead, as on several GPUs; its prompt
    graphs too (timed in lock-step, the buckets every rank kept)."""
    prompts = [ids_of(n, seed=n) for n in (5, 37, 70)]
    path = tiny_models["llama3"]
    one = load(path, device="cuda")
    try:
        want = run(one, prompts) + run(one, prompts[:1], LOGPROBS)
    finally:
        one.shutdown()
    if group:
        monkeypatch.setenv("HEARTH_TP_ONE_RANK_GROUP", "1")
    tp = load(path, devices="cuda:0", split="tensor")
    try:
        assert tp.model_info.cuda_graphs, tp.model_info.cuda_graphs_off
        assert tp.model_info.tensor_parallel["backend"] == ("nccl" if group else None)
        got = run(tp, prompts) + run(tp, prompts[:1], LOGPROBS)
        assert tp.runner.graphs.replays > 0 and tp.runner.steps_ahead_used > 0
        assert tp.runner.prompt_graphs.replays > 0  # (the ranks keep the same prompt buckets)
    finally:
        tp.shutdown()
    assert_same(want, got, tol=2e-3)


def test_the_pre_flight_sizes_each_device_of_a_split(tiny_models, monkeypatch):
    """``check_model`` of a split sizes each device as the load plans it, and refuses a
    device that can't hold its share, naming it (the single-device check would have
    compared the whole model with the first device)."""
    from engine.api import OutOfMemoryError, check_model

    path = str(tiny_models["llama3"])
    one = check_model(path, device="cpu", dtype="float32", max_model_len=256)
    tp = check_model(path, devices="cpu,cpu", split="tensor", dtype="float32", max_model_len=256)
    assert [s.holds for s in tp.devices] == ["rank 0 of 2", "rank 1 of 2"]
    # each rank: half of every layer and of the vocabulary, half the KV heads
    assert tp.weights_bytes == pytest.approx(one.weights_bytes, rel=0.01)
    assert tp.devices[0].weights_bytes == tp.devices[1].weights_bytes
    assert tp.devices[0].kv_cache_bytes == 256 * 2 * 2 * 2 * 16 * 4  # tokens x K,V x layers x heads x dim x fp32
    layer = check_model(path, devices="cpu,cpu", split_ratio="1,1", dtype="float32", max_model_len=256)
    assert [s.holds for s in layer.devices] == ["layers 0-0, embedding", "layers 1-1, LM head"]
    assert layer.weights_bytes == one.weights_bytes
    import engine.loader.load_check as load_check

    monkeypatch.setattr(load_check, "free_memory_bytes", lambda d: (100_000, 200_000))
    with pytest.raises(OutOfMemoryError, match=r"cpu needs .* but has"):
        check_model(path, devices="cpu,cpu", split="tensor", dtype="float32", max_model_len=256)



@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
@pytest.mark.parametrize("family", ["llama3", "llama-tied", "mistral", "qwen2", "qwen3"])
def test_two_gpus_match_one_in_float32(tiny_models, family):
    """Issue 19 on a machine with two GPUs: tensor parallel over NCCL (its decode graphs
    holding the all-reduces, greedy steps launched ahead) and a layer split over both give
    one GPU's tokens and logprobs (float32)."""
    prompts = [ids_of(n, seed=n) for n in (5, 37, 70)]
    path = tiny_models[family]
    one = load(path, device="cuda")
    try:
        want = run(one, prompts) + run(one, prompts[:1], LOGPROBS)
    finally:
        one.shutdown()
    for options in (dict(split="tensor"), dict(split="layer")):
        two = load(path, devices="cuda:0,cuda:1", **options)
        try:
            assert two.model_info.cuda_graphs, two.model_info.cuda_graphs_off
            if options["split"] == "tensor":
                assert two.model_info.tensor_parallel["backend"] == "nccl"
            got = run(two, prompts) + run(two, prompts[:1], LOGPROBS)
            assert two.runner.graphs.replays > 0
        finally:
            two.shutdown()
        assert_same(want, got, tol=2e-3)
