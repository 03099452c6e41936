"""What the About dialog says: Hearth's version, where its files live, and what the engine
can run here (the facts ``hearth doctor`` prints, from ``engine.api.doctor_info``), as
data and as plain text for the "Copy details" button. No Qt: the dialog only lays it out.
"""

from __future__ import annotations

import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

from app.services.user_data import DATA_DIR_ENV, data_dir_path
from app.services.version import hearth_version

#: Where the logs go: Hearth writes no log files (said, so nobody looks for one).
LOGS_NOTE = ("not written to files: run `hearth -v` in a terminal to see the engine's log; the "
             "server's requests are listed on the Server page")


@dataclass(frozen=True, slots=True)
class Location:
    """One place Hearth keeps files: what it holds, its path (or a sentence where there is
    none), and how to move it."""

    what: str
    path: str
    note: str = ""


def data_locations(*, chat_db: Path | None = None, settings_file: str | None = None) -> list[Location]:
    """Every place Hearth reads or writes, the overrides each honours named. ``chat_db`` /
    ``settings_file``: the ones the running app uses (default: where they go by default)."""
    from huggingface_hub import constants

    from engine.api import cache_dir, default_model_file, default_model_install_hint

    data = data_dir_path()
    default = default_model_file()
    out = [
        Location("Chat history", str(chat_db or data / "chats.sqlite3")),
        Location("Your data", str(data), "chats, model library, download queue, saved comparisons, Hub "
                                         f"token; ${DATA_DIR_ENV} moves it"),
        Location("Downloaded models", str(constants.HF_HUB_CACHE),
                 "the Hugging Face cache; $HF_HUB_CACHE or $HF_HOME moves it"),
        Location("Converted models", str(cache_dir()), "Hearth's cache; $HEARTH_CACHE_DIR moves it"),
        Location("Default model", str(default) if default else "not installed",
                 "" if default else default_model_install_hint()),
    ]
    if settings_file:
        out.append(Location("Settings", settings_file))
    out.append(Location("Logs", LOGS_NOTE))
    return out


def engine_summary(info: dict) -> dict[str, list[tuple[str, str]]]:
    """``doctor_info()`` as titled lists of (name, status): devices, attention backends,
    quantization methods, weight and KV-cache dtypes, versions. Status "ok" or why not."""
    def status(reasons: list[str]) -> str:
        return "ok" if not reasons else "unavailable: " + "; ".join(reasons)

    devices = [("cpu", f"{info['cpu']['name']}, {_gib(info['cpu']['ram_available_bytes'])} RAM available")]
    if "cpu_kernel" in info:
        devices.append(("cpu kernel", info["cpu_kernel"]["summary"]))
    devices += [(f"cuda:{d['index']}", f"{d['name']}, {_gib(d['free_bytes'])} free of {_gib(d['total_bytes'])}")
                for d in info["cuda"]]
    if not info["cuda"]:
        devices.append(("cuda", info.get("cuda_note") or "none"))
    return {
        "Devices": devices,
        f"Attention backends (on {info['attention_device']})":
            [(name, status(r)) for name, r in info["attention"].items()],
        "Quantization": [(name, status(r)) for name, r in info["quantization"].items()],
        "Weight dtypes": [(name, status(r)) for name, r in info["dtypes"].items()],
        "KV-cache dtypes": [(name, status(r)) for name, r in info["kv_cache_dtypes"].items()],
        "Versions": [("python", f"{info['python']} ({info['platform']})")]
                    + [(dist, ver) for dist, ver in info["versions"].items()],
    }


def about_text(locations: list[Location], engine: dict[str, list[tuple[str, str]]] | None) -> str:
    """The plain-text report "Copy details" puts on the clipboard (for a bug report)."""
    lines = [f"Hearth {hearth_version()}",
             f"{platform.system()} {platform.machine()}, Python {sys.version.split()[0]} ({sys.executable})",
             "", "Where your data lives"]
    for loc in locations:
        lines.append(f"  {loc.what}: {loc.path}" + (f" ({loc.note})" if loc.note else ""))
    if engine is None:
        lines += ["", "Engine: not checked yet"]
    for title, rows in (engine or {}).items():
        lines += ["", title]
        lines += [f"  {name}: {value}" for name, value in rows]
    return "\n".join(lines) + os.linesep


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"
