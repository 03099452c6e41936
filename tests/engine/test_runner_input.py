"""The runner runs from a RunnerInput alone (plain data built here by hand, no scheduler),
and the engine sends the penalties' token context only for requests that need it."""

from __future__ import annotations

import pickle

import pytest
import torch

from engine.api import Engine, Request, SamplingParams
from engine.runner.io import NewRequest, RunnerInput, StepRow
from tests.conftest import engine_device

GREEDY_LP = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=2)


def ids_of(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 49152, (n,), generator=g).tolist()


def load(path, **kw) -> Engine:
    return Engine.load(str(path), device=engine_device(), dtype="float32", num_blocks=64,
                       block_size=16, max_model_len=256, **kw)


def reference(path, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
    """transformers' greedy continuation of ``prompt`` on the same weights, and the
    log-probability of each chosen token."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    ids = list(prompt)
    lps = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids])).logits[0, -1].float()
            tok = int(logits.argmax())
            lps.append(float(torch.log_softmax(logits, -1)[tok]))
            ids.append(tok)
    return ids[len(prompt):], lps


def drive(runner, prompts: dict[str, list[int]], params: SamplingParams, chunk: int):
    """Run requests through ``runner`` by hand: request "a" reads its prompt in one row,
    the others in chunks of ``chunk`` tokens (the first chunks sample nothing), beside
    the decode rows of those already generating. Returns each request's tokens and the
    logprobs of the chosen ones."""
    tables = {rid: list(range(63 - 8 * i, 63 - 8 * i - 8, -1)) for i, rid in enumerate(prompts)}
    tokens = {rid: list(p) for rid, p in prompts.items()}
    done = {rid: 0 for rid in prompts}  # tokens with K/V in the cache
    out = {rid: ([], []) for rid in prompts}
    new = [NewRequest(rid, params, len(p)) for rid, p in prompts.items()]
    while any(len(o[0]) < params.max_tokens for o in out.values()):
        rows = []
        for rid, toks in tokens.items():
            if len(out[rid][0]) >= params.max_tokens:
                continue
            start = done[rid]
            whole = rid == "a" or start >= len(prompts[rid])  # a's prompt, or one decode token
            n = len(toks) - start if whole else min(chunk, len(toks) - start)
            rows.append(StepRow(rid, toks[start:start + n], start, tables[rid], start + n == len(toks)))
        # Through pickle, as to a runner in another process: it gets plain data, no
        # reference to anything of ours.
        inp = pickle.loads(pickle.dumps(RunnerInput(rows, new)))
        res = pickle.loads(pickle.dumps(runner.execute(inp)))
        new = []
        sampled = iter(zip(res.token_ids, res.logprobs))
        for row in rows:
            done[row.request_id] += len(row.token_ids)
            if row.sample:
                tok, lp = next(sampled)
                assert lp.token_id == tok and lp.rank == 1
                tokens[row.request_id].append(tok)
                out[row.request_id][0].append(tok)
                out[row.request_id][1].append(lp.logprob)
    return out


@pytest.mark.parametrize("fallback", [False, True], ids=["native", "transformers-fallback"])
def test_the_runner_runs_from_runner_input_alone(tiny_models, fallback):
    path = tiny_models["llama3"]
    prompts = {"a": ids_of(11, seed=1), "b": ids_of(21, seed=2), "c": ids_of(5, seed=3)}
    eng = load(path, force_fallback=fallback)
    try:  # the engine idles: only its runner is used, from RunnerInputs built here
        runner = eng.runner
        assert type(runner).__name__ == ("HFRunner" if fallback else "ModelRunner")
        got = drive(runner, prompts, GREEDY_LP, chunk=8)
        for rid, prompt in prompts.items():
            want_ids, want_lps = reference(path, prompt, GREEDY_LP.max_tokens)
            assert got[rid][0] == want_ids, rid
            torch.testing.assert_close(got[rid][1], want_lps, atol=2e-4, rtol=1e-4)
        assert set(runner._requests) == set(prompts)
        with pytest.raises(ValueError, match="never announced"):
            runner.execute(RunnerInput([StepRow("z", [5], 0, [0], True)]))
        # A finished request leaves nothing behind (the fallback's cache included).
        assert runner.execute(RunnerInput([], finished=list(prompts))).token_ids == []
        assert runner._requests == {}
        assert getattr(runner, "_caches", {}) == {}
    finally:
        eng.shutdown()


def test_the_penalties_token_context_is_sent_only_when_needed(tiny_models):
    eng = load(tiny_models["llama-tied"], max_num_batched_tokens=16)
    real, steps = eng.runner.execute, []

    def spy(inp: RunnerInput):
        # The context is the sequence's own (growing) token list: copy what was sent now.
        steps.append((inp, [None if r.context is None else list(r.context) for r in inp.rows]))
        return real(inp)

    eng.runner.execute = spy
    kinds = {
        "greedy": SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True),
        "sampled": SamplingParams(max_tokens=5, temperature=0.8, seed=3, ignore_eos=True),
        "repetition": SamplingParams(max_tokens=5, temperature=0.0, repetition_penalty=1.3,
                                     ignore_eos=True),
        "presence": SamplingParams(max_tokens=5, temperature=0.7, seed=5, presence_penalty=0.5,
                                   frequency_penalty=0.3, ignore_eos=True),
    }
    try:
        # 20-token prompts: two chunks under a 16-token budget, the first samples nothing.
        prompts = {rid: ids_of(20, seed=i) for i, rid in enumerate(kinds)}
        results = {rid: eng.submit(Request(prompt_token_ids=prompts[rid], params=p, request_id=rid)).result()
                   for rid, p in kinds.items()}
        eng.runner.execute = real
        announced = [n.request_id for inp, _ in steps for n in inp.new_requests]
        assert sorted(announced) == sorted(kinds)  # once each
        finished = [rid for inp, _ in steps for rid in inp.finished]
        assert sorted(finished) == sorted(kinds)  # the last one while the engine idles
        assert eng.runner._requests == {}
        sent = {rid: [] for rid in kinds}
        for inp, contexts in steps:
            for row, ctx in zip(inp.rows, contexts):
                sent[row.request_id].append((row.sample, ctx))
        for rid in ("greedy", "sampled"):
            assert all(ctx is None for _, ctx in sent[rid]), rid
        for rid in ("repetition", "presence"):
            out = results[rid].token_ids
            assert [ctx for sample, ctx in sent[rid] if not sample] == [None]
            assert [ctx for sample, ctx in sent[rid] if sample] == [prompts[rid] + out[:k] for k in range(5)]
    finally:
        eng.runner.execute = real
        eng.shutdown()
    # The context the runner sliced is the one the penalty needs: transformers agrees.
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(str(tiny_models["llama-tied"]), dtype=torch.float32).eval()
    with torch.no_grad():
        want = ref.generate(torch.tensor([prompts["repetition"]]), do_sample=False, max_new_tokens=5,
                            min_new_tokens=5, repetition_penalty=1.3, eos_token_id=None,
                            pad_token_id=0)[0, 20:].tolist()
    assert results["repetition"].token_ids == want


class _EagerGraphs:
    """DecodeGraphs' interface on a CPU: runs the decode step eagerly, so the pipelined
    path (a step launched ahead from the previous step's device tokens) runs in CI."""

    def __init__(self, runner, max_batch: int, max_model_len: int) -> None:
        self.runner, self.max_batch, self.max_model_len = runner, max_batch, max_model_len
        self.replays = self.launched = 0

    @torch.inference_mode()
    def run(self, ids, positions, slots, seq_lens, tables):
        r = self.runner
        if isinstance(ids, torch.Tensor):  # last step's argmax, still on the device
            self.launched += 1
            ids = ids.tolist()
        meta = r._metadata(tables, positions, [1] * len(positions))
        assert meta.slot_mapping.tolist() == slots
        self.replays += 1
        return r.model.compute_logits(r.model(torch.tensor(ids, device=r.device), torch.tensor(positions, device=r.device),
                                                  r.kv_caches, meta))


def test_pipelined_decode_from_runner_input(tiny_models):
    """Greedy decode steps launched ahead give the eager tokens; the step that samples a
    lone request's last token launches nothing."""
    import types

    # Eager first (on a GPU too: no graphs of its own), then the stand-in graphs.
    eng = load(tiny_models["llama-tied"], max_num_seqs=3, enable_prefix_caching=False, enforce_eager=True)
    try:
        prompts = [ids_of(n, seed=n) for n in (3, 9, 14, 6, 20)]
        params = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for m in (7, 3, 12, 5, 9)]
        params[3] = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True, repetition_penalty=1.2)

        def run_all():
            with eng._cv:  # all queued before the loop looks: the same steps every time
                handles = [eng.submit(Request(prompt_token_ids=p, params=q)) for p, q in zip(prompts, params)]
            return [h.result().token_ids for h in handles]

        eager = run_all()
        runner = eng.runner
        runner.graphs = graphs = _EagerGraphs(runner, max_batch=4, max_model_len=256)
        runner._stage = lambda t: (t.clone(), types.SimpleNamespace(synchronize=lambda: None))
        eng.scheduler.lookahead_slots = 1  # what the engine asks for when graphs exist
        assert run_all() == eager
        assert graphs.launched > 0 and runner.steps_ahead_used == graphs.launched
        launched, used = graphs.launched, runner.steps_ahead_used
        eng.submit(Request(prompt_token_ids=prompts[0], params=params[2])).result()
        # Alone, max_tokens=12: decode steps sample tokens 2..12; each launches the next
        # except the last one's, and every launched step is used.
        assert graphs.launched - launched == 12 - 2
        assert runner.steps_ahead_used - used == 12 - 2
    finally:
        eng.shutdown()


def test_the_fallback_drops_a_preempted_requests_cache(tiny_models):
    """Preempted ids reach the runner; the fallback's cache for them goes at once, and
    recomputed requests (seeded sampling included: the RNG is kept) still match a roomy
    engine's."""
    path = tiny_models["llama-tied"]
    prompts = [ids_of(30 + 7 * i, seed=100 + i) for i in range(4)]
    params = [SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True),
              SamplingParams(max_tokens=30, temperature=0.9, seed=7, ignore_eos=True)] * 2
    roomy = load(path, force_fallback=True)
    # 8 blocks of 16 tokens cannot hold four ~70-token sequences at once: preemption.
    tight = Engine.load(str(path), device=engine_device(), dtype="float32", num_blocks=8, block_size=16,
                        max_model_len=128, force_fallback=True)
    runner, dropped = tight.runner, []
    real = runner.execute

    def spy(inp: RunnerInput):
        res = real(inp)
        dropped.extend(inp.preempted)
        assert not set(inp.preempted) & set(runner._caches)
        return res

    runner.execute = spy
    try:
        ref = [roomy.submit(Request(prompt_token_ids=p, params=q)).result().token_ids
               for p, q in zip(prompts, params)]
        got = [h.result().token_ids for h in [tight.submit(Request(prompt_token_ids=p, params=q))
                                              for p, q in zip(prompts, params)]]
        assert tight.stats().num_preemptions > 0 and len(dropped) == tight.stats().num_preemptions
        assert got == ref
    finally:
        runner.execute = real
        roomy.shutdown()
        tight.shutdown()


def test_pipelined_decode_with_a_grammar_masks_the_step_launched_ahead(tiny_models):
    """Greedy rows with a JSON schema take the pipelined decode too (the launched step's
    logits are masked when the engine asks for it): beside plain greedy rows and alone,
    the same tokens as the eager steps, valid JSON, and every launched step used."""
    import json
    import types

    import jsonschema

    from engine.api import StructuredOutput

    schema = {"type": "object", "properties": {"color": {"enum": ["red", "green"]},
                                               "n": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["color", "n"], "additionalProperties": False}
    so = StructuredOutput("json_schema", json.dumps(schema))
    eng = load(tiny_models["llama-tied"], max_num_seqs=3, enable_prefix_caching=False, enforce_eager=True)
    try:
        prompts = [ids_of(n, seed=n) for n in (5, 11, 8)]
        params = [SamplingParams(max_tokens=64, temperature=0.0, structured=so),
                  SamplingParams(max_tokens=9, temperature=0.0, ignore_eos=True),
                  SamplingParams(max_tokens=64, temperature=0.0, structured=so)]

        def run_all():
            with eng._cv:
                handles = [eng.submit(Request(prompt_token_ids=p, params=q)) for p, q in zip(prompts, params)]
            return [h.result() for h in handles]

        eager = run_all()
        runner = eng.runner
        runner.graphs = graphs = _EagerGraphs(runner, max_batch=4, max_model_len=256)
        runner._stage = lambda t: (t.clone(), types.SimpleNamespace(synchronize=lambda: None))
        eng.scheduler.lookahead_slots = 1
        piped = run_all()
        assert [c.token_ids for c in piped] == [c.token_ids for c in eager]
        for c in (piped[0], piped[2]):
            assert c.finish_reason == "stop", c.text
            jsonschema.validate(json.loads(c.text), schema)
        # a step launched after the last one's EOS (the end by "stop" isn't foreseen) is the
        # only one dropped
        assert graphs.launched > 0 and runner.steps_ahead_used == graphs.launched - 1
        launched, used = graphs.launched, runner.steps_ahead_used
        alone = eng.submit(Request(prompt_token_ids=prompts[0], params=params[0])).result()
        assert alone.token_ids == eager[0].token_ids and alone.finish_reason == "stop"
        # decode steps sample tokens 2..n, each launching the next; all but the one after EOS used
        assert graphs.launched - launched == len(alone.token_ids) - 1
        assert runner.steps_ahead_used - used == len(alone.token_ids) - 2
    finally:
        eng.shutdown()
