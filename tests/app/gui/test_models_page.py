"""The Models page against the local fake Hub (real huggingface_hub client, real services)."""

from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from pathlib import Path  # noqa: E402

import keyring  # noqa: E402
import pytest  # noqa: E402
from keyring.backends import fail  # noqa: E402
from PySide6.QtCore import QObject, Qt, Signal  # noqa: E402
from PySide6.QtWidgets import QLineEdit, QMessageBox, QPushButton  # noqa: E402

from app.gui.bridge import BridgeSignals  # noqa: E402
from app.gui.models_page import TAB_LIBRARY, ModelsPage  # noqa: E402
from tests.app.hub_fixtures import GATED, GGUF_REPO, TINY, fake_hub, repo_files  # noqa: E402
from tests.app.model_info_fixtures import fake_info  # noqa: E402

__all__ = ["fake_hub"]

WAIT_MS = 20_000


class FakeBridge(BridgeSignals):
    """The EngineBridge signals the page may connect to, emitted by the test."""


@pytest.fixture
def file_keyring():
    """No OS keyring: the token goes to the private file (never the developer's keyring)."""
    before = keyring.get_keyring()
    keyring.set_keyring(fail.Keyring())
    yield
    keyring.set_keyring(before)


@pytest.fixture
def page(qtbot, fake_hub, file_keyring):
    p = ModelsPage(FakeBridge())
    qtbot.addWidget(p)
    p.resize(1100, 750)
    p.show()
    yield p
    p.shutdown()


def _search(qtbot, page, text):
    box = page.findChild(QLineEdit, "modelSearch")
    box.clear()
    qtbot.keyClicks(box, text)
    qtbot.waitUntil(lambda: not page.runner.pending("search") and page.search_panel.result_ids()
                    and all(text.lower() in r.lower() for r in page.search_panel.result_ids()), timeout=WAIT_MS)
    return page.search_panel.result_ids()


def _open(qtbot, page, repo_id):
    panel = page.search_panel
    panel.results.setCurrentRow(panel.result_ids().index(repo_id))
    qtbot.waitUntil(lambda: panel.details is not None and panel.details.repo_id == repo_id, timeout=WAIT_MS)
    return panel


def test_search_details_download_then_load_from_library(qtbot, page, fake_hub):
    # Typing searches the Hub (after a short pause) and lists matching text-generation models.
    assert _search(qtbot, page, "tiny") == [GGUF_REPO, TINY]
    assert "↓ 500" in page.search_panel.results.item(1).text()

    panel = _open(qtbot, page, TINY)
    assert "License: apache-2.0" in panel.facts.text() and "Gated: no" in panel.facts.text()
    assert "Parameters: 336K" in panel.facts.text()
    assert panel.card.text().startswith("A tiny chat model for tests")
    files = {panel.files.item(r, 0).text(): panel.files.item(r, 1).text() for r in range(panel.files.rowCount())}
    assert set(files) == set(repo_files()[TINY]) and files["model.safetensors"] == "657.0 KiB"
    assert not panel.gated_notice.isVisible()
    # The fit estimate was computed from config.json and the safetensors count.
    assert panel.fit_result.text().startswith("fits: needs ")

    button = page.findChild(QPushButton, "downloadButton")
    assert button.isEnabled()
    # ~1 s for the weights: several progress events (at most 10 a second are sent).
    fake_hub.throttle("model.safetensors", 0.05, chunk_size=32 * 1024)
    shown = []   # what the row displayed at each status update, as the UI thread saw it
    page.events.statusChanged.connect(
        lambda s: shown.append((s.state, page.downloads_panel.rows[s.id].bar.value(),
                                page.downloads_panel.rows[s.id].line.text())))
    qtbot.mouseClick(button, Qt.MouseButton.LeftButton)
    rows = page.downloads_panel.rows
    qtbot.waitUntil(lambda: len(rows) == 1 and next(iter(rows.values())).status.state == "done", timeout=WAIT_MS)
    (row,) = rows.values()
    assert row.bar.value() == row.bar.maximum()
    partial = [(v, text) for state, v, text in shown if state == "running" and 0 < v < row.bar.maximum()]
    assert len({v for v, _ in partial}) >= 2                          # the bar moved in steps
    assert any("/s · ETA 0:" in text for _, text in partial), partial   # with speed and ETA
    assert row.load_button.isVisible() and not row.cancel_button.isVisible()
    snapshot = row.status.path
    assert (Path(snapshot) / "model.safetensors").read_bytes() == repo_files()[TINY]["model.safetensors"]

    # The library lists it (with its size) and selects it; loadButton asks to load that folder.
    lib = page.library_panel
    qtbot.waitUntil(lambda: lib.selected() is not None and lib.selected().ref == snapshot, timeout=WAIT_MS)
    assert lib.selected().name == TINY and lib.selected().kind == "hub"
    page.tabs.setCurrentIndex(TAB_LIBRARY)
    with qtbot.waitSignal(page.loadRequested, timeout=WAIT_MS) as blocker:
        qtbot.mouseClick(page.findChild(QPushButton, "loadButton"), Qt.MouseButton.LeftButton)
    assert blocker.args == [snapshot]
    # The finished download's own Load button does the same.
    with qtbot.waitSignal(page.loadRequested, timeout=WAIT_MS) as blocker:
        qtbot.mouseClick(row.load_button, Qt.MouseButton.LeftButton)
    assert blocker.args == [snapshot]
    # The bridge's modelLoaded marks the loaded model.
    page.bridge.modelLoaded.emit(fake_info(TINY, path=snapshot), False)
    qtbot.waitUntil(lambda: any(lib.table.item(r, 3).text() == "loaded" for r in range(lib.table.rowCount())))


def test_device_box_is_filled_before_a_model_is_picked(qtbot, page):
    panel = page.search_panel
    qtbot.waitUntil(lambda: panel.device.findData("cpu") >= 0, timeout=WAIT_MS)
    assert panel.details is None                                    # nothing picked yet
    ram = panel.device.itemText(panel.device.findData("cpu"))
    assert ram.startswith("RAM: ") and ram.endswith(" free")
    assert "Pick a model" in panel.fit_result.text()
    # The weights choices are the load dialog's; quantizations that can't run are greyed
    # out with the reason (int4 runs; fp8 weights need an Ada or Hopper GPU).
    weights = panel.weights
    assert [weights.itemData(i) for i in range(4)] == ["auto", "bfloat16", "float16", "float32"]
    qtbot.waitUntil(lambda: weights.findData("int4") >= 0, timeout=WAIT_MS)
    int4 = weights.model().item(weights.findData("int4"))
    assert int4.isEnabled()
    fp8 = weights.model().item(weights.findData("fp8"))
    assert not fp8.isEnabled() and "Ada or Hopper" in fp8.toolTip()


def test_fit_estimate_uses_the_engine_rules_for_the_device(qtbot, page, monkeypatch):
    from app.services import fit

    gpu = fit.MemoryTarget("cuda:0", "GPU 0 (Test GPU)", 20 * fit.GIB, 24 * fit.GIB)
    ram = fit.MemoryTarget("cpu", "RAM", 8 * fit.GIB, 16 * fit.GIB)
    monkeypatch.setattr(fit, "memory_targets", lambda: [gpu, ram])
    _search(qtbot, page, "tiny")
    panel = _open(qtbot, page, TINY)
    panel.device.setCurrentIndex(panel.device.findData("cpu"))
    # auto on the CPU loads float32 (4 B a parameter), as Engine.load does; the context is
    # the model's maximum (2048), as the load dialog's default.
    assert panel.weights.itemText(0) == "auto (float32 on this device)"
    # KV: 2 layers x 2 heads x 16 dims x 4 B x 2 = 512 B a token; 64 sequences of 2048 = 64 MiB.
    assert "weights 0.00 float32 + KV cache 0.06" in panel.fit_result.text()
    # The load dialog's KV-cache precisions (the engine's registry): fp8 takes 1 B a value, a quarter of float32's.
    kv = panel.kv_dtype
    assert [kv.itemData(i) for i in range(kv.count())] == ["auto", "fp8"]
    kv.setCurrentIndex(kv.findData("fp8"))
    assert "weights 0.00 float32 + KV cache 0.02" in panel.fit_result.text()  # 16 MiB
    kv.setCurrentIndex(kv.findData("auto"))
    assert panel.context.specialValueText() == "model's maximum (2,048)"
    panel.device.setCurrentIndex(panel.device.findData("cuda:0"))
    assert panel.weights.itemText(0) == "auto (bfloat16 on this device)"
    assert "bfloat16 + KV 0.00 for one 2048-token context" in panel.fit_result.text()


def test_gguf_file_download_and_fit_use_the_picked_file(qtbot, page, fake_hub, monkeypatch):
    from app.services import fit

    monkeypatch.setattr(fit, "gguf_kept_on", lambda device_type, capability: True)  # the C kernel runs here
    _search(qtbot, page, "GGUF")
    panel = _open(qtbot, page, GGUF_REPO)
    button = page.findChild(QPushButton, "downloadButton")
    assert not button.isEnabled()             # a GGUF repo: pick a file first
    assert panel.weights.itemText(0) == "auto (the GGUF file's own weights)"
    names = [panel.files.item(r, 0).text() for r in range(panel.files.rowCount())]
    panel.files.selectRow(names.index("tiny-chat.Q8_0.gguf"))
    assert button.isEnabled() and "tiny-chat.Q8_0.gguf" in button.text()
    # sized as the load holds it: Q8_0 at its file's bytes, Q4_K_M at about 1.22x
    assert panel.fit_result.text().startswith("tiny-chat.Q8_0.gguf: fits: needs 0.00 GiB")
    assert "Q8_0 weights load as they are" in panel.fit_result.text()
    panel.files.selectRow(names.index("tiny-chat.Q4_K_M.gguf"))
    assert "about 1.22x the file's size" in panel.fit_result.text()
    panel.files.selectRow(names.index("tiny-chat.Q8_0.gguf"))
    qtbot.mouseClick(button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: [r.status.state for r in page.downloads_panel.rows.values()] == ["done"],
                    timeout=WAIT_MS)
    (row,) = page.downloads_panel.rows.values()
    assert Path(row.status.path).name == "tiny-chat.Q8_0.gguf"
    assert fake_hub.downloads("tiny-chat.Q4_K_M.gguf") == 0


def test_gated_model_shows_the_link_and_the_download_explains(qtbot, page):
    _search(qtbot, page, "gated")
    panel = _open(qtbot, page, GATED)
    assert "Gated: yes" in panel.facts.text() and panel.gated_notice.isVisible()
    assert f'href="https://huggingface.co/{GATED}"' in panel.gated_notice.text()
    assert "config.json unavailable (gated)" in panel.fit_result.text()
    qtbot.mouseClick(page.findChild(QPushButton, "downloadButton"), Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: [r.status.state for r in page.downloads_panel.rows.values()] == ["failed"],
                    timeout=WAIT_MS)
    (row,) = page.downloads_panel.rows.values()
    assert "gated model" in row.line.text() and f"https://huggingface.co/{GATED}" in row.line.text()
    assert row.retry_button.isVisible()


def _running_row(qtbot, page, fake_hub, past_bytes=100_000):
    """Start tiny-chat slowly (~4 s for the weights) and return its row once under way."""
    fake_hub.throttle("model.safetensors", 0.1, chunk_size=16 * 1024)
    page.search_panel.downloadRequested.emit(TINY, None)
    rows = page.downloads_panel.rows
    qtbot.waitUntil(lambda: rows and next(iter(rows.values())).status.current_file == "model.safetensors"
                    and next(iter(rows.values())).status.bytes_done > past_bytes, timeout=WAIT_MS)
    (row,) = rows.values()
    return row


def _weights_gets(fake_hub):
    return [e for e in fake_hub.log if e["method"] == "GET" and e["path"].endswith("/model.safetensors")]


def test_cancel_asks_first_and_can_delete_the_partial(qtbot, page, fake_hub):
    row = _running_row(qtbot, page, fake_hub)
    asked = []
    page.downloads_panel.ask_cancel = lambda status, parent: asked.append(status.id) or None
    assert row.cancel_button.isVisible()
    qtbot.mouseClick(row.cancel_button, Qt.MouseButton.LeftButton)
    assert asked == [row.download_id] and page.downloads.get(row.download_id).state == "running"  # not cancelled
    page.downloads_panel.ask_cancel = lambda status, parent: "delete"
    qtbot.mouseClick(row.cancel_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: row.status.state == "cancelled", timeout=WAIT_MS)
    assert row.retry_button.isVisible() and row.line.text() == "cancelled"
    assert not list(fake_hub.cache.rglob("*.incomplete"))
    # The bar no longer shows the deleted bytes (config.json alone is left: a sliver).
    assert row.bar.value() < 10


def test_cancel_keeping_the_partial_then_retry_continues_where_it_stopped(qtbot, page, fake_hub):
    row = _running_row(qtbot, page, fake_hub)
    page.downloads_panel.ask_cancel = lambda status, parent: "keep"
    qtbot.mouseClick(row.cancel_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: row.status.state == "cancelled", timeout=WAIT_MS)
    (partial,) = fake_hub.cache.rglob("*.incomplete")
    kept, shown = partial.stat().st_size, row.bar.value()
    assert shown > 100 and "kept on disk: Retry continues from there" in row.line.text()
    fake_hub.throttle("model.safetensors", 0.0)
    qtbot.mouseClick(row.retry_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: row.status.state == "done", timeout=WAIT_MS)
    assert _weights_gets(fake_hub)[-1]["range"] == f"bytes={kept}-"   # not from 0% again


def test_pause_and_resume_a_download(qtbot, page, fake_hub):
    row = _running_row(qtbot, page, fake_hub)
    assert row.pause_button.isVisible() and not row.resume_button.isVisible()
    qtbot.mouseClick(row.pause_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: row.status.state == "paused", timeout=WAIT_MS)
    assert row.resume_button.isVisible() and row.cancel_button.isVisible() and not row.pause_button.isVisible()
    assert row.line.text().startswith("paused · ") and "Resume continues from there" in row.line.text()
    (partial,) = fake_hub.cache.rglob("*.incomplete")
    kept, shown = partial.stat().st_size, row.bar.value()
    assert shown > 100                                              # the bar stays where it was
    fake_hub.throttle("model.safetensors", 0.0)
    qtbot.mouseClick(row.resume_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: row.status.state == "done", timeout=WAIT_MS)
    gets = _weights_gets(fake_hub)
    assert len(gets) == 2 and gets[-1]["range"] == f"bytes={kept}-"


def test_offline_search_says_so(qtbot, page, fake_hub):
    fake_hub.stop()
    page.search_panel.search.setText("tiny")
    page.search_panel.search_now()
    qtbot.waitUntil(lambda: "could not be reached" in page.search_panel.status.text(), timeout=WAIT_MS)
    assert page.search_panel.results.count() == 0


def test_token_is_saved_privately_and_never_shown_again(qtbot, page, tmp_path):
    qtbot.waitUntil(lambda: "No token saved" in page.token_status.text(), timeout=WAIT_MS)
    edit = page.findChild(QLineEdit, "tokenEdit")
    assert edit.echoMode() == QLineEdit.EchoMode.Password
    qtbot.keyClicks(edit, "hf_secretvalue9876")
    qtbot.mouseClick(page.findChild(QPushButton, "saveTokenButton"), Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: page.token_status.text() == "token saved (hf_…9876)", timeout=WAIT_MS)
    assert edit.text() == "" and page.current_token() == "hf_secretvalue9876"
    token_file = Path(os.environ["HEARTH_DATA_DIR"]) / "hf_token"
    assert token_file.read_text() == "hf_secretvalue9876" and (token_file.stat().st_mode & 0o077) == 0
    # A new page (next app start) reads it back, and gated downloads use it.
    again = ModelsPage(FakeBridge())
    qtbot.addWidget(again)
    try:
        qtbot.waitUntil(lambda: again.token_status.text() == "token saved (hf_…9876)", timeout=WAIT_MS)
    finally:
        again.shutdown()
    qtbot.mouseClick(page.forget_token_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: "No token saved" in page.token_status.text(), timeout=WAIT_MS)
    assert not token_file.exists()


def test_library_add_and_delete_with_confirmation(qtbot, page, tmp_path, monkeypatch):
    lib = page.library_panel
    gguf = tmp_path / "mine.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 2044)
    lib.add_path(str(gguf), is_gguf=True)
    qtbot.waitUntil(lambda: lib.select_ref(str(gguf)), timeout=WAIT_MS)
    assert lib.table.item(lib.table.currentRow(), 2).text() == "2.0 KiB"
    asked = []
    monkeypatch.setattr(QMessageBox, "question", lambda *a, **k: asked.append(a[2]) or QMessageBox.StandardButton.No)
    qtbot.mouseClick(lib.delete_button, Qt.MouseButton.LeftButton)
    assert gguf.exists() and "Delete mine.gguf (2.0 KiB)" in asked[0]
    monkeypatch.setattr(QMessageBox, "question", lambda *a, **k: QMessageBox.StandardButton.Yes)
    qtbot.mouseClick(lib.delete_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: not gguf.exists() and str(gguf) not in [m.ref for m in lib.models], timeout=WAIT_MS)
    lib.add_path(str(tmp_path / "nothing.gguf"), is_gguf=True)
    assert "not a .gguf file" in lib.summary.text()
    # with nothing selected the buttons are off and say why
    lib.table.clearSelection()
    lib.table.setCurrentCell(-1, -1)
    lib._update_buttons()
    assert not lib.load_button.isEnabled() and "Off: select a model in the list first" in lib.load_button.toolTip()
    assert not lib.delete_button.isEnabled() and "Off: select a model" in lib.delete_button.toolTip()


def test_end_to_end_download_then_load_with_the_real_bridge(qtbot, fake_hub, file_keyring, bridge, chat_model):
    """Hub -> download -> library -> loadButton -> the real EngineBridge loads it."""
    from tests.app.gui.conftest import load_options

    files = {p.name: p.read_bytes() for p in Path(chat_model).iterdir() if p.is_file()}
    fake_hub.add_repo("acme/real-tiny", files, pipeline_tag="text-generation", tags=["text-generation"])
    page = ModelsPage(bridge)
    qtbot.addWidget(page)
    page.show()
    try:
        page.loadRequested.connect(lambda ref: bridge.load(load_options(ref)))
        _search(qtbot, page, "real-tiny")
        _open(qtbot, page, "acme/real-tiny")
        qtbot.mouseClick(page.findChild(QPushButton, "downloadButton"), Qt.MouseButton.LeftButton)
        lib = page.library_panel
        qtbot.waitUntil(lambda: lib.selected() is not None and lib.selected().name == "acme/real-tiny",
                        timeout=60_000)
        snapshot = lib.selected().ref
        with qtbot.waitSignal(bridge.modelLoaded, timeout=60_000) as blocker:
            qtbot.mouseClick(page.findChild(QPushButton, "loadButton"), Qt.MouseButton.LeftButton)
        info = blocker.args[0]
        assert Path(info.path) == Path(snapshot) and info.device == "cpu"
        qtbot.waitUntil(lambda: any(lib.table.item(r, 3).text() == "loaded" for r in range(lib.table.rowCount())))
    finally:
        page.shutdown()


def test_the_library_marks_a_gguf_or_the_default_as_loaded_by_what_was_asked_for(qtbot, page):
    """A .gguf (and the default) load from a converted folder: info.path is that folder,
    info.ref the file the library lists."""
    from app.services.library import LocalModel

    lib = page.library_panel
    models = [LocalModel("default", "SmolLM2-135M-Instruct (default)", "default", None, 1),
              LocalModel("/m/tiny.Q8_0.gguf", "tiny.Q8_0.gguf", "gguf", Path("/m/tiny.Q8_0.gguf"), 1)]
    lib._show(models)

    def status():
        return [lib.table.item(r, 3).text() for r in range(lib.table.rowCount())]
    page.bridge.modelLoaded.emit(fake_info("tiny.Q8_0.gguf", path="/cache/gguf/tiny.Q8_0-0123456789ab",
                                           ref="/m/tiny.Q8_0.gguf"), False)
    qtbot.waitUntil(lambda: status() == ["", "loaded"])
    page.bridge.modelLoaded.emit(fake_info("SmolLM2-135M-Instruct", path="/cache/default-x", ref="default"), False)
    qtbot.waitUntil(lambda: status() == ["loaded", ""])
    page.bridge.modelUnloaded.emit()
    qtbot.waitUntil(lambda: status() == ["", ""])
