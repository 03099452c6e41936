"""The bundled prompt set of ``hearth compare`` and the desktop app's Compare page.

``resources/prompts/compare.json``: five everyday tasks (a factual question, a summary, code,
a translation, a long-context recall of about 1,600 SmolLM2 tokens). Its passages are cut
from the bundled evaluation text (Alice's Adventures in Wonderland; see
resources/text/SOURCES.md, "Prompt set").
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path


@dataclass(frozen=True, slots=True)
class BundledPrompt:
    """One prompt of the set: a short ``name`` (a column or file key), the kind of ``task``
    in words, and the ``prompt`` text sent to the model as the user's message."""

    name: str
    task: str
    prompt: str


def compare_prompts_path() -> Path:
    """The JSON file of the bundled set (package data, a plain file in every install)."""
    return Path(str(files("resources").joinpath("prompts", "compare.json")))


def compare_prompts() -> list[BundledPrompt]:
    """The bundled set, in order (the order the Compare page and the CLI show)."""
    doc = json.loads(compare_prompts_path().read_text(encoding="utf-8"))
    return [BundledPrompt(p["name"], p["task"], p["prompt"]) for p in doc["prompts"]]
