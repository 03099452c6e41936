"""The conversation list on the chat page: search box, New chat, the list, its menu.

Rename (F2, double-click or the menu) edits the title in place. Duplicate, Export as
Markdown / JSON and Delete are in the right-click menu (Delete also on the Delete key).
The list only shows and edits conversations; opening and deleting them belongs to the
chat page, which may be streaming into one (``picked``, ``newRequested``,
``deleteRequested``).
"""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import QEvent, QSettings, Qt, QTimer, Signal
from PySide6.QtGui import QKeySequence
from PySide6.QtWidgets import (QAbstractItemView, QFileDialog, QLabel, QLineEdit, QListWidget,
                               QListWidgetItem, QMenu, QPushButton, QVBoxLayout, QWidget)

from app.gui.export_dirs import ask_overwrite, export_start_dir, export_target, write_export
from app.gui.saved_values import saved_int
from app.gui.store_guard import StoreGuard
from app.services.chat_export import suggested_file_name, to_json, to_markdown
from app.services.chat_store import ChatStore

LAST_CONVERSATION_KEY = "chat/last_conversation"
SEARCH_DELAY_MS = 200  # typing pauses this long before the list is searched again
EXPORT_KINDS = {  # kind -> (menu text, dialog caption, file filter, extension, writer)
    "markdown": ("Export as Markdown…", "Export chat as Markdown", "Markdown (*.md)", "md", to_markdown),
    "json": ("Export as JSON…", "Export chat as JSON", "JSON (*.json)", "json", to_json),
}


class ChatList(QWidget):
    """Search box, New chat button and the list of conversations, newest first.

    For tests: ``choose_save_path`` can be replaced by a callable
    ``(caption, suggested_name, name_filter) -> path | None`` instead of a file dialog,
    ``context_menu(conv_id)`` builds the right-click menu without showing it, and
    ``apply_search()`` searches at once instead of after the typing pause.
    """

    picked = Signal(int)           # the user chose a conversation
    newRequested = Signal()        # the New chat button
    deleteRequested = Signal(int)  # Delete… (the page asks, stops its answer, deletes)
    renamed = Signal(int, str)
    message = Signal(str)          # a line for the page's notice bar (export saved / failed)

    def __init__(self, store: ChatStore, settings: QSettings, parent=None) -> None:
        super().__init__(parent)
        self.setObjectName("chatList")
        self.store = store
        self.settings = settings
        self.current_id: int | None = None
        self.choose_save_path = self._dialog_save_path
        self.confirm_overwrite = ask_overwrite(self)  # (path) -> bool; tests replace it
        self._store_write = StoreGuard(self.message.emit)  # a failed write: a line, no traceback

        self.search_box = QLineEdit()
        self.search_box.setObjectName("chatSearch")
        self.search_box.setPlaceholderText("Search chats")
        self.search_box.setClearButtonEnabled(True)
        self.search_box.setToolTip("Find chats by title or by any text in them, in any case (Ctrl+F)")
        self._search_timer = QTimer(self)
        self._search_timer.setSingleShot(True)
        self._search_timer.setInterval(SEARCH_DELAY_MS)
        self._search_timer.timeout.connect(self.apply_search)
        self.search_box.textChanged.connect(lambda _t: self._search_timer.start())

        self.new_button = QPushButton("New chat")
        self.new_button.setObjectName("newChatButton")
        self.new_button.setToolTip("Start a new chat (Ctrl+N)")
        self.new_button.clicked.connect(self.newRequested.emit)

        self.list = QListWidget()
        self.list.setObjectName("conversationList")
        self.list.setTextElideMode(Qt.TextElideMode.ElideRight)
        self.list.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.list.setEditTriggers(QAbstractItemView.EditTrigger.DoubleClicked
                                  | QAbstractItemView.EditTrigger.EditKeyPressed)
        self.list.currentItemChanged.connect(self._on_current_changed)
        self.list.itemChanged.connect(self._on_item_edited)
        self.list.setContextMenuPolicy(Qt.ContextMenuPolicy.CustomContextMenu)
        self.list.customContextMenuRequested.connect(self._show_menu)
        self.list.installEventFilter(self)

        self.no_match = QLabel("No chats match.")
        self.no_match.setObjectName("chatSearchEmpty")
        self.no_match.setEnabled(False)
        self.no_match.hide()

        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(self.new_button)
        lay.addWidget(self.search_box)
        lay.addWidget(self.no_match)
        lay.addWidget(self.list, 1)

    # -- the list ------------------------------------------------------------------------
    def initial_conversation(self) -> int | None:
        """The conversation to open at start: the one open last time, else the newest, else
        a new one (None if none could be made). Empty leftovers of earlier sessions (see
        ``ChatStore.is_leftover``) are deleted first, except the one reopened."""
        last = saved_int(self.settings, LAST_CONVERSATION_KEY, -1)
        last = last if last >= 0 and self.store.conversation(last) else None
        with self._store_write("Empty chats of earlier sessions could not be deleted"):
            self.store.delete_leftovers(keep=last)
        if last is not None:
            return last
        convs = self.store.conversations()
        if convs:
            return convs[0].id
        with self._store_write("A new chat could not be started"):
            return self.store.create_conversation().id
        return None

    def drop_if_leftover(self, conv_id: int) -> bool:
        """Delete a conversation the user is leaving if it was never used (see
        ``ChatStore.is_leftover``); True if it went."""
        if not self.store.is_leftover(conv_id):
            return False
        with self._store_write("An empty chat could not be deleted") as deleted:
            self.store.delete_conversation(conv_id)
        if deleted.ok:
            self.remove(conv_id)
        return deleted.ok

    def reload(self, select: int | None = None) -> None:
        """Refill the list (filtered by the search box); mark ``select`` (default: the
        current conversation) without emitting ``picked``."""
        if select is not None:
            self.current_id = select
        query = self.search_box.text().strip()
        convs = self.store.search(query) if query else self.store.conversations()
        self.list.blockSignals(True)
        self.list.clear()
        for conv in convs:
            item = QListWidgetItem(conv.title)
            item.setData(Qt.ItemDataRole.UserRole, conv.id)
            item.setToolTip(conv.title)
            item.setFlags(item.flags() | Qt.ItemFlag.ItemIsEditable)
            self.list.addItem(item)
        self.list.blockSignals(False)
        self.no_match.setVisible(bool(query) and not convs)
        self.set_current(self.current_id)

    def set_current(self, conv_id: int | None) -> None:
        """Mark the conversation on screen (no ``picked``) and remember it for the next
        start; nothing is marked if the search hides it."""
        if conv_id is not None:
            self.settings.setValue(LAST_CONVERSATION_KEY, conv_id)
        self.current_id = conv_id
        self.list.blockSignals(True)
        item = self._item(conv_id)
        self.list.setCurrentItem(item)  # None clears the mark
        if item is not None:
            self.list.scrollToItem(item)
        self.list.blockSignals(False)

    def set_title(self, conv_id: int, title: str) -> None:
        item = self._item(conv_id)
        if item is not None:
            self.list.blockSignals(True)
            item.setText(title)
            item.setToolTip(title)
            self.list.blockSignals(False)

    def remove(self, conv_id: int) -> None:
        item = self._item(conv_id)
        if item is not None:
            self.list.blockSignals(True)
            self.list.takeItem(self.list.row(item))
            self.list.blockSignals(False)

    def ids(self) -> list[int]:
        """The conversations listed, top to bottom."""
        return [self.list.item(i).data(Qt.ItemDataRole.UserRole) for i in range(self.list.count())]

    def _item(self, conv_id: int | None) -> QListWidgetItem | None:
        for i in range(self.list.count()):
            item = self.list.item(i)
            if item.data(Qt.ItemDataRole.UserRole) == conv_id:
                return item
        return None

    def _on_current_changed(self, item, _previous=None) -> None:
        if item is not None:
            self.current_id = item.data(Qt.ItemDataRole.UserRole)
            self.picked.emit(self.current_id)

    # -- search --------------------------------------------------------------------------
    def apply_search(self) -> None:
        self._search_timer.stop()
        self.reload()

    def focus_search(self) -> None:
        self.search_box.setFocus(Qt.FocusReason.ShortcutFocusReason)
        self.search_box.selectAll()

    def clear_search(self) -> None:
        if self.search_box.text():
            self.search_box.blockSignals(True)
            self.search_box.clear()
            self.search_box.blockSignals(False)
            self.apply_search()

    # -- rename ------------------------------------------------------------------------
    def start_rename(self, conv_id: int) -> None:
        """Edit the title in place (Enter keeps it, Esc cancels)."""
        item = self._item(conv_id)
        if item is not None:
            self.list.setCurrentItem(item)
            self.list.editItem(item)

    def _on_item_edited(self, item: QListWidgetItem) -> None:
        conv_id = item.data(Qt.ItemDataRole.UserRole)
        conv = self.store.conversation(conv_id)
        if conv is None:
            return
        title = " ".join(item.text().split())  # one line, as the list shows it
        if not title:  # an emptied title means "never mind"
            self.set_title(conv_id, conv.title)
            return
        if title != item.text():
            self.set_title(conv_id, title)
        if title != conv.title:
            with self._store_write("The chat could not be renamed") as renamed:
                self.store.rename(conv_id, title)
            if not renamed.ok:  # the list shows the title the chat still has
                self.set_title(conv_id, conv.title)
                return
            self.renamed.emit(conv_id, title)

    # -- menu ----------------------------------------------------------------------------
    def context_menu(self, conv_id: int) -> QMenu:
        """The right-click menu for one conversation (actions named for tests)."""
        menu = QMenu(self)
        actions = [("rename", "Rename…", lambda: self.start_rename(conv_id)),
                   ("duplicate", "Duplicate", lambda: self.duplicate(conv_id))]
        actions += [(kind, spec[0], lambda _=False, k=kind: self.export(conv_id, k))
                    for kind, spec in EXPORT_KINDS.items()]
        actions.append(("delete", "Delete…", lambda: self.deleteRequested.emit(conv_id)))
        for name, text, slot in actions:
            if name == "delete":
                menu.addSeparator()
            act = menu.addAction(text)
            act.setObjectName(name)
            act.triggered.connect(slot)
            if name == "rename":  # shown as a hint; the list itself renames on F2
                act.setShortcut(QKeySequence(Qt.Key.Key_F2))
        return menu

    def _show_menu(self, pos) -> None:
        item = self.list.itemAt(pos)
        if item is not None:
            menu = self.context_menu(item.data(Qt.ItemDataRole.UserRole))
            menu.exec(self.list.viewport().mapToGlobal(pos))
            menu.deleteLater()

    def eventFilter(self, obj, event) -> bool:  # noqa: N802 (Qt naming)
        if obj is self.list and event.type() == QEvent.Type.KeyPress and event.key() == Qt.Key.Key_Delete \
                and self.list.state() != QAbstractItemView.State.EditingState:
            item = self.list.currentItem()
            if item is not None:
                self.deleteRequested.emit(item.data(Qt.ItemDataRole.UserRole))
                return True
        return super().eventFilter(obj, event)

    # -- duplicate and export ------------------------------------------------------------
    def duplicate(self, conv_id: int) -> int | None:
        """Copy a conversation (messages, versions, system prompt) and open the copy."""
        if self.store.conversation(conv_id) is None:
            return None
        with self._store_write("The chat could not be duplicated") as copied:
            copy = self.store.duplicate_conversation(conv_id)
        if not copied.ok:
            return None
        self.clear_search()
        self.reload(select=copy.id)
        self.picked.emit(copy.id)
        return copy.id

    def export(self, conv_id: int, kind: str) -> Path | None:
        """Ask where to save, then write the conversation as Markdown or JSON."""
        conv = self.store.conversation(conv_id)
        if conv is None:
            return None
        _menu, caption, name_filter, extension, writer = EXPORT_KINDS[kind]
        chosen = self.choose_save_path(caption, suggested_file_name(conv.title, extension), name_filter)
        path = export_target(chosen, extension, self.confirm_overwrite) if chosen else None
        if path is None:
            return None  # the dialog was cancelled, or replacing a file declined

        def write(target: Path) -> str:
            target.write_text(writer(conv, self.store.all_messages(conv_id)), encoding="utf-8")
            return f"“{conv.title}”"
        result = write_export(path, write, self.settings)
        self.message.emit(result.message)
        return path if result.saved else None

    def _dialog_save_path(self, caption: str, suggested: str, name_filter: str) -> str | None:
        start = str(Path(export_start_dir(self.settings)) / suggested)
        path, _ = QFileDialog.getSaveFileName(self, caption, start, name_filter)
        return path or None
