"""Hearth's native Llama-family model, written once and configured by a ModelSpec.

Covers Llama 2/3.x, Mistral, Qwen2/2.5 (qkv bias), Qwen3 (q/k RMSNorm) and SmolLM2.
Tokens of all sequences in a step are flattened into one [T, hidden] batch; attention
reads and writes the paged KV cache through the chosen backend. Every projection is a
module of ``engine.layers.linear`` (its kernel fixed at load); q/k/v and gate/up are fused
into one matmul each, and those modules take their checkpoint shards at their own offsets.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from engine.layers.attention import AttentionBackend, AttentionMetadata
from engine.layers.embedding import VocabEmbedding
from engine.layers.linear import Linear, MergedLinear, QKVLinear, SwiGLUDownLinear, TiedLMHead, norm_then_project
from engine.layers.modules import materialize
from engine.layers.norm import RMSNorm
from engine.layers.rotary import RotaryEmbedding
from engine.layers.weight_loader import load_checkpoint
from engine.models.spec import ModelSpec


class LlamaAttention(nn.Module):
    """One layer's attention. It holds its own sizes (given at construction: a
    tensor-parallel shard would be built with its own, fewer heads), never the model's."""

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, *,
                 rms_norm_eps: float, qkv_bias: bool = False, o_bias: bool = False, qk_norm: bool = False,
                 sliding_window: int | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.q_size = num_heads * head_dim
        self.kv_size = num_kv_heads * head_dim
        self.scale = head_dim ** -0.5
        self.sliding_window = sliding_window
        self.qk_norm = qk_norm
        self._split = [self.q_size, self.kv_size, self.kv_size]
        self.qkv_proj = QKVLinear(hidden_size, num_heads, num_kv_heads, head_dim, bias=qkv_bias, dtype=dtype)
        self.o_proj = Linear(self.q_size, hidden_size, bias=o_bias, dtype=dtype)
        if qk_norm:
            self.q_norm = RMSNorm(head_dim, rms_norm_eps, dtype=dtype)
            self.k_norm = RMSNorm(head_dim, rms_norm_eps, dtype=dtype)
        self.attn: AttentionBackend | None = None  # the kernel plan's backend (choose_kernels)
        self.rope_in_kv_write = False  # RoPE done by the backend's cache write (choose_kernels)

    @classmethod
    def from_spec(cls, spec: ModelSpec, dtype: torch.dtype) -> "LlamaAttention":
        return cls(spec.hidden_size, spec.num_heads, spec.num_kv_heads, spec.head_dim,
                   rms_norm_eps=spec.rms_norm_eps, qkv_bias=spec.qkv_bias, o_bias=spec.o_bias,
                   qk_norm=spec.qk_norm, sliding_window=spec.sliding_window, dtype=dtype)

    def choose_kernels(self, plan) -> "LlamaAttention":
        """Build this layer's instance of the plan's attention backend, with its own sizes."""
        self.attn = plan.attention(self.num_heads, self.num_kv_heads, self.head_dim, self.scale,
                                   self.sliding_window)
        self.rope_in_kv_write = plan.fused and self.attn.rotates
        return self

    def forward(self, positions, x, kv_cache, meta: AttentionMetadata, rotary: RotaryEmbedding):
        return self.attend(positions, self.qkv_proj(x), kv_cache, meta, rotary)

    def attend(self, positions, qkv, kv_cache, meta: AttentionMetadata, rotary: RotaryEmbedding):
        """The layer after its q/k/v projection (``qkv``: [T, q + 2 kv]): RoPE, the cache
        write, attention and the output projection. The decoder layer calls this, not the
        module (q/k/v came with its norm): hooks belong on the projections, not here."""
        q, k, v = qkv.split(self._split, dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q = self.q_norm(q)
            k = self.k_norm(k)
        if self.rope_in_kv_write and rotary.in_place:  # one kernel rotates q, k and writes k, v
            o = self.attn.forward(q, k, v, kv_cache, meta, rope=(positions, rotary.cos, rotary.sin))
        else:
            q, k = rotary(positions, q, k)
            o = self.attn.forward(q, k, v, kv_cache, meta)
        return self.o_proj(o.reshape(-1, self.q_size))


class LlamaMLP(nn.Module):
    """SwiGLU MLP: gate and up in one matmul, the activation in the down projection's kernel.
    (The decoder layer calls the projections itself: gate_up takes its norm along.)"""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False, *,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.gate_up_proj = MergedLinear(hidden_size, [intermediate_size, intermediate_size],
                                         ("gate_proj", "up_proj"), bias, dtype=dtype)
        self.down_proj = SwiGLUDownLinear(intermediate_size, hidden_size, bias, dtype=dtype)

    def forward(self, x):
        return self.down_proj(self.gate_up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec, dtype: torch.dtype) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, dtype=dtype)
        self.self_attn = LlamaAttention.from_spec(spec, dtype)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, dtype=dtype)
        self.mlp = LlamaMLP(spec.hidden_size, spec.intermediate_size, spec.mlp_bias, dtype=dtype)

    def forward(self, positions, x, residual, kv_cache, meta, rotary):
        # Each norm goes with the projection after it (``normed``): a quantized batch-1
        # projection may run the two in its kernels, any other runs two calls. Which way is
        # the GEMV tuner's choice, timed through ``normed``: the norm repeated in each GEMV
        # program's prologue, in a kernel that normalises and quantizes x once for all of
        # them (``qx`` configs), or the norm kernel first (``TritonQuant.norm_first``): for
        # gate_up's 900-1800 programs the prologue cost more than the norm's launch on an
        # H200 (8B int8: 362 tok/s against 383).
        (qkv_proj, input_norm), (gate_up_proj, post_norm) = self.normed_projections()
        qkv, residual = _normed(qkv_proj, x, residual, input_norm)
        x = self.self_attn.attend(positions, qkv, kv_cache, meta, rotary)
        x, residual = _normed(gate_up_proj, x, residual, post_norm)
        return self.mlp.down_proj(x), residual

    def normed_projections(self) -> tuple[tuple[nn.Module, nn.Module], ...]:
        """(projection, the norm ``forward`` hands it through ``normed``), in order: what the
        GEMV tuner times together (``engine/runner/gemv_tuning.py``)."""
        return ((self.self_attn.qkv_proj, self.input_layernorm), (self.mlp.gate_up_proj, self.post_attention_layernorm))


def _normed(proj: nn.Module, x, residual, norm):
    """``proj.normed`` where the projection has one (Hearth's), else the two calls (a module
    swapped in by a test or a transform)."""
    normed = getattr(proj, "normed", None)
    return normed(x, residual, norm) if normed is not None else norm_then_project(proj, x, residual, norm)


class LlamaModel(nn.Module):
    def __init__(self, spec: ModelSpec, dtype: torch.dtype) -> None:
        super().__init__()
        self.embed_tokens = VocabEmbedding(spec.vocab_size, spec.hidden_size, dtype=dtype)
        self.layers = nn.ModuleList(LlamaDecoderLayer(spec, dtype) for _ in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, dtype=dtype)


class LlamaForCausalLM(nn.Module):
    """Build with ``torch.device("meta")``, then ``materialize`` and ``load_weights``
    (``engine/runner/bring_up.py`` does, with the load's transforms and kernel plan)."""

    def __init__(self, spec: ModelSpec, dtype: torch.dtype, max_positions: int) -> None:
        super().__init__()
        self.spec = spec
        self.dtype = dtype  # of activations and float weights (a quantized embedding has none)
        self.model = LlamaModel(spec, dtype)
        if spec.tie_word_embeddings:
            self.lm_head = TiedLMHead(self.model.embed_tokens)
        else:
            self.lm_head = Linear(spec.hidden_size, spec.vocab_size, bias=False, dtype=dtype)
        self.rotary = RotaryEmbedding(spec.head_dim, spec.rope, max_positions)

    # -- running -----------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[torch.Tensor], meta: AttentionMetadata) -> torch.Tensor:
        """Returns the final hidden states [T, hidden] (normed)."""
        x = self.model.embed_tokens(input_ids)
        residual = None
        for layer, cache in zip(self.model.layers, kv_caches):
            x, residual = layer(positions, x, residual, cache, meta, self.rotary)
        x, _ = self.model.norm(x, residual)
        return x

    def compute_logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [rows, vocab]; into ``out`` when given (CUDA graphs share one buffer)."""
        return self.lm_head(hidden, out=out)

    # -- building ----------------------------------------------------------------------
    def materialize(self, device: torch.device) -> None:
        """Allocate (uninitialised) storage for every parameter on ``device``, and RoPE's tables."""
        materialize(self, device)
        self.rotary.build(device, self.dtype)

    def init_random(self, seed: int = 0, std: float = 0.02) -> None:
        """Random weights (benchmarks, tests): normal(0, std) matrices, unit norms."""
        gens: dict[torch.device, torch.Generator] = {}  # one per device (a layer split has several)

        def gen_on(t: torch.Tensor) -> torch.Generator:
            if t.device not in gens:
                gens[t.device] = torch.Generator(device=t.device).manual_seed(seed)
            return gens[t.device]

        with torch.no_grad():
            quantized = set()
            for module in self.modules():
                # Quantized modules draw their own (a tied head shares its embedding's).
                if module is not self and getattr(module, "checkpoint_params", None) and hasattr(module, "init_random"):
                    held = next(iter((*module.parameters(), *module.buffers())), None)
                    module.init_random(gen_on(held) if held is not None else gen_on(next(self.parameters())), std)
                    quantized.update(id(getattr(module, n)) for n in module.filled_by_parts
                                     if getattr(module, n, None) is not None)
            for name, p in self.named_parameters():
                if id(p) in quantized:
                    continue
                if "norm" in name:
                    p.fill_(1.0)
                elif name.endswith("bias"):
                    p.zero_()
                else:
                    p.normal_(0.0, std, generator=gen_on(p))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], source: str = "checkpoint") -> None:
        """Copy checkpoint tensors (HF names) into the materialised parameters, one at a
        time, each through its parameter's loader; the modules declare which checkpoint
        tensors fill them (fused q/k/v and gate/up take their shards at their own offsets).
        Every parameter must be fully covered; anything missing, unexpected or mis-shaped
        is a ModelLoadError naming the checkpoint tensor."""
        load_checkpoint(self, weights, source=source, what=f"a {self.spec.model_type} model",
                        skip=lambda name: "rotary_emb.inv_freq" in name)
