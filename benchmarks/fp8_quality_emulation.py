"""Where `--quant fp8`'s perplexity goes on SmolLM2-135M, and what would win it back: an
emulation on the CPU (no fp8 GPU needed) of what the GPU path computes, in float32 with
torch's e4m3 casts: weights e4m3 with one scale per output row (max|row| -> 448), each
linear's input rounded to bf16 then to e4m3 per token (max|token| -> 448), the tied
embedding/head left alone. The model is the default model's float conversion (the bundled
Q4_1 GGUF expanded, rounded to bf16 as the GPU's reference); transformers runs it (the
reference here, not the engine); the windows are `hearth eval`'s (1,024 tokens, stride 512).

mode: a comma list; the first item is one of
  ref  nothing rounded;  w  weights only;  a  activations only;  wa  both (what fp8 does);
then options:
  g        GPTQ for the e4m3 grid instead of round-to-nearest: the same per-row scales, the
           columns rounded in order with the rounding error pushed onto the columns still to
           come through the inverse Hessian of the layer's calibration inputs (collected on
           the float model, not layer by layer);
  ga       GPTQ against the rounded inputs: minimise ||X W^T - round(X) Q^T|| (X the float
           model's inputs, round() the per-token e4m3 rounding after bf16): the least-squares
           weight W* = (W C + l W)(H~ + l I)^-1 (C = X^T round(X), H~ = round(X)^T round(X),
           l the damping, regularised towards W), then GPTQ's sweep of W* with H~;
  ckpt=DIR the weights of an fp8 checkpoint Hearth wrote (`hearth quantize --quant fp8
           [--calibrate gptq] --out DIR`: e4m3 weights times their scales) instead of
           rounding them here (with base `a`: the activations rounded too, as the GPU runs it);
  sq=A     SmoothQuant with alpha A: input channel j divided by s_j = amax_j^A / wmax_j^(1-A)
           and the weight column multiplied by it (foldable into the RMSNorm weights, v_proj
           and up_proj rows);
  noa=NAME no activation rounding for linears whose name contains NAME (repeatable).

Run from the repo root (the default model converted once, e.g. by `hearth generate`):
  PYTHONPATH=. python benchmarks/fp8_quality_emulation.py wa,g [eval tokens] [calibration tokens]
It prints one JSON object. Single-threaded; the whole evaluation text takes ~10 min per mode
on this project's 2-core machine. HEARTH_EMULATION_DEVICE=cuda runs the same float32
arithmetic on a GPU (seconds; TF32 off), several modes in one process: `ref wa w,g wa,g`.
"""
import json
import math
import os
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine.loader.resolve import resolve_model
from engine.quant.gptq import _inverse_hessian_factor
from resources.texts import calibration_text_path, evaluation_text_path

E4M3_MAX = 448.0
WINDOW, STRIDE = 1024, 512


def row_scale(t):
    return t.abs().amax(-1, keepdim=True).clamp(min=1e-12) / E4M3_MAX


def e4m3_rows(t):
    s = row_scale(t)
    return (t / s).to(torch.float8_e4m3fn).to(torch.float32) * s


def gptq_e4m3(w, hessian, damp=0.01, block=128):
    """GPTQ's column sweep (as engine.quant.gptq, without groups) onto the e4m3 grid with
    the round-to-nearest path's per-row scales; returns the rounded weight in float32."""
    W = w.clone().float()
    n, k = W.shape
    H = hessian.double().clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    hinv = _inverse_hessian_factor(H, damp).float()
    s = row_scale(w.float())[:, 0]
    Q = torch.zeros_like(W)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        W1, h1 = W[:, i1:i2].clone(), hinv[i1:i2, i1:i2]
        err = torch.zeros_like(W1)
        for i in range(i2 - i1):
            col = W1[:, i]
            # clamped: the updates can push a column past its row's max, and e4m3fn has no
            # infinity (a cast past 448 gives NaN on the GPU); the kernels' grid saturates too
            q = (col / s).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float() * s
            Q[:, i1 + i] = q
            e = (col - q) / h1[i, i]
            W1[:, i:] -= e[:, None] * h1[i, i:][None]
            err[:, i] = e
        W[:, i2:] -= err @ hinv[i1:i2, i2:]
    return Q


def aware_target(w, cross, rhess, damp=0.01):
    """W* = (W C + l W)(H~ + l I)^-1: the weight that best maps the rounded inputs onto the
    float outputs, pulled towards W by the damping l (damp times H~'s mean diagonal)."""
    lam = damp * torch.diagonal(rhess).mean()
    eye = torch.eye(rhess.shape[0], dtype=rhess.dtype, device=rhess.device)
    wd = w.double()
    rhs = wd @ cross + lam * wd
    return torch.linalg.solve(rhess + lam * eye, rhs.T).T.float()


def main():
    torch.set_num_threads(1)
    torch.backends.cuda.matmul.allow_tf32 = False
    modes = sys.argv[1].split()
    n_eval = int(sys.argv[2]) if len(sys.argv) > 2 else 10**9
    n_cal = int(sys.argv[3]) if len(sys.argv) > 3 else 8192
    for mode in modes:
        run(mode, n_eval, n_cal, torch.device(os.environ.get("HEARTH_EMULATION_DEVICE", "cpu")))


def run(mode, n_eval, n_cal, device):
    base, *opts = mode.split(",")
    path = resolve_model(None).path
    tok = AutoTokenizer.from_pretrained(path)
    ev = tok(evaluation_text_path().read_text(), return_tensors="pt").input_ids[0][:n_eval].to(device)
    cal = tok(calibration_text_path().read_text(), return_tensors="pt").input_ids[0][:n_cal].to(device)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    lin = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
    start = time.time()
    alphas = [float(o[3:]) for o in opts if o.startswith("sq=")]
    aware = "ga" in opts and base in ("w", "wa")
    gptq = ("g" in opts or aware) and base in ("w", "wa")
    hessians, amax, cross, rhess = {}, {}, {}, {}
    if gptq or alphas:
        hessians = {n: torch.zeros(m.in_features, m.in_features, dtype=torch.float64, device=device) for n, m in lin}
        amax = {n: torch.zeros(m.in_features, device=device) for n, m in lin}
        if aware:
            cross = {n: torch.zeros_like(h) for n, h in hessians.items()}
            rhess = {n: torch.zeros_like(h) for n, h in hessians.items()}

        def collect(module, args, output, name):
            x = args[0].reshape(-1, args[0].shape[-1])
            hessians[name].add_(x.double().T @ x.double())
            if aware:
                xr = e4m3_rows(x.to(torch.bfloat16).float()).double()
                cross[name].add_(x.double().T @ xr)
                rhess[name].add_(xr.T @ xr)
            amax[name] = torch.maximum(amax[name], x.abs().amax(0))

        hooks = [m.register_forward_hook(lambda mod, a, o, n=n: collect(mod, a, o, n)) for n, m in lin]
        with torch.no_grad():
            for b in range(0, len(cal), WINDOW):
                model(cal[b:b + WINDOW][None])
        for h in hooks:
            h.remove()
    smooth = {}
    if alphas:
        for n, m in lin:
            wmax = m.weight.data.abs().amax(0).clamp(min=1e-5)
            smooth[n] = (amax[n].clamp(min=1e-5) ** alphas[0] / wmax ** (1 - alphas[0])).clamp(min=1e-5)
    with torch.no_grad():
        for n, m in lin:
            sv = smooth.get(n)
            if sv is not None:
                m.weight.data = m.weight.data * sv[None]
                if hessians:
                    hessians[n] = hessians[n] / sv.double()[:, None] / sv.double()[None]
            if base in ("w", "wa"):
                if aware:
                    m.weight.data = gptq_e4m3(aware_target(m.weight.data, cross[n], rhess[n]), rhess[n])
                else:
                    m.weight.data = gptq_e4m3(m.weight.data, hessians[n]) if gptq else e4m3_rows(m.weight.data)
    ckpt = [o[5:] for o in opts if o.startswith("ckpt=")]
    if ckpt:
        from safetensors import safe_open

        with safe_open(os.path.join(ckpt[0], "model.safetensors"), "pt") as f, torch.no_grad():
            for n, m in lin:
                m.weight.data = (f.get_tensor(n + ".weight").float() * f.get_tensor(n + ".weight_scale").float()
                                 ).to(device)
    no_act = [o[4:] for o in opts if o.startswith("noa=")]
    for n, m in lin:
        sv = smooth.get(n)
        rnd = base in ("a", "wa") and not any(t in n for t in no_act)
        if sv is None and not rnd:
            continue

        def forward(x, orig=m.forward, sv=sv, rnd=rnd):
            if sv is not None:
                x = (x / sv).to(torch.bfloat16).float()
            if rnd:
                x = e4m3_rows(x.to(torch.bfloat16).float())
            return orig(x)

        m.forward = forward
    nll, count, prev = 0.0, 0, 0
    with torch.no_grad():
        for b in range(0, len(ev), STRIDE):
            e = min(b + WINDOW, len(ev))
            logits = model(ev[b:e][None]).logits[0].float()
            first = max(prev, b + 1)
            lp = torch.log_softmax(logits[first - b - 1:e - b - 1], -1)
            target = ev[first:e]
            nll -= lp.gather(1, target[:, None]).sum().item()
            count += len(target)
            prev = e
            if e == len(ev):
                break
    print(json.dumps({"mode": mode, "perplexity": math.exp(nll / count), "tokens_scored": count,
                      "calibration_tokens": len(cal) if (gptq or alphas) else 0,
                      "window": WINDOW, "stride": STRIDE, "device": str(device),
                      "seconds": round(time.time() - start, 1)}), flush=True)


if __name__ == "__main__":
    main()
