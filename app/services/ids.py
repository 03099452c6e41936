"""Ids for requests and responses, unique within this process and unlikely to repeat
across runs: a random stem drawn once, then a counter. ``uuid.uuid4`` per request read
the OS's random source every time, a system call that lets the engine host's threads
take the GIL from the server's event loop in the middle of a request."""

from __future__ import annotations

import itertools
import secrets

_STEM = secrets.token_hex(6)  # 12 hex digits
_COUNT = itertools.count()


def unique_hex(digits: int = 24) -> str:
    """``digits`` hex digits (at least 16): the stem, then the counter."""
    if digits < 16:
        raise ValueError(f"an id needs at least 16 hex digits, got {digits}")
    return f"{_STEM}{next(_COUNT):0{digits - len(_STEM)}x}"
