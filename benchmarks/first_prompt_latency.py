"""Time to first token of the first prompts after load, each at a length not seen before.

    PYTHONPATH=. python benchmarks/first_prompt_latency.py [--shape llama-1b] [--json F]

Per-shape work that is not prepared at load (cuDNN's SDPA plans: 70-90 ms each on an
H100) shows up here as a first prompt far slower than the ones after it.
"""

from __future__ import annotations

import argparse
import time

from _timing import dump_rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama-1b")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import torch

    from engine.api import Engine, Request, SamplingParams

    engine = Engine.load(f"shape:{args.shape}", device="cuda", max_model_len=4096, max_num_seqs=4,
                         max_num_batched_tokens=4096)
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for n in (1000, 1001, 1777, 1779, 3001, 3003, 1000):
        prompt = torch.randint(3, 30000, (n,), generator=gen).tolist()
        t = time.perf_counter()
        engine.submit(Request(prompt_token_ids=prompt, params=params)).result()
        rows.append({"prompt_len": n, "ttft_ms": 1e3 * (time.perf_counter() - t)})
        print(f"prompt {n:5d} tokens: {rows[-1]['ttft_ms']:7.1f} ms")
    info = {k: getattr(engine.model_info, k) for k in ("prompt_attention_lengths", "batch1_matmul")}
    engine.shutdown()
    print(info)
    dump_rows(args.json, args.shape, rows, **info)


if __name__ == "__main__":
    main()
