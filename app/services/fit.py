"""Will this model fit? Weights + KV cache + overhead against free GPU memory or RAM.

The estimate applies the rules ``Engine.load`` applies (through ``engine.api``, not a copy
of them), so what it says is what a load with the same options takes:

The model's shape is the engine's reading of its config.json (``engine.api.model_summary``:
the native model spec, or what the transformers fallback would take), and every choice's
bytes come from the engine's registry of load choices: one vocabulary of dtypes and
quantizations with the load dialog, the CLI and ``hearth doctor``.

* weights: ``params x bytes/param`` of the weights dtype. ``"auto"`` is the engine's own
  rule for the device (float32 on the CPU, bfloat16 on a GPU). Quantizations (int8, int4,
  ...) take their packed size plus group scales, with embeddings and LM head left in 16
  bit; ``"as published"`` takes the weight files' size (pre-quantized AWQ/GPTQ repos). A
  GGUF file with ``"gguf"``, or ``"auto"`` where its own quantized weights run
  (``engine.api.gguf_kept_on``), takes its size times what Hearth's layout of its type
  holds per byte of file (``engine.api.gguf_memory_ratio``: Q4_K_M about 1.22x); a type
  Hearth dequantizes at load (IQ*, Q2_K, Q3_K, ...), or one its name doesn't give, the
  load dtype's bytes per parameter.
* KV cache: what the load sets aside, sized as the engine sizes it: blocks of 16 tokens
  of the model spec's K and V bytes per token (``SpecSummary.kv_bytes_per_token``) at the
  KV-cache choice's bytes per value (the weights dtype's for ``auto``, 1 for ``fp8``),
  from ``kv_cache_memory`` if given, else on the CPU a quarter of the free RAM capped at
  1 GiB, never more than 64 sequences of the full context could use. On a GPU the load
  gives the KV cache the rest of the card: the verdict counts one full context there,
  the least a load accepts, and the summary says what the rest comes to.
* context: the load's ``max_model_len``; ``None`` is the model's own maximum, as in the
  load dialog.
* overhead: 10% on top (activations, CUDA context, allocator slack).

Verdict: "won't fit" when the total exceeds the free memory (or the KV cache can't hold
one full context), "tight" when it uses more than 90% of it, else "fits".
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from engine.api import (DTYPE_BYTES, CacheConfig, InvalidRequestError, SchedulerConfig, SpecSummary, auto_dtype,
                        choice_name, choice_names, context_blocks, cpu_kv_budget, get_choice, gguf_file_label,
                        gguf_kept_on, gguf_memory_ratio, gguf_split_part, kv_bytes_per_value, kv_pool_blocks,
                        model_summary)

GIB = 1 << 30
#: The engine's own choice of weights dtype for the device (float32 on CPU, bf16 on GPU).
AUTO = "auto"
#: Pseudo-quantization: take the weight files' size as they are.
AS_PUBLISHED = "as published"
#: Quantizations that read a checkpoint's own quantized weights (sized at their file size).
_OWN_QUANTIZATIONS = ("gguf", "awq", "gptq", "compressed-tensors")
OVERHEAD = 0.10
TIGHT_FRACTION = 0.90
#: A load's context when config.json names none (the engine's fallback too).
FALLBACK_CONTEXT = 4096


@dataclass(frozen=True, slots=True)
class MemoryTarget:
    """Where the model would run: ``key`` ``"cuda:N"`` or ``"cpu"``, with its free bytes
    (and a GPU's compute capability, where NVML gave it). ``keeps_gguf``: whether ``auto``
    loads a GGUF file's own quantized weights there (None: not asked yet; ``memory_targets``
    asks, on its worker thread: on the CPU that builds the C kernel the first time)."""

    key: str
    label: str
    free_bytes: int
    total_bytes: int
    capability: tuple[int, int] | None = None
    keeps_gguf: bool | None = None

    def auto_keeps_gguf(self) -> bool:
        """Whether ``auto`` loads a GGUF file's own quantized weights here (the engine's rule)."""
        return self.keeps_gguf if self.keeps_gguf is not None else gguf_kept_on(self.device_type, self.capability)

    @property
    def device_type(self) -> str:
        """``"cuda"`` or ``"cpu"``: which of the engine's rules apply."""
        return "cuda" if self.key.startswith("cuda") else "cpu"


@dataclass(frozen=True, slots=True)
class FitEstimate:
    """The outcome, with every number that went into it (bytes).

    ``kv_cache_bytes`` is the KV pool the load sets aside; ``kv_context_bytes`` what one
    sequence of the full context needs. ``kv_fills_device``: the load gives the KV cache
    the rest of a GPU, so the verdict counts one context and ``kv_cache_bytes`` is about.
    """

    verdict: str            # "fits" | "tight" | "won't fit" | "unknown"
    weights_bytes: int
    kv_cache_bytes: int
    overhead_bytes: int
    available_bytes: int
    target_label: str
    weights: str            # the choice: "auto", a dtype, a quantization or AS_PUBLISHED
    dtype: str              # the dtype the weights (or, quantized, their compute) load in
    context_len: int
    kv_context_bytes: int = 0
    kv_fills_device: bool = False
    notes: tuple[str, ...] = ()
    held_as: str | None = None  # what the weights load as where no dtype or choice says it (a GGUF's "Q4_K_M")

    @property
    def kv_counted_bytes(self) -> int:
        """The KV bytes the verdict counts (one context where the pool takes the rest)."""
        return self.kv_context_bytes if self.kv_fills_device else self.kv_cache_bytes

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_counted_bytes + self.overhead_bytes

    def summary(self) -> str:
        """One line for the UI, e.g. ``won't fit: needs 15.4 GiB (weights 13.0 bfloat16 +
        KV cache 1.0 + overhead 1.4), RAM has 8.0 GiB free: pick ...``."""
        # "auto" names the dtype it resolved to; a quantization or "as published" itself.
        dtype = self.held_as or (self.dtype if self.weights == AUTO or self.weights in DTYPE_BYTES else self.weights)
        kv = (f"KV {gib(self.kv_context_bytes)} for one {self.context_len}-token context" if self.kv_fills_device
              else f"KV cache {gib(self.kv_cache_bytes)}")
        need = (f"needs {gib(self.total_bytes)} GiB (weights {gib(self.weights_bytes)} {dtype} + {kv} + "
                f"overhead {gib(self.overhead_bytes)})")
        have = f"{self.target_label} has {gib(self.available_bytes)} GiB free"
        text = f"{self.verdict}: {need}, {have}"
        if self.verdict == "won't fit":
            text += ": pick a smaller dtype or quantization, a shorter context or another device"
        elif self.verdict == "tight":
            text += ": it may run out of memory with long prompts or other programs open"
        if self.kv_fills_device and self.verdict != "won't fit" and self.kv_cache_bytes:
            text += f"; the KV cache then takes about {gib(self.kv_cache_bytes)} GiB of the rest"
        return text + "".join(f". {n}" for n in self.notes)


def gib(n: int | float) -> str:
    """Bytes as GiB, the unit every number on the page uses: one decimal from 1 GiB up,
    two below (a 135M model's 0.25 vs 0.50 GiB must not both read 0.5)."""
    value = n / GIB
    return f"{value:.1f}" if abs(value) >= 1 else f"{value:.2f}"


def bytes_per_param() -> dict[str, float]:
    """Bytes per parameter of every weights choice besides ``AUTO`` and ``AS_PUBLISHED``,
    read from the engine's registry now (a quantization registered later counts too): the
    load dtypes, then the quantizations that store weights differently ("none" is the
    dtype's)."""
    out = {name: float(size) for name, size in DTYPE_BYTES.items()}
    for name in choice_names("quantization"):
        rate = get_choice("quantization", name).bytes_per_param
        if rate:
            out[name] = float(rate)
    return out


def weights_name(weights: str) -> str:
    """The canonical name of a weights choice (``"bf16"`` -> ``"bfloat16"``, ``"nf4"`` ->
    ``"bnb-nf4"``: the registry's aliases); ``AUTO``, ``AS_PUBLISHED`` and unknown names
    stay as they are."""
    if weights in (AUTO, AS_PUBLISHED):
        return weights
    for kind in ("dtype", "quantization"):
        try:
            return choice_name(kind, weights)
        except InvalidRequestError:
            pass
    return weights


def load_dtype(weights: str, device_type: str) -> str:
    """The dtype a load with this weights choice runs in on ``device_type``: the choice
    itself if it is a dtype, else the engine's ``auto`` rule for the device."""
    weights = weights_name(weights)
    return weights if weights in DTYPE_BYTES else auto_dtype(device_type)


def weight_bytes(num_params: int, weights: str, *, embedding_params: int = 0, embedding_rate: float = 2.0,
                 head_params: int = 0) -> int:
    """Bytes of ``num_params`` weights stored as ``weights`` (a key of ``bytes_per_param()``
    or an alias such as ``"bf16"``; resolve ``AUTO`` with ``load_dtype`` first).

    Below 16 bit, ``embedding_params`` (embeddings + untied LM head) stay in the load's
    dtype: ``embedding_rate`` bytes each (2 on a GPU, 4 for float32 on the CPU); but int8 and
    int4 store an untied head (``head_params`` of them) as int8, and fp8 as e4m3, a byte each
    (the default; ``--float-head`` keeps it float).

    Raises:
        ValueError: unknown weights choice.
    """
    name = weights_name(weights)
    rates = bytes_per_param()
    if name not in rates:
        raise ValueError(f"unknown weights dtype or quantization {weights!r}; choose one of "
                         f"{', '.join(rates)}")
    rate = rates[name]
    if rate >= 2.0 or embedding_params <= 0:
        return int(round(num_params * rate))
    embed = min(embedding_params, num_params)
    head = min(head_params, embed) if name in ("int8", "int4", "fp8") else 0  # an untied head at 1 byte
    return int(round((embed - head) * embedding_rate + head * 1.0 + (num_params - embed) * rate))


def _own_ratio(file_name: str) -> float | None:
    """Bytes in memory per byte of the GGUF file ``file_name`` loaded on its own weights, or
    None where the estimate counts it as floats (a type Hearth dequantizes, none in its name,
    or one part of a split file)."""
    return None if gguf_split_part(file_name) is not None else gguf_memory_ratio(gguf_file_label(file_name))


def gguf_keeps_own(file_name: str, target: MemoryTarget) -> bool:
    """Whether ``auto`` loads the GGUF file ``file_name`` on its own quantized weights on
    ``target``, as the estimate sizes it (its type, by name, one Hearth keeps)."""
    return target.auto_keeps_gguf() and _own_ratio(file_name) is not None


def _gguf_weight_bytes(file_name: str, file_bytes: int, weights: str, target: MemoryTarget, dtype: str,
                       num_params: int | None) -> tuple[int, str | None, str]:
    """(bytes a load of the GGUF file ``file_name`` holds, what it holds them as: its
    llama.cpp type where it is kept, else the load dtype; the note that says why) for
    ``weights`` ``"gguf"`` or ``AUTO`` on ``target``."""
    label = gguf_file_label(file_name)
    kept = weights == "gguf" or target.auto_keeps_gguf()
    ratio = _own_ratio(file_name) if kept else None
    if ratio is not None:
        return int(round(file_bytes * ratio)), label, (
            f"its {label} weights load as they are, as Hearth's int4/int8 groups with 16-bit scales: "
            f"about {ratio:.2f}x the file's size")
    split = gguf_split_part(file_name)
    if not kept:
        why = f"loads dequantized to {dtype} here (no fast int4/int8 kernel on this device)"
    elif split is not None:
        why = f"is part {split[0]} of {split[1]} of a split file: counted as dequantized to {dtype}"
    elif label is None:
        why = f"has no GGUF type in its name: counted as dequantized to {dtype}"
    else:
        why = (f"is {label}: Hearth keeps only Q8_0, Q4_0, Q4_1, Q4_K, Q5_K and Q6_K tensors quantized, so "
               f"(counted whole) it loads dequantized to {dtype}")
    if num_params is None:
        return (file_bytes, dtype,
                f"this GGUF file {why}; its parameter count is unknown, so it is counted at its file size")
    return (int(round(num_params * DTYPE_BYTES[dtype])), dtype,
            f"this GGUF file {why}: it needs more memory than its size on disk")


def estimate(*, num_params: int | None, shape: SpecSummary, target: MemoryTarget, weights: str = AUTO,
             context_len: int | None = None, kv_cache_memory: int | None = None, kv_cache_dtype: str = "auto",
             published_weight_bytes: int | None = None, gguf_file: str | None = None) -> FitEstimate:
    """What a load with these options takes on ``target``, against its free bytes.

    ``shape``: the model's ``SpecSummary`` (``load_shape``; an empty one where config.json
    is out of reach). ``weights``, ``context_len`` (``max_model_len``), ``kv_cache_memory``
    (bytes) and ``kv_cache_dtype`` mean what the load options of the same names mean. Weights come
    from ``num_params``; ``published_weight_bytes`` is used for ``AS_PUBLISHED`` (and
    when the parameter count is unknown). ``gguf_file``: the name of the GGUF file those
    bytes are (its llama.cpp type is in the name), sized as a load of it holds them. The
    verdict is ``"unknown"`` when neither is.
    """
    notes: list[str] = []
    weights = weights_name(weights)
    device = target.device_type
    dtype = load_dtype(weights, device)
    # A checkpoint's own quantization (a GGUF's blocks, AWQ/GPTQ/compressed-tensors) loads
    # at the size it is published at.
    as_published = weights in (AS_PUBLISHED, *_OWN_QUANTIZATIONS) and published_weight_bytes is not None
    gguf_bytes = held_as = None
    if gguf_file is not None and weights in (AUTO, "gguf") and published_weight_bytes is not None:
        gguf_bytes, held_as, note = _gguf_weight_bytes(gguf_file, int(published_weight_bytes), weights, target,
                                                       dtype, num_params)
        notes.append(note)
    if gguf_bytes is not None:
        weights_total = gguf_bytes
    elif as_published or num_params is None:
        if published_weight_bytes is None:
            weights_total = 0
        else:
            weights_total = int(published_weight_bytes)
            if not as_published:
                notes.append("parameter count unknown: weights counted at their file size")
    else:
        weights_total = weight_bytes(num_params, dtype if weights == AUTO else weights,
                                     embedding_params=shape.embedding_params, embedding_rate=DTYPE_BYTES[dtype],
                                     head_params=shape.head_params)
    context = context_len or shape.max_context or FALLBACK_CONTEXT
    if shape.max_context and context > shape.max_context:
        notes.append(f"the model takes at most {shape.max_context} tokens of context: a load with more is refused")
    pool = one_context = 0
    fills = False
    if shape.has_kv_shape:
        cache, sched = CacheConfig(), SchedulerConfig()   # the engine's defaults, as the app loads
        # The KV-cache choice's bytes per value (auto: the weights dtype's; fp8: 1).
        block_bytes = shape.kv_bytes_per_token(kv_bytes_per_value(kv_cache_dtype, dtype)) * cache.block_size
        one_context = context_blocks(context, cache.block_size) * block_bytes
        if kv_cache_memory is not None:
            budget = int(kv_cache_memory)
        elif device == "cpu":
            budget = cpu_kv_budget(target.free_bytes, cache.cpu_memory_fraction)
        else:
            # The rest of the card up to the load's memory fraction, less the weights
            # (activations and CUDA graphs take a little more on the day).
            fills = True
            budget = max(min(int(target.total_bytes * cache.memory_fraction), target.free_bytes) - weights_total,
                         block_bytes)
        pool = kv_pool_blocks(budget, block_bytes, context, cache.block_size, sched.max_num_seqs) * block_bytes
        if not fills and pool < one_context:
            notes.append(f"the KV cache ({gib(pool)} GiB) holds fewer tokens than one {context}-token context: "
                         "pick a shorter context or give the KV cache more memory")
    else:
        notes.append("KV cache not counted: the model's config.json (layers, heads) is unavailable")
    counted = one_context if fills else pool
    overhead = int(round((weights_total + counted) * OVERHEAD))
    total = weights_total + counted + overhead
    if weights_total == 0:
        verdict = "unknown"
        notes.append("weight size unknown: the Hub reports no parameter count for this repo")
    elif total > target.free_bytes or (not fills and shape.has_kv_shape and pool < one_context):
        verdict = "won't fit"
    elif total > TIGHT_FRACTION * target.free_bytes:
        verdict = "tight"
    else:
        verdict = "fits"
    return FitEstimate(verdict, weights_total, pool, overhead, target.free_bytes, target.label, weights, dtype,
                       context, one_context, fills, tuple(notes), held_as=held_as)


def memory_targets(*, nvml=None, psutil_module=None) -> list[MemoryTarget]:
    """Every GPU NVML can see (free memory now), then system RAM (available now).

    ``nvml`` / ``psutil_module`` default to ``pynvml`` / ``psutil`` (injectable for tests).
    No driver or no GPU simply means only RAM is listed.
    """
    targets: list[MemoryTarget] = []
    if nvml is None:
        try:
            import pynvml as nvml
        except ImportError:
            nvml = None
    if nvml is not None:
        try:
            nvml.nvmlInit()
        except Exception:
            pass  # no NVIDIA driver: a CPU-only machine
        else:
            try:
                for i in range(nvml.nvmlDeviceGetCount()):
                    handle = nvml.nvmlDeviceGetHandleByIndex(i)
                    name = nvml.nvmlDeviceGetName(handle)
                    name = name.decode() if isinstance(name, bytes) else str(name)
                    mem = nvml.nvmlDeviceGetMemoryInfo(handle)
                    try:  # which kernels run there (a GGUF's own weights need an Ampere or newer)
                        capability = tuple(int(v) for v in nvml.nvmlDeviceGetCudaComputeCapability(handle))
                    except Exception:
                        capability = None
                    targets.append(MemoryTarget(f"cuda:{i}", f"GPU {i} ({name})", int(mem.free), int(mem.total),
                                                capability, gguf_kept_on("cuda", capability)))
            except Exception:
                pass  # a GPU that cannot be queried is left out rather than guessed
            finally:
                try:
                    nvml.nvmlShutdown()
                except Exception:
                    pass
    if psutil_module is None:
        import psutil as psutil_module
    vm = psutil_module.virtual_memory()
    try:
        keeps = gguf_kept_on("cpu", None)
    except Exception:  # noqa: BLE001 - asked again when an estimate needs it
        keeps = None
    targets.append(MemoryTarget("cpu", "RAM", int(vm.available), int(vm.total), keeps_gguf=keeps))
    return targets


def load_shape(repo_id: str, *, revision: str | None = None, token: str | None = None
               ) -> tuple[SpecSummary, tuple[str, ...]]:
    """Fetch config.json alone (never the weights) and read the model's shape from it, as
    the engine reads it (``engine.api.model_summary``: the native model spec).

    Returns an empty shape plus a note instead of raising when the config is missing or
    out of reach (a gated repo without access, GGUF-only repos), so an estimate can still
    be made from the weights alone. Blocking: run off the UI thread.
    """
    from app.services.hub import HubError, fetch_config

    try:
        return model_summary(fetch_config(repo_id, revision=revision, token=token)), ()
    except HubError as exc:
        if exc.kind == "not_found":
            return SpecSummary(), ()
        return SpecSummary(), (f"config.json unavailable ({exc.kind})",)


def estimate_for_details(details, shape: SpecSummary, *, target: MemoryTarget, weights: str = AUTO,
                         context_len: int | None = None, kv_cache_memory: int | None = None,
                         kv_cache_dtype: str = "auto", gguf_file: str | None = None,
                         notes: tuple[str, ...] = ()) -> FitEstimate:
    """The estimate for a repo already described by ``details`` (a ``hub.ModelDetails``).

    The parameter count is the Hub's (safetensors headers, or the GGUF metadata). A GGUF
    file (``gguf_file`` says which) is sized as ``estimate`` sizes it: as a load holds its
    type, by its name. Pure: no network.
    """
    if gguf_file is not None:
        published = next((f.size for f in details.files if f.path == gguf_file), None)
    else:
        published = details.safetensors_bytes or None
    num_params = details.num_params
    if details.quant_format in ("awq", "gptq"):
        num_params = None  # the Hub counts packed int32 elements, not parameters: the files' size says it
    est = estimate(num_params=num_params, shape=shape, target=target, weights=weights, context_len=context_len,
                   kv_cache_memory=kv_cache_memory, kv_cache_dtype=kv_cache_dtype, published_weight_bytes=published,
                   gguf_file=gguf_file)
    if notes:
        est = replace(est, notes=est.notes + tuple(notes))
    return est


def estimate_for_repo(repo_id: str, *, target: MemoryTarget, weights: str = AUTO, context_len: int | None = None,
                      kv_cache_memory: int | None = None, kv_cache_dtype: str = "auto", details=None,
                      gguf_file: str | None = None, token: str | None = None) -> FitEstimate:
    """``estimate_for_details`` after fetching the details (if not given) and config.json.

    Raises:
        HubError: the repo cannot be read (unknown, offline, ...).
    """
    from app.services.hub import model_details

    if details is None:
        details = model_details(repo_id, token=token, with_card=False)
    shape, notes = load_shape(repo_id, revision=details.sha, token=token)
    return estimate_for_details(details, shape, target=target, weights=weights, context_len=context_len,
                                kv_cache_memory=kv_cache_memory, kv_cache_dtype=kv_cache_dtype,
                                gguf_file=gguf_file, notes=notes)
