"""A queue of model downloads from the Hugging Face Hub, with progress, cancel and resume.

Each download fetches a repo's model files (or the files the user picked, e.g. one GGUF
file) into the standard Hugging Face cache, so the engine, ``hf`` and every other tool see
them. One or two run at a time on worker threads; the rest wait in order.

Resume. huggingface_hub (>= 1.x) retries a dropped connection within one call, but it
throws a partial file away when the call fails, is cancelled or the app quits. A model
is gigabytes, so the bytes themselves are fetched here, into the cache's own
``blobs/<etag>.incomplete`` file, continued with an HTTP ``Range`` request after a dropped
connection, a failure or an app restart. Once a blob is complete,
``hf_hub_download`` is called to do the rest the library's way (snapshot link and
``refs/<revision>``), which it does without downloading again because the blob exists.

The queue (repo, files, state, bytes) is saved as JSON in the user data folder on every
state change, so a restart picks up where it stopped. Listeners get a ``DownloadStatus``
snapshot on each change (from worker threads: the GUI forwards them through a signal).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from app.services.hub import HubError, describe_error
from app.services.resumable import Stopped, fetch_resumable, sha256_matches
from app.services.user_data import data_dir, write_json_atomic

log = logging.getLogger("hearth.app.downloads")

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
_SPLIT_GGUF = re.compile(r"-\d{5}-of-\d{5}\.gguf$")
#: Files a default download takes: enough to run the model, never pickle weights. Mirrors
#: what the engine itself fetches for a repo id.
MODEL_FILE_PATTERNS = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
                       "tokenizer*", "special_tokens_map.json", "*.model", "vocab*", "merges.txt",
                       "chat_template*"]
STATE_FILE = "downloads.json"
_EMIT_INTERVAL_S = 0.1         # at most ~10 progress events per second per download
_SPEED_WINDOW_S = 5.0


@dataclass(frozen=True, slots=True)
class DownloadStatus:
    """A snapshot of one download. ``bytes_total`` is ``None`` until the file list is known;
    ``speed_bps`` and ``eta_s`` only mean something while running; ``path`` is the local
    model folder (or the GGUF file) once done; ``error_url`` is the page to open for a
    gated model."""

    id: str
    repo_id: str
    revision: str | None = None
    files: tuple[str, ...] | None = None
    state: str = QUEUED
    bytes_done: int = 0
    bytes_total: int | None = None
    speed_bps: float = 0.0
    eta_s: float | None = None
    current_file: str | None = None
    error: str | None = None
    error_kind: str | None = None
    error_url: str | None = None
    path: str | None = None

    @property
    def fraction(self) -> float | None:
        return self.bytes_done / self.bytes_total if self.bytes_total else None

    @property
    def active(self) -> bool:
        return self.state in (QUEUED, RUNNING)


class _Job:
    def __init__(self, status: DownloadStatus) -> None:
        self.status = status
        self.stop = threading.Event()
        self.stop_reason = CANCELLED
        self.samples: deque[tuple[float, int]] = deque()
        self.last_emit = 0.0
        self.transferring = False  # bytes are being fetched (vs. metadata / cache checks)


class DownloadManager:
    """Runs queued downloads, ``max_parallel`` at a time, and remembers them across restarts.

    Args:
        state_file: where the queue is saved (default ``<user data>/downloads.json``).
        max_parallel: downloads running at once (1 or 2 is sensible).
        token_provider: returns the token to use (e.g. ``TokenStore().get``); ``None`` from
            it means huggingface_hub's default (``HF_TOKEN`` / ``hf auth login``).
        autostart: resume unfinished downloads from the state file right away.
        max_retries: reconnect attempts after a dropped connection before failing
            (each attempt resumes with a Range request; progress resets the count).
        retry_wait_s: wait before the first reconnect (doubles each time).
    """

    def __init__(self, state_file: Path | None = None, *, max_parallel: int = 1,
                 token_provider: Callable[[], str | None] | None = None, autostart: bool = True,
                 max_retries: int = 3, retry_wait_s: float = 1.0) -> None:
        if max_parallel < 1:
            raise ValueError("max_parallel must be at least 1")
        self._state_file = Path(state_file) if state_file is not None else data_dir() / STATE_FILE
        self._max_parallel = max_parallel
        self._token_provider = token_provider
        self._max_retries = max_retries
        self._retry_wait_s = retry_wait_s
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._jobs: dict[str, _Job] = {}
        self._pending: list[str] = []
        self._listeners: list[Callable[[DownloadStatus], None]] = []
        self._workers: list[threading.Thread] = []
        self._busy_blobs: set[str] = set()
        self._closed = False
        self._load()
        if autostart:
            self.start()

    # ------------------------------------------------------------------ public API

    def subscribe(self, listener: Callable[[DownloadStatus], None]) -> Callable[[], None]:
        """Call ``listener(status)`` on every change (from any thread); returns an unsubscribe."""
        with self._lock:
            self._listeners.append(listener)

        def unsubscribe() -> None:
            with self._lock:
                if listener in self._listeners:
                    self._listeners.remove(listener)

        return unsubscribe

    def start(self) -> None:
        """Start the worker threads (idempotent); unfinished downloads resume."""
        with self._lock:
            if self._closed:
                raise RuntimeError("this DownloadManager was shut down; create a new one")
            while len(self._workers) < self._max_parallel:
                t = threading.Thread(target=self._worker, name=f"hearth-download-{len(self._workers)}", daemon=True)
                self._workers.append(t)
                t.start()

    def enqueue(self, repo_id: str, *, files: list[str] | None = None, revision: str | None = None) -> str:
        """Queue a download and return its id (an unfinished identical one is reused).

        ``files``: exact file names in the repo (e.g. one ``.gguf``); ``None`` takes the
        model's safetensors weights, config and tokenizer.
        """
        wanted = tuple(sorted(files)) if files else None
        with self._lock:
            for job in self._jobs.values():
                s = job.status
                if s.active and (s.repo_id, s.files, s.revision) == (repo_id, wanted, revision):
                    return s.id
            status = DownloadStatus(id=uuid.uuid4().hex[:12], repo_id=repo_id, revision=revision, files=wanted)
            self._jobs[status.id] = _Job(status)
            self._pending.append(status.id)
            self._save()
            self._wake.notify_all()
        self._emit(self._jobs[status.id], force=True)
        return status.id

    def cancel(self, download_id: str) -> None:
        """Stop a queued or running download and delete its partial file (finished files stay cached)."""
        with self._lock:
            job = self._jobs.get(download_id)
            if job is None or not job.status.active:
                return
            queued = download_id in self._pending
            if queued:
                self._pending.remove(download_id)
            else:
                job.stop_reason = CANCELLED
                job.stop.set()  # the worker notices at its next chunk and cleans up
        if queued:
            self._set(job, state=CANCELLED, speed_bps=0.0, eta_s=None)
            self._drop_partials(job.status.repo_id)  # e.g. left by an earlier failed attempt

    def retry(self, download_id: str) -> None:
        """Queue a failed or cancelled download again (it resumes whatever is on disk)."""
        with self._lock:
            job = self._jobs.get(download_id)
            if job is None or job.status.active:
                return
            job.stop = threading.Event()
            job.status = replace(job.status, state=QUEUED, error=None, error_kind=None, error_url=None)
            self._pending.append(download_id)
            self._save()
            self._wake.notify_all()
        self._emit(job, force=True)

    def remove(self, download_id: str) -> None:
        """Forget a finished, failed or cancelled download. Finished files stay in the cache;
        a failed or cancelled one's partial files are deleted (nothing could resume them)."""
        with self._lock:
            job = self._jobs.get(download_id)
            if job is not None and not job.status.active:
                del self._jobs[download_id]
                self._save()
            else:
                job = None
        if job is not None and job.status.state != DONE:
            self._drop_partials(job.status.repo_id)  # a failed download's partial files go too

    def _drop_partials(self, repo_id: str) -> None:
        """Delete the repo's partial (``.incomplete``) blobs unless a live download needs them."""
        from huggingface_hub import constants
        from huggingface_hub.file_download import repo_folder_name

        with self._lock:
            if any(j.status.active and j.status.repo_id == repo_id for j in self._jobs.values()):
                return
        blobs = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model") / "blobs"
        for partial in blobs.glob("*.incomplete"):
            partial.unlink(missing_ok=True)

    def list(self) -> list[DownloadStatus]:
        """All downloads, oldest first."""
        with self._lock:
            return [job.status for job in self._jobs.values()]

    def get(self, download_id: str) -> DownloadStatus | None:
        with self._lock:
            job = self._jobs.get(download_id)
            return job.status if job else None

    def wait(self, download_id: str, timeout: float | None = None) -> DownloadStatus:
        """Block until the download is no longer queued or running (for scripts and tests)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while self._jobs[download_id].status.active:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"download {download_id} still {self._jobs[download_id].status.state}")
                self._wake.wait(left)
            return self._jobs[download_id].status

    def shutdown(self, wait: bool = True, timeout: float = 10.0) -> None:
        """Stop the workers. Running downloads keep their partial files and stay queued in
        the state file, so the next ``DownloadManager`` resumes them."""
        with self._lock:
            self._closed = True
            for job in self._jobs.values():
                if job.status.state == RUNNING:
                    job.stop_reason = QUEUED
                    job.stop.set()
            self._wake.notify_all()
            workers = list(self._workers)
        if wait:
            deadline = time.monotonic() + timeout  # one budget for all workers, not one each
            for t in workers:
                t.join(max(deadline - time.monotonic(), 0.0))

    # ------------------------------------------------------------------ persistence

    def _load(self) -> None:
        try:
            data = json.loads(self._state_file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable download queue %s (%s)", self._state_file, exc)
            return
        for item in data.get("downloads", []):
            try:
                files = tuple(item["files"]) if item.get("files") else None
                status = DownloadStatus(**{**item, "files": files})
            except TypeError:
                continue  # written by another version: skip rather than crash at start-up
            if status.state == RUNNING:  # the app stopped mid-download
                status = replace(status, state=QUEUED)
            status = replace(status, speed_bps=0.0, eta_s=None)
            self._jobs[status.id] = _Job(status)
            if status.state == QUEUED:
                self._pending.append(status.id)

    def _save(self) -> None:
        items = []
        for job in self._jobs.values():
            d = asdict(job.status)
            d["files"] = list(d["files"]) if d["files"] else None
            d.pop("speed_bps"), d.pop("eta_s")
            items.append(d)
        try:
            self._state_file.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self._state_file, json.dumps({"version": 1, "downloads": items}, indent=1))
        except OSError as exc:  # a full disk must not kill the download thread
            log.warning("cannot save the download queue to %s: %s", self._state_file, exc)

    # ------------------------------------------------------------------ state + events

    def _set(self, job: _Job, **changes) -> None:
        with self._lock:
            job.status = replace(job.status, **changes)
            if "state" in changes:
                self._save()
                self._wake.notify_all()
        self._emit(job, force="state" in changes or "current_file" in changes)

    def _emit(self, job: _Job, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - job.last_emit < _EMIT_INTERVAL_S:
            return
        job.last_emit = now
        with self._lock:
            listeners, status = list(self._listeners), job.status
        for listener in listeners:
            try:
                listener(status)
            except Exception:  # a broken listener must not stop the download
                log.exception("download listener failed")

    def _advance(self, job: _Job, nbytes: int) -> None:
        now = time.monotonic()
        done = job.status.bytes_done + nbytes
        job.samples.append((now, done))
        while len(job.samples) > 2 and now - job.samples[0][0] > _SPEED_WINDOW_S:
            job.samples.popleft()
        t0, b0 = job.samples[0]
        speed = (done - b0) / (now - t0) if now - t0 > 0.05 else job.status.speed_bps
        total = job.status.bytes_total
        eta = (total - done) / speed if total is not None and speed > 0 else None
        with self._lock:
            job.status = replace(job.status, bytes_done=done, speed_bps=speed, eta_s=eta)
        self._emit(job)

    # ------------------------------------------------------------------ workers

    def _worker(self) -> None:
        while True:
            with self._lock:
                while not self._pending and not self._closed:
                    self._wake.wait()
                if self._closed:
                    return
                job = self._jobs[self._pending.pop(0)]
                job.stop.clear()
                job.stop_reason = CANCELLED
                job.samples.clear()
                job.transferring = False
                job.status = replace(job.status, state=RUNNING, error=None, error_kind=None, error_url=None)
                self._save()
            self._emit(job, force=True)  # outside the lock: listeners may call back into the manager
            try:
                path = self._download(job)
            except Stopped:
                if job.stop_reason == QUEUED:  # shutdown: resume next time
                    self._set(job, state=QUEUED, speed_bps=0.0, eta_s=None)
                else:
                    self._set(job, state=CANCELLED, speed_bps=0.0, eta_s=None, current_file=None)
            except Exception as exc:
                err = describe_error(exc, job.status.repo_id)
                status_code = getattr(getattr(exc, "response", None), "status_code", None)
                if job.transferring and status_code in (401, 403, 410):
                    # Mid-file, the bytes come from a signed storage link that expires: it is
                    # not the token. Retry fetches a fresh link and continues the partial file.
                    err = HubError("other", "the download link expired while the file was downloading: "
                                   "press Retry; it continues where it stopped.")
                elif err.kind == "offline" and job.transferring:
                    err = HubError("offline", "the connection dropped during the download: check the network "
                                   "and press Retry; it continues where it stopped.")
                log.info("download of %s failed: %s", job.status.repo_id, err.message)
                self._set(job, state=FAILED, error=err.message, error_kind=err.kind, error_url=err.url,
                          speed_bps=0.0, eta_s=None)
            else:
                self._set(job, state=DONE, path=str(path), current_file=None, speed_bps=0.0, eta_s=0.0)

    def _token(self) -> str | None:
        return self._token_provider() if self._token_provider is not None else None

    def _download(self, job: _Job) -> Path:
        from huggingface_hub import HfApi, constants, hf_hub_download, hf_hub_url, try_to_load_from_cache
        from huggingface_hub.file_download import get_hf_file_metadata, repo_folder_name

        from app.services.hub import check_online

        check_online()
        s, token = job.status, self._token()
        revision = s.revision or "main"
        info = HfApi(token=token).model_info(s.repo_id, revision=revision, files_metadata=True, timeout=30)
        sizes = {f.rfilename: (f.lfs.size if f.lfs is not None else f.size) or 0 for f in info.siblings or ()}
        names = self._select_files(s, sizes)
        cache = Path(constants.HF_HUB_CACHE)
        storage = cache / repo_folder_name(repo_id=s.repo_id, repo_type="model")
        self._set(job, bytes_total=sum(sizes[n] for n in names), bytes_done=0)

        todo, pointer = [], None
        for name in names:
            cached = try_to_load_from_cache(s.repo_id, name, cache_dir=cache, revision=info.sha)
            if isinstance(cached, str):
                pointer = cached
                self._advance(job, sizes[name])  # already in the cache
            else:
                todo.append(name)
        job.samples.clear()  # cached bytes are not download speed
        for name in todo:
            self._check_stop(job)
            self._set(job, current_file=name)
            meta = get_hf_file_metadata(hf_hub_url(s.repo_id, name, revision=info.sha), token=token)
            blob = storage / "blobs" / meta.etag
            if not blob.exists():
                self._fetch_blob(job, meta.location, blob, meta.size if meta.size is not None else sizes[name],
                                 token)
            else:
                self._advance(job, sizes[name])
            # The blob is in place: this only links it into the snapshot and writes the ref.
            pointer = hf_hub_download(s.repo_id, name, revision=revision, token=token, cache_dir=cache)
        if s.files is not None and len(names) == 1:
            return Path(pointer)  # a single picked file (a GGUF) is what gets loaded
        return storage / "snapshots" / info.sha

    @staticmethod
    def _select_files(s: DownloadStatus, sizes: dict[str, int]) -> list[str]:
        if s.files is not None:
            split = [f for f in s.files if _SPLIT_GGUF.search(f)]
            if split:
                raise HubError("other", f"{split[0]} is one part of a GGUF split into several files, which "
                               "Hearth can't load yet: pick a single-file quantization of this model.")
            missing = [f for f in s.files if f not in sizes]
            if missing:
                raise HubError("not_found", f"{', '.join(missing)} is not in '{s.repo_id}' (any more): refresh the "
                               "model's details and pick again.")
            return list(s.files)
        from huggingface_hub.utils import filter_repo_objects

        names = list(filter_repo_objects(sorted(sizes), allow_patterns=MODEL_FILE_PATTERNS))
        if not any(n.endswith(".safetensors") for n in names):
            if any(n.endswith(".gguf") for n in sizes):
                raise HubError("other", f"'{s.repo_id}' ships GGUF files: pick one of them in the file list "
                               "and download that.")
            raise HubError("other", f"'{s.repo_id}' has no safetensors weights. Hearth never downloads pickle "
                           "(.bin) checkpoints because they can run code when loaded; look for a safetensors "
                           "or GGUF version of this model.")
        return names

    def _check_stop(self, job: _Job) -> None:
        if job.stop.is_set():
            raise Stopped()

    def _fetch_blob(self, job: _Job, url: str, blob: Path, size: int, token: str | None) -> None:
        """Download ``url`` into ``blob`` through ``blob.incomplete``, resuming what is there."""
        partial = blob.with_name(blob.name + ".incomplete")
        key = str(blob)
        with self._lock:
            if key in self._busy_blobs:  # the same file in another running download (same etag)
                raise HubError("other", "this file is already being downloaded by another queued download; "
                               "retry when that one finishes.")
            self._busy_blobs.add(key)
        name = job.status.current_file
        try:
            partial.parent.mkdir(parents=True, exist_ok=True)
            have = partial.stat().st_size if partial.exists() else 0
            if have > size:
                partial.unlink()
                have = 0
            free = shutil.disk_usage(partial.parent).free
            if size - have > free:
                raise HubError("disk_full", f"not enough disk space for {name}: it needs {_gib(size - have)} GiB "
                               f"more and {partial.parent} has {_gib(free)} GiB free. Free some space (for "
                               "example delete models in the Library) and retry.")
            self._advance(job, have)
            job.samples.clear()  # bytes from an earlier session are not download speed
            job.transferring = True
            stitched = fetch_resumable(url, partial, size, token=token,
                                       on_bytes=lambda n: self._advance(job, n),
                                       should_stop=job.stop.is_set, sleep=job.stop.wait,
                                       max_retries=self._max_retries, retry_wait_s=self._retry_wait_s,
                                       label=name)
            # A blob stitched from several responses must match the Hub's sha256 (an LFS etag).
            if stitched and len(blob.name) == 64 and not sha256_matches(partial, blob.name, job.stop.is_set):
                partial.unlink(missing_ok=True)
                self._advance(job, -size)
                raise HubError("other", f"{name} was corrupted while resuming; its partial copy was deleted. "
                               "Press Retry to download it again.")
            os.replace(partial, blob)
            job.transferring = False  # a later failure (next file's metadata) is not mid-transfer
        except Stopped:
            if job.stop_reason == CANCELLED:
                partial.unlink(missing_ok=True)
            raise
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise HubError("disk_full", f"the disk filled up while downloading {name}: free some space and "
                               "press Retry; it continues where it stopped.") from exc
            raise
        finally:
            with self._lock:
                self._busy_blobs.discard(key)


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.1f}"
