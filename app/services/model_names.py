"""Readable names for model references: what the user sees instead of a path.

A model reference is what the engine loads: ``"default"``, a Hub repo id, a model
folder, a ``.gguf`` file, or a folder inside the Hugging Face cache
(``…/models--owner--name/snapshots/<commit>``), whose last part is a commit hash that
means nothing to anyone. Qt-free and pure: the name comes from the text alone, no disk.
"""

from __future__ import annotations

import os
from pathlib import PurePath

#: What the bundled default model is called in the library list too.
DEFAULT_MODEL_LABEL = "SmolLM2-135M-Instruct (default)"
_CACHE_PREFIX = "models--"


def hub_cache_repo_id(path: str | os.PathLike) -> tuple[str, str] | None:
    """``(repo_id, path inside the snapshot)`` for a path in the Hugging Face cache
    (``…/models--owner--name/snapshots/<commit>[/file]``), else ``None``. The inner path
    is ``""`` for the snapshot folder itself."""
    parts = PurePath(path).parts
    for i, part in enumerate(parts[:-2]):
        if part.startswith(_CACHE_PREFIX) and parts[i + 1] == "snapshots":
            # The cache writes "owner/name" as "owner--name"; owners never contain "--".
            repo_id = part[len(_CACHE_PREFIX):].replace("--", "/", 1)
            return repo_id, "/".join(parts[i + 3:])
    return None


def readable_model_name(ref: str | os.PathLike | None) -> str:
    """The name to show for a model reference.

    ``None`` / ``"default"`` -> the bundled model's name; a Hub cache snapshot folder ->
    its repo id (``"acme/tiny-chat"``), a file in one -> ``"acme/tiny-chat-GGUF/x.gguf"``
    (as the library lists it); any other path -> its file or folder name; a repo id stays
    as it is.
    """
    if ref is None or str(ref).strip() in ("", "default"):
        return DEFAULT_MODEL_LABEL
    text = str(ref).strip()
    cached = hub_cache_repo_id(text)
    if cached is not None:
        repo_id, inner = cached
        return f"{repo_id}/{inner}" if inner else repo_id
    if _looks_like_path(text):
        path = PurePath(os.path.expanduser(text))
        return path.name or text
    return text


def _looks_like_path(text: str) -> bool:
    """A path rather than a Hub repo id (``owner/name`` has exactly one slash, no dots
    leading, no drive or root)."""
    if text.startswith(("/", "~", ".", "\\")) or PurePath(text).is_absolute() or (len(text) > 1 and text[1] == ":"):
        return True
    return text.count("/") != 1 or text.lower().endswith(".gguf")
