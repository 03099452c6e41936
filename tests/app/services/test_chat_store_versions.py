"""Answer versions, duplicates, search and leftovers in the chat store (no Qt)."""

from __future__ import annotations

import sqlite3

import pytest

from app.services.chat_store import ChatStore, history_for_model


@pytest.fixture
def store(tmp_path):
    s = ChatStore(tmp_path / "chats.sqlite3")
    yield s
    s.close()


def _chat(store, *turns, title="Chat"):
    conv = store.create_conversation(title=title)
    for i, text in enumerate(turns):
        store.add_message(conv.id, "user" if i % 2 == 0 else "assistant", text)
    return conv.id


def test_regenerating_keeps_every_version_and_the_model_sees_only_the_selected_one(store):
    conv = _chat(store, "Q1", "A1", "Q2", "A2")
    a1 = store.messages(conv)[1]
    v2 = store.add_version(a1.id, "A1 again")
    # The new version is selected; the turns after the old one stay with the old one.
    shown = store.messages(conv)
    assert [m.content for m in shown] == ["Q1", "A1 again"]
    assert (shown[1].version, shown[1].version_count) == (2, 2)
    assert history_for_model(shown) == [{"role": "user", "content": "Q1"},
                                        {"role": "assistant", "content": "A1 again"}]
    store.add_message(conv, "user", "Q2 on v2")
    assert store.messages(conv)[-1].parent_id == v2.id
    # Flip back: version 1 and what followed it.
    store.select_version(a1.id)
    assert [m.content for m in store.messages(conv)] == ["Q1", "A1", "Q2", "A2"]
    assert store.messages(conv)[1].version == 1
    store.select_version(v2.id)
    assert [m.content for m in store.messages(conv)] == ["Q1", "A1 again", "Q2 on v2"]
    assert store.versions(a1.id) == store.versions(v2.id) == [a1.id, v2.id]
    # Survives reopening.
    store.close()
    again = ChatStore(store.path)
    assert [m.content for m in again.messages(conv)] == ["Q1", "A1 again", "Q2 on v2"]
    again.close()


def test_a_regenerated_first_message_is_a_version_too(store):
    conv = store.create_conversation().id
    first = store.add_message(conv, "assistant", "greeting")
    again = store.add_version(first.id, "hello")
    assert [m.content for m in store.messages(conv)] == ["hello"]
    assert store.versions(first.id) == [first.id, again.id]


def test_edit_deletes_the_message_and_what_followed_in_every_version(store):
    conv = _chat(store, "Q1", "A1", "Q2", "A2")
    q2 = store.messages(conv)[2]
    store.add_version(store.messages(conv)[3].id, "A2 again")
    store.delete_from(conv, q2.id)
    assert [m.content for m in store.messages(conv)] == ["Q1", "A1"]
    assert [m.content for m in store.all_messages(conv)] == ["Q1", "A1"]
    # Deleting the selected version selects the newest remaining one.
    a1 = store.messages(conv)[1]
    v2 = store.add_version(a1.id, "A1 v2")
    store.delete_from(conv, v2.id)
    assert [m.content for m in store.messages(conv)] == ["Q1", "A1"]


def test_a_conversation_deeper_than_sqlite_recursion_limits_deletes_cleanly(store):
    conv = store.create_conversation().id
    parent = None
    for i in range(1200):  # naming the parent skips the walk to the end: a quick setup
        parent = store.add_message(conv, "user", f"m{i}", parent_id=parent).id
    assert len(store.messages(conv)) == 1200
    store.delete_from(conv, store.messages(conv)[0].id)
    assert store.all_messages(conv) == []


def test_deleting_a_conversation_deletes_its_versions(store):
    conv = _chat(store, "Q", "A")
    store.add_version(store.messages(conv)[1].id, "A2")
    other = _chat(store, "keep", "me")
    store.delete_conversation(conv)
    db = sqlite3.connect(store.path)
    assert db.execute("SELECT COUNT(*) FROM messages WHERE conversation_id=?", (conv,)).fetchone()[0] == 0
    db.close()
    assert [m.content for m in store.messages(other)] == ["keep", "me"]


def test_duplicate_copies_messages_versions_and_system_prompt(store):
    conv = _chat(store, "Q1", "A1", "Q2", "A2", title="Plan")
    store.set_system_prompt(conv, "You are terse.")
    store.add_version(store.messages(conv)[1].id, "A1 v2")
    store.update_message(store.messages(conv)[1].id, status="streaming")
    copy = store.duplicate_conversation(conv)
    assert copy.title == "Plan (copy)" and store.conversation(copy.id).system_prompt == "You are terse."
    shown = store.messages(copy.id)
    assert [m.content for m in shown] == ["Q1", "A1 v2"]
    assert shown[1].status == "stopped"  # not 'streaming': nothing writes to the copy
    store.select_version(store.versions(shown[1].id)[0])
    assert [m.content for m in store.messages(copy.id)] == ["Q1", "A1", "Q2", "A2"]
    assert {m.id for m in store.all_messages(copy.id)}.isdisjoint({m.id for m in store.all_messages(conv)})
    assert [m.content for m in store.messages(conv)] == ["Q1", "A1 v2"]  # the original is untouched


def test_search_finds_titles_and_message_text_ignoring_case(store):
    a = _chat(store, "How do I parse JSON?", "Use json.loads", title="Parsing")
    b = _chat(store, "Über Straßen", "Antwort", title="Deutsch")
    c = _chat(store, "nothing here", "ok", title="Misc")
    versions = _chat(store, "Q", "first answer", title="Versions")
    store.add_version(store.messages(versions)[1].id, "second answer")
    assert [x.id for x in store.search("json")] == [a]  # inside a word, any case
    assert [x.id for x in store.search("  PARSING ")] == [a]  # the title, padded
    assert [x.id for x in store.search("über")] == [b]  # non-ASCII case folding
    assert [x.id for x in store.search("STRASSEN")] == [b]  # ß folds to ss
    assert [x.id for x in store.search("first answer")] == [versions]  # an older version counts
    assert store.search("50%") == [] and store.search("_") == []  # no LIKE wildcards
    assert [x.id for x in store.search("")] == [x.id for x in store.conversations()]
    assert c in [x.id for x in store.search("")]


def test_leftovers_are_empty_untitled_chats_without_a_typed_prompt(store):
    kept_prompt = store.create_conversation().id
    store.set_system_prompt(kept_prompt, "You are a pirate.")
    inherited = store.create_conversation(system_prompt="inherited").id
    empty = store.create_conversation().id
    reopened = store.create_conversation().id
    renamed = store.create_conversation().id
    store.rename(renamed, "Ideas")
    used = _chat(store, "hi", "hello", title="New chat")
    assert store.delete_leftovers(keep=reopened) == [inherited, empty]
    remaining = {c.id for c in store.conversations()}
    assert remaining == {kept_prompt, reopened, renamed, used}
