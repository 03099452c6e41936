"""Short names for models, for people: what the chat header, the status bar and every
stats line show. The full path stays in ``model_info.path``.

A model is usually loaded by a path nobody chose to read: the Library hands over a Hub
cache snapshot (``…/models--org--name/snapshots/<commit hash>``), and a converted GGUF or
the bundled default live in Hearth's cache under generated folder names. Each gets the
name its user knows it by:

* ``None`` / ``"default"`` and the default's converted folder: ``SmolLM2-135M-Instruct``;
* a Hub repo id, or a folder inside a Hub cache snapshot: the repo id (``org/name``);
* a ``.gguf`` file (also one in the Hub cache): the file's name;
* a GGUF converted into Hearth's cache (``gguf/<stem>-<key>``): ``<stem>.gguf``;
* any other folder: the folder's name.

Torch-free and cheap (at most one ``stat``), so the app can name a model before loading it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
#: The default model's converted folder in Hearth's models cache.
DEFAULT_FOLDER = f"default-{DEFAULT_MODEL_NAME}"
#: A converted GGUF's folder: ``<file stem>-<12 hex digits of the source's key>``.
_CONVERTED_GGUF = re.compile(r"(?P<stem>.+)-[0-9a-f]{12}")
_HUB_REPO_FOLDER = "models--"


def model_display_name(ref: str | os.PathLike | None) -> str:
    """The name to show for ``ref`` (what was passed to ``Engine.load(model=…)``)."""
    if ref is None:
        return DEFAULT_MODEL_NAME
    text = str(ref).strip()
    if not text or text == "default":
        return DEFAULT_MODEL_NAME
    if text.startswith("shape:") or not _is_path(text):
        return text  # a Hub repo id or a benchmark shape: already a name
    path = Path(text).expanduser()
    if path.suffix.lower() == ".gguf":
        return path.name
    repo = hub_cache_repo_id(path)
    if repo is not None:
        return repo
    if path.name == DEFAULT_FOLDER:
        return DEFAULT_MODEL_NAME
    match = _CONVERTED_GGUF.fullmatch(path.name)
    if match and path.parent.name == "gguf":
        return f"{match['stem']}.gguf"
    return path.name or text


def hub_cache_repo_id(path: str | os.PathLike) -> str | None:
    """``org/name`` for a path inside a Hugging Face cache snapshot
    (``…/models--org--name/snapshots/<hash>[/sub/folder]``), with any folder below the
    snapshot appended; None for any other path. Repo names never contain ``--``, so the
    cache's ``--`` separators map back to ``/`` exactly."""
    parts = Path(path).parts
    for i in range(len(parts) - 2, 0, -1):
        if parts[i] == "snapshots" and parts[i - 1].startswith(_HUB_REPO_FOLDER):
            repo = parts[i - 1][len(_HUB_REPO_FOLDER):].replace("--", "/")
            return "/".join([repo, *parts[i + 2:]]) if repo else None
    return None


def _is_path(text: str) -> bool:
    """Whether ``text`` names a file or folder rather than a Hub repo id (``org/name``)."""
    seps = {os.sep, os.altsep} - {None}
    if text.startswith(("~", ".", *seps)) or text.lower().endswith(".gguf"):
        return True
    if text.count("/") > 1 or (os.sep != "/" and (os.sep in text or ":" in text)):
        return True
    return Path(text).expanduser().exists()  # a relative folder that looks like org/name
