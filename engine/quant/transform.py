"""The quantization transform: which projections a load quantizes, and from what.

``quantization_plan`` reads the load's choice (``--quant``) and, for ``auto``/``gguf``, the
checkpoint's tensor names (``read_metadata``: no tensor data), and ``QuantPlan.transform``
is the model transform (``engine.runner.bring_up.model_transforms``) that replaces, on the
meta device, each float projection with a ``QuantizedLinear`` whose source fills it:

- ``int8`` / ``int4``: every decoder projection, round-to-nearest as its float tensor
  streams in; the embedding and a tied LM head stay in the model's dtype unless
  ``quant_head`` (quantizing SmolLM2's tied embedding is reported to cost about +26%
  perplexity against +15% without it). An untied LM head (Llama 3, Qwen 7B+) becomes int8
  per output channel unless ``float_head`` (or ``quant_head``: the method's own format):
  it is 6% of a Llama-8B bf16 decode step and 20% of an int4 one, int8 per channel costs
  least in quality (gpt-fast quantizes it too; llama.cpp's Q4_K_M keeps it at 6 bits).
- ``fp8``: every decoder projection cast to float8 e4m3 with a scale per output channel as
  it streams in, an untied LM head too (unless ``float_head``); the embedding stays float.
  A checkpoint already in fp8 (compressed-tensors float-quantized, vLLM's ``fp8``) loads
  as it is.
- ``gguf``: exactly the projections (and embedding) the converted GGUF folder stores in
  Hearth's layout (Q8_0/Q4_0/Q4_1 repacked without loss; Q4_K/Q5_K/Q6_K with float16
  scales); the rest stay float.

A group size that doesn't divide a layer's inputs is refused here, before any weight
loads, naming the layer and the group sizes that fit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from engine.config import FLOAT_HEAD_METHODS, QUANT_HEAD_METHODS, check_group_size
from engine.errors import InvalidRequestError, UnsupportedModelError
from engine.quant.bnb import BNB_METHODS
from engine.quant.sources import Canonical, Published, QuantSource, rtn

#: Pre-quantized checkpoint formats (``engine.quant.formats``).
PUBLISHED = ("awq", "gptq", "compressed-tensors", "fp8")
#: int4 group sizes, in the order ``auto`` tries them.
INT4_GROUPS = (128, 64, 32)


@dataclass(frozen=True, slots=True)
class QuantPlan:
    """``method``: the resolved quantization (``none``, ``gguf``, ``int8``, ``int4``).
    ``sources``: checkpoint module name -> source (``gguf``); ``default``: the source of
    every decoder projection (RTN methods); ``head``: quantize embedding/head too."""

    method: str
    default: QuantSource | None = None
    sources: dict[str, QuantSource] = field(default_factory=dict)
    head: bool = False
    untied_head: QuantSource | None = None  # an untied LM head's source when not ``head``
    group_size: int | None = None  # asked for (None: auto)
    names: frozenset = frozenset()  # a pre-quantized checkpoint's tensor names

    @property
    def quantizes(self) -> bool:
        return self.method not in ("none", "bf16", "fp16")

    @property
    def published(self) -> bool:
        """Whether the weights come quantized in the checkpoint (a published format)."""
        return isinstance(self.default, Published)

    def transform(self) -> Callable[[nn.Module], None]:
        return lambda model: apply_plan(model, self)


def checkpoint_quantization(path: Path | None):
    """The ``CheckpointQuant`` of a pre-quantized checkpoint (AWQ, GPTQ, compressed-tensors:
    its config.json's ``quantization_config``, or GPTQ's quantize_config.json; a
    ``BnbCheckpoint`` for bitsandbytes), or None;
    anything Hearth can't read is refused naming the field."""
    import json

    from engine.quant.formats import parse_quantization_config

    if path is None or not Path(path).is_dir():
        return None
    try:
        cfg = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    extra = None
    qc_file = Path(path) / "quantize_config.json"
    if "quantization_config" not in cfg and qc_file.is_file():
        try:
            extra = json.loads(qc_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            extra = None
    return parse_quantization_config(cfg, str(Path(path) / "config.json"), extra)


def checkpoint_quant_method(path: Path | None, names: dict | None = None) -> str:
    """``gguf`` when the checkpoint holds Hearth-layout quantized tensors (a GGUF converted
    with its own weights kept); ``awq``, ``gptq``, ``compressed-tensors``, ``fp8`` or a
    bitsandbytes method (``bnb-nf4``, ``bnb-nf4-dq``, ``bnb-int8``) for a pre-quantized
    checkpoint; else ``none``."""
    if path is None:
        return "none"
    q = checkpoint_quantization(path)
    if q is not None:
        return q.method
    if names is None:
        from engine.loader.weights import read_metadata

        names = read_metadata(path)
    quantized = [n.removesuffix(".qweight") for n in names if n.endswith(".qweight")]
    if not quantized:
        return "none"
    base = quantized[0]
    if names[f"{base}.qweight"][1] in ("U8", "I8") and f"{base}.scales" in names and f"{base}.qzeros" not in names:
        return "gguf"  # Hearth's own layout: a GGUF converted with its quantized tensors kept
    raise UnsupportedModelError(
        f"{path}: tensor {base}.qweight is quantized but config.json has no quantization_config saying how "
        "(AWQ, GPTQ or compressed-tensors); add the checkpoint's quantization_config, or load its "
        "unquantized original.")


class AlreadyQuantizedError(InvalidRequestError):
    """A load asked another quantization of a pre-quantized checkpoint (``found``: how it is
    stored; ``hearth quantize`` says it its own way)."""

    def __init__(self, message: str, found: str = "") -> None:
        super().__init__(message, options=("quantization",))
        self.found = found

    def __reduce__(self):  # (pickled across the engine process: its two arguments)
        return type(self), (str(self), self.found)


def quantization_plan(method: str, path: Path | None, *, group_size: int | None = None,
                      head: bool = False, float_head: bool = False, names: dict | None = None) -> QuantPlan:
    """The plan of a load asking for ``method`` (a canonical registry name) of the
    checkpoint at ``path`` (None: random weights)."""
    if names is None and path is not None:
        from engine.loader.weights import read_metadata

        names = read_metadata(path)
    check_quant_flags(method, group_size, head, float_head)
    found = checkpoint_quant_method(path, names)
    if method == "auto":
        method = found
    if found in PUBLISHED:
        if method != found:
            raise AlreadyQuantizedError(
                f"this checkpoint is already quantized with {found}: load it as it is (--quant auto or "
                f"{found}), or load its unquantized original to use {method}.", found)
        from dataclasses import replace

        from engine.quant.sources import published

        q = checkpoint_quantization(path)
        if group_size is not None and group_size != q.group_size:
            raise InvalidRequestError(
                f"this checkpoint is already quantized with {found} in groups of {q.group_size or 'a whole row'}: "
                "a group size applies when Hearth quantizes the weights; drop --group-size (auto in the load "
                "dialog).", options=("quant_group_size",))
        source = published(q)
        # Optional tensors this checkpoint doesn't hold are not waited for: each layer is then
        # converted as soon as its required tensors arrive, as the checkpoint streams in.
        held = {n.rpartition(".")[2] for n in names}
        source = replace(source, optional=tuple(o for o in source.optional if o in held))
        return QuantPlan(found, default=source, names=frozenset(names))
    if method in BNB_METHODS or found in BNB_METHODS:  # bitsandbytes' own modules (engine.quant.bnb)
        from engine.quant.bnb import source_for

        source = source_for(method, found, checkpoint_quantization(path) if found in BNB_METHODS else None)
        return QuantPlan(method, default=source, names=frozenset(names or ()))
    if method in ("none", "bf16", "fp16"):
        if found == "gguf":  # loads of a kept-quantized folder always keep it (the loader picks the folder)
            method = "gguf"
        else:
            return QuantPlan(method)
    if method == "gguf":
        if found != "gguf":
            from engine.loader.gguf import SOURCE_FILE

            if path is not None and (Path(path) / SOURCE_FILE).is_file():  # a GGUF's conversion, nothing kept
                from engine.loader.gguf import kept_types

                raise InvalidRequestError(
                    "quantization 'gguf' keeps a GGUF file's own quantized weights, and this file has none in a "
                    f"type Hearth keeps ({', '.join(kept_types())}): its tensors are floats or a type that is "
                    "expanded on load. Load it with none, or int8 or int4 to quantize it.",
                    options=("quantization",))
            raise InvalidRequestError(
                "quantization 'gguf' keeps a GGUF file's own quantized weights: this model is not a GGUF "
                "file. Use int8 or int4 to quantize it, or none.", options=("quantization",))
        return QuantPlan("gguf", sources=_canonical_sources(names))
    if method in ("int8", "int4"):
        if found == "gguf":
            raise UnsupportedModelError("internal: int8/int4 of a GGUF load must read its float conversion")
        return QuantPlan(method, default=rtn(method, group_size) if method == "int8" or group_size else None,
                         head=head, group_size=group_size,
                         untied_head=None if head or float_head else rtn("int8"))
    if method == "fp8":
        if found == "gguf":
            raise UnsupportedModelError("internal: fp8 of a GGUF load must read its float conversion")
        return QuantPlan("fp8", default=rtn("fp8"), untied_head=None if float_head else rtn("fp8"))
    if method in ("awq", "gptq", "fp8-gptq"):
        raise InvalidRequestError(
            f"{method} of an unquantized model calibrates it first (hearth quantize --quant {method}, or a "
            f"native load): this one can't be calibrated here.", options=("quantization",))
    if method == "compressed-tensors":
        what = "a GGUF file" if found == "gguf" else "not pre-quantized"
        raise InvalidRequestError(
            "quantization 'compressed-tensors' loads a checkpoint stored that way (llm-compressor's W4A16/W8A16 "
            f"pack-quantized): this model is {what}. Use int4 or int8 to quantize it as it loads (hearth quantize "
            "--quant int4 writes it as a compressed-tensors checkpoint), or none.", options=("quantization",))
    raise InvalidRequestError(f"quantization {method!r} is not implemented yet: use int8, int4, gguf or none.",
                              options=("quantization",))


def check_quant_flags(method: str, group_size: int | None, head: bool, float_head: bool = False) -> None:
    """Refuse ``--group-size`` / ``--quant-head`` / ``--float-head`` with a method they
    don't apply to, and ``--quant-head`` with ``--float-head``."""
    if head and float_head:
        raise InvalidRequestError("--quant-head quantizes the LM head and --float-head keeps it in the model's "
                                  "dtype: choose one.", options=("quant_head", "float_head"))
    if head and method not in QUANT_HEAD_METHODS:
        what = ("fp8 keeps the embedding in the model's dtype and casts an untied head (--float-head keeps it)"
                if method == "fp8" else "fp8-gptq keeps the embedding and head in the model's dtype"
                if method == "fp8-gptq" else f"{method} keeps the embedding and head as the checkpoint has them")
        raise InvalidRequestError(f"--quant-head applies to int8 and int4; {what}.", options=("quant_head",))
    if float_head and method not in FLOAT_HEAD_METHODS:
        in_dtype = method in ("none", "bf16", "fp16", "fp8-gptq")
        what = ("auto keeps the head as the checkpoint has it" if method == "auto" else
                f"{method} keeps the head in the model's dtype" if in_dtype else
                f"{method} keeps the head as the checkpoint has it")
        raise InvalidRequestError(f"--float-head applies to int8, int4 and fp8 (which store an untied head "
                                  f"quantized); {what}: drop --float-head.", options=("float_head",))
    check_group_size(method, group_size)


def _canonical_sources(names: dict) -> dict[str, QuantSource]:
    """Checkpoint module name -> the Canonical source of its stored layout."""
    sources = {}
    for name, (shape, dtype) in names.items():
        if not name.endswith(".qweight"):
            continue
        base = name.removesuffix(".qweight")
        bits = 4 if dtype == "U8" else 8
        k = shape[1] * (2 if bits == 4 else 1)
        groups = names[f"{base}.scales"][0][1]
        has_mins = f"{base}.mins" in names
        parts = ("qweight", "scales", "mins") if has_mins else ("qweight", "scales")
        sources[base] = Canonical(bits, k // groups, parts=parts, optional=(), has_mins=has_mins,
                                  label=f"gguf {bits}-bit g{k // groups}")
    return sources


def _checkpoint_modules(name: str, module: nn.Module) -> list[str]:
    """The checkpoint module names whose tensors fill ``module`` (named ``name``)."""
    shards = getattr(module, "checkpoint_shards", None)
    if not shards:
        return [name]
    parent = name.rpartition(".")[0]
    return [f"{parent}.{ckpt}" if parent else ckpt for ckpt in shards]


def _widths(model: nn.Module) -> set[int]:
    """The decoder projections' input widths."""
    from engine.layers.linear import Linear, TiedLMHead

    return {m.in_features for n, m in model.named_modules()
            if isinstance(m, Linear) and not isinstance(m, TiedLMHead) and n != "lm_head"}


def auto_group(model: nn.Module) -> int:
    """The largest of 128/64/32 that divides every decoder projection's inputs."""
    widths = _widths(model)
    for g in INT4_GROUPS:
        if all(k % g == 0 for k in widths):
            return g
    raise InvalidRequestError(
        f"int4 needs each layer's input features to be a multiple of 32; this model has {sorted(widths)}: "
        "use int8.", options=("quantization",))


def apply_plan(model: nn.Module, plan: QuantPlan) -> None:
    """Replace ``model``'s projections (on the meta device) as ``plan`` says."""
    from engine.layers.embedding import VocabEmbedding
    from engine.layers.linear import Linear, TiedLMHead
    from engine.layers.modules import replace_module
    from engine.layers.quant_linear import HEAD_DEQUANT_ROWS, QuantizedLinear, QuantizedTiedHead, QuantizedVocabEmbedding
    from engine.quant.qweight import check_shape

    if not plan.quantizes:
        return
    if plan.method in BNB_METHODS:
        from engine.quant.bnb import apply

        return apply(model, plan.default, plan.names)
    default = plan.default
    if plan.method == "int4" and default is None:
        default = rtn("int4", auto_group(model))
    embed_source = None
    widths = _widths(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, TiedLMHead):
            continue  # follows its embedding, below
        if getattr(module, "vocab_parallel", False):  # a tensor-parallel rank's rows of the vocabulary
            if not getattr(module, "tied", False):  # (a tied head follows its embedding, below)
                source = _vocab_parallel_source(plan, default, name, module)
                if source is not None:
                    rows, cols = ((module.num_embeddings, module.embedding_dim) if isinstance(module, VocabEmbedding)
                                  else (module.out_features, module.in_features))
                    if _fp8_misfit(source, rows, cols):  # (only a checkpoint's own fp8 head gets here)
                        raise InvalidRequestError(
                            f"{name} is stored in fp8, whose products need rows in multiples of {FP8_ALIGN}, and "
                            f"tensor parallel gives each rank {rows} of its rows: use a rank count that gives "
                            "multiples of 16, or --split layer.", options=("devices", "split"))
                    _refuse_shape(source, name, rows, cols, check_shape)
                    replace_module(model, name, quantized_vocab_rows(module, source))
                    if isinstance(module, VocabEmbedding):
                        embed_source = source
            continue
        if isinstance(module, VocabEmbedding):
            if plan.method == "gguf":
                embed_source = plan.sources.get(name)
            elif plan.head:
                embed_source = default
            if embed_source is not None:
                _refuse_shape(embed_source, name, module.num_embeddings, module.embedding_dim, check_shape)
                replace_module(model, name, QuantizedVocabEmbedding(
                    module.num_embeddings, module.embedding_dim, embed_source, module.weight.dtype))
            continue
        if not isinstance(module, Linear):
            continue
        if plan.published:
            # Quantized exactly where the checkpoint stores quantized tensors (its ignore
            # list, a float head): any shard's quantized tensor tells (not only the first
            # shard's first: one of them missing is then reported as missing, not the others as
            # unexpected). A float layer has "weight" too, so that one doesn't.
            markers = [part for part in default.parts if part != "weight"]
            if not any(f"{shard}.{part}" in plan.names for shard in _checkpoint_modules(name, module)
                       for part in markers):
                continue
            source = default
        elif plan.method == "gguf":
            found = [plan.sources.get(c) for c in _checkpoint_modules(name, module)]
            if not any(found):
                continue
            if not all(found) or len(set(found)) > 1:
                raise UnsupportedModelError(f"{name}: its fused shards are stored in different forms")
            source = found[0]
        else:
            source = default
            if name == "lm_head" and not plan.head:
                if plan.untied_head is None or _fp8_misfit(plan.untied_head, module.out_features, module.in_features):
                    continue  # kept float (an fp8 head of 32,001 rows can't go through the fp8 GEMM)
                source = plan.untied_head
        _refuse_shape(source, name, module.out_features, module.in_features, check_shape, widths)
        quantized = QuantizedLinear.replacing(module, source)
        if name == "lm_head":  # its dequantize scratch would be the whole [vocab, hidden] matrix
            quantized.dequant_rows = HEAD_DEQUANT_ROWS
        replace_module(model, name, quantized)
    head = getattr(model, "lm_head", None)
    if embed_source is not None and isinstance(head, TiedLMHead):
        replace_module(model, "lm_head", QuantizedTiedHead(model.get_submodule(_embedding_name(model))))
    elif embed_source is not None and getattr(head, "tied", False):  # tensor parallel's
        from engine.layers.quant_parallel import QuantizedVocabParallelTiedHead

        replace_module(model, "lm_head", QuantizedVocabParallelTiedHead(model.get_submodule(_embedding_name(model))))


def _vocab_parallel_source(plan: QuantPlan, default: QuantSource | None, name: str,
                           module: nn.Module) -> QuantSource | None:
    """What a tensor-parallel rank's embedding or untied LM head (``module``, vocabulary
    rows) is quantized with: what one process would quantize the whole matrix with
    (None: float). Its rows are then one process's rows (``engine.layers.quant_parallel``)."""
    from engine.layers.embedding import VocabEmbedding

    if isinstance(module, VocabEmbedding):
        return plan.sources.get(name) if plan.method == "gguf" else default if plan.head else None
    if plan.published:
        return default if f"{name}.{default.parts[0]}" in plan.names else None
    if plan.method == "gguf":
        return plan.sources.get(name)
    if plan.head:
        return default
    source = plan.untied_head
    if source is None or any(_fp8_misfit(source, n, module.in_features) for n in (module.out_features, module.vocab)):
        return None  # kept float, as one process keeps it (fp8: rows a multiple of 16)
    return source


def quantized_vocab_rows(module: nn.Module, source: QuantSource) -> nn.Module:
    """The quantized twin of a tensor-parallel embedding or untied head."""
    from engine.layers.embedding import VocabEmbedding
    from engine.layers.quant_parallel import QuantizedVocabParallelEmbedding, QuantizedVocabParallelHead

    if isinstance(module, VocabEmbedding):
        return QuantizedVocabParallelEmbedding(module, source)
    return QuantizedVocabParallelHead(module, source)


def _embedding_name(model: nn.Module) -> str:
    from engine.layers.quant_linear import QuantizedVocabEmbedding

    return next(n for n, m in model.named_modules() if isinstance(m, QuantizedVocabEmbedding))


#: fp8's products on the tensor cores (``torch._scaled_mm``) need both sizes in multiples of this.
FP8_ALIGN = 16


def _fp8_misfit(source: QuantSource, n: int, k: int) -> bool:
    return source.fmt == "e4m3" and bool(n % FP8_ALIGN or k % FP8_ALIGN)


def _refuse_shape(source: QuantSource, name: str, n: int, k: int, check_shape,
                  widths: set[int] | None = None) -> None:
    if _fp8_misfit(source, n, k):
        raise InvalidRequestError(
            f"layer {name} ([{n} x {k}]): fp8's tensor-core products need both sizes in multiples of {FP8_ALIGN}: "
            "use int8 (the same size) instead.", options=("quantization",))
    problem = check_shape(source.bits, source.group_for(k), n, k)
    if problem and isinstance(source, Published):  # the checkpoint's own groups: no flag changes them
        raise UnsupportedModelError(
            f"layer {name} ([{n} x {k}]): {problem}, as the checkpoint's quantization_config.group_size says: the "
            "checkpoint doesn't fit the model's shape (a damaged or mismatched config.json?); download it again, "
            "or load the model's unquantized original.")
    if problem:
        # (a group size every projection takes: one that fits only this layer would be refused
        # at the next)
        fits = [g for g in INT4_GROUPS if k % g == 0 and all(w % g == 0 for w in (widths or ()))]
        hint = (f"pick a group size of {' or '.join(map(str, fits))} (--group-size), or leave it on auto"
                if fits else "use int8")
        raise InvalidRequestError(f"layer {name} ([{n} x {k}]): {problem}: {hint}.",
                                  options=("quant_group_size",))
