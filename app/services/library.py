"""The local model library: what can be loaded without the network, and what it costs on disk.

Three sources, listed together:

* the Hugging Face cache (``HF_HUB_CACHE``), read with ``huggingface_hub.scan_cache_dir``:
  a repo with safetensors weights is one entry; a repo holding only GGUF files gives one
  entry per file;
* folders and GGUF files the user added (their paths persist in ``library.json`` in the
  user data folder); an added folder that is not itself a model is searched two levels
  deep for model folders and ``.gguf`` files;
* the bundled default model (``ref="default"``), which cannot be deleted.

``LocalModel.ref`` is what the engine loads: ``"default"``, a model folder (for Hub repos,
the snapshot folder, so loading needs no network) or a ``.gguf`` path.
Deleting uses the cache's own delete strategy for Hub repos and ``shutil`` for the rest.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from app.services.user_data import data_dir, write_json_atomic

log = logging.getLogger("hearth.app.library")

LIST_FILE = "library.json"
DEFAULT_REF = "default"
_MAX_DEPTH = 2


@dataclass(frozen=True, slots=True)
class LocalModel:
    """One loadable model on disk.

    ``kind`` is ``"default"``, ``"hub"`` (a safetensors repo in the HF cache), ``"gguf"`` (a
    GGUF file, added or in the HF cache) or ``"folder"``. ``complete`` is False when files
    are missing (an unfinished download, a moved folder); ``note`` says what.
    """

    ref: str
    name: str
    kind: str
    path: Path | None
    size_bytes: int
    repo_id: str | None = None
    revision: str | None = None
    complete: bool = True
    note: str = ""

    @property
    def deletable(self) -> bool:
        return self.kind != "default"


class Library:
    """Lists, adds and deletes local models. ``list_file`` / ``hub_cache`` default to the
    user data folder's ``library.json`` and huggingface_hub's cache (read at each call)."""

    def __init__(self, list_file: Path | None = None, *, hub_cache: Path | None = None) -> None:
        self._list_file = Path(list_file) if list_file is not None else None
        self._hub_cache = Path(hub_cache) if hub_cache is not None else None

    # ------------------------------------------------------------------ listing

    def scan(self) -> list[LocalModel]:
        """Everything loadable, default model first, then the HF cache, then added paths."""
        out: list[LocalModel] = []
        default = _default_model()
        if default is not None:
            out.append(default)
        out += self._scan_hub_cache()
        seen = {m.ref for m in out}
        for path in self.added_paths():
            for model in _scan_added(path):
                if model.ref not in seen:
                    seen.add(model.ref)
                    out.append(model)
        return out

    def added_paths(self) -> list[Path]:
        """Folders and GGUF files the user added, in the order added."""
        try:
            data = json.loads(self._file().read_text(encoding="utf-8"))
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable library list %s (%s)", self._file(), exc)
            return []
        return [Path(p) for p in data.get("paths", []) if isinstance(p, str)]

    # ------------------------------------------------------------------ adding

    def add_folder(self, folder: str | os.PathLike) -> list[LocalModel]:
        """Remember ``folder`` (a model folder, or a folder of models / GGUF files).

        Raises:
            ValueError: not a folder, or nothing loadable in it (the message says what to pick).
        """
        path = Path(folder).expanduser().resolve()
        if not path.is_dir():
            raise ValueError(f"{path} is not a folder: pick the folder that holds config.json, or add a .gguf file.")
        found = _scan_added(path)
        if not found:
            raise ValueError(f"no model found in {path}: expected a config.json with safetensors weights, or "
                             ".gguf files (searched two levels deep).")
        self._remember(path)
        return found

    def add_gguf(self, file: str | os.PathLike) -> LocalModel:
        """Remember one ``.gguf`` file.

        Raises:
            ValueError: the file does not exist or is not a GGUF file.
        """
        path = Path(file).expanduser().resolve()
        if not path.is_file() or path.suffix.lower() != ".gguf":
            raise ValueError(f"{path} is not a .gguf file: pick a GGUF model file, or add its folder instead.")
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise ValueError(f"{path} does not start with the GGUF magic bytes: the file is damaged or not GGUF.")
        self._remember(path)
        return _gguf_entry(path)

    def forget(self, path: str | os.PathLike) -> None:
        """Drop an added path from the list (nothing on disk is touched)."""
        target = Path(path).expanduser().resolve()
        paths = [p for p in self.added_paths() if p != target]
        self._write(paths)

    # ------------------------------------------------------------------ deleting

    def delete(self, model: LocalModel) -> int:
        """Delete ``model`` from disk and return the bytes freed. The UI confirms first.

        Raises:
            ValueError: the default model (bundled with the app) or an entry with no path.
            OSError: the files could not be removed (message names the path).
        """
        if not model.deletable or model.path is None:
            raise ValueError(f"{model.name} is bundled with Hearth and cannot be deleted; it takes "
                             f"{model.size_bytes / (1 << 30):.2f} GiB.")
        if model.repo_id is not None:
            return self._delete_from_hub_cache(model)
        freed = model.size_bytes
        if model.path.is_dir():
            shutil.rmtree(model.path)
        elif model.path.exists():
            model.path.unlink()
        added = set(self.added_paths())
        if model.path in added:
            self.forget(model.path)
        return freed

    def _delete_from_hub_cache(self, model: LocalModel) -> int:
        from huggingface_hub import scan_cache_dir

        info = scan_cache_dir(self._cache_dir())
        repo = next((r for r in info.repos if r.repo_type == "model" and r.repo_id == model.repo_id), None)
        if repo is None:
            return 0  # already gone
        if model.kind == "gguf":
            # Only this GGUF file: the repo's other quantizations stay.
            # Match on the path inside the snapshot (the same file in every revision), never
            # on the bare file name: Q4_K_M/model.gguf and Q8_0/model.gguf are different files.
            rel = None
            for rev in repo.revisions:
                try:
                    rel = Path(model.path).relative_to(rev.snapshot_path)
                    break
                except ValueError:
                    continue
            files = [f for rev in repo.revisions for f in rev.files
                     if f.file_path == Path(model.path)
                     or (rel is not None and f.file_path.relative_to(rev.snapshot_path) == rel)]
            strategy = info.delete_files(*files)
        else:
            strategy = info.delete_revisions(*(rev.commit_hash for rev in repo.revisions))
        strategy.execute()
        return strategy.expected_freed_size

    # ------------------------------------------------------------------ internals

    def _file(self) -> Path:
        return self._list_file if self._list_file is not None else data_dir() / LIST_FILE

    def _cache_dir(self) -> Path:
        if self._hub_cache is not None:
            return self._hub_cache
        from huggingface_hub import constants

        return Path(constants.HF_HUB_CACHE)

    def _remember(self, path: Path) -> None:
        paths = self.added_paths()
        if path not in paths:
            self._write(paths + [path])

    def _write(self, paths: list[Path]) -> None:
        file = self._file()
        file.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(file, json.dumps({"version": 1, "paths": [str(p) for p in paths]}, indent=1))

    def _scan_hub_cache(self) -> list[LocalModel]:
        from huggingface_hub import scan_cache_dir
        from huggingface_hub.errors import CacheNotFound

        try:
            info = scan_cache_dir(self._cache_dir())
        except CacheNotFound:
            return []
        out: list[LocalModel] = []
        for repo in sorted(info.repos, key=lambda r: r.repo_id.lower()):
            if repo.repo_type != "model" or not repo.revisions:
                continue
            # The revision "main" points at, else the newest one.
            rev = max(repo.revisions, key=lambda r: ("main" in r.refs, r.last_modified))
            names = {f.file_name for f in rev.files}
            rel = {str(f.file_path.relative_to(rev.snapshot_path)): f for f in rev.files}
            if any(n.endswith(".safetensors") for n in names) or "config.json" in names:
                complete, note = _folder_complete(rev.snapshot_path)
                out.append(LocalModel(ref=str(rev.snapshot_path), name=repo.repo_id, kind="hub",
                                      path=rev.snapshot_path, size_bytes=repo.size_on_disk, repo_id=repo.repo_id,
                                      revision=rev.commit_hash, complete=complete, note=note))
            for relname, f in sorted(rel.items()):
                if relname.endswith(".gguf") and not any(n.endswith(".safetensors") for n in names):
                    out.append(LocalModel(ref=str(f.file_path), name=f"{repo.repo_id}/{relname}", kind="gguf",
                                          path=f.file_path, size_bytes=f.size_on_disk, repo_id=repo.repo_id,
                                          revision=rev.commit_hash))
        return out


# ---------------------------------------------------------------------------- helpers


def _default_model() -> LocalModel | None:
    from engine.api import default_model_file  # the one place that finds it (and pins it)

    path = default_model_file()
    if path is None:
        return None
    return LocalModel(ref=DEFAULT_REF, name="SmolLM2-135M-Instruct (default)", kind="default",
                      path=path, size_bytes=path.stat().st_size, note="bundled with Hearth")


def _scan_added(path: Path) -> list[LocalModel]:
    if not path.exists():
        return [LocalModel(ref=str(path), name=path.name, kind="gguf" if path.suffix.lower() == ".gguf" else "folder",
                           path=path, size_bytes=0, complete=False, note="missing: moved or deleted")]
    if path.is_file():
        return [_gguf_entry(path)] if path.suffix.lower() == ".gguf" else []
    if (path / "config.json").is_file():
        return [_folder_entry(path)]
    found: list[LocalModel] = []
    _walk(path, 1, found)
    return found


def _walk(folder: Path, depth: int, found: list[LocalModel]) -> None:
    try:
        children = sorted(folder.iterdir())
    except OSError:
        return
    for child in children:
        if child.name.startswith("."):
            continue
        if child.is_file() and child.suffix.lower() == ".gguf":
            found.append(_gguf_entry(child))
        elif child.is_dir():
            if (child / "config.json").is_file():
                found.append(_folder_entry(child))
            elif depth < _MAX_DEPTH:
                _walk(child, depth + 1, found)


def _gguf_entry(path: Path) -> LocalModel:
    return LocalModel(ref=str(path), name=path.name, kind="gguf", path=path, size_bytes=path.stat().st_size)


def _folder_entry(path: Path) -> LocalModel:
    complete, note = _folder_complete(path)
    return LocalModel(ref=str(path), name=path.name, kind="folder", path=path, size_bytes=folder_size(path),
                      complete=complete, note=note)


def _folder_complete(path: Path) -> tuple[bool, str]:
    """A model folder needs config.json and all its safetensors weights (every indexed shard)."""
    if not (path / "config.json").is_file():
        return False, "no config.json (unfinished download?)"
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (OSError, ValueError, KeyError, AttributeError):
            return False, "unreadable model.safetensors.index.json"
        missing = sorted(s for s in shards if not (path / s).is_file())
        if missing:
            return False, f"{len(missing)} of {len(shards)} weight shards missing (unfinished download?)"
        return True, ""
    if not any(path.glob("*.safetensors")):
        return False, "no safetensors weights (unfinished download?)"
    return True, ""


def folder_size(path: Path) -> int:
    """Bytes of the files under ``path`` (symlinks followed once: a HF snapshot links to blobs)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total
