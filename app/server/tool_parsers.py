"""Tool calls parsed out of a model's text, for the families whose chat templates Hearth
knows: Hermes / Qwen2.5 / Qwen3 (``<tool_call>{"name": ..., "arguments": ...}</tool_call>``,
several per answer) and Llama 3.1 (a bare JSON object ``{"name": ..., "parameters": ...}``,
optionally after ``<|python_tag|>``). Plain Python, no web framework: tested on its own.

A parser reads text incrementally (``feed`` as tokens arrive, ``finish`` at the end) and
returns ``Delta``s: content text, a call's start (its id and name), its arguments. Parsing
a whole answer is the same parser fed once (``parse``), giving out nothing early.

Calls stream: a call's start goes out once its name is known and its ``"arguments"``
(Llama: ``"parameters"``) object has begun (arguments written before the name are held
until the name comes), then the arguments as the model's raw JSON text, in fragments, as they are
written (``app.server.call_scanner`` finds them and checks their syntax): the fragments add
up to text that ``json.loads`` reads as the whole answer's arguments; the call's own
closing brace and the tags are never part of them. Arguments written as a JSON string, or
a call without arguments, go out whole when the call ends.

A call that does not parse, or has no name, is given back as plain content (the client
sees what the model wrote, and ``finish_reason`` is not ``tool_calls``) as long as nothing
of it went out. A call found malformed *after* its start went out (a syntax error in its
arguments, text after them that breaks the object, an answer cut off inside it by
``max_tokens``) can't be taken back. We chose not to hold every call to its end (that is
no streaming) and not to make up a closing for it (a client would act on arguments the
model never finished); instead it ends as sent, its arguments stopping at the last
character that was valid JSON (so they may not parse), and:

- its whole block (Llama: the whole answer, which is calls only if all of it is) is given
  out as content too, so a stream's content is always the whole answer's content;
- it is not *made* (``made``): ``finish_reason`` is ``tool_calls`` only if some call ended
  well, as for the whole answer, so a client that acts on ``finish_reason`` never acts on
  a broken call (the whole answer has the same made calls, numbered without the broken);
- a block that is a call after all but not the one streamed (a key written twice:
  ``json.loads`` keeps the last) is given anew, as the next call, with the whole answer's
  value.

So for well-formed calls any split of an answer gives the whole answer's content and calls
(indices, ids' order, names, arguments' values), and for any text the same content.

Whitespace around a call (the newline between two ``<tool_call>`` blocks) is dropped: it
is layout, not an answer; other text is content, as the model wrote it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable

from app.server.call_scanner import CallScanner
from app.services.ids import unique_hex


@dataclass(frozen=True, slots=True)
class Delta:
    """One piece of a parsed answer: ``content`` text, or a call's ``name`` (its start,
    with ``call_id``) or ``arguments`` (JSON text, or a fragment of it: a call's fragments
    add up to its arguments), the call numbered ``index``."""

    content: str | None = None
    index: int | None = None
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None


@dataclass(frozen=True, slots=True)
class ToolCall:
    call_id: str
    name: str
    arguments: str  # a JSON object, as text (OpenAI's shape)


@dataclass(frozen=True, slots=True)
class Parsed:
    """A whole answer: its content (None when only calls were written) and its calls."""

    content: str | None
    calls: list[ToolCall]


def new_call_id() -> str:
    return f"call_{unique_hex()}"


def call_of(text: str) -> tuple[str, str] | None:
    """``(name, arguments as JSON text)`` of one call's JSON, or None when it is not one."""
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: JSON nested past Python's limit
        return None
    return call_from(obj)


def call_from(obj, args_keys: tuple[str, ...] = ("arguments", "parameters")) -> tuple[str, str] | None:
    """``(name, arguments as JSON text)`` of a decoded call object, or None."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = next((obj[k] for k in args_keys if k in obj), {})
    if isinstance(args, str):  # some models write the arguments as a JSON string already
        try:
            args = json.loads(args)
        except (ValueError, RecursionError):
            return None
    if not isinstance(args, dict):
        return None
    return obj["name"], json.dumps(args, ensure_ascii=False)


class ToolParser:
    """Reads one answer. ``feed(text)`` and ``finish()`` return the deltas that are sure
    by then. ``made``: the indices of the calls that ended well; ``broken``: of those
    whose start went out and then broke (see the module's doc). ``stream``: False gives out nothing of a call before
    it ends (``parse``: a whole answer)."""

    def __init__(self, new_id: Callable[[], str] = new_call_id) -> None:
        self._new_id = new_id
        self._next = 0  # the next call's index
        self.made: list[int] = []
        self.broken: list[int] = []
        self.stream = True

    def feed(self, text: str) -> list[Delta]:
        raise NotImplementedError

    def finish(self) -> list[Delta]:
        raise NotImplementedError

    def _start(self, name: str) -> Delta:
        index, self._next = self._next, self._next + 1
        return Delta(index=index, call_id=self._new_id(), name=name)

    def _call(self, name: str, arguments: str) -> list[Delta]:
        start = self._start(name)
        self.made.append(start.index)
        return [start, Delta(index=start.index, arguments=arguments)]


class HermesParser(ToolParser):
    """``<tool_call>{json}</tool_call>`` blocks anywhere in the answer (Hermes, Qwen2.5,
    Qwen3); text outside them is content."""

    OPEN, CLOSE = "<tool_call>", "</tool_call>"

    def __init__(self, new_id: Callable[[], str] = new_call_id) -> None:
        super().__init__(new_id)
        self._buf = ""  # text not yet given out
        self._in_call = False
        self._after_call = False  # drop whitespace right after a call
        self._gap = ""  # the whitespace before the open call (given back if it is not one)
        self._searched = 0  # how much of an open call's text holds no closing tag
        self._scan = CallScanner()  # the open call's JSON, read as it comes
        self._index: int | None = None  # the open call's index, once its start went out
        self._sent = 0  # how far into the open call's text its arguments went out

    def feed(self, text: str) -> list[Delta]:
        self._buf += text
        out: list[Delta] = []
        while True:
            if self._in_call:
                # searched from where the last search left off: a long call costs linear time
                end = self._buf.find(self.CLOSE, max(0, self._searched - len(self.CLOSE) + 1))
                if end < 0:
                    self._searched = len(self._buf)
                    return out + self._streamed()
                inner, self._buf = self._buf[:end], self._buf[end + len(self.CLOSE):]
                self._in_call, self._searched = False, 0
                out += self._ended(inner, closed=True)
                continue
            if self._after_call:
                stripped = self._buf.lstrip()
                if not stripped:
                    self._buf = ""
                    return out
                self._buf, self._after_call = stripped, False
            start = self._buf.find(self.OPEN)
            if start >= 0:
                before = self._buf[:start]
                text = before.rstrip()  # whitespace just before a call is layout
                if text:
                    out.append(Delta(content=text))
                self._gap = before[len(text):]
                self._buf = self._buf[start + len(self.OPEN):]
                self._in_call, self._scan, self._index = True, CallScanner(), None
                continue
            # No tag yet: give out all but what may begin one (and trailing whitespace,
            # which a call may follow).
            keep = _tag_prefix_len(self._buf, self.OPEN)
            head = self._buf[:len(self._buf) - keep]
            sure = head.rstrip()
            if sure:
                out.append(Delta(content=sure))
            self._buf = self._buf[len(sure):]
            return out

    def finish(self) -> list[Delta]:
        if self._in_call:  # the answer ended inside a call (no closing tag): a call if it parses
            inner, self._buf, self._in_call = self._buf, "", False
            return self._ended(inner, closed=False)
        rest, self._buf = self._buf, ""
        if self._after_call:
            rest = rest.strip()
        return [Delta(content=rest)] if rest else []

    def _streamed(self) -> list[Delta]:
        """What the open call can give out now (only at the end of a ``feed``: what a feed
        still holds can be given back as content): its start once its name is known and
        its arguments object has begun, then its arguments as far as they are read."""
        if not self.stream:
            return []
        scan = self._scan
        scan.read(self._buf, len(self._buf) - _tag_prefix_len(self._buf, self.CLOSE))  # not the tag's start
        if scan.name is None or scan.args_start is None or not scan.args_is_object:
            return []
        out = []
        if self._index is None:
            out.append(self._start(scan.name))
            self._index, self._sent = out[0].index, scan.args_start
        upto = scan.args_end if scan.args_end is not None else scan.pos
        if upto > self._sent:
            out.append(Delta(index=self._index, arguments=scan.text[self._sent:upto]))
            self._sent = upto
        return out

    def _ended(self, inner: str, closed: bool) -> list[Delta]:
        call = call_of(inner.strip())
        block = [Delta(content=self._gap + self.OPEN + inner + (self.CLOSE if closed else ""))]
        if self._index is None:  # nothing of it went out: a call, or content
            if call is None:
                return block
            self._after_call = True
            return self._call(*call)
        index, self._index = self._index, None
        rest = _rest(inner, self._scan, self._sent, call)
        if rest is None:  # broken after its start went out: it ends as sent (see the module's doc)
            self.broken.append(index)
            if call is None:
                return block
            self._after_call = True  # a call after all (a key written twice): given anew
            return self._call(*call)
        self.made.append(index)
        self._after_call = True
        return [Delta(index=index, arguments=rest)] if rest else []



class Llama3JsonParser(ToolParser):
    """Llama 3.1's JSON tool calls: the whole answer is ``{"name": ..., "parameters":
    ...}`` (``<|python_tag|>`` may come first when special tokens are kept; several calls
    may be separated by ``;``). An answer that starts with ``{`` is held to its end, then
    given as calls if it all parses as them, else as content; any other answer streams as
    content. Its calls stream as Hermes calls do (the start once the name is known and the
    ``"parameters"`` object has begun, then their fragments), one object after another
    while each is one; none is *made* before the answer's end, as the answer is calls only
    if all of it is."""

    TAG = "<|python_tag|>"
    KEYS = ("parameters", "arguments")

    def __init__(self, new_id: Callable[[], str] = new_call_id) -> None:
        super().__init__(new_id)
        self._buf = ""
        self._mode: str | None = None  # None: undecided; "json": held; "text": streamed
        self._scan: CallScanner | None = None  # the object being read (None: streaming stopped)
        self._open: list[list] = []  # the calls whose start went out: [index, scanner, sent]

    def feed(self, text: str) -> list[Delta]:
        if self._mode == "text":
            return [Delta(content=text)] if text else []
        self._buf += text
        if self._mode == "json":
            return self._streamed()
        head = self._buf.lstrip()
        if head.startswith(self.TAG):
            head = head[len(self.TAG):].lstrip()
        elif self.TAG.startswith(head):
            head = ""  # what may become the tag
        if not head:
            return []  # undecided yet
        if head.startswith("{"):
            self._mode, self._scan = "json", CallScanner(self.KEYS, len(self._buf) - len(head))
            return self._streamed()
        self._mode, rest, self._buf = "text", self._buf, ""
        return [Delta(content=rest)]

    def _streamed(self) -> list[Delta]:
        """Each object's start and fragments as far as read; the next object once one ends
        (streaming stops at anything but a call object, or a call not streamed)."""
        out: list[Delta] = []
        while self.stream and self._scan is not None:
            scan = self._scan
            scan.read(self._buf)
            if scan.name is not None and scan.args_start is not None and scan.args_is_object:
                if not self._open or self._open[-1][1] is not scan:
                    out.append(self._start(scan.name))
                    self._open.append([out[-1].index, scan, scan.args_start])
                call = self._open[-1]
                upto = scan.args_end if scan.args_end is not None else scan.pos
                if upto > call[2]:
                    out.append(Delta(index=call[0], arguments=self._buf[call[2]:upto]))
                    call[2] = upto
            if not scan.closed or not self._open or self._open[-1][1] is not scan:
                if scan.closed or scan.failed:
                    self._scan = None  # not a streamed call: the rest waits for the end
                return out
            i = scan.pos
            while i < len(self._buf) and (self._buf[i].isspace() or self._buf[i] == ";"):
                i += 1
            if i == len(self._buf):
                return out  # read again from the object's end next time
            self._scan = CallScanner(self.KEYS, i) if self._buf[i] == "{" else None
        return out

    def finish(self) -> list[Delta]:
        text, self._buf = self._buf, ""
        if self._mode != "json":
            return [Delta(content=text)] if text else []
        body = text.lstrip()
        body = body[len(self.TAG):] if body.startswith(self.TAG) else body
        calls = _json_calls(body)
        if calls is None:  # not calls: the streamed ones end as sent (see the module's doc)
            self.broken += [index for index, _, _ in self._open]
            return [Delta(content=text)]
        rests = [_rest(text, scan, sent, call) for (_, scan, sent), call in zip(self._open, calls)]
        if len(rests) < len(self._open) or None in rests:  # calls, but not the ones streamed: anew
            self.broken += [index for index, _, _ in self._open]
            rests = []
        out = [Delta(index=index, arguments=r) for (index, _, _), r in zip(self._open, rests) if r]
        self.made += [index for index, _, _ in self._open[:len(rests)]]
        for call in calls[len(rests):]:
            out += self._call(*call)
        return out


def _rest(text: str, scan: CallScanner, sent: int, call: tuple[str, str] | None) -> str | None:
    """The arguments' text not yet sent (``text[sent:]`` on), if the whole call is the call
    whose start and arguments went out; None if it is not (malformed, a key written twice)."""
    if call is None or call[0] != scan.name:
        return None
    try:
        args, end = json.JSONDecoder().raw_decode(text, scan.args_start)
    except ValueError:
        return None
    if end < sent or json.dumps(args, ensure_ascii=False) != call[1]:
        return None
    return text[sent:end]


def _json_calls(text: str) -> list[tuple[str, str]] | None:
    """One or more call objects, separated by ``;`` or whitespace, and nothing else."""
    decoder = json.JSONDecoder()
    calls, pos, text = [], 0, text.strip()
    while pos < len(text):
        try:
            obj, end = decoder.raw_decode(text, pos)
        except (ValueError, RecursionError):
            return None
        call = call_from(obj, ("parameters", "arguments"))
        if call is None:
            return None
        calls.append(call)
        pos = end
        while pos < len(text) and (text[pos].isspace() or text[pos] == ";"):
            pos += 1
    return calls or None


def _tag_prefix_len(text: str, tag: str) -> int:
    """The length of the longest end of ``text`` that is a proper start of ``tag``."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


#: The parsers by name (``parser_name_for`` picks one from a chat template).
PARSERS: dict[str, type[ToolParser]] = {"hermes": HermesParser, "llama3_json": Llama3JsonParser}


def parser_name_for(template: str) -> str | None:
    """The parser for a chat template, from what its text writes (None: no format known)."""
    if "<tool_call>" in template:
        return "hermes"
    if "<|python_tag|>" in template or ('"parameters"' in template and "<|eot_id|>" in template):
        return "llama3_json"
    return None


def parse(parser: ToolParser, text: str) -> Parsed:
    """A whole answer through ``parser`` (fed once, nothing given out early)."""
    parser.stream = False
    return collect(parser.feed(text) + parser.finish())


def collect(deltas: list[Delta]) -> Parsed:
    """The content and calls that ``deltas`` add up to."""
    content = "".join(d.content for d in deltas if d.content is not None)
    calls: dict[int, list[str]] = {}
    for d in deltas:
        if d.name is not None:
            calls[d.index] = [d.call_id, d.name, ""]
        elif d.arguments is not None:
            calls[d.index][2] += d.arguments
    return Parsed(content or None, [ToolCall(*calls[i]) for i in sorted(calls)])
