"""Every benchmark result the README cites is committed: each `...json` / `...log` / `...txt`
name in backticks (with {a,b} alternatives and * wildcards, as the README writes them)
matches at least one file in benchmarks/results/."""

from __future__ import annotations

import fnmatch
import itertools
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _expand(pattern: str) -> list[str]:
    """``a-{x,y}-*.json`` -> ``['a-x-*.json', 'a-y-*.json']`` (nested braces not used)."""
    parts = re.split(r"\{([^{}]*)\}", pattern)
    choices = [[p] if i % 2 == 0 else p.split(",") for i, p in enumerate(parts)]
    return ["".join(c) for c in itertools.product(*choices)]


def test_every_cited_result_is_committed():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    names = set(re.findall(r"`([^`\s]*20\d\d-\d\d-\d\d[^`\s]*\.(?:json|log|txt))`", text))
    assert len(names) > 20  # the README cites its figures
    committed = [p.name for p in (REPO / "benchmarks" / "results").iterdir()]
    missing = [n for n in sorted(names)
               for alt in _expand(n.removeprefix("benchmarks/results/"))
               if not fnmatch.filter(committed, alt)]
    assert not missing, f"the README cites results that are not in benchmarks/results/: {missing}"
