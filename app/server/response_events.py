"""The Responses API's shapes: the ``response`` object (its ``output`` items: a ``message``
with one ``output_text`` part, and the answer's ``function_call`` items when tools are in
play), and its stream of typed SSE events (``event:`` + ``data:``), in OpenAI's order::

    response.created, response.in_progress,
    for each output item, one after the other:
      a message:  response.output_item.added, response.content_part.added,
                  response.output_text.delta ..., response.output_text.done,
                  response.content_part.done, response.output_item.done
      a call:     response.output_item.added, response.function_call_arguments.delta ...,
                  response.function_call_arguments.done, response.output_item.done
    response.completed (or response.incomplete when max_output_tokens cut the answer)

Without tools the message item opens at once (as before there were tools). With tools an
item opens when its first piece is sure (``ToolStream``: content, or a call's start once
its name is known), and a message item closes when a call starts; text after a call opens
a new message item. A call closes when it ends well (``status: "completed"``), or, broken
after its start went out, as sent (``"incomplete"``; its block comes as text too, as chat's
stream gives it: ``app.server.tool_parsers``); the final response leaves such a call out
of its ``output``, as the whole answer has none.

An answer cut by ``max_output_tokens`` is ``status: "incomplete"`` with
``incomplete_details.reason: "max_output_tokens"``, as OpenAI says it. A failure after the
stream began is an ``error`` event carrying OpenAI's error object (the SDK raises it).
"""

from __future__ import annotations

import json

from app.server.errors import error_body
from app.server.logprobs import Logprobs
from app.server.service import Choice, OpenAIService, failure
from app.server.shapes import timings
from app.server.tool_calls import ToolSetup, ToolStream, chat_message
from app.services.ids import unique_hex
from engine.api import FinishedEvent


class ResponseShapes:
    """One response's objects: its id, and what the request asked (``tools``: the chat's
    tools in play, whose calls become ``function_call`` items; ``logprobs``: the formatter
    of the output_text tokens' logprobs, when ``include`` asks for them)."""

    def __init__(self, rid: str, created: int, model: str, body, tools: ToolSetup | None = None,
                 logprobs: Logprobs | None = None) -> None:
        self.rid, self.created, self.model, self.body, self.tools = rid, created, model, body, tools
        self.logprobs = logprobs

    def entries(self, lps: list | None) -> list[dict]:
        """Tokens' logprobs as the Responses API gives them (chat's entries: ``token``,
        ``logprob``, ``bytes``, ``top_logprobs``); [] when the request didn't include them."""
        if self.logprobs is None or not lps:
            return []
        return self.logprobs.format(lps)["content"]

    @staticmethod
    def part(text: str, logprobs: list[dict] | None = None) -> dict:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs or []}

    @staticmethod
    def message(item_id: str, text: str | None, status: str, logprobs: list[dict] | None = None) -> dict:
        """A message output item (``text`` None: just added, no part yet)."""
        content = [] if text is None else [ResponseShapes.part(text, logprobs)]
        return {"id": item_id, "type": "message", "status": status, "role": "assistant", "content": content}

    @staticmethod
    def call(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict:
        return {"id": item_id, "type": "function_call", "status": status, "call_id": call_id, "name": name,
                "arguments": arguments}

    def response(self, output: list[dict] | None, fin: FinishedEvent | None) -> dict:
        """The response object: in progress (``fin`` None), completed or incomplete."""
        body = self.body
        if fin is None:
            status, output, usage, incomplete = "in_progress", [], None, None
        else:
            status = _status(fin)
            usage = _usage(fin)
            incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
        out = {"id": self.rid, "object": "response", "created_at": self.created, "status": status, "error": None,
               "incomplete_details": incomplete, "instructions": body.instructions,
               "max_output_tokens": body.max_output_tokens, "model": self.model, "output": output,
               "parallel_tool_calls": body.parallel_tool_calls is not False, "previous_response_id": None,
               "reasoning": None, "store": False,
               "temperature": 1.0 if body.temperature is None else body.temperature,
               "top_p": 1.0 if body.top_p is None else body.top_p, "text": {"format": _format(body)},
               "tool_choice": "auto" if body.tool_choice is None else body.tool_choice,
               "tools": list(body.tools or []), "truncation": body.truncation or "disabled",
               "top_logprobs": body.top_logprobs, "usage": usage, "user": body.user, "metadata": body.metadata or {}}
        if fin is not None:
            out["hearth"] = timings(fin)
        return out


def _status(fin: FinishedEvent) -> str:
    """A finished answer's status: cut by max_output_tokens, or not."""
    return "incomplete" if fin.reason == "length" else "completed"


def whole_output(shapes: ResponseShapes, text: str, fin: FinishedEvent, lps: list | None = None) -> list[dict]:
    """A whole answer's output items: its text as a message (``lps``: its tokens' logprobs,
    when included: tools are not in play then), then its calls (tools in play)."""
    status = _status(fin)
    if shapes.tools is None:
        return [shapes.message(f"msg_{unique_hex(32)}", text, status, shapes.entries(lps))]
    message, _ = chat_message(text, fin.reason, shapes.tools)
    items = []
    if message.get("content") or not message.get("tool_calls"):
        # (text before calls was whole, as the stream closes it when a call starts)
        items.append(shapes.message(f"msg_{unique_hex(32)}", message.get("content") or "",
                                    "completed" if message.get("tool_calls") else status))
    for call in message.get("tool_calls") or []:
        fn = call["function"]
        items.append(shapes.call(f"fc_{unique_hex(32)}", call["id"], fn["name"], fn["arguments"], "completed"))
    return items


def _format(body) -> dict:
    """The request's ``text.format`` as OpenAI echoes it (plain text where none was asked)."""
    text = body.text if isinstance(body.text, dict) else {}
    fmt = text.get("format")
    return dict(fmt) if isinstance(fmt, dict) and fmt.get("type", "text") != "text" else {"type": "text"}


def _usage(fin: FinishedEvent) -> dict:
    u = fin.usage
    return {"input_tokens": u.prompt_tokens, "input_tokens_details": {"cached_tokens": u.cached_prompt_tokens},
            "output_tokens": u.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": u.prompt_tokens + u.completion_tokens}


class _Events:
    """Numbers the stream's events (``sequence_number``) and writes them as SSE."""

    def __init__(self) -> None:
        self.seq = 0

    def __call__(self, kind: str, **fields) -> bytes:
        data = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


class _Output:
    """The stream's output items as they open, grow and close, and the events that say so."""

    def __init__(self, shapes: ResponseShapes, event: _Events) -> None:
        self.shapes, self.event = shapes, event
        self.items: list[dict] = []  # closed ones and the open ones, in output order
        self._message: tuple[int, list[str]] | None = None  # the open message: (output index, its text)
        self._logprobs: list[dict] = []  # the open message's tokens' logprobs, when included
        self._calls: dict[int, tuple[int, list[str]]] = {}  # the parser's call index -> (output index, arguments)

    def text(self, piece: str, lps: list | None = None) -> list[bytes]:
        """A delta of the message's text (``lps``: its tokens' logprobs, when included)."""
        out = [] if self._message is not None else self.open_message()
        index, texts = self._message
        texts.append(piece)
        entries = self.shapes.entries(lps)
        self._logprobs += entries
        return out + [self.event("response.output_text.delta", item_id=self.items[index]["id"], output_index=index,
                                 content_index=0, delta=piece, logprobs=entries)]

    def open_message(self) -> list[bytes]:
        index = len(self.items)
        self.items.append(self.shapes.message(f"msg_{unique_hex(32)}", None, "in_progress"))
        self._message, self._logprobs = (index, []), []
        item_id = self.items[index]["id"]
        return [self.event("response.output_item.added", output_index=index, item=self.items[index]),
                self.event("response.content_part.added", item_id=item_id, output_index=index, content_index=0,
                           part=self.shapes.part(""))]

    def close_message(self, status: str) -> list[bytes]:
        if self._message is None:
            return []
        (index, texts), self._message = self._message, None
        text, lps = "".join(texts), self._logprobs
        item = self.items[index] = self.shapes.message(self.items[index]["id"], text, status, lps)
        where = {"item_id": item["id"], "output_index": index}
        return [self.event("response.output_text.done", **where, content_index=0, text=text, logprobs=lps),
                self.event("response.content_part.done", **where, content_index=0,
                           part=self.shapes.part(text, lps)),
                self.event("response.output_item.done", output_index=index, item=item)]

    def call_start(self, call: int, call_id: str, name: str) -> list[bytes]:
        out = self.close_message("completed")
        index = len(self.items)
        self.items.append(self.shapes.call(f"fc_{unique_hex(32)}", call_id, name, "", "in_progress"))
        self._calls[call] = (index, [])
        return out + [self.event("response.output_item.added", output_index=index, item=self.items[index])]

    def call_arguments(self, call: int, piece: str) -> list[bytes]:
        index, parts = self._calls[call]
        parts.append(piece)
        return [self.event("response.function_call_arguments.delta", item_id=self.items[index]["id"],
                           output_index=index, delta=piece)]

    def close_calls(self, made: set[int], broken: set[int]) -> list[bytes]:
        """Close the open calls that ended (well: ``made``; as sent: ``broken``)."""
        out = []
        for call in [c for c in self._calls if c in made or c in broken]:
            out += self._close_call(call, "completed" if call in made else "incomplete")
        return out

    def close_all(self, status: str) -> list[bytes]:
        out = []
        for call in list(self._calls):
            out += self._close_call(call, "incomplete")
        return out + self.close_message(status)

    def _close_call(self, call: int, status: str) -> list[bytes]:
        index, parts = self._calls.pop(call)
        old = self.items[index]
        arguments = "".join(parts)
        item = self.items[index] = self.shapes.call(old["id"], old["call_id"], old["name"], arguments, status)
        return [self.event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                           arguments=arguments, name=item["name"]),
                self.event("response.output_item.done", output_index=index, item=item)]

    def feed(self, deltas: list[dict], tools: ToolStream) -> list[bytes]:
        """Chat's deltas (``ToolStream``) as items and their events."""
        out = []
        made, broken = set(tools.made), set(tools.broken)
        for delta in deltas:
            if "content" in delta:  # a call that ended in this text closes before it
                out += self.close_calls(made, broken) + self.text(delta["content"])
                continue
            for call in delta["tool_calls"]:
                if "id" in call:
                    out += self.close_calls(made, broken)
                    out += self.call_start(call["index"], call["id"], call["function"]["name"])
                if call["function"].get("arguments"):
                    out += self.call_arguments(call["index"], call["function"]["arguments"])
        return out + self.close_calls(made, broken)

    def final(self) -> list[dict]:
        """The output items for the response object: a call broken after its start went out
        is left out (its events went; its text came as text), as the whole answer has no
        such call, and a client that runs every call never runs one with broken arguments."""
        return [item for item in self.items if not (item["type"] == "function_call"
                                                    and item["status"] == "incomplete")]


async def response_events(service: OpenAIService, choice: Choice, shapes: ResponseShapes):
    """The stream's bytes; the choice is aborted whatever ends it (``service.done``)."""
    event = _Events()
    output = _Output(shapes, event)
    tools = None if shapes.tools is None else ToolStream(shapes.tools)
    try:
        yield event("response.created", response=shapes.response(None, None))
        yield event("response.in_progress", response=shapes.response(None, None))
        if tools is None:
            yield b"".join(output.open_message())
        async for ev in choice.events:
            text = choice.take(ev, choice.events.at)
            if text:  # (logprobs of tokens that add no text yet go with the next text)
                pieces = output.text(text, choice.take_logprobs()) if tools is None else \
                    output.feed(tools.feed(text), tools)
                if pieces:
                    yield b"".join(pieces)
        error = failure(choice)
        if error is not None:  # the 200 has gone: say it in the stream (the SDK raises it)
            body = json.dumps(error_body(error.status, error.message, code=error.code))
            yield f"event: error\ndata: {body}\n\n".encode()
            return
        fin = choice.finish
        last = [] if tools is None else output.feed(tools.finish(), tools)
        rest = choice.take_logprobs() if shapes.logprobs is not None else []
        if rest:  # tokens that added no text (a stop string's, the end's): an empty delta carries them,
            last += output.text("", rest)  # so the deltas' logprobs are the whole answer's, as the done event's
        if not output.items:  # nothing written: one empty message, as a whole answer has
            last += output.open_message()
        final_events = output.close_all(_status(fin))
        final = shapes.response(output.final(), fin)
        yield b"".join([*last, *final_events,
                        event("response.completed" if final["status"] == "completed" else "response.incomplete",
                              response=final)])
    finally:
        service.done([choice])
