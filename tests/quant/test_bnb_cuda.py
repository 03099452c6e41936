"""bitsandbytes on a CUDA GPU (run by ``benchmarks/gpu_session.sh bnb``): a tiny model's
logits match transformers' own bitsandbytes model (bf16, same weights); NF4 decodes inside
CUDA graphs with the tokens of an eager run (or, if its kernels can't be captured, the
load says why and runs eagerly); LLM.int8() runs eagerly, saying why."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("bitsandbytes", reason="bitsandbytes is an optional extra (pip install 'bitsandbytes>=0.45')")

from engine.config import load_config  # noqa: E402
from engine.layers.bnb_linear import BnbLinear  # noqa: E402
from engine.loader.engine_loader import load_model  # noqa: E402
from engine.runner.lifecycle import release_runner  # noqa: E402
from tests.quant.test_bnb import PROMPT, _bnb_config  # noqa: E402
from tests.quant.test_quantized_cuda import greedy_with_and_without_graphs  # noqa: E402
from tests.quant.test_quantized_models import hearth_logits  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("method", ["bnb-nf4", "bnb-nf4-dq", "bnb-int8"])
def test_bitsandbytes_logits_on_cuda_match_transformers(tiny_models, method):
    from transformers import AutoModelForCausalLM

    pytest.importorskip("accelerate")
    path = tiny_models["llama3"]
    loaded = load_model(load_config(str(path), device="cuda", dtype="bfloat16", quantization=method,
                                    max_model_len=256, num_blocks=64))
    try:
        runner = loaded.runner
        assert any(isinstance(m, BnbLinear) for m in runner.model.modules())
        info = loaded.info
        if method == "bnb-int8":
            assert not info.cuda_graphs and "LLM.int8()" in info.cuda_graphs_off
        else:
            assert info.cuda_graphs or "capture failed" in (info.cuda_graphs_off or ""), info.cuda_graphs_off
        got = hearth_logits(runner)
    finally:
        release_runner(loaded.runner)
    hf = AutoModelForCausalLM.from_pretrained(str(path), quantization_config=_bnb_config(method, torch.bfloat16),
                                              dtype=torch.bfloat16, device_map="cuda").eval()
    with torch.inference_mode():
        want = hf(torch.tensor([PROMPT], device="cuda")).logits[0].float().cpu()
    err = (got - want).abs().max().item()
    assert err < 0.05 * want.abs().max().item(), err


@pytest.mark.parametrize("method", ["bnb-nf4", "bnb-int8"])
def test_greedy_tokens_with_and_without_cuda_graphs_agree(tiny_models, method):
    graphs, eager = greedy_with_and_without_graphs(tiny_models["llama3"], method)
    assert graphs == eager
