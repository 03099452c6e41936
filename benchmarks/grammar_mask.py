"""Grammar engines for structured outputs, measured on the CPU: llguidance against xgrammar.

What a constrained decode step adds is the host's work between two model steps: compute
the allowed-token mask for the matcher's state, apply it to the logits row, and advance
the matcher by the sampled token. This script times exactly that, one engine at a time,
walking a realistic JSON answer token by token (the answer as the model's tokenizer
splits it, so every step is one the grammar allows), at the vocabularies that matter:

- SmolLM2's 49,152 tokens (the bundled default model, and the tiny test fixtures, which
  reuse its tokenizer);
- a 128,256-token byte-level BPE vocabulary, Llama 3's size. No Llama 3 tokenizer can be
  fetched here, so it is SmolLM2's tokenizer grown to 128,256 entries with merges of
  existing token pairs (each new token is a concatenation of two real ones, so the
  token strings look like a large BPE vocabulary's: longer words and word pieces).

Also timed: the one-off preparation of each tokenizer (per model load) and the schema's
compile (per request), with the engines' caches off. Rows record per-step mask time
(mean, p50, p99 over the walk), mask+apply+advance, and compile.

    python benchmarks/grammar_mask.py [--reps 3] [--out FILE.json]

xgrammar is optional (``pip install --target DIR xgrammar``, then PYTHONPATH=DIR): it is
not a Hearth dependency, only a candidate.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 64},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string", "pattern": "^[a-z0-9._]+@[a-z0-9.]+\\.[a-z]{2,}$"},
        "role": {"enum": ["admin", "editor", "viewer"]},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 8},
        "address": {
            "type": "object",
            "properties": {"street": {"type": "string"}, "city": {"type": "string"},
                           "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["street", "city", "zip"],
            "additionalProperties": False,
        },
        "active": {"type": "boolean"},
        "score": {"type": "number"},
    },
    "required": ["name", "age", "email", "role", "tags", "address", "active", "score"],
    "additionalProperties": False,
}
ANSWER = {
    "name": "Ada Lovelace", "age": 36, "email": "ada.lovelace@analytical.org", "role": "editor",
    "tags": ["mathematics", "poetry", "engines of difference"],
    "address": {"street": "12 St James's Square", "city": "London", "zip": "10001"},
    "active": True, "score": 98.25,
}


def smollm2_tokenizer():
    from transformers import AutoTokenizer

    from engine.loader.resolve import resolve_model

    return AutoTokenizer.from_pretrained(str(resolve_model(None).path), local_files_only=True)


def grown_tokenizer(base, size: int = 128_256):
    """``base`` (a fast byte-level BPE tokenizer) grown to ``size`` tokens by merging pairs
    of its own tokens: see the module docstring."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(base.backend_tokenizer.to_str())
    model = spec["model"]
    vocab: dict[str, int] = model["vocab"]
    merges = model["merges"]
    special = {t["content"] for t in spec.get("added_tokens", [])}
    words = [w for w in sorted(vocab, key=vocab.get) if w not in special and len(w) > 1]
    # Deterministic pairs: a word-start piece ("Ġ...") followed by a continuation piece.
    starts = [w for w in words if w.startswith("Ġ")]
    conts = [w for w in words if not w.startswith("Ġ") and w.isalpha()]
    n = len(vocab)
    i = 0
    while n < size:
        a, b = starts[i % len(starts)], conts[(i * 7919) % len(conts)]
        i += 1
        if a + b in vocab:
            continue
        vocab[a + b] = n
        merges.append([a, b] if merges and isinstance(merges[0], list) else f"{a} {b}")
        n += 1
    tok = Tokenizer.from_str(json.dumps(spec))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=base.eos_token)


#: A free-text field: inside a string nearly every token is allowed, the mask's costly case.
STRING_SCHEMA = {"type": "object", "properties": {"story": {"type": "string"}}, "required": ["story"],
                 "additionalProperties": False}
STRING_ANSWER = {"story": (
    "The lighthouse keeper found the bottle wedged between two rocks at low tide. Inside was a "
    "letter, written in a careful hand, from a sailor who had passed the island forty years "
    "before. He read it twice by the lamp, then climbed the stairs, counting each of the one "
    "hundred and twelve steps, and wondered whether anyone had ever answered it.")}
CASES = {"object": (SCHEMA, ANSWER), "long-string": (STRING_SCHEMA, STRING_ANSWER)}


def walk_tokens(hf, answer=ANSWER) -> list[int]:
    return hf.encode(json.dumps(answer), add_special_tokens=False)


def _summary(samples_us: list[float]) -> dict:
    s = sorted(samples_us)
    return {"mean_us": round(statistics.fmean(s), 1), "p50_us": round(s[len(s) // 2], 1),
            "p99_us": round(s[min(len(s) - 1, int(len(s) * 0.99))], 1), "steps": len(s)}


def bench_llguidance(hf, vocab: int, reps: int, case: str) -> dict:
    import llguidance
    import llguidance.hf
    import llguidance.torch as llt

    t0 = time.perf_counter()
    lltok = llguidance.hf.from_tokenizer(hf, n_vocab=vocab)
    prep = time.perf_counter() - t0
    tokens = walk_tokens(hf, CASES[case][1])
    schema = json.dumps(CASES[case][0])
    compiles, mask_us, step_us = [], [], []
    logits = torch.randn(1, vocab)
    mask = llt.allocate_token_bitmask(1, vocab)
    for _ in range(reps):
        t0 = time.perf_counter()
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema)
        matcher = llguidance.LLMatcher(lltok, grammar)
        llt.fill_next_token_bitmask(matcher, mask)  # the first mask builds the lexer's start state
        compiles.append((time.perf_counter() - t0) * 1e3)
        assert not matcher.is_error(), matcher.get_error()
        matcher = llguidance.LLMatcher(lltok, grammar)
        for t in tokens:
            t0 = time.perf_counter()
            llt.fill_next_token_bitmask(matcher, mask)
            t1 = time.perf_counter()
            row = logits.clone()
            apply_bitmask(row, mask)
            ok = matcher.consume_token(t)
            t2 = time.perf_counter()
            assert ok, matcher.get_error()
            mask_us.append((t1 - t0) * 1e6)
            step_us.append((t2 - t0) * 1e6)
        llt.fill_next_token_bitmask(matcher, mask)
        assert matcher.is_accepting()
    return {"engine": "llguidance", "tokenizer_prep_ms": round(prep * 1e3, 1),
            "compile_ms_best": round(min(compiles), 2), "compile_ms_runs": [round(c, 2) for c in compiles],
            "mask": _summary(mask_us), "mask_apply_advance": _summary(step_us)}


def bench_xgrammar(hf, vocab: int, reps: int, case: str) -> dict:
    import xgrammar as xgr

    t0 = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=vocab)
    compiler = xgr.GrammarCompiler(info, cache_enabled=False)
    prep = time.perf_counter() - t0
    tokens = walk_tokens(hf, CASES[case][1])
    schema = json.dumps(CASES[case][0])
    compiles, mask_us, step_us = [], [], []
    logits = torch.randn(1, vocab)
    mask = xgr.allocate_token_bitmask(1, vocab)
    for _ in range(reps):
        t0 = time.perf_counter()
        compiled = compiler.compile_json_schema(schema, any_whitespace=False)
        matcher = xgr.GrammarMatcher(compiled)
        matcher.fill_next_token_bitmask(mask)
        compiles.append((time.perf_counter() - t0) * 1e3)
        matcher = xgr.GrammarMatcher(compiled)
        for t in tokens:
            t0 = time.perf_counter()
            matcher.fill_next_token_bitmask(mask)
            t1 = time.perf_counter()
            row = logits.clone()
            apply_bitmask(row, mask)
            ok = matcher.accept_token(t)
            t2 = time.perf_counter()
            assert ok, f"xgrammar refused token {t}"
            mask_us.append((t1 - t0) * 1e6)
            step_us.append((t2 - t0) * 1e6)
    return {"engine": "xgrammar", "tokenizer_prep_ms": round(prep * 1e3, 1),
            "compile_ms_best": round(min(compiles), 2), "compile_ms_runs": [round(c, 2) for c in compiles],
            "mask": _summary(mask_us), "mask_apply_advance": _summary(step_us)}


def apply_bitmask(logits: torch.Tensor, mask: torch.Tensor) -> None:
    """The same apply for both engines (Hearth's own, engine/runner/grammar.py)."""
    from engine.runner.grammar import apply_token_bitmask

    apply_token_bitmask(logits, mask)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(1)
    base = smollm2_tokenizer()
    vocabs = {"smollm2-49152": (base, len(base)), "bpe-128256": None}
    grown = grown_tokenizer(base)
    vocabs["bpe-128256"] = (grown, len(grown))
    rows = []
    for name, (hf, vocab) in vocabs.items():
        for case in CASES:
            for bench in (bench_llguidance, bench_xgrammar):
                try:
                    row = bench(hf, vocab, args.reps, case)
                except ImportError as e:
                    row = {"engine": bench.__name__.removeprefix("bench_"), "skipped": str(e)}
                row = {"vocab": name, "vocab_size": vocab, "case": case, **row}
                print(row, flush=True)
                rows.append(row)
    out = {"what": "grammar engines' per-step mask cost and schema compile time, CPU, 1 thread",
           "cases": {c: {"schema": sch, "answer_tokens": {n: len(walk_tokens(v[0], ans)) for n, v in vocabs.items()}}
                     for c, (sch, ans) in CASES.items()},
           "cpu": os.uname().machine, "load_avg": os.getloadavg()[0], "torch": torch.__version__,
           "rows": rows}
    if args.out:
        args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
