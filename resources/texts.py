"""Paths of the bundled public-domain texts (see resources/text/SOURCES.md).

The calibration text feeds the calibrating quantizers (AWQ, GPTQ); the evaluation text, a
different book, is what ``hearth eval`` scores by default.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def _bundled(name: str) -> Path:
    # resources/ ships as package data (pyproject: resources = ["**/*"]), so the files are
    # plain files next to this module in a source tree, a wheel install or an editable one.
    return Path(str(files("resources").joinpath("text", name)))


def calibration_text_path() -> Path:
    """Jane Austen, Pride and Prejudice, chapters 1-29 (66,669 SmolLM2 tokens)."""
    return _bundled("calibration.txt")


def evaluation_text_path() -> Path:
    """Lewis Carroll, Alice's Adventures in Wonderland (37,014 SmolLM2 tokens)."""
    return _bundled("evaluation.txt")
