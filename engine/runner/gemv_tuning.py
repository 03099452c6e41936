"""Pick cuBLAS or a Triton GEMV config for each kind of linear layer, at load time.

For every kind (qkv, o, gate_up, down with the SwiGLU input fused, lm_head) the candidates
run over all layers' own weights in sequence, so no weight stays in L2 between calls,
exactly as in a decode step (a lone head of under ~50 MB does stay in L2, for every
candidate alike), captured in a CUDA graph; the fastest by a 3% margin wins and is recorded on each layer as
``gemv_config`` (None keeps cuBLAS). Takes about a second per kind, once per load; the
chosen kernels are compiled here, so serving never compiles.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from engine.device import cuda_ms

log = logging.getLogger(__name__)

# (BLOCK_N, BLOCK_K, num_warps): the best configs of sweeps for the Llama-1B/8B shapes
# (benchmarks/profile_gemv.py --sweep), on an H100 (the first five) and an H200 (the last
# two). Each shape also tries its ``default_config`` first: on an H200 that default beat
# cuBLAS by 18% on the 8B gate_up and lm_head, where none of the H100's five did.
CANDIDATES = ((1, 1024, 2), (1, 1024, 4), (1, 1024, 8), (1, 512, 4), (16, 1024, 8),
              (2, 1024, 4), (8, 256, 2))
MARGIN = 0.03


def candidates(n: int, k: int) -> list[tuple[int, int, int]]:
    """The Triton configs tried for an [n, k] weight, in timing order: the shape's default
    first, then ``CANDIDATES`` (without repeating it)."""
    from kernels.gemv import default_config

    first = default_config(n, k)
    return [first] + [c for c in CANDIDATES if c != first]


def _kinds(model) -> dict[str, tuple[list, bool]]:
    layers = model.model.layers
    head = model.lm_head if hasattr(model, "lm_head") else model.model.embed_tokens
    return {
        "qkv": ([l.self_attn.qkv_proj for l in layers], False),
        "o": ([l.self_attn.o_proj for l in layers], False),
        "gate_up": ([l.mlp.gate_up_proj for l in layers], False),
        "down": ([l.mlp.down_proj for l in layers], True),
        "lm_head": ([head], False),
    }


def _time(fn, count: int, graphed: bool = True, reps: int = 3) -> float:
    """Milliseconds per call of fn(i) over i in range(count), the calls captured in one CUDA
    graph (as a decode step runs them; ``graphed=False``: launched eagerly). Timed eagerly,
    a Triton launch from Python costs more host time than a 50 MB GEMV takes on the GPU, so
    the small layers measured launch overhead and kept cuBLAS."""
    for i in range(count):  # compiles, sets up cuBLAS workspaces
        fn(i)
    torch.cuda.synchronize()

    def run():
        for i in range(count):
            fn(i)

    if graphed:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):  # see capture_graph
            run()
        run = graph.replay
    return cuda_ms(run, warmup=1, reps=reps) / count


@torch.inference_mode()
def tune_gemv(model, device: torch.device, progress=None) -> dict[str, str]:
    """Set ``gemv_config`` on every linear layer (and the lm_head); returns kind -> choice."""
    from kernels.activation import silu_and_mul

    choices: dict[str, str] = {}
    if progress:
        progress("choosing batch-1 matmul kernels (cuBLAS or Triton GEMV)")
    for kind, (mods, swiglu) in _kinds(model).items():
        weights = [m.weight for m in mods]
        biases = [getattr(m, "bias", None) for m in mods]
        n, k = weights[0].shape
        gen = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(1, 2 * k if swiglu else k, device=device, generator=gen).to(weights[0].dtype)
        act = torch.empty(1, k, device=device, dtype=x.dtype)

        def cublas(i):
            return F.linear(silu_and_mul(x, out=act) if swiglu else x, weights[i], biases[i])

        try:
            best, best_ms = _choose(cublas, weights, biases, x, swiglu, kind, graphed=True)
        except RuntimeError as e:  # not capturable here: every candidate of this kind eagerly
            log.warning("batch-1 %s timed eagerly (graph capture failed: %s)", kind, e)
            best, best_ms = _choose(cublas, weights, biases, x, swiglu, kind, graphed=False)
        for m in mods:
            m.gemv_config = best
        choices[kind] = "cublas" if best is None else "triton gemv %dx%d/%dw" % best
        log.info("batch-1 %s [%d x %d]: %s, %.1f us", kind, n, k, choices[kind], 1e3 * best_ms)
    if progress:
        progress("batch-1 matmuls: " + ", ".join(f"{k} {v}" for k, v in choices.items()))
    return choices


def _choose(cublas, weights, biases, x, swiglu: bool, kind: str, graphed: bool):
    """(best config or None for cuBLAS, its ms per call), every candidate timed the same way."""
    from kernels.gemv import gemv

    best, best_ms = None, _time(cublas, len(weights), graphed)
    for cfg in candidates(*weights[0].shape):
        try:
            gemv(x, weights[0], biases[0], swiglu=swiglu, config=cfg)  # compiles, or can't
        except Exception as e:  # noqa: BLE001 - a config this GPU can't compile is skipped
            log.debug("gemv %s %s skipped: %s", kind, cfg, e)
            continue
        ms = _time(lambda i: gemv(x, weights[i], biases[i], swiglu=swiglu, config=cfg), len(weights), graphed)
        # A clear margin before switching (cuBLAS first, then the earlier candidate):
        # timing noise should not flip the choice, and with it the summation order,
        # from one load to the next.
        if ms < (1 - MARGIN) * best_ms:
            best, best_ms = cfg, ms
    return best, best_ms
