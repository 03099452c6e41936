"""``hearth desktop-entry install|remove``: a valid freedesktop entry that starts this
installation's hearth, icons in the hicolor theme, and a remove that takes exactly that away."""

from __future__ import annotations

import configparser
import os
import shlex
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from app.cli import main
from app.services import desktop_entry
from app.services.version import hearth_version


@pytest.fixture
def xdg(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "share"
    home.mkdir()
    monkeypatch.setenv("XDG_DATA_HOME", str(home))
    return home


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


def _entry(path: Path) -> configparser.SectionProxy:
    # configparser reads the spec's key=value groups; case kept, no interpolation of '%'.
    parser = configparser.ConfigParser(interpolation=None, delimiters=("=",), comment_prefixes=("#",))
    parser.optionxform = str
    parser.read_string(path.read_text(encoding="utf-8"))
    return parser["Desktop Entry"]


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def test_install_writes_a_valid_entry_and_the_icons(xdg, capsys):
    assert main(["desktop-entry", "install"]) == 0
    out = capsys.readouterr().out
    desktop = xdg / "applications" / "hearth.desktop"
    assert str(desktop) in out

    entry = _entry(desktop)
    assert entry["Type"] == "Application" and entry["Name"] == "Hearth"
    assert entry["Terminal"] == "false" and entry["Icon"] == "hearth"
    assert entry["Categories"].endswith(";") and entry["Keywords"].endswith(";")
    assert entry["X-Hearth-Installed-By"] == f"hearth {hearth_version()}"
    program, *args = shlex.split(entry["Exec"])
    assert Path(program).is_absolute() and os.access(program, os.X_OK) and args == ["gui"]
    assert entry["TryExec"] == program

    svg = xdg / "icons/hicolor/scalable/apps/hearth.svg"
    assert svg.read_bytes().lstrip().startswith(b"<?xml") and b"<svg" in svg.read_bytes()
    png = xdg / "icons/hicolor/256x256/apps/hearth.png"
    assert _png_size(png) == (256, 256)
    for size in (32, 48, 64, 128):
        assert _png_size(xdg / f"icons/hicolor/{size}x{size}/apps/hearth.png") == (size, size)


def test_the_entry_passes_desktop_file_validate(xdg):
    validate = shutil.which("desktop-file-validate")
    if validate is None:
        message = "desktop-file-validate is not installed (Debian: desktop-file-utils; packaging/dev.sh installs it as root)"
        if os.environ.get("HEARTH_REQUIRE_XVFB") == "1":  # CI: the test set-up installs it
            pytest.fail(message)
        pytest.skip(message)
    desktop_entry.install()
    done = subprocess.run([validate, str(xdg / "applications" / "hearth.desktop")],
                          capture_output=True, text=True)
    assert done.returncode == 0 and not done.stdout.strip(), done.stdout + done.stderr


def test_the_entry_starts_this_installations_hearth(xdg):
    desktop_entry.install()
    program, *_ = shlex.split(_entry(xdg / "applications" / "hearth.desktop")["Exec"])
    done = subprocess.run([program, "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"hearth {hearth_version()}"


def test_remove_takes_away_exactly_what_install_wrote(xdg, capsys):
    other = xdg / "applications" / "someone-else.desktop"
    other.parent.mkdir()
    other.write_text("[Desktop Entry]\nType=Application\nName=Other\nExec=other\n")
    before = _files(xdg)
    desktop_entry.install()
    desktop_entry.install()  # again: replaces, adds nothing
    written = _files(xdg) - before
    assert any(p.name == "hearth.desktop" for p in written) and any(p.suffix == ".png" for p in written)

    assert main(["desktop-entry", "remove"]) == 0
    assert "hearth.desktop" in capsys.readouterr().out
    assert _files(xdg) == before  # the icons' folders too; someone-else.desktop stays
    assert main(["desktop-entry", "remove"]) == 0
    assert "Nothing of Hearth's to remove" in capsys.readouterr().out


def test_another_programs_hearth_desktop_is_never_overwritten_or_removed(xdg, capsys):
    theirs = xdg / "applications" / "hearth.desktop"
    theirs.parent.mkdir()
    text = "[Desktop Entry]\nType=Application\nName=Hearth (theirs)\nExec=/opt/hearth/run\n"
    theirs.write_text(text)
    assert main(["desktop-entry", "install"]) == 2
    assert "was not written by Hearth" in capsys.readouterr().err
    desktop_entry.remove()
    assert theirs.read_text() == text


def test_existing_caches_are_refreshed_and_none_are_created(xdg):
    tool = shutil.which("update-desktop-database")
    desktop_entry.install()
    assert not (xdg / "applications" / "mimeinfo.cache").exists()
    if tool is None:
        pytest.skip("update-desktop-database is not installed: the refresh of an existing cache is not checked")
    cache = xdg / "applications" / "mimeinfo.cache"
    cache.write_text("")
    desktop_entry.install()
    assert cache.read_text().startswith("[MIME Cache]")


@pytest.mark.parametrize("arg, expected", [
    ("/usr/bin/hearth", "/usr/bin/hearth"),
    ("/home/a b/bin/hearth", '"/home/a b/bin/hearth"'),
    ('/x/"q"$`\\/hearth', '"/x/\\"q\\"\\$\\`\\\\/hearth"'),
    ("/x/100%/hearth", "/x/100%%/hearth"),
])
def test_exec_arguments_are_quoted_per_the_spec(arg, expected):
    assert desktop_entry.exec_argument(arg) == expected


def test_a_path_with_spaces_survives_the_file_and_exec_escaping(xdg, tmp_path, monkeypatch):
    launcher = tmp_path / "my apps" / "bin" / "hearth"
    launcher.parent.mkdir(parents=True)
    launcher.write_text("#!/bin/sh\n")
    launcher.chmod(0o755)
    monkeypatch.setattr(desktop_entry, "hearth_launcher", lambda: launcher)
    desktop_entry.install()
    entry = _entry(xdg / "applications" / "hearth.desktop")
    assert shlex.split(entry["Exec"]) == [str(launcher), "gui"]


def test_a_relative_xdg_data_home_is_ignored(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_DATA_HOME", "relative/share")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert desktop_entry.data_home() == tmp_path / ".local" / "share"
