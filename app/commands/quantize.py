"""``hearth quantize --model M --quant Q --out DIR``: write a quantized copy of a model in a
layout vLLM and transformers load too (compressed-tensors by default; GPTQ, AWQ), so the
next load reads it instead of quantizing again."""

from __future__ import annotations

import json
import shlex
import sys

from engine.api import QUANTIZE_LAYOUTS, quantize_model


def add_quantize_parser(sub) -> None:
    p = sub.add_parser("quantize", help="write a quantized copy of a model (int4/int8/fp8) for fast loads")
    p.add_argument("--model", default=None, help="default | Hub repo id | local folder | .gguf file")
    p.add_argument("--quant", "--quantization", default="int4", metavar="NAME",
                   help="int4 | int8 (round-to-nearest) | awq | gptq (calibrated on the bundled text) | fp8 "
                        "(e4m3 per channel, written as compressed-tensors FP8_DYNAMIC) | fp8-gptq (fp8 rounded by "
                        "GPTQ: the same as fp8 --calibrate gptq); default int4")
    p.add_argument("--group-size", type=int, default=None, metavar="G",
                   help="int4's group: 32, 64, 128 or 256 (default: 128, or the largest of 64/32 that fits)")
    p.add_argument("--format", dest="layout", default=None, choices=QUANTIZE_LAYOUTS,
                   help="the layout written (default: awq/gptq's own, else compressed-tensors, what llm-compressor "
                        "writes)")
    p.add_argument("--calibrate", default=None, choices=("gptq",),
                   help="fp8 only: round the weights by GPTQ on the bundled calibration text (slower to write, "
                        "closer to the model) instead of to the nearest fp8 value")
    p.add_argument("--device", default="cpu", help="where to quantize (cpu, cuda, cuda:N)")
    p.add_argument("--out", required=True, help="the folder to write (must not exist)")
    p.add_argument("--json", action="store_true", help="print one JSON object describing the result")


def run_quantize(args) -> int:
    say = (lambda _m: None) if args.json else (lambda m: print(f"hearth: {m}", file=sys.stderr))
    result = quantize_model(args.model, args.out, quantization=args.quant, layout=args.layout,
                            group_size=args.group_size, device=args.device, calibrate=args.calibrate,
                            progress=say)
    if args.json:
        print(json.dumps({"out": str(result.out_dir), "layout": result.layout, "quant": result.quantization,
                          "layers": result.layers, "file_bytes": result.weight_bytes}))
    else:
        print(f"wrote {result.out_dir} ({result.layout}, {result.quantization}, {result.layers} layers, "
              f"{result.weight_bytes / 2**20:.1f} MiB); load it with --model {shlex.quote(str(result.out_dir))}")
    return 0
