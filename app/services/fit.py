"""Will this model fit? Weights + KV cache + overhead against free GPU memory or RAM.

The estimate, in bytes (all shown to the user in GiB):

* weights: ``params x bytes/param`` of the chosen quantization. 16-bit formats take
  2 B/param; int8 / fp8 1 B; 4-bit formats 0.5 B plus their group scales (an fp16 scale
  and zero point per group of 128 for int4/AWQ/GPTQ, an fp32 absmax per block of 64 for
  nf4). Quantizers leave the embeddings and LM head in 16 bit, so those stay at 2 B/param
  when the config says how big they are. ``"as published"`` uses the size of the weight
  files themselves (pre-quantized AWQ/GPTQ repos, a chosen GGUF file).
* KV cache for one sequence of the full context:
  ``2 (K and V) x layers x kv_heads x head_dim x 2 bytes x tokens``, from config.json.
* overhead: 10% on top (activations, CUDA context, allocator slack).

Verdict: "won't fit" when the total exceeds the free memory, "tight" when it uses more
than 90% of it, else "fits".
"""

from __future__ import annotations

from dataclasses import dataclass, replace

GIB = 1 << 30
#: Bytes per parameter of each choice in the quantization selector.
BYTES_PER_PARAM = {
    "bf16": 2.0,
    "fp16": 2.0,
    "fp32": 4.0,
    "int8": 1.0,
    "fp8": 1.0,
    "int4": 0.5 + 4 / 128,
    "awq": 0.5 + 4 / 128,
    "gptq": 0.5 + 4 / 128,
    "nf4": 0.5 + 4 / 64,
}
#: Pseudo-quantization: take the weight files' size as they are.
AS_PUBLISHED = "as published"
OVERHEAD = 0.10
TIGHT_FRACTION = 0.90
KV_BYTES = 2  # the KV cache is kept in 16 bit


@dataclass(frozen=True, slots=True)
class ModelShape:
    """What the estimate needs from config.json (``None`` where the config is silent)."""

    num_layers: int | None = None
    num_kv_heads: int | None = None
    head_dim: int | None = None
    embedding_params: int = 0
    max_context: int | None = None

    @classmethod
    def from_config(cls, config: dict) -> "ModelShape":
        """Read a transformers ``config.json`` dict (multimodal ones through ``text_config``)."""
        cfg = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
        layers = cfg.get("num_hidden_layers") or cfg.get("n_layer") or cfg.get("num_layers")
        heads = cfg.get("num_attention_heads") or cfg.get("n_head")
        kv_heads = cfg.get("num_key_value_heads") or cfg.get("num_kv_heads") or heads
        hidden = cfg.get("hidden_size") or cfg.get("n_embd")
        head_dim = cfg.get("head_dim") or (hidden // heads if hidden and heads else None)
        vocab = cfg.get("vocab_size") or 0
        # Untied unless the config says otherwise: the bigger (safer) estimate.
        tied = bool(cfg.get("tie_word_embeddings", config.get("tie_word_embeddings", False)))
        embed = (vocab * hidden * (1 if tied else 2)) if vocab and hidden else 0
        ctx = cfg.get("max_position_embeddings") or cfg.get("n_positions")
        return cls(layers, kv_heads, head_dim, embed, ctx)

    @property
    def has_kv_shape(self) -> bool:
        return bool(self.num_layers and self.num_kv_heads and self.head_dim)


@dataclass(frozen=True, slots=True)
class MemoryTarget:
    """Where the model would run: ``key`` ``"cuda:N"`` or ``"cpu"``, with its free bytes."""

    key: str
    label: str
    free_bytes: int
    total_bytes: int


@dataclass(frozen=True, slots=True)
class FitEstimate:
    """The outcome, with every number that went into it (bytes)."""

    verdict: str            # "fits" | "tight" | "won't fit" | "unknown"
    weights_bytes: int
    kv_cache_bytes: int
    overhead_bytes: int
    available_bytes: int
    target_label: str
    quantization: str
    context_len: int
    notes: tuple[str, ...] = ()

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_cache_bytes + self.overhead_bytes

    def summary(self) -> str:
        """One line for the UI, e.g. ``won't fit: needs 15.4 GiB (weights 13.0 + KV 1.0 +
        overhead 1.4), RAM has 8.0 GiB free: pick int4 or a shorter context``."""
        need = (f"needs {gib(self.total_bytes)} GiB (weights {gib(self.weights_bytes)} + KV "
                f"{gib(self.kv_cache_bytes)} + overhead {gib(self.overhead_bytes)})")
        have = f"{self.target_label} has {gib(self.available_bytes)} GiB free"
        text = f"{self.verdict}: {need}, {have}"
        if self.verdict == "won't fit":
            text += ": pick a smaller quantization, a shorter context or another device"
        elif self.verdict == "tight":
            text += ": it may run out of memory with long prompts or other programs open"
        return text + "".join(f". {n}" for n in self.notes)


def gib(n: int | float) -> str:
    """Bytes as GiB with one decimal, the unit every number on the page uses."""
    return f"{n / GIB:.1f}"


def weight_bytes(num_params: int, quantization: str, *, embedding_params: int = 0) -> int:
    """Bytes of ``num_params`` weights stored as ``quantization`` (a key of ``BYTES_PER_PARAM``).

    Below 16 bit, ``embedding_params`` (embeddings + untied LM head) stay at 2 B/param.

    Raises:
        ValueError: unknown quantization.
    """
    if quantization not in BYTES_PER_PARAM:
        raise ValueError(f"unknown quantization {quantization!r}; choose one of {', '.join(BYTES_PER_PARAM)}")
    rate = BYTES_PER_PARAM[quantization]
    if rate >= 2.0 or embedding_params <= 0:
        return int(round(num_params * rate))
    embed = min(embedding_params, num_params)
    return int(round(embed * 2.0 + (num_params - embed) * rate))


def kv_cache_bytes(num_layers: int, num_kv_heads: int, head_dim: int, tokens: int,
                   dtype_bytes: int = KV_BYTES) -> int:
    """``2 x layers x kv_heads x head_dim x dtype_bytes x tokens`` (K and V for every layer)."""
    return 2 * num_layers * num_kv_heads * head_dim * dtype_bytes * tokens


def estimate(*, num_params: int | None, shape: ModelShape, quantization: str, context_len: int,
             target: MemoryTarget, published_weight_bytes: int | None = None) -> FitEstimate:
    """Combine weights, KV cache and overhead and compare with ``target.free_bytes``.

    ``published_weight_bytes`` is used for ``AS_PUBLISHED`` (and when the parameter count
    is unknown). The verdict is ``"unknown"`` when neither is available.
    """
    notes: list[str] = []
    if quantization == AS_PUBLISHED or num_params is None:
        if published_weight_bytes is None:
            weights = 0
        else:
            weights = int(published_weight_bytes)
            if quantization != AS_PUBLISHED:
                notes.append("parameter count unknown: weights counted at their file size")
    else:
        weights = weight_bytes(num_params, quantization, embedding_params=shape.embedding_params)
    if shape.has_kv_shape:
        kv = kv_cache_bytes(shape.num_layers, shape.num_kv_heads, shape.head_dim, context_len)
    else:
        kv = 0
        notes.append("KV cache not counted: the model's config.json (layers, heads) is unavailable")
    if shape.max_context and context_len > shape.max_context:
        notes.append(f"the model was trained for at most {shape.max_context} tokens of context")
    overhead = int(round((weights + kv) * OVERHEAD))
    total = weights + kv + overhead
    if weights == 0:
        verdict = "unknown"
        notes.append("weight size unknown: the Hub reports no parameter count for this repo")
    elif total > target.free_bytes:
        verdict = "won't fit"
    elif total > TIGHT_FRACTION * target.free_bytes:
        verdict = "tight"
    else:
        verdict = "fits"
    return FitEstimate(verdict, weights, kv, overhead, target.free_bytes, target.label, quantization,
                       context_len, tuple(notes))


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
                    targets.append(MemoryTarget(f"cuda:{i}", f"GPU {i} ({name})", int(mem.free), int(mem.total)))
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
    targets.append(MemoryTarget("cpu", "RAM", int(vm.available), int(vm.total)))
    return targets


def load_shape(repo_id: str, *, revision: str | None = None, token: str | None = None
               ) -> tuple[ModelShape, tuple[str, ...]]:
    """Fetch config.json alone (never the weights) and read the model's shape from it.

    Returns an empty shape plus a note instead of raising when the config is missing or
    out of reach (a gated repo without access, GGUF-only repos), so an estimate can still
    be made from the weights alone. Blocking: run off the UI thread.
    """
    from app.services.hub import HubError, fetch_config

    try:
        return ModelShape.from_config(fetch_config(repo_id, revision=revision, token=token)), ()
    except HubError as exc:
        if exc.kind == "not_found":
            return ModelShape(), ()
        return ModelShape(), (f"config.json unavailable ({exc.kind})",)


def estimate_for_details(details, shape: ModelShape, *, quantization: str, context_len: int,
                         target: MemoryTarget, gguf_file: str | None = None,
                         notes: tuple[str, ...] = ()) -> FitEstimate:
    """The estimate for a repo already described by ``details`` (a ``hub.ModelDetails``).

    The parameter count is the Hub's safetensors total; ``gguf_file`` picks which GGUF
    file's size counts for ``AS_PUBLISHED``. Pure: no network.
    """
    if gguf_file is not None:
        published = next((f.size for f in details.files if f.path == gguf_file), None)
    else:
        published = details.safetensors_bytes or None
    num_params = details.num_params
    if details.quant_format in ("awq", "gptq") or gguf_file is not None:
        # Pre-quantized weights: the Hub counts packed int32 elements, not parameters,
        # and a GGUF file's size is its size whatever is chosen.
        num_params = None
    est = estimate(num_params=num_params, shape=shape, quantization=quantization, context_len=context_len,
                   target=target, published_weight_bytes=published)
    if notes:
        est = replace(est, notes=est.notes + tuple(notes))
    return est


def estimate_for_repo(repo_id: str, *, quantization: str, context_len: int, target: MemoryTarget,
                      details=None, gguf_file: str | None = None, token: str | None = None) -> FitEstimate:
    """``estimate_for_details`` after fetching the details (if not given) and config.json.

    Raises:
        HubError: the repo cannot be read (unknown, offline, ...).
    """
    from app.services.hub import model_details

    if details is None:
        details = model_details(repo_id, token=token, with_card=False)
    shape, notes = load_shape(repo_id, revision=details.sha, token=token)
    return estimate_for_details(details, shape, quantization=quantization, context_len=context_len,
                                target=target, gguf_file=gguf_file, notes=notes)
