"""Which projections' weights a batch-1 decode step requests into L2 ahead of time
(``hearth_kernels/l2_prefetch.py``), planned once at load, after the GEMV tuning and before
the CUDA graphs are captured (so the graphs hold the prefetches).

The rule: a projection whose tensors (weight, or a quantized weight's codes, scales and
mins; its bias) fit in ``FRACTION`` of the GPU's L2 is prefetched when the projection that
runs before it starts, so its bytes arrive while that one and the kernels between them
(norms, RoPE, the KV write, attention) run. On a Llama-family model that is o_proj at the
start of q/k/v, and the next layer's q/k/v at the start of down: the projections that are
too short to reach full bandwidth on their own. gate/up and down (and every bf16 q/k/v) are
larger than L2 can hold beside the stream that runs meanwhile, and are left alone. The
streaming projections load their weights with an evict-first policy, so they don't push a
prefetched weight out.

Each prefetch runs on a stream of its own, forked from the step's stream where the trigger
projection starts and joined back only when the model's forward ends: the step's chain of
kernels never waits for one (a prefetch kernel finishes when its bytes have landed; see
``hearth_kernels/l2_prefetch.py`` for what waiting on it cost). Prefetches are issued only
while a CUDA graph is captured (the graph holds the fork and the join) and only for one
row (batch-1 decode): an eager step would pay a Python launch for each, and at more rows
the GEMMs are bound by their arithmetic, not by their first bytes. Not planned for a layer
split (its graphs are captured per GPU segment, not through the model's forward). Off with ``HEARTH_L2_PREFETCH=0``, and
wherever ``l2_prefetch_on`` says no (CPU, before sm_90, PDL off). The results are the same
bits either way. ``HEARTH_L2_PREFETCH_FRACTION`` overrides ``FRACTION`` (to measure).
"""

from __future__ import annotations

import os

import torch
from torch import nn

#: a projection is prefetched when its tensors take at most this fraction of L2
FRACTION = 0.6


def projections(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The decoder layers' projections (modules with ``in_features`` and ``out_features`` and
    no such module inside), named, in the order a step runs them (the order the layers
    register them: q/k/v, o, gate/up, down)."""
    layers = model.model.layers
    out = []
    for i, layer in enumerate(layers):
        for name, m in layer.named_modules():
            if _is_projection(m) and not any(_is_projection(c) for c in m.children()):
                out.append((f"layers.{i}.{name}", m))
    return out


def _is_projection(m: nn.Module) -> bool:
    return hasattr(m, "in_features") and hasattr(m, "out_features")


def read_tensors(module: nn.Module) -> list[torch.Tensor] | None:
    """The tensors ``module``'s batch-1 kernel reads: a Triton quantized kernel's prepared
    codes, scales and mins (and the module's bias), else the module's own parameters and
    buffers (an act-order permutation aside: that path isn't batch-1's). None when one of
    them isn't contiguous or they aren't on one device (nothing to plan)."""
    prepared = getattr(getattr(module, "kernel", None), "prepared", None)
    if prepared is not None and hasattr(prepared, "qweight"):
        tensors = [prepared.qweight, prepared.scales, prepared.mins, getattr(module, "bias", None)]
    else:
        tensors = [t for n, t in (*module.named_parameters(recurse=False), *module.named_buffers(recurse=False))
                   if n != "perm"]
    tensors = [t for t in tensors if t is not None]
    if not tensors or any(t.device != tensors[0].device or not t.is_contiguous() for t in tensors):
        return None
    return tensors


def plan_l2_prefetch(model: nn.Module) -> list[str] | None:
    """Install the prefetches (forward pre-hooks on the projections that issue them, a
    forward hook on ``model`` that joins their stream; a second call replaces the first's);
    returns the kinds of projection prefetched ("o_proj", "qkv_proj"; [] when none
    qualifies), or None where prefetching is off."""
    from hearth_kernels.l2_prefetch import MAX_RANGES, L2Prefetch, byte_ranges, l2_bytes, l2_prefetch_on

    for handle in getattr(model, "_l2_prefetch_hooks", []):
        handle.remove()
    model._l2_prefetch_hooks = []
    if os.environ.get("HEARTH_L2_PREFETCH", "1") == "0":
        return None
    order = projections(model)
    devices = {t.device for _, m in order for t in (read_tensors(m) or [])}
    if not devices or not all(l2_prefetch_on(d) for d in devices):
        return None
    fraction = float(os.environ.get("HEARTH_L2_PREFETCH_FRACTION", FRACTION))
    streams = _Streams(devices)
    kinds: list[str] = []
    for (_, before), (name, target) in zip(order, order[1:]):
        tensors, ahead = read_tensors(target), read_tensors(before)
        if tensors is None or ahead is None or ahead[0].device != tensors[0].device:
            continue  # (a layer split's boundary: the next projection is on another GPU)
        device = tensors[0].device
        ranges = byte_ranges(tensors)
        if len(ranges) > MAX_RANGES or sum(n for _, n in ranges) > fraction * l2_bytes(device.index):
            continue
        model._l2_prefetch_hooks.append(before.register_forward_pre_hook(streams.issuer(L2Prefetch(ranges, device))))
        kind = name.rsplit(".", 1)[-1]
        if kind not in kinds:
            kinds.append(kind)
    if kinds:
        model._l2_prefetch_hooks.append(model.register_forward_hook(lambda m, args, out: streams.join()))
    return kinds


def _capturing(x: torch.Tensor) -> bool:
    """Whether ``x``'s stream is being captured into a CUDA graph."""
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


class _Streams:
    """The prefetch stream of each device (made at load, not during a capture), and the
    devices whose step forked to it since the last join."""

    def __init__(self, devices) -> None:
        self.side = {d: torch.cuda.Stream(d) if d.type == "cuda" else None for d in devices}
        self.forked: set[torch.device] = set()

    def issuer(self, prefetch):
        def issue(module: nn.Module, args: tuple) -> None:
            if args and args[0].shape[0] == 1 and _capturing(args[0]):
                self.fork(args[0].device, prefetch)
        return issue

    def fork(self, device: torch.device, prefetch) -> None:
        """Launch ``prefetch`` on the side stream once the step's kernels so far are done."""
        side = self.side[device]
        if side is None:  # (tests: a CPU model with the GPU checks stood in for)
            prefetch()
            return
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            prefetch()
        self.forked.add(device)

    def join(self) -> None:
        """The step's stream waits for the prefetches (at the forward's end: long landed)."""
        for device in self.forked:
            torch.cuda.current_stream(device).wait_stream(self.side[device])
        self.forked.clear()
