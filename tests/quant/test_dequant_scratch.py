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


def test_thresholds_are_per_code_form_and_an_explicit_one_wins():
    rows_for, table = quant_gemm.dequant_rows_for, quant_gemm.DEQUANT_ROWS
    assert rows_for(4, 128, 4096) == rows_for(4, 4096, 4096) == table["int4"]
    assert rows_for(8, 4096, 4096) == table["int8"]  # per output channel
    assert rows_for(8, 16, 4096) == rows_for(8, 32, 4096) == table["int8 grouped"]  # Q6_K, Q8_0
    assert rows_for(4, 128, 4096, 7) == 7 and rows_for(8, 4096, 4096, 1 << 30) == 1 << 30
    # a decode batch of 192 rows dequantizes now (the old 1,024 kept it fused up to 1,023)
    assert max(table.values()) <= 192 < HEAD_DEQUANT_ROWS


def test_the_path_by_rows():
    """int4 and per-channel int8: the weight-stationary kernel up to ``SWAP_ROWS``; then the
    fused kernel below the threshold, dequantize from it; an explicit ``dequant_rows`` first."""
    from hearth_kernels.quant_gemv import PreparedQuant

    assert quant_gemm.SWAP_ROWS == 128
    assert quant_gemm.DEQUANT_ROWS == {"int4": 96, "int8": 192, "int8 grouped": 128}

    def prep(bits, group, k=4096):
        return PreparedQuant(bits, group, torch.zeros(8, k // 2 if bits == 4 else k, dtype=torch.uint8),
                             torch.zeros(8, k // group), None)

    path, swap = quant_gemm.gemm_path, quant_gemm.SWAP_ROWS
    assert [path(r, prep(4, 128)) for r in (2, swap, swap + 1)] == ["mma", "mma", "dequant"]
    int8 = prep(8, 4096)
    assert [path(r, int8) for r in (2, swap, swap + 1, 191, 192)] == ["mma", "mma", "fused", "fused", "dequant"]
    q6k = prep(8, 16)
    assert [path(r, q6k) for r in (2, 127, 128)] == ["fused", "fused", "dequant"]
    q4k = prep(4, 32)  # int4 in 32s: two x tiles not measured
    assert [path(r, q4k) for r in (64, 65, 96)] == ["mma", "fused", "dequant"]
    assert path(100, prep(4, 128), dequant_rows=100) == "dequant" and path(99, prep(4, 128), dequant_rows=100) == "mma"
    assert path(100, int8, config=(64, 64, 128, 4, 3)) == "fused"  # a config is the fused kernel's


@pytest.mark.parametrize("quant", ["int4", "int8"])
def test_the_head_keeps_its_threshold_and_the_largest_scratch_is_counted(tiny_models, quant):
    assert quant_gemm.SWAP_ROWS == 128
    assert quant_gemm.DEQUANT_ROWS == {"int4": 96, "int8": 192, "int8 grouped": 128}
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
        # the first row count that dequantizes (test_the_path_by_rows pins the routing itself)
        assert len({(m.bits, m.group_size < m.in_features) for m in layers}) == 1  # one form here
        threshold = next(r for r in range(2, 2048) if quant_gemm.gemm_path(r, layers[0].kernel.prepared) == "dequant")
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
        # a prompt graph's head takes one row: a 2,048-token bucket counts the layers' scratch, not the head's
        assert scratch_bytes(model, 2048, 2, head_rows=1) == largest
        from engine.runner import prompt_graphs

        assert graph_reserve_bytes(loaded.runner, 1, 2048) == (
            cuda_graphs.POOL_SLACK + cuda_graphs.logits_bytes(1, spec.vocab_size, size) + largest * size // 2
            + prompt_graphs.reserve_bytes(2048, spec.hidden_size, spec.intermediate_size, size))

        # the module's threshold reaches the GEMM (None: the kernel's default by code width)
        head(torch.zeros(3, head.in_features))
        layers[0](torch.zeros(3, layers[0].input_width))
        assert calls == [HEAD_DEQUANT_ROWS, None]
    finally:
        release_runner(loaded.runner)


def test_a_tied_quantized_head_keeps_the_head_threshold(tiny_models):
    from engine.layers.quant_linear import QuantizedTiedHead
    from engine.layers.quant_parallel import QuantizedVocabParallelHead, QuantizedVocabParallelTiedHead

    loaded = load(tiny_models["llama-tied"], quantization="int4", quant_head=True)
    try:
        head = loaded.runner.model.lm_head
        assert isinstance(head, QuantizedTiedHead) and head.dequant_rows == HEAD_DEQUANT_ROWS
    finally:
        release_runner(loaded.runner)
    assert QuantizedVocabParallelHead.dequant_rows == QuantizedVocabParallelTiedHead.dequant_rows == HEAD_DEQUANT_ROWS
