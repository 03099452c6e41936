"""Is the serve suite's client part of what it measures? The same ``hearth serve`` (engine in
its own process, as the suite runs it) driven at one concurrency by the suite's load
generator spread over 1, 2, 4... client processes, runs interleaved and repeated, beside
the engine's own closed loop (the suite's offline figure, run twice). If the served rate
rises with the client processes, the single client was a bottleneck of the measurement.

    PYTHONPATH=. python benchmarks/serve_clients.py [--shape llama-8b] [--concurrency 16]
        [--requests 128] [--processes 1,2,4] [--repeats 2] [--tokenizer DIR] [--max-num-seqs 64] [--json F]
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama-8b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--requests", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--processes", default="1,2,4")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer", default=None, help="a folder of tokenizer files (the suite's: the shape takes "
                    "its vocabulary)")
    ap.add_argument("--max-num-seqs", type=int, default=64, help="the engine's batch limit (the suite's: its "
                    "largest concurrency, 64 by default)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from app.commands.serve_bench import ServerProcess, serve_command
    from app.server.listen import free_port
    from app.services.serve_load import completion_bodies, drive
    from engine.api import Engine, release_memory
    from engine.bench import latency_summary, serve_prompts
    from engine.bench.serving import closed_loop

    c = args.concurrency
    load = {"model": f"shape:{args.shape}", "device": args.device, "dtype": "auto", "attention": "auto",
            "kv_cache_dtype": "auto", "quantization": "none", "max_num_seqs": args.max_num_seqs,
            "max_model_len": args.prompt_len + args.output_len + 64, "tokenizer": args.tokenizer}
    say = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    options = {k: v for k, v in load.items() if k != "model"}
    engine = Engine.load(load["model"], **options)
    try:
        vocab = engine.model_info.vocab_size
        prompts = serve_prompts(vocab, args.requests, args.prompt_len, args.seed)
        closed_loop(engine, serve_prompts(vocab, c, args.prompt_len, args.seed, stream=1), args.output_len, c)
        offline = [closed_loop(engine, prompts, args.output_len, c) for _ in range(2)]
    finally:
        engine.shutdown()
        del engine
        release_memory()
    off_rate = max(o["output_tok_s"] for o in offline)
    say(f"offline: {[round(o['output_tok_s']) for o in offline]} tok/s")

    port = free_port()
    server = ServerProcess(serve_command(load, port, max_queue=4 * c + 64), port)
    runs = []
    try:
        model = server.wait_ready()
        bodies = completion_bodies(model, prompts, args.output_len)
        warm = completion_bodies(model, serve_prompts(vocab, c, args.prompt_len, args.seed, stream=1),
                                 args.output_len)
        for rep in range(args.repeats):
            for procs in (int(p) for p in args.processes.split(",")):
                drive(server.base_url, None, warm, c, processes=procs)
                timings, wall = drive(server.base_url, None, bodies, c, processes=procs)
                s = latency_summary(timings, wall)
                run = {"repeat": rep, "client_processes": procs, **s,
                       "serve_vs_best_offline": s["output_tok_s"] / off_rate}
                runs.append(run)
                say(f"{procs} client processes: {s['output_tok_s']:.0f} tok/s ({run['serve_vs_best_offline']:.3f}); "
                    f"TTFT p50 {s['ttft_p50_ms']:.1f} (engine {s.get('engine_ttft_p50_ms')}, HTTP "
                    f"{s.get('http_ttft_p50_ms')}); failed {s['failed_requests']}")
    finally:
        server.stop()
    import datetime
    import subprocess

    import torch

    commit = os.environ.get("HEARTH_COMMIT") or subprocess.run(["git", "rev-parse", "--short", "HEAD"],
                                                               capture_output=True, text=True).stdout.strip()
    result = {"shape": args.shape, "vocab_size": vocab, "tokenizer": args.tokenizer,
              "max_num_seqs": args.max_num_seqs, "card": torch.cuda.get_device_name() if torch.cuda.is_available()
              else "cpu", "commit": commit, "date": datetime.date.today().isoformat(), "concurrency": c, "requests": args.requests, "prompt_len": args.prompt_len,
              "output_len": args.output_len, "offline": offline, "runs": runs}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
