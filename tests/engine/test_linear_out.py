"""``Linear.forward(x, out=)``: the CUDA graphs write every bucket's logits into one buffer,
so the result must be the same as without ``out``, bias or not, on the GEMV path too."""

from __future__ import annotations


import pytest
import torch

from engine.layers.linear import Linear
from hearth_kernels._compat import interpreting


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("gemv", [None, (4, 32, 2)])
@torch.inference_mode()  # as the engine runs (out= refuses tensors that need grad)
def test_out_matches_a_fresh_result(bias, rows, gemv):
    torch.manual_seed(0)
    # The GEMV is a Triton kernel: interpreted on CPU tensors in the CPU test run, compiled
    # for CUDA tensors in a GPU run.
    interpret = interpreting() or not torch.cuda.is_available()
    with torch.device("cpu" if interpret else "cuda"):
        _check_out(bias, rows, gemv)


def _check_out(bias, rows, gemv):
    layer = Linear(48, 37, bias=bias)
    torch.nn.init.normal_(layer.weight)
    if bias:
        torch.nn.init.normal_(layer.bias)
    if gemv is not None:
        layer.use_kernel(layer.gemv_kernel(gemv))
    x = torch.randn(rows, 48)
    want = layer(x)
    buf = torch.full((8, 37), float("nan"))
    got = layer(x, out=buf[:rows])
    assert got.data_ptr() == buf.data_ptr()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(want, x @ layer.weight.T + (layer.bias if bias else 0), rtol=1e-5, atol=1e-5)
