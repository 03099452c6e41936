"""One validated config dataclass per concern (see ARCHITECTURE.md), and ``load_config``:
the one ``EngineConfig`` of the load options that the CLI, the GUI, ``hearth bench`` and
``Engine.load`` all build. Names of choices (device, dtype, attention backend, KV-cache
dtype, quantization) are checked against the registry in ``engine.choices``."""

from __future__ import annotations

import difflib
import inspect
import re
from dataclasses import dataclass, field, replace

from engine import choices
from engine.errors import InvalidRequestError


def kv_cache_dtype_name(name: str) -> str:
    """``auto`` or ``fp8`` (aliases accepted); InvalidRequestError for anything else."""
    return choices.canonical("kv_cache_dtype", name)


#: The methods that quantize in groups whose size a load may choose (--group-size).
GROUPED_METHODS = ("int4", "awq", "gptq")
#: The methods that can quantize the embedding and head too, in their own format (--quant-head).
QUANT_HEAD_METHODS = ("int8", "int4")
#: The methods that quantize an untied LM head unless --float-head keeps it float.
FLOAT_HEAD_METHODS = ("int8", "int4", "fp8")


def check_group_size(method: str, group_size: int | None) -> None:
    """Refuse a group size (``--group-size``) with a method that has none to choose (first:
    the advice on the value would be wrong for it), or one not offered."""
    if group_size is None:
        return
    if method not in GROUPED_METHODS:
        what = "int8 is per output channel" if method == "int8" else f"{method} has no group size to choose"
        raise InvalidRequestError(f"{what}: --group-size applies to int4, awq and gptq.",
                                  options=("quant_group_size",))
    if group_size not in (32, 64, 128, 256):
        raise InvalidRequestError(f"the int4 group size (--group-size) must be 32, 64, 128 or 256, got "
                                  f"{group_size!r}", options=("quant_group_size",))


@dataclass(slots=True)
class ModelConfig:
    model: str | None = None  # None / "default" -> the bundled SmolLM2
    revision: str | None = None
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto: bf16 on CUDA (fp16 if no bf16), float32 on CPU
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    force_fallback: bool = False  # run through transformers even if a native model exists
    # A name of the choices registry. auto: a GGUF file's own quantized weights, else none.
    quantization: str = "auto"
    quant_group_size: int | None = None  # int4's group; None: 128, or the largest of 64/32 that fits
    quant_head: bool = False  # quantize the embedding / LM head too (int8, int4)
    # int8/int4 quantize an untied LM head to int8 per channel by default (gpt-fast and
    # llama.cpp's K-quant mixes quantize the output layer too; it is up to 6% of a bf16
    # decode step); this keeps it in the model's dtype instead.
    float_head: bool = False
    # A local folder of tokenizer files used instead of the model's own (vLLM's --tokenizer).
    # A random-weight benchmark shape gets text this way: its vocabulary becomes the tokenizer's.
    tokenizer: str | None = None
    # A load over several devices (``--devices cuda:0,cpu``; engine.split): None loads on
    # ``device`` alone. ``split``: layer (contiguous layer ranges per device, one process)
    # or tensor; ``split_ratio``: the layer shares per device (None: by what each holds).
    devices: tuple[str, ...] | None = None
    split: str = "layer"
    split_ratio: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        # Names (aliases resolved) from the one registry of choices; whether a choice can
        # run on this machine is checked at load (engine.loader.choices).
        self.device = choices.canonical("device", self.device)
        self._check_devices()
        self.dtype = choices.canonical("dtype", self.dtype)
        self.quantization = choices.canonical("quantization", self.quantization)
        if self.max_model_len is not None and self.max_model_len < 1:
            raise InvalidRequestError("max_model_len must be positive")
        check_group_size(self.quantization, self.quant_group_size)

    def _check_devices(self) -> None:
        """Read ``devices``/``split``/``split_ratio`` (text or sequences) into their
        canonical forms; one device named is a plain load on it (tensor parallel: world
        size 1)."""
        from engine.split import check_mode, parse_devices, parse_split_ratio

        if self.devices is None or self.devices == "" or self.devices == ():
            if self.split_ratio is not None and self.split_ratio != "":
                raise InvalidRequestError("--split-ratio needs --devices: name the devices the shares are for.",
                                          options=("split_ratio",))
            self.devices, self.split_ratio = None, None
            if check_mode(self.split, ("cpu",)) == "tensor":
                raise InvalidRequestError("--split tensor needs --devices: name the devices of the ranks, e.g. "
                                          "--devices cuda:0,cuda:1.", options=("split", "devices"))
            return
        text = self.devices if isinstance(self.devices, str) else ",".join(map(str, self.devices))
        devices = parse_devices(text)
        if self.device not in ("auto", devices[0]) and (self.device, devices[0]) != ("cuda", "cuda:0"):
            raise InvalidRequestError(f"--device {self.device} and --devices {text} both given: give one of them "
                                      "(--devices lists every device of the load, the first one first).",
                                      options=("device", "devices"))
        self.split = check_mode(self.split, devices)
        if "cpu" in devices and any(d != "cpu" for d in devices[devices.index("cpu"):]):
            raise InvalidRequestError(f"--devices {text}: put the GPUs first and the CPU last (the CPU takes the "
                                      "layers the GPUs can't hold; the load's dtype and kernels follow the first "
                                      "device).", options=("devices",))
        ratio = self.split_ratio
        if ratio is not None and ratio != "":
            text_ratio = ratio if isinstance(ratio, str) else ",".join(map(str, ratio))
            if self.split != "layer":
                raise InvalidRequestError("--split-ratio sizes a layer split; tensor parallel splits every layer "
                                          "evenly across its ranks.", options=("split_ratio",))
            self.split_ratio = parse_split_ratio(text_ratio, len(devices))
        else:
            self.split_ratio = None
        self.device = devices[0]
        # One device: a plain load; with --split tensor, tensor parallel at world size 1
        # (its code path without peers: what it costs, measured against the plain load).
        self.devices = devices if len(devices) > 1 or self.split == "tensor" else None
        if self.devices is None:
            self.split_ratio = None


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
    # Token budget per step (chunked prefill splits prompts); None: the device's own
    # (STEP_TOKENS), filled in by the load once the device is known (``step_budget``).
    max_num_batched_tokens: int | None = None
    # Admission batching (engine.core.scheduler), with CUDA-graph decode only: while every
    # running sequence decodes, new prompts wait until they are this share of the running
    # ones (or fill the free places), at most max_hold_steps steps. 0 admits each at once.
    admit_ratio: float = 0.3
    max_hold_steps: int = 16

    def __post_init__(self) -> None:
        if not 0 <= self.admit_ratio <= 64 or self.max_hold_steps < 0:  # (a NaN fails the first)
            raise InvalidRequestError(f"admit_ratio must be in [0, 64] and max_hold_steps >= 0, got "
                                      f"{self.admit_ratio!r} and {self.max_hold_steps!r}")
        if self.max_num_seqs < 1:
            raise InvalidRequestError("max_num_seqs must be >= 1")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            raise InvalidRequestError("max_num_batched_tokens must be >= 1")


#: The token budget of a step (``max_num_batched_tokens``) when a load names none. A GPU
#: reads a long prompt 2,048 tokens a step. A CPU reads 512: a step is what a Stop, a new
#: message and the other requests' next tokens wait for, and 2,048 tokens of even the
#: bundled 135M model took 4-6 s on two cores (512: under 1 s), while a 2,048-token prompt
#: read 512 a step took 9.7-10.9 s against 9.45-10.9 in one step (256: 10.2-11.8;
#: ``benchmarks/results/2026-12-07-i14-cpu-step-budget.json``).
STEP_TOKENS = {"cuda": 2048, "cpu": 512}


def step_budget(config: "EngineConfig", device) -> "EngineConfig":
    """``config`` with its step budget settled for ``device`` (a torch.device or its
    name; a split's first device): the one asked for, else ``STEP_TOKENS``' (a copy; the
    caller's config is left as asked)."""
    sc = config.scheduler
    if sc.max_num_batched_tokens is not None:
        return config
    kind = str(getattr(device, "type", device)).split(":")[0]
    tokens = STEP_TOKENS.get(kind, STEP_TOKENS["cuda"])
    return replace(config, scheduler=replace(sc, max_num_batched_tokens=tokens))


@dataclass(slots=True)
class EngineConfig:
    """Everything a load needs, validated: what travels from a front end to the engine
    (``Engine.from_config``, ``check_model``). Build it with ``load_config``."""

    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    attention: str = "auto"  # auto: triton on a CUDA GPU when it can run, else torch
    enforce_eager: bool = False  # no CUDA graphs for decode (debugging, or to save memory)

    def __post_init__(self) -> None:
        self.attention = choices.canonical("attention", self.attention)


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
                block_size: int = 16, max_num_seqs: int = 64, max_num_batched_tokens: int | None = None,
                enable_prefix_caching: bool = True, revision: str | None = None,
                force_fallback: bool = False, enforce_eager: bool = False,
                kv_cache_dtype: str = "auto", quantization: str = "auto",
                quant_group_size: int | None = None, quant_head: bool = False, float_head: bool = False,
                tokenizer: str | None = None, devices: str | tuple[str, ...] | None = None,
                split: str = "layer", split_ratio: str | tuple[float, ...] | None = None) -> EngineConfig:
    """The one validated EngineConfig of the load options (``Engine.load``'s keywords, the
    CLI's flags, the load dialog's fields, ``hearth bench``'s engine flags)."""
    return EngineConfig(
        model=ModelConfig(model=model, revision=revision, device=device, dtype=dtype,
                          max_model_len=max_model_len, force_fallback=force_fallback,
                          quantization=quantization, quant_group_size=quant_group_size,
                          quant_head=quant_head, float_head=float_head, tokenizer=tokenizer or None,
                          devices=devices, split=split, split_ratio=split_ratio),
        cache=CacheConfig(block_size=block_size, num_blocks=num_blocks,
                          kv_cache_memory=None if kv_cache_memory is None else parse_bytes(kv_cache_memory),
                          enable_prefix_caching=enable_prefix_caching,
                          kv_cache_dtype=kv_cache_dtype),
        scheduler=SchedulerConfig(max_num_seqs=max_num_seqs,
                                  max_num_batched_tokens=max_num_batched_tokens),
        attention=attention,
        enforce_eager=enforce_eager,
    )


#: The load options: ``load_config``'s keywords besides ``model``.
LOAD_OPTIONS: tuple[str, ...] = tuple(inspect.signature(load_config).parameters)[1:]


def config_from_options(model: str | None = None, **options) -> EngineConfig:
    """``load_config(model, **options)``, refusing an option it doesn't know with an
    InvalidRequestError that names it and lists the valid ones (not a TypeError)."""
    unknown = [name for name in options if name not in LOAD_OPTIONS]
    if unknown:
        close = difflib.get_close_matches(unknown[0], LOAD_OPTIONS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise InvalidRequestError(
            f"unknown load option {unknown[0]!r}{hint}; the load options are: {', '.join(LOAD_OPTIONS)}.")
    return load_config(model, **options)
