"""Request and response ids (app.services.ids): unique without reading the OS's random source."""

import re
import subprocess
import sys

import pytest

from app.services import ids


def test_ids_are_unique_hex_of_the_asked_length_with_one_stem():
    made = [ids.unique_hex() for _ in range(5000)] + [ids.unique_hex(16) for _ in range(5000)]
    assert len(set(made)) == len(made)
    assert all(re.fullmatch(r"[0-9a-f]{24}", m) for m in made[:5000])
    assert all(re.fullmatch(r"[0-9a-f]{16,}", m) for m in made[5000:])
    assert len({m[:12] for m in made}) == 1  # one stem per process
    assert len(ids.unique_hex(32)) == 32
    with pytest.raises(ValueError, match="at least 16"):
        ids.unique_hex(12)


def test_a_counter_past_its_digits_still_gives_unique_ids(monkeypatch):
    import itertools

    monkeypatch.setattr(ids, "_COUNT", itertools.count(16**4 - 1))
    a, b = ids.unique_hex(16), ids.unique_hex(16)
    assert a != b and len(a) == 16 and len(b) == 17


def test_each_process_draws_its_own_stem():
    code = "from app.services.ids import unique_hex; print(unique_hex()[:12])"
    stems = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
             for _ in range(2)}
    stems.add(ids.unique_hex()[:12])
    assert len(stems) == 3
