"""First decode baseline: Hearth's torch backend vs transformers, same shape, same run.

Random weights (fixed seed), batch 1, a 128-token prompt, 256 greedy new tokens, EOS
ignored. Hearth is driven through its real core (Scheduler + BlockManager + ModelRunner:
paged cache, torch attention backend, device sampler); transformers runs its eager
``generate`` with SDPA. Writes rows in the BENCHMARKS.md shape.

    PYTHONPATH=. python benchmarks/decode_baseline.py --shapes llama-1b,llama-8b --json out.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import time

import torch


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def hearth_decode(shape: str, device, prompt_len: int, new_tokens: int, repeats: int, batch: int = 1) -> dict:
    from engine.core.block_manager import BlockManager
    from engine.core.scheduler import Scheduler
    from engine.core.sequence import Sequence
    from engine.config import load_config
    from engine.models.spec import ModelSpec
    from engine.runner.bring_up import RandomWeights
    from engine.runner.io import NewRequest, RunnerInput, StepRow
    from engine.runner.model_runner import ModelRunner
    from engine.sampling_params import SamplingParams
    from engine.shapes import shape_config

    spec = ModelSpec.from_config(shape_config(shape))
    dtype = torch.bfloat16
    max_len = prompt_len + new_tokens + 16
    blocks = (-(-max_len // 16)) * batch + 8
    config = load_config(attention="torch", num_blocks=blocks, block_size=16, max_num_seqs=batch)
    runner = ModelRunner.create(config, spec, RandomWeights(0), device=device, dtype=dtype, attention="torch",
                                max_model_len=max_len)
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    gen = torch.Generator().manual_seed(1)

    def runner_input(out, announced: set) -> RunnerInput:
        """The step as the engine hands it to the runner (greedy: no token context)."""
        new, rows = [], []
        for sc in out.scheduled:
            seq = sc.seq
            if seq.request_id not in announced:
                announced.add(seq.request_id)
                new.append(NewRequest(seq.request_id, seq.params, len(seq.prompt_token_ids)))
            start = seq.num_computed_tokens
            rows.append(StepRow(seq.request_id, seq.token_ids[start:start + sc.num_new_tokens], start,
                                seq.block_table, sc.sample))
        return RunnerInput(rows, new, (), [s.request_id for s in out.preempted], out.num_waiting)

    def one_run():
        announced = set()
        bm = BlockManager(blocks, 16, enable_prefix_caching=False)
        sched = Scheduler(bm, max_num_seqs=batch, max_num_batched_tokens=max(2048, prompt_len * batch))
        seqs = []
        for i in range(batch):
            ids = torch.randint(0, spec.vocab_size, (prompt_len,), generator=gen).tolist()
            seqs.append(Sequence(f"r{i}", ids, params=params))
            sched.add(seqs[-1])
        t_first = None
        _sync()
        t0 = time.perf_counter()
        while sched.has_work():
            out = sched.schedule()
            res = runner.execute(runner_input(out, announced))
            sched.update(out, res.token_ids)
            for s in list(seqs):
                if s.num_output_tokens >= new_tokens and not s.is_finished:
                    sched.finish(s.request_id, "length")
            if t_first is None:
                _sync()
                t_first = time.perf_counter()
        _sync()
        t1 = time.perf_counter()
        runner.execute(RunnerInput([], finished=[s.request_id for s in seqs]))
        # decode rate: tokens after the first, per sequence
        return (new_tokens - 1) / (t1 - t_first), (t_first - t0) * 1e3

    one_run()  # warm-up
    rates, ttfts = zip(*[one_run() for _ in range(repeats)])
    weight_bytes = runner.weight_bytes()
    del runner
    torch.cuda.empty_cache()
    return {"decode_tok_s": statistics.median(rates) * (batch if batch > 1 else 1),
            "ttft_ms": statistics.median(ttfts), "weight_bytes": weight_bytes}


def hf_decode(shape: str, device, prompt_len: int, new_tokens: int, repeats: int, batch: int = 1) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM

    from engine.shapes import shape_config

    cfg_dict = shape_config(shape)
    model_type = cfg_dict.pop("model_type")
    cfg = AutoConfig.for_model(model_type, **cfg_dict)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    gen = torch.Generator().manual_seed(1)

    def one_run():
        ids = torch.randint(0, cfg.vocab_size, (batch, prompt_len), generator=gen).to(device)
        _sync()
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False, pad_token_id=0)
        _sync()
        t1 = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                           eos_token_id=None, pad_token_id=0)
        _sync()
        t2 = time.perf_counter()
        prefill = t1 - t0
        return (new_tokens - 1) / ((t2 - t1) - prefill), prefill * 1e3

    one_run()
    rates, ttfts = zip(*[one_run() for _ in range(repeats)])
    del model
    torch.cuda.empty_cache()
    return {"decode_tok_s": statistics.median(rates) * batch, "ttft_ms": statistics.median(ttfts)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="llama-1b,llama-8b")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    card = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    try:
        commit = os.environ.get("HEARTH_COMMIT") or subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True).strip()
    except Exception:
        commit = "unknown"
    base = dict(suite="decode", card=card, quant="bf16", batch=1, prompt_len=args.prompt_len,
                output_len=args.new_tokens, date=datetime.date.today().isoformat(), commit=commit,
                torch=torch.__version__)
    rows = []
    for shape in args.shapes.split(","):
        h = hearth_decode(shape, device, args.prompt_len, args.new_tokens, args.repeats)
        rows.append({**base, "engine": "hearth", "model": f"shape:{shape}", "attention": "torch", **h})
        print(json.dumps(rows[-1]), flush=True)
        if not args.no_hf:
            r = hf_decode(shape, device, args.prompt_len, args.new_tokens, args.repeats)
            rows.append({**base, "engine": "hf", "model": f"shape:{shape}", "attention": "sdpa", **r})
            print(json.dumps(rows[-1]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows}, f, indent=1)
    print(f"{'model':<18}{'engine':<8}{'decode tok/s':>14}{'ttft ms':>10}")
    for r in rows:
        print(f"{r['model']:<18}{r['engine']:<8}{r['decode_tok_s']:>14.1f}{r['ttft_ms']:>10.1f}")


if __name__ == "__main__":
    main()
