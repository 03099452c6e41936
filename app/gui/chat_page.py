"""The chat page: conversations on the left, the transcript, the input, and parameters.

Every message is in the SQLite store before it is on screen; a streamed answer is saved
as it grows (at most every 300 ms) so a crash or kill loses almost nothing. When the disk
can't take it (full, read-only) the store keeps the chats in memory and the banner over
the transcript says so until they are saved again; the page carries on either way. A write
the store refuses (its file stays locked) is a line in the notice bar (``StoreGuard``). One answer
streams at a time per window: Send is disabled while one runs, Stop (or Esc, wherever
focus is in the window while this page shows) aborts it and keeps the partial text.

Keyboard: focus comes back to the message box after Send and Stop; Tab leaves the box
(Ctrl+Tab types a tab), so every control is reachable. The parameters panel can be hidden
(``params_action``, for a View menu too), and steps aside by itself in a narrow window.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial

from PySide6.QtCore import QSettings, Qt, QTimer, Signal
from PySide6.QtGui import QKeySequence, QShortcut
from PySide6.QtWidgets import QHBoxLayout, QMessageBox, QVBoxLayout, QWidget

from app.gui.chat_bars import ChatHeader, MessageBar, model_line
from app.gui.chat_layout import ChatSplitter, PaneToggle, focus_fell_out, scrolling_pane
from app.gui.chat_list import ChatList
from app.gui.chat_transcript import Transcript
from app.gui.chat_widgets import MessageWidget, NoticeBar, ParamsPanel
from app.gui.store_banner import StoreBanner
from app.gui.store_guard import RetriedSaves, StoreGuard
from app.services.chat_store import DEFAULT_TITLE, ChatStore, history_for_model
from app.services.host_loading import LOAD_CANCELLED, load_failure_text

from engine.api import ModelInfo

SAVE_INTERVAL_MS = 300
SAVE_AGAIN_MS = 5000  # after a save the store refused (its file stayed locked)
RENDER_INTERVAL_MS = 50
LIST_WIDTH = 200
PARAMS_WIDTH = 260
PARAMS_AUTO_HIDE_WIDTH = 700  # a narrower page hides the parameters panel by itself
ANSWERING_ELSEWHERE = "An answer is being written in "  # how that notice begins


class ChatPage(QWidget):
    answerFinished = Signal(str, object)  # request id, FinishedEvent (for tests and the status bar)

    def __init__(self, bridge, store: ChatStore, settings: QSettings, parent=None) -> None:
        super().__init__(parent)
        self.setObjectName("chatPage")
        self.bridge = bridge
        self.store = store
        self.settings = settings
        self.conversation_id: int | None = None
        self._active: dict | None = None  # the answer being streamed
        # (the chat it was typed in, the text): typed while the model was still loading
        self._pending_send: tuple[int | None, str] | None = None
        self._model_ready = False
        self._editing: tuple[int, int] | None = None  # (conversation, user message) being edited
        self._draft_before_edit = ""  # the box's text when Edit was clicked (Cancel edit gives it back)
        # Why there is no model while something else holds the engine (the main window's
        # Compare page), or None: said instead of "No model is loaded".
        self.model_away: Callable[[], str | None] = lambda: None

        # left: conversations
        self.chat_list = ChatList(store, settings)
        self.conversation_list = self.chat_list.list
        self.chat_list.picked.connect(self.open_conversation)
        self.chat_list.newRequested.connect(lambda: self.new_conversation())
        self.chat_list.deleteRequested.connect(lambda conv_id: self.delete_conversation(conv_id))
        self.chat_list.message.connect(lambda text: self.notice.show_message(text))
        find = QShortcut(QKeySequence.StandardKey.Find, self)  # Ctrl+F: search the chats
        find.setContext(Qt.ShortcutContext.WidgetWithChildrenShortcut)
        find.activated.connect(self.chat_list.focus_search)
        left = self.chat_list

        # middle: transcript + input
        self.scroll = Transcript()  # follows a growing answer unless scrolled up
        self.transcript = self.scroll.content
        self.scroll.editRequested.connect(self.edit_message)
        self.scroll.regenerateRequested.connect(self.regenerate)
        self.scroll.versionRequested.connect(self.flip_version)
        self.notice = NoticeBar()
        # Every store write goes through this: a failure is a line in the notice bar.
        self._store_write = StoreGuard(self.notice.show_message)
        # A finished answer's last save, refused: the answer stays on screen meanwhile.
        self._answer_ends = RetriedSaves(self._store_write, "The answer could not be saved; it stays on "
                                         "screen, and saving it is tried again", self, SAVE_AGAIN_MS)
        self.store_banner = StoreBanner(store)  # chat history damaged, read-only, not saved
        bar = MessageBar()
        self.input, self.send_button, self.stop_button = bar.input, bar.send_button, bar.stop_button
        self.input.submitted.connect(lambda: self.send())
        self.send_button.clicked.connect(lambda: (self.send(), self.input.setFocus()))
        self.stop_button.clicked.connect(lambda: (self.stop(), self.input.setFocus()))
        header = ChatHeader()
        self.model_label, self.params_action = header.model_label, header.params_action
        self.params_button = header.params_button
        middle = QWidget()
        ml = QVBoxLayout(middle)
        ml.setContentsMargins(0, 0, 0, 0)
        ml.addWidget(header)
        ml.addWidget(self.store_banner)
        ml.addWidget(self.scroll, 1)
        ml.addWidget(self.notice)
        ml.addWidget(bar)

        # right: parameters
        self.params = ParamsPanel(settings)
        self.params.systemPromptEdited.connect(self._on_system_prompt)

        # The panel scrolls when the window is short, so it never sets the page's height.
        self.params_pane = scrolling_pane(self.params)
        self.params_pane.setObjectName("paramsPane")
        # In a narrow window the side panes give way to the transcript.
        self.splitter = ChatSplitter(LIST_WIDTH, PARAMS_WIDTH)
        self.splitter.setObjectName("chatSplitter")
        self.splitter.add_panes(left, middle, self.params_pane)
        lay = QHBoxLayout(self)
        lay.addWidget(self.splitter)
        self._params_toggle = PaneToggle(self.params_pane, self.params_action, settings,
                                         "chat/params_visible", PARAMS_AUTO_HIDE_WIDTH)

        # Esc stops the answer wherever focus is in the window while this page shows (a page-
        # scoped shortcut died when a transcript rebuild deleted the focused button and focus
        # fell outside the page); enabled only while an answer streams.
        self._esc = QShortcut(QKeySequence(Qt.Key.Key_Escape), self)
        self._esc.setContext(Qt.ShortcutContext.WindowShortcut)
        self._esc.activated.connect(self.stop)

        self._save_timer = QTimer(self)
        self._save_timer.setInterval(SAVE_INTERVAL_MS)
        self._save_timer.timeout.connect(self._save_active)
        self._render_timer = QTimer(self)
        self._render_timer.setSingleShot(True)
        self._render_timer.setInterval(RENDER_INTERVAL_MS)
        self._render_timer.timeout.connect(self._render_active)

        bridge.tokenReceived.connect(self._on_token)
        bridge.requestFinished.connect(self._on_finished)
        bridge.requestStarted.connect(self._on_started)
        bridge.promptProgress.connect(self._on_prompt_progress)
        bridge.modelLoading.connect(self._on_model_loading)
        bridge.modelLoaded.connect(self._on_model_loaded)
        bridge.loadFailed.connect(self._on_load_failed)
        bridge.modelUnloaded.connect(lambda: self._set_model_ready(False, "No model loaded"))
        self._set_model_ready(False, "No model loaded")
        info = getattr(bridge, "model_info", None)
        if info:  # the page may be built after the model finished loading
            self._on_model_loaded(info)
        if getattr(bridge, "is_loading", False):
            self._on_model_loading(getattr(bridge, "loading_name", None) or "a model")
        self._reload_list(select=self.chat_list.initial_conversation())

    # -- conversations -----------------------------------------------------------------
    def _reload_list(self, select: int | None = None) -> None:
        self.chat_list.reload(select=select)
        if select is not None and self.conversation_id != select:
            self.open_conversation(select)

    def new_conversation(self) -> None:
        """Start a new chat, or stay in this one if it is still an empty leftover (no
        pile of empty "New chat" entries)."""
        self.chat_list.clear_search()  # the new chat must be in sight
        with self._store_write("The new chat could not be started"):
            if self.conversation_id is not None and self.store.is_leftover(self.conversation_id):
                self.chat_list.set_current(self.conversation_id)
            else:
                conv = self.store.create_conversation(system_prompt=self.params.system_prompt.toPlainText())
                self._reload_list(select=conv.id)
        self.input.setFocus()

    def delete_conversation(self, conv_id: int, confirm: bool = True) -> None:
        if confirm and QMessageBox.question(self, "Delete conversation",
                                            "Delete this conversation? This can't be undone.") \
                != QMessageBox.StandardButton.Yes:
            return
        if self._active and self._active["conv"] == conv_id:
            self.stop()
        with self._store_write("The chat could not be deleted") as deleted:
            self.store.delete_conversation(conv_id)
        if not deleted.ok:
            return
        if conv_id != self.conversation_id:  # another one: the open chat stays open
            self.chat_list.remove(conv_id)
            return
        self.conversation_id = None
        remaining = self.store.conversations()
        target = remaining[0].id if remaining else None
        if target is None:
            with self._store_write("A new chat could not be started"):
                target = self.store.create_conversation().id
        if target is None:  # none to show: Send starts one
            self.scroll.drop_from(0)
        self._reload_list(select=target)

    def open_conversation(self, conv_id: int) -> None:
        if self.conversation_id not in (None, conv_id):
            self.chat_list.drop_if_leftover(self.conversation_id)  # left unused: clutter
        if self._editing is not None and self._editing[0] != conv_id:
            self._cancel_edit()
        self.conversation_id = conv_id
        self.chat_list.set_current(conv_id)
        conv = self.store.conversation(conv_id)
        self.params.set_system_prompt(conv.system_prompt if conv else "")
        self._show_messages_from(0)
        self._scroll_to_end()

    def _show_messages_from(self, position: int) -> None:
        """Rebuild the transcript from the ``position``-th message on (the ones above stay,
        so a version flip doesn't move what the user is looking at)."""
        self.scroll.drop_from(position)
        for m in self.store.messages(self.conversation_id)[position:]:
            self.scroll.add_message(m)
        if self._active:
            # The streaming answer keeps going (and being saved) while another conversation
            # is shown; it has a widget only while its own conversation is on screen.
            same = self._active["conv"] == self.conversation_id
            self._active["widget"] = self._widget_for(self._active["msg_id"]) if same else None
        self._update_buttons()

    def _on_system_prompt(self, text: str) -> None:
        if self.conversation_id is not None:
            with self._store_write("The system prompt could not be saved"):
                self.store.set_system_prompt(self.conversation_id, text)

    # -- transcript widgets ------------------------------------------------------------
    def _widget_for(self, msg_id: int) -> MessageWidget | None:
        return self.scroll.widget_for(msg_id)

    def message_widgets(self) -> list[MessageWidget]:
        return list(self.scroll.widgets)

    def _scroll_to_end(self) -> None:
        """Show the end of the transcript, now and as it grows (until the user scrolls up)."""
        self.scroll.follow_end()

    # -- layout ------------------------------------------------------------------------
    def set_params_visible(self, visible: bool) -> None:
        """Show or hide the parameters panel (remembered across runs; ``params_action``
        does the same from a button or a menu)."""
        self._params_toggle.set_visible(visible)

    def params_visible(self) -> bool:
        return self._params_toggle.visible

    def resizeEvent(self, event) -> None:  # noqa: N802 (Qt naming)
        super().resizeEvent(event)
        self._params_toggle.page_resized(event.oldSize().width(), event.size().width())

    # -- sending -----------------------------------------------------------------------
    def send(self, text: str | None = None) -> None:
        text = (text if text is not None else self.input.toPlainText()).strip()
        if not text:
            return
        if self._active is not None:
            if self._active["conv"] != self.conversation_id:  # (here Send is disabled: Ctrl+Enter)
                self.notice.show_message(f"{self._answering_elsewhere()}: your message stays in the box.")
            return
        if not self._model_ready:
            if getattr(self.bridge, "is_loading", False):
                if self._pending_send is not None:
                    self.notice.show_message("One message is already waiting for the model to "
                                             "finish loading; send this one after its answer.")
                    return
                self._pending_send = (self.conversation_id, text)
                self.input.clear()
                self.notice.show_message("The model is still loading: your message will be sent "
                                         "as soon as it is ready.")
                return
            self.notice.show_message(self.model_away() or "No model is loaded: load one on the Models page.")
            return
        if self.conversation_id is None:  # none could be started before: try again now
            self.new_conversation()
            if self.conversation_id is None:
                return
        if self._editing is not None and self._editing[0] == self.conversation_id:
            # Only a message on the path shown is replaced (with what followed it there); one
            # hidden by a version flip since is never deleted unseen.
            if self._editing[1] in {m.id for m in self.store.messages(self.conversation_id)}:
                with self._store_write("The edited message could not replace the old one") as replaced:
                    self.store.delete_from(self.conversation_id, self._editing[1])
                if not replaced.ok:  # the edit stays in the box, to send again
                    return
            self._editing = None
            self.open_conversation(self.conversation_id)
        with self._store_write("Your message could not be sent") as kept:
            msg = self.store.add_message(self.conversation_id, "user", text)
        if not kept.ok:  # the text stays typed
            return
        self.input.clear()
        self.scroll.append(msg.id, "user", text)
        self._maybe_title(text)
        self._start_answer()

    def _maybe_title(self, text: str) -> None:
        conv = self.store.conversation(self.conversation_id)
        if conv and conv.title == DEFAULT_TITLE:
            title = " ".join(text.split())[:48] or DEFAULT_TITLE
            with self._store_write("The chat could not be titled"):
                self.store.rename(self.conversation_id, title)
                self.chat_list.set_title(self.conversation_id, title)

    def _start_answer(self, version_of: int | None = None) -> None:
        conv_id = self.conversation_id
        info = self.bridge.model_info
        model = info.name if info else ""
        with self._store_write("The answer could not be started") as started:
            if version_of is None:
                history = history_for_model(self.store.messages(conv_id))
                msg = self.store.add_message(conv_id, "assistant", "", status="streaming",
                                             meta={"model": model})
            else:  # a new version of that answer: the model sees only what came before it
                msg = self.store.add_version(version_of, "", status="streaming", meta={"model": model})
                history = history_for_model(self.store.messages(conv_id)[:-1])
        if not started.ok:
            return
        widget = self.scroll.append(msg.id, "assistant", "", "streaming", {"model": model})
        widget.set_versions(msg.version, msg.version_count)
        system = self.params.system_prompt.toPlainText().strip() or None
        rid = self.bridge.submit(messages=history, system=system, params=self.params.sampling_params())
        self._active = {"rid": rid, "conv": conv_id, "msg_id": msg.id, "widget": widget,
                        "text": "", "saved": "", "meta": {"model": model}, "sent": time.monotonic()}
        self.notice.show_message("")
        self._save_timer.start()
        self._update_buttons()
        self._scroll_to_end()

    def stop(self) -> None:
        if self._active is not None:
            self.bridge.abort(self._active["rid"])

    def regenerate(self, msg_id: int) -> None:
        """Ask again for this answer. The old one stays as a version (‹ 1/2 › flips back),
        and so do the turns that followed it: they belong to the version they followed,
        so nothing is lost and nothing needs confirming."""
        old = self._widget_for(msg_id)
        if self._active is not None or not self._model_ready or old is None:
            return
        self._cancel_edit()
        # The new version takes the old one's place, with nothing after it yet.
        self.scroll.drop_from(self.scroll.widgets.index(old))
        self._start_answer(version_of=msg_id)

    def flip_version(self, msg_id: int, step: int) -> None:
        """Show the previous (``step`` -1) or next (+1) version of an answer, with the turns
        that followed that version; the choice is kept in the store."""
        w = self._widget_for(msg_id)
        if self._active is not None or w is None:
            return
        versions = self.store.versions(msg_id)
        target = versions.index(msg_id) + step if msg_id in versions else -1
        if not 0 <= target < len(versions):
            return
        self._cancel_edit()  # the message being edited may belong to the path flipped away
        with self._store_write("That version could not be selected") as selected:
            self.store.select_version(versions[target])
        if not selected.ok:
            return
        self.scroll.stop_following()  # stay at the flipped answer, not the end
        self._show_messages_from(self.scroll.widgets.index(w))

    def _cancel_edit(self) -> None:
        if self._editing is not None:
            self._editing = None
            self.notice.show_message("")

    def cancel_edit(self) -> None:
        """Give the edit up (the notice's "Cancel edit"): the message stays as it was, and the
        box gets back what was typed in it before Edit."""
        if self._editing is not None:
            self._cancel_edit()
            self.input.setPlainText(self._draft_before_edit)
            self.input.setFocus()

    def edit_message(self, msg_id: int) -> None:
        """Put a user message back in the input; sending replaces it and what follows."""
        if self._active is not None:
            return
        w = self._widget_for(msg_id)
        if w is None:
            return
        if self._editing is None:
            self._draft_before_edit = self.input.toPlainText()
        self._editing = (self.conversation_id, msg_id)
        self.input.setPlainText(w.text)
        self.input.setFocus()
        self.notice.show_action("Editing an earlier message: sending replaces it and every message after it.",
                                "Cancel edit", self.cancel_edit)

    # -- engine events -----------------------------------------------------------------
    def _on_started(self, rid: str, info: dict) -> None:
        a = self._active
        if a is None or a["rid"] != rid:
            return
        if info.get("model"):  # the model that answers: a swap may have happened since Send
            a["meta"]["model"] = info["model"]
        if not info.get("dropped"):
            return
        n = info["dropped"]
        text = (f"This conversation outgrew the model's context: the oldest {n} message"
                f"{'s were' if n != 1 else ' was'} left out of what the model sees.")
        if self.store.conversation(a["conv"]) is None:
            return  # deleted while the request was starting
        with self._store_write("The note about the context could not be saved") as noted:
            note = self.store.add_message(a["conv"], "notice", text)
        if noted.ok and self.conversation_id == a["conv"]:
            # In id order, as a reload shows it: right after the answer it applies to.
            self.scroll.append(note.id, "notice", text)

    def _on_token(self, rid: str, text: str) -> None:
        a = self._active
        if a is None or a["rid"] != rid:
            return
        first = not a["text"]
        a["text"] += text
        if first:  # the first token is shown at once; later ones are painted together
            if a["meta"].get("ttft_ms") is None:  # its time in the footer now (the engine's own at the end)
                a["meta"]["ttft_ms"] = (time.monotonic() - a["sent"]) * 1000
                if a.get("widget") is not None:
                    a["widget"].set_footer(a["meta"], "streaming")
            self._render_active()
        elif not self._render_timer.isActive():
            self._render_timer.start()

    def _on_prompt_progress(self, rid: str, done: int, total: int) -> None:
        a = self._active
        if a is None or a["rid"] != rid or a["text"]:
            return
        if a.get("widget") is not None:
            a["widget"].set_progress(done, total)

    def _render_active(self) -> None:
        # The transcript follows the growing answer by itself (unless scrolled up).
        a = self._active
        if a is not None and a.get("widget") is not None:
            a["widget"].set_text(a["text"])

    def _save_active(self) -> None:
        a = self._active
        if a is not None and a["text"] != a["saved"]:
            with self._store_write("The answer can't be saved yet") as saved:
                self.store.update_message(a["msg_id"], content=a["text"])
            # Refused (the file stays locked): the text stays here, and the next save waits
            # longer, as each refusal has already held the page for the store's busy wait.
            self._save_timer.setInterval(SAVE_INTERVAL_MS if saved.ok else SAVE_AGAIN_MS)
            if saved.ok:
                a["saved"] = a["text"]

    def _on_finished(self, rid: str, ev) -> None:
        a = self._active
        if a is None or a["rid"] != rid:
            return
        self._save_timer.stop()
        self._render_timer.stop()
        status = {"abort": "stopped", "error": "error"}.get(ev.reason, "complete")
        meta = dict(a["meta"])
        if ev.reason != "error":
            meta.update(ttft_ms=ev.timings.ttft_ms, decode_tok_s=ev.timings.decode_tok_s,
                        tokens=ev.usage.completion_tokens, finish=ev.reason)
        if ev.error:
            meta["error"] = ev.error
        # The answer is over whatever saving it does: the page must be usable again (a save
        # that raised here once left Send disabled and Stop enabled for good).
        self._active = None
        self._save_timer.setInterval(SAVE_INTERVAL_MS)
        try:
            self._answer_ends.save(a["msg_id"], partial(self.store.update_message, a["msg_id"],
                                                        content=a["text"], status=status, meta=meta))
        finally:
            w = a.get("widget")
            if w is not None:
                w.set_text(a["text"])
                w.set_footer(meta, status)
            if ev.reason == "error":
                self.notice.show_message(f"The answer failed: {ev.error}")
            self._update_buttons()
            self.answerFinished.emit(rid, ev)

    # While another model loads the loaded one keeps answering (Send, Regenerate). A message
    # typed while none serves waits for the load, also for a newer one that supersedes it;
    # if the load fails it is given back (also when the old model is loaded again: the
    # message was meant for the new one).
    def _on_model_loading(self, name: str) -> None:
        info = getattr(self.bridge, "model_info", None)
        if info:
            self._set_model_ready(True, f"{info.name} · loading {name}…")
        else:
            self._set_model_ready(False, f"Loading {name}…")

    def _on_model_loaded(self, info: ModelInfo, reloaded: bool = False) -> None:
        self._set_model_ready(True, model_line(info))
        if not reloaded:  # back after a failed load: the failure notice stays
            self.notice.show_message("")
        if self._pending_send:
            (conv_id, text), self._pending_send = self._pending_send, None
            self._send_pending(conv_id, text)

    def _send_pending(self, conv_id: int | None, text: str) -> None:
        """Send a message typed while the model loaded to the chat it was typed in, though
        another chat may be open by now (a new chat where that one is gone: deleted, or an
        empty new chat dropped when another was opened)."""
        draft = self.input.toPlainText()  # typed since (in whichever chat): sending must not wipe it
        if conv_id is not None and self.store.conversation(conv_id) is not None:
            if conv_id != self.conversation_id:
                self.open_conversation(conv_id)
        elif self.conversation_id is not None and (conv_id is not None or not self.store.is_leftover(
                self.conversation_id)):
            self.new_conversation()
        self.send(text)
        if draft and not self.input.toPlainText():
            self.input.setPlainText(draft)

    def _on_load_failed(self, message: str) -> None:
        conv_id, pending = self._pending_send or (None, None)
        self._pending_send = None
        info = getattr(self.bridge, "model_info", None)  # a failed load keeps the loaded model
        if info:
            self._on_model_loaded(info)
        else:
            self._set_model_ready(False, "No model loaded")
        if pending:  # typed for the model that failed: give it back, in its chat, rather than send it
            draft = self.input.toPlainText().strip()  # typed since: kept after it, nothing is lost
            if conv_id is not None and conv_id != self.conversation_id and self.store.conversation(conv_id):
                self.open_conversation(conv_id)
            self.input.setPlainText(pending if not draft or draft == pending else f"{pending}\n\n{draft}")
        if message.startswith(LOAD_CANCELLED):
            self.notice.show_message("Loading cancelled." + message[len(LOAD_CANCELLED):])
        else:
            self.notice.show_message(load_failure_text(message))

    def _set_model_ready(self, ready: bool, label: str) -> None:
        self._model_ready = ready
        self.model_label.setText(label)
        self._update_buttons()

    def _update_buttons(self) -> None:
        busy = self._active is not None
        # A button about to be disabled would pass focus down the chain (to the system
        # prompt): keep it in the message box instead.
        reclaim = focus_fell_out(self) or (self.send_button.hasFocus() and busy) or \
            (self.stop_button.hasFocus() and not busy)
        self.send_button.setEnabled(not busy)
        self.stop_button.setEnabled(busy)
        elsewhere = busy and self._active["conv"] != self.conversation_id
        # why Send is off, and which answer Stop stops, when that answer is in another chat
        title = self._answering_title() if elsewhere else None  # (one look in the store)
        self.send_button.setToolTip(self._answering_elsewhere(title) if elsewhere else "Send (Ctrl+Enter)")
        self.stop_button.setToolTip(f"Stop the answer being written in {title} (Esc); the text so far is kept"
                                    if elsewhere else "Stop the answer (Esc); the text so far is kept")
        self._esc.setEnabled(busy)
        if not elsewhere and self.notice.text().startswith(ANSWERING_ELSEWHERE):
            self.notice.show_message("")  # that answer ended, or its chat is open: no longer so
        for w in self.scroll.widgets:
            w.set_actions_enabled(not busy and self._model_ready)
            w.set_versions_enabled(not busy)  # no model needed to look at another version
        if reclaim:
            self.input.setFocus()

    def _answering_title(self) -> str:
        """The chat the answer in progress is written in, quoted (for messages)."""
        conv = self.store.conversation(self._active["conv"]) if self._active is not None else None
        return f"\u201c{conv.title}\u201d" if conv is not None else "another chat"

    def _answering_elsewhere(self, title: str | None = None) -> str:
        return (f"{ANSWERING_ELSEWHERE}{title or self._answering_title()}: wait for it to finish or "
                "stop it (Stop) before sending here")

    @property
    def is_answering(self) -> bool:
        return self._active is not None

    def shutdown(self) -> None:
        """Save the answer in progress (the window is closing)."""
        a = self._active
        if a is not None:
            self._answer_ends.save(a["msg_id"], partial(self.store.update_message, a["msg_id"],
                                                        content=a["text"], status="interrupted", meta=a["meta"]))
            self._active = None  # the engine's abort that follows must not save it as "stopped"
        else:
            self._answer_ends.flush()
        self._answer_ends.timer.stop()  # the window is closing: what is refused now is lost
