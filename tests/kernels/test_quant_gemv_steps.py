"""The x-stationary and dp4a batch-1 GEMVs' written-out software pipeline (each step's
codes, scales and mins loaded 0-2 steps ahead, ``hearth_kernels.quant_gemv._steps_start``) and
their whole-block x loads, at the edges the Llama-shape tests don't reach: N not a multiple
of the rows per program, K not a power of 2, rows per step not dividing rows per program,
no steps ahead (stages 0 or 1), SwiGLU with a bias; programs run last to first too (a GPU
runs them in any order, the interpreter in order)."""

from __future__ import annotations

import pytest
import torch

from hearth_kernels.activation import silu_and_mul
from hearth_kernels.quant_gemv import DP4A, ROWS, GemvConfig, quant_gemv
from tests.kernels.reference import DEVICE
from tests.kernels.test_quant_dp4a import check_exact
from tests.kernels.test_quant_gemv import check, make_weight, rand_x


def run_and_check(bits, n, k, group, mins, cfg, swiglu=False, bias=False):
    qw, prep = make_weight(bits, n, k, group, mins=mins, seed=n + k + bits)
    x = 3 * rand_x(1, 2 * k if swiglu else k, torch.bfloat16)
    b = rand_x(1, n, torch.bfloat16, seed=5)[0] if bias else None
    out = torch.full((1, n), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    y = quant_gemv(x, prep, config=cfg, swiglu=swiglu, bias=b, out=out)
    assert not torch.isnan(y).any()
    if cfg.kind == DP4A:
        check_exact(y, x, prep, bias=b, swiglu=swiglu)
    else:
        check(y, silu_and_mul(x) if swiglu else x, qw, bias=b)


@pytest.fixture
def reversed_programs(monkeypatch):
    """The interpreter's programs run last to first: a program that wrote another's rows
    (which a GPU may run before it) would be caught."""
    from triton.runtime import interpreter

    b = interpreter.interpreter_builder
    orig = type(b).set_grid_idx
    monkeypatch.setattr(type(b), "set_grid_idx", lambda self, x, y, z: orig(self, self.grid_dim[0] - 1 - x, y, z))


@pytest.mark.parametrize("kind", [ROWS, DP4A])
@pytest.mark.parametrize("rows,step,stages", [(8, 1, 1), (16, 4, 2), (32, 8, 3), (16, 2, 4), (16, 2, 0)])
@pytest.mark.parametrize("bits,n,k,group,mins", [(4, 37, 96, 32, True), (8, 41, 160, 32, True),
                                                 (8, 21, 416, 416, False)])
def test_steps_ahead_at_edge_shapes(kind, rows, step, stages, bits, n, k, group, mins, reversed_programs):
    run_and_check(bits, n, k, group, mins, GemvConfig(rows, step, 1, kind, stages))


@pytest.mark.parametrize("kind", [ROWS, DP4A])
def test_rows_per_step_not_dividing_rows_per_program(kind, reversed_programs):
    """24 rows per program in steps of 16: a second step's last 8 rows are the next
    program's, and must not be written with this one's zeros."""
    run_and_check(4, 64, 96, 32, True, GemvConfig(24, 16, 1, kind, 2))


def test_dp4a_split_k_programs_last_to_first_and_rows_per_program_a_power_of_2(reversed_programs):
    run_and_check(4, 64, 2048, 32, True, GemvConfig(32, 16, 1, DP4A, 2, 2), bias=True)
    with pytest.raises(ValueError, match="power of 2 of rows per program"):  # the fixup's arange
        run_and_check(4, 64, 2048, 32, True, GemvConfig(24, 16, 1, DP4A, 2, 2))


@pytest.mark.parametrize("kind", [ROWS, DP4A])
@pytest.mark.parametrize("bits,group,mins", [(4, 32, True), (8, 160, False)])
def test_swiglu_and_bias(kind, bits, group, mins):
    run_and_check(bits, 23, 160, group, mins, GemvConfig(8, 2, 1, kind, 3), swiglu=True, bias=True)


@pytest.mark.parametrize("kind", [ROWS, DP4A])
def test_a_long_row_not_a_power_of_two(kind):
    """K = 14240 (KP 16384: the x-stationary kernel loads one step ahead there)."""
    run_and_check(8, 9, 14240, 32, True, GemvConfig(4, 2, 4, kind, 3))
