"""How the Models page writes sizes, counts, speeds and times (plain functions, no Qt)."""

from __future__ import annotations

from engine.api import format_bytes


def human_bytes(n: int | float | None) -> str:
    """``1536`` -> ``"1.5 KiB"``; ``None`` -> ``"?"`` (the engine's formatter, which the
    download and memory messages use too)."""
    return "?" if n is None else format_bytes(n)


def human_count(n: int | None) -> str:
    """Parameter counts: ``8_030_261_248`` -> ``"8.0B"``, ``336_192`` -> ``"336K"``."""
    if n is None:
        return "?"
    for scale, suffix in ((10**12, "T"), (10**9, "B"), (10**6, "M"), (10**3, "K")):
        if n >= scale:
            value = n / scale
            return f"{value:.1f}{suffix}" if value < 100 else f"{value:.0f}{suffix}"
    return str(n)


def human_duration(seconds: float | None) -> str:
    """ETA text: ``83`` -> ``"1:23"``, ``3725`` -> ``"1:02:05"``."""
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "–"
    s = int(round(seconds))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def download_line(status) -> str:
    """``"12.0 MiB of 140.0 MiB · 5.2 MiB/s · ETA 0:23"`` for a ``DownloadStatus``."""
    if status.state == "done":
        return f"done · {human_bytes(status.bytes_total)}"
    if status.state == "failed":
        return f"failed: {status.error}"
    if status.state == "cancelled":
        if status.partial_kept and status.bytes_done:
            return f"cancelled · {_progress(status)} kept on disk: Retry continues from there"
        return "cancelled"
    if status.state == "paused":
        return f"paused · {_progress(status)}: Resume continues from there"
    if status.state == "queued":
        return "queued" + (f" · {human_bytes(status.bytes_done)} already here" if status.bytes_done else "")
    parts = [f"{human_bytes(status.bytes_done)} of {human_bytes(status.bytes_total)}"]
    if status.speed_bps > 0:
        parts.append(f"{human_bytes(status.speed_bps)}/s")
        parts.append(f"ETA {human_duration(status.eta_s)}")
    if status.current_file:
        parts.append(status.current_file)
    return " · ".join(parts)


def _progress(status) -> str:
    """``"120.0 KiB of 660.0 KiB (18%)"`` (no total or percentage while the file list is unknown)."""
    if not status.bytes_total:
        return human_bytes(status.bytes_done)
    return (f"{human_bytes(status.bytes_done)} of {human_bytes(status.bytes_total)} "
            f"({100 * status.bytes_done // status.bytes_total}%)")  # floored, as the bar shows it
