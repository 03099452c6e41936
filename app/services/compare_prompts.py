"""The prompts of a comparison: the bundled set, or a prompts file.

A prompts file (``hearth compare --prompts FILE``; the Compare page's "Open prompts...") is
UTF-8 (a byte-order mark at its start, or at a line's start in a plain-text file, is dropped), either

- a ``.json`` file: a list of strings, or of objects with a ``"prompt"`` string (the
  bundled set's form; an object ``{"prompts": [...]}`` like the bundled file works too), or
- any other file: plain text, one prompt per block, blocks separated by one or more blank
  lines (a line of only spaces is blank). A prompt's own lines are kept as they are, so a
  prompt may span lines (code, a passage) but can't hold a blank line; use JSON for that.
"""

from __future__ import annotations

import codecs
import json
import re
from pathlib import Path

from engine.api import InvalidRequestError
from resources.prompt_sets import compare_prompts

_LINE_BOM = re.compile("^\ufeff", re.MULTILINE)
_BLANK_LINES = re.compile(r"\n[ \t]*\n(?:[ \t]*\n)*")


def bundled_prompt_texts() -> list[str]:
    """The bundled set's prompts (factual question, summary, code, translation,
    long-context recall), in order."""
    return [p.prompt for p in compare_prompts()]


def bundled_prompt_names() -> list[str]:
    """Short names of the bundled prompts, in the same order (for column headers)."""
    return [p.name for p in compare_prompts()]


def read_prompts_file(path: str | Path) -> list[str]:
    """The prompts of a prompts file (see the module's docstring). Raises
    InvalidRequestError naming the file: unreadable, not UTF-8, not the JSON shape, or no
    prompts in it."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InvalidRequestError(f"cannot read the prompts file {path}: {e.strerror or e}.") from None
    return prompts_from_bytes(data, path)


def prompts_from_bytes(data: bytes, path: Path) -> list[str]:
    """``read_prompts_file`` of bytes read elsewhere (``hearth compare --prompts -``: standard
    input); ``path`` names them in messages and its suffix picks the format (.json)."""
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidRequestError(f"the prompts file {path} is not valid UTF-8 (byte 0x{data[e.start]:02X} at offset "
                                  f"{e.start}); save it as UTF-8.") from None
    prompts = _json_prompts(text, path) if path.suffix.lower() == ".json" else _text_prompts(text)
    if not prompts:
        raise InvalidRequestError(f"the prompts file {path} has no prompts: write one per block of lines, blocks "
                                  "separated by a blank line (or a JSON list of strings in a .json file).")
    return prompts


def _text_prompts(text: str) -> list[str]:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _LINE_BOM.sub("", text)  # files joined with cat each bring their byte-order mark
    return [block.strip("\n") for block in _BLANK_LINES.split(text) if block.strip()]


def _json_prompts(text: str, path: Path) -> list[str]:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidRequestError(f"the prompts file {path} is not valid JSON ({e.msg.removesuffix(' at')} at line "
                                  f"{e.lineno}, column {e.colno}); write a list of strings, or use a plain-text "
                                  "file.") from None
    if isinstance(doc, dict) and isinstance(doc.get("prompts"), list):
        doc = doc["prompts"]
    if not isinstance(doc, list):
        raise InvalidRequestError(f"the prompts file {path} holds a JSON {type(doc).__name__}: write a list of "
                                  'strings, e.g. ["First prompt", "Second prompt"].')
    prompts = []
    for number, item in enumerate(doc, start=1):
        if isinstance(item, dict) and isinstance(item.get("prompt"), str):
            item = item["prompt"]
        if not isinstance(item, str):
            raise InvalidRequestError(f"item {number} of the prompts file {path} is not a string (nor an object with "
                                      'a "prompt" string): write a list of strings.')
        if not item.strip():
            raise InvalidRequestError(f"item {number} of the prompts file {path} is empty: give it some text or "
                                      "remove it.")
        prompts.append(item)
    return prompts
