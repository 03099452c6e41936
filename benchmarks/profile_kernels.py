"""Kernel-level view of a decode step and of prefill attention (GPU only).

    PYTHONPATH=. python benchmarks/profile_kernels.py [--shape llama-8b] [--json F]

1. One eager decode step of ``shape:<name>`` (batch 1, 128 tokens of context) under
   torch.profiler: CUDA time per kernel name, summed over the step, so the non-GEMM
   kernels' share of a step is visible.
2. Prefill attention alone at T = 2048 and 8192 (32 q heads, 8 kv heads, d 128, bf16):
   Hearth's paged Triton kernel vs torch SDPA (flash) on contiguous tensors, in TFLOP/s.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict

import torch
from _timing import cuda_ms


def _kernel_table(prof, title: str, top: int = 18) -> list[dict]:
    per = defaultdict(lambda: [0, 0.0])
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            per[ev.name][0] += 1
            per[ev.name][1] += ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total
    rows = sorted(({"kernel": k[:90], "calls": c, "total_us": t} for k, (c, t) in per.items()),
                  key=lambda r: -r["total_us"])
    total = sum(r["total_us"] for r in rows)
    print(f"{title}: CUDA kernel time {total / 1e3:.2f} ms")
    for r in rows[:top]:
        print(f"  {r['total_us'] / 1e3:8.3f} ms {r['calls']:6d}x  {r['kernel']}")
    return rows


def prefill_profile(shape: str, tokens: int) -> dict:
    """One fresh prompt of ``tokens`` (TTFT case) under torch.profiler, graphs on."""
    from engine.api import Engine, Request, SamplingParams
    from torch.profiler import ProfilerActivity, profile

    engine = Engine.load(f"shape:{shape}", device="cuda", max_model_len=tokens + 256, max_num_seqs=1,
                         max_num_batched_tokens=tokens)
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    gen = torch.Generator().manual_seed(0)
    # a new prompt each time: a repeated one would be served from the prefix cache
    prompts = [torch.randint(3, 30000, (tokens,), generator=gen).tolist() for _ in range(5)]
    walls = []
    for prompt in prompts[:4]:
        torch.cuda.synchronize()
        t = time.perf_counter()
        engine.submit(Request(prompt_token_ids=prompt, params=params)).result()
        walls.append(1e3 * (time.perf_counter() - t))
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        engine.submit(Request(prompt_token_ids=prompts[4], params=params)).result()
    engine.shutdown()
    rows = _kernel_table(prof, f"prefill {tokens} tokens (wall {sorted(walls)[1]:.1f} ms median of 4)", 24)
    return {"tokens": tokens, "wall_ms": walls, "hearth_kernels": rows}


def decode_step_profile(shape: str) -> list[dict]:
    from engine.api import Engine, Request, SamplingParams

    engine = Engine.load(f"shape:{shape}", device="cuda", max_model_len=2048, max_num_seqs=1,
                         enforce_eager=True)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    prompt = list(range(1, 129))
    engine.submit(Request(prompt_token_ids=prompt, params=params)).result()  # warm-up
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        engine.submit(Request(prompt_token_ids=prompt, params=params)).result()
    engine.shutdown()
    return _kernel_table(prof, "decode, 8 steps incl. one 128-token prefill")


def prefill_attention(tokens: int) -> dict:
    from hearth_kernels.paged_prefill import paged_prefill_attention

    h, kvh, d, bs = 32, 8, 128, 16
    dt = torch.bfloat16
    q = torch.randn(tokens, h, d, device="cuda", dtype=dt)
    k = torch.randn(tokens, kvh, d, device="cuda", dtype=dt)
    v = torch.randn(tokens, kvh, d, device="cuda", dtype=dt)
    nb = tokens // bs
    cache = torch.empty(2, nb, bs, kvh, d, device="cuda", dtype=dt)
    cache[0] = k.view(nb, bs, kvh, d)
    cache[1] = v.view(nb, bs, kvh, d)
    table = torch.arange(nb, device="cuda", dtype=torch.int32)[None]
    qs = torch.tensor([0, tokens], device="cuda", dtype=torch.int32)
    sl = torch.tensor([tokens], device="cuda", dtype=torch.int32)
    scale = d ** -0.5

    def hearth():
        return paged_prefill_attention(q, cache, table, qs, sl, scale, max_query_len=tokens)

    qt, kt, vt = q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None]

    def sdpa():
        return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale,
                                                                enable_gqa=True)

    from torch.nn.attention import SDPBackend, sdpa_kernel

    ke, ve = kt.repeat_interleave(h // kvh, 1), vt.repeat_interleave(h // kvh, 1)

    def only(backend):
        def fn():
            with sdpa_kernel([backend]):
                if backend == SDPBackend.CUDNN_ATTENTION:
                    return sdpa()
                return torch.nn.functional.scaled_dot_product_attention(qt, ke, ve, is_causal=True, scale=scale)
        return fn

    def first_call_ms(backend, n: int) -> float:
        """Wall time of the first call at a sequence length never seen before (plan builds)."""
        q1, k1, v1 = qt[:, :, :n], kt[:, :, :n], vt[:, :, :n]
        torch.cuda.synchronize()
        t = time.perf_counter()
        with sdpa_kernel([backend]):
            if backend == SDPBackend.CUDNN_ATTENTION:
                torch.nn.functional.scaled_dot_product_attention(q1, k1, v1, is_causal=True, scale=scale,
                                                                 enable_gqa=True)
            else:  # the fused kernels want equal head counts
                g = h // kvh
                torch.nn.functional.scaled_dot_product_attention(
                    q1, k1.repeat_interleave(g, 1), v1.repeat_interleave(g, 1), is_causal=True, scale=scale)
        torch.cuda.synchronize()
        return 1e3 * (time.perf_counter() - t)

    flops = 4 * tokens * tokens * h * d / 2  # causal
    out = {"tokens": tokens}
    for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        name = f"sdpa_{backend.name.lower()}"
        try:
            out[f"{name}_first_call_ms"] = first_call_ms(backend, tokens - 7)
            out[f"{name}_more_first_calls_ms"] = [first_call_ms(backend, tokens - j) for j in (9, 21, 40)]
            out[f"{name}_repeat_call_ms"] = first_call_ms(backend, tokens - 40)
            ms = cuda_ms(only(backend))
        except RuntimeError as e:
            print(f"  {name}: {e}".splitlines()[0][:120])
            continue
        out[f"{name}_ms"] = ms
        out[f"{name}_tflops"] = flops / ms / 1e9
        print(f"  T={tokens} {name}: {ms:.3f} ms ({flops / ms / 1e9:.0f} TFLOP/s), first call at a new "
              f"length {out[f'{name}_first_call_ms']:.1f} ms, then {out[f'{name}_more_first_calls_ms']}, "
              f"repeated length {out[f'{name}_repeat_call_ms']:.1f} ms")
    for name, fn in (("hearth_triton", hearth), ("torch_sdpa", sdpa)):
        ms = cuda_ms(fn)
        out[f"{name}_ms"] = ms
        out[f"{name}_tflops"] = flops / ms / 1e9
    err = (hearth().float() - sdpa()[0].transpose(0, 1).float()).abs().max().item()
    out["max_abs_diff"] = err
    print(f"prefill attention T={tokens}: triton {out['hearth_triton_ms']:.2f} ms "
          f"({out['hearth_triton_tflops']:.0f} TFLOP/s), sdpa {out['torch_sdpa_ms']:.2f} ms "
          f"({out['torch_sdpa_tflops']:.0f} TFLOP/s), max diff {err:.3g}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama-8b")
    ap.add_argument("--json", default=None)
    ap.add_argument("--prefill-only", type=int, default=0, metavar="TOKENS",
                    help="only the kernel breakdown of one fresh prompt of this many tokens "
                         "(and SDPA backends at 2048 and 8192)")
    args = ap.parse_args()
    if args.prefill_only:
        result = {"card": torch.cuda.get_device_name(), "shape": args.shape,
                  "prefill_attention": [prefill_attention(t) for t in (2048, 8192)],
                  "prefill": prefill_profile(args.shape, args.prefill_only)}
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
        return
    result = {"card": torch.cuda.get_device_name(), "shape": args.shape,
              "prefill_attention": [prefill_attention(t) for t in (2048, 8192)],
              "decode_kernels": decode_step_profile(args.shape)}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
