"""Markdown and JSON export of a stored conversation (app/services/chat_export.py, no Qt)."""

from __future__ import annotations

import json

import pytest

from app.services.chat_export import FORMAT, suggested_file_name, to_json, to_markdown
from app.services.chat_store import ChatStore

CODE = "Like this:\n\n```python\ndef f(x):\n\n    return x * 2\n```\n\nDone."


@pytest.fixture
def store(tmp_path):
    s = ChatStore(tmp_path / "chats.sqlite3")
    yield s
    s.close()


@pytest.fixture
def chat(store):
    """Q1 -> A1 (v1, followed by Q2 -> A2) / A1 v2 (selected, followed by Q3 -> a stopped answer)."""
    conv = store.create_conversation(title="Doubling")
    store.set_system_prompt(conv.id, "You write Python.\nBe brief.")
    store.add_message(conv.id, "user", "Double a number?")
    a1 = store.add_message(conv.id, "assistant", "x * 2", meta={"tokens": 3, "model": "m"})
    store.add_message(conv.id, "user", "In a function?")
    store.add_message(conv.id, "assistant", CODE)
    v2 = store.add_version(a1.id, "Multiply by two.")
    store.add_message(conv.id, "notice", "The oldest 1 message was left out of what the model sees.")
    store.add_message(conv.id, "user", "Show code")
    store.add_message(conv.id, "assistant", "```js\nconst d = x =>", status="stopped")
    return store.conversation(conv.id), store.all_messages(conv.id), a1, v2


def test_markdown_reads_as_the_conversation_shown(chat):
    conv, messages, _a1, _v2 = chat
    md = to_markdown(conv, messages)
    assert md.startswith("# Doubling\n\n**System prompt**\n\n> You write Python.\n> Be brief.\n")
    order = ["## You\n\nDouble a number?", "## Assistant (version 2 of 2)\n\nMultiply by two.",
             "> *The oldest 1 message", "## You\n\nShow code", "## Assistant\n\n```js\nconst d = x =>\n```",
             "*(stopped before the end)*"]
    positions = [md.index(part) for part in order]
    assert positions == sorted(positions)
    assert "In a function?" not in md  # turns of the unselected version are in the JSON only


def test_markdown_keeps_code_blocks_verbatim(store):
    conv = store.create_conversation(title="Code")
    store.add_message(conv.id, "user", "Write f")
    store.add_message(conv.id, "assistant", CODE)
    md = to_markdown(store.conversation(conv.id), store.all_messages(conv.id))
    assert CODE in md  # blank lines and indentation inside the block untouched
    assert md.count("```") == 2


def test_json_holds_everything_every_version_and_what_followed_each(chat):
    conv, messages, a1, v2 = chat
    doc = json.loads(to_json(conv, messages))
    assert doc["format"] == FORMAT and doc["title"] == "Doubling"
    assert doc["system_prompt"] == "You write Python.\nBe brief."
    shown = doc["messages"]
    assert [(m["role"], m["content"]) for m in shown] == [
        ("user", "Double a number?"), ("assistant", "Multiply by two."),
        ("notice", "The oldest 1 message was left out of what the model sees."),
        ("user", "Show code"), ("assistant", "```js\nconst d = x =>")]
    assert shown[-1]["status"] == "stopped" and shown[0]["meta"] == {}
    answer = shown[1]
    assert answer["version"] == 2
    first, second = answer["versions"]
    assert (first["content"], first["selected"], first["meta"]) == ("x * 2", False, {"tokens": 3, "model": "m"})
    assert [(m["role"], m["content"]) for m in first["messages_after"]] == [
        ("user", "In a function?"), ("assistant", CODE)]
    assert second == {"content": "Multiply by two.", "status": "complete", "meta": {},
                      "created": second["created"], "selected": True}
    assert "versions" not in shown[0]  # a turn with one version has no list


def test_json_of_an_empty_chat(store):
    conv = store.create_conversation()
    assert json.loads(to_json(conv, []))["messages"] == []
    assert to_markdown(conv, []) == "# New chat\n"


@pytest.mark.parametrize("title, name", [("Plan: a/b?", "Plan- a-b.md"), ("...", "chat.md"),
                                         ("x" * 200, "x" * 80 + ".md"), ("Été", "Été.md")])
def test_suggested_file_names_are_safe(title, name):
    assert suggested_file_name(title, "md") == name
