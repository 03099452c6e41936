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
from dataclasses import dataclass
from functools import partial

from torch import nn

from engine.errors import InvalidRequestError
from engine.layers.parallel import (RowParallelLinear, RowParallelSwiGLUDown, TPGroup, VocabParallelEmbedding,
                                    VocabParallelLMHead, kv_heads_of_rank, sharded_gate_up, sharded_qkv, split_even)
from engine.models.spec import ModelSpec
from engine.quant.qweight import PACK_BLOCK, QuantizedWeight


def rank_spec(spec: ModelSpec, rank: int, world: int) -> ModelSpec:
    """``spec`` as rank ``rank`` of ``world`` holds it (InvalidRequestError where the heads
    or the MLP don't divide, naming the rank counts that divide them all)."""
    fits = " or ".join(str(w) for w in range(1, 9) if _divides(spec, w))
    heads = split_even(spec.num_heads, world, "the attention heads", fits)
    _, kv = kv_heads_of_rank(spec.num_kv_heads, rank, world, fits)
    inter = split_even(spec.intermediate_size, world, "the MLP width", fits)
    return dataclasses.replace(spec, num_heads=heads, num_kv_heads=kv, intermediate_size=inter)


def _divides(spec: ModelSpec, world: int) -> bool:
    """Whether ``world`` ranks take the model: its heads, its KV heads (or a multiple of them:
    each replicated) and its MLP width."""
    kv = spec.num_kv_heads
    return (spec.num_heads % world == 0 and spec.intermediate_size % world == 0
            and (kv % world == 0 if kv >= world else world % kv == 0))


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
            # (what a quantized twin of each loads: ``shard_quantized``)
            prefix = f"model.layers.{i}"
            kv_rows = spec.num_kv_heads * spec.head_dim
            slices[f"{prefix}.self_attn.qkv_proj"] = _Slice(
                "rows", spec.hidden_size, sources=attn.qkv_proj.tp_sources,
                full_rows={"q": spec.num_heads * spec.head_dim, "k": kv_rows, "v": kv_rows})
            slices[f"{prefix}.mlp.gate_up_proj"] = _Slice(
                "rows", spec.hidden_size, sources=layer.mlp.gate_up_proj.tp_sources,
                full_rows={0: spec.intermediate_size, 1: spec.intermediate_size})
            slices[f"{prefix}.self_attn.o_proj"] = _Slice("columns", spec.num_heads * spec.head_dim,
                                                          start=rank * mine.q_size, bias=spec.o_bias)
            slices[f"{prefix}.mlp.down_proj"] = _Slice("columns", spec.intermediate_size,
                                                       start=rank * mine.intermediate_size, bias=spec.mlp_bias)
        embed = VocabParallelEmbedding(spec.vocab_size, spec.hidden_size, tp, dtype=dtype)
        model.model.embed_tokens = embed
        model.lm_head = VocabParallelLMHead(spec.hidden_size, spec.vocab_size, tp, dtype=dtype,
                                            weight=embed.weight if spec.tie_word_embeddings else None)
        model.spec = mine
        model.tp = tp
        model.tp_slices = slices

    return transform


@dataclass(frozen=True, slots=True)
class _Slice:
    """What of each full checkpoint tensor a sharded projection holds: ``rows`` (by
    shard: ``sources[shard]`` = (first row, rows) of the ``full_rows[shard]`` the
    checkpoint has) or ``columns`` (``start`` on, as many as the module has, of
    ``full_in``); ``bias``: a row-parallel projection's."""

    how: str
    full_in: int
    sources: dict | None = None
    full_rows: dict | None = None
    start: int = 0
    bias: bool = False


def shard_quantized(tp: TPGroup):
    """The transform after weight quantization (``engine.quant.transform``) on a sharded
    model: each projection it replaced with a ``QuantizedLinear`` (built with this rank's
    sizes) reads each full checkpoint tensor into Hearth's canonical quantized layout as
    one process would (quantizing a float tensor, or converting a published format's or a
    GGUF's blocks) and keeps this rank's rows or columns of it
    (``engine.quant.qweight.QuantizedWeight``: rows are whole, columns whole groups and
    int4 packing blocks). Each rank so holds
    exactly its slice of the one-process weights (int8's per-row scale is the whole row's;
    int4's groups, auto: the largest of 128/64/32 dividing each rank's inputs, are one
    process's where that size divides them too). Their all-reduce: ``reduce_row_parallel``."""
    def transform(model: nn.Module) -> None:
        from engine.layers.quant_linear import QuantizedLinear

        for name, where in getattr(model, "tp_slices", {}).items():
            module = model.get_submodule(name)
            if not isinstance(module, QuantizedLinear):
                continue
            if where.how == "columns":
                if where.bias:
                    raise InvalidRequestError(f"{name} has a bias: tensor parallel with quantized weights can't "
                                              "add it once after the all-reduce yet; load with --quant none.",
                                              options=("quantization",))
            module._write_shard = partial(_write_slice, module, where, name)

    return transform


def reduce_row_parallel(model: nn.Module, tp: TPGroup) -> None:
    """After the kernel plan (which may swap a quantized projection for a float one): every
    row-parallel projection that isn't one of ``engine.layers.parallel``'s own (a quantized
    one, or its float stand-in) sums its output over the ranks."""
    from engine.layers.parallel import _RowParallel

    for name, where in getattr(model, "tp_slices", {}).items():
        module = model.get_submodule(name)
        if where.how == "columns" and not isinstance(module, _RowParallel):
            module.register_forward_hook(lambda _m, _args, out: tp.all_reduce(out))


def _write_slice(module, where: _Slice, name: str, shard_id) -> None:
    """``QuantizedLinear._write_shard`` of a tensor-parallel rank: the full tensor into the
    canonical layout, then this rank's part of it into the module."""
    parts = module._pending.pop(shard_id)
    start, rows = module.shard_offsets[shard_id]
    dev = module.qweight.device
    parts = {k: v.to(dev) for k, v in parts.items()}
    if where.how == "rows":
        first, n = where.sources[shard_id]
        qw = module.source.to_weight(parts, where.full_rows[shard_id], where.full_in).rows(first, n)
    else:
        qw = slice_columns(module.source.to_weight(parts, rows, where.full_in), where.start, module.in_features)
    if qw.perm is not None:
        raise InvalidRequestError(f"{name}: a GPTQ act-order (desc_act) checkpoint can't be split by tensor "
                                  "parallel (its input permutation spans the ranks): use --split layer.",
                                  options=("split",))
    module._copy_rows(qw, start, rows)


def slice_columns(qw: QuantizedWeight, start: int, cols: int) -> QuantizedWeight:
    """Inputs ``[start, start + cols)`` of a canonical quantized weight: whole groups (one
    scale per row stays the row's, now for ``cols`` inputs), int4's packed bytes by their
    blocks of 32 inputs."""
    k, g = qw.in_features, qw.group_size
    per_row = g == k
    if not per_row and (start % g or cols % g):
        raise InvalidRequestError(f"tensor parallel: a rank's inputs [{start}, {start + cols}) don't fall on whole "
                                  f"groups of {g}: use another group size or rank count, or --split layer.",
                                  options=("devices", "split"))
    if qw.bits == 4 and qw.fmt == "int" and (start % PACK_BLOCK or cols % PACK_BLOCK):
        raise InvalidRequestError(f"tensor parallel: int4 needs each rank's inputs in blocks of {PACK_BLOCK}: "
                                  "use another rank count, or --split layer.", options=("devices", "split"))
    packed = 2 if qw.bits == 4 and qw.fmt == "int" else 1
    codes = qw.qweight.narrow(1, start // packed, cols // packed).contiguous()

    def groups(t):
        return None if t is None else t if per_row else t.narrow(1, start // g, cols // g).contiguous()
    return QuantizedWeight(qw.bits, cols if per_row else g, codes, groups(qw.scales), groups(qw.mins), qw.perm,
                           fmt=qw.fmt)
