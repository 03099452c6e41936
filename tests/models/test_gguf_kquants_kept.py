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
from tests.quant.test_gguf_kquants import random_blocks

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
