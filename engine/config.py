"""One validated config dataclass per concern (see ARCHITECTURE.md)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from engine.errors import InvalidRequestError

_DTYPES = ("auto", "float32", "float16", "bfloat16")
KV_CACHE_DTYPES = ("auto", "fp8")
_KV_ALIASES = {"fp8_e4m3": "fp8", "fp8-e4m3": "fp8", "float8_e4m3fn": "fp8", "e4m3": "fp8"}


def kv_cache_dtype_name(name: str) -> str:
    """``auto`` or ``fp8`` (aliases accepted); InvalidRequestError for anything else."""
    name = _KV_ALIASES.get(name, name)
    if name not in KV_CACHE_DTYPES:
        raise InvalidRequestError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {name!r}")
    return name


@dataclass(slots=True)
class ModelConfig:
    model: str | None = None  # None / "default" -> the bundled SmolLM2
    revision: str | None = None
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto: bf16 on CUDA (fp16 if no bf16), float32 on CPU
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    force_fallback: bool = False  # run through transformers even if a native model exists

    def __post_init__(self) -> None:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise InvalidRequestError(
                f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}"
            )
        aliases = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}
        self.dtype = aliases.get(self.dtype, self.dtype)
        if self.dtype not in _DTYPES:
            raise InvalidRequestError(f"dtype must be one of {', '.join(_DTYPES)}, got {self.dtype!r}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise InvalidRequestError("max_model_len must be positive")


@dataclass(slots=True)
class CacheConfig:
    block_size: int = 16
    kv_cache_memory: int | None = None  # bytes for the KV pool; None: derived from memory_fraction
    memory_fraction: float = 0.90  # of total GPU memory Hearth may use (weights + KV + graphs)
    cpu_memory_fraction: float = 0.25  # of available RAM for the KV pool on CPU (capped, see runner)
    num_blocks: int | None = None  # exact pool size (tests); overrides the memory settings
    enable_prefix_caching: bool = True
    # auto: the model's dtype; fp8: float8 e4m3, half the bytes of bf16 per token (twice
    # the context in the same memory, half the K/V reads of a decode step).
    kv_cache_dtype: str = "auto"

    def __post_init__(self) -> None:
        self.kv_cache_dtype = kv_cache_dtype_name(self.kv_cache_dtype)
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise InvalidRequestError(f"block_size must be a power of two, got {self.block_size}")
        if not (0.05 <= self.memory_fraction <= 1.0):
            raise InvalidRequestError("memory_fraction must be in [0.05, 1]")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise InvalidRequestError("kv_cache_memory must be a positive number of bytes")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise InvalidRequestError("num_blocks must be positive")


@dataclass(slots=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048  # token budget per step (chunked prefill splits prompts)

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise InvalidRequestError("max_num_seqs must be >= 1")
        if self.max_num_batched_tokens < 1:
            raise InvalidRequestError("max_num_batched_tokens must be >= 1")


@dataclass(slots=True)
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    attention: str = "auto"  # auto: triton on a CUDA GPU when it can run, else torch
    enforce_eager: bool = False  # no CUDA graphs for decode (debugging, or to save memory)


# A number (1, 1.5, .5) and an optional binary unit: B, K/KB/KiB, M.., G.., T.. (any case).
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]i?b?|b)?\s*$", re.I)
_SIZE_FORMS = "write a size such as 4GiB, 512MiB, 2.5GB or a plain number of bytes (1073741824)"


def parse_bytes(text: str | int) -> int:
    """'4GiB', '512MB', '1.5G', 1024 -> bytes (binary units; 'GB' is read as GiB too).

    Raises:
        InvalidRequestError: not a size, or not more than 0 bytes; the message shows the
            accepted forms.
    """
    if isinstance(text, bool) or not isinstance(text, (int, str)):
        raise InvalidRequestError(f"cannot read {text!r} as a size: {_SIZE_FORMS}.")
    if isinstance(text, int):
        value = text
    else:
        m = _SIZE.match(text)
        if not m:
            raise InvalidRequestError(f"cannot read {text!r} as a size: {_SIZE_FORMS}.")
        unit = (m.group(2) or "b").lower()[0]
        mult = {"b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}[unit]
        value = int(float(m.group(1)) * mult)
    if value <= 0:
        raise InvalidRequestError(f"{text!r} is no memory at all (less than 1 byte): {_SIZE_FORMS}.")
    return value


def load_config(model: str | None = None, *, device: str = "auto", dtype: str = "auto",
                 attention: str = "auto", max_model_len: int | None = None,
                 kv_cache_memory: int | str | None = None, num_blocks: int | None = None,
                 block_size: int = 16, max_num_seqs: int = 64, max_num_batched_tokens: int = 2048,
                 enable_prefix_caching: bool = True, revision: str | None = None,
                 force_fallback: bool = False, enforce_eager: bool = False,
                 kv_cache_dtype: str = "auto") -> EngineConfig:
    """The one EngineConfig of ``Engine.load``'s keywords (``check_model`` builds the same)."""
    return EngineConfig(
        model=ModelConfig(model=model, revision=revision, device=device, dtype=dtype,
                          max_model_len=max_model_len, force_fallback=force_fallback),
        cache=CacheConfig(block_size=block_size, num_blocks=num_blocks,
                          kv_cache_memory=None if kv_cache_memory is None else parse_bytes(kv_cache_memory),
                          enable_prefix_caching=enable_prefix_caching,
                          kv_cache_dtype=kv_cache_dtype),
        scheduler=SchedulerConfig(max_num_seqs=max_num_seqs,
                                  max_num_batched_tokens=max_num_batched_tokens),
        attention=attention,
        enforce_eager=enforce_eager,
    )
