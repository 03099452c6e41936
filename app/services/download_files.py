"""Fetching one download's files into the Hugging Face cache, resumably (the transfer
half of ``DownloadManager``, kept apart from its queue and states).

``RepoFetcher`` is mixed into ``DownloadManager``: it reads a repo's file list, picks the
files a download takes, and grows each blob's ``.incomplete`` file with Range requests
(``resumable.fetch_resumable``) before huggingface_hub links it into the snapshot.
It reports through the manager's ``_set`` / ``_advance`` and stops when the job's
``stop`` event is set.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from pathlib import Path

from typing import TYPE_CHECKING

from app.services.hub import HubError
from app.services.resumable import Stopped, TransferFailed, fetch_resumable, sha256_matches
from engine.api import format_bytes

if TYPE_CHECKING:
    from app.services.downloads import DownloadStatus

_SPLIT_GGUF = re.compile(r"-\d{5}-of-\d{5}\.gguf$")
#: Files a default download takes: enough to run the model, never pickle weights. Mirrors
#: what the engine itself fetches for a repo id.
MODEL_FILE_PATTERNS = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
                       "tokenizer*", "special_tokens_map.json", "*.model", "vocab*", "merges.txt",
                       "chat_template*"]


class RepoFetcher:
    """The transfer methods of ``DownloadManager`` (a mixin: it uses the manager's lock,
    ``_busy_blobs``, retry settings, ``_token``, ``_set`` and ``_advance``)."""

    def _download(self, job) -> Path:
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

    def _check_stop(self, job) -> None:
        if job.stop.is_set():
            raise Stopped()

    def _fetch_blob(self, job, url: str, blob: Path, size: int, token: str | None) -> None:
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
                raise HubError("disk_full", f"not enough disk space for {name}: it needs {format_bytes(size - have)} "
                               f"more and {partial.parent} has {format_bytes(free)} free. Free some space (for "
                               "example delete models in the Library) and retry.")
            self._advance(job, have)
            job.samples.clear()  # bytes from an earlier session are not download speed
            job.transferring = True
            stitched = fetch_resumable(url, partial, size, token=token,
                                       on_bytes=lambda n: self._advance(job, n),
                                       should_stop=job.stop.is_set,
                                       sleep=lambda seconds: self._retry_sleep(job.stop, seconds),
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
        except TransferFailed as exc:
            raise HubError("other", str(exc)) from exc
        except Stopped:
            if job.discard_partial and partial.exists():
                lost = partial.stat().st_size
                partial.unlink(missing_ok=True)
                self._advance(job, -lost)  # the bar shows what is left on disk
            raise
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise HubError("disk_full", f"the disk filled up while downloading {name}: free some space and "
                               "press Retry; it continues where it stopped.") from exc
            raise
        finally:
            with self._lock:
                self._busy_blobs.discard(key)
