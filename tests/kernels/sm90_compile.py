"""Compile Hearth's kernels for an H100 (sm_90) without a GPU and report their resources.

Run as ``python -m tests.kernels.sm90_compile`` (TRITON_INTERPRET must be unset: the
interpreter replaces kernels with Python). Prints one JSON line per kernel: shared memory,
registers and spill bytes (from the ptxas bundled with Triton), and whether the loops were
software-pipelined (cp.async) and the attention dots use Hopper's wgmma. The interpreter
accepts code the compiler rejects (loop-carried types, early returns), so this is the CPU
check that the GPU build still compiles.

Pointers and strides are marked 16-divisible, as Triton's launcher specialises them for
real shapes; without that no load vectorises and nothing is pipelined.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

TARGET = GPUTarget("cuda", 90, 32)
PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def compile_kernel(fn, types: dict[str, str], consts: dict, num_warps: int, num_stages: int) -> dict:
    sig = {name: types.get(name, "i32") for name in fn.arg_names}
    sig.update({name: "constexpr" for name in consts})
    aligned = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
               if sig[name].startswith("*") or (name.startswith("stride_") and name not in ("stride_tb",))}
    src = ASTSource(fn=fn, signature=sig, attrs=aligned,
                    constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
    kernel = triton.compile(src, target=TARGET, options={"num_warps": num_warps, "num_stages": num_stages})
    ptx = kernel.asm["ptx"]
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        res = subprocess.run([PTXAS, "--gpu-name", "sm_90a", "-v", f.name, "-o", os.devnull],
                             capture_output=True, text=True, check=True)
    finally:
        os.unlink(f.name)
    regs = re.search(r"Used (\d+) registers", res.stderr)
    spills = re.search(r"(\d+) bytes spill stores", res.stderr)
    return {"shared": kernel.metadata.shared, "registers": int(regs.group(1)) if regs else -1,
            "spill_bytes": int(spills.group(1)) if spills else -1,
            "pipelined": "cp.async" in ptx, "wgmma": "wgmma" in ptx}


def main() -> None:
    import torch

    from hearth_kernels import activation, kv_cache, paged_decode, paged_prefill, rmsnorm, rotary

    # Llama-3-8B: 32 q heads, 8 kv heads, d=128, bf16, block 16; hidden 4096.
    bf, d, bs = "*bf16", 128, 16
    n, warps, stages = paged_decode._config(d, torch.bfloat16)
    cases = {
        "decode": (paged_decode._decode_split_kernel,
                   {"q_ptr": bf, "cache_ptr": bf, "tables_ptr": "*i32", "seq_lens_ptr": "*i32",
                    "out_ptr": bf, "part_out_ptr": "*fp32", "part_ml_ptr": "*fp32", "qk_scale": "fp32"},
                   dict(GROUP=4, G_PAD=16, HEAD_DIM=d, D_PAD=d, BLOCK_SIZE=bs, BLOCK_N=n, HAS_WINDOW=True,
                        SPLIT=True, DOT_PRECISION="tf32", AS_FP16=False), warps, stages),
        "decode_merge": (paged_decode._decode_merge_kernel,
                         {"part_out_ptr": "*fp32", "part_ml_ptr": "*fp32", "seq_lens_ptr": "*i32",
                          "out_ptr": bf},
                         dict(HEAD_DIM=d, D_PAD=d, BLOCK_N=n, NP_PAD=64, CHUNK=16, HAS_WINDOW=True), 4, 1),
    }
    m, n, warps, stages = paged_prefill._config(d, torch.bfloat16)
    cases["prefill"] = (
        paged_prefill._prefill_kernel,
        {"q_ptr": bf, "cache_ptr": bf, "tables_ptr": "*i32", "query_start_ptr": "*i32",
         "seq_lens_ptr": "*i32", "out_ptr": bf, "qk_scale": "fp32"},
        dict(GROUP=4, BLOCK_Q=m // 4, BLOCK_M=m, BLOCK_N=n, HEAD_DIM=d, D_PAD=d, BLOCK_SIZE=bs,
             HAS_WINDOW=True, DOT_PRECISION="tf32", AS_FP16=False), warps, stages)
    cases["write_kv"] = (kv_cache._write_kv_kernel,
                         {"k_ptr": bf, "v_ptr": bf, "cache_ptr": bf, "slot_ptr": "*i64"},
                         dict(NUM_HEADS=8, BLOCK_SIZE=bs, HEAD_DIM=d, H_PAD=8, D_PAD=d, FP8=False), 4, 1)
    # An fp8 (e4m3) KV cache with bf16 activations: the write saturates and narrows, the
    # attention kernels widen each tile after loading it.
    f8 = "*fp8e4nv"
    for name in ("decode", "prefill"):
        fn, types, consts, w, st = cases[name]
        if name == "decode":
            n8, w, st = paged_decode._config(d, torch.bfloat16, torch.float8_e4m3fn)
            consts = {**consts, "BLOCK_N": n8}
        cases[f"{name}_fp8"] = (fn, {**types, "cache_ptr": f8}, {**consts, "AS_FP16": True}, w, st)
    cases["write_kv_fp8"] = (kv_cache._write_kv_kernel,
                             {"k_ptr": bf, "v_ptr": bf, "cache_ptr": f8, "slot_ptr": "*i64"},
                             dict(NUM_HEADS=8, BLOCK_SIZE=bs, HEAD_DIM=d, H_PAD=8, D_PAD=d, FP8=True), 4, 1)
    cases["fused_add_rms_norm"] = (rmsnorm._rms_norm_kernel,
                                   {"x_ptr": bf, "res_ptr": bf, "w_ptr": bf, "out_ptr": bf, "res_out_ptr": bf,
                                    "eps": "fp32"}, dict(N=4096, BLOCK_N=4096, HAS_RESIDUAL=True), 16, 1)
    cases["rotary"] = (rotary._rotary_kernel,
                       {"q_ptr": bf, "k_ptr": bf, "pos_ptr": "*i64", "cos_ptr": bf, "sin_ptr": bf},
                       dict(NUM_Q_HEADS=32, NUM_K_HEADS=8, HALF=64, QH_PAD=32, KH_PAD=8, HALF_PAD=64), 8, 1)
    for name, cache in (("rotary_write_kv", bf), ("rotary_write_kv_fp8", f8)):
        cases[name] = (rotary._rotary_write_kv_kernel,
                       {"q_ptr": bf, "k_ptr": bf, "v_ptr": bf, "pos_ptr": "*i64", "cos_ptr": bf, "sin_ptr": bf,
                        "cache_ptr": cache, "slot_ptr": "*i64"},
                       dict(NUM_Q_HEADS=32, NUM_K_HEADS=8, HALF=64, BLOCK_SIZE=bs, QH_PAD=32, KH_PAD=8, HALF_PAD=64,
                            FP8=cache == f8), 8, 1)
    cases["silu_and_mul"] = (activation._silu_and_mul_kernel, {"x_ptr": bf, "out_ptr": bf},
                             dict(BLOCK=1024), 4, 1)
    only = set(sys.argv[1:])
    for name, (fn, types, consts, warps, stages) in cases.items():
        if only and name not in only:
            continue
        print(json.dumps({"kernel": name, **compile_kernel(fn, types, consts, warps, stages)}), flush=True)


if __name__ == "__main__":
    main()
