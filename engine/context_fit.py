"""The rule that trims a conversation to fit the context: ``Request(fit_context=True)``.

A chat outgrows the model's context sooner or later. Rather than refuse it, the engine
drops the oldest turns (a user message and the assistant answer after it) until the
prompt, rendered with the model's chat template, leaves room for an answer. The system
prompt (``Request.system``, or system messages at the start of ``messages``) and the last
message are always kept; a last message that doesn't fit even alone is refused, dropping
nothing, with an error that says how long it is and what the limit is (a client that
keeps its history must not lose it for a message that is refused).

``hearth chat``, the desktop app and the server all ask for it, so they trim alike.
"""

from __future__ import annotations

from typing import Callable

from engine.errors import InvalidRequestError

#: Tokens kept free for the answer when the history is trimmed (or max_tokens if smaller).
ANSWER_ROOM = 64


def fit_messages(render: Callable[[list[dict]], list[int]], messages: list[dict], *, system: str | None,
                 max_tokens: int, max_model_len: int) -> tuple[list[int], int]:
    """The prompt ids of ``messages`` with the oldest turns dropped until they and room
    for an answer (``min(max_tokens, ANSWER_ROOM)`` tokens) fit ``max_model_len``; and how
    many messages were dropped (they are ``messages[len(head):len(head) + dropped]``, the
    head being the leading system messages). ``render(messages)`` gives a list's prompt ids
    (the chat template, with the request's system prompt). ``messages`` is not changed.

    Raises InvalidRequestError, dropping nothing, when the last message doesn't fit even
    alone (with the system prompt and room for an answer)."""
    room = min(max_tokens, ANSWER_ROOM)
    ids = render(messages)
    if len(ids) + room <= max_model_len:
        return ids, 0
    head_len = _leading_system(messages)
    head, turns = list(messages[:head_len]), list(messages[head_len:])
    if len(turns) <= 1:
        raise _too_long(render, head, turns[-1] if turns else messages[-1], len(ids), system, room, max_model_len)
    alone = len(render(head + turns[-1:]))
    if alone + room > max_model_len:
        raise _too_long(render, head, turns[-1], alone, system, room, max_model_len)
    dropped = 0
    while len(ids) + room > max_model_len and len(turns) > 1:
        # Drop a user turn and the assistant answer after it.
        cut = 2 if len(turns) > 2 and turns[1].get("role") == "assistant" else 1
        turns = turns[cut:]
        dropped += cut
        ids = render(head + turns)
    return ids, dropped


def _leading_system(messages: list[dict]) -> int:
    """How many messages at the start are system messages (kept whatever is dropped), the
    last message excepted (it is what the request asks about)."""
    n = 0
    while n < len(messages) - 1 and isinstance(messages[n], dict) and messages[n].get("role") == "system":
        n += 1
    return n


def _too_long(render, head: list[dict], message: dict, alone: int, system: str | None, room: int,
              limit: int) -> InvalidRequestError:
    # What the chat template and the system prompt take around the message's own text.
    overhead = len(render(head + [{**message, "content": ""}]))
    around = "the chat template and the system prompt" if (system or head) else "the chat template"
    if overhead + room >= limit:
        return InvalidRequestError(
            f"{around} {'take' if (system or head) else 'takes'} {overhead} of the context's {limit} tokens, "
            "leaving no room for a "
            f"message and a {room}-token answer: "
            + ("shorten the system prompt or " if (system or head) else "")
            + "load the model with a longer context (--max-model-len).",
            options=("max_model_len",))
    return InvalidRequestError(
        f"this message is {alone - overhead} tokens long, but the context holds {limit} tokens, "
        f"{overhead} of them for {around} and {room} for the answer: shorten the message to at "
        f"most {limit - overhead - room} tokens, or load the model with a longer context "
        "(--max-model-len).",
        options=("max_model_len",))
