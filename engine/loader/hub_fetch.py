"""Fetching Hub files into the Hugging Face cache so that an interrupted download continues
where it stopped: in the app's Models page (``app/services/downloads``) and for a repo id
given to ``--model`` (``resolve``), which share this code and the partial files it keeps.

huggingface_hub (>= 1.x) retries a dropped connection within one call, but it throws the
partial file away when the call fails, is cancelled or the process ends; a model is
gigabytes. So the bytes of each blob are fetched here, through huggingface_hub's own HTTP
session (``http_stream_backoff``: its proxies, user agent and Hub error mapping), into the
cache's own ``blobs/<etag>.incomplete`` file, continued with an HTTP ``Range`` request
after a dropped connection, a failure or a restart. Once a blob is whole,
``hf_hub_download`` / ``snapshot_download`` do the rest the library's way (the snapshot
link and ``refs/<revision>``) without downloading it again. Progress and cancellation are
the caller's, through small callbacks. Messages say what went wrong; what to do next
(press Retry, run the command again) is the caller's to add.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from engine.memory_plan import format_bytes

log = logging.getLogger("hearth.hub")

CHUNK = 128 * 1024   # small enough that progress and cancel react within a fraction of a second
_TRANSIENT_STATUS = (408, 429, 500, 502, 503, 504)
#: The longest wait between two attempts (the backoff doubles up to it).
MAX_RETRY_WAIT_S = 60.0
#: Files fetched from a Hub repo: enough to run it, never pickle weights or other formats
#: (a repo id given to --model, and the Models page by default). Kept here, not in
#: ``resolve``, so that ``engine.api`` names them without importing torch.
HUB_ALLOW_PATTERNS = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer*",
    "special_tokens_map.json",
    "*.model",
    "vocab*",
    "merges.txt",
    "chat_template*",
]


class Stopped(Exception):
    """The caller asked to stop (cancel or shutdown); the partial file is left as it is."""


class TransferFailed(Exception):
    """Attempt after attempt ended early without getting further; the message says why
    (naming a server that ignores Range requests). ``resumes``: whether the next attempt
    continues from the partial file (not where the server ignores Range requests, nor
    where the partial file was deleted), so that callers don't promise it."""

    def __init__(self, message: str, *, resumes: bool = True):
        super().__init__(message)
        self.resumes = resumes


class ResumeCorrupted(Exception):
    """A blob stitched together from several responses doesn't match the Hub's checksum;
    its partial file has been deleted."""


class HubUnreachable(ConnectionError):
    """The repo's file list could not be fetched: the network (refused, reset, timed out),
    before any file was; the cause is chained."""


class BlobBusy(Exception):
    """Another download (another process, or another download in this one) is writing the
    same blob."""


class NotEnoughDisk(OSError):
    """The blob's missing bytes don't fit the disk (checked before fetching them)."""

    def __init__(self, name: str, needed: int, folder: Path, free: int):
        super().__init__(errno.ENOSPC, f"not enough disk space for {name}: it needs {format_bytes(needed)} more "
                         f"and {folder} has {format_bytes(free)} free")
        self.needed, self.free = needed, free


def retry_wait(base_s: float, failures: int) -> float:
    """Seconds to wait after the ``failures``-th attempt in a row that made no progress
    (1, 2, ...): ``base_s`` doubled each time, at most ``MAX_RETRY_WAIT_S``."""
    return min(base_s * 2 ** (failures - 1), MAX_RETRY_WAIT_S)


def is_connection_error(exc: BaseException) -> bool:
    """A network-level failure (refused, reset, dropped mid-body, timeout): worth a resume."""
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    # httpx (or huggingface_hub's httpx2 fork) transport errors: DNS, refused, reset, timeouts.
    return any(cls.__name__ in ("TransportError", "ConnectError", "TimeoutException", "NetworkError")
               and cls.__module__.startswith(("httpx", "httpcore")) for cls in type(exc).__mro__)


def fetch_resumable(url: str, partial: Path, size: int, *, token: str | None,
                    on_bytes: Callable[[int], None], should_stop: Callable[[], bool],
                    sleep: Callable[[float], bool], max_retries: int = 3, retry_wait_s: float = 1.0,
                    label: str = "") -> bool:
    """Grow ``partial`` until it holds all ``size`` bytes of ``url``; returns whether the
    file was assembled from more than one response (then its checksum should be verified).

    Starts from whatever ``partial`` already holds. ``on_bytes(n)`` reports bytes added
    (negative if the server ignored the Range and the file restarts); ``should_stop()`` is
    polled per chunk; ``sleep(s)`` waits between attempts and returns True to stop early.

    An attempt that ends early (a dropped connection, or a clean but short response) is
    retried after ``retry_wait`` seconds. Only attempts that get the file further than it
    ever was count as progress: a server that ignores Range and cuts every response short
    restarts the file each time and gets nowhere, so after ``max_retries`` attempts in a
    row without progress the transfer fails (a server that answers a Range request with
    the whole file still succeeds when that whole file arrives).

    Raises:
        Stopped: ``should_stop()`` or ``sleep()`` said so.
        TransferFailed: the retries were spent on short responses, or on a server that
            ignores Range requests (the message says which).
        huggingface_hub errors (HfHubHTTPError, GatedRepoError, ...) and connection errors
        once the retries are spent; OSError from the disk.
    """
    from huggingface_hub.utils import build_hf_headers, hf_raise_for_status, http_stream_backoff

    have = partial.stat().st_size if partial.exists() else 0
    stitched = have > 0
    best = have          # the most of the file ever on disk: progress means getting past it
    failures = 0         # attempts in a row that ended early (reset by progress)
    range_ignored = False
    auth = token if sends_token_to(url) else False
    while have < size:
        headers = build_hf_headers(token=auth)
        headers["Accept-Encoding"] = "identity"  # byte offsets must be of the file itself
        if have:
            headers["Range"] = f"bytes={have}-"
        error: Exception | None = None
        try:
            with http_stream_backoff("GET", url, headers=headers, timeout=30, retry_on_exceptions=(),
                                     retry_on_status_codes=_TRANSIENT_STATUS) as r:
                hf_raise_for_status(r)
                mode = "ab"
                content_range = r.headers.get("Content-Range", "")
                if have and (r.status_code != 206 or not content_range.startswith(f"bytes {have}-")):
                    # The server ignored the Range (or answered another one): start over.
                    range_ignored = True
                    log.info("the server ignored the Range request for %s; starting it over", label)
                    on_bytes(-have)
                    mode, have = "wb", 0
                elif have:
                    stitched = True
                with open(partial, mode) as f:
                    for chunk in r.iter_bytes(CHUNK):
                        if should_stop():
                            raise Stopped()
                        f.write(chunk)
                        have += len(chunk)
                        on_bytes(len(chunk))
        except Stopped:
            raise
        except Exception as exc:
            if should_stop():
                raise Stopped() from None
            if not is_connection_error(exc):
                raise
            error = exc
        if have >= size:
            break
        if have > best:  # further than ever before: the retries start afresh
            best, failures = have, 0
        failures += 1
        if failures > max_retries:
            if range_ignored:
                raise TransferFailed(
                    f"the server ignores requests to resume {label} (it answers a Range request with the "
                    f"whole file) and ended the download early {failures} times in a row, never getting "
                    f"past {format_bytes(best)} of {format_bytes(size)}; try again later, or from another "
                    "network.", resumes=False) from error
            if error is not None:
                raise error
            raise TransferFailed(
                f"the server ended {label} early {failures} times in a row, never getting past "
                f"{format_bytes(best)} of {format_bytes(size)}.")
        why = f"connection dropped ({error})" if error is not None else "short response"
        log.info("%s at byte %d of %s; retry %d of %d", why, have, label, failures, max_retries)
        if sleep(retry_wait(retry_wait_s, failures)):
            raise Stopped() from None
    if have > size:
        partial.unlink(missing_ok=True)
        raise TransferFailed(f"{label} came out larger than the Hub announced ({have} > {size} bytes); its "
                             "partial copy was deleted.", resumes=False)
    return stitched


def sends_token_to(url: str) -> bool:
    """Whether the Hugging Face token may go with a request to ``url``: only to the Hub
    endpoint itself, never to the CDN or storage host a file download is redirected to
    (huggingface_hub drops it there too; pre-signed storage URLs even reject it)."""
    from urllib.parse import urlsplit

    from huggingface_hub import constants

    host = urlsplit(url).netloc.lower()
    return host == urlsplit(constants.ENDPOINT).netloc.lower() or host in ("huggingface.co", "hf.co")


def sha256_matches(path: Path, sha256: str, should_stop: Callable[[], bool]) -> bool:
    """Whether the file's sha256 is ``sha256`` (hashing can be stopped between MiBs)."""
    return _digest(path, hashlib.sha256(), should_stop) == sha256


def etag_matches(path: Path, etag: str, should_stop: Callable[[], bool]) -> bool:
    """Whether the file is the one the Hub's ``etag`` names: an LFS file's etag is its
    sha256, a file kept in git itself (config.json, small tokenizer files) its git blob id
    (the sha1 of ``blob <size>\\0`` and the bytes). Any other etag can't be checked: True."""
    if len(etag) == 64:
        return sha256_matches(path, etag, should_stop)
    if len(etag) == 40:
        return _digest(path, hashlib.sha1(b"blob %d\0" % path.stat().st_size), should_stop) == etag
    return True


def _digest(path: Path, h, should_stop: Callable[[], bool]) -> str:
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            if should_stop():
                raise Stopped()
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------- blobs


@contextmanager
def _blob_lock(blob: Path) -> Iterator[None]:
    """Hold huggingface_hub's own lock for ``blob`` (``<cache>/.locks/<repo>/<etag>.lock``)
    while its partial file grows, so that two processes (two Hearth commands, the app and a
    command, ``hf download``) never append to the same file; raises ``BlobBusy`` at once
    when another holds it."""
    from filelock import FileLock, Timeout

    storage = blob.parent.parent
    lock_path = storage.parent / ".locks" / storage.name / f"{blob.name}.lock"
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(lock_path), timeout=0, mode=0o664)
        lock.acquire()
    except Timeout:
        raise BlobBusy() from None
    except (OSError, NotImplementedError) as exc:  # a cache on a file system without locks
        log.info("could not lock %s (%s); downloading without the lock", lock_path, exc)
        yield
        return
    try:
        yield
    finally:
        lock.release()


def fetch_blob(url: str, blob: Path, size: int, *, token: str | None, on_bytes: Callable[[int], None],
               should_stop: Callable[[], bool], sleep: Callable[[float], bool], max_retries: int = 3,
               retry_wait_s: float = 1.0, label: str = "", discard_on_stop: Callable[[], bool] | None = None) -> None:
    """Download ``url`` into the cache blob ``blob`` through ``blob.incomplete``, continuing
    what a failed, stopped or earlier run left there. ``on_bytes`` is told the bytes already
    on disk first (so a progress bar starts there), then each chunk as ``fetch_resumable``.
    Stopped, the partial file stays for the next run, unless ``discard_on_stop()`` says to
    delete it (a cancel; ``on_bytes`` is told the bytes lost): under the blob's lock, so a
    download of the same file by another program that takes the lock next keeps its own.

    Raises:
        NotEnoughDisk: the rest of the file doesn't fit (checked before fetching it).
        ResumeCorrupted: stitched from several responses, it failed the Hub's checksum.
        BlobBusy: another download holds the blob's lock.
        Stopped, TransferFailed, and ``fetch_resumable``'s errors otherwise.
    """
    partial = blob.with_name(blob.name + ".incomplete")
    partial.parent.mkdir(parents=True, exist_ok=True)
    with _blob_lock(blob):
        if blob.exists():  # finished by whoever held the lock before
            on_bytes(size)
            return
        have = partial.stat().st_size if partial.exists() else 0
        if have > size:
            partial.unlink()
            have = 0
        free = shutil.disk_usage(partial.parent).free
        if size - have > free:
            raise NotEnoughDisk(label, size - have, partial.parent, free)
        on_bytes(have)
        partial.touch()  # (an empty file gets no request, which would have made it)
        try:
            stitched = fetch_resumable(url, partial, size, token=token, on_bytes=on_bytes, should_stop=should_stop,
                                       sleep=sleep, max_retries=max_retries, retry_wait_s=retry_wait_s, label=label)
            # A blob stitched from several responses must match the Hub's checksum (its etag).
            corrupted = stitched and not etag_matches(partial, blob.name, should_stop)
        except Stopped:
            if discard_on_stop is not None and discard_on_stop() and partial.exists():
                lost = partial.stat().st_size
                partial.unlink(missing_ok=True)
                on_bytes(-lost)
            raise
        if corrupted:
            partial.unlink(missing_ok=True)
            on_bytes(-size)
            raise ResumeCorrupted(f"{label} was corrupted while resuming; its partial copy was deleted.")
        os.replace(partial, blob)


# ---------------------------------------------------------------------------- repos


@dataclass(frozen=True, slots=True)
class RepoFiles:
    """A repo's files at one commit: ``sizes`` by name, ``storage`` its cache folder."""

    repo_id: str
    sha: str
    sizes: dict[str, int]
    storage: Path

    @property
    def snapshot(self) -> Path:
        return self.storage / "snapshots" / self.sha

    def cached(self, name: str) -> bool:
        """Whether ``name`` at this commit is in the cache already (linked in its snapshot)."""
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(self.repo_id, name, cache_dir=self.storage.parent,
                                                 revision=self.sha), str)

    def blob_of(self, name: str, token: str | None) -> tuple[str, Path, int]:
        """``(url, blob path, size)`` of ``name``: where its bytes come from (after the Hub's
        redirect) and go (``blobs/<etag>``)."""
        from huggingface_hub import hf_hub_url
        from huggingface_hub.file_download import get_hf_file_metadata

        meta = get_hf_file_metadata(hf_hub_url(self.repo_id, name, revision=self.sha), token=token)
        return meta.location, self.storage / "blobs" / meta.etag, (
            meta.size if meta.size is not None else self.sizes[name])


def list_repo(repo_id: str, revision: str | None, token: str | None, timeout: float = 30.0) -> RepoFiles:
    """The files of ``repo_id`` at ``revision`` (default branch if None) with their sizes.

    Raises huggingface_hub's errors (unknown repo or revision, gated, HTTP, offline)."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.file_download import repo_folder_name

    info = HfApi(token=token).model_info(repo_id, revision=revision or "main", files_metadata=True, timeout=timeout)
    sizes = {f.rfilename: (f.lfs.size if f.lfs is not None else f.size) or 0 for f in info.siblings or ()}
    storage = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model")
    return RepoFiles(repo_id, info.sha, sizes, storage)


def prefetch_repo(repo_id: str, revision: str | None, allow_patterns: list[str], *, token: str | None = None,
                  should_stop: Callable[[], bool], tqdm_class=None, max_retries: int = 3,
                  retry_wait_s: float = 1.0) -> None:
    """Bring the blobs of ``repo_id``'s files that match ``allow_patterns`` into the cache,
    resumably, so that a ``snapshot_download`` after it only links them. Files already in
    the snapshot are skipped; a progress bar per file (``tqdm_class``, huggingface_hub's by
    default, which honours HF_HUB_DISABLE_PROGRESS_BARS) starts at the bytes already kept.

    Raises HubUnreachable for a network failure while listing the files (so that it is not
    taken for a download cut short), otherwise what ``list_repo`` and ``fetch_blob`` raise.
    """
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.utils import filter_repo_objects
    from huggingface_hub.utils import tqdm as hf_tqdm

    try:
        # A load of a cached model on a network that drops packets waits this long before the
        # cache (huggingface_hub's own wait for a file's metadata: HF_HUB_ETAG_TIMEOUT, 10 s)
        repo = list_repo(repo_id, revision, token, timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except Exception as exc:
        if is_connection_error(exc):
            raise HubUnreachable(f"{type(exc).__name__}: {exc}") from exc
        raise
    for name in filter_repo_objects(sorted(repo.sizes), allow_patterns=allow_patterns):
        if should_stop():
            raise Stopped()
        if repo.cached(name):
            continue
        url, blob, size = repo.blob_of(name, token)
        if blob.exists():
            continue
        with (tqdm_class or hf_tqdm)(total=size, unit="B", unit_scale=True, unit_divisor=1024, desc=name,
                                     leave=False) as bar:
            try:
                fetch_blob(url, blob, size, token=token, on_bytes=bar.update, should_stop=should_stop,
                           sleep=lambda seconds: _sleep_unless(should_stop, seconds), max_retries=max_retries,
                           retry_wait_s=retry_wait_s, label=name)
            except HfHubHTTPError as exc:
                status = getattr(exc.response, "status_code", None)
                partial = blob.with_name(blob.name + ".incomplete")
                if status not in (401, 403, 410) or not partial.exists() or not partial.stat().st_size:
                    raise
                # The file's access was checked just before (blob_of): refused part-way, it is
                # the storage link, signed for a limited time (an hour on the Hub), that expired
                # before a resume; the next run gets a fresh one (not the token's fault, nor
                # the network's).
                raise TransferFailed(f"the download link of {name} expired part-way ({status}); the next "
                                     "attempt gets a fresh one.") from exc


def _sleep_unless(should_stop: Callable[[], bool], seconds: float) -> bool:
    """Wait ``seconds`` in short steps; True (and at once) when ``should_stop()`` says so."""
    import threading
    import time

    pause = threading.Event()  # (never set: a wait that tests' patched time.sleep leaves alone)
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        if should_stop():
            return True
        pause.wait(min(left, 0.1))
    return should_stop()
