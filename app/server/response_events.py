"""The Responses API's shapes: the ``response`` object (one ``message`` output item with
one ``output_text`` part), and its stream of typed SSE events (``event:`` + ``data:``),
in OpenAI's order::

    response.created, response.in_progress, response.output_item.added,
    response.content_part.added, response.output_text.delta ..., response.output_text.done,
    response.content_part.done, response.output_item.done,
    response.completed (or response.incomplete when max_output_tokens cut the answer)

An answer cut by ``max_output_tokens`` is ``status: "incomplete"`` with
``incomplete_details.reason: "max_output_tokens"``, as OpenAI says it. A failure after the
stream began is an ``error`` event carrying OpenAI's error object (the SDK raises it).
"""

from __future__ import annotations

import json

from app.server.errors import error_body
from app.server.service import Choice, OpenAIService, failure
from app.server.shapes import timings
from engine.api import FinishedEvent


class ResponseShapes:
    """One response's objects: its id, its message item's id, and what the request asked."""

    def __init__(self, rid: str, item_id: str, created: int, model: str, body) -> None:
        self.rid, self.item_id, self.created, self.model, self.body = rid, item_id, created, model, body

    def part(self, text: str) -> dict:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

    def item(self, text: str | None, status: str) -> dict:
        """The message output item (``text`` None: just added, no part yet)."""
        content = [] if text is None else [self.part(text)]
        return {"id": self.item_id, "type": "message", "status": status, "role": "assistant", "content": content}

    def response(self, text: str | None, fin: FinishedEvent | None) -> dict:
        """The response object: in progress (``fin`` None), completed or incomplete."""
        body = self.body
        if fin is None:
            status, output, usage, incomplete = "in_progress", [], None, None
        else:
            cut = fin.reason == "length"
            status = "incomplete" if cut else "completed"
            output = [self.item(text, status)]
            usage = _usage(fin)
            incomplete = {"reason": "max_output_tokens"} if cut else None
        out = {"id": self.rid, "object": "response", "created_at": self.created, "status": status, "error": None,
               "incomplete_details": incomplete, "instructions": body.instructions,
               "max_output_tokens": body.max_output_tokens, "model": self.model, "output": output,
               "parallel_tool_calls": True, "previous_response_id": None, "reasoning": None, "store": False,
               "temperature": 1.0 if body.temperature is None else body.temperature,
               "top_p": 1.0 if body.top_p is None else body.top_p, "text": {"format": _format(body)},
               "tool_choice": "auto", "tools": [], "truncation": "disabled", "usage": usage, "user": body.user,
               "metadata": body.metadata or {}}
        if fin is not None:
            out["hearth"] = timings(fin)
        return out


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


async def response_events(service: OpenAIService, choice: Choice, shapes: ResponseShapes):
    """The stream's bytes; the choice is aborted whatever ends it (``service.done``)."""
    event = _Events()
    where = {"item_id": shapes.item_id, "output_index": 0}
    try:
        yield event("response.created", response=shapes.response(None, None))
        yield event("response.in_progress", response=shapes.response(None, None))
        yield event("response.output_item.added", output_index=0, item=shapes.item(None, "in_progress"))
        yield event("response.content_part.added", **where, content_index=0, part=shapes.part(""))
        async for ev in choice.events:
            text = choice.take(ev, choice.events.at)
            if text:
                yield event("response.output_text.delta", **where, content_index=0, delta=text, logprobs=[])
        error = failure(choice)
        if error is not None:  # the 200 has gone: say it in the stream (the SDK raises it)
            body = json.dumps(error_body(error.status, error.message, code=error.code))
            yield f"event: error\ndata: {body}\n\n".encode()
            return
        text, fin = choice.text, choice.finish
        final = shapes.response(text, fin)
        yield event("response.output_text.done", **where, content_index=0, text=text, logprobs=[])
        yield event("response.content_part.done", **where, content_index=0, part=shapes.part(text))
        yield event("response.output_item.done", output_index=0, item=final["output"][0])
        yield event("response.completed" if final["status"] == "completed" else "response.incomplete",
                    response=final)
    finally:
        service.done([choice])
