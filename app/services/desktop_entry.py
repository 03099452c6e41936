"""Putting Hearth in the desktop's launcher: a freedesktop ``.desktop`` file and its icons
(``hearth desktop-entry install|remove``), for the user only (no root).

Where (the XDG Base Directory spec): ``$XDG_DATA_HOME`` (default ``~/.local/share``)
``/applications/hearth.desktop`` and ``/icons/hicolor/<n>x<n>/apps/hearth.png`` plus
``/icons/hicolor/scalable/apps/hearth.svg`` (the Icon Theme spec's fallback theme, which
every desktop searches).

The entry starts the ``hearth`` launcher script of the installation that wrote it, by its
absolute path (a launcher's PATH need not hold a venv's or pipx's ``bin``), and names it
in ``TryExec`` too, so the entry hides itself once that installation is gone. It lists the
files it installed (``X-Hearth-Files``): ``remove`` deletes exactly those, and never a
``hearth.desktop`` another program wrote.

The desktops' caches (``update-desktop-database``, ``gtk-update-icon-cache``) are
refreshed where the user's system keeps them and those tools are installed; without them
the launcher finds the files by itself.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

from app.services.version import hearth_version
from resources.icons import ICON_NAME, PNG_SIZES, png_icon, svg_icon

#: The desktop file ID (its file name without ``.desktop``); Qt's desktopFileName matches it.
DESKTOP_ID = "hearth"
#: The key that says Hearth wrote the file, and the one listing the files it installed.
MARK_KEY = "X-Hearth-Installed-By"
FILES_KEY = "X-Hearth-Files"
#: Characters the Desktop Entry spec reserves in Exec: an argument holding one is quoted.
_EXEC_RESERVED = set(" \t\n\"'\\><~|&;$*?#()`")


class DesktopEntryError(RuntimeError):
    """The entry could not be written or found; the message says what to do."""


@dataclass(slots=True)
class DesktopEntryResult:
    """What ``install`` wrote or ``remove`` deleted, and what was left alone and why."""

    files: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def data_home() -> Path:
    """``$XDG_DATA_HOME``, or ``~/.local/share`` when it is unset, empty or relative (the
    spec says a relative one is invalid and must be ignored)."""
    value = os.environ.get("XDG_DATA_HOME", "")
    if value and os.path.isabs(value):
        return Path(value)
    return Path.home() / ".local" / "share"


def desktop_file(home: Path | None = None) -> Path:
    return (home or data_home()) / "applications" / f"{DESKTOP_ID}.desktop"


def icon_targets(home: Path | None = None) -> list[tuple[Path, Path]]:
    """(bundled icon, where it goes in the hicolor theme) for every icon Hearth installs."""
    hicolor = (home or data_home()) / "icons" / "hicolor"
    pairs = [(svg_icon(), hicolor / "scalable" / "apps" / f"{ICON_NAME}.svg")]
    pairs += [(png_icon(n), hicolor / f"{n}x{n}" / "apps" / f"{ICON_NAME}.png") for n in PNG_SIZES]
    return pairs


def hearth_launcher() -> Path:
    """The absolute path of this installation's ``hearth`` script: the one running now when
    it was started by that name, else the one in this interpreter's scripts folder (a venv's,
    pipx's or uv's ``bin``), else the user scheme's (``pip install --user``).

    Raises:
        DesktopEntryError: none exists (Hearth run as ``python -m`` from a bare checkout).
    """
    running = Path(os.path.abspath(sys.argv[0])) if sys.argv and sys.argv[0] else None
    candidates = [running] if running is not None and running.name == "hearth" else []
    for scheme in (None, f"{os.name}_user"):
        try:
            scripts = sysconfig.get_path("scripts", scheme) if scheme else sysconfig.get_path("scripts")
        except KeyError:
            continue
        candidates.append(Path(scripts) / "hearth")
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return path
    raise DesktopEntryError(
        "no `hearth` launcher script found for this Python (" + sys.executable + "): install Hearth "
        "(Hearth's wheel with pip or pipx, or bash packaging/dev.sh) and run `hearth desktop-entry "
        "install` from that installation.")


def exec_argument(arg: str) -> str:
    """One Exec argument as the Desktop Entry spec wants it: quoted when it holds a
    reserved character, with ``"``, `````, ``$`` and ``\\`` escaped inside the quotes, and
    ``%`` doubled (field codes). The file's string escaping is applied later, to the line."""
    arg = arg.replace("%", "%%")
    if not any(c in _EXEC_RESERVED for c in arg):
        return arg
    escaped = "".join("\\" + c if c in '"`$\\' else c for c in arg)
    return f'"{escaped}"'


def _string_value(text: str) -> str:
    """A value escaped as the spec's ``string`` type: backslash and control characters."""
    return (text.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t")
            .replace("\r", "\\r"))


def entry_text(launcher: Path, files: list[Path]) -> str:
    """The ``.desktop`` file: starts ``launcher gui``; lists ``files`` for ``remove``."""
    exec_line = " ".join(exec_argument(a) for a in (str(launcher), "gui"))
    lines = [
        "[Desktop Entry]",
        "Type=Application",
        "Version=1.4",  # the newest desktop-file-validate knows (Debian 12: 0.26); 1.5 adds nothing used here
        "Name=Hearth",
        "GenericName=Local LLM Chat",
        "Comment=Run large language models locally on your own GPUs - fast, and see why",
        f"Icon={ICON_NAME}",
        f"TryExec={_string_value(str(launcher))}",
        f"Exec={_string_value(exec_line)}",
        "Terminal=false",
        "Categories=Utility;",  # one main category, so menus list it once
        "Keywords=LLM;AI;chat;language model;GGUF;local;",
        "StartupNotify=true",
        "StartupWMClass=Hearth",  # the window's WM_CLASS (Qt: the application name, app.gui.app)
        f"{MARK_KEY}=hearth {hearth_version()}",
        f"{FILES_KEY}=" + "".join(_string_value(str(p)).replace(";", "\\;") + ";" for p in files),
        "",
    ]
    return "\n".join(lines)


def install(home: Path | None = None) -> DesktopEntryResult:
    """Write the icons, then the ``.desktop`` file (so the launcher never lists an entry
    without its icon); replaces what an earlier install wrote. Returns the files written."""
    home = home or data_home()
    launcher = hearth_launcher()
    result = DesktopEntryResult()
    target = desktop_file(home)
    if target.exists() and not _is_ours(target):
        raise DesktopEntryError(f"{target} exists and was not written by Hearth: move it aside first "
                                "(Hearth does not overwrite another program's launcher entry).")
    try:
        for source, dest in icon_targets(home):
            _write(dest, source.read_bytes())
            result.files.append(dest)
        _write(target, entry_text(launcher, result.files).encode("utf-8"))
    except OSError as exc:
        raise DesktopEntryError(f"could not write {exc.filename or 'the launcher entry'}: "
                                f"{exc.strerror or exc}. Check that {home} is writable "
                                "(or point XDG_DATA_HOME elsewhere).") from exc
    result.files.append(target)
    result.notes += _refresh_caches(home)
    return result


def remove(home: Path | None = None) -> DesktopEntryResult:
    """Delete what ``install`` wrote: the files the entry lists, then the entry, and the
    folders they leave empty. Without an entry of Hearth's, only icons identical to
    Hearth's own are deleted."""
    home = home or data_home()
    result = DesktopEntryResult()
    target = desktop_file(home)
    if target.exists() and not _is_ours(target):
        result.notes.append(f"left {target} alone: another program wrote it")
        listed = None
    else:
        listed = _listed_files(target) if target.exists() else None
    if listed is None:  # no entry of ours: the icons Hearth would install, if they are ours
        listed = [dest for source, dest in icon_targets(home)
                  if dest.is_file() and dest.read_bytes() == source.read_bytes()]
    if target.exists() and _is_ours(target):
        listed.append(target)
    for path in listed:
        try:
            path.unlink()
            result.files.append(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            result.notes.append(f"could not delete {path}: {exc.strerror or exc}")
    _prune_empty_folders(result.files, home)
    if result.files:
        result.notes += _refresh_caches(home)
    return result


def _prune_empty_folders(removed: list[Path], home: Path) -> None:
    """The folders install made for those files (``icons/hicolor/48x48/apps`` ...), where
    they are empty now: an empty one holds nothing of anyone's."""
    for path in removed:
        folder = path.parent
        while folder != home and home in folder.parents:
            try:
                folder.rmdir()  # only ever succeeds on an empty folder
            except OSError:
                break
            folder = folder.parent


def read_entry(path: Path) -> dict[str, str]:
    """The ``[Desktop Entry]`` group's keys and raw values (tests and ``remove``)."""
    values: dict[str, str] = {}
    group = None
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        if line.startswith("["):
            group = line.strip()
            continue
        if group == "[Desktop Entry]" and "=" in line:
            key, value = line.split("=", 1)
            values[key.strip()] = value.strip()
    return values


def _is_ours(path: Path) -> bool:
    try:
        return MARK_KEY in read_entry(path)
    except (OSError, UnicodeDecodeError):
        return False


def _listed_files(path: Path) -> list[Path] | None:
    raw = read_entry(path).get(FILES_KEY)
    if raw is None:
        return None
    items, current, chars = [], "", iter(raw)
    for c in chars:  # split on unescaped ';', undo the string escapes
        if c == "\\":
            nxt = next(chars, "")
            current += {"s": " ", "n": "\n", "t": "\t", "r": "\r"}.get(nxt, nxt)
        elif c == ";":
            items.append(current)
            current = ""
        else:
            current += c
    if current:
        items.append(current)
    # Only files in the places install writes to: a hand-edited list can't delete elsewhere.
    allowed = {dest for _, dest in icon_targets(path.parents[1])}
    return [Path(p) for p in items if Path(p) in allowed]


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _refresh_caches(home: Path) -> list[str]:
    """Bring the desktop's caches up to date where the user's system keeps them: the
    desktop database (``applications/mimeinfo.cache``) and GTK's icon cache
    (``icons/hicolor/icon-theme.cache``), with their tools where installed. A cache that
    does not exist is not created (the launcher reads the files without one, and remove
    then leaves nothing behind); never fails."""
    notes = []
    hicolor = home / "icons" / "hicolor"
    try:
        os.utime(hicolor)  # the Icon Theme spec: a changed folder tells caches to look again
    except OSError:
        pass
    runs = [("update-desktop-database", home / "applications" / "mimeinfo.cache",
             ["-q", str(home / "applications")]),
            ("gtk-update-icon-cache", hicolor / "icon-theme.cache", ["-q", "-f", "-t", str(hicolor)])]
    for tool, cache, args in runs:
        exe = shutil.which(tool)
        if exe is None or not cache.is_file():
            continue
        try:
            done = subprocess.run([exe, *args], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.SubprocessError) as exc:
            notes.append(f"{tool} did not run ({exc}); the launcher picks the change up by itself")
            continue
        if done.returncode != 0:
            notes.append(f"{tool} failed ({done.stderr.strip()[:200]}); the launcher picks the change "
                         "up by itself")
    return notes
