"""Ids for requests and responses, unique within this process and unlikely to repeat
across runs: a random stem drawn once, then a counter. ``uuid.uuid4`` per request read
the OS's random source every time (a system call, during which another thread may take
the GIL from the server's event loop); a counter needs none. The ids are sequential
within a run: nothing treats them as secrets (the server keeps no state a client could
reach by another's id)."""

from __future__ import annotations

import itertools
import secrets

_STEM = secrets.token_hex(6)  # 12 hex digits
_COUNT = itertools.count()


def unique_hex(digits: int = 24) -> str:
    """At least ``digits`` hex digits (``digits`` >= 16): the stem, then the counter,
    which grows past its share after 16 ** (digits - 12) ids, staying unique."""
    if digits < 16:
        raise ValueError(f"an id needs at least 16 hex digits, got {digits}")
    return f"{_STEM}{next(_COUNT):0{digits - len(_STEM)}x}"
