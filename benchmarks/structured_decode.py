"""Batch-1 decode speed with a JSON-schema constraint against without, on the CPU, with the
default model (SmolLM2-135M, its own Q4_1 GGUF weights; the CPU C decode step).

Three requests from the same chat prompt, greedy, ``--tokens`` new tokens each, run in
turn ``--reps`` times (interleaved, so a busy neighbour slows all of them alike):

- ``plain``: no constraint (ignore_eos, so it runs the full length);
- ``schema-string``: one free string field (``{"story": ...}``), where the model writes
  text inside the grammar for most of its steps (here it never closes the string in
  ``--tokens``, so it runs the full length, like ``plain``);
- ``schema-object``: the realistic object schema of benchmarks/grammar_mask.py, which
  the model completes (stop) in fewer tokens: structural steps, where the mask is
  sparse, dominate.

Decode tok/s comes from the request's own timings (first token excluded); the row keeps
the best of the reps and all of them, plus the load average (2 shared cores here). The
grammar's own host work is also timed inside the engine (the mask fill, its apply in the
sampler, the matcher's advance: wrapped with timers), per constrained step, which the
machine's noise blurs much less than a difference of two tok/s.

    python benchmarks/structured_decode.py [--reps 5] [--tokens 128] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.grammar_mask import SCHEMA  # noqa: E402

MESSAGES = [{"role": "user", "content": "Describe a person (name, age, email, role, tags, address, whether "
                                        "active, a score) as JSON."}]
LONG_STRING = {"type": "object", "properties": {"story": {"type": "string"}},
               "required": ["story"], "additionalProperties": False}


class GrammarTimers:
    """Wraps the runner's grammar calls with timers (what each constrained step spends)."""

    def __init__(self) -> None:
        import engine.runner.grammar as grammar
        import engine.runner.request_state as request_state
        import engine.runner.sampler as sampler

        self.us: dict[str, list] = {}
        self.kind = ""  # the kind of request being timed
        self._undo = []
        for module, name, key in ((request_state, "grammar_masks", "fill"),
                                  (sampler, "apply_token_bitmask", "apply")):
            self._wrap(module, name, key)
        self._wrap(grammar.RowGrammar, "advance", "advance")

    def _wrap(self, owner, name: str, key: str) -> None:
        original = getattr(owner, name)

        def timed(*args, **kw):
            t0 = time.perf_counter()
            out = original(*args, **kw)
            if key != "fill" or out is not None:  # grammar_masks of a plain batch: None, not counted
                self.us.setdefault(f"{self.kind}/{key}", []).append((time.perf_counter() - t0) * 1e6)
            return out

        setattr(owner, name, timed)
        self._undo.append((owner, name, original))

    def summary(self) -> dict:
        out = {}
        for key, samples in self.us.items():
            s = sorted(samples)
            if s:
                out[key] = {"p50_us": round(s[len(s) // 2], 1), "mean_us": round(sum(s) / len(s), 1), "n": len(s)}
        return out


def main() -> None:
    from engine.api import Engine, Request, SamplingParams, StructuredOutput

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    engine = Engine.load(None, device="cpu")
    try:
        ids = engine.tokenizer.apply_chat_template(MESSAGES)
        kinds = {
            "plain": SamplingParams(temperature=0.0, max_tokens=args.tokens, ignore_eos=True),
            "schema-string": SamplingParams(temperature=0.0, max_tokens=args.tokens,
                                            structured=StructuredOutput("json_schema", json.dumps(LONG_STRING))),
            "schema-object": SamplingParams(temperature=0.0, max_tokens=args.tokens,
                                            structured=StructuredOutput("json_schema", json.dumps(SCHEMA))),
        }
        for params in kinds.values():  # warm: the first structured request builds the vocabulary
            engine.submit(Request(prompt_token_ids=ids, params=params)).result()
        timers = GrammarTimers()
        runs: dict[str, list] = {k: [] for k in kinds}
        last = {}
        for _ in range(args.reps):
            for name, params in kinds.items():
                timers.kind = name
                c = engine.submit(Request(prompt_token_ids=ids, params=params)).result()
                runs[name].append((c.timings.decode_tok_s, len(c.token_ids), c.finish_reason))
                last[name] = c.text
        rows = []
        for name, r in runs.items():
            best = max(x[0] for x in r)
            rows.append({"kind": name, "decode_tok_s_best": round(best, 1), "step_ms_best": round(1e3 / best, 3),
                         "decode_tok_s_runs": [round(x[0], 1) for x in r], "tokens": r[0][1],
                         "finish": r[0][2], "text_head": last[name][:160]})
            print(rows[-1], flush=True)
        plain = rows[0]["step_ms_best"]
        for row in rows[1:]:
            row["step_overhead_vs_plain"] = round(row["step_ms_best"] / plain - 1, 4)
        out = {"what": "batch-1 greedy decode, JSON-schema constrained vs plain, default model on the CPU",
               "model": engine.model_info.name, "quantization": engine.model_info.quantization,
               "cpu_decode": engine.model_info.cpu_decode, "threads": args.threads, "tokens": args.tokens,
               "reps": args.reps, "load_avg": os.getloadavg()[0], "rows": rows,
               "grammar_host_us_per_constrained_step": timers.summary()}
        print(out["grammar_host_us_per_constrained_step"], flush=True)
    finally:
        engine.shutdown()
    if args.out:
        args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
