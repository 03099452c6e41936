"""``hearth serve``: refusals before anything loads (another address without a key, an
empty key file, a port in use), and a real server process that answers the openai client
and stops cleanly on Ctrl+C (SIGINT) with a stream in flight."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from app.cli import main

REPO = Path(__file__).resolve().parents[2]


def run(capsys, *argv) -> tuple[int, str]:
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.10", "::", "my-box.local"])
def test_another_address_needs_an_api_key(capsys, host):
    rc, err = run(capsys, "serve", "--host", host)
    assert rc == 2 and "needs an API key" in err and "--api-key" in err and "Traceback" not in err


def test_any_web_page_needs_an_api_key(capsys):
    rc, err = run(capsys, "serve", "--allowed-origins", "*")
    assert rc == 2 and "every web page" in err and "--api-key" in err


def test_an_origin_that_is_not_one_is_refused(capsys):
    rc, err = run(capsys, "serve", "--allowed-origins", "localhost:3000")
    assert rc == 2 and "--allowed-origins" in err and "not a web origin" in err


def test_loopback_names_need_no_key():
    from app.commands.serve import is_loopback

    assert all(is_loopback(h) for h in ("127.0.0.1", "localhost", "::1", "127.0.0.5"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "10.0.0.1", "example.com"))


def test_empty_key_file_is_refused(capsys, tmp_path):
    f = tmp_path / "key.txt"
    f.write_text("\n")
    rc, err = run(capsys, "serve", "--host", "0.0.0.0", "--api-key-file", f)
    assert rc == 2 and "empty" in err


def test_port_in_use_is_one_line(capsys, tiny_models):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        rc, err = run(capsys, "serve", "--model", tiny_models["llama-tied"], "--device", "cpu",
                      "--port", s.getsockname()[1])
    assert rc == 2 and "--port" in err and "Traceback" not in err


@pytest.mark.slow
def wait_until_up(proc: subprocess.Popen, base: str) -> None:
    """Until ``hearth serve`` at ``base`` answers /health (two minutes at most; the
    process must not have ended)."""
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, proc.stderr.read()
        try:
            if httpx.get(f"{base}/health", timeout=2).json()["status"] == "ok":
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "the server did not come up"
        time.sleep(0.2)


def test_serve_answers_and_ctrl_c_stops_it_cleanly(tiny_models, tmp_path):
    import openai

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    key_file = tmp_path / "key"
    key_file.write_text("sk-from-a-file\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve", "--model", str(tiny_models["llama-tied"]), "--device", "cpu",
         "--attention", "torch", "--max-model-len", "256", "--port", str(port), "--api-key-file", str(key_file)],
        cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until_up(proc, base)
        with openai.OpenAI(base_url=f"{base}/v1", api_key="sk-from-a-file", max_retries=0) as client:
            r = client.chat.completions.create(model=client.models.list().data[0].id, max_tokens=4,
                                               messages=[{"role": "user", "content": "Hi"}])
            assert r.choices[0].message.content is not None
            stream = client.chat.completions.create(model=r.model, max_tokens=200, stream=True,
                                                    messages=[{"role": "user", "content": "Go on"}],
                                                    extra_body={"ignore_eos": True})
            next(iter(stream))  # a stream in flight, then Ctrl+C
            proc.send_signal(signal.SIGINT)
            with pytest.raises(openai.APIError):
                for _ in stream:  # it ends early, saying why
                    pass
        assert proc.wait(60) == 130  # stopped by Ctrl+C, as every hearth command says it
        err = proc.stderr.read()
        assert "server stopped" in err and "sk-from-a-file" not in err and "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_ctrl_c_exits_130_even_when_started_with_sigint_ignored(tmp_path):
    """A process started with SIGINT ignored (a background job, some launchers and test
    runners) gets no KeyboardInterrupt from uvicorn's re-raised signal: the exit status
    still says Ctrl+C stopped it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve", "--model", "shape:tiny", "--device", "cpu", "--attention", "torch",
         "--max-model-len", "128", "--port", str(port)],
        cwd=REPO, env=env, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        wait_until_up(proc, f"http://127.0.0.1:{port}")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 130
        assert "server stopped" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
