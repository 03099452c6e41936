"""``hearth desktop-entry install|remove``: Hearth in the desktop's launcher, or out of it."""

from __future__ import annotations

import sys

from app.services import desktop_entry


def add_desktop_entry_parser(sub) -> None:
    p = sub.add_parser("desktop-entry", help="add Hearth to the desktop's launcher (a .desktop file and "
                                             "icons, for this user), or remove it")
    p.add_argument("action", choices=("install", "remove"),
                   help="install: write the entry and icons under $XDG_DATA_HOME (~/.local/share); "
                        "remove: delete exactly what install wrote")


def run_desktop_entry(args) -> int:
    try:
        if args.action == "install":
            result = desktop_entry.install()
            print("Hearth is in the launcher (it may take a moment to appear). Wrote:")
        else:
            result = desktop_entry.remove()
            print("Removed:" if result.files else "Nothing of Hearth's to remove.")
    except desktop_entry.DesktopEntryError as exc:
        print(f"hearth: error: {exc}", file=sys.stderr)
        return 2
    for path in result.files:
        print(f"  {path}")
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    return 0
