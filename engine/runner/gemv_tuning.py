"""Pick cuBLAS or a Triton GEMV config for each kind of linear layer, at load time.

For every kind (qkv, o, gate_up, down with the SwiGLU input fused, lm_head) each linear
module offers its candidate kernels (``Linear.kernel_candidates``: the cuBLAS baseline,
then the GEMV configs) and each candidate runs through the modules themselves, over all
layers in sequence, so no weight stays in L2 between calls, exactly as in a decode step
(a lone head of under ~50 MB does stay in L2, for every candidate alike), captured in a
CUDA graph; the fastest by a 3% margin wins and becomes each module's kernel
(``use_kernel``). Takes about a second per kind, once per load, once the candidates are
compiled; the chosen kernels are compiled here, so serving never compiles. A module a
transform replaced with something that offers no candidates is left as it is.

Compiling is most of a first load's choosing: an 8B int4 load, about 146 candidates, spent
54-72 s in it on an H100 with an empty Triton cache and 2.5 s with it filled
(benchmarks/results/2026-12-06-i14-tune-time-int4-*-h100-5a09de2.json). So each kind's
candidates first run once side by side on a pool of threads (``HEARTH_TUNE_THREADS``, default
up to 8; 1 turns it off): Triton's compiles spend most of their time outside the GIL (its
passes and ptxas), and each thread's compile lands in the caches the timing then hits. Their
products are thrown away; a candidate that fails there fails again, and is skipped, in the
timing. That load then chose in 24.0 s instead of 75.4, the same kernels
(...-tune-time-int4-threads-{1,8}-h100-c698727.json).
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack

import torch

from engine.device import cuda_ms
from engine.layers.linear import Linear, norm_then_project
from engine.layers.linear_kernels import GEMV_CONFIGS as CANDIDATES
from engine.layers.linear_kernels import gemv_configs as candidates

log = logging.getLogger(__name__)

MARGIN = 0.03
__all__ = ["CANDIDATES", "MARGIN", "candidates", "pinned", "tune_gemv"]

#: ``HEARTH_GEMV_PIN="kind=name;kind=name"`` (names as the load prints them, "batch-1 matmuls:
#: ...", with "_" for spaces so that the value has none; no candidate name has a "_"): those
#: kinds take that candidate instead of the fastest if it runs and agrees with the reference
#: (``_choose``). For A/B runs of choices the tuner makes by timing each kind alone (e.g. with
#: and without PDL). A name no candidate has, or a pinned kernel that fails, is logged and the
#: kind tuned as usual; a kind stored two ways (``_form``) takes the pin in each form that has it.
PIN_ENV = "HEARTH_GEMV_PIN"


def pinned(kind: str) -> str | None:
    """The candidate name ``HEARTH_GEMV_PIN`` gives ``kind`` (None: tune it)."""
    for entry in os.environ.get(PIN_ENV, "").split(";"):
        k, sep, name = entry.strip().partition("=")
        if sep and k.strip() == kind:
            return name.strip().replace("_", " ")
    return None


def _kinds(model) -> dict[str, list[Linear]]:
    """Kind -> the model's linear modules of that kind that can be tuned, in layer order."""
    layers = model.model.layers
    kinds = {
        "qkv": [l.self_attn.qkv_proj for l in layers],
        "o": [l.self_attn.o_proj for l in layers],
        "gate_up": [l.mlp.gate_up_proj for l in layers],
        "down": [l.mlp.down_proj for l in layers],
        "lm_head": [model.lm_head],
    }
    # Float projections and quantized ones (engine.layers.quant_linear) alike: both offer
    # kernel_candidates and take use_kernel.
    return {kind: [m for m in mods if isinstance(m, Linear) or hasattr(m, "qweight")] for kind, mods in kinds.items()}


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
    """Fix the batch-1 kernel of every linear module (and the head) on ``device`` (a layer
    split tunes each GPU's modules apart); returns kind -> choice."""
    choices: dict[str, str] = {}
    if progress:
        progress("choosing batch-1 matmul kernels (cuBLAS or Triton GEMV)")
    norms = _norms_before(model)
    for kind, all_mods in _kinds(model).items():
        all_mods = [m for m in all_mods if same_device(_device_of(m), device)]
        # Modules of one kind may be stored differently (a GGUF's Q4_K_M gives half its
        # layers' q/k/v int8 in groups of 16 with mins and some down projections Q6_K; a
        # group with a member left float stays float): each form is tuned apart, with its
        # own candidates.
        groups: dict[tuple, list] = {}
        for m in all_mods:
            groups.setdefault(_form(m), []).append(m)
        names = [name for mods in groups.values()
                 if (name := _tune_group(kind, mods, device, norms)) is not None]
        if names:
            choices[kind] = " / ".join(names)
    if progress:
        progress("batch-1 matmuls: " + ", ".join(f"{k} {v}" for k, v in choices.items()))
    return choices


def _norms_before(model) -> dict[int, torch.nn.Module]:
    """id(projection) -> the RMSNorm the decoder layer hands it (``normed_projections``),
    which its kernel may run inside its own."""
    return {id(proj): norm for layer in model.model.layers for proj, norm in layer.normed_projections()}


def same_device(a: torch.device | None, b: torch.device) -> bool:
    """``cuda`` (the load's ``auto``) is ``cuda:0``: compare type and index."""
    return a is not None and a.type == b.type and (a.index or 0) == (b.index or 0)


def _device_of(module) -> torch.device | None:
    """Where ``module``'s tensors are (None: it holds none)."""
    t = next(module.parameters(), None)
    if t is None:
        t = next(module.buffers(), None)
    return None if t is None else t.device


def _form(module) -> tuple:
    """How ``module`` stores its weight, as far as its kernels care: float, or quantized
    format / bits / group size / with mins."""
    if not hasattr(module, "qweight"):
        return ("float",)
    return ("quantized", module.fmt, module.bits, module.group_size, module.mins is not None)


def _tune_group(kind: str, mods: list, device: torch.device, norms: dict | None = None) -> str | None:
    """Time the candidates of ``mods`` (modules of one kind and form), give them all the
    fastest; its name (None: nothing to choose). A quantized projection handed an RMSNorm
    of the fused plan (``norms``) is timed with that norm, through ``normed``: a config
    whose kernel takes the norm in (and so holds more registers) competes against the
    others plus the norm kernel, as the decode step runs them."""
    first = mods[0]
    kernels = first.kernel_candidates()
    if len(kernels) < 2:  # one kernel (or none, a module that picks its own): nothing to time
        return None
    gen = torch.Generator(device=device).manual_seed(0)
    dtype = first.weight.dtype if isinstance(first, Linear) else first.dtype
    x = torch.randn(1, first.input_width, device=device, generator=gen).to(dtype)
    before = [(norms or {}).get(id(m)) for m in mods]
    if not (hasattr(first, "qweight") and hasattr(first, "normed") and all(_fused_norm(n) for n in before)):
        before = None
    if before is not None:  # each prologue-norm config also with the norm kernel first
        kernels = kernels + [v for k in kernels if (v := k.with_norm_first()) is not None]
    pin, name = None, pinned(kind)
    if name is not None:
        pin = next((k for k in kernels if k.name == name), None)
        if pin is None:
            log.warning("%s: batch-1 %s has no candidate %r (its candidates: %s); tuning it", PIN_ENV, kind, name,
                        ", ".join(k.name for k in kernels))
    if pin is None:  # (a pinned kind runs its pin and the baseline only, unless the pin fails)
        compile_side_by_side(first, kernels, x, before[0] if before else None, device)
    try:
        best, best_ms = _choose(mods, kernels, x, kind, graphed=True, norms=before, pin=pin)
    except RuntimeError as e:  # not capturable here: every candidate of this kind eagerly
        log.warning("batch-1 %s timed eagerly (graph capture failed: %s)", kind, e)
        best, best_ms = _choose(mods, kernels, x, kind, graphed=False, norms=before, pin=pin)
    for m in mods:
        m.use_kernel(best)
    log.info("batch-1 %s [%d x %d]: %s, %.1f us", kind, first.out_features, first.in_features, best.name,
             1e3 * best_ms)
    return best.name


#: ``HEARTH_TUNE_THREADS``: threads compiling a kind's candidates side by side (1: one by one)
THREADS_ENV = "HEARTH_TUNE_THREADS"


def compile_threads() -> int:
    """How many threads compile candidates at once: ``HEARTH_TUNE_THREADS``, else the CPUs
    up to 8 (a malformed value counts as 1, with a warning)."""
    value = os.environ.get(THREADS_ENV, "").strip()
    if value:
        try:
            return max(1, int(value))
        except ValueError:
            log.warning("%s=%r is not a number of threads: compiling one by one", THREADS_ENV, value)
            return 1
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(8, cpus or 1))


def _side_by_side_here(device: torch.device) -> bool:
    """Whether candidates may compile on threads here: on a GPU, not under Triton's
    interpreter (it keeps the running program's ids in one global, and on the CPU split-K
    launches would share their counters with no stream to order them)."""
    from hearth_kernels._compat import interpreting

    return device.type == "cuda" and not interpreting()


def compile_side_by_side(module, kernels: list, x: torch.Tensor, norm, device: torch.device) -> int:
    """Run each of ``module``'s candidate ``kernels`` once on ``x`` (and through ``norm`` where
    the kernel takes it in) on ``compile_threads()`` threads, so that their Triton kernels
    compile at once rather than one after another in the timing; the products are thrown
    away, the modules' own kernels untouched (each candidate runs bound to the module, not put
    in use). Returns how many ran; one that raises is left for the timing to meet again.
    On a GPU only (``_side_by_side_here``); never inside graph capture."""
    threads = min(compile_threads(), len(kernels))
    if threads < 2 or not _side_by_side_here(device):
        return 0
    quantized = hasattr(module, "qweight")
    runs = []
    for k in kernels:  # bound here, one by one: a first int4 bind repacks the module's codes
        if getattr(k, "norm_first", False):  # the same GEMV as its twin, after the norm's kernel
            continue
        if not quantized:
            runs.append(k)
            continue
        try:
            runs.append(k.bind(module))
        except Exception as e:  # noqa: BLE001 - the timing meets it again
            log.debug("%s: bind failed ahead of timing: %s", k.name, e)
    gen = torch.Generator(device=x.device).manual_seed(0)
    residual = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)  # (not the global RNG)
    # the caller's stream in every thread (a thread starts on the default one): the launches
    # follow x's making, and each other, as the timing's will
    stream = torch.cuda.current_stream(device) if device.type == "cuda" else None

    def run(bound) -> bool:
        try:
            with ExitStack() as ctx:
                ctx.enter_context(torch.inference_mode())
                if stream is not None:  # the model's device and the caller's stream
                    ctx.enter_context(torch.cuda.device(device))
                    ctx.enter_context(torch.cuda.stream(stream))
                if not quantized:
                    bound(x, module.weight, module.bias)
                    return True
                bound(x, module)
                if (norm is not None and module.act is None and x.dtype == norm.weight.dtype
                        and bound.fuses_norm(module, norm)):  # as the module's ``normed`` decides
                    bound.normed(x, module, residual, norm)
            return True
        except Exception as e:  # noqa: BLE001 - an OutOfResources, a refusal: the timing skips it
            log.debug("%s: failed ahead of timing: %s", bound.name, e)
            return False

    with ThreadPoolExecutor(threads, thread_name_prefix="hearth-compile") as pool:
        ran = sum(pool.map(run, runs))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return ran


#: how far a candidate's result may be from the baseline's (RMS of the difference over the
#: RMS of the result): the kernels differ in rounding (bf16 weights, fp32 sums, the dp4a
#: kernel's 8-bit activations: about 1%), a broken one by far more
AGREEMENT_RMS = 0.05
AGREEMENT_MAX = 0.3


def disagreement(got: torch.Tensor, expected: torch.Tensor) -> str | None:
    """Why ``got`` is not the same product as ``expected`` (None when it is, within
    ``AGREEMENT_RMS`` overall and ``AGREEMENT_MAX`` per output, both relative to the RMS of
    ``expected``): the tuner's sanity check of each candidate on this GPU."""
    if got.shape != expected.shape:
        return f"shape {list(got.shape)}, expected {list(expected.shape)}"
    got = got.float()
    if not bool(torch.isfinite(got).all()):
        return "not finite"
    scale = expected.pow(2).mean().sqrt().clamp_min(1e-30)
    diff = got - expected
    rel = float(diff.pow(2).mean().sqrt() / scale)
    if rel > AGREEMENT_RMS:
        return f"{rel:.1%} RMS from the reference's result"
    worst = float(diff.abs().max() / scale)
    # a few wrong rows hide in the RMS: no single output may be off by a third of the RMS
    return None if worst <= AGREEMENT_MAX else f"an output {worst:.0%} of the RMS away from the reference's"


def _fused_norm(norm) -> bool:
    from engine.layers.norm import TritonRMSNorm

    return isinstance(norm, TritonRMSNorm)


def _choose(mods: list[Linear], kernels: list, x: torch.Tensor, kind: str, graphed: bool,
            norms: list | None = None, pin=None):
    """(the best kernel, its ms per call): every candidate timed the same way, through the
    modules, the baseline (cuBLAS) first; with ``norms`` (one per module), each call is
    ``normed`` (the norm and the projection, one kernel or two). ``pin``: that candidate (one of
    ``kernels``) instead, if it runs and agrees with the reference (the baseline's product for a
    float layer); if not, logged, and the fastest as usual."""
    residual = torch.randn_like(x)
    if norms is None:
        def run(i):
            return mods[i](x)
    else:
        def run(i):
            return mods[i].normed(x, residual, norms[i])[0]

    def use(kernel) -> None:
        for m in mods:
            m.use_kernel(kernel)

    baseline, *others = kernels
    use(baseline)
    got = mods[0](x)
    reference = _reference(mods[0], x)
    expected = got.float() if reference is None else reference
    # with its norm, the product must also agree as the step runs it (the norm inside the
    # kernel, or the norm kernel first) with the norm then the reference product
    normed_expected = None
    if norms is not None and reference is not None:
        h, _ = norm_then_project(lambda t: t, x, residual, norms[0])
        normed_expected = _reference(mods[0], h)

    def normed_problem() -> str | None:
        if normed_expected is None:
            return None
        try:
            return disagreement(run(0), normed_expected)  # compiles the fused kernel, or can't
        except Exception as e:  # noqa: BLE001 - OutOfResources, CompilationError...: not a candidate
            return f"with its norm: {type(e).__name__}: {str(e)[:200]}"

    def problem_of(kernel) -> str | None:
        """Puts ``kernel`` in use: why its product is not the reference's (None: it is);
        raises if it can't compile."""
        use(kernel)
        return disagreement(mods[0](x), expected) or normed_problem()

    problem = None if reference is None else (disagreement(got, expected) or normed_problem())
    if pin is not None:
        why = problem
        if pin is not baseline:
            try:
                why = problem_of(pin)
            except Exception as e:  # noqa: BLE001 - a config this GPU can't compile
                why = f"{type(e).__name__}: {str(e)[:200]}"
        if why is None:
            return pin, _time(run, len(mods), graphed)
        log.warning("%s: batch-1 %s: the pinned %s left out: %s; tuning it", PIN_ENV, kind, pin.name, why)
        use(baseline)
    if problem:  # a quantized layer's first Triton config is a candidate like the others
        log.warning("batch-1 %s: %s left out: %s", kind, baseline.name, problem)
        best, best_ms = None, float("inf")
    else:
        best, best_ms = baseline, _time(run, len(mods), graphed)
    for kernel in others:
        try:
            problem = problem_of(kernel)  # compiles, or can't
        except Exception as e:  # noqa: BLE001 - a config this GPU can't compile is skipped
            log.debug("%s %s skipped: %s", kind, kernel.name, e)
            continue
        if problem:  # a kernel that is wrong on this GPU must never win on speed
            log.warning("batch-1 %s: %s left out: %s", kind, kernel.name, problem)
            continue
        ms = _time(run, len(mods), graphed)
        # A clear margin before switching (cuBLAS first, then the earlier candidate):
        # timing noise should not flip the choice, and with it the summation order,
        # from one load to the next.
        if ms < (1 - MARGIN) * best_ms:
            best, best_ms = kernel, ms
    if best is None:  # no Triton config agreed with the reference: the reference itself
        from engine.layers.quant_kernels import DequantMatmul

        best = DequantMatmul()
        use(best)
        best_ms = _time(run, len(mods), graphed)
    use(best)
    return best, best_ms


def _reference(module, x: torch.Tensor) -> torch.Tensor | None:
    """What a quantized module's candidates must agree with: its weights dequantized, then
    torch's matmul (its candidates are all Triton configs, the first one included). None for
    a float module, whose baseline is cuBLAS itself."""
    if not hasattr(module, "qweight"):
        return None
    from engine.layers.quant_kernels import DequantMatmul

    return DequantMatmul()(x, module).float()
