"""Perplexity proxy on SmolLM2-135M (float weights expanded from the bundled Q4_1 GGUF):
float vs RTN int4 vs GPTQ vs AWQ at one group size (argv: G, calibration sequences, methods).
Reads the default model's float conversion and the bundled texts. Run from the repo root:
PYTHONPATH=. python benchmarks/quant_quality_proxy.py 64 16 float,rtn,gptq-d0.1,gptq-act-d0.1,awq"""
import json, math, sys, time
from pathlib import Path
import torch
from tokenizers import Tokenizer
from engine.models.spec import ModelSpec, read_config
from engine.runner.bring_up import build_on_meta, materialize_weights
from engine.quant.calibrate import calibrate, sequence_hidden_states, split_calibration_ids
from engine.quant.rtn import quantize_int4

torch.set_num_threads(2)
from engine.loader.resolve import resolve_model
from resources.texts import calibration_text_path, evaluation_text_path

path = resolve_model(None).path
G = int(sys.argv[1]) if len(sys.argv) > 1 else 64
NCAL, LCAL = int(sys.argv[2]) if len(sys.argv) > 2 else 16, 512
NEVAL, LEVAL = 8, 512
methods = sys.argv[3].split(",") if len(sys.argv) > 3 else ["gptq", "gptq-act", "awq", "awq-noclip"]
tok = Tokenizer.from_file(str(path / "tokenizer.json"))
cal_ids = tok.encode(calibration_text_path().read_text()).ids
ev_ids = tok.encode(evaluation_text_path().read_text()).ids
spec = ModelSpec.from_config(read_config(path))
model = build_on_meta(spec, torch.float32, 4096)
materialize_weights(model, path, torch.device("cpu"), 0)
float_state = {n: p.clone() for n, p in model.named_parameters()}
cal = split_calibration_ids(cal_ids, LCAL, NCAL)
ev = split_calibration_ids(ev_ids, LEVAL, NEVAL)

def nll():
    tot, n = 0.0, 0
    with torch.no_grad():
        for s in ev:
            logits = model.compute_logits(sequence_hidden_states(model, s)).float()
            tot += torch.nn.functional.cross_entropy(logits[:-1], s[1:], reduction="sum").item()
            n += s.numel() - 1
    return tot / n

def restore():
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(float_state[n])

def apply(result):
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, qw in result.weights.items():
            model.get_submodule(name).weight.copy_(qw.dequantize(unpermute=True))
        for name, v in result.float_params.items():
            params[name].copy_(v)

out = {"group_size": G, "calib_tokens": NCAL * LCAL, "eval_tokens": NEVAL * (LEVAL - 1),
       "window": LEVAL, "note": "mean NLL over non-overlapping 512-token windows of evaluation.txt; "
       "reference = float32 expansion of the bundled Q4_1 GGUF"}
if "float" in methods:
    t = time.time(); out["float"] = nll(); print("float", out["float"], time.time() - t, flush=True)
if "rtn" in methods:
  with torch.no_grad():
    for i, layer in enumerate(model.model.layers):
        for p in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"):
            lin = layer.get_submodule(p)
            lin.weight.copy_(quantize_int4(lin.weight, G).dequantize())
  out["rtn"] = nll(); print("rtn", out["rtn"], flush=True); restore()
for m in [m for m in methods if m not in ("float", "rtn")]:
    # a method and its options: gptq[-act][-ts][-d<damp>] (damp 0.01 unless given; ts: true
    # sequential), awq[-noclip]
    opts = dict(method=m.split("-")[0], group_size=G)
    for part in m.split("-")[1:]:
        if part == "act": opts["act_order"] = True
        elif part == "noclip": opts["awq_clip"] = False
        elif part == "ts": opts["true_sequential"] = True
        elif part.startswith("d"): opts["damp"] = float(part[1:])
        else: raise SystemExit(f"unknown option {part!r} in {m!r}")
    if m.startswith("awq"): opts.update(awq_max_tokens=1024, clip_tokens=256)
    t = time.time()
    r = calibrate(model, cal, **opts, progress=lambda d, n: print(f"  {m} layer {d}/{n} {time.time()-t:.0f}s", flush=True) if d % 10 == 0 else None)
    out[m + "_calib_s"] = round(time.time() - t, 1)
    apply(r); out[m] = nll(); restore(); print(m, out[m], out[m + "_calib_s"], flush=True)
for k in list(out):
    if isinstance(out[k], float) and not k.endswith("_s"):
        out[k + "_ppl"] = math.exp(out[k])
print(json.dumps(out, indent=1))
