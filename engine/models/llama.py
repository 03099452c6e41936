"""Hearth's native Llama-family model, written once and configured by a ModelSpec.

Covers Llama 2/3.x, Mistral, Qwen2/2.5 (qkv bias), Qwen3 (q/k RMSNorm) and SmolLM2.
Tokens of all sequences in a step are flattened into one [T, hidden] batch; attention
reads and writes the paged KV cache through the chosen backend. q/k/v and gate/up
projections are fused into one matmul each; the loader splits checkpoint tensors into
the fused parameters.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from engine.errors import ModelLoadError
from engine.layers.attention import AttentionBackend, AttentionMetadata
from engine.layers.linear import linear, swiglu_linear
from engine.layers.norm import RMSNorm
from engine.layers.rotary import RotaryEmbedding
from engine.models.spec import ModelSpec


class LlamaAttention(nn.Module):
    def __init__(self, spec: ModelSpec, dtype: torch.dtype) -> None:
        super().__init__()
        self.spec = spec
        self.qkv_proj = nn.Linear(spec.hidden_size, spec.q_size + 2 * spec.kv_size,
                                  bias=spec.qkv_bias, dtype=dtype)
        self.o_proj = nn.Linear(spec.q_size, spec.hidden_size, bias=spec.o_bias, dtype=dtype)
        if spec.qk_norm:
            self.q_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps, dtype=dtype)
            self.k_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps, dtype=dtype)
        self.attn: AttentionBackend | None = None  # set by the runner (backend choice is per load)

    def forward(self, positions, x, kv_cache, meta: AttentionMetadata, rotary: RotaryEmbedding):
        s = self.spec
        qkv = linear(self.qkv_proj, x)
        q, k, v = qkv.split([s.q_size, s.kv_size, s.kv_size], dim=-1)
        q = q.view(-1, s.num_heads, s.head_dim)
        k = k.view(-1, s.num_kv_heads, s.head_dim)
        v = v.view(-1, s.num_kv_heads, s.head_dim)
        if s.qk_norm:
            q = self.q_norm(q)
            k = self.k_norm(k)
        q, k = rotary(positions, q, k)
        o = self.attn.forward(q, k, v, kv_cache, meta)
        return linear(self.o_proj, o.reshape(-1, s.q_size))


class LlamaMLP(nn.Module):
    def __init__(self, spec: ModelSpec, dtype: torch.dtype) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(spec.hidden_size, 2 * spec.intermediate_size,
                                      bias=spec.mlp_bias, dtype=dtype)
        self.down_proj = nn.Linear(spec.intermediate_size, spec.hidden_size,
                                   bias=spec.mlp_bias, dtype=dtype)
        self.fused = False  # set by the model: SiLU-and-mul in one Triton kernel

    def forward(self, x):
        if self.fused:
            from kernels.activation import silu_and_mul

            gate_up = linear(self.gate_up_proj, x)
            y = swiglu_linear(self.down_proj, gate_up)  # one row: SwiGLU fused into the GEMV
            return y if y is not None else linear(self.down_proj, silu_and_mul(gate_up))
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec, dtype: torch.dtype) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, dtype=dtype)
        self.self_attn = LlamaAttention(spec, dtype)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, dtype=dtype)
        self.mlp = LlamaMLP(spec, dtype)

    def forward(self, positions, x, residual, kv_cache, meta, rotary):
        if residual is None:
            residual = x
            x = self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(positions, x, kv_cache, meta, rotary)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    def __init__(self, spec: ModelSpec, dtype: torch.dtype) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size, dtype=dtype)
        self.layers = nn.ModuleList(LlamaDecoderLayer(spec, dtype) for _ in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, dtype=dtype)


# checkpoint projection name -> (fused parameter, shard id)
_FUSED = {
    "q_proj": ("qkv_proj", "q"),
    "k_proj": ("qkv_proj", "k"),
    "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


class LlamaForCausalLM(nn.Module):
    """Build with ``torch.device("meta")``, then ``materialize`` and ``load_weights``."""

    def __init__(self, spec: ModelSpec, dtype: torch.dtype, max_positions: int) -> None:
        super().__init__()
        self.spec = spec
        self.model = LlamaModel(spec, dtype)
        if not spec.tie_word_embeddings:
            self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False, dtype=dtype)
        self.rotary = RotaryEmbedding(spec.head_dim, spec.rope, max_positions)

    # -- running -----------------------------------------------------------------------
    def set_attention(self, make_backend) -> None:
        for layer in self.model.layers:
            layer.self_attn.attn = make_backend()

    def use_fused_kernels(self, enabled: bool = True) -> None:
        """Route RMSNorm (+ residual add), RoPE and SiLU-and-mul through kernels/ (Triton).
        The model's maths is unchanged; the reference path stays plain torch."""
        for module in self.modules():
            if isinstance(module, (RMSNorm, RotaryEmbedding, LlamaMLP)):
                module.fused = enabled

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
        head = self.model.embed_tokens if self.spec.tie_word_embeddings else self.lm_head
        return linear(head, hidden, out=out)

    # -- building ----------------------------------------------------------------------
    def materialize(self, device: torch.device) -> None:
        """Allocate (uninitialised) storage for every parameter on ``device``."""
        self.to_empty(device=device)
        dtype = self.model.embed_tokens.weight.dtype
        self.rotary.build(device, dtype)

    def init_random(self, seed: int = 0, std: float = 0.02) -> None:
        """Random weights (benchmarks, tests): normal(0, std) matrices, unit norms."""
        gen = torch.Generator(device=self.model.embed_tokens.weight.device).manual_seed(seed)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if "norm" in name:
                    p.fill_(1.0)
                elif name.endswith("bias"):
                    p.zero_()
                else:
                    p.normal_(0.0, std, generator=gen)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], source: str = "checkpoint") -> None:
        """Copy checkpoint tensors (HF names) into the materialised parameters.

        Fused parameters receive their shards at the right offsets. Every parameter must
        be fully covered exactly once; anything missing, unexpected or mis-shaped is an
        error naming the tensor.
        """
        params = dict(self.named_parameters())
        s = self.spec
        covered: dict[str, set] = {name: set() for name in params}
        offsets = {
            "q": (0, s.q_size), "k": (s.q_size, s.kv_size), "v": (s.q_size + s.kv_size, s.kv_size),
            0: (0, s.intermediate_size), 1: (s.intermediate_size, s.intermediate_size),
        }
        expected_shards = {"qkv_proj": {"q", "k", "v"}, "gate_up_proj": {0, 1}}
        with torch.no_grad():
            for name, tensor in weights:
                if "rotary_emb.inv_freq" in name:
                    continue
                if name == "lm_head.weight" and s.tie_word_embeddings:
                    continue  # some tied checkpoints store the shared matrix twice
                parts = name.split(".")
                shard = None
                if len(parts) >= 2 and parts[-2] in _FUSED:
                    fused, shard = _FUSED[parts[-2]]
                    target = ".".join(parts[:-2] + [fused, parts[-1]])
                else:
                    target = name
                param = params.get(target)
                if param is None:
                    raise ModelLoadError(
                        f"{source}: unexpected tensor {name!r} for a {s.model_type} model with this "
                        "config; the checkpoint and config.json don't match."
                    )
                dest = param
                if shard is not None:
                    start, size = offsets[shard]
                    dest = param.narrow(0, start, size)
                if tuple(dest.shape) != tuple(tensor.shape):
                    raise ModelLoadError(
                        f"{source}: tensor {name!r} has shape {tuple(tensor.shape)}, expected "
                        f"{tuple(dest.shape)} from config.json; the checkpoint and config don't match."
                    )
                dest.copy_(tensor)
                covered[target].add(shard)
        missing = []
        for pname, got in covered.items():
            fused = pname.split(".")[-2]
            need = expected_shards.get(fused, {None})
            if got != need:
                missing.append(pname)
        if missing:
            raise ModelLoadError(
                f"{source}: {len(missing)} tensors are missing from the checkpoint "
                f"(first: {missing[0]}); the download may be incomplete — re-download the model."
            )
