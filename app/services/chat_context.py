"""The rule that trims a conversation to fit the model's context, shared by ``hearth chat``
and the desktop app (Qt-free; the GUI's bridge worker and the CLI both call it).

A later change makes it an engine request option (issue 13, item 5); until then this is
its one home, so the terminal and the window trim alike.
"""

from __future__ import annotations

from engine.api import InvalidRequestError

# Tokens kept free for the answer when the history is trimmed (or max_tokens if smaller).
ANSWER_ROOM = 64


def fit_history(engine, messages: list[dict], system: str | None, max_tokens: int) -> tuple[list[dict], int]:
    """Drop the oldest turns until prompt + room for an answer fit the context. Returns
    (messages, dropped); the list passed in is not changed.

    Raises InvalidRequestError, dropping nothing, when the newest message does not fit
    even alone (with the system prompt and room for an answer): dropping the conversation
    can't help then, and a caller that keeps its history must not lose it for a message
    that is refused. The error says how long the message is and what the limit is."""
    room = min(max_tokens, ANSWER_ROOM)
    limit = engine.max_model_len

    def tokens(msgs: list[dict]) -> int:
        return len(engine.tokenizer.apply_chat_template(msgs, system=system))

    msgs = list(messages)
    if tokens(msgs) + room <= limit:
        return msgs, 0
    alone = tokens(msgs[-1:])
    if alone + room > limit:
        raise _too_long(engine, msgs[-1], alone, system, room, limit)
    dropped = 0
    while tokens(msgs) + room > limit and len(msgs) > 1:
        # Drop a user turn and the assistant answer after it.
        cut = 2 if len(msgs) > 2 and msgs[1]["role"] == "assistant" else 1
        msgs = msgs[cut:]
        dropped += cut
    return msgs, dropped


def _too_long(engine, message: dict, alone: int, system: str | None, room: int,
              limit: int) -> InvalidRequestError:
    # What the chat template and the system prompt take around the message's own text.
    overhead = len(engine.tokenizer.apply_chat_template([{**message, "content": ""}], system=system))
    around = "the chat template and the system prompt" if system else "the chat template"
    if overhead + room >= limit:
        return InvalidRequestError(
            f"{around} take {overhead} of the context's {limit} tokens, leaving no room for a "
            f"message and a {room}-token answer: "
            + ("shorten the system prompt or " if system else "")
            + "load the model with a longer context (--max-model-len).",
            options=("max_model_len",))
    return InvalidRequestError(
        f"this message is {alone - overhead} tokens long, but the context holds {limit} tokens, "
        f"{overhead} of them for {around} and {room} for the answer: shorten the message to at "
        f"most {limit - overhead - room} tokens, or load the model with a longer context "
        "(--max-model-len).",
        options=("max_model_len",))
