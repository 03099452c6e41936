"""A GGUF file with Q4_K and Q5_K tensors (a 2-layer cut of the bundled SmolLM2 whose
down projections are rewritten as random K-quant super-blocks with the gguf writer): the
default load keeps them quantized (Q4_K as int4, Q5_K as int8 codes with mins, groups of
32) and, with exact float activations, its logits are transformers' for the file's own
dequantized weights (tolerance: the scales and mins rounded once to float16)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.api import Engine
from tests.models.test_parity import gguf_reference_model, native_logits
from tests.quant.test_gguf_kquants import dequantize, random_blocks

gguf = pytest.importorskip("gguf")

LAYERS = 2
DOWN_TYPES = {0: "Q4_K", 1: "Q5_K"}


@pytest.fixture(scope="module")
def kquant_gguf(default_model, tmp_path_factory):
    from engine.loader.resolve import default_gguf_path

    reader = gguf.GGUFReader(str(default_gguf_path()))
    path = tmp_path_factory.mktemp("kquant") / "smol-2layer-kquants.gguf"
    writer = gguf.GGUFWriter(str(path), arch="llama")
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        value = LAYERS if name == "llama.block_count" else field.contents()
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, value, field.types[0], sub_type=sub)
    for t in reader.tensors:
        if t.name.startswith("blk.") and int(t.name.split(".")[1]) >= LAYERS:
            continue
        kind = DOWN_TYPES.get(int(t.name.split(".")[1])) if t.name.endswith("ffn_down.weight") else None
        if kind is not None:  # [576 rows, 1536 inputs]: 6 super-blocks a row
            rows = int(t.shape[1])
            data = random_blocks(kind, rows, int(t.shape[0]) // 256, seed=len(kind) + rows)
            writer.add_tensor(t.name, data, raw_dtype=getattr(gguf.GGMLQuantizationType, kind))
        else:
            writer.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("kernel", ["reference", "fast"])
def test_q4_k_and_q5_k_are_kept_quantized_and_match_the_files_weights(kquant_gguf, monkeypatch, kernel):
    """With exact float activations (the reference kernel) the logits are transformers' for
    the file's dequantized weights up to the float16 scales (measured: 0.012 at a largest
    logit of 34); Hearth's C kernel rounds activations to int8 blocks, as llama.cpp does,
    which moves them a little more (with random blocks in the down projections the logits
    are nearly flat, so near-ties may swap: the fast kernel is held to its distance)."""
    if kernel == "reference":
        monkeypatch.setenv("HEARTH_QUANT_KERNEL", "reference")
    else:
        monkeypatch.delenv("HEARTH_QUANT_KERNEL", raising=False)
    ref_model = gguf_reference_model(kquant_gguf)
    eng = Engine.load(str(kquant_gguf), device="cpu", dtype="float32", num_blocks=64, max_model_len=512)
    try:
        info = eng.model_info
        assert info.quantization == "gguf"
        assert "1 Q4_K tensors kept" in info.quant_detail and "1 Q5_K tensors kept" in info.quant_detail
        downs = [layer.mlp.down_proj for layer in eng.runner.model.model.layers]
        assert [(m.bits, m.group_size, m.mins is not None) for m in downs] == [(4, 32, True), (8, 32, True)]
        ids = eng.tokenizer.encode("The capital of France is Paris. The capital of Germany is")
        with torch.no_grad():
            ref = ref_model(torch.tensor([ids])).logits[0].float()
        got = native_logits(eng, ids, [len(ids)])
        if kernel == "reference":
            torch.testing.assert_close(got, ref, atol=2e-3 * ref.abs().max().item(), rtol=0)
            assert torch.equal(got.argmax(-1), ref.argmax(-1))
        else:  # measured: mean 0.088, largest 0.67
            top = ref.abs().max()
            assert (got - ref).abs().mean() < 0.01 * top and (got - ref).abs().max() < 0.05 * top
    finally:
        eng.shutdown()


def test_mixed_fused_groups_widen_or_say_why_they_stay_float():
    """q/k/v (and gate/up) run as one matmul, so their kept forms must agree: kept members
    of different forms in groups of 32 become int8 codes with mins (exactly), and a group
    with a member that stays float stays float, counted as such in the model's info."""
    from types import SimpleNamespace

    import engine.loader.gguf as g
    from engine.quant.gguf_kquants import read_kquant, to_weight

    q4k = read_kquant(random_blocks("Q4_K", 8, 1, seed=1), "Q4_K")
    q5k = read_kquant(random_blocks("Q5_K", 8, 1, seed=2), "Q5_K")
    w4, w5 = to_weight(q4k), to_weight(q5k)
    widened = g._as_int8_with_mins(w4)
    assert (widened.bits, widened.group_size) == (8, 32) and torch.equal(widened.dequantize(), w4.dequantize())
    assert g._as_int8_with_mins(w5) is w5
    raw = {}
    tensors = {}
    layers = {0: ("Q4_K", "Q4_K", "Q5_K"), 1: ("Q4_K", "Q4_K", "Q6_K")}
    for layer, kinds in layers.items():
        for proj, kind, seed in zip(("q_proj", "k_proj", "v_proj"), kinds, (3, 4, 5)):
            blocks = random_blocks(kind, 8, 1, seed=seed + 10 * layer)
            name = f"model.layers.{layer}.self_attn.{proj}.weight"
            raw[name] = SimpleNamespace(tensor_type=getattr(gguf.GGMLQuantizationType, kind), data=blocks)
            tensors[name] = torch.from_numpy(dequantize(blocks, getattr(gguf.GGMLQuantizationType, kind)))

    def fake_tensors(path, cfg, names):
        return raw

    import pytest as _pytest

    with _pytest.MonkeyPatch.context() as mp:
        mp.setattr(g, "_gguf_tensors", fake_tensors)
        kept, types = g.kept_quantized(None, None, tensors)
    layer0 = [kept[f"model.layers.0.self_attn.{p}.weight"] for p in ("q_proj", "k_proj", "v_proj")]
    assert {(w.bits, w.group_size, w.mins is not None) for w in layer0} == {(8, 32, True)}
    for w, name in zip(layer0, ("q_proj", "k_proj", "v_proj")):
        torch.testing.assert_close(w.dequantize(), tensors[f"model.layers.0.self_attn.{name}.weight"],
                                   rtol=2e-3, atol=2e-3 * w.dequantize().abs().max().item())
    assert not any(n.startswith("model.layers.1.") for n in kept)
    assert types == {"kept": {"Q4_K": 2, "Q5_K": 1}, "dequantized": {"Q6_K": 1}, "fused_float": {"Q4_K": 2}}
