"""Numbers read back from the settings file, which a person (or a crash mid-write) may have
left with something else in them: a value that isn't a number is the default instead, so
the window still opens (a bad ``sampling/max_tokens`` once stopped the app at start)."""

from __future__ import annotations


def saved_int(settings, key: str, default: int) -> int:
    try:
        return int(settings.value(key, default))
    except (TypeError, ValueError, OverflowError):
        return default


def saved_float(settings, key: str, default: float) -> float:
    try:
        value = float(settings.value(key, default))
    except (TypeError, ValueError, OverflowError):
        return default
    return value if value == value else default  # not NaN
