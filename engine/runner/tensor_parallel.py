"""Tensor-parallel sharding as a model transform (issue 18): rank ``rank`` of ``world``
replaces, on the meta device, every attention and MLP and the embedding and LM head with
its slice (``engine.layers.parallel``) before anything is allocated, so it loads and holds
only its share. ``rank_spec`` is the model as one rank sees it (its heads, KV heads and
MLP width; the vocabulary stays whole: the logits are gathered), which sizes its KV cache.

The processes (one runner per rank, rank 0 scheduling and sampling, each step's
``RunnerInput`` sent to the others) are ``engine.runner.tp_host`` (rank 0) and
``engine.runner.tp_worker`` (the others).
"""

from __future__ import annotations

import dataclasses

from torch import nn

from engine.layers.parallel import (RowParallelLinear, RowParallelSwiGLUDown, TPGroup, VocabParallelEmbedding,
                                    VocabParallelLMHead, kv_heads_of_rank, sharded_gate_up, sharded_qkv, split_even)
from engine.errors import InvalidRequestError
from engine.models.spec import ModelSpec


def rank_spec(spec: ModelSpec, rank: int, world: int) -> ModelSpec:
    """``spec`` as rank ``rank`` of ``world`` holds it (InvalidRequestError where the heads
    or the MLP don't divide)."""
    heads = split_even(spec.num_heads, world, "the attention heads")
    _, kv = kv_heads_of_rank(spec.num_kv_heads, rank, world)
    inter = split_even(spec.intermediate_size, world, "the MLP width")
    return dataclasses.replace(spec, num_heads=heads, num_kv_heads=kv, intermediate_size=inter)


def shard_transform(tp: TPGroup):
    """The transform that shards a ``LlamaForCausalLM`` (on the meta device) for rank
    ``tp.rank`` of ``tp.world``."""
    rank, world = tp.rank, tp.world

    def transform(model: nn.Module) -> None:
        from engine.models.llama import LlamaAttention

        spec: ModelSpec = model.spec
        mine = rank_spec(spec, rank, world)
        kv_first, _ = kv_heads_of_rank(spec.num_kv_heads, rank, world)
        dtype = model.dtype
        slices: dict[str, tuple] = {}  # module name -> what of each full tensor this rank loads
        for i, layer in enumerate(model.model.layers):
            attn = LlamaAttention(spec.hidden_size, mine.num_heads, mine.num_kv_heads, spec.head_dim,
                                  rms_norm_eps=spec.rms_norm_eps, qkv_bias=spec.qkv_bias, o_bias=spec.o_bias,
                                  qk_norm=spec.qk_norm, sliding_window=spec.sliding_window, dtype=dtype)
            attn.qkv_proj = sharded_qkv(spec.hidden_size, mine.num_heads, mine.num_kv_heads, spec.head_dim, rank,
                                        kv_first, spec.qkv_bias, dtype)
            attn.o_proj = RowParallelLinear(mine.q_size, spec.hidden_size, tp, rank * mine.q_size, spec.o_bias,
                                            dtype=dtype)
            layer.self_attn = attn
            layer.mlp.gate_up_proj = sharded_gate_up(spec.hidden_size, mine.intermediate_size, rank, spec.mlp_bias,
                                                     dtype)
            layer.mlp.down_proj = RowParallelSwiGLUDown(mine.intermediate_size, spec.hidden_size, tp,
                                                        rank * mine.intermediate_size, spec.mlp_bias, dtype=dtype)
            prefix = f"model.layers.{i}"
            slices[f"{prefix}.self_attn.qkv_proj"] = ("rows", attn.qkv_proj.tp_sources)
            slices[f"{prefix}.mlp.gate_up_proj"] = ("rows", layer.mlp.gate_up_proj.tp_sources)
            slices[f"{prefix}.self_attn.o_proj"] = ("columns", rank * mine.q_size, spec.o_bias)
            slices[f"{prefix}.mlp.down_proj"] = ("columns", rank * mine.intermediate_size, spec.mlp_bias)
        embed = VocabParallelEmbedding(spec.vocab_size, spec.hidden_size, tp, dtype=dtype)
        model.model.embed_tokens = embed
        model.lm_head = VocabParallelLMHead(spec.hidden_size, spec.vocab_size, tp, dtype=dtype,
                                            weight=embed.weight if spec.tie_word_embeddings else None)
        model.spec = mine
        model.tp = tp
        model.tp_slices = slices

    return transform


def shard_quantized(tp: TPGroup):
    """The transform after weight quantization (``engine.quant.transform``) on a sharded
    model: each projection it replaced with a ``QuantizedLinear`` (built with this rank's
    sizes) gets this rank's rows or columns of the full float tensor before quantizing it
    as it streams in, and a row-parallel one its all-reduce back. Each rank so holds what
    one process would: int4's groups along the inputs fall on the same columns (a rank's
    column range is whole groups), and int8's one scale per output channel is the whole
    row's (the full row quantized, this rank's codes kept)."""
    def transform(model: nn.Module) -> None:
        from engine.layers.quant_linear import QuantizedLinear

        for name, how in getattr(model, "tp_slices", {}).items():
            module = model.get_submodule(name)
            if not isinstance(module, QuantizedLinear):
                continue
            if how[0] == "rows":
                module.load_part = _narrowed(module.load_part, lambda t, shard, src=how[1]: t.narrow(0, *src[shard]))
                continue
            _, start, bias = how
            if bias:
                raise InvalidRequestError(f"{name} has a bias: tensor parallel with quantized weights can't add it "
                                          "once after the all-reduce yet; load with --quant none.",
                                          options=("quantization",))
            cols = module.in_features
            if getattr(module.source, "group_size", None) == 0:  # one scale per output row: the whole row's, as in one process
                module.load_part = _per_channel_slice(module, start)
            else:
                module.load_part = _narrowed(module.load_part, lambda t, shard, a=start, n=cols: t.narrow(1, a, n))
            module.register_forward_hook(lambda _m, _args, out: tp.all_reduce(out))

    return transform


def _per_channel_slice(module, start: int):
    """``load_part`` of a row-parallel projection with one scale per output row: quantize
    the full float rows (their scales), keep this rank's columns of the codes."""
    from engine.quant.qweight import QuantizedWeight

    load_part, cols = module.load_part, module.in_features

    def load(key, tensor, shard_id):
        if key != "weight":
            return load_part(key, tensor, shard_id)
        rows = tensor.shape[0]
        full = module.source.to_weight({"weight": tensor.to(module.qweight.device)}, rows, tensor.shape[1])
        mine = QuantizedWeight(full.bits, cols, full.qweight.narrow(1, start, cols).contiguous(), full.scales,
                               full.mins, None, fmt=full.fmt)
        module._copy_rows(mine, 0, rows)
    return load


def _narrowed(load_part, narrow):
    """``load_part`` that takes this rank's part of a float ``weight`` first."""
    def load(key, tensor, shard_id):
        return load_part(key, narrow(tensor, shard_id) if key == "weight" else tensor, shard_id)
    return load
