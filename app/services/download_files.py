"""Fetching one download's files into the Hugging Face cache, resumably (the transfer
half of ``DownloadManager``, kept apart from its queue and states).

``RepoFetcher`` is mixed into ``DownloadManager``: it reads a repo's file list, picks the
files a download takes, and has the engine's Hub fetch (``engine.api.fetch_blob``, the
same one a repo id given to a load goes through) grow each blob's ``.incomplete`` file
with Range requests before huggingface_hub links it into the snapshot. It reports
through the manager's ``_set`` / ``_advance`` and stops when the job's ``stop`` event is
set.
"""

from __future__ import annotations

import errno
import re
from pathlib import Path

from typing import TYPE_CHECKING

from app.services.hub import HubError
from engine.api import (HUB_ALLOW_PATTERNS, BlobBusy, DownloadStopped, NotEnoughDisk, ResumeCorrupted,
                        TransferFailed, fetch_blob, list_repo)

if TYPE_CHECKING:
    from app.services.downloads import DownloadStatus

_SPLIT_GGUF = re.compile(r"-\d{5}-of-\d{5}\.gguf$")
#: Files a default download takes: enough to run the model, never pickle weights; what the
#: engine itself fetches for a repo id.
MODEL_FILE_PATTERNS = HUB_ALLOW_PATTERNS
_AGAIN = " Press Retry to try again later; it continues where it stopped."


class RepoFetcher:
    """The transfer methods of ``DownloadManager`` (a mixin: it uses the manager's lock,
    ``_busy_blobs``, retry settings, ``_token``, ``_set`` and ``_advance``)."""

    def _download(self, job) -> Path:
        from huggingface_hub import hf_hub_download

        from app.services.hub import check_online

        check_online()
        s, token = job.status, self._token()
        revision = s.revision or "main"
        repo = list_repo(s.repo_id, revision, token)
        names = self._select_files(s, repo.sizes)
        self._set(job, bytes_total=sum(repo.sizes[n] for n in names), bytes_done=0)

        todo, pointer = [], None
        for name in names:
            if repo.cached(name):
                self._advance(job, repo.sizes[name])  # already in the cache
            else:
                todo.append(name)
        job.samples.clear()  # cached bytes are not download speed
        for name in todo:
            self._check_stop(job)
            self._set(job, current_file=name)
            url, blob, size = repo.blob_of(name, token)
            if not blob.exists():
                self._fetch_blob(job, url, blob, size, token)
            else:
                self._advance(job, repo.sizes[name])
            # The blob is in place: this only links it into the snapshot and writes the ref.
            pointer = hf_hub_download(s.repo_id, name, revision=revision, token=token, cache_dir=repo.storage.parent)
        if s.files is not None and len(names) == 1:
            if pointer is None:  # the one file was cached already
                pointer = str(repo.snapshot / names[0])
            return Path(pointer)  # a single picked file (a GGUF) is what gets loaded
        return repo.snapshot

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

    def _check_stop(self, job) -> None:
        if job.stop.is_set():
            raise DownloadStopped()

    def _fetch_blob(self, job, url: str, blob: Path, size: int, token: str | None) -> None:
        """Download ``url`` into ``blob`` through ``blob.incomplete``, resuming what is there."""
        key = str(blob)
        with self._lock:
            if key in self._busy_blobs:  # the same file in another running download (same etag)
                raise HubError("other", "this file is already being downloaded by another queued download; "
                               "retry when that one finishes.")
            self._busy_blobs.add(key)
        name = job.status.current_file
        first = True

        def on_bytes(n: int) -> None:
            nonlocal first
            self._advance(job, n)
            if first:  # the bytes already on disk, from an earlier session: not download speed
                first = False
                job.samples.clear()
                job.transferring = True

        try:
            fetch_blob(url, blob, size, token=token, on_bytes=on_bytes, should_stop=job.stop.is_set,
                       sleep=lambda seconds: self._retry_sleep(job.stop, seconds), max_retries=self._max_retries,
                       retry_wait_s=self._retry_wait_s, label=name,
                       discard_on_stop=lambda: job.discard_partial)  # (a cancel that drops the partial file)
            job.transferring = False  # a later failure (next file's metadata) is not mid-transfer
        except NotEnoughDisk as exc:
            raise HubError("disk_full", f"{exc.strerror}. Free some space (for example delete models in the "
                           "Library) and retry.") from exc
        except ResumeCorrupted as exc:
            raise HubError("other", f"{exc} Press Retry to download it again.") from exc
        except TransferFailed as exc:
            raise HubError("other", f"{exc}{_AGAIN if exc.resumes else ' Press Retry to try again later.'}") from exc
        except BlobBusy:
            raise HubError("other", f"{name} is being downloaded by another program right now (a Hearth "
                           "command, or `hf download`): retry when that one finishes.") from None
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise HubError("disk_full", f"the disk filled up while downloading {name}: free some space and "
                               "press Retry; it continues where it stopped.") from exc
            raise
        finally:
            with self._lock:
                self._busy_blobs.discard(key)
