"""The entry point of the PyInstaller bundle (packaging/bundle.sh): ``hearth`` as the
console script runs it, plus the two things a frozen program must do first."""

from __future__ import annotations

import multiprocessing
import runpy
import sys


def main() -> int:
    # `hearth serve` runs its engine in a spawned process: the child re-runs this program
    # with multiprocessing's own arguments, which freeze_support() takes over.
    multiprocessing.freeze_support()
    # Tensor-parallel ranks are started as `sys.executable -m engine.runner.tp_worker`; in
    # the bundle sys.executable is this program, so run that module the way python would.
    if len(sys.argv) > 2 and sys.argv[1] == "-m" and sys.argv[2].startswith("engine."):
        module = sys.argv[2]
        sys.argv = [sys.argv[0], *sys.argv[3:]]
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        return 0
    from app.cli import main as hearth_main

    return hearth_main()


if __name__ == "__main__":
    sys.exit(main())
