"""A queue of model downloads from the Hugging Face Hub, with progress, pause, cancel and resume.

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

Pause stops the transfer and keeps the partial file; Resume queues the download again and
it continues from the bytes on disk. Cancel deletes the partial file unless asked to keep
it (``keep_partial``), in which case Retry continues from it as Resume does.

The queue (repo, files, state, bytes) is saved as JSON in the user data folder on every
state change, so a restart picks up where it stopped: queued and running downloads go
on, paused ones stay paused. Listeners get a ``DownloadStatus`` snapshot on each change
(from worker threads: the GUI forwards them through a signal).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from app.services.download_files import MODEL_FILE_PATTERNS, RepoFetcher
from app.services.download_state import read_queue, write_queue
from app.services.hub import HubError, describe_error
from app.services.user_data import data_dir
from engine.api import DownloadStopped

log = logging.getLogger("hearth.app.downloads")

QUEUED, RUNNING, PAUSED, DONE, FAILED, CANCELLED = "queued", "running", "paused", "done", "failed", "cancelled"
_STATES = (QUEUED, RUNNING, PAUSED, DONE, FAILED, CANCELLED)  # the first is an entry's default
#: States whose partial files a later Resume / Retry continues from (never deleted under them).
_UNFINISHED = (QUEUED, RUNNING, PAUSED)
__all__ = ["DownloadManager", "DownloadStatus", "MODEL_FILE_PATTERNS", "QUEUED", "RUNNING", "PAUSED", "DONE",
           "FAILED", "CANCELLED"]
STATE_FILE = "downloads.json"
_EMIT_INTERVAL_S = 0.1         # at most ~10 progress events per second per download
_SPEED_WINDOW_S = 5.0


@dataclass(frozen=True, slots=True)
class DownloadStatus:
    """A snapshot of one download. ``bytes_total`` is ``None`` until the file list is known;
    ``speed_bps`` and ``eta_s`` only mean something while running; ``path`` is the local
    model folder (or the GGUF file) once done; ``error_url`` is the page to open for a
    gated model. ``partial_kept``: cancelled with its partial file kept, so Retry (or
    downloading the same files again) continues from it."""

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
    partial_kept: bool = False

    @property
    def fraction(self) -> float | None:
        return self.bytes_done / self.bytes_total if self.bytes_total else None

    @property
    def active(self) -> bool:
        """Queued or running: it will move on by itself (a paused one waits for Resume)."""
        return self.state in (QUEUED, RUNNING)

    @property
    def unfinished(self) -> bool:
        """Queued, running or paused: Resume or the queue will take it further."""
        return self.state in _UNFINISHED


class _Job:
    def __init__(self, status: DownloadStatus) -> None:
        self.status = status
        self.stop = threading.Event()
        # What the worker does once the transfer has stopped: CANCELLED, PAUSED, or QUEUED
        # (the app is quitting, or Resume was pressed while the pause took effect).
        self.stop_reason = CANCELLED
        self.keep_partial = False
        self.samples: deque[tuple[float, int]] = deque()
        self.last_emit = 0.0
        self.transferring = False  # bytes are being fetched (vs. metadata / cache checks)

    @property
    def discard_partial(self) -> bool:
        """The transfer stops for a cancel that deletes the partial file."""
        return self.stop_reason == CANCELLED and not self.keep_partial


class DownloadManager(RepoFetcher):
    """Runs queued downloads, ``max_parallel`` at a time, and remembers them across restarts.

    Args:
        state_file: where the queue is saved (default ``<user data>/downloads.json``).
        max_parallel: downloads running at once (1 or 2 is sensible).
        token_provider: returns the token to use (e.g. ``TokenStore().get``); ``None`` from
            it means huggingface_hub's default (``HF_TOKEN`` / ``hf auth login``).
        autostart: resume unfinished downloads from the state file right away.
        max_retries: attempts in a row that may end early (a dropped connection, a short
            response) without getting the file further, before the download fails (each
            resumes with a Range request; getting further than ever resets the count).
        retry_wait_s: wait before the first retry (doubles each time, up to a minute).
        retry_sleep: ``retry_sleep(stop, seconds)`` waits between retries and returns True
            when ``stop`` (a ``threading.Event``) was set; default ``stop.wait(seconds)``
            (tests pass one that does not sleep).
    """

    def __init__(self, state_file: Path | None = None, *, max_parallel: int = 1,
                 token_provider: Callable[[], str | None] | None = None, autostart: bool = True,
                 max_retries: int = 3, retry_wait_s: float = 1.0,
                 retry_sleep: Callable[[threading.Event, float], bool] | None = None) -> None:
        if max_parallel < 1:
            raise ValueError("max_parallel must be at least 1")
        self._state_file = Path(state_file) if state_file is not None else data_dir() / STATE_FILE
        self._max_parallel = max_parallel
        self._token_provider = token_provider
        self._max_retries = max_retries
        self._retry_wait_s = retry_wait_s
        self._retry_sleep = retry_sleep or (lambda stop, seconds: stop.wait(seconds))
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._jobs: dict[str, _Job] = {}
        self._pending: list[str] = []
        self._listeners: list[Callable[[DownloadStatus], None]] = []
        self._workers: list[threading.Thread] = []
        self._busy_blobs: set[str] = set()
        self._closed = False
        #: Why the saved queue could not be (fully) used at start-up, in words for the app
        #: to show (the file was moved aside, so nothing is lost); ``None`` when it could.
        self.load_problem: str | None = None
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
        """Queue a download and return its id (an unfinished identical one is reused, and
        resumed if it was paused).

        ``files``: exact file names in the repo (e.g. one ``.gguf``); ``None`` takes the
        model's safetensors weights, config and tokenizer.
        """
        wanted = tuple(sorted(files)) if files else None
        with self._lock:
            same = next((j.status for j in self._jobs.values() if j.status.unfinished
                         and (j.status.repo_id, j.status.files, j.status.revision) == (repo_id, wanted, revision)),
                        None)
            if same is None:
                status = DownloadStatus(id=uuid.uuid4().hex[:12], repo_id=repo_id, revision=revision, files=wanted)
                job = self._jobs[status.id] = _Job(status)
                self._save()
        if same is not None:
            if same.state == PAUSED:
                self.resume(same.id)
            return same.id
        # Listeners hear "queued" before the worker can see the job and say "running".
        self._emit(job, force=True)
        with self._lock:
            if self._jobs.get(status.id) is job and job.status.state == QUEUED:
                self._pending.append(status.id)
                self._wake.notify_all()
        return status.id

    def pause(self, download_id: str) -> None:
        """Stop a queued or running download and keep its partial file: ``resume`` continues
        from the bytes on disk, in this session or the next."""
        with self._lock:
            job = self._jobs.get(download_id)
            if job is None or not job.status.active:
                return
            queued = download_id in self._pending
            if queued:
                self._pending.remove(download_id)
            elif not job.stop.is_set():  # a cancel already under way wins
                job.stop_reason = PAUSED
                job.stop.set()  # the worker notices at its next chunk and marks it paused
        if queued:
            self._set(job, state=PAUSED, speed_bps=0.0, eta_s=None)

    def resume(self, download_id: str) -> None:
        """Queue a paused download again; it continues from the bytes on disk."""
        with self._lock:
            job = self._jobs.get(download_id)
            if job is None:
                return
            if job.status.state == RUNNING and job.stop.is_set() and job.stop_reason == PAUSED:
                job.stop_reason = QUEUED  # Resume before the pause took effect: queue it again
                return
            if job.status.state != PAUSED:
                return
        self._requeue(job)

    def cancel(self, download_id: str, *, keep_partial: bool = False) -> None:
        """Stop a queued, running or paused download. Its partial file is deleted, unless
        ``keep_partial``: then Retry continues from it. Finished files stay cached."""
        with self._lock:
            job = self._jobs.get(download_id)
            if job is None or not job.status.unfinished:
                return
            job.keep_partial = keep_partial
            running = job.status.state == RUNNING
            if running:
                job.stop_reason = CANCELLED
                job.stop.set()  # the worker notices at its next chunk and cleans up
            elif download_id in self._pending:
                self._pending.remove(download_id)
        if not running:
            # Queued or paused: partial files from this or an earlier attempt are on disk.
            dropped = 0 if keep_partial else self._drop_partials(job.status.repo_id, exclude=download_id)
            self._set(job, state=CANCELLED, speed_bps=0.0, eta_s=None, current_file=None, partial_kept=keep_partial,
                      bytes_done=max(job.status.bytes_done - dropped, 0))

    def retry(self, download_id: str) -> None:
        """Queue a failed or cancelled download again (it resumes whatever is on disk); a
        paused one is resumed."""
        with self._lock:
            job = self._jobs.get(download_id)
            if job is None or job.status.active:
                return
        if job.status.state == PAUSED:
            self.resume(download_id)
        else:
            self._requeue(job)

    def _requeue(self, job: _Job) -> None:
        with self._lock:
            job.stop = threading.Event()
            job.keep_partial = False
            job.status = replace(job.status, state=QUEUED, error=None, error_kind=None, error_url=None,
                                 partial_kept=False)
            self._pending.append(job.status.id)
            self._save()
            self._wake.notify_all()
        self._emit(job, force=True)

    def remove(self, download_id: str) -> None:
        """Forget a finished, failed or cancelled download. Finished files stay in the cache;
        a failed or cancelled one's partial files are deleted, except those the user chose
        to keep when cancelling (downloading the same files again continues from them)."""
        with self._lock:
            job = self._jobs.get(download_id)
            if job is not None and not job.status.unfinished:
                del self._jobs[download_id]
                self._save()
            else:
                job = None
        if job is not None and job.status.state != DONE and not job.status.partial_kept:
            self._drop_partials(job.status.repo_id)  # a failed download's partial files go too

    def _drop_partials(self, repo_id: str, exclude: str | None = None) -> int:
        """Delete the repo's partial (``.incomplete``) blobs unless another download may
        still continue from them; returns the bytes deleted."""
        from huggingface_hub import constants
        from huggingface_hub.file_download import repo_folder_name

        with self._lock:
            if any(j.status.repo_id == repo_id and j.status.id != exclude
                   and (j.status.unfinished or j.status.partial_kept or j.status.state == FAILED)
                   for j in self._jobs.values()):
                return 0
        blobs = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model") / "blobs"
        dropped = 0
        for partial in blobs.glob("*.incomplete"):
            try:
                size = partial.stat().st_size
                partial.unlink()
            except OSError:
                continue  # gone already, or in use: nothing more to do here
            dropped += size
        return dropped

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
                if job.status.state == RUNNING and not job.stop.is_set():  # a pause or cancel under way stands
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
        items, self.load_problem = read_queue(self._state_file, _STATES)
        for fields in items:
            status = DownloadStatus(**fields)
            if status.state == RUNNING:  # the app stopped mid-download (a paused one stays paused)
                status = replace(status, state=QUEUED)
            status = replace(status, speed_bps=0.0, eta_s=None)
            self._jobs[status.id] = _Job(status)
            if status.state == QUEUED:
                self._pending.append(status.id)
        if self.load_problem is not None:
            self._save()  # the usable entries, in place of the file that was moved aside

    def _save(self) -> None:
        items = []
        for job in self._jobs.values():
            d = asdict(job.status)
            d["files"] = list(d["files"]) if d["files"] else None
            d.pop("speed_bps"), d.pop("eta_s")
            items.append(d)
        try:
            write_queue(self._state_file, items)
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
            except DownloadStopped:
                self._stopped(job)
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

    def _stopped(self, job: _Job) -> None:
        """The transfer stopped on request: queue, pause or cancel, as asked last."""
        reason = job.stop_reason
        if reason == QUEUED:  # quitting (resumes at the next start), or Resume during a pause
            with self._lock:
                job.status = replace(job.status, state=QUEUED, speed_bps=0.0, eta_s=None)
                if not self._closed:
                    self._pending.append(job.status.id)
                self._save()
                self._wake.notify_all()
            self._emit(job, force=True)
        elif reason == PAUSED:
            self._set(job, state=PAUSED, speed_bps=0.0, eta_s=None)
        else:
            self._set(job, state=CANCELLED, speed_bps=0.0, eta_s=None, current_file=None,
                      partial_kept=job.keep_partial)

    def _token(self) -> str | None:
        return self._token_provider() if self._token_provider is not None else None
