"""Per-parameter loaders: each fused projection takes its checkpoint shards (q/k/v, gate/up)
at its own offsets; a wrong shape, a missing shard or an unexpected tensor is an error
naming the checkpoint tensor. And the memory pre-check counts what the model holds after
the load's transforms (a quantized linear counts as its int8 bytes), as the load pre-flight
(check_model) does."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from engine.errors import ModelLoadError
from engine.layers.linear import MergedLinear, QKVLinear
from engine.layers.modules import replace_module
from engine.models.spec import ModelSpec
from engine.runner.bring_up import build_on_meta, transformed_weight_bytes
from engine.shapes import shape_config

# GQA (4 query heads, 2 KV heads), qkv bias: the q, k and v shards all differ in size.
SPEC = ModelSpec.from_config(dict(shape_config("tiny"), model_type="qwen2", num_hidden_layers=2,
                                  hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                  intermediate_size=48, vocab_size=64, tie_word_embeddings=False))


def checkpoint(spec: ModelSpec = SPEC, seed: int = 0) -> dict[str, torch.Tensor]:
    """A split (Hugging Face layout) checkpoint of random tensors for ``spec``."""
    g = torch.Generator().manual_seed(seed)
    h, i, q, kv = spec.hidden_size, spec.intermediate_size, spec.q_size, spec.kv_size
    out = {"model.embed_tokens.weight": (spec.vocab_size, h), "model.norm.weight": (h,),
           "lm_head.weight": (spec.vocab_size, h)}
    for n in range(spec.num_layers):
        p = f"model.layers.{n}."
        out.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                    p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
                    p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.q_proj.bias": (q,),
                    p + "self_attn.k_proj.bias": (kv,), p + "self_attn.v_proj.bias": (kv,),
                    p + "self_attn.o_proj.weight": (h, q), p + "mlp.gate_proj.weight": (i, h),
                    p + "mlp.up_proj.weight": (i, h), p + "mlp.down_proj.weight": (h, i)})
    return {name: torch.randn(shape, generator=g) for name, shape in out.items()}


def fresh_model():
    model = build_on_meta(SPEC, torch.float32, 64)
    model.materialize(torch.device("cpu"))
    return model


def test_fused_qkv_and_gate_up_are_filled_from_split_tensors():
    ckpt = checkpoint()
    model = fresh_model()
    model.load_weights(ckpt.items())
    q, kv = SPEC.q_size, SPEC.kv_size
    for n, layer in enumerate(model.model.layers):
        p = f"model.layers.{n}."
        qkv = layer.self_attn.qkv_proj
        for param in ("weight", "bias"):
            got = getattr(qkv, param)
            assert torch.equal(got[:q], ckpt[p + f"self_attn.q_proj.{param}"])
            assert torch.equal(got[q:q + kv], ckpt[p + f"self_attn.k_proj.{param}"])
            assert torch.equal(got[q + kv:], ckpt[p + f"self_attn.v_proj.{param}"])
        gate_up = layer.mlp.gate_up_proj.weight
        inter = SPEC.intermediate_size
        assert torch.equal(gate_up[:inter], ckpt[p + "mlp.gate_proj.weight"])
        assert torch.equal(gate_up[inter:], ckpt[p + "mlp.up_proj.weight"])
        assert torch.equal(layer.self_attn.o_proj.weight, ckpt[p + "self_attn.o_proj.weight"])
        assert torch.equal(layer.mlp.down_proj.weight, ckpt[p + "mlp.down_proj.weight"])
    assert torch.equal(model.lm_head.weight, ckpt["lm_head.weight"])


def test_each_parameter_carries_its_own_loader():
    qkv = QKVLinear(8, num_heads=4, num_kv_heads=1, head_dim=2, bias=True)
    q, k, v = torch.randn(8, 8), torch.randn(2, 8), torch.randn(2, 8)
    with torch.no_grad():
        for shard, tensor in (("v", v), ("q", q), ("k", k)):  # any order
            qkv.weight.weight_loader(qkv.weight, tensor, shard)
    assert torch.equal(qkv.weight, torch.cat([q, k, v]))
    assert qkv.checkpoint_shards == {"q_proj": "q", "k_proj": "k", "v_proj": "v"}
    merged = MergedLinear(4, [3, 5], ("gate_proj", "up_proj"))
    gate, up = torch.randn(3, 4), torch.randn(5, 4)
    with torch.no_grad():
        merged.weight.weight_loader(merged.weight, up, 1)
        merged.weight.weight_loader(merged.weight, gate, 0)
    assert torch.equal(merged.weight, torch.cat([gate, up]))


def test_a_wrong_shape_is_refused_naming_the_tensor():
    ckpt = checkpoint()
    ckpt["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(SPEC.kv_size + 1, SPEC.hidden_size)
    with pytest.raises(ModelLoadError, match=r"'model\.layers\.0\.self_attn\.k_proj\.weight' has shape "
                                             r"\(17, 32\), expected \(16, 32\)"):
        fresh_model().load_weights(ckpt.items(), source="ckpt")


@pytest.mark.parametrize("dropped", ["model.layers.1.self_attn.v_proj.bias", "model.layers.0.mlp.up_proj.weight",
                                     "lm_head.weight"])
def test_a_missing_shard_is_named(dropped):
    ckpt = checkpoint()
    del ckpt[dropped]
    with pytest.raises(ModelLoadError, match=rf"1 tensors are missing .*\(first: {dropped}\)"):
        fresh_model().load_weights(ckpt.items(), source="ckpt")


def test_an_unexpected_tensor_is_refused():
    ckpt = checkpoint()
    ckpt["model.layers.0.self_attn.x_proj.weight"] = torch.zeros(2, 2)
    with pytest.raises(ModelLoadError, match=r"unexpected tensor 'model\.layers\.0\.self_attn\.x_proj\.weight' "
                                             r"for a qwen2 model"):
        fresh_model().load_weights(ckpt.items(), source="ckpt")


def test_a_tied_head_is_loaded_once_from_the_embedding():
    tied = ModelSpec.from_config(dict(shape_config("tiny"), hidden_size=32, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=48, vocab_size=64,
                                      num_hidden_layers=1, tie_word_embeddings=True))
    ckpt = checkpoint(tied)
    ckpt = {k: v for k, v in ckpt.items() if ".bias" not in k}
    for with_head in (False, True):  # some tied checkpoints store the shared matrix twice
        model = build_on_meta(tied, torch.float32, 64)
        model.materialize(torch.device("cpu"))
        model.load_weights((k, v) for k, v in ckpt.items() if with_head or k != "lm_head.weight")
        assert model.lm_head.weight is model.model.embed_tokens.weight
        assert torch.equal(model.lm_head.weight, ckpt["model.embed_tokens.weight"])


class Int8Linear(nn.Module):
    """Stands in for a quantized linear: int8 weights and one float32 scale per row."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=torch.int8), requires_grad=False)
        self.register_buffer("scales", torch.empty(out_features))


def int8_o_proj(model: nn.Module) -> None:
    for n, layer in enumerate(model.model.layers):
        old = layer.self_attn.o_proj
        replace_module(model, f"model.layers.{n}.self_attn.o_proj", Int8Linear(old.in_features, old.out_features))


def test_the_memory_precheck_counts_the_transformed_model():
    plain = transformed_weight_bytes(SPEC, torch.float32, 64)
    quantized = transformed_weight_bytes(SPEC, torch.float32, 64, [int8_o_proj])
    o_proj = SPEC.hidden_size * SPEC.q_size
    # Per layer: o_proj's float32 weight (4 bytes each) becomes int8 (1 byte) plus a float32 scale per row.
    assert plain - quantized == SPEC.num_layers * (o_proj * 3 - SPEC.hidden_size * 4)
    params = sum(p.numel() for p in build_on_meta(SPEC, torch.float32, 64).parameters())
    assert plain == params * 4


def test_the_load_and_its_preflight_check_the_transformed_bytes(tiny_models, monkeypatch):
    """Free memory between the quantized and the plain weights: the plain load is refused
    before anything is allocated, the quantized one goes on to materialize; check_model
    counts the quantized bytes too."""
    import engine.runner.bring_up as bring_up
    import engine.runner.memory as memory
    from engine.api import Engine, OutOfMemoryError, check_model
    from engine.models.spec import read_config

    path = tiny_models["llama3"]
    spec = ModelSpec.from_config(read_config(path))
    options = dict(device="cpu", dtype="float32", attention="torch", max_model_len=64, num_blocks=8)
    plain = check_model(str(path), **options).weights_bytes
    quantized = transformed_weight_bytes(spec, torch.float32, 64, [int8_o_proj])
    assert plain == transformed_weight_bytes(spec, torch.float32, 64) > quantized

    monkeypatch.setattr(bring_up, "model_transforms", lambda config, weights=None, rank=0, world_size=1: [int8_o_proj])
    assert check_model(str(path), **options).weights_bytes == quantized
    monkeypatch.setattr(memory, "free_memory_bytes", lambda device: (quantized, 2**40))
    reached = []

    def stop_at_materialize(model, *a, **k):
        reached.append(model)
        raise RuntimeError("materialize reached")

    monkeypatch.setattr(bring_up, "materialize_weights", stop_at_materialize)
    with pytest.raises(RuntimeError, match="materialize reached"):
        Engine.load(str(path), **options)
    assert isinstance(reached[0].model.layers[0].self_attn.o_proj, Int8Linear)  # transformed on meta
    monkeypatch.setattr(bring_up, "model_transforms", lambda config, weights=None, rank=0, world_size=1: [])
    with pytest.raises(OutOfMemoryError, match="the weights need"):
        Engine.load(str(path), **options)
