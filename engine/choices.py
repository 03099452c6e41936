"""The one registry of load choices: devices, weights dtypes, attention backends, KV-cache
dtypes and weight quantizations.

Every front end reads its choices here (through ``engine.api``): the load dialog's lists,
the ``--device/--dtype/--attention/--kv-cache-dtype/--quantization`` flags' help, ``hearth
bench``, ``hearth doctor``, the fit estimate's bytes per parameter and per token, and
``EngineConfig``'s validation. So a choice added here (the next issue's int8/int4/AWQ/GPTQ
quantizations: ``register``) appears everywhere at once, with its bytes and the reasons it
can't run on a machine.

A ``Choice`` carries its name, aliases, a label for lists, its bytes per parameter
(weights dtypes, quantizations) or per cached value (KV-cache dtypes), and a ``check``:
why it can't run on a device (empty: it can). Names, aliases and bytes are known without
torch (``hearth``'s parser reads them); the checks import torch when asked.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from engine.errors import InvalidRequestError

KINDS = ("device", "dtype", "attention", "kv_cache_dtype", "quantization")

#: ``check(device)``: the reasons a choice can't run on ``device`` ("cpu", "cuda", "cuda:1").
Check = Callable[[str], Sequence[str]]


@dataclass(frozen=True, slots=True)
class Choice:
    """One value of a load option, with what a user needs to pick it.

    ``reasons`` are filled in by ``choices(kind, device)`` (why it can't run on that device;
    empty: it can); ``caveats`` likewise, what a user should know before picking one that
    runs there (it is much slower there, say). ``bytes_per_param``: bytes one weight takes (dtypes, quantizations;
    ``None`` for a quantization of "none", which is the weights dtype's). ``bytes_per_value``:
    bytes one cached K or V value takes (KV-cache dtypes; ``None`` for ``auto``, the model
    dtype's): a token's KV bytes are ``ModelSpec.kv_bytes_per_token(bytes_per_value)``.
    """

    kind: str
    name: str
    label: str
    aliases: tuple[str, ...] = ()
    bytes_per_param: float | None = None
    bytes_per_value: int | None = None
    reasons: tuple[str, ...] = ()
    caveats: tuple[str, ...] = ()
    check: Check | None = field(default=None, repr=False, compare=False)
    caution: Check | None = field(default=None, repr=False, compare=False)  # fills ``caveats``
    #: whether a load with it says its caveats ("note: ..."); False where the load itself says
    #: it when it applies (AWQ/GPTQ: their calibration, not a cached or pre-quantized load)
    load_note: bool = field(default=True, repr=False, compare=False)

    @property
    def available(self) -> bool:
        """Whether it can run on the device it was listed for."""
        return not self.reasons

    def on(self, device: str) -> "Choice":
        """This choice with the reasons it can't run on ``device`` ("auto": what auto picks)."""
        target = _target(device)
        return replace(self, reasons=tuple(self.check(target)) if self.check else (),
                       caveats=tuple(self.caution(target)) if self.caution else ())

    def to_dict(self) -> dict:
        """The JSON form (``hearth doctor``, the server): every field but the checks."""
        return {"kind": self.kind, "name": self.name, "label": self.label, "aliases": list(self.aliases),
                "bytes_per_param": self.bytes_per_param, "bytes_per_value": self.bytes_per_value,
                "reasons": list(self.reasons), "caveats": list(self.caveats)}


_REGISTRY: dict[str, dict[str, Choice]] = {kind: {} for kind in KINDS}


def register(choice: Choice) -> None:
    """Add a choice (or replace the one of that name): how a new quantization or backend
    becomes a load option everywhere."""
    if choice.kind not in _REGISTRY:
        raise ValueError(f"unknown kind of load choice {choice.kind!r}; kinds: {', '.join(KINDS)}")
    _REGISTRY[choice.kind][choice.name] = choice


def names(kind: str) -> tuple[str, ...]:
    """The names of ``kind``'s choices in the order lists show them, without torch (for
    ``--help`` and validation). Devices: ``auto``, ``cpu``, ``cuda``; ``cuda:N`` is
    accepted too."""
    return tuple(_kind(kind))


def defined(kind: str) -> tuple[Choice, ...]:
    """``kind``'s choices as registered: names, labels, bytes; no check run (no torch)."""
    return tuple(_kind(kind).values())


def get(kind: str, name: str, device: str | None = None) -> Choice:
    """The choice ``name`` (or an alias) of ``kind``; with ``device``, its reasons there.

    Raises:
        InvalidRequestError: an unknown name; the message lists the choices.
    """
    name = canonical(kind, name)
    choice = _kind(kind).get(name) or _cuda_device(name)
    return choice if device is None else choice.on(device)


def choices(kind: str, device: str = "auto") -> tuple[Choice, ...]:
    """``kind``'s choices as a load on ``device`` sees them, each with the reasons it can't
    run there. Devices list every GPU torch sees (``cuda:N`` with its name), or ``cuda``
    with the reason there is none; ``auto`` dtype names what it loads on ``device``."""
    if kind == "device":
        return _devices()
    listed = tuple(c.on(device) for c in _kind(kind).values())
    if kind == "dtype":
        listed = tuple(_auto_dtype_here(c, device) if c.name == "auto" else c for c in listed)
    return listed


def all_choices(device: str = "auto") -> dict[str, tuple[Choice, ...]]:
    """Every kind's ``choices`` on ``device`` (what a load dialog shows)."""
    return {kind: choices(kind, device) for kind in KINDS}


def canonical(kind: str, name: str) -> str:
    """``name`` with aliases resolved (``bf16`` -> ``bfloat16``, ``nf4`` -> ``bnb-nf4``,
    ``e4m3`` -> ``fp8``); raises InvalidRequestError for an unknown name, listing the choices."""
    table = _kind(kind)
    if isinstance(name, str):
        if name in table:
            return name
        for choice in table.values():
            if name in choice.aliases:
                return choice.name
        if kind == "device" and _CUDA_N.fullmatch(name):
            return name
    raise InvalidRequestError(_UNKNOWN[kind](name), options=(kind,))


def bytes_per_value(kv_cache_dtype: str, dtype: str) -> int:
    """Bytes of one cached K or V value for a KV-cache choice with weights in ``dtype``
    (a resolved dtype name: ``auto`` caches in the model's dtype)."""
    choice = get("kv_cache_dtype", kv_cache_dtype)
    if choice.bytes_per_value is not None:
        return choice.bytes_per_value
    weights = get("dtype", dtype)
    if weights.bytes_per_param is None:
        raise ValueError(f"resolve dtype {dtype!r} for the device first (auto_dtype)")
    return int(weights.bytes_per_param)


def _kind(kind: str) -> dict[str, Choice]:
    if kind not in _REGISTRY:
        raise ValueError(f"unknown kind of load choice {kind!r}; kinds: {', '.join(KINDS)}")
    return _REGISTRY[kind]


def _target(device: str) -> str:
    """``auto`` -> the device an ``auto`` load would use (without importing torch twice)."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


_CUDA_N = re.compile(r"cuda:\d+")
_UNKNOWN: dict[str, Callable[[object], str]] = {
    "device": lambda n: f"device must be auto, cpu, cuda or cuda:N, got {n!r}",
    "dtype": lambda n: f"dtype must be one of {', '.join(names('dtype'))}, got {n!r}",
    "attention": lambda n: (f"unknown attention backend {n!r}; choose one of: {', '.join(names('attention'))} "
                            "(--attention; `hearth doctor` shows which run here)."),
    "kv_cache_dtype": lambda n: f"kv_cache_dtype must be one of {', '.join(names('kv_cache_dtype'))}, got {n!r}",
    "quantization": lambda n: (f"unknown quantization {n!r}; choose one of: {', '.join(names('quantization'))} "
                               "(--quant; `hearth doctor` shows which run here)."),
}


# -- devices ---------------------------------------------------------------------------------
def _cuda_reasons(device: str) -> list[str]:
    import torch

    if not torch.cuda.is_available():
        return [f"torch sees no CUDA GPU here (torch {torch.__version__}, CUDA build: "
                f"{torch.version.cuda or 'no'}): run on the CPU, or install a CUDA build of torch"]
    index = int(device.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        return [f"only {torch.cuda.device_count()} CUDA device(s) here"]
    return []


def _cuda_device(name: str) -> Choice:
    return Choice("device", name, name, check=lambda _device: _cuda_reasons(name))


def _devices() -> tuple[Choice, ...]:
    import torch

    table = _REGISTRY["device"]
    gpus = []
    if torch.cuda.is_available():
        gpus = [Choice("device", f"cuda:{i}", f"cuda:{i} — {torch.cuda.get_device_name(i)}")
                for i in range(torch.cuda.device_count())]
    else:
        gpus = [table["cuda"].on("cuda")]
    return (table["auto"].on("auto"), *gpus, table["cpu"].on("cpu"))


register(Choice("device", "auto", "Automatic (GPU if there is one)"))
register(Choice("device", "cpu", "CPU"))
register(Choice("device", "cuda", "cuda — the first CUDA GPU", check=lambda _d: _cuda_reasons("cuda")))


# -- weights dtypes --------------------------------------------------------------------------
def _bf16_reasons(device: str) -> list[str]:
    if not device.startswith("cuda"):
        return []
    import torch

    if _cuda_reasons(device):
        return []  # the device's own reason says it
    if not torch.cuda.is_bf16_supported():
        return [f"{torch.cuda.get_device_name(torch.device(device))} has no bfloat16 support: use float16"]
    return []


def _auto_dtype_here(choice: Choice, device: str) -> Choice:
    from engine.memory_plan import auto_dtype

    target = _target(device)
    kind = "cuda" if target.startswith("cuda") else "cpu"
    resolved = auto_dtype(kind, bf16_supported=kind != "cuda" or not _bf16_reasons(target))
    return replace(choice, label=f"auto ({resolved} on {target})",
                   bytes_per_param=_REGISTRY["dtype"][resolved].bytes_per_param)


register(Choice("dtype", "auto", "auto (bfloat16 on a GPU, float32 on the CPU)"))
register(Choice("dtype", "bfloat16", "bfloat16", ("bf16",), bytes_per_param=2, check=_bf16_reasons))
register(Choice("dtype", "float16", "float16", ("fp16", "half"), bytes_per_param=2))
register(Choice("dtype", "float32", "float32", ("fp32",), bytes_per_param=4))


# -- attention backends ----------------------------------------------------------------------
def _backend_reasons(name: str) -> Check:
    def check(device: str) -> list[str]:
        from engine.layers.attention import backend_names, backend_reasons

        if name not in backend_names():
            return [f"no attention backend {name!r} is built into this version of Hearth"]
        return backend_reasons(name, device)
    return check


register(Choice("attention", "auto", "auto (triton on a CUDA GPU, else torch)"))
register(Choice("attention", "torch", "torch (reference, runs everywhere)", check=_backend_reasons("torch")))
register(Choice("attention", "triton", "triton (Hearth's paged kernels, CUDA)", check=_backend_reasons("triton")))
register(Choice("attention", "flash-attn", "flash-attn (FlashAttention 2, CUDA)",
                check=_backend_reasons("flash-attn")))


# -- KV-cache dtypes -------------------------------------------------------------------------
def _fp8_kv_reasons(device: str) -> list[str]:
    """Why the default backend can't keep an fp8 KV cache on ``device``."""
    if not device.startswith("cuda"):
        return []  # the torch reference backend reads an fp8 cache anywhere
    import torch

    if not torch.cuda.is_available() or _cuda_reasons(device):
        return []
    if torch.cuda.get_device_capability(torch.device(device)) < (8, 9):
        return ["the triton backend's fp8 KV cache needs an Ada or Hopper GPU (compute capability 8.9+)"]
    return []


register(Choice("kv_cache_dtype", "auto", "same as the weights"))
register(Choice("kv_cache_dtype", "fp8", "fp8 (e4m3): twice the context, slightly less exact",
                ("fp8_e4m3", "fp8-e4m3", "float8_e4m3fn", "e4m3"), bytes_per_value=1, check=_fp8_kv_reasons))


# -- weight quantizations --------------------------------------------------------------------
_NOT_YET = "not implemented yet: arrives in a later release"
_GROUP_SCALES = 4 / 128  # an fp16 scale and min per group of 128 weights


def _not_yet(_device: str) -> list[str]:
    return [_NOT_YET]


#: the oldest GPU Hearth's int4/int8 Triton kernels run on (Ampere)
QUANT_MIN_CAPABILITY = (8, 0)


def _quant_kernel_reasons(device: str) -> list[str]:
    """Why Hearth's int4/int8 kernels can't run on ``device`` (the CPU always can: its C
    kernel, or the dequantizing reference)."""
    if not device.startswith("cuda"):
        return []
    import torch

    if not torch.cuda.is_available() or _cuda_reasons(device):
        return []  # the device's own reason says it
    major, minor = torch.cuda.get_device_capability(torch.device(device))
    if (major, minor) < QUANT_MIN_CAPABILITY:
        return [f"Hearth's int4/int8 GPU kernels need an Ampere or newer GPU (compute capability 8.0+), this one "
                f"is {major}.{minor}: load it unquantized (bf16/fp16) or on the CPU"]
    return []


#: Quantizations a checkpoint can be written in on any device, though they can't run there:
#: casting to fp8 needs no fp8 tensor cores (``hearth quantize --quant fp8`` on the CPU loads
#: with ``load_model(..., writing=True)``; the tests check fp8's arithmetic the same way,
#: ``hearth_kernels.fp8.scaled_mm`` computing it in float32 there).
WRITABLE_ANYWHERE = ("fp8", "fp8-gptq")


def _fp8_weight_reasons(device: str) -> list[str]:
    """Why fp8 weights can't run on ``device``: they need fp8 tensor cores."""
    if not device.startswith("cuda"):
        return ["fp8 runs on the fp8 tensor cores of an NVIDIA Ada or Hopper GPU (compute capability 8.9+); "
                "on the CPU choose int8 (the same size, Hearth's CPU kernel) or int4"]
    import torch

    if not torch.cuda.is_available() or _cuda_reasons(device):
        return []  # the device's own reason says it
    major, minor = torch.cuda.get_device_capability(torch.device(device))
    if (major, minor) < (8, 9):
        return [f"fp8 needs an Ada or Hopper GPU (compute capability 8.9+), this one is {major}.{minor}: "
                "choose int8 (the same size) or int4"]
    return []


register(Choice("quantization", "auto", "auto (a GGUF file's or pre-quantized checkpoint's own; else none)"))
register(Choice("quantization", "none", "none (the weights dtype)"))
register(Choice("quantization", "bf16", "bf16 (unquantized; float32 on the CPU)", ("bfloat16",), bytes_per_param=2))
register(Choice("quantization", "fp16", "fp16 (unquantized; float32 on the CPU)", ("float16", "half"),
                bytes_per_param=2))
register(Choice("quantization", "gguf", "GGUF's own (Q8_0/Q4_x/K-quants kept quantized)",
                bytes_per_param=20 / 32, check=_quant_kernel_reasons))
register(Choice("quantization", "int8", "int8 (weight-only, per channel)",
                bytes_per_param=1.0, check=_quant_kernel_reasons))
register(Choice("quantization", "int4", "int4 (weight-only, groups of 128)",
                bytes_per_param=0.5 + _GROUP_SCALES, check=_quant_kernel_reasons))


#: What a calibrated method costs on the CPU (the load dialog's caveat; the calibration says it as it starts)
CPU_CALIBRATION_NOTE = ("on the CPU a float model's first calibration takes a while (10-30 minutes for the "
                        "bundled 135M model on 2 cores, hours for billions of weights; progress per layer, "
                        "cancellable); it is cached after that, and a pre-quantized AWQ/GPTQ checkpoint loads "
                        "as it is")


def _calibration_caveats(device: str) -> list[str]:
    """What to know before picking a calibrated method on ``device``: on the CPU a float
    model's first calibration takes long (a GPU takes seconds to minutes)."""
    if device.startswith("cuda"):
        return []
    return [CPU_CALIBRATION_NOTE]


register(Choice("quantization", "awq", "AWQ (int4, activation-aware; a float model calibrates once)",
                bytes_per_param=0.5 + _GROUP_SCALES, check=_quant_kernel_reasons, caution=_calibration_caveats,
                load_note=False))
register(Choice("quantization", "gptq", "GPTQ (int4, error-compensated; a float model calibrates once)",
                bytes_per_param=0.5 + _GROUP_SCALES, check=_quant_kernel_reasons, caution=_calibration_caveats,
                load_note=False))
register(Choice("quantization", "fp8", "fp8 (e4m3 weights and activations, Ada/Hopper GPUs)", ("e4m3",),
                bytes_per_param=1.0, check=_fp8_weight_reasons))
register(Choice("quantization", "fp8-gptq", "fp8, GPTQ-rounded (closer to the model; a float model calibrates once)",
                ("fp8-calibrated",), bytes_per_param=1.0, check=_fp8_weight_reasons))
register(Choice("quantization", "compressed-tensors", "compressed-tensors W4A16/W8A16 (pre-quantized)",
                ("ct", "llm-compressor"), bytes_per_param=0.5 + _GROUP_SCALES, check=_quant_kernel_reasons))
# bitsandbytes (an optional extra, ``engine.quant.bnb``): listed where it isn't installed,
# with the reason and what to pick instead.
def _bnb_reasons(name: str) -> Check:
    def check(device: str) -> list[str]:
        from engine.quant.bnb import reasons

        return reasons(name, device)
    return check


for _name, _label, _aliases, _bytes in (
        ("bnb-nf4", "bitsandbytes NF4 (4-bit, blocks of 64: smaller, not faster)", ("nf4",),
         0.5 + 4 / 64),  # an fp32 absmax per block of 64
        ("bnb-nf4-dq", "bitsandbytes NF4, double quantization (a little smaller again)", ("nf4-dq",),
         0.5 + (1 + 4 / 256) / 64),  # the absmaxes as 8-bit codes, an fp32 scale per 256 of them
        ("bnb-int8", "bitsandbytes int8 (LLM.int8(): outlier columns in fp16)", (), 1.0)):
    register(Choice("quantization", _name, _label, _aliases, bytes_per_param=_bytes, check=_bnb_reasons(_name)))
