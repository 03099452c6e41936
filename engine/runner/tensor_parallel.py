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
        for layer in model.model.layers:
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
        embed = VocabParallelEmbedding(spec.vocab_size, spec.hidden_size, tp, dtype=dtype)
        model.model.embed_tokens = embed
        model.lm_head = VocabParallelLMHead(spec.hidden_size, spec.vocab_size, tp, dtype=dtype,
                                            weight=embed.weight if spec.tie_word_embeddings else None)
        model.spec = mine
        model.tp = tp

    return transform
