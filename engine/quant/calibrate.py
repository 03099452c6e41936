"""The layer-wise calibration driver for GPTQ and AWQ on a Hearth Llama-family model.

Given a float ``LlamaForCausalLM`` already in memory and calibration token sequences,
``calibrate`` runs the sequences through the model one decoder layer at a time:

1. the embeddings of every sequence (the hidden states of one layer boundary are all that
   is kept between layers: memory is one layer's activations, plus one layer's weights);
2. for each layer: run the float layer on every sequence (a whole causal sequence at a
   time, without the paged KV cache: a calibration-only attention, ``CausalAttention``, is
   put in the layer's backend slot, so the model's own layer code runs), collecting each
   linear's inputs through forward hooks: GPTQ keeps ``H = sum w_t x_t x_t^T`` per linear
   (per-token weights ``w_t``, see ``_gptq_statistics``), AWQ a sample of input rows;
3. quantize the layer's four linears (the fused ones whole, except that GPTQ quantizes the
   q rows and the k/v rows of the fused qkv with their own Hessians); AWQ first searches
   and folds its scales;
4. run the *quantized* layer (its weights replaced by their dequantized values) on every
   sequence to get the next layer's inputs, so later layers calibrate against the errors
   of earlier ones (as GPTQ does);
5. put the layer's float weights back.

Steps 2-5 are ``calibrate_layer``, the unit a streaming load calls as each layer's float
weights arrive (only that layer and ``model.rotary`` need to be real); ``calibrate`` loops
it over a model already in memory. The model is left as it was. The result names every quantized module
(``model.layers.3.self_attn.qkv_proj``...) and, for AWQ, the float parameters the folds
changed (the RMSNorm weights, and the v / up rows of a qkv / gate_up bias), which must
replace the model's own when the quantized weights are used.

Choices: GPTQ's Hessians for all four linears come from one float forward of the layer
unless ``true_sequential`` (then o_proj's inputs come from the quantized qkv, and so on:
four forwards of the layer). They are weighted per token (``_gptq_statistics``): a
token's error counts relative to its residual stream, and a key/value's by the attention
it receives. Plain GPTQ (one vote per token) was no better than round-to-nearest on
SmolLM2-135M: the first token of every sequence is an attention sink with massive
activations, and GPTQ traded away its key/value error (which every later query reads) and
every other token's down_proj error (for the sink's massive inputs). AWQ
searches the scales of each linear's own output error (not the whole attention block's),
on at most ``awq_max_tokens`` input rows sampled evenly from the sequences, and clips on
at most ``clip_tokens`` of them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from engine.errors import LoadCancelledError
from engine.layers.linear_kernels import silu_and_mul_reference
from engine.quant.awq import awq_clip_search, awq_quantize, awq_search, fold_layer_scales, o_proj_scalable
from engine.quant.gptq import gptq_quantize as _gptq_int
from engine.quant.gptq import gptq_quantize_fp8
from engine.quant.qweight import QuantizedWeight, check_shape

#: Each decoder layer's linears, by their short key and their module path inside the layer.
LAYER_LINEARS = {"qkv": "self_attn.qkv_proj", "o": "self_attn.o_proj",
                 "gate_up": "mlp.gate_up_proj", "down": "mlp.down_proj"}
METHODS = ("gptq", "awq")


@dataclass
class CalibrationResult:
    """``weights``: module name -> its quantized weight (every decoder layer's four linears).
    ``float_params``: parameter name -> the new float value AWQ's folds gave it (empty for
    GPTQ)."""

    weights: dict[str, QuantizedWeight] = field(default_factory=dict)
    float_params: dict[str, torch.Tensor] = field(default_factory=dict)


class CausalAttention:
    """Calibration-only attention backend: ``q``, ``k``, ``v`` are one whole sequence
    ([L, heads, head_dim], position 0 first); causal (and windowed when the layer is), no
    KV cache."""

    def __init__(self, num_heads: int, num_kv_heads: int, scale: float, sliding_window: int | None) -> None:
        self.group = num_heads // num_kv_heads
        self.scale = scale
        self.sliding_window = sliding_window
        #: Set (float [L], one weight per query) to record ``received``: the attention each
        #: key gets, summed over the queries with these weights and averaged over the heads.
        self.query_weights: torch.Tensor | None = None
        self.received: torch.Tensor | None = None

    def _mask(self, n: int, device) -> torch.Tensor:
        pos = torch.arange(n, device=device)
        diff = pos[:, None] - pos[None, :]
        mask = diff >= 0
        return mask if self.sliding_window is None else mask & (diff < self.sliding_window)

    def forward(self, q, k, v, kv_cache=None, meta=None):
        if self.group > 1:
            k = k.repeat_interleave(self.group, dim=1)
            v = v.repeat_interleave(self.group, dim=1)
        q, k, v = q.transpose(0, 1), k.to(q.dtype).transpose(0, 1), v.to(q.dtype).transpose(0, 1)
        if self.query_weights is not None:
            o = self._forward_recording(q, k, v)
        elif self.sliding_window is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=self._mask(q.shape[1], q.device), scale=self.scale)
        return o.transpose(0, 1)

    def _forward_recording(self, q, k, v) -> torch.Tensor:
        """The attention written out one head at a time (its probabilities are needed, and
        one head's [L, L] is all that is held), recording ``received``."""
        heads, n = q.shape[0], q.shape[1]
        blocked = ~self._mask(n, q.device)
        u = self.query_weights.to(device=q.device, dtype=torch.float32)
        received = torch.zeros(n, dtype=torch.float32, device=q.device)
        out = torch.empty_like(q)
        for h in range(heads):
            p = ((q[h].float() @ k[h].float().T) * self.scale).masked_fill_(blocked, float("-inf")).softmax(-1)
            out[h] = (p @ v[h].float()).to(out.dtype)
            received += u @ p
        self.received = received / heads
        return out


@contextmanager
def calibration_attention(layers):
    """Each of ``layers`` attends with ``CausalAttention`` inside the block; their backends
    are put back after."""
    layers = list(layers)
    saved = []
    for layer in layers:
        attn = layer.self_attn
        saved.append((attn.attn, attn.rope_in_kv_write))
        attn.attn = CausalAttention(attn.num_heads, attn.num_kv_heads, attn.scale, attn.sliding_window)
        attn.rope_in_kv_write = False  # RoPE by the layer's rotary: this backend writes no cache
    try:
        yield
    finally:
        for layer, (backend, rope_in_kv_write) in zip(layers, saved):
            layer.self_attn.attn, layer.self_attn.rope_in_kv_write = backend, rope_in_kv_write


def run_layer(model, layer, h: torch.Tensor) -> torch.Tensor:
    """One decoder layer on one sequence's residual stream ``h`` [L, hidden] (inside
    ``calibration_attention``): the next residual stream."""
    positions = torch.arange(h.shape[0], device=h.device)
    out, residual = layer(positions, h, None, None, None, model.rotary)
    return out + residual


@torch.no_grad()
def sequence_hidden_states(model, ids: torch.Tensor) -> torch.Tensor:
    """The model's final (normed) hidden states [L, hidden] for one token sequence, run as
    the calibration runs it (whole-sequence causal attention, no KV cache)."""
    with calibration_attention(model.model.layers):
        h = model.model.embed_tokens(ids.to(model.model.embed_tokens.weight.device))
        for layer in model.model.layers:
            h = run_layer(model, layer, h)
    return model.model.norm(h)


def split_calibration_ids(ids: Sequence[int] | torch.Tensor, seq_len: int, max_sequences: int | None = None,
                          ) -> list[torch.Tensor]:
    """A long token stream cut into consecutive sequences of ``seq_len`` tokens (the
    incomplete tail dropped), at most ``max_sequences`` of them."""
    t = torch.as_tensor(ids, dtype=torch.long).flatten()
    n = t.numel() // seq_len
    if max_sequences is not None:
        n = min(n, max_sequences)
    return list(t[:n * seq_len].view(n, seq_len))


def check_calibration(model, method: str, bits: int, group_size: int, fp8: bool = False) -> None:
    """Raise ValueError (naming the module) when ``method``/``bits``/``group_size`` (or
    ``fp8``: GPTQ onto e4m3) can't quantize some linear of ``model``; nothing has run yet."""
    if method not in METHODS:
        raise ValueError(f"unknown calibration method {method!r}; choose one of: {', '.join(METHODS)}")
    if method == "awq" and (bits != 4 or fp8):
        raise ValueError("AWQ quantizes to 4 bits only; use gptq for 8-bit or fp8")
    from engine.quant.transform import FP8_ALIGN

    for i, layer in enumerate(model.model.layers):
        for path in LAYER_LINEARS.values():
            lin = layer.get_submodule(path)
            n, k = lin.out_features, lin.in_features
            if fp8:
                if n % FP8_ALIGN or k % FP8_ALIGN:
                    raise ValueError(f"model.layers.{i}.{path} ([{n} x {k}]): fp8's tensor-core products need both "
                                     f"sizes in multiples of {FP8_ALIGN}; use int8 (the same size) instead")
                continue
            problem = check_shape(bits, group_size, n, k)
            if problem:
                raise ValueError(f"model.layers.{i}.{path}: {problem}; pick another group size")


@dataclass(frozen=True)
class CalibrationOptions:
    """How ``calibrate``/``calibrate_layer`` quantize. ``bits``/``sym``/``act_order``/``damp``/
    ``block_size``: GPTQ's (``gptq_quantize``; AWQ is 4-bit asymmetric only);
    ``true_sequential``: GPTQ quantizes qkv, then o, then gate_up, then down, each on the
    inputs the layer gives with the linears before it already quantized (a forward of the
    layer per step) instead of all four on one float forward; ``awq_grid``: AWQ's alpha
    grid (and its clip grid); ``awq_clip``: AWQ's clipping search; ``awq_max_tokens``:
    input rows sampled per linear for AWQ's search; ``clip_tokens``: rows of those its clip
    search uses. ``fp8``: GPTQ rounds onto float8 e4m3 with per-output-row scales (the
    layout of ``--quant fp8``; ``bits``, ``group_size`` and ``sym`` don't apply) instead of
    the integer grid."""

    method: str
    bits: int = 4
    group_size: int = 128
    sym: bool = False
    act_order: bool = False
    damp: float = 0.01
    block_size: int = 128
    true_sequential: bool = False
    awq_grid: int = 20
    awq_clip: bool = True
    awq_max_tokens: int = 4096
    clip_tokens: int = 512
    fp8: bool = False


def calibration_inputs(model, sequences: Sequence[torch.Tensor] | torch.Tensor) -> list[torch.Tensor]:
    """The first layer's inputs: each sequence's embeddings [L, hidden] on the model's device."""
    device = model.model.embed_tokens.weight.device
    seqs = [torch.as_tensor(s, dtype=torch.long, device=device).flatten() for s in sequences]
    if not seqs or any(s.numel() == 0 for s in seqs):
        raise ValueError("calibration needs at least one non-empty token sequence")
    with torch.no_grad():
        return [model.model.embed_tokens(s) for s in seqs]


@torch.no_grad()
def calibrate_layer(model, index: int, hs: list[torch.Tensor], options: CalibrationOptions,
                    check_stop: Callable[[], None] = lambda: None,
                    ) -> tuple[dict[str, QuantizedWeight], dict[str, torch.Tensor], list[torch.Tensor]]:
    """Quantize decoder layer ``index`` of ``model`` (its float weights in memory; only
    ``model.rotary`` is read besides) on its inputs ``hs`` (one [L, hidden] residual stream
    per sequence: ``calibration_inputs``, then what the previous call returned).

    Returns ``(weights, float_params, next_hs)``: module name -> quantized weight for the
    layer's four linears, parameter name -> new value for what AWQ's folds changed (names
    from the model's root), and the next layer's inputs (this layer run with its quantized
    weights). The layer is left as it was. ``check_stop`` is called between the steps (it
    raises to stop). This is the step a streaming load calls as each layer arrives."""
    layer = model.model.layers[index]
    prefix = f"model.layers.{index}."
    weights, float_params = {}, {}
    with calibration_attention([layer]):
        run = lambda: [run_layer(model, layer, h) for h in hs]  # noqa: E731
        saved = {name: p.detach().clone() for name, p in layer.named_parameters()}
        try:
            if options.method == "gptq":
                quantized = _gptq_steps(model, layer, hs, options, check_stop)
            else:
                total = sum(h.shape[0] for h in hs)
                rows = max(1, math.ceil(min(options.awq_max_tokens, total) / len(hs)))
                stats = _collect(layer, run, lambda: _SampleHook(rows))
                check_stop()
                quantized = _awq_layer(layer, stats, group_size=options.group_size, grid=options.awq_grid,
                                       clip=options.awq_clip, clip_tokens=options.clip_tokens)
                del stats
                for name, p in layer.named_parameters():
                    if not any(name == path + ".weight" for path in LAYER_LINEARS.values()) \
                            and not torch.equal(p, saved[name]):
                        float_params[prefix + name] = p.detach().clone()
            check_stop()
            for key, qw in quantized.items():
                _use_quantized(layer, key, qw)
                weights[prefix + LAYER_LINEARS[key]] = qw
            next_hs = run()
        finally:
            for name, p in layer.named_parameters():
                p.copy_(saved[name])
    return weights, float_params, next_hs


def calibrate(model, sequences: Sequence[torch.Tensor] | torch.Tensor, *, method: str,
              progress: Callable[[int, int], None] | None = None,
              should_stop: Callable[[], bool] | None = None, **options) -> CalibrationResult:
    """Quantize every decoder layer's linears of ``model`` (a float ``LlamaForCausalLM`` in
    memory) with ``method`` ("gptq" or "awq") on ``sequences`` (token ids: a [S, L] tensor or
    a list of 1-D tensors); ``options`` are ``CalibrationOptions``' fields (group_size=128,
    bits=4, act_order=False...). ``progress(done, total)`` is called after each layer;
    ``should_stop()`` is asked before each layer and between its steps, and a True stops
    with ``LoadCancelledError``. The model is left as it was either way."""
    opts = CalibrationOptions(method=method, **options)
    check_calibration(model, opts.method, opts.bits, opts.group_size, opts.fp8)

    def check_stop():
        if should_stop is not None and should_stop():
            raise LoadCancelledError("quantization cancelled")

    result = CalibrationResult()
    check_stop()
    hs = calibration_inputs(model, sequences)
    layers = model.model.layers
    for i in range(len(layers)):
        check_stop()
        weights, float_params, hs = calibrate_layer(model, i, hs, opts, check_stop)
        result.weights.update(weights)
        result.float_params.update(float_params)
        if progress is not None:
            progress(i + 1, len(layers))
    return result


# -- collecting a layer's linear inputs --------------------------------------------------------------


def _inverse_mean_square(h: torch.Tensor, eps: float) -> torch.Tensor:
    """``1 / (mean(h^2) + eps)`` per row of a residual stream ``h`` [L, hidden] (float32
    [L]): what the next RMSNorm's scaling does to an error added to that row, squared."""
    return 1.0 / (h.float().pow(2).mean(-1) + eps)


def _add_weighted(hessians: dict, key: str, x: torch.Tensor, weights: torch.Tensor) -> None:
    """``hessians[key] += sum_t weights_t x_t x_t^T`` (float32)."""
    x = x.reshape(-1, x.shape[-1]).float() * weights.float().sqrt().unsqueeze(1)
    if key not in hessians:
        hessians[key] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
    hessians[key].addmm_(x.T, x)


def _gptq_statistics(model, layer, hs: list[torch.Tensor], keys=tuple(LAYER_LINEARS)) -> dict[str, torch.Tensor]:
    """GPTQ's Hessians ``sum_t w_t x_t x_t^T`` of the layer's linears over the sequences
    ``hs`` (the layer run on each, inside ``calibration_attention``; of the linears ``keys``
    only, "qkv" giving "q" and "kv"), with per-token weights ``w_t`` for how much an error
    in that token's output matters:

    - q rows, o_proj (their errors land in the token's residual stream, read next through
      an RMSNorm): ``1 / mean(h_t^2)`` of the layer's input residual ``h_t``; gate_up and
      down_proj likewise, of the layer's output residual. An error matters relative to the
      residual it is added to. Without this, the few tokens whose residual carries a
      massive activation (the first token of every sequence, an attention sink, whose down
      projection input is 1000x the others' in some layers) own the whole Hessian, and
      GPTQ trades every other token's error for theirs.
    - k and v rows: the attention the token receives, summed over the queries (each
      weighted as above) and averaged over the heads. A key or value's error reaches every
      query that attends to it: a sink that half the queries attend to matters hundreds of
      times more than one token, and plain GPTQ (one vote per token) pushes the rounding
      error into exactly the inputs that only the sink uses.
    """
    backend = layer.self_attn.attn
    eps = float(getattr(layer.input_layernorm, "eps", 1e-6))
    seen: dict[str, torch.Tensor] = {}
    handles = [layer.get_submodule(path).register_forward_hook(
        lambda module, args, out, key=key: seen.__setitem__(key, args[0])) for key, path in LAYER_LINEARS.items()]
    hessians: dict[str, torch.Tensor] = {}
    try:
        for h in hs:
            attn_w = _inverse_mean_square(h, eps)
            backend.query_weights = attn_w if "qkv" in keys else None  # recording costs a slower attention
            out = run_layer(model, layer, h)
            mlp_w = _inverse_mean_square(out, eps)
            if "qkv" in keys:
                _add_weighted(hessians, "q", seen["qkv"], attn_w)
                _add_weighted(hessians, "kv", seen["qkv"], backend.received)
            if "o" in keys:
                _add_weighted(hessians, "o", seen["o"], attn_w)
            if "gate_up" in keys:
                _add_weighted(hessians, "gate_up", seen["gate_up"], mlp_w)
            if "down" in keys:
                _add_weighted(hessians, "down", silu_and_mul_reference(seen["down"]), mlp_w)
            seen.clear()
    finally:
        backend.query_weights = backend.received = None
        for handle in handles:
            handle.remove()
    return hessians


def _evenly(x: torch.Tensor, rows: int) -> torch.Tensor:
    """At most ``rows`` rows of ``x``, evenly spaced (from every sequence, not the first few)."""
    if x.shape[0] <= rows:
        return x
    return x[torch.linspace(0, x.shape[0] - 1, rows, device=x.device).round().long()]


class _SampleHook:
    """Keeps ``rows`` input rows per call (evenly spaced over the sequence)."""

    def __init__(self, rows: int) -> None:
        self.rows = rows
        self.parts: list[torch.Tensor] = []

    def add(self, x: torch.Tensor) -> None:
        self.parts.append(_evenly(x.reshape(-1, x.shape[-1]), self.rows).float())

    def samples(self) -> torch.Tensor:
        return torch.cat(self.parts)


def _collect(layer, run: Callable[[], object], make_hook) -> dict[str, object]:
    """Run ``run()`` (the float layer on every sequence) with a hook on each linear; the
    down projection's hook sees ``silu(gate) * up``, its real input."""
    hooks, handles = {}, []
    for key, path in LAYER_LINEARS.items():
        hook = hooks[key] = make_hook()
        act = silu_and_mul_reference if key == "down" else None

        def fn(module, args, out, hook=hook, act=act):
            x = args[0]
            hook.add(act(x) if act is not None else x)

        handles.append(layer.get_submodule(path).register_forward_hook(fn))
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return hooks


def _use_quantized(layer, key: str, qw: QuantizedWeight) -> None:
    """The layer's ``key`` linear computes with ``qw``'s (dequantized) weight."""
    lin = layer.get_submodule(LAYER_LINEARS[key])
    lin.weight.copy_(qw.dequantize(unpermute=True).to(lin.weight.dtype))


def _gptq_steps(model, layer, hs, options: CalibrationOptions, check_stop) -> dict[str, QuantizedWeight]:
    """GPTQ of the layer's linears: all four on one float forward, or (``true_sequential``)
    one at a time, each on the inputs of the layer with the ones before it quantized (they
    are left quantized in the layer; the caller puts the float weights back)."""
    steps = [[key] for key in LAYER_LINEARS] if options.true_sequential else [list(LAYER_LINEARS)]
    quantized: dict[str, QuantizedWeight] = {}
    for keys in steps:
        hessians = _gptq_statistics(model, layer, hs, keys)
        check_stop()
        grid = {"fp8": True} if options.fp8 else {"bits": options.bits, "group_size": options.group_size,
                                                   "sym": options.sym}
        step = _gptq_layer(layer, hessians, keys, act_order=options.act_order, damp=options.damp,
                           block_size=options.block_size, **grid)
        del hessians
        for key, qw in step.items():
            _use_quantized(layer, key, qw)
        quantized.update(step)
    return quantized


def _gptq_layer(layer, hessians, keys, *, act_order: bool, fp8: bool = False, **options) -> dict[str, QuantizedWeight]:
    """GPTQ of the layer's linears ``keys``; qkv's q rows and k/v rows with their own
    Hessians (one act-order for both: the fused weight has one column order). ``fp8``: onto
    e4m3 (``gptq_quantize_fp8``) rather than the integer grid ``options`` describe."""
    gptq_quantize = gptq_quantize_fp8 if fp8 else _gptq_int
    out = {key: gptq_quantize(layer.get_submodule(LAYER_LINEARS[key]).weight, hessians[key], act_order=act_order,
                              **options) for key in keys if key != "qkv"}
    if "qkv" not in keys:
        return out
    w = layer.self_attn.qkv_proj.weight
    rows = layer.self_attn.q_size
    hq, hkv = hessians["q"], hessians["kv"]
    order = None
    if act_order:  # each Hessian's diagonal relative to its mean: neither's scale wins
        both = torch.diagonal(hq) / torch.diagonal(hq).mean().clamp_min(1e-30) \
            + torch.diagonal(hkv) / torch.diagonal(hkv).mean().clamp_min(1e-30)
        order = torch.argsort(both, descending=True, stable=True)
    q = gptq_quantize(w[:rows], hq, order=order, **options)
    kv = gptq_quantize(w[rows:], hkv, order=order, **options)
    out["qkv"] = _stack_rows(q, kv)
    return out


def _stack_rows(a: QuantizedWeight, b: QuantizedWeight) -> QuantizedWeight:
    """One QuantizedWeight of ``a``'s rows then ``b``'s (same bits, group and column order)."""
    cat = lambda x, y: None if x is None else torch.cat((x, y))  # noqa: E731
    return QuantizedWeight(a.bits, a.group_size, cat(a.qweight, b.qweight), cat(a.scales, b.scales),
                           cat(a.mins, b.mins), a.perm, fmt=a.fmt)


def _awq_layer(layer, stats, *, group_size: int, grid: int, clip: bool, clip_tokens: int,
               ) -> dict[str, QuantizedWeight]:
    """Search and fold the layer's AWQ scales (in place), then round (and clip) each linear."""
    xs = {key: stats[key].samples() for key in LAYER_LINEARS}
    keys = [k for k in LAYER_LINEARS if k != "o" or o_proj_scalable(layer.self_attn)]
    scales = {k: awq_search([layer.get_submodule(LAYER_LINEARS[k]).weight], xs[k], group_size=group_size,
                            grid=grid) for k in keys}
    fold_layer_scales(layer, scales)
    out = {}
    for key, path in LAYER_LINEARS.items():
        w = layer.get_submodule(path).weight
        bound = None
        if clip:
            x = _evenly(xs[key], clip_tokens)
            if key in scales:
                x = x / scales[key].to(x.device)
            bound = _clip_bounds(layer, key, w, x, group_size, grid)
        out[key] = awq_quantize(w, group_size, bound)
    return out


def _clip_bounds(layer, key, w, x, group_size, grid) -> torch.Tensor:
    """AWQ's clip values for one linear; q and k rows of qkv are left unclipped (as AutoAWQ:
    their error shows only through the attention softmax)."""
    if key != "qkv":
        return awq_clip_search(w, x, group_size=group_size, grid=grid)
    attn = layer.self_attn
    v0 = attn.q_size + attn.kv_size
    n, k = w.shape
    bound = w.float().abs().reshape(n, k // group_size, group_size).amax(dim=-1)  # no clamping
    bound[v0:] = awq_clip_search(w[v0:], x, group_size=group_size, grid=grid)
    return bound
