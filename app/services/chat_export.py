"""A conversation as Markdown (to read) or JSON (to keep, with everything) - Qt-free.

Both take what ``ChatStore`` gives: the ``Conversation`` and ``all_messages()`` (every
message, every answer version, each naming the message it follows).

JSON (``format: "hearth-chat"``, ``format_version: 1``)::

    {"title", "system_prompt", "updated", "exported",   # times: ISO 8601, UTC
     "messages": [{"role", "content", "status", "meta", "created",
                   # only on a turn that was regenerated:
                   "version": 2,                 # the selected one, 1-based
                   "versions": [{"content", "status", "meta", "created", "selected",
                                 "messages_after": [...]}]}]}

``messages`` is the conversation as shown (the selected version of each turn). A turn
with several versions lists them all; an unselected version carries the turns that went
on from it in ``messages_after`` (same shape, recursively); for the selected one those
are simply the rest of ``messages``.

Markdown shows the conversation as shown: the title, the system prompt, then "You" /
"Assistant" turns with their text unchanged (code blocks stay code blocks), noting which
version of a regenerated answer it is and how an answer ended if it didn't complete.
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone

from app.services.chat_store import Conversation, Message, selected_path

FORMAT = "hearth-chat"
FORMAT_VERSION = 1

ROLE_HEADINGS = {"user": "You", "assistant": "Assistant", "notice": "Notice"}
ENDINGS = {"stopped": "stopped before the end", "interrupted": "interrupted (the app closed mid-answer)",
           "streaming": "still being written when exported", "error": "failed"}


def _children(messages: list[Message]) -> dict[int | None, list[Message]]:
    out: dict[int | None, list[Message]] = {}
    for m in sorted(messages, key=lambda m: m.id):
        out.setdefault(m.parent_id, []).append(m)
    return out


def _selected(group: list[Message]) -> Message:
    return next((m for m in reversed(group) if m.active), group[-1])


# -- JSON ---------------------------------------------------------------------------------
def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="seconds")


def _fields(m: Message) -> dict:
    return {"content": m.content, "status": m.status, "meta": m.meta, "created": _iso(m.created)}


def _branch(start: Message, children: dict[int | None, list[Message]], seen: set[int]) -> list[dict]:
    """``start`` and the turns that follow it along the selected versions, as JSON."""
    out, m = [], start
    while m is not None and m.id not in seen:
        seen.add(m.id)
        entry = {"role": m.role, **_fields(m)}
        group = children.get(m.parent_id, [m])
        if len(group) > 1:
            entry["version"] = group.index(m) + 1
            entry["versions"] = []
            for v in group:
                version = {**_fields(v), "selected": v.id == m.id}
                if v.id != m.id:
                    after = children.get(v.id)
                    version["messages_after"] = _branch(_selected(after), children, seen) if after else []
                entry["versions"].append(version)
        out.append(entry)
        after = children.get(m.id)
        m = _selected(after) if after else None
    return out


def to_json(conv: Conversation, messages: list[Message]) -> str:
    """The whole conversation as JSON, every answer version included (see the module doc)."""
    children = _children(messages)
    first = children.get(None)
    doc = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "title": conv.title,
        "system_prompt": conv.system_prompt,
        "updated": _iso(conv.updated),
        "exported": _iso(datetime.now(timezone.utc).timestamp()),
        "messages": _branch(_selected(first), children, set()) if first else [],
    }
    return json.dumps(doc, ensure_ascii=False, indent=2) + "\n"


# -- Markdown -----------------------------------------------------------------------------
def _close_fences(text: str) -> str:
    """Close a code fence left open (an answer stopped mid-block), so it doesn't swallow
    the turns after it."""
    fences = [line.lstrip() for line in text.splitlines() if line.lstrip().startswith(("```", "~~~"))]
    if len(fences) % 2:
        return text.rstrip("\n") + "\n" + fences[-1][:3]
    return text


def _quote(text: str) -> str:
    return "\n".join(f"> {line}" if line else ">" for line in text.splitlines())


def to_markdown(conv: Conversation, messages: list[Message]) -> str:
    """The conversation as shown, as readable Markdown (see the module doc)."""
    parts = [f"# {conv.title.strip() or 'Chat'}"]
    if conv.system_prompt.strip():
        parts.append("**System prompt**\n\n" + _quote(conv.system_prompt.strip()))
    for m in selected_path(messages):
        if m.role == "notice":
            parts.append(_quote(f"*{m.content.strip()}*"))
            continue
        heading = ROLE_HEADINGS.get(m.role, m.role.title())
        if m.version_count > 1:
            heading += f" (version {m.version} of {m.version_count})"
        parts.append(f"## {heading}")
        parts.append(_close_fences(m.content.strip("\n")) if m.content.strip() else "*(empty)*")
        ending = ENDINGS.get(m.status)
        if m.role == "assistant" and ending:
            error = m.meta.get("error")
            parts.append(f"*({ending}{': ' + error if m.status == 'error' and error else ''})*")
    return "\n\n".join(parts) + "\n"


def suggested_file_name(title: str, extension: str) -> str:
    """A file name from a chat title: characters that file systems refuse replaced, kept short."""
    name = re.sub(r'[\\/:*?"<>|\x00-\x1f]+', "-", title).strip(" .-") or "chat"
    return f"{name[:80].rstrip(' .-')}.{extension}"
