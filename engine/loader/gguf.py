"""Converting a GGUF file into a Hugging Face format folder.

Hearth's loader reads one format (config.json + safetensors + tokenizer files). GGUF files
(llama.cpp's format, e.g. the bundled default model) are converted once through
transformers' GGUF reader, which dequantizes the weights and un-permutes q/k projections.
With ``keep_quantized`` (the ``gguf`` quantization, the default for GGUF files) the
Q8_0/Q4_0/Q4_1 tensors are instead repacked without loss into Hearth's canonical layout
(Q4_K/Q5_K/Q6_K too, their scales and mins rounded once to float16: ``engine.quant.gguf_kquants``)
(``<module>.qweight``/``.scales``/``.mins``; ``engine.quant.gguf_blocks``), their rows
reordered exactly as transformers' reader reorders the dequantized ones; other types
(K-quants, F16) are written as floats. The result is cached; ``hearth_source.json`` records
which file it came from (and how it was converted) so a changed GGUF file is noticed and
converted again.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import functools
import glob
import json
import os
import queue
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import torch

from engine.errors import LoadCancelledError, ModelLoadError, UnsupportedModelError, stop_check
from engine.loader.gguf_check import truncation_problem

#: Marker written last into a converted folder; describes the source GGUF file.
SOURCE_FILE = "hearth_source.json"
# Bump when the converted layout changes so old conversions are redone (4: a q/k/v of Q4_K
# and Q6_K members is kept, as int8 in groups of 16 with mins, instead of float; 5: the
# file's RoPE scaling and end-of-turn tokens are carried over, which transformers' reader drops).
_FORMAT_VERSION = 5
_GGUF_MAGIC = b"GGUF"


def _dtype_name(dtype: torch.dtype | None) -> str:
    return "as-file" if dtype is AS_FILE else str(dtype).removeprefix("torch.")


_FP16_MAX = 65504.0


def _stored_dtype(tensor: torch.Tensor, source_type: str | None) -> torch.dtype:
    """The dtype a float (not kept quantized) tensor is written in: what loses nothing of the
    file's values, in the fewest bytes. float32 for the file's F32 tensors and for 1-D ones
    (norms, biases: tiny); bfloat16 / float16 for BF16 / F16 (exact); float16 for a quantized
    type's dequantized values (its block scales are float16, so float16 holds them closer than
    bfloat16 at the same size; float32 past float16's range); a tensor of unknown source by
    its values (float16 where that is exact, float32 otherwise)."""
    if tensor.dim() < 2 or source_type in ("F32", "F64") or (source_type or "").startswith("I"):
        return torch.float32  # (F64 and integer tensors: nothing smaller holds them)
    if source_type == "BF16" or tensor.dtype == torch.bfloat16:
        return torch.bfloat16
    if source_type == "F16" or tensor.dtype == torch.float16:
        return torch.float16
    fits = bool(torch.isfinite(tensor).all()) and float(tensor.abs().max()) < _FP16_MAX
    if source_type is not None:  # a quantized type, dequantized
        return torch.float16 if fits else torch.float32
    return torch.float16 if fits and torch.equal(tensor.to(torch.float16).to(tensor.dtype), tensor) else torch.float32


#: ``convert_gguf``'s dtype that stores each tensor as the file holds it (``_stored_dtype``)
AS_FILE = None


def source_record(gguf_path: Path, dtype: torch.dtype | None, keep_quantized: bool = False) -> dict:
    """Return what ``hearth_source.json`` should hold for ``gguf_path`` converted to ``dtype``
    (``AS_FILE``: each tensor as the file holds it)."""
    st = gguf_path.stat()
    return {
        "format_version": _FORMAT_VERSION,
        "source": str(gguf_path.resolve()),
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "dtype": _dtype_name(dtype),
        "keep_quantized": keep_quantized,
        # which types a kept conversion keeps: a conversion made when fewer were kept is redone
        "kept_types": kept_types() if keep_quantized else None,
    }


def kept_types() -> list[str]:
    from engine.quant.gguf_blocks import KEPT_TYPES
    from engine.quant.gguf_kquants import KEPT_KQUANT_TYPES

    return [*KEPT_TYPES, *KEPT_KQUANT_TYPES]


def is_up_to_date(out_dir: Path, gguf_path: Path, dtype: torch.dtype | None = AS_FILE,
                  keep_quantized: bool = False) -> bool:
    """Whether ``out_dir`` holds a finished conversion of the current ``gguf_path`` in ``dtype``.

    Compares size, mtime and dtype (not the path, so a moved but identical file is reused).
    """
    try:
        recorded = json.loads((out_dir / SOURCE_FILE).read_text(encoding="utf-8"))
        current = source_record(gguf_path, dtype, keep_quantized)
    except (OSError, ValueError):
        return False
    keys = ("format_version", "size", "mtime_ns", "dtype", "keep_quantized", "kept_types")
    return isinstance(recorded, dict) and all(recorded.get(k) == current[k] for k in keys)


def _check_readable(gguf_path: Path) -> None:
    if not gguf_path.is_file():
        raise ModelLoadError(f"no such GGUF file: {gguf_path}")
    try:
        with gguf_path.open("rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise ModelLoadError(f"cannot read GGUF file {gguf_path}: {exc.strerror or exc}") from exc
    if magic != _GGUF_MAGIC:
        raise ModelLoadError(
            f"{gguf_path} is not a GGUF file (it does not start with the 'GGUF' magic bytes). "
            "Check the path, or download the file again if it is damaged."
        )
    # A cut-off file fails in the reader like an unsupported model would: say what it is.
    problem = truncation_problem(gguf_path)
    if problem is not None:
        raise ModelLoadError(f"cannot read GGUF file {gguf_path}: {problem}")


def unsupported_tensor_types(gguf_path: Path) -> list[tuple[str, str]]:
    """(tensor name, type) of each tensor stored in a type the gguf package can't
    dequantize (read from the header; the data is not touched). Empty when the header
    can't be read (the reader's own error says why then)."""
    try:
        import gguf
        from gguf import quants

        reader = gguf.GGUFReader(str(gguf_path))
    except Exception:  # noqa: BLE001 - damaged files are reported by the caller's error
        return []
    readable = set(getattr(quants, "_type_traits", {})) | {gguf.GGMLQuantizationType.F32,
                                                            gguf.GGMLQuantizationType.F16}
    return [(t.name, t.tensor_type.name) for t in reader.tensors if t.tensor_type not in readable]


PROGRESS_EVERY_S = 0.5  # how often a conversion says how far it is


class _TensorSteps:
    """Stands in for ``tqdm`` in transformers' GGUF reader (which dequantizes the file's
    tensors in one call, one ``tqdm`` step each): every tensor asks ``check`` (a cancel
    raises there: the worker's of ``_on_worker``, once the conversion waiting on the read was
    cancelled) and, at most every half second, reports ``Converting NAME: i/n tensors``.
    transformers imports ``tqdm`` into that module by name (``_StepsDispatch`` stands in for
    it); where a version doesn't, the reader runs as it is and a cancel waits for its end."""

    def __init__(self, name: str, progress: Callable[[str], None] | None, check: Callable[[], None]):
        self.name, self.progress, self.check = name, progress, check

    def __call__(self, iterable, *args, **kwargs):
        items = list(iterable)
        last = time.monotonic()
        for i, item in enumerate(items):
            self.check()
            if self.progress and time.monotonic() - last >= PROGRESS_EVERY_S:
                self.progress(f"Converting {self.name}: {i}/{len(items)} tensors")
                last = time.monotonic()
            yield item
        self.check()


_steps = threading.local()  # this thread's _TensorSteps while it reads a GGUF
_steps_lock = threading.Lock()  # (putting the dispatches in place; _abandoned)


class _StepsDispatch:
    """Put once in place of transformers' ``tqdm`` (a module global, so shared by every
    thread): a thread converting a GGUF gets its own ``_TensorSteps``; anything else, the
    ``tqdm`` transformers had."""

    def __init__(self, original) -> None:
        self.original = original

    def __call__(self, iterable, *args, **kwargs):
        steps = getattr(_steps, "current", None)
        return steps(iterable) if steps is not None else self.original(iterable, *args, **kwargs)


class _MapDispatch:
    """Put once in place of transformers' ``get_gguf_hf_weights_map``, which maps the file's
    tensor names before the first tensor is read by calling itself (by its module-global name)
    for every submodule, each call taking the module's ``state_dict`` (torch calls that let go
    of the GIL; seconds on a slow machine): a thread converting a GGUF asks its
    ``_TensorSteps``' check at each call, so a read abandoned there stops at the next one
    rather than running on into torch while the process exits (which aborts it: "terminate
    called without an active exception"); anything else, the function as it is."""

    def __init__(self, original) -> None:
        self.original = original
        functools.update_wrapper(self, original)

    def __call__(self, *args, **kwargs):
        steps = getattr(_steps, "current", None)
        if steps is not None:
            steps.check()
        return self.original(*args, **kwargs)


@contextlib.contextmanager
def _reader_steps(steps: _TensorSteps):
    """``steps`` drives this thread's GGUF read (other threads' reads keep theirs)."""
    with _this_thread_only("tqdm", _StepsDispatch, _steps, steps), \
            _this_thread_only("get_gguf_hf_weights_map", _MapDispatch, _steps, steps):
        yield


@contextlib.contextmanager
def _this_thread_only(attr: str, dispatch: type, local: threading.local, value):
    """Set ``local.current`` to ``value`` for this thread while transformers' GGUF reader's
    ``attr`` is a ``dispatch`` (installed once, for every thread) that consults it."""
    import transformers.modeling_gguf_pytorch_utils as reader

    with _steps_lock:
        present = getattr(reader, attr, None)
        if present is not None and not isinstance(present, dispatch):
            setattr(reader, attr, dispatch(present))
    outer = getattr(local, "current", None)
    local.current = value
    try:
        yield
    finally:
        local.current = outer


POLL_S = 0.1  # how often a wait on a read running on a worker thread asks should_stop
EXIT_WAIT_S = 3.0  # how long a process exiting waits for reads it abandoned (see _wait_for_abandoned)
_abandoned: set[threading.Thread] = set()


def _on_worker(check: Callable[[], None], work, progress: Callable[[str], None] | None = None):
    """Return ``work(worker_check, say)``, run on a daemon thread while this one waits, asking
    ``check`` every ``POLL_S`` seconds: the reads of a GGUF (gguf's and transformers' parse of
    its metadata, ~10 s for a 49k-token vocabulary on a slow machine; transformers' tokenizer
    built in Python) can't be interrupted where they run, so a cancel doesn't wait for them.

    A cancel (``check`` raising) returns at once; the thread is abandoned: Python can't stop
    it, so it runs on to its end (or to its next ``worker_check``, which raises once it is
    abandoned) and what it returns or raises is dropped. Works run this way only read (the
    file, and into memory): the conversion writes nothing before they return, so an abandoned
    one can't touch an output folder, and it shares nothing with a later conversion (each has
    its own threads, parse cache and ``_TensorSteps``). Callbacks stay on this thread:
    ``should_stop`` is asked here only, and what the work ``say``s is passed on to
    ``progress`` here (dropped once abandoned)."""
    done, gone = threading.Event(), threading.Event()
    said: queue.SimpleQueue[str] = queue.SimpleQueue()
    outcome: dict = {}

    def worker_check() -> None:
        if gone.is_set():
            raise LoadCancelledError("loading cancelled (abandoned)")

    def run() -> None:
        try:
            outcome["result"] = work(worker_check, said.put)
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
            outcome["error"] = exc
        finally:
            done.set()
            with _steps_lock:
                _abandoned.discard(threading.current_thread())

    def relay() -> None:
        while progress is not None and not said.empty():
            progress(said.get_nowait())

    thread = threading.Thread(target=run, name="hearth-gguf-read", daemon=True)
    thread.start()
    try:
        while not done.wait(POLL_S):
            relay()
            check()
        relay()
    except BaseException:
        gone.set()
        with _steps_lock:
            _abandoned.difference_update([t for t in _abandoned if not t.is_alive()])
            if thread.is_alive():
                _abandoned.add(thread)
        raise
    error = outcome.pop("error", None)
    if error is not None:
        raise error
    return outcome.pop("result")


@atexit.register
def _wait_for_abandoned() -> None:
    """At the interpreter's exit, give reads abandoned by a cancel a moment to end (a tensor
    read ends at its next tensor): a daemon thread still inside a torch op when the
    interpreter finalizes can abort the process ("terminate called without an active
    exception"). Bounded: a read still parsing is left to the exit (pure Python there)."""
    deadline = time.monotonic() + EXIT_WAIT_S
    with _steps_lock:
        threads = list(_abandoned)
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))


_parsed = threading.local()  # this thread's _ParsedOnce while it reads a GGUF's config and tokenizer


class _ParsedOnce:
    """transformers' metadata parse (``load_gguf_checkpoint(path, return_tensors=False)``) of
    one conversion's file, made by its first caller and copied out to the later ones."""

    def __init__(self, gguf_path: Path) -> None:
        self.path, self.result = Path(gguf_path).resolve(), None


class _ParseOnceDispatch:
    """Put once in place of transformers' ``load_gguf_checkpoint`` (a module global that
    ``AutoConfig`` and ``AutoTokenizer`` import when called): each of them parses the whole
    file's metadata for the config (the tokenizer to pick its class), the same ~10 s twice.
    A thread reading a conversion's config and tokenizer (``_parse_once``) gets its file's
    parse made once and deep-copied (a fresh parse's equal, each caller free to change its
    own); anything else, and a call with tensors, the reader as it is. (Where a transformers
    version imports it at its module's import instead, each call parses, as before.)"""

    def __init__(self, original) -> None:
        self.original = original
        functools.update_wrapper(self, original)

    def __call__(self, path, *args, **kwargs):
        once = getattr(_parsed, "current", None)
        if once is None or args not in ((), (False,)) or kwargs not in ({}, {"return_tensors": False}):
            return self.original(path, *args, **kwargs)
        try:
            same = Path(path).resolve() == once.path
        except (TypeError, OSError):
            same = False
        if not same:
            return self.original(path, *args, **kwargs)
        if once.result is None:  # (the config and the tokenizer are read one after the other)
            once.result = self.original(path, *args, **kwargs)
        return copy.deepcopy(once.result)


def _parse_once(once: _ParsedOnce):
    """This thread's reads of ``once.path`` through transformers share ``once``'s parse."""
    return _this_thread_only("load_gguf_checkpoint", _ParseOnceDispatch, _parsed, once)


def _read_gguf(gguf_path: Path, progress: Callable[[str], None] | None = None,
               check: Callable[[], None] = lambda: None):
    """Return ``(config, tokenizer, state_dict)`` read by transformers' GGUF reader;
    ``check`` is called every ``POLL_S`` seconds while it reads (it raises to stop)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    folder, name = str(gguf_path.parent), gguf_path.name
    hint = (
        "Use the model's Hugging Face (safetensors) repo instead: pass its repo id "
        "(owner/name) as the model, or use a GGUF of an architecture transformers supports "
        "(llama, mistral, qwen2, ...)."
    )
    # Each read runs on a worker thread while this one asks ``check`` (``_on_worker``); the
    # config and the tokenizer share one parse of the file's metadata (``_parse_once``).
    once = _ParsedOnce(gguf_path)

    def read_config(_worker_check, _say):
        with _parse_once(once):
            return AutoConfig.from_pretrained(folder, gguf_file=name)

    def read_tokenizer(_worker_check, _say):
        with _parse_once(once):
            return AutoTokenizer.from_pretrained(folder, gguf_file=name)

    def read_tensors(worker_check, say):
        with _reader_steps(_TensorSteps(gguf_path.name, say if progress else None, worker_check)):
            return load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=model)["tensors"]

    try:
        cfg = _on_worker(check, read_config)
    except LoadCancelledError:
        raise
    except ValueError as exc:
        if "not supported" in str(exc):
            raise UnsupportedModelError(
                f"cannot convert {gguf_path}: {exc} (transformers' GGUF reader does not know this "
                f"architecture). {hint}"
            ) from exc
        raise ModelLoadError(f"cannot read GGUF file {gguf_path}: {exc}. {hint}") from exc
    except Exception as exc:  # the reader fails in many ways on damaged files
        raise ModelLoadError(
            f"cannot read GGUF file {gguf_path}: {type(exc).__name__}: {exc}. The file may be "
            f"truncated or corrupt; download it again. {hint}"
        ) from exc

    try:
        tok = _on_worker(check, read_tokenizer)
        check()
        # Build on the meta device: we only need parameter names and shapes, not memory.
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
        tensors = _on_worker(check, read_tensors, progress)
    except LoadCancelledError:
        raise
    except Exception as exc:
        unsupported = unsupported_tensor_types(gguf_path)
        if unsupported:
            shown = ", ".join(f"{name} ({kind})" for name, kind in unsupported[:3])
            more = f" and {len(unsupported) - 3} more" if len(unsupported) > 3 else ""
            kinds = sorted({kind for _name, kind in unsupported})
            raise UnsupportedModelError(
                f"cannot convert GGUF file {gguf_path}: tensor {shown}{more} is stored as {'/'.join(kinds)}, a "
                f"type Hearth's GGUF reader (the gguf package) cannot read. Use another quantization of the "
                f"model (Q4_K_M, Q5_K_M, Q8_0 or F16 files are read), or its Hugging Face repo.") from exc
        text = str(exc).rstrip(".")
        if "Cannot build a tokenizer" in text:  # no tokenizer.ggml.model, or one transformers can't build
            raise UnsupportedModelError(
                f"cannot convert GGUF file {gguf_path}: it has no tokenizer Hearth can read ({text}). "
                f"{hint}") from exc
        raise ModelLoadError(
            f"cannot convert GGUF file {gguf_path}: {type(exc).__name__}: {text}. The file may be "
            f"truncated, corrupt or use an unsupported quantization. {hint}"
        ) from exc

    # Every parameter must come from the file, except an output head tied to the embeddings.
    expected = set(model.state_dict().keys())
    tied = {"lm_head.weight"} if getattr(cfg, "tie_word_embeddings", False) else set()
    missing = sorted(expected - set(tensors) - tied)
    if missing:
        raise ModelLoadError(
            f"GGUF file {gguf_path} lacks {len(missing)} tensors the model needs "
            f"(e.g. {', '.join(missing[:3])}); it is incomplete or of an unexpected layout. {hint}"
        )
    return cfg, tok, tensors


def _field(reader, key: str):
    """A GGUF metadata value (a number or a string), or None when the file has no such key."""
    field = reader.fields.get(key)
    if field is None:
        return None
    value = field.contents()
    return value.decode() if isinstance(value, bytes) else value


def _config_rope(cfg) -> dict:
    """cfg's RoPE settings as one dict (transformers 5's ``rope_parameters``, else 4.x's
    ``rope_theta`` + ``rope_scaling``)."""
    params = dict(getattr(cfg, "rope_parameters", None) or {})
    params.update(getattr(cfg, "rope_scaling", None) or {})
    params.setdefault("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    return params


def _set_config_rope(cfg, scaling: dict) -> None:
    if getattr(cfg, "rope_parameters", None) is not None:
        cfg.rope_parameters = {**cfg.rope_parameters, **scaling}
    else:
        cfg.rope_scaling = scaling


#: llama.cpp's Llama 3 factors are found among these (original context, low and high
#: frequency factors); Llama 3.1, 3.2 and 3.3 use 8192, 1 and 4
_LLAMA3_GRID = [(old, low, high) for old in (8192, *(2 ** p for p in range(8, 18) if p != 13))
                for low in (1.0, 0.5, 2.0) for high in (4.0, 2.0, 8.0)]


def _llama3_scaling(factors: torch.Tensor, theta: float, head_dim: int) -> dict | None:
    """The ``llama3`` rope_scaling whose per-pair frequency divisors are ``factors`` (the
    ``rope_freqs`` tensor llama.cpp's converter writes for Llama 3.1+ instead of metadata),
    found by computing each candidate's frequencies as the model runs them; None if none
    gives them (to float32 precision)."""
    from engine.layers.rope_spec import RopeSpec
    from engine.layers.rotary import inv_frequencies

    want = inv_frequencies(RopeSpec(theta=theta), head_dim) / factors
    factor = float(factors.max())
    for old, low, high in _LLAMA3_GRID:
        spec = RopeSpec(theta=theta, type="llama3", factor=factor, low_freq_factor=low, high_freq_factor=high,
                        original_max_position=old)
        if torch.allclose(inv_frequencies(spec, head_dim), want, rtol=2e-6, atol=0):
            return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
                    "original_max_position_embeddings": old}
    return None


def _rope_scaling(reader, cfg, gguf_path: Path) -> dict | None:
    """The RoPE scaling the file stores and transformers' GGUF reader leaves out of the
    config: llama.cpp writes Llama 3.1+'s as a ``rope_freqs`` tensor of per-pair divisors,
    others as ``{arch}.rope.scaling.*`` metadata. None: the file has none (or the config
    already has it). Raises UnsupportedModelError for a scaling Hearth can't reproduce."""
    have = _config_rope(cfg)
    if (have.get("rope_type") or have.get("type") or "default") != "default":
        return None
    arch = _field(reader, "general.architecture") or ""
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if freqs is not None:
        factors = torch.from_numpy(freqs.data.astype("float32").reshape(-1).copy())
        if factors.numel() != head_dim // 2:
            raise UnsupportedModelError(
                f"{gguf_path.name}: its rope_freqs tensor has {factors.numel()} factors where the model's "
                f"heads have {head_dim // 2} frequency pairs (a partial rotary embedding, or a layout Hearth "
                "doesn't know), so the model can't run as the file intends. Use the model's Hugging Face repo "
                "instead.")
        if bool((factors == 1).all()):
            return None
        found = _llama3_scaling(factors, float(have["rope_theta"]), head_dim)
        if found is None:
            raise UnsupportedModelError(
                f"{gguf_path.name}: its rope_freqs tensor (per-pair RoPE frequency factors, up to "
                f"{float(factors.max()):g}) doesn't follow Llama 3's scaling, the one Hearth reproduces, so "
                "the model can't run as the file intends. Use the model's Hugging Face repo instead.")
        return found
    kind = _field(reader, f"{arch}.rope.scaling.type")
    factor = _field(reader, f"{arch}.rope.scaling.factor")
    if kind in (None, "none") or factor in (None, 0, 1):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(factor)}
    if kind == "yarn":  # transformers runs it (Hearth's native models don't: the labelled fallback)
        out = {"rope_type": "yarn", "factor": float(factor)}
        old = _field(reader, f"{arch}.rope.scaling.original_context_length")
        if old:
            out["original_max_position_embeddings"] = int(old)
        for key in ("beta_fast", "beta_slow"):
            value = _field(reader, f"{arch}.rope.scaling.yarn_{key}")
            if value:
                out[key] = float(value)
        return out
    raise UnsupportedModelError(
        f"{gguf_path.name}: its RoPE scaling {kind!r} ({arch}.rope.scaling.type) is not one Hearth or "
        "transformers' GGUF conversion runs (linear, yarn and Llama 3's are). Use the model's Hugging Face "
        "repo instead.")


def _end_ids(reader) -> list[int]:
    """The tokens that end generation by the file's tokenizer metadata: end of sequence and
    llama.cpp's end of turn / end of message (Llama 3's <|eot_id|>, <|eom_id|>), which
    transformers' reader drops; each once, in that order."""
    ids = []
    for key in ("eos", "eot", "eom"):
        value = _field(reader, f"tokenizer.ggml.{key}_token_id")
        if value is not None and int(value) not in ids:
            ids.append(int(value))
    return ids


def remove_stale_temps(out_dir: Path) -> None:
    """Delete the temporary folders (``.NAME.tmp-PID-...``) that conversions into ``out_dir``
    left when their process was killed (SIGKILL, the terminal closed, out of memory), which no
    ``finally`` removed: each can hold gigabytes of half-written weights. A folder whose
    process still runs is another conversion at work and is left alone."""
    for old in out_dir.parent.glob(f".{glob.escape(out_dir.name)}.tmp-*"):
        pid = old.name.rsplit(".tmp-", 1)[1].split("-", 1)[0]
        if not pid.isdigit() or _process_alive(int(pid)):
            continue
        shutil.rmtree(old, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    if pid == os.getpid() or os.name != "posix":  # (Windows' os.kill(pid, 0) would end it)
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # (PermissionError: someone else's process)
        return True
    return True


def convert_gguf(
    gguf_path: Path,
    out_dir: Path,
    dtype: torch.dtype | None = AS_FILE,
    *,
    progress: Callable[[str], None] | None = None,
    keep_quantized: bool = False,
    should_stop: Callable[[], bool] | None = None,
) -> Path:
    """Convert a GGUF file into a Hugging Face format folder at ``out_dir`` and return it.

    Writes ``config.json``, ``model.safetensors`` (float weights cast to ``dtype``; by default
    each in the dtype that holds the file's values, ``_stored_dtype``), the tokenizer
    files (with the chat template when the GGUF has one) and ``hearth_source.json``. The
    work happens in a temporary folder beside ``out_dir`` that is renamed into place at the
    end, so an interrupted conversion never leaves a half-written model; an existing
    ``out_dir`` is replaced.

    ``should_stop`` is asked between the stages and, while the file is read (on a worker
    thread: ``_on_worker``), every ``POLL_S`` seconds, on the calling thread only: True stops
    the conversion (``LoadCancelledError``) and removes what it had written.

    Raises:
        ModelLoadError: the file is missing, unreadable or corrupt, or writing failed.
        UnsupportedModelError: transformers' GGUF reader does not support the architecture.
        LoadCancelledError: ``should_stop`` said so.
    """
    from safetensors.torch import save_file

    check = stop_check(should_stop, "loading cancelled (the GGUF conversion was stopped; it starts again "
                                    "on the next load)")

    gguf_path = Path(gguf_path).expanduser().resolve()
    out_dir = Path(out_dir)
    _check_readable(gguf_path)
    if progress:
        into = "Hearth's format" if dtype is AS_FILE else _dtype_name(dtype)
        progress(f"Converting {gguf_path.name} to {into} (one time only)…")

    from gguf import GGUFReader

    try:
        reader = _on_worker(check, lambda _worker_check, _say: GGUFReader(str(gguf_path)))
    except LoadCancelledError:
        raise
    except Exception as exc:  # noqa: BLE001 - the reader fails in many ways on damaged or newer files
        raise ModelLoadError(
            f"cannot read GGUF file {gguf_path}: {type(exc).__name__}: {exc}. The file may be truncated, corrupt "
            "or of a newer GGUF version; download it again, or use the model's Hugging Face repo.") from exc
    parts = _field(reader, "split.count")
    if parts is not None and int(parts) > 1:  # (its tensors are spread over the other parts)
        raise UnsupportedModelError(
            f"{gguf_path.name} is part {int(_field(reader, 'split.no') or 0) + 1} of a GGUF split into {int(parts)} "
            "files, which Hearth can't load as parts: merge them into one file (llama.cpp's `llama-gguf-split "
            "--merge FIRST-PART OUT.gguf`), or pick a quantization of the model published as a single file.")
    check()
    cfg, tok, tensors = _read_gguf(gguf_path, progress, check)
    scaling = _rope_scaling(reader, cfg, gguf_path)
    if scaling is not None:
        _set_config_rope(cfg, scaling)
    end_ids = _end_ids(reader)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out_dir)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        cfg.save_pretrained(tmp)
        raw = _gguf_tensors(gguf_path, cfg, list(tensors), reader) if keep_quantized or dtype is AS_FILE else {}
        del reader
        check()
        kept, types = kept_quantized(gguf_path, cfg, tensors, raw, check) if keep_quantized else ({}, {})
        check()
        if dtype is AS_FILE:
            sources = {name: rt.tensor_type.name for name, rt in raw.items()}
            weights = {name: t.to(_stored_dtype(t, sources.get(name))).contiguous()
                       for name, t in tensors.items() if name not in kept}
        else:
            weights = {name: t.to(dtype).contiguous() for name, t in tensors.items() if name not in kept}
        for name, qw in kept.items():
            base = name.removesuffix(".weight")
            weights[f"{base}.qweight"], weights[f"{base}.scales"] = qw.qweight.contiguous(), qw.scales.contiguous()
            if qw.mins is not None:
                weights[f"{base}.mins"] = qw.mins.contiguous()
        del tensors, kept
        check()
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        del weights
        tok.save_pretrained(tmp)
        if len(end_ids) > 1:  # the end-of-turn tokens beside end of sequence, where generation reads them
            (tmp / "generation_config.json").write_text(
                json.dumps({"eos_token_id": end_ids, "bos_token_id": getattr(cfg, "bos_token_id", None)},
                           indent=2) + "\n", encoding="utf-8")
        # Written last: its presence marks a complete conversion.
        (tmp / SOURCE_FILE).write_text(
            json.dumps({**source_record(gguf_path, dtype, keep_quantized), **types}, indent=2) + "\n",
            encoding="utf-8"
        )
        _replace_dir(tmp, out_dir)
    except OSError as exc:
        raise ModelLoadError(
            f"cannot write the converted model for {gguf_path.name} into {out_dir.parent}: "
            f"{exc.strerror or exc}. Free some disk space or set HEARTH_CACHE_DIR to a writable folder."
        ) from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if progress:
        progress(f"Converted {gguf_path.name} into {out_dir}")
    return out_dir


# Projections Hearth runs fused: their tensors are kept quantized only all alike.
_FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _gguf_tensors(gguf_path: Path, cfg, names, reader=None) -> dict:
    """HF tensor name -> the file's own ``ReaderTensor`` for it (through gguf's name map of
    the file's architecture; empty for an architecture gguf doesn't map). ``reader``: the
    file's ``GGUFReader``, where the caller has one (a parse takes seconds)."""
    import gguf
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_path)) if reader is None else reader
    field = reader.fields["general.architecture"]
    arch = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}.get(bytes(field.parts[field.data[0]]).decode())
    if arch is None:
        return {}
    name_map = gguf.get_tensor_name_map(arch, int(cfg.num_hidden_layers))
    raw = {t.name: t for t in reader.tensors}
    found = {}
    for name in names:
        rt = raw.get(name_map.get_name(name, try_suffixes=(".weight", ".bias")) or "")
        if rt is not None:
            found[name] = rt
    return found


def kept_quantized(gguf_path: Path, cfg, tensors: dict[str, torch.Tensor],
                   raw: dict | None = None, check: Callable[[], None] | None = None) -> tuple[dict, dict]:
    """(HF tensor name -> ``QuantizedWeight`` for every 2-D tensor stored as Q8_0, Q4_0,
    Q4_1, Q4_K, Q5_K or Q6_K, repacked from the file's own blocks with the rows in the order transformers'
    reader gives (``tensors``: its dequantized, un-permuted ones); the file's quantized
    types by what happened to them, ``{"kept": {"Q4_1": 210}, "dequantized": {"Q6_K": 4}}``).
    A tensor whose rows can't be matched exactly stays float, and so does a fused group
    (q/k/v, gate/up) with such a member. A fused group of kept members in different forms
    takes one that holds each without loss: int8 codes with mins, in groups of 32 (Q4_K
    q/k beside a Q5_K v) or of 16 when a member has groups of 16 (Q4_K q/k beside a Q6_K
    v: llama.cpp's Q4_K_M gives half the layers that q/k/v). ``raw``: ``_gguf_tensors`` of
    these names, where the caller has it already. ``check`` is called before each tensor
    (a conversion's stop check: it raises to stop; the repack takes seconds on a big file)."""
    from engine.quant.gguf_blocks import KEPT_TYPES, blocks_to_weight, permute_rows, row_permutation
    from engine.quant.gguf_kquants import KEPT_KQUANT_TYPES, read_kquant, to_weight

    raw = _gguf_tensors(gguf_path, cfg, tensors) if raw is None else raw
    kept = {}
    for name, tensor in tensors.items():
        if check is not None:
            check()
        rt = raw.get(name)
        kind = None if rt is None else rt.tensor_type.name
        if kind not in KEPT_TYPES + KEPT_KQUANT_TYPES or tensor.dim() != 2:
            continue
        if kind in KEPT_TYPES:
            qw = blocks_to_weight(rt.data, kind)
            exact = qw.dequantize(torch.float32)
        else:  # the rows are matched on the file's exact values, before the scales go to fp16
            blocks = read_kquant(rt.data, kind)
            qw, exact = to_weight(blocks), blocks.dequantize(torch.float32)
        # Hearth's dequantization equals gguf's bit for bit (tests/quant/test_quant_layout.py,
        # tests/quant/test_gguf_kquants.py).
        perm = row_permutation(tensor.float(), exact)
        if qw is not None and perm is not None:  # None: a scale beyond float16 (stays float)
            kept[name] = permute_rows(qw, perm)
    fused_float = set()  # kept alone, but fused with a member that stays float
    for name in list(kept):
        for group in _FUSED:
            proj = next((p for p in group if f".{p}." in name), None)
            if proj is None or name not in kept:
                continue
            members = [name.replace(f".{proj}.", f".{p}.") for p in group]
            forms = {(kept[m].bits, kept[m].group_size, kept[m].mins is None) if m in kept else None
                     for m in members}
            if len(forms) == 1:
                continue
            if None not in forms and {f[1] for f in forms} == {32}:
                # all kept in groups of 32, of different forms (Q4_K q/k beside a Q5_K v, say):
                # int8 codes with mins hold each of them without loss
                for m in members:
                    kept[m] = _as_int8_with_mins(kept[m])
            elif None not in forms and {f[1] for f in forms} == {16, 32} and all(
                    f[0] == 8 for f in forms if f[1] == 16):
                # groups of 16 beside groups of 32 (a Q6_K v beside Q4_K q/k): the same in
                # groups of 16, a group of 32's scale and min taken twice
                for m in members:
                    kept[m] = _as_int8_g16_with_mins(kept[m])
            else:
                for m in members:
                    if kept.pop(m, None) is not None:
                        fused_float.add(m)
    types: dict[str, dict[str, int]] = {"kept": {}, "dequantized": {}, "fused_float": {}}
    for name, rt in raw.items():
        kind = rt.tensor_type.name
        if kind in ("F32", "F16", "BF16", "F64"):
            continue
        bucket = types["kept" if name in kept else "fused_float" if name in fused_float else "dequantized"]
        bucket[kind] = bucket.get(kind, 0) + 1
    return kept, types


def _as_int8_with_mins(qw):
    """``qw`` (groups of 32) as int8 codes with mins: int4's codes 0..15 as they are, a
    symmetric weight's mins zero. Exact."""
    from engine.quant.qweight import QuantizedWeight

    if qw.bits == 8 and qw.mins is not None:
        return qw
    mins = qw.mins if qw.mins is not None else torch.zeros_like(qw.scales)
    return QuantizedWeight(8, qw.group_size, qw.codes().to(torch.int8), qw.scales, mins, qw.perm)


def _as_int8_g16_with_mins(qw):
    """``qw`` (groups of 16 or 32) as int8 codes with mins in groups of 16: int4's codes
    0..15 as they are, each group of 32's scale and min for both its halves, a symmetric
    weight's mins zero. Exact."""
    from engine.quant.qweight import QuantizedWeight

    scales, mins = qw.scales, qw.mins if qw.mins is not None else torch.zeros_like(qw.scales)
    if qw.group_size == 32:
        scales, mins = scales.repeat_interleave(2, dim=1), mins.repeat_interleave(2, dim=1)
    return QuantizedWeight(8, 16, qw.codes().to(torch.int8), scales.contiguous(), mins.contiguous(), qw.perm)


def quant_detail(folder: Path) -> str | None:
    """A kept-quantized GGUF conversion's types in words (``ModelInfo.quant_detail``)."""
    try:
        record = json.loads((Path(folder) / SOURCE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or not record.get("keep_quantized"):
        return None
    kept = record.get("kept") or {}
    dequantized = record.get("dequantized") or {}
    fused_float = record.get("fused_float") or {}
    words = [f"{n} {t} tensors kept quantized" for t, n in sorted(kept.items())]
    words += [f"{n} {t} tensors dequantized (no Hearth kernel for {t} yet)" for t, n in sorted(dequantized.items())]
    words += [f"{n} {t} tensors dequantized (run fused with a dequantized one: q/k/v or gate/up)"
              for t, n in sorted(fused_float.items())]
    return "GGUF: " + "; ".join(words) if words else None


def _replace_dir(new: Path, target: Path) -> None:
    """Move the finished folder ``new`` to ``target``, replacing an older one."""
    old = None
    if target.exists():
        # Rename the old folder away first: a directory rename cannot overwrite a non-empty one.
        old = target.parent / f".{target.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        target.rename(old)
    try:
        new.rename(target)
    except OSError:
        if target.is_dir() and (target / SOURCE_FILE).is_file():
            # Another process finished the same conversion first; keep theirs.
            pass
        else:
            raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
