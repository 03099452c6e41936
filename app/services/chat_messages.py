"""Conversations and messages as the chat store gives them, and the rules for reading a
conversation's tree of answer versions (Qt-free, no SQL: see chat_store.py)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class Message:
    id: int
    conversation_id: int
    role: str
    content: str
    status: str = "complete"
    meta: dict = field(default_factory=dict)
    parent_id: int | None = None
    active: bool = True
    created: float = 0.0
    version: int = 1        # 1-based position among its siblings (the versions of this turn)
    version_count: int = 1


@dataclass(slots=True)
class Conversation:
    id: int
    title: str
    system_prompt: str
    updated: float


def selected_path(messages: list[Message]) -> list[Message]:
    """The messages along the selected path: from the first one, always on to the selected
    version of the next turn (the newest one if, against the rules, none or several are)."""
    children: dict[int | None, list[Message]] = {}
    for m in sorted(messages, key=lambda m: m.id):  # each sibling list oldest first
        children.setdefault(m.parent_id, []).append(m)
    path, parent, seen = [], None, set()
    while children.get(parent):
        group = children[parent]
        chosen = next((m for m in reversed(group) if m.active), group[-1])
        if chosen.id in seen:  # a damaged file with a cycle: stop rather than loop
            break
        seen.add(chosen.id)
        path.append(chosen)
        parent = chosen.id
    return path


def history_for_model(messages: list[Message]) -> list[dict]:
    """The turns the model should see: user/assistant text, notices and failures left out.

    ``messages`` is ``ChatStore.messages()``: only the selected version of each answer."""
    out = []
    for m in messages:
        if m.role == "notice" or (m.role == "assistant" and m.status == "error"):
            continue
        if m.role == "assistant" and not m.content:
            continue
        out.append({"role": m.role, "content": m.content})
    return out
