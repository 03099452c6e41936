"""Programmatic dependent launch (hearth_kernels/pdl.py): when it is on, and the contract of
every kernel that takes it (checked on the kernels' source); on a Hopper GPU, a chain of
decode-step kernels replayed from a CUDA graph gives the same bits with PDL as without."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import textwrap

import pytest
import torch

import hearth_kernels
from hearth_kernels import pdl as _pdl
from tests.kernels.reference import DEVICE


def _pdl_kernels():
    """(module name, JIT function) for every kernel of hearth_kernels with a ``PDL`` parameter."""
    found = []
    for info in pkgutil.iter_modules(hearth_kernels.__path__):
        if info.ispkg or info.name == "cpu_quant":
            continue
        mod = importlib.import_module(f"hearth_kernels.{info.name}")
        for name, obj in vars(mod).items():
            fn = getattr(obj, "fn", None)  # a JITFunction (or the interpreter's stand-in) wraps it
            if inspect.isfunction(fn) and fn.__module__ == mod.__name__ \
                    and "PDL" in inspect.signature(fn).parameters and name not in ("pdl_start", "pdl_wait"):
                found.append((f"{info.name}.{name}", obj))
    return found


KERNELS = _pdl_kernels()


def test_the_decode_step_kernels_take_pdl():
    names = {n.split(".")[1] for n, _ in KERNELS}
    assert {"_rms_norm_kernel", "_rotary_kernel", "_write_kv_kernel", "_rotary_write_kv_kernel", "_decode_split_kernel",
            "_decode_merge_kernel", "_quantize_x_kernel", "_quant_gemv_dp4a_kernel", "_quant_gemv_rows_kernel", "_quant_gemv_kernel",
            "_gemv_kernel", "_fp8_gemv_rows_kernel", "_silu_and_mul_kernel", "_quant_gemv_dp4a_tma_kernel", "_gemv_tma_kernel"} <= names, names


def _called(node) -> set[str]:
    out = set()
    for n in ast.walk(node):
        if isinstance(n, ast.Call):
            f = n.func
            out.add(f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", ""))
    return out


# what a kernel may do before it waits: compute indices, and request weights (never written by a kernel)
_BEFORE_WAIT_OK = {"pdl_start", "program_id", "arange", "where", "to", "min", "max", "zeros", "_block_groups"}
# the helpers that load weights, and the pointer arguments they may be given (weights, scales, mins)
_WEIGHT_LOADERS = {"_steps_start", "_fp8_rows_ahead", "_kloop_ahead"}
_WEIGHT_POINTERS = {"q_ptr", "s_ptr", "m_ptr", "w_ptr"}


@pytest.mark.parametrize("name,kernel", KERNELS, ids=[n for n, _ in KERNELS])
def test_every_pdl_kernel_waits_first_on_every_path(name, kernel):
    """The module docstring's contract, on the source: one top-level ``pdl_wait(PDL)`` that
    every program reaches (not under an ``if`` or a loop, no ``return`` before it), and before
    it no load of anything a kernel writes, no store, no atomic."""
    body = ast.parse(textwrap.dedent(inspect.getsource(kernel.fn))).body[0].body
    waits = [i for i, st in enumerate(body) if isinstance(st, ast.Expr) and "pdl_wait" in _called(st)]
    assert len(waits) == 1, f"{name}: wants one top-level pdl_wait(PDL), found at statements {waits}"
    assert sum("pdl_wait" in _called(st) for st in body) == 1, f"{name}: pdl_wait nested in a statement"
    call = body[waits[0]].value
    assert [ast.unparse(a) for a in call.args] == ["PDL"], f"{name}: waits on {ast.unparse(call)}, not pdl_wait(PDL)"
    for st in body[:waits[0]]:
        assert not any(isinstance(n, ast.Return) for n in ast.walk(st)), f"{name}: returns before waiting"
        extra = _called(st) - _BEFORE_WAIT_OK - _WEIGHT_LOADERS
        assert not extra, f"{name}: calls {sorted(extra)} before pdl_wait (reads or writes before the wait)"
        for n in ast.walk(st):  # a weight loader given anything but weight pointers reads too early
            if isinstance(n, ast.Call) and getattr(n.func, "id", "") in _WEIGHT_LOADERS:
                pointers = {a.id for a in n.args if isinstance(a, ast.Name) and a.id.endswith("_ptr")}
                assert pointers <= _WEIGHT_POINTERS, f"{name}: {n.func.id} reads {sorted(pointers)} before the wait"


def test_pdl_is_off_on_cpu_and_under_the_interpreter(monkeypatch):
    assert _pdl.pdl_args(torch.device("cpu")) == {"PDL": False}
    monkeypatch.setattr(_pdl, "_device_has_pdl", lambda index: True)  # a Hopper card, as far as it knows
    cuda = torch.device("cuda", 0)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.delenv("HEARTH_PDL", raising=False)
    if _pdl._HAVE_GDC:
        assert _pdl.pdl_args(cuda) == {"PDL": True, "launch_pdl": True}
    monkeypatch.setenv("HEARTH_PDL", "0")
    assert _pdl.pdl_args(cuda) == {"PDL": False}
    monkeypatch.setenv("HEARTH_PDL", "1")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _pdl.pdl_args(cuda) == {"PDL": False}


def _chain(x, res, norm_w, preps, cos, sin, pos, cache, slots, tables, seq_lens, outs):
    """One decode-step-like chain, each kernel reading what the one before wrote: norm (with
    the residual), int4 GEMV (dp4a), rotary, KV write, attention (split + merge), GEMVs
    (the last two with x quantized by a kernel of its own, one with the norm in it)."""
    from hearth_kernels.kv_cache import write_kv_cache
    from hearth_kernels.paged_decode import paged_decode_attention
    from hearth_kernels.quant_gemv import DP4A, GemvConfig, ROWS, quant_gemv, quant_gemv_normed
    from hearth_kernels.rmsnorm import fused_add_rms_norm
    from hearth_kernels.rotary import apply_rotary

    h, r = x, res
    for layer, (qkv, o, up, down) in enumerate(preps):
        xn, r = fused_add_rms_norm(h, r, norm_w, 1e-5, out=outs["xn"], residual_out=outs["res"])
        y = quant_gemv(xn, qkv, config=GemvConfig(16, 4, 4, DP4A, 3), out=outs["qkv"])
        q = y[:, :256].view(1, 4, 64)
        k = y[:, 256:384].view(1, 2, 64)
        v = y[:, 384:].view(1, 2, 64)
        apply_rotary(q, k, pos, cos, sin)
        write_kv_cache(k, v, cache[layer], slots)
        a = paged_decode_attention(q, cache[layer], tables, seq_lens, 0.125, max_seq_len=64, num_splits=4,
                                   out=outs["attn"])
        h = quant_gemv(a.view(1, 256), o, config=GemvConfig(16, 2, 1, ROWS, 2), out=outs["o"])
        xn, r = fused_add_rms_norm(h, r, norm_w, 1e-5, out=outs["xn"], residual_out=outs["res"])
        g = quant_gemv(xn, up, config=GemvConfig(16, 4, 4, DP4A, 3), out=outs["up"])
        h = quant_gemv(g, down, config=GemvConfig(16, 4, 4, DP4A, 3, 2), swiglu=True, out=outs["down"])
        # x quantized once by a kernel of its own (with the norm; with SwiGLU) before the GEMV
        g, r = quant_gemv_normed(h, up, norm_w, 1e-5, residual=r, config=GemvConfig(8, 2, 4, DP4A, 2, 1, 1))
        h = quant_gemv(g, down, config=GemvConfig(16, 2, 4, DP4A, 2, 2, 1), swiglu=True, out=outs["down"])
    return h


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda" or torch.cuda.get_device_capability() < (9, 0),
                    reason="PDL needs a Hopper (sm_90) or newer GPU")
def test_a_graph_of_pdl_kernels_gives_the_same_bits_as_without(monkeypatch):
    from tests.kernels.test_quant_gemv import make_weight

    torch.manual_seed(0)
    layers, dev, dt = 8, "cuda", torch.bfloat16
    preps = [tuple(make_weight(4, n, k, 32, seed=10 * i + j)[1]
                   for j, (n, k) in enumerate([(512, 256), (256, 256), (1024, 256), (256, 512)]))
             for i in range(layers)]
    x = torch.randn(1, 256, device=dev, dtype=dt)
    res0 = torch.randn(1, 256, device=dev, dtype=dt)
    norm_w = torch.rand(256, device=dev, dtype=dt) + 0.5
    ang = torch.arange(64, device=dev)[:, None] * 0.01 * torch.arange(1, 33, device=dev)[None]
    cos, sin = torch.cat([ang.cos()] * 2, 1).to(dt), torch.cat([ang.sin()] * 2, 1).to(dt)
    pos = torch.tensor([37], device=dev)
    cache0 = torch.randn(layers, 2, 4, 16, 2, 64, device=dev, dtype=dt)
    slots = torch.tensor([37], device=dev)
    tables = torch.tensor([[0, 1, 2, 3]], device=dev, dtype=torch.int32)
    seq_lens = torch.tensor([38], device=dev, dtype=torch.int32)

    results = {}
    for pdl in ("0", "1"):
        monkeypatch.setenv("HEARTH_PDL", pdl)
        assert _pdl.pdl_on(torch.device("cuda")) is (pdl == "1")  # (else the comparison proves nothing)
        cache, res = cache0.clone(), res0.clone()
        outs = {name: torch.empty(1, n, device=dev, dtype=dt)
                for name, n in (("xn", 256), ("res", 256), ("qkv", 512), ("o", 256), ("up", 1024), ("down", 256))}
        outs["attn"] = torch.empty(1, 4, 64, device=dev, dtype=dt)
        _chain(x, res, norm_w, preps, cos, sin, pos, cache, slots, tables, seq_lens, outs)  # compile, warm up
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = _chain(x, res, norm_w, preps, cos, sin, pos, cache, slots, tables, seq_lens, outs)
        got = []
        for _ in range(20):  # replays of one graph (a missing wait would make them race)
            graph.replay()
            got.append(torch.cat([y.float().flatten(), outs["res"].float().flatten(), cache.float().flatten()]))
        torch.cuda.synchronize()
        results[pdl] = torch.stack(got)
    assert torch.isfinite(results["1"]).all()
    assert torch.equal(results["0"], results["1"])
