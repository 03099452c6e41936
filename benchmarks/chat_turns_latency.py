"""Time to first token of chat turns: each turn is the whole conversation so far plus a new
message, so all but its new tokens come from the prefix cache (GPU only).

    PYTHONPATH=. python benchmarks/chat_turns_latency.py [--shape llama-8b] [--json F]

One engine; the same conversation (random token ids, fixed seed) runs twice: with the
prompt graphs the load kept, and with them switched off (``runner.prompt_graphs = None``:
every turn's new tokens then run eagerly through the paged prefill path). Each turn adds a
``--message``-token user message to the previous turn's context and answer
(``--answer`` greedy tokens). The first turn is a fresh prompt of ``--system`` tokens plus
a message. Prints one line per turn and writes JSON rows with both timings.
"""

from __future__ import annotations

import argparse
import statistics
import time

from _timing import dump_rows


def conversation_ttfts(engine, turns: int, system: int, message: int, answer: int, seed: int) -> list[dict]:
    import torch

    from engine.api import Request, SamplingParams

    gen = torch.Generator().manual_seed(seed)
    params = SamplingParams(max_tokens=answer, temperature=0.0, ignore_eos=True)
    context = torch.randint(3, 30000, (system,), generator=gen).tolist()
    rows = []
    for turn in range(turns):
        prompt = context + torch.randint(3, 30000, (message,), generator=gen).tolist()
        t = time.perf_counter()
        done = engine.submit(Request(prompt_token_ids=prompt, params=params)).result()
        wall = 1e3 * (time.perf_counter() - t)
        rows.append({"turn": turn, "prompt_len": len(prompt), "ttft_ms": done.timings.ttft_ms, "wall_ms": wall})
        context = prompt + done.token_ids
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama-8b")
    ap.add_argument("--turns", type=int, default=8)
    ap.add_argument("--system", type=int, default=200)
    ap.add_argument("--message", type=int, default=60)
    ap.add_argument("--answer", type=int, default=40)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import torch

    from engine.api import Engine

    engine = Engine.load(f"shape:{args.shape}", device="cuda", max_model_len=4096, max_num_seqs=4,
                         max_num_batched_tokens=4096)
    graphs = engine.runner.prompt_graphs
    results = {}
    for label, pg in (("warm-up", graphs), ("prompt graphs", graphs), ("eager", None)):
        engine.runner.prompt_graphs = pg
        # A new seed per run: a repeated conversation would be served from the prefix cache.
        results[label] = conversation_ttfts(engine, args.turns, args.system, args.message, args.answer,
                                            seed=len(results))
    engine.runner.prompt_graphs = graphs
    info = {k: getattr(engine.model_info, k) for k in ("prompt_graph_tokens", "prompt_graph_ms")}
    engine.shutdown()
    rows = []
    for g, e in zip(results["prompt graphs"], results["eager"]):
        rows.append({"turn": g["turn"], "prompt_len": g["prompt_len"], "new_tokens": args.message,
                     "ttft_ms_graphs": g["ttft_ms"], "ttft_ms_eager": e["ttft_ms"]})
        print(f"turn {g['turn']}: {g['prompt_len']:5d} tokens of context, TTFT {g['ttft_ms']:6.2f} ms "
              f"with prompt graphs, {e['ttft_ms']:6.2f} ms eagerly")
    later = rows[1:]
    print(f"{args.shape} on {torch.cuda.get_device_name()}: turns after the first, median TTFT "
          f"{statistics.median(r['ttft_ms_graphs'] for r in later):.2f} ms with prompt graphs, "
          f"{statistics.median(r['ttft_ms_eager'] for r in later):.2f} ms eagerly")
    dump_rows(args.json, args.shape, rows, **info)


if __name__ == "__main__":
    main()
