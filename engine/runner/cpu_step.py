"""The CPU decode step: one sequence's next token by one C call (``hearth_kernels.cpu_decode``).

On a CPU a decode step run eagerly is ~900 small torch ops (20+ ms of overhead per token
on 2 cores, more than the 4-bit weights take to stream). ``CpuDecodeStep`` hands the
loaded model's own tensors (float32 projections, or the quantized ones' codes, scales
and mins through ``hearth_kernels.cpu_quant``) to the C step once at load, and the runner's
``execute`` sends a step's decode rows (one token each, sampled) there, all of them in one
call (each weight read once for every row; each row's logits the bits it gets alone): the
CPU analogue of the CUDA decode graphs. Prompt rows run eagerly.

It runs only what it reproduces exactly (up to fp32 rounding and the int8 activation
blocks the quantized kernel uses eagerly too): a Llama-family model on the CPU in
float32 with a float32 KV cache and the torch attention backend, without act-order
weights (Qwen3's per-head q/k norms included). ``HEARTH_CPU_DECODE=0`` turns it off,
and with it the C kernel of a float32 LM head (``use_c_head``: the eager steps' logits then
come from torch's matmul, as before).
"""

from __future__ import annotations

import os

import torch

from engine.layers.attention import TorchAttention
from engine.layers.linear import Linear, SwiGLUDownLinear, TiedLMHead
from engine.layers.quant_linear import QuantizedStore, QuantizedTiedHead

#: Set to "0" to run every decode step eagerly (comparisons, a suspected fault).
ENV_SWITCH = "HEARTH_CPU_DECODE"


def _projection(module, name: str):
    """The C form of one projection: (weight, bias) float32 tensors, or a prepared
    quantized weight. Raises ValueError when the C step can't run it."""
    from hearth_kernels import cpu_quant

    bias = getattr(module, "bias", None)
    if bias is not None:
        bias = bias.detach().float().contiguous()
    if isinstance(module, QuantizedStore):
        if module.perm is not None:
            raise ValueError(f"{name} has act-order weights (a permutation)")
        problem = cpu_quant.supports(module.bits, module.group_size, module.in_features)
        if problem:
            raise ValueError(f"{name}: {problem}")
        prepare = cpu_quant.prepare_int4 if module.bits == 4 else cpu_quant.prepare_int8
        return prepare(module.qweight, module.scales, module.mins, module.group_size, bias=bias)
    if isinstance(module, Linear) or hasattr(module, "weight"):
        weight = module.weight
        if weight.dtype != torch.float32:
            raise ValueError(f"{name} is {weight.dtype}, not float32")
        return (weight.detach().contiguous(), bias)
    raise ValueError(f"{name} is a {type(module).__name__}, which the C step doesn't know")


def _reason(runner) -> str | None:
    """Why the C step can't run this runner's model (None: it can)."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return f"turned off ({ENV_SWITCH}=0)"
    if runner.device.type != "cpu":
        return "not a CPU load"
    if runner.dtype != torch.float32:
        return f"the model runs in {str(runner.dtype).removeprefix('torch.')}, not float32"
    if runner.kv_dtype not in (torch.float32, torch.float8_e4m3fn):
        return f"the KV cache is {str(runner.kv_dtype).removeprefix('torch.')}, not float32 or fp8 (e4m3)"
    if runner.attention != "torch":
        return f"the {runner.attention!r} attention backend (the C step reproduces 'torch')"
    if not runner.kv_caches:
        return "no KV cache"
    # A module a transform put in that the C step has no form of says so (bitsandbytes').
    other = next((m.cpu_decode_reason for m in runner.model.modules() if getattr(m, "cpu_decode_reason", None)), None)
    if other is not None:
        return other
    from engine.layers.quant_kernels import CpuQuant

    if any(hasattr(m, "qweight") and getattr(m, "checkpoint_params", ()) and not isinstance(m.kernel, CpuQuant)
           for m in runner.model.modules() if hasattr(m, "kernel")):
        return "some quantized layers don't run Hearth's CPU kernel (HEARTH_QUANT_KERNEL=reference, or no AVX2)"
    from hearth_kernels import cpu_decode

    return cpu_decode.available()


def use_c_head(runner) -> str | None:
    """Run a float32 LM head of a CPU load through the C kernel (``CpuRowsF32``): a row's
    logits then have the same bits alone, beside other requests' rows, and in the C decode
    step, so a request's answer and logprobs don't depend on what shares its steps (its
    quantized projections already don't). Returns None when it does, else why not."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return f"turned off ({ENV_SWITCH}=0)"
    head = getattr(runner.model, "lm_head", None)
    if hasattr(head, "qweight"):
        return "the LM head is quantized (its own kernel)"
    if type(head) not in (Linear, TiedLMHead) or not head.weight.is_cpu:
        return f"the LM head is a {type(head).__name__}, not a CPU projection"
    if head.weight.dtype != torch.float32:
        return f"the LM head is {str(head.weight.dtype).removeprefix('torch.')}, not float32"
    from hearth_kernels import cpu_quant

    problem = cpu_quant.available()
    if problem is not None:
        return problem
    if cpu_quant.isa() != "avx2":  # the portable C's fp32 dot is not vectorised: torch's is faster
        return "this CPU has no AVX2"
    from engine.layers.linear_kernels import CpuRowsF32

    head.use_kernel(CpuRowsF32(head.weight, head.bias))
    return None


class CpuDecodeStep:
    """The loaded model's decode step in C: ``run`` returns one row's logits, ``run_rows``
    several sequences' in one call."""

    def __init__(self, decode_model) -> None:
        self._model = decode_model
        # One logits buffer for every step: the sampler reads it before the next step.
        self._logits = torch.empty(1, decode_model.vocab, dtype=torch.float32)
        self._rows_logits = torch.empty(4, decode_model.vocab, dtype=torch.float32)  # (grows)

    @classmethod
    def build(cls, runner) -> tuple["CpuDecodeStep | None", str | None]:
        """(the step, None) for a model the C step runs, else (None, the reason)."""
        reason = _reason(runner)
        if reason is not None:
            return None, reason
        from hearth_kernels.cpu_decode import DecodeLayer, DecodeModel

        model, spec = runner.model, runner.spec
        try:
            layers = []
            for i, layer in enumerate(model.model.layers):
                attn, mlp = layer.self_attn, layer.mlp
                if type(attn.attn) is not TorchAttention:
                    return None, f"layer {i} attends with {type(attn.attn).__name__}"
                if not (isinstance(mlp.down_proj, SwiGLUDownLinear) or getattr(mlp.down_proj, "gated", False)):
                    return None, f"layer {i}'s down projection is not over SwiGLU"
                if attn.attn.sliding_window != model.model.layers[0].self_attn.attn.sliding_window:
                    return None, "the layers have different sliding windows"
                layers.append(DecodeLayer(
                    layer.input_layernorm.weight.detach(), layer.post_attention_layernorm.weight.detach(),
                    _projection(attn.qkv_proj, f"layer {i} qkv_proj"), _projection(attn.o_proj, f"layer {i} o_proj"),
                    _projection(mlp.gate_up_proj, f"layer {i} gate_up_proj"),
                    _projection(mlp.down_proj, f"layer {i} down_proj"), runner.kv_caches[i],
                    *((attn.q_norm.weight.detach(), attn.k_norm.weight.detach()) if attn.qk_norm else ())))
            first = model.model.layers[0].self_attn
            embed, head = model.model.embed_tokens, model.lm_head
            embed_c = _projection(embed, "the embedding")
            # A tied head (float or quantized) shares the embedding's tensors: one descriptor.
            head_c = embed_c if isinstance(head, (TiedLMHead, QuantizedTiedHead)) else _projection(head, "the LM head")
            from hearth_kernels import cpu_quant

            projections = [embed_c, head_c] + [p for lt in layers for p in (lt.qkv, lt.o, lt.gate_up, lt.down)]
            if cpu_quant.isa() != "avx2" and any(isinstance(p, tuple) for p in projections):
                # The portable C's fp32 GEMV is not vectorised: torch's (MKL, NEON) is faster.
                return None, "this CPU has no AVX2, and the portable C step is slower than torch on float32 weights"
            eps = {layer.input_layernorm.eps for layer in model.model.layers}
            eps |= {layer.post_attention_layernorm.eps for layer in model.model.layers} | {model.model.norm.eps}
            eps |= {n.eps for layer in model.model.layers if layer.self_attn.qk_norm
                    for n in (layer.self_attn.q_norm, layer.self_attn.k_norm)}
            if len(eps) != 1:
                return None, "the norms have different epsilons"
            decode = DecodeModel(
                layers=layers, embed=embed_c, head=head_c, final_norm=model.model.norm.weight.detach(),
                cos=model.rotary.cos, sin=model.rotary.sin, hidden=spec.hidden_size, heads=first.num_heads,
                kv_heads=first.num_kv_heads, head_dim=first.head_dim, inter=spec.intermediate_size,
                vocab=spec.vocab_size, eps=eps.pop(), scale=first.attn.scale, window=first.attn.sliding_window)
        except ValueError as e:
            return None, str(e)
        return cls(decode), None

    def run(self, token: int, position: int, block_table: list[int]) -> torch.Tensor:
        """Logits fp32 [1, vocab] for ``token`` at ``position`` (its K/V written into the
        cache at the slot ``block_table`` gives)."""
        return self._model.step(token, position, block_table, out=self._logits)

    def run_rows(self, rows) -> torch.Tensor:
        """Logits fp32 [len(rows), vocab] of several sequences' decode rows (``StepRow``s of
        one token each) in one C call: each row's logits as ``run`` gives them, the weights
        read once for all. Like ``run``'s, the buffer is reused by the next call."""
        if len(rows) > self._rows_logits.shape[0]:
            self._rows_logits = torch.empty(max(len(rows), 2 * self._rows_logits.shape[0]), self._model.vocab,
                                            dtype=torch.float32)
        return self._model.step_rows([r.token_ids[0] for r in rows], [r.start for r in rows],
                                     [r.block_table for r in rows], out=self._rows_logits)
