"""What ``Engine`` does at load time: check the choices, resolve the model, read its
tokenizer, then one call brings the runner up (``ModelRunner.create``: weights, kernel
plan, KV pool, CUDA graphs; ``HFRunner.create`` for the transformers fallback)."""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch

from engine.config import EngineConfig, step_budget
from engine.errors import HearthError, InvalidRequestError, UnsupportedModelError, stop_check
from engine.loader.choices import check_load_choices
from engine.loader.shape_model import (SHAPE_CALIBRATION_NOTE, SHAPE_PREFIX, SHAPE_SEED, TokenIdsOnlyTokenizer,
                                       is_shape_model, shape_model_config, shape_of_config)
from engine.model_info import ModelInfo
from engine.quant.export import CALIBRATED
from engine.quant.transform import checkpoint_quant_method
from engine.models.spec import ModelSpec, read_config
# Freeing a runner (an unload, a failed warm-up: llm_engine) lives with the runner.
from engine.runner.lifecycle import release_runner
from engine.tokenizer import Tokenizer

log = logging.getLogger("hearth.loader")


@dataclass(slots=True)
class LoadedModel:
    info: ModelInfo
    tokenizer: Tokenizer
    runner: Any
    max_model_len: int
    num_blocks: int
    prefix_caching: bool
    config: EngineConfig  # the load's config as it ran (the KV block size its backend needs)


@dataclass(slots=True)
class FoundModel:
    """A model found and its config read, nothing loaded yet (``load_model``'s first step,
    and all that ``check_model`` needs to size a load before making it)."""

    name: str
    path: Path | None  # None: a benchmark shape (no files)
    source: str
    cfg: dict[str, Any]
    config_source: str
    random_seed: int | None = None


def find_model(config: EngineConfig, say: Callable[[str], None], keep_quantized: bool | None = None,
               should_stop: Callable[[], bool] | None = None) -> FoundModel:
    """Resolve ``config.model`` (download, convert, validate) and read its config.
    ``keep_quantized`` (default: the load asks for ``auto`` or ``gguf``): a GGUF file's
    Q8_0/Q4_0/Q4_1 and Q4_K/Q5_K/Q6_K weights are kept in Hearth's quantized layout."""
    from engine.loader.resolve import resolve_model

    mc = config.model
    if is_shape_model(mc.model):
        # Benchmark shape: a named config with random weights, no files, no tokenizer.
        shape, cfg = shape_model_config(mc.model, mc.revision)
        name = f"{SHAPE_PREFIX}{shape}"
        if mc.force_fallback:
            raise InvalidRequestError(
                f"{name} has no checkpoint for the transformers fallback to load; drop force_fallback."
            )
        return FoundModel(name, None, "shape", cfg, f"engine.shapes[{shape!r}]", SHAPE_SEED)
    if mc.model is None or mc.model.strip():  # (a blank name is refused next: not "resolving model default")
        say(f"resolving model {mc.model or 'default'}")
    if keep_quantized is None:
        from engine.loader.resolve import is_gguf_file

        maybe_gguf = mc.model is None or mc.model.strip() == "default" or is_gguf_file(mc.model)
        keep_quantized = not mc.force_fallback and maybe_gguf and (
            mc.quantization == "gguf" or (mc.quantization == "auto" and auto_keeps_gguf(mc.device)))
    resolved = resolve_model(mc.model, mc.revision, progress=say, keep_quantized=keep_quantized,
                             should_stop=should_stop)
    cfg = resolved.config or read_config(resolved.path)
    shape = shape_of_config(cfg)
    if shape is not None:  # a folder written from a shape (calibrated): random weights, no tokenizer
        return FoundModel(f"{SHAPE_PREFIX}{shape}", resolved.path, "shape", cfg, str(resolved.path / "config.json"))
    return FoundModel(resolved.name, resolved.path, resolved.source, cfg, str(resolved.path / "config.json"))


def calibrated_path(found: FoundModel, config: EngineConfig) -> tuple[str, Path]:
    """(the source ``calibrated_model`` reads, the cache folder of its GPTQ/AWQ checkpoint)
    for ``found`` and the load's method and group size: keyed on the source's files (a
    random-weight shape: its name, config and seed), the calibration settings and text."""
    import hashlib
    import json

    from engine.paths import models_cache_dir
    from engine.quant.export import (CALIBRATION_SEQ_LEN, CALIBRATION_SEQUENCES, CALIBRATION_VERSION, GPTQ_DAMP,
                                     GPTQ_FP8_DAMP)
    from resources.texts import calibration_text_path

    mc = config.model
    if found.path is None:  # a shape: what it is, is its name, its config and its weights' seed
        source = found.name
        stamp = [found.name, json.dumps(found.cfg, sort_keys=True), f"seed {found.random_seed}"]
    else:
        source = str(found.path)
        stamp = [source] + [f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}"
                            for p in sorted(Path(found.path).glob("*")) if p.is_file()]
    stamp += [mc.quantization, str(mc.quant_group_size), str(CALIBRATION_SEQ_LEN), str(CALIBRATION_SEQUENCES),
              str(GPTQ_DAMP), CALIBRATION_VERSION,
              hashlib.sha256(calibration_text_path().read_bytes()).hexdigest()]
    if mc.quantization == "fp8-gptq":
        stamp.append(str(GPTQ_FP8_DAMP))
    cfg = found.cfg or {}
    if cfg.get("model_type") == "qwen2" or cfg.get("attention_bias") or cfg.get("mlp_bias"):
        # before 2026-12-07 the writer dropped a quantized projection's bias, and such a cached
        # checkpoint fails to load: a model with biases gets a new key (the others keep theirs)
        stamp.append("projection biases written")
    key = hashlib.sha256("\0".join(stamp).encode()).hexdigest()[:12]
    safe = "".join(c if c.isalnum() or c in "-._" else "-" for c in found.name)[:60]  # "shape:x" -> "shape-x"
    return source, models_cache_dir() / "calibrated" / f"{safe}-{mc.quantization}-{key}"


def calibrated(found: FoundModel, config: EngineConfig, say: Callable[[str], None],
               should_stop: Callable[[], bool] | None) -> FoundModel:
    """``found``'s float weights quantized with GPTQ or AWQ (``fp8-gptq``: GPTQ onto fp8) on
    the bundled calibration text, as a checkpoint in the models cache (made on the first such
    load, on the load's device; reused while the source's files are unchanged). A
    random-weight shape (no files) is keyed on its name, config and seed, and calibrated on
    the text's bytes (no tokenizer)."""
    from engine.quant.export import calibrated_model

    mc = config.model
    method, fp8 = CALIBRATED[mc.quantization]
    source, out = calibrated_path(found, config)
    if not (out / "config.json").is_file():
        say(f"{mc.quantization}: quantizing {found.name} with calibration (once; later loads reuse it)")
        try:
            calibrated_model(source, out, method=method, group_size=mc.quant_group_size, device=mc.device,
                             progress=say, should_stop=should_stop, fp8=fp8)
        except InvalidRequestError:
            if not (out / "config.json").is_file():  # not another process finishing it first
                raise
    return FoundModel(found.name, out, found.source, read_config(out), str(out / "config.json"))


def auto_keeps_gguf(device: str) -> bool:
    """Whether quantization ``auto`` runs a GGUF file on its own quantized weights on
    ``device``: where a fast kernel runs them (the Triton kernels on an Ampere+ GPU, the C
    kernel on an AVX2 CPU); elsewhere the dequantizing reference would be slower than the
    float weights, so ``auto`` loads those."""
    from engine import choices
    from engine.loader.choices import resolve_device

    target = resolve_device(device)
    if target.type == "cuda":
        return not choices.get("quantization", "gguf", str(target)).reasons
    from engine.layers.quant_kernels import cpu_kernel_unusable

    return cpu_kernel_unusable() is None


def native_spec(found: FoundModel, force_fallback: bool) -> tuple[ModelSpec | None, str | None]:
    """The model's native spec, or None and why it runs on the transformers fallback."""
    if force_fallback:
        return None, None
    try:
        return ModelSpec.from_config(found.cfg, source=found.config_source), None
    except UnsupportedModelError as e:
        return None, str(e)


def own_tokenizer(folder: str, found: FoundModel) -> Tokenizer:
    """The tokenizer in ``folder`` (the ``tokenizer`` load option) for ``found``: a
    random-weight shape (no files) takes its vocabulary size (``found.cfg`` is updated);
    a model with weights, a folder written from a shape too, must have an embedding row
    for every token the tokenizer makes."""
    from engine.loader.resolve import has_tokenizer_files

    path = Path(folder).expanduser()
    if path.is_file():  # (the folder's own message said a file that is there "does not exist")
        raise InvalidRequestError(f"--tokenizer {folder!r} is a file: give the folder that holds the tokenizer "
                                  f"files ({str(path.parent)!r}).", options=("tokenizer",))
    if path.is_dir() and not has_tokenizer_files(path):
        # (transformers' own message for an empty folder asks to install sentencepiece or tiktoken)
        raise InvalidRequestError(f"--tokenizer {folder!r} has no tokenizer files (tokenizer.json, or "
                                  "tokenizer.model / vocab files): give the folder that holds them.",
                                  options=("tokenizer",))
    try:
        tokenizer = Tokenizer.from_pretrained(path)
    except HearthError as e:
        raise InvalidRequestError(f"--tokenizer {folder!r}: {e}", options=("tokenizer",)) from None
    size = tokenizer.vocab_size
    if found.path is None:
        found.cfg = {**found.cfg, "vocab_size": size}
    elif size > int(found.cfg.get("vocab_size") or size):
        raise InvalidRequestError(
            f"the tokenizer in {folder!r} has {size:,} tokens but {found.name} has {found.cfg['vocab_size']:,} "
            "rows of embeddings: use that model's own tokenizer (leave out --tokenizer) or one of the same "
            "vocabulary.", options=("tokenizer",))
    return tokenizer


def context_length(cfg: dict[str, Any], max_model_len: int | None) -> int:
    """The load's context: ``max_model_len``, or the model's own maximum; refused when
    longer than the model's."""
    max_pos = int(cfg.get("max_position_embeddings") or cfg.get("n_positions") or 4096)
    if max_model_len is not None and max_model_len > max_pos:
        raise InvalidRequestError(
            f"a context of {max_model_len} tokens is longer than the model's ({max_pos}); "
            f"use at most {max_pos} (--max-model-len).", options=("max_model_len",),
        )
    return max_model_len or max_pos


def kv_block_size(attention: str, block_size: int) -> int:
    """The KV block size a load uses: the backend may need a multiple of its own."""
    from engine.layers.attention import get_backend

    multiple = get_backend(attention).required_block_multiple
    return multiple if block_size % multiple else block_size


def load_model(config: EngineConfig, progress: Callable[[str], None] | None = None,
               should_stop: Callable[[], bool] | None = None, *, writing: bool = False) -> LoadedModel:
    """Load ``config``'s model: check the choices, resolve the model, read its tokenizer,
    then bring its runner up in one call (``ModelRunner.create``, or ``HFRunner.create``
    for the transformers fallback: weights, KV pool, CUDA graphs). ``should_stop`` is asked
    between the stages and before each weight tensor; True stops the load
    (``LoadCancelledError``) and frees what it had taken. ``writing``: the load is only to
    write the weights out (``hearth quantize``; see ``check_load_choices``)."""
    say = progress or (lambda msg: log.info(msg))
    stop = stop_check(should_stop)
    mc, cc = config.model, config.cache
    choices = check_load_choices(config, writing=writing)  # before anything is resolved, read or loaded
    device, dtype = choices.device, choices.dtype
    for note in choices.notes:
        say(f"note: {note}")
    config = step_budget(config, device)  # the device's step budget where none was asked for
    found = find_model(config, say, should_stop=should_stop)
    stop()
    name, path, source, cfg = found.name, found.path, found.source, found.cfg
    # how the checkpoint's weights are stored; a malformed quantization_config is refused here,
    # naming its field, before transformers' tokenizer loading trips over it
    stored = checkpoint_quant_method(found.path)
    if path is not None and source != "shape":
        native_spec(found, mc.force_fallback)  # a damaged config.json, named, before the tokenizer trips over it
    if mc.tokenizer:
        tokenizer = own_tokenizer(mc.tokenizer, found)
        cfg = found.cfg
    elif path is None or source == "shape":  # a shape, or a folder written from one: no tokenizer
        tokenizer = TokenIdsOnlyTokenizer(cfg["vocab_size"], name)
    else:
        tokenizer = Tokenizer.from_pretrained(path)

    spec, native_error = native_spec(found, mc.force_fallback)
    if spec is None and stored == "gguf":
        # The transformers fallback reads float weights: the GGUF's float conversion.
        found = find_model(config, say, keep_quantized=False, should_stop=should_stop)
        path = found.path
    asked = config  # what LoadedModel keeps (loading it again gives this model)
    if mc.quantization in CALIBRATED and spec is not None and stored == "none":
        found = calibrated(found, config, say, should_stop)  # GPTQ/AWQ of float weights: calibrate once
        path = found.path
        # from here on a load of that checkpoint, whose groups are its own (a group size asked
        # for went into its calibration) and, for fp8-gptq, an fp8 checkpoint
        config = replace(config, model=replace(mc, quant_group_size=None, quantization=(
            "fp8" if mc.quantization == "fp8-gptq" else mc.quantization)))
        mc = config.model
    quantization = loaded_quantization(config, found.path, spec is not None, device, writing)
    max_model_len = context_length(cfg, mc.max_model_len)

    info: dict[str, Any] = {
        "name": name,
        # What was asked for (``"default"``, a repo id, a path): loading it again gives this model.
        "ref": (mc.model or "default").strip(),
        "path": None if path is None else str(path),
        "source": source,
        "model_type": cfg.get("model_type"),
        "vocab_size": int(cfg.get("vocab_size") or len(tokenizer)),
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "attention": choices.attention,
        "max_model_len": max_model_len,
        "implementation": "native" if spec is not None else "transformers-fallback",
    }
    kv_dtype = kv_cache_dtype(cc.kv_cache_dtype, dtype, spec is not None)
    info["kv_cache_dtype"] = str(kv_dtype).removeprefix("torch.")
    stop()
    if spec is None and mc.devices is not None:
        raise UnsupportedModelError(f"{name} has no native Hearth implementation ({native_error}), and a "
                                    f"{mc.split} split runs native models only: load it on one device "
                                    "(drop --devices).")
    if spec is None:
        info["fallback_reason"] = native_error or "forced with force_fallback"
        info["attention"] = "transformers"
        say(f"no native implementation ({info['fallback_reason']}); using the transformers fallback")
        from engine.runner.hf_runner import HFRunner

        runner = HFRunner.create(config, path, device=device, dtype=dtype, max_model_len=max_model_len,
                                 progress=say, should_stop=should_stop)
        prefix = False
    else:
        from engine.runner.bring_up import RandomWeights
        from engine.runner.model_runner import ModelRunner

        block_size = kv_block_size(info["attention"], cc.block_size)
        if block_size != cc.block_size:
            say(f"the {info['attention']} backend pages the KV cache in blocks of {block_size} tokens: "
                f"using block_size={block_size}")
            # A copy: the caller's config (the bench reuses one for several loads) stays as asked.
            config = replace(config, cache=replace(cc, block_size=block_size))
            cc = config.cache
        weights = path if found.random_seed is None else RandomWeights(found.random_seed)
        if mc.devices is not None and mc.split == "tensor":
            check_tensor_parallel_quant(quantization)
            from engine.runner.tp_host import bring_up_ranks

            runner = bring_up_ranks(config, spec, weights, device=device, dtype=dtype, kv_dtype=kv_dtype,
                                    attention=info["attention"], max_model_len=max_model_len, progress=say,
                                    should_stop=should_stop)
        else:
            runner = ModelRunner.create(config, spec, weights, device=device, dtype=dtype, kv_dtype=kv_dtype,
                                        attention=info["attention"], max_model_len=max_model_len,
                                        progress=say, should_stop=should_stop)
        prefix = cc.enable_prefix_caching
    try:  # strictly: a field name the runner misspelt is an error here, not a silent drop
        detail = quantization_detail(quantization, runner, found.path)
        if asked.model.quantization == "fp8-gptq" and quantization == "fp8":
            quantization, detail = "fp8-gptq", f"{detail}, GPTQ-rounded"
        made_by = found.cfg.get("hearth_quantized") or {}
        if source == "shape" and (made_by.get("method") in ("awq", "gptq") or made_by.get("rounding") == "gptq"):
            detail = f"{detail} ({SHAPE_CALIBRATION_NOTE})"  # nobody should read quality into it
        model_info = ModelInfo(**{**info, **runner.load_info, "quantization": quantization, "quant_detail": detail})
    except BaseException:
        release_runner(runner)
        raise
    return LoadedModel(model_info, tokenizer, runner, max_model_len, runner.num_blocks, prefix,
                       replace(config, model=asked.model))


def check_tensor_parallel_quant(quantization: str) -> None:
    """Tensor parallel shards every quantization Hearth reads into its canonical layout
    (int8/int4/fp8 on load, AWQ/GPTQ/compressed-tensors/fp8 checkpoints, a GGUF's
    projections, a quantized embedding and LM head by vocabulary rows:
    ``engine.runner.tensor_parallel.shard_quantized``, ``engine.layers.quant_parallel``);
    bitsandbytes (its own modules) is refused with what to load instead."""
    if quantization.startswith("bnb-"):
        raise InvalidRequestError(
            f"tensor parallel can't shard bitsandbytes' {quantization} layers (they are bitsandbytes' own "
            "modules): load with --quant none, int8 or int4, or use --split layer.", options=("quantization", "split"))


def loaded_quantization(config: EngineConfig, path: Path | None, native: bool, device: torch.device | None = None,
                        writing: bool = False) -> str:
    """The quantization a load of ``config`` runs (``auto`` resolved: ``gguf`` for a GGUF
    file's kept weights, a pre-quantized checkpoint's own, else ``none``); refused where the
    model runs on the fallback, and, when ``auto`` resolved to a quantization that can't run
    on ``device`` (an fp8 checkpoint on the CPU), with what to load instead."""
    from engine import choices
    from engine.quant.transform import quantization_plan

    mc = config.model
    if not native:
        if mc.quantization not in ("auto", "none", "bf16", "fp16"):
            raise InvalidRequestError(
                f"quantization {mc.quantization!r} needs Hearth's native model code; this model runs on the "
                "transformers fallback: load it unquantized (--quant none).", options=("quantization",))
        return "none"
    method = quantization_plan(mc.quantization, path, group_size=mc.quant_group_size, head=mc.quant_head,
                               float_head=mc.float_head).method
    if device is not None and method != mc.quantization and not (writing and method in choices.WRITABLE_ANYWHERE):
        reasons = choices.get("quantization", method, str(device)).reasons
        if reasons:
            what = f"is quantized with bitsandbytes ({method})" if method.startswith("bnb-") else \
                f"stores its weights as {method}"
            raise InvalidRequestError(
                f"this checkpoint {what}, which can't run here: {'; '.join(reasons)}. Load the model's "
                "unquantized original and pick a quantization that runs here (--quantization).", options=("quantization",))
    return method


def quantization_detail(quantization: str, runner, path: Path | None) -> str | None:
    """What a quantized load holds, in words (``ModelInfo.quant_detail``): its layers by
    bits and group, and for a GGUF file which of its types were kept or dequantized."""
    if quantization in ("none", "bf16", "fp16"):
        return None
    forms: dict[str, int] = {}
    for module in runner.model.modules():
        key = getattr(module, "quant_form", None)  # a bitsandbytes projection names its own
        if key is None and hasattr(module, "qweight") and getattr(module, "checkpoint_params", ()):
            g = "channel" if module.group_size == module.in_features else f"g{module.group_size}"  # a tied head:
            key = f"fp8 e4m3 {g}" if module.fmt == "e4m3" else f"int{module.bits} {g}"  # its embedding
        if key is not None:
            forms[key] = forms.get(key, 0) + 1
    text = ", ".join(f"{n} x {k}" for k, n in sorted(forms.items()))
    if quantization == "gguf" and path is not None:
        from engine.loader.gguf import quant_detail

        gguf = quant_detail(path)
        text = f"{text}; {gguf}" if gguf else text
    return text or None


def kv_cache_dtype(name: str, dtype: torch.dtype, native: bool) -> torch.dtype:
    """The KV cache's element type for ``kv_cache_dtype`` (auto: the model's dtype), or a
    clear error where an fp8 cache can't be used with this model (the backend and device
    were checked with the other choices, before the load)."""
    if name == "auto":
        return dtype
    if not native:
        raise InvalidRequestError(
            "an fp8 KV cache needs Hearth's native model code; this model runs on the "
            "transformers fallback, which keeps its own cache: load it with kv_cache_dtype=auto.")
    return torch.float8_e4m3fn


def return_freed_memory(collect: bool = False) -> None:
    """Hand memory freed by an unload back to the system: CUDA's cached blocks to the
    driver, and glibc's free heap pages to the OS (``malloc_trim``; without it the RSS of
    a CPU model stays put after unloading). ``collect`` first runs the cyclic garbage
    collector; only do that on a thread where collecting others' garbage is safe (the
    desktop app's GUI thread)."""
    if collect:
        gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    _malloc_trim()


def _malloc_trim() -> None:
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim  # glibc only (not musl)
    except (OSError, AttributeError):
        return
    trim.argtypes = [ctypes.c_size_t]
    trim(0)
