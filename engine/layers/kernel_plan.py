"""The kernel plan: which kernels a loaded model runs, fixed once at load.

The plan is data (the attention backend, whether the Triton kernels for norms, RoPE and
SiLU-and-mul run); ``apply_kernel_plan`` turns it into module choices. Every module with
a load-time choice has ``choose_kernels(plan)``, which returns the module to run (itself,
with a kernel object fixed, or a replacement sharing its parameters); nothing reads a
flag in ``forward`` (one exception, fixed at load all the same: an attention layer whose
backend ``rotates`` leaves RoPE to the cache write, ``rope_in_kv_write``, when the rotary it
is handed is the in-place one: a layer split hands each device's). Batch-1 GEMV choices are
made after this, by timing (``engine/runner/gemv_tuning.py``), and CUDA graphs are captured
after that, so a graph holds the final choice.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from engine.layers.attention import AttentionBackend
from engine.layers.modules import replace_module


@dataclass(frozen=True, slots=True)
class KernelPlan:
    """``attention``: the backend class every attention module builds its own instance of
    (with its own head counts). ``fused``: RMSNorm (+ residual add), RoPE and SiLU-and-mul
    run as Triton kernels (``hearth_kernels/``) instead of the plain torch reference."""

    attention: type[AttentionBackend]
    fused: bool

    @classmethod
    def for_backend(cls, backend: type[AttentionBackend]) -> "KernelPlan":
        """The plan that goes with ``backend``: its fast path runs the fused kernels too
        (``backend.fused_kernels``); the torch reference runs plain torch throughout."""
        return cls(attention=backend, fused=backend.fused_kernels)


def apply_kernel_plan(model: nn.Module, plan: KernelPlan | Callable[[str], KernelPlan]) -> None:
    """Give every module of ``model`` with a load-time choice its choice under ``plan``
    (after the weights are loaded and RoPE's tables built: replacements share them).
    ``plan`` may be a function of the module's name: a layer split's plan per device."""
    plan_of = plan if callable(plan) else (lambda name: plan)
    for name, module in list(model.named_modules()):
        choose = getattr(module, "choose_kernels", None)
        if choose is None:
            continue
        chosen = choose(plan_of(name))
        if chosen is not module:
            replace_module(model, name, chosen)
