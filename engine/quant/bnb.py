"""bitsandbytes quantization: ``--quant bnb-nf4``, ``bnb-nf4-dq`` and ``bnb-int8``, run
through bitsandbytes' own quantizers and matmuls (``engine.layers.bnb_linear``), for what
they are.

bitsandbytes is an optional extra (``pip install 'bitsandbytes>=0.45'``, Hearth's ``bnb`` extra): these choices are offered
where it is installed and its ops work on the device (``reasons``: a tiny quantize and
matmul checked against the dequantized weight, once per device), and refused otherwise,
before anything loads, with the reason and what to pick instead. Published measurements
show NF4 saves memory but decodes *slower* than bf16 (about 0.74x at batch 1 on an H100):
it is here for the memory, and for checkpoints published in its format; Hearth's own
int4/int8 kernels are the fast ones.

- ``bnb-nf4``: 4-bit NormalFloat in blocks of 64 weights, an fp32 absmax per block.
- ``bnb-nf4-dq``: the same with double quantization (the absmaxes quantized to 8 bits in
  blocks of 256: about 0.37 bits less per weight).
- ``bnb-int8``: LLM.int8(): int8 per output row; activations are quantized to int8 per row
  at every matmul, and columns holding an outlier (|x| >= 6) run in fp16 instead.

A float checkpoint is quantized shard by shard as it streams in (never the whole float
model on the device); a bitsandbytes checkpoint saved by transformers (config.json's
``quantization_config.quant_method: "bitsandbytes"``) loads with its own tensors.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.abc
import importlib.util
import logging
import sys
import threading
import types
from dataclasses import dataclass

import torch

from engine.errors import InvalidRequestError, UnsupportedModelError

BNB_METHODS = ("bnb-nf4", "bnb-nf4-dq", "bnb-int8")
#: weights per absmax of bitsandbytes' 4-bit blocks (its default, and transformers')
BLOCKSIZE = 64
#: absmaxes per block of double quantization (bitsandbytes' fixed choice)
NESTED_BLOCKSIZE = 256
#: LLM.int8()'s outlier threshold (transformers' default ``llm_int8_threshold``)
INT8_THRESHOLD = 6.0
MIN_VERSION = (0, 45)
INSTALL = "pip install 'bitsandbytes>=0.45'"
INSTEAD = "or pick int4 or int8 (Hearth's own kernels, faster)"


# -- importing it ----------------------------------------------------------------------------
class _NoFp16CastNotice(logging.Filter):
    """Drops LLM.int8()'s notice, logged at *every* matmul whose input isn't fp16, that it
    quantizes the activations from fp16: that is how it works (and what transformers'
    bitsandbytes layers run), not something a user can act on."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("MatMul8bitLt: inputs will be cast")


def import_bitsandbytes():
    """bitsandbytes, imported (ImportError when it isn't installed).

    On a CPU with AVX512-BF16, bitsandbytes 0.50 asks the Hugging Face ``kernels`` package
    for a faster CPU kernel as it imports (``from kernels import get_kernel``, which
    downloads compiled code from the Hub and runs it). Hearth runs nothing fetched at run
    time (and has no network where it is often used), so the import runs with that
    package hidden (``_hub_kernels_hidden``): bitsandbytes keeps its bundled C kernel, as
    it does wherever ``kernels`` isn't installed, and its warning about the failed lookup
    is dropped. LLM.int8()'s per-call fp16 notice is dropped too (``_NoFp16CastNotice``).
    """
    # Always the import statement (not a look in sys.modules, where a module sits from the
    # start of its import): another thread's half-done import of bitsandbytes (the window
    # lists the load choices on a thread of its own while a load may check them) is waited
    # for, never read without its __version__ ("bitsandbytes 0 is too old"). The lock keeps
    # Hearth's own imports of it, and the log filters, to one thread at a time.
    with _IMPORTING:
        hide = _hub_kernels_hidden() if "bitsandbytes" not in sys.modules else contextlib.nullcontext()
        with hide:
            import bitsandbytes
        matmul_log = logging.getLogger("bitsandbytes.autograd._functions")
        if not any(isinstance(f, _NoFp16CastNotice) for f in matmul_log.filters):
            matmul_log.addFilter(_NoFp16CastNotice())
    return bitsandbytes


class _NoKernelsHubLookup(logging.Filter):
    """Drops bitsandbytes' warning that it could not take a CPU kernel from the Hugging
    Face ``kernels`` package (it can't: ``_hub_kernels_hidden``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "kernels-community" not in record.getMessage()


class _RefuseKernels(importlib.abc.MetaPathFinder):
    """Refuses ``import kernels`` to one thread (the one importing bitsandbytes); every
    other thread's imports go on as usual."""

    def __init__(self, owner: int):
        self.owner = owner

    def find_spec(self, name, path=None, target=None):
        if name == "kernels" and threading.get_ident() == self.owner:
            raise ModuleNotFoundError("Hearth fetches no kernels from the Hub", name=name)
        return None


class _KernelsForOthers(types.ModuleType):
    """Stands in for an already imported ``kernels`` while one thread imports bitsandbytes:
    that thread finds none of its attributes (``from kernels import get_kernel`` fails),
    every other thread reads the real module's."""

    def __init__(self, real: types.ModuleType, owner: int):
        super().__init__(real.__name__, real.__doc__)
        object.__setattr__(self, "_hearth_real", real)
        object.__setattr__(self, "_hearth_owner", owner)

    def __getattribute__(self, name):
        real = object.__getattribute__(self, "_hearth_real")
        if (threading.get_ident() == object.__getattribute__(self, "_hearth_owner")
                and not (name.startswith("__") and name.endswith("__"))):
            raise AttributeError(name)
        return getattr(real, name)

    def __setattr__(self, name, value):
        setattr(object.__getattribute__(self, "_hearth_real"), name, value)


@contextlib.contextmanager
def _hub_kernels_hidden():
    """While this thread imports bitsandbytes, ``kernels`` is out of this thread's reach
    only. Installed, it is imported first (as transformers would) and sys.modules holds
    a stand-in for the duration (``_KernelsForOthers``: this thread finds nothing in it,
    others the real module), the real module after; not installed, a meta-path finder
    refuses it to this thread alone (others find nothing anyway). bitsandbytes' warning
    about the failed lookup is filtered out meanwhile."""
    owner = threading.get_ident()
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    quiet = _NoKernelsHubLookup()
    finder = _RefuseKernels(owner)
    real = sys.modules.get("kernels")
    if real is None and importlib.util.find_spec("kernels") is not None:
        try:
            real = importlib.import_module("kernels")
        except Exception:  # a broken install: bitsandbytes' own import of it fails too
            real = None
    stand_in = _KernelsForOthers(real, owner) if real is not None else None
    sys.meta_path.insert(0, finder)
    if stand_in is not None:
        sys.modules["kernels"] = stand_in
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)
        sys.meta_path.remove(finder)
        if stand_in is not None and sys.modules.get("kernels") is stand_in:
            sys.modules["kernels"] = real


_IMPORTING = threading.Lock()


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split(".")[:2]:
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def import_problem() -> str | None:
    """Why bitsandbytes can't be used at all here (not installed, too old, broken), with
    what to do; None when it imports."""
    try:
        bnb = import_bitsandbytes()
    except ImportError as e:
        if e.name == "bitsandbytes":
            return f"bitsandbytes is not installed: {INSTALL}, {INSTEAD}"
        return f"bitsandbytes is installed but doesn't import ({e}): reinstall it ({INSTALL}), {INSTEAD}"
    except Exception as e:  # noqa: BLE001 - a broken install can raise anything while importing
        return f"bitsandbytes doesn't import here ({type(e).__name__}: {e}): reinstall it ({INSTALL}), {INSTEAD}"
    version = getattr(bnb, "__version__", "0")
    if _version_tuple(version) < MIN_VERSION:
        return (f"bitsandbytes {version} is too old (Hearth needs {'.'.join(map(str, MIN_VERSION))} or newer): "
                f"{INSTALL} --upgrade, {INSTEAD}")
    return None


def reasons(method: str, device: str) -> list[str]:
    """Why ``method`` (one of ``BNB_METHODS``) can't run on ``device`` ("cpu", "cuda",
    "cuda:1"); empty when it can. The registry's check (``engine.choices``)."""
    problem = import_problem()
    if problem:
        return [problem]
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            return []  # the device's own reason says it
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            return []
        device = f"cuda:{index}"
    problem = _ops_problem("int8" if method == "bnb-int8" else "nf4", device)
    return [problem] if problem else []


@functools.lru_cache(maxsize=None)
def _ops_problem(kind: str, device: str) -> str | None:
    """Run bitsandbytes' quantizer and matmul of ``kind`` once on ``device`` and check the
    product against the dequantized weight; why it failed, or None. Cached per process."""
    bnb = import_bitsandbytes()
    F = bnb.functional
    what = "NF4" if kind == "nf4" else "int8"
    try:
        gen = torch.Generator().manual_seed(0)
        w = torch.randn(128, 128, generator=gen).to(device)
        x = torch.randn(3, 128, generator=gen).to(device)
        with torch.inference_mode():
            if kind == "nf4":
                packed, state = F.quantize_4bit(w, blocksize=BLOCKSIZE, quant_type="nf4", compress_statistics=True)
                got = torch.cat([bnb.matmul_4bit(x[:1], packed, quant_state=state),
                                 bnb.matmul_4bit(x, packed, quant_state=state)])
                ref = torch.cat([x[:1], x]) @ F.dequantize_4bit(packed, state).t()
                limit = 1e-3
            else:
                cb, scb, _ = F.int8_vectorwise_quant(w.half())
                state = bnb.MatmulLtState()
                state.CB, state.SCB, state.has_fp16_weights, state.is_training = cb, scb, False, False
                state.threshold = INT8_THRESHOLD
                got = bnb.matmul(x.half(), cb, state=state).float()
                ref = x @ (cb.float() * (scb.float() / 127).unsqueeze(1)).t()
                limit = 0.05  # x is rounded to int8 per row
            if device.startswith("cuda"):
                torch.cuda.synchronize(device)
        err = float((got.float() - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt())
    except Exception as e:  # noqa: BLE001 - whatever bitsandbytes raises is the reason
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return (f"bitsandbytes {getattr(bnb, '__version__', '?')} can't run its {what} kernels on {device} "
                f"({first[:200]}); {INSTEAD}")
    if not err < limit:
        return (f"bitsandbytes {getattr(bnb, '__version__', '?')}'s {what} matmul gives wrong results on "
                f"{device} ({err:.1%} from the dequantized weight's); {INSTEAD}")
    return None


# -- where a load's weights come from ------------------------------------------------------
@dataclass(frozen=True, slots=True)
class BnbSource:
    """What fills a bitsandbytes projection: ``method`` (``BNB_METHODS``); a float
    checkpoint's ``weight`` quantized as it streams in (``from_float``), or a bitsandbytes
    checkpoint's own tensors (``parts`` per shard, ``optional`` ones used when present).
    ``threshold``: LLM.int8()'s outlier threshold (int8; 0 quantizes every column)."""

    method: str
    from_float: bool = True
    threshold: float = INT8_THRESHOLD
    parts: tuple[str, ...] = ("weight",)
    optional: tuple[str, ...] = ()
    label: str = ""

    @property
    def bits(self) -> int:
        return 8 if self.method == "bnb-int8" else 4

    @property
    def double_quant(self) -> bool:
        return self.method == "bnb-nf4-dq"

    @property
    def quantizes_on_load(self) -> bool:
        """Whether loading quantizes float tensors (the progress line says so)."""
        return self.from_float


NF4_PARTS = ("weight", "weight.absmax", "weight.quant_map", "weight.quant_state.bitsandbytes__nf4")
NESTED_PARTS = ("weight.nested_absmax", "weight.nested_quant_map")
INT8_PARTS = ("weight", "SCB")
_LABELS = {"bnb-nf4": "bitsandbytes nf4", "bnb-nf4-dq": "bitsandbytes nf4 (double quant)",
           "bnb-int8": "bitsandbytes int8"}


def source_for(method: str, found: str, checkpoint=None) -> BnbSource:
    """The source of a load asking for ``method`` (a canonical name, ``auto`` resolved to
    ``found``) of a checkpoint stored as ``found`` (``BNB_METHODS``, or ``none`` for float
    weights; ``checkpoint``: its ``BnbCheckpoint``). Refuses a bitsandbytes checkpoint
    asked for as anything else, and a load when bitsandbytes can't be imported."""
    if found in BNB_METHODS and method != found:
        from engine.quant.transform import AlreadyQuantizedError

        raise AlreadyQuantizedError(
            f"this checkpoint is already quantized with bitsandbytes ({found}): load it as it is (--quant auto or "
            f"{found}), or load its unquantized original to use {method}.", found)
    if found not in BNB_METHODS and found != "none":
        raise InvalidRequestError(
            f"{method} quantizes float weights, but this checkpoint is stored as {found}: load its unquantized "
            "original, or this one as it is (--quant auto).", options=("quantization",))
    problem = import_problem()
    if problem:
        raise InvalidRequestError(f"quantization {method!r} can't be used here: {problem}.", options=("quantization",))
    if found == "none":
        return BnbSource(method, label=_LABELS[method])
    if method == "bnb-int8":
        return BnbSource(method, from_float=False, threshold=checkpoint.threshold, parts=INT8_PARTS,
                         optional=("weight_format",), label=_LABELS[method] + " (pre-quantized)")
    parts = NF4_PARTS + (NESTED_PARTS if method == "bnb-nf4-dq" else ())
    return BnbSource(method, from_float=False, parts=parts, label=_LABELS[method] + " (pre-quantized)")


def apply(model, source: BnbSource, names: frozenset) -> None:
    """Replace ``model``'s projections (on the meta device) with bitsandbytes ones.

    Quantizing float weights: every decoder projection; the LM head (and embedding) stay
    in the model's dtype, as transformers leaves them. A bitsandbytes checkpoint: exactly
    the projections it stores quantized (its ``llm_int8_skip_modules`` stay float)."""
    from engine.layers.bnb_linear import BnbLinear
    from engine.layers.linear import Linear, TiedLMHead
    from engine.layers.modules import replace_module
    from engine.quant.transform import _checkpoint_modules

    marker = "weight.absmax" if source.bits == 4 else "SCB"
    for name, module in list(model.named_modules()):
        if not isinstance(module, Linear) or isinstance(module, TiedLMHead):
            continue
        shards = getattr(module, "shard_offsets", None) or {None: (0, module.out_features)}
        nested = source.double_quant
        if source.from_float:
            if name == "lm_head":
                continue
        else:
            ckpt = _checkpoint_modules(name, module)
            stored = [f"{c}.{marker}" in names for c in ckpt]
            if not any(stored):
                continue  # the checkpoint keeps it in float
            if not all(stored):
                raise UnsupportedModelError(f"{name}: some of its fused checkpoint tensors ({', '.join(ckpt)}) are "
                                            "quantized by bitsandbytes and some are not; Hearth can't fuse them.")
            # Shards double-quantized apart (each its own offset) can't share one nested
            # state: a fused module keeps their absmaxes in fp32, exactly as they were.
            nested = nested and len(shards) == 1
        if source.bits == 4 and len(shards) > 1:
            k = module.in_features
            if any((rows * k) % BLOCKSIZE for _, rows in shards.values()):
                raise InvalidRequestError(
                    f"layer {name} ([{module.out_features} x {k}]): its fused parts don't fill whole bitsandbytes "
                    f"blocks of {BLOCKSIZE} weights: use bnb-int8, int8 or int4.", options=("quantization",))
        replace_module(model, name, BnbLinear.replacing(module, source, nested=nested))
