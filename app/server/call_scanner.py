"""An incremental reader of one tool call's JSON object (``{"name": ..., "arguments":
{...}}``) as the model writes it, so a stream can send the call's name as soon as it is
known and its ``arguments`` as raw JSON text, fragment by fragment, while they are written.

It checks JSON syntax strictly as it goes (the rules of ``json.loads``, ``NaN`` and
``Infinity`` included), so every fragment it clears is a start of valid JSON text: a call
that turns malformed stops being streamed at the first bad character, never after it.
What it reports about the outer object: the first ``"name"`` string, decoded, and where
the first ``"arguments"`` value starts and ends in the text. It does not build values;
``json.loads`` on the whole call stays the judge of what the call is.

Why our own: the incremental JSON libraries (ijson, jiter's partial mode,
partial-json-parser) give values, not the offsets of a value's raw text in the input;
streaming the raw text is what makes the fragments add up to exactly what the model wrote.
"""

from __future__ import annotations

import json
import re

_STRING_RUN = re.compile(r'[^"\\\x00-\x1f]*')  # a string's plain characters, skipped in one step
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_NUMBER_CHARS = frozenset("0123456789+-.eE")
_WORDS = ("true", "false", "null", "NaN", "Infinity", "-Infinity")
_ESCAPES = frozenset('"\\/bfnrtu')
_HEX = frozenset("0123456789abcdefABCDEF")
_SPACE = frozenset(" \t\n\r")


class CallScanner:
    """Give it a call's text as it grows (``read``, or ``feed`` a piece); read ``name``,
    ``args_start``, ``args_end`` (offsets in ``text``), ``args_is_object``, ``pos`` (how
    far the text is read and found valid), ``closed`` (the object ended at ``pos``:
    reading stops there) and ``failed`` (a syntax error at ``pos``: reading stops)."""

    def __init__(self, args_keys: tuple[str, ...] = ("arguments",), start: int = 0) -> None:
        self.args_keys = args_keys  # the keys whose (first) value is the arguments
        self.text = ""
        self.pos = start  # where the object (or whitespace before it) begins in the text
        self.failed = False
        self.closed = False  # the outer object's closing brace was read
        self.name: str | None = None
        self.args_start: int | None = None
        self.args_end: int | None = None
        self.args_is_object = False
        self._stack: list[str] = []  # open containers, "{" or "["
        self._expect = "start"  # start, value, key, key_or_end, colon, comma_or_end, value_or_end, done
        self._token: str | None = None  # the scalar being read: "string", "number" or "word"
        self._token_start = 0
        self._escape = 0  # in a string: 0 none, -1 after a backslash, n: hex digits left of \uXXXX
        self._key: str | None = None  # the outer object's key whose value is being read
        self._is_key = False  # the string being read is a key

    def read(self, text: str, end: int | None = None) -> None:
        """Read on in ``text``, the call's text so far (what was read before unchanged: it
        only grows), up to ``end`` or the object's end. No copy is kept but this reference,
        so a long call costs linear time."""
        self.text, end = text, len(text) if end is None else end
        while not self.failed and not self.closed and self.pos < end:
            if not self._step(end):
                self.failed = True

    def feed(self, text: str) -> None:
        """Read ``text`` on from the text read so far."""
        self.read(self.text + text)

    # -- one step: a character (or a run of a string's plain characters) ---------------------

    def _step(self, end: int) -> bool:
        text, i = self.text, self.pos
        if self._token == "string":
            return self._string_step(text, i, end)
        c = text[i]
        if self._token == "number":
            if c in _NUMBER_CHARS:
                self.pos += 1
                return True
            if c == "I" and text[self._token_start:i] == "-":
                self._token = "word"
                return True
            if not _NUMBER.fullmatch(text, self._token_start, i):
                return False
            self._token = None
            self._value_ended()
            return True  # the character after the number is read by the next step
        if self._token == "word":
            word = text[self._token_start:i + 1]
            if any(w.startswith(word) for w in _WORDS):
                self.pos += 1
                return True
            if text[self._token_start:i] not in _WORDS:
                return False
            self._token = None
            self._value_ended()
            return True
        if c in _SPACE:
            self.pos += 1
            return True
        return self._structure(c, i)

    def _string_step(self, text: str, i: int, end: int) -> bool:
        if self._escape == -1:
            if text[i] not in _ESCAPES:
                return False
            self._escape = 4 if text[i] == "u" else 0
        elif self._escape > 0:
            if text[i] not in _HEX:
                return False
            self._escape -= 1
        elif text[i] == "\\":
            self._escape = -1
        elif text[i] == '"':
            self.pos = i + 1
            self._token = None
            self._string_ended(text[self._token_start:i + 1])
            return True
        elif text[i] < " ":
            return False  # a raw control character: json.loads refuses it too
        else:
            self.pos = _STRING_RUN.match(text, i, end).end()
            return True
        self.pos = i + 1
        return True

    def _structure(self, c: str, i: int) -> bool:
        expect = self._expect
        if expect in ("key", "key_or_end"):
            if c == '"':
                self._is_key = True
                self._begin("string", i)
                return True
            return c == "}" and expect == "key_or_end" and self._close("{", i)
        if expect == "colon":
            if c != ":":
                return False
            self._expect = "value"
        elif expect == "comma_or_end":
            if c == ",":
                self._expect = "key" if self._stack[-1] == "{" else "value"
            elif c in "}]":
                return self._close("{" if c == "}" else "[", i)
            else:
                return False
        elif expect in ("start", "value", "value_or_end"):
            if expect == "start" and c != "{":
                return False  # a call is an object
            if c == "]" and expect == "value_or_end":
                return self._close("[", i)
            self._value_started(c, i)
            if c in "{[":
                self._stack.append(c)
                self._expect = "key_or_end" if c == "{" else "value_or_end"
            elif c == '"':
                self._begin("string", i)
                return True
            elif c == "-" or c.isdigit():
                self._begin("number", i)
                return True
            elif any(w.startswith(c) for w in _WORDS):
                self._begin("word", i)
                return True
            else:
                return False
        else:  # done (not reached: reading stops at the object's end)
            return False
        self.pos = i + 1
        return True

    # -- bookkeeping -----------------------------------------------------------------------------

    def _begin(self, token: str, i: int) -> None:
        self._token, self._token_start, self.pos = token, i, i + 1

    def _close(self, opener: str, i: int) -> bool:
        if not self._stack or self._stack[-1] != opener:
            return False
        self._stack.pop()
        self.pos = i + 1
        if self._stack:
            self._value_ended()
        else:
            self._expect, self.closed = "done", True
        return True

    def _value_started(self, c: str, i: int) -> None:
        if len(self._stack) == 1 and self._key in self.args_keys and self.args_start is None:
            self.args_start, self.args_is_object = i, c == "{"

    def _string_ended(self, raw: str) -> None:
        if self._is_key:
            self._is_key = False
            if len(self._stack) == 1:
                self._key = json.loads(raw)
            self._expect = "colon"
            return
        if len(self._stack) == 1 and self._key == "name" and self.name is None:
            self.name = json.loads(raw)
        self._value_ended()

    def _value_ended(self) -> None:
        """A value just ended (``pos`` is just past it); at the outer object's level, note
        where the arguments end."""
        if len(self._stack) == 1:
            if self._key in self.args_keys and self.args_end is None and self.args_start is not None:
                self.args_end = self.pos
            self._key = None
        self._expect = "comma_or_end"
