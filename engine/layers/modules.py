"""Module-tree helpers of a load: replace a submodule, count and allocate what a model holds.

A model is built on the meta device (shapes, no storage), transformed there (modules
replaced: quantized, sharded), counted (``module_bytes``: what it will hold once real),
then given storage (``materialize``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def replace_module(root: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` where ``root``'s submodule ``name`` ("model.layers.0.self_attn.o_proj")
    is; returns the module it replaced."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old


def _tensors(module: nn.Module):
    """Every parameter and buffer of ``module``, each once (shared ones too)."""
    seen: set[int] = set()
    for t in (*module.parameters(), *module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            yield t


def module_bytes(module: nn.Module) -> int:
    """Bytes of every parameter and buffer ``module`` holds, shared ones counted once: on
    the meta device, what it will take once materialized."""
    return sum(t.numel() * t.element_size() for t in _tensors(module))


def materialize(module: nn.Module, device: torch.device) -> None:
    """Give every parameter and buffer of ``module`` (uninitialised) storage on ``device``.

    Unlike ``Module.to_empty``, a parameter shared by two modules (a tied head) stays one
    parameter, and what its module attached to it (``weight_loader``) stays with it.
    """
    materialize_placed(module, lambda name: device)


def materialize_placed(module: nn.Module, device_of: Callable[[str], torch.device]) -> None:
    """``materialize`` with each submodule's own tensors on ``device_of(its name)`` (a
    layer split); a tensor shared by two modules goes where the first one named puts it."""
    made: dict[int, torch.Tensor] = {}
    for name, mod in module.named_modules():
        device = device_of(name)
        for key, param in mod._parameters.items():
            if param is None:
                continue
            new = made.get(id(param))
            if new is None:
                new = nn.Parameter(torch.empty_like(param, device=device), requires_grad=param.requires_grad)
                new.__dict__.update(param.__dict__)
                made[id(param)] = new
            mod._parameters[key] = new
        for key, buf in mod._buffers.items():
            if buf is None:
                continue
            new = made.get(id(buf))
            if new is None:
                new = made[id(buf)] = torch.empty_like(buf, device=device)
            mod._buffers[key] = new
