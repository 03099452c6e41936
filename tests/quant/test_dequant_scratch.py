"""Where the GPU's quantized GEMM switches to dequantize + cuBLAS, and the memory that costs.

From ``hearth_kernels/quant_gemm.DEQUANT_ROWS`` rows (per code width) a projection expands its
weight into an [N, K] scratch; an LM head keeps the old threshold (``HEAD_DEQUANT_ROWS``: its
scratch would be the whole vocabulary matrix), and the graphs' reserved pool counts the largest
scratch (``engine.runner.memory.scratch_bytes``). Here on the CPU, with the Triton kernel bound
as it is on a GPU (its GEMM under the interpreter is not called: the calls are recorded)."""

from __future__ import annotations

import pytest
import torch

from engine.layers.quant_kernels import TritonQuant
from engine.layers.quant_linear import HEAD_DEQUANT_ROWS, QuantizedLinear
from engine.runner.lifecycle import release_runner
from engine.runner.memory import scratch_bytes
from hearth_kernels import quant_gemm
from tests.quant.test_quantized_models import load


def test_thresholds_are_per_code_width_and_an_explicit_one_wins():
    assert quant_gemm.dequant_rows_for(4) == quant_gemm.DEQUANT_ROWS[4]
    assert quant_gemm.dequant_rows_for(8) == quant_gemm.DEQUANT_ROWS[8]
    assert quant_gemm.dequant_rows_for(4, 7) == 7 and quant_gemm.dequant_rows_for(8, 1 << 30) == 1 << 30
    # a decode batch of 128 rows dequantizes int4 now (the old 1,024 kept it fused up to 1,023)
    assert quant_gemm.DEQUANT_ROWS[4] <= 128 < HEAD_DEQUANT_ROWS


@pytest.mark.parametrize("quant", ["int4", "int8"])
def test_the_head_keeps_its_threshold_and_the_largest_scratch_is_counted(tiny_models, quant):
    loaded = load(tiny_models["llama3"], quantization=quant)  # untied head: int8 per channel
    try:
        model = loaded.runner.model
        head = model.lm_head
        assert isinstance(head, QuantizedLinear) and head.dequant_rows == HEAD_DEQUANT_ROWS
        layers = [m for n, m in model.named_modules() if isinstance(m, QuantizedLinear) and m is not head]
        assert layers and all(m.dequant_rows is None for m in layers)
        assert scratch_bytes(model, 4096, 2) == 0  # the CPU kernels allocate none

        calls = []
        for m in layers + [head]:
            m.use_kernel(TritonQuant())
            m.kernel._gemm = lambda x, prep, **kw: calls.append(kw.get("dequant_rows")) or torch.zeros(
                x.shape[0], prep.out_features, dtype=x.dtype)
        bits = layers[0].bits
        threshold = quant_gemm.dequant_rows_for(bits)
        largest = max(m.out_features * m.in_features for m in layers) * 2
        assert scratch_bytes(model, threshold - 1, 2) == 0
        assert scratch_bytes(model, threshold, 2) == largest
        with_head = max(largest, head.out_features * head.in_features * 2)
        assert scratch_bytes(model, HEAD_DEQUANT_ROWS - 1, 2) == largest
        assert scratch_bytes(model, HEAD_DEQUANT_ROWS, 2) == with_head

        # the decode graphs' pool holds the scratch from the threshold on
        from engine.runner import cuda_graphs
        from engine.runner.memory import graph_reserve_bytes

        spec, size = loaded.runner.spec, loaded.runner.dtype.itemsize
        for rows, extra in ((threshold - 1, 0), (threshold, largest * size // 2)):
            assert graph_reserve_bytes(loaded.runner, rows) == (
                cuda_graphs.POOL_SLACK + extra + cuda_graphs.logits_bytes(rows, spec.vocab_size, size)
                + cuda_graphs.reserve_bytes(rows, spec.hidden_size, spec.vocab_size, spec.intermediate_size, size))

        # the module's threshold reaches the GEMM (None: the kernel's default by code width)
        head(torch.zeros(3, head.in_features))
        layers[0](torch.zeros(3, layers[0].input_width))
        assert calls == [HEAD_DEQUANT_ROWS, None]
    finally:
        release_runner(loaded.runner)
