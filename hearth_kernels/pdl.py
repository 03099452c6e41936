"""Programmatic dependent launch (PDL) for the kernels of a decode step.

A batch-1 decode step is ~300 short kernels back to back (10 a layer on the 8B shape; int4
projections take 3-17 us each), and each pays a fixed cost before it streams at memory
speed: its launch, then a memory round trip for its first weights. On Hopper and newer a
kernel can be launched while the one before it is still running (``launch_pdl``, CUDA's
programmatic stream serialization; kept as a programmatic edge when a CUDA graph captures
it): it starts, does what depends on nothing the earlier kernels write (its index math,
requesting its first weights), then waits (``griddepcontrol.wait``) until the kernel before
it has finished and its writes are visible. The earlier kernel lets it launch early with
``griddepcontrol.launch_dependents``.

The contract of a kernel with a ``PDL`` parameter (``pdl_start`` / ``pdl_wait`` below):

- every program calls ``pdl_wait(PDL)`` on every path, before it loads anything another
  kernel of the stream writes and before its first store. The wait covers transitively the
  kernels before the previous one (each of them waited for its own predecessor before it
  could finish), so a program that skipped it could let a later kernel read stale data;
- loads before it read only what nothing in the stream writes (weights, their scales: no
  kernel of a step writes them; repacking them at load runs plain torch kernels, which
  PDL never overlaps);
- it may call ``pdl_start(PDL)`` anywhere (first thing, here): the next kernel then launches
  once every program of this one has called it, and waits for this one to finish anyway.

Only a kernel that keeps this contract may be launched with ``launch_pdl=True``
(``pdl_args``); a kernel launched without it waits for the previous one to finish as
always, so PDL kernels mix freely with cuBLAS, torch and NCCL kernels. Off on CPU, under
Triton's interpreter (the instructions are inline PTX), before compute capability 9.0, and
with ``HEARTH_PDL=0`` (to measure it, or to rule it out). The results are bit for bit the
same either way: PDL changes when a kernel starts, never what it computes.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from hearth_kernels._compat import interpreting

try:  # Triton >= 3.4
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
    _HAVE_GDC = True
except ImportError:  # pragma: no cover - an older Triton: PDL stays off
    _HAVE_GDC = False

    @triton.jit
    def gdc_wait():
        pass

    @triton.jit
    def gdc_launch_dependents():
        pass


@triton.jit
def pdl_start(PDL: tl.constexpr):
    """Let the next kernel of the stream launch (it still waits for this one to finish)."""
    if PDL:
        gdc_launch_dependents()


@triton.jit
def pdl_wait(PDL: tl.constexpr):
    """Wait until the kernel before this one has finished and its writes are visible."""
    if PDL:
        gdc_wait()


def pdl_wanted() -> bool:
    """PDL unless ``HEARTH_PDL=0`` or Triton's interpreter runs the kernels (read at each
    launch; set ``TRITON_INTERPRET`` before importing the kernels, as Triton itself needs)."""
    return (_HAVE_GDC and os.environ.get("HEARTH_PDL", "1") != "0"
            and not interpreting())


@functools.lru_cache(maxsize=16)
def _device_has_pdl(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= (9, 0)


def pdl_on(device: torch.device) -> bool:
    """Whether kernels launched on ``device`` use PDL (see the module docstring)."""
    if device.type != "cuda" or not pdl_wanted():
        return False
    return _device_has_pdl(device.index if device.index is not None else torch.cuda.current_device())


def pdl_args(device: torch.device) -> dict:
    """The launch keywords of a PDL kernel: its ``PDL`` constexpr, and ``launch_pdl`` where on."""
    if pdl_on(device):
        return {"PDL": True, "launch_pdl": True}
    return {"PDL": False}
