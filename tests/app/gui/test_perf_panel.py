"""The Performance panel: a fake bridge feeds real engine.api events; fake NVML GPUs."""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PySide6.QtCore import QObject, Qt, Signal  # noqa: E402
from PySide6.QtGui import QImage  # noqa: E402
from PySide6.QtWidgets import QPushButton  # noqa: E402

from app.gui.perf_panel import PerfPanel  # noqa: E402
from app.services.telemetry import Telemetry  # noqa: E402
from engine.api import EngineStats, FinishedEvent  # noqa: E402
from engine.events import Timings, Usage  # noqa: E402
from tests.app.services.fake_nvml import GIB, FakeNvml, no_driver  # noqa: E402
from tests.app.model_info_fixtures import fake_info  # noqa: E402


class FakeBridge(QObject):
    """The four EngineBridge signals the panel listens to, emitted by the test."""

    statsUpdated = Signal(object)
    requestFinished = Signal(str, object)
    modelLoaded = Signal(object)
    modelUnloaded = Signal()
    model_info = None


def one_gpu(used_gib=30):
    return FakeNvml([dict(name="NVIDIA H100", used=used_gib * GIB, total=80 * GIB, util=50)])


def stats(running=2, waiting=1, used=30, total=120, gen=123.5, weights=10 * GIB, kv=15 * GIB):
    return EngineStats(running, waiting, total, used, total - used, 16, 0.5, gen, 900.0, 0, 3,
                       memory={"weights_bytes": weights, "kv_cache_bytes": kv, "process_rss_bytes": 1})


def finished(rid="r1", ttft=120.0, tok_s=55.5, n_out=20):
    return FinishedEvent(rid, "stop", Usage(9, n_out, 0), Timings(2.0, ttft, 18.0, tok_s, 500.0))


@pytest.fixture(autouse=True)
def _no_visible_devices(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


def make_panel(qtbot, nvml, manual=True):
    bridge = FakeBridge()
    panel = PerfPanel(bridge, telemetry=Telemetry(nvml=nvml))
    qtbot.addWidget(panel)
    if manual:
        panel.timer.stop()  # the tests tick by hand, so every point is known
    panel.resize(1000, 760)
    panel.show()
    qtbot.waitExposed(panel)
    return panel, bridge


def ydata(panel, name):
    y = panel.curves[name].yData
    return [] if y is None else list(y)


def test_panel_name_and_charts(qtbot):
    panel, _ = make_panel(qtbot, one_gpu())
    assert panel.objectName() == "perfPanel"
    assert set(panel.plots) == {"ttft", "decode", "memory", "kv", "queue", "cpu"}


def test_a_tick_puts_every_value_on_its_curve(qtbot):
    panel, bridge = make_panel(qtbot, one_gpu(used_gib=30))
    bridge.modelLoaded.emit(fake_info("m", device="cuda:0"))
    bridge.statsUpdated.emit(stats(running=3, waiting=2, used=30, total=120, gen=123.5))
    bridge.requestFinished.emit("r1", finished(ttft=120.0, tok_s=55.5))
    bridge.requestFinished.emit("r2", finished("r2", ttft=0.0, tok_s=0.0, n_out=0))  # no tokens
    panel.tick()

    assert ydata(panel, "ttft") == [120.0]  # the tokenless request draws no TTFT point
    assert ydata(panel, "decode_request") == [55.5]
    assert ydata(panel, "decode_aggregate") == [123.5]
    assert ydata(panel, "kv_pct") == [25.0]
    assert (ydata(panel, "running"), ydata(panel, "waiting")) == ([3.0], [2.0])
    # Stacked tops in GiB: weights 10, + KV 15 = 25, + other (30 - 25) = 30 = used.
    assert (ydata(panel, "weights"), ydata(panel, "kv"), ydata(panel, "other")) == ([10.0], [25.0], [30.0])
    assert (ydata(panel, "gpu0_used"), ydata(panel, "gpu0_total")) == ([30.0], [80.0])
    t = panel.curves["ttft"].xData[0]
    assert 0 <= t <= panel.history.now() and panel.curves["running"].xData[0] >= t

    assert not panel.no_gpu_label.isVisible() and not panel.plots["cpu"].isVisible()
    assert not panel.curves["rss"].isVisible() and panel.curves["weights"].isVisible()
    texts = {k: v.text() for k, v in panel.values.items()}
    assert texts == {"ttft": "120 ms", "decode": "55.5 tok/s", "aggregate": "123.5 tok/s",
                     "kv": "25 %", "memory": "30.0 / 80.0 GiB, 50 % busy"}


def test_two_ticks_append_and_the_split_follows_the_model(qtbot):
    nvml = FakeNvml([dict(name="A", used=5 * GIB, total=24 * GIB, util=7),
                     dict(name="B", used=20 * GIB, total=48 * GIB, util=93)])
    panel, bridge = make_panel(qtbot, nvml)
    panel.tick()  # no model yet: GPU lines only, no bands
    bridge.modelLoaded.emit(fake_info(device="cuda:1"))
    bridge.statsUpdated.emit(stats(weights=4 * GIB, kv=6 * GIB))
    nvml.gpus[1]["used"] = 22 * GIB
    panel.tick()
    assert ydata(panel, "gpu0_used") == [5.0, 5.0]
    assert ydata(panel, "gpu1_used") == [20.0, 22.0]
    assert ydata(panel, "weights") == [0.0, 4.0] and ydata(panel, "other") == [0.0, 22.0]
    assert math.isnan(ydata(panel, "running")[0]) and ydata(panel, "running")[1] == 2.0
    bridge.modelUnloaded.emit()
    panel.tick()
    assert ydata(panel, "weights")[-1] == 0.0 and math.isnan(ydata(panel, "kv_pct")[-1])
    assert panel.values["memory"].text() == "GPU0 5.0 / 24.0 GiB, 7 % busy  GPU1 22.0 / 48.0 GiB, 93 % busy"


def test_the_timer_samples_on_its_own(qtbot):
    panel, bridge = make_panel(qtbot, one_gpu(), manual=False)
    bridge.statsUpdated.emit(stats(running=1))
    qtbot.waitUntil(lambda: len(ydata(panel, "running")) >= 2, timeout=5000)
    assert set(ydata(panel, "running")) == {1.0}


def test_pause_freezes_the_charts_but_keeps_recording(qtbot):
    panel, bridge = make_panel(qtbot, one_gpu())
    bridge.requestFinished.emit("a", finished("a", ttft=100.0))
    panel.tick()
    qtbot.mouseClick(panel.pause_button, Qt.MouseButton.LeftButton)
    assert panel.paused and panel.pause_button.text() == "Resume"
    bridge.requestFinished.emit("b", finished("b", ttft=200.0))
    bridge.statsUpdated.emit(stats(running=7))
    panel.tick()
    panel.tick()
    assert ydata(panel, "ttft") == [100.0] and len(ydata(panel, "running")) == 1
    assert panel.values["ttft"].text() == "100 ms"
    assert len(panel.history.requests) == 2 and len(panel.history.samples) == 3
    qtbot.mouseClick(panel.pause_button, Qt.MouseButton.LeftButton)
    assert not panel.paused and panel.pause_button.text() == "Pause"
    assert ydata(panel, "ttft") == [100.0, 200.0] and ydata(panel, "running")[1:] == [7.0, 7.0]


def test_clear_empties_charts_and_numbers(qtbot):
    panel, bridge = make_panel(qtbot, one_gpu())
    bridge.statsUpdated.emit(stats())
    bridge.requestFinished.emit("a", finished())
    panel.tick()
    panel.set_paused(True)  # clearing works while paused too
    qtbot.mouseClick(panel.findChild(type(panel.pause_button), "perfClearButton"), Qt.MouseButton.LeftButton)
    for name in ("ttft", "decode_request", "decode_aggregate", "running", "weights", "gpu0_used"):
        assert ydata(panel, name) == [], name
    assert all(v.text() == "—" for v in panel.values.values())
    assert len(panel.history) == 0


def test_export_png_is_a_picture_of_the_panel(qtbot, tmp_path):
    panel, bridge = make_panel(qtbot, one_gpu())
    bridge.statsUpdated.emit(stats())
    panel.tick()
    path = tmp_path / "perf.png"
    panel.export_png(path)
    img = QImage(str(path))
    assert path.stat().st_size > 1000 and not img.isNull()
    dpr = panel.devicePixelRatioF()
    assert (img.width(), img.height()) == (round(panel.width() * dpr), round(panel.height() * dpr))
    # Not a blank grab: the picture has many colours (charts, text).
    assert len({img.pixel(x, y) for x in range(0, img.width(), 7) for y in range(0, img.height(), 7)}) > 5


def test_export_csv_writes_the_recorded_rows(qtbot, tmp_path):
    panel, bridge = make_panel(qtbot, one_gpu())
    bridge.modelLoaded.emit(fake_info(device="cuda:0"))
    bridge.statsUpdated.emit(stats())
    bridge.requestFinished.emit("r1", finished(ttft=98.5))
    panel.tick()
    panel.tick()
    path = tmp_path / "perf.csv"
    assert panel.export_csv(path) == 3
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["series"] for r in rows] == ["request", "sample", "sample"]
    assert float(rows[0]["ttft_ms"]) == 98.5 and rows[0]["request_id"] == "r1"
    assert float(rows[1]["gpu0_weights_bytes"]) == 10 * GIB and float(rows[2]["running"]) == 2


def test_export_buttons_use_the_chosen_path_and_report_failures(qtbot, tmp_path):
    panel, _ = make_panel(qtbot, one_gpu())
    panel.tick()
    asked = []
    panel.choose_save_path = lambda caption, name, filt: asked.append((name, filt)) or str(tmp_path / "out")
    qtbot.mouseClick(panel.findChild(type(panel.pause_button), "perfExportCsvButton"), Qt.MouseButton.LeftButton)
    qtbot.mouseClick(panel.findChild(type(panel.pause_button), "perfExportPngButton"), Qt.MouseButton.LeftButton)
    assert (tmp_path / "out.csv").is_file() and not QImage(str(tmp_path / "out.png")).isNull()
    assert asked[0][0].endswith(".csv") and "*.png" in asked[1][1]
    assert "out.png" in panel.message.text()
    panel.choose_save_path = lambda *a: str(tmp_path / "missing-folder" / "x.csv")
    qtbot.mouseClick(panel.findChild(type(panel.pause_button), "perfExportCsvButton"), Qt.MouseButton.LeftButton)
    assert panel.message.text().startswith("Could not save") and "folder" in panel.message.text()
    panel.choose_save_path = lambda *a: None  # cancelled dialog: nothing happens
    qtbot.mouseClick(panel.findChild(type(panel.pause_button), "perfExportPngButton"), Qt.MouseButton.LeftButton)
    assert panel.message.text().startswith("Could not save")


def test_without_nvml_the_panel_explains_and_shows_process_memory(qtbot):
    panel, bridge = make_panel(qtbot, no_driver())
    bridge.modelLoaded.emit(fake_info(device="cpu"))
    bridge.statsUpdated.emit(stats(weights=GIB // 8, kv=GIB // 16))
    panel.tick()
    assert panel.no_gpu_label.isVisible()
    text = panel.no_gpu_label.text()
    assert text.startswith("No NVIDIA GPU: showing process memory and CPU") and "NVML Shared Library" in text
    assert panel.plots["cpu"].isVisible() and panel.curves["rss"].isVisible()
    assert not any(name.startswith("gpu") for name in panel.curves)
    last = panel.history.last_sample
    assert ydata(panel, "rss") == [last.process_rss_bytes / GIB] and last.process_rss_bytes > 0
    assert ydata(panel, "ram_total") == [last.ram_total_bytes / GIB] and last.ram_total_bytes > 0
    assert ydata(panel, "process_cpu") == [last.process_cpu_pct]
    # A CPU model's weights and KV cache are part of RSS: same stack, topped by RSS.
    assert ydata(panel, "weights") == [0.125] and ydata(panel, "kv") == [0.1875]
    assert ydata(panel, "other") == pytest.approx([last.process_rss_bytes / GIB])
    assert panel.captions["memory"].text() == "Memory" and panel.values["memory"].text().startswith("RSS ")


def test_redraw_is_skipped_while_hidden_and_catches_up_when_shown(qtbot):
    panel, bridge = make_panel(qtbot, one_gpu())
    panel.hide()
    bridge.statsUpdated.emit(stats(running=4))
    panel.tick()
    assert ydata(panel, "running") == []
    panel.show()
    assert ydata(panel, "running") == [4.0]


def test_end_to_end_with_the_real_bridge(qtbot, bridge, chat_model):
    from engine.api import SamplingParams
    from tests.app.gui.conftest import load_options

    panel = PerfPanel(bridge, telemetry=Telemetry(nvml=no_driver()))
    qtbot.addWidget(panel)
    panel.timer.stop()
    panel.show()
    seen = []
    bridge.statsUpdated.connect(seen.append)
    with qtbot.waitSignal(bridge.modelLoaded, timeout=60_000):
        bridge.load(load_options(chat_model))
    qtbot.waitUntil(lambda: bool(seen), timeout=10_000)
    with qtbot.waitSignal(bridge.requestFinished, timeout=60_000) as blocker:
        bridge.submit(prompt="The quick brown fox", params=SamplingParams(max_tokens=6, temperature=0.0))
    ev = blocker.args[1]
    assert ev.reason == "length" and ev.usage.completion_tokens == 6
    panel.tick()
    assert ydata(panel, "ttft") == [ev.timings.ttft_ms]
    assert ydata(panel, "decode_request") == [ev.timings.decode_tok_s]
    assert ydata(panel, "running") == [float(seen[-1].num_running)]  # the latest stats
    assert ydata(panel, "kv_pct") == [100 * seen[-1].kv_blocks_used / seen[-1].kv_blocks_total]
    weights = np.float64(panel.history.last_sample.weights_bytes) / GIB
    assert ydata(panel, "weights") == [weights] and weights > 0


def test_a_load_keeps_the_serving_model_until_it_is_replaced(qtbot):
    """The bridge keeps the old model serving while another loads (and after a failed
    load): its memory split stays on the charts until modelUnloaded or modelLoaded."""
    class LoadingBridge(FakeBridge):
        modelLoading = Signal(str)
        loadFailed = Signal(str)

    bridge = LoadingBridge()
    panel = PerfPanel(bridge, telemetry=Telemetry(nvml=one_gpu()))
    qtbot.addWidget(panel)
    panel.timer.stop()
    panel.show()
    panel.clock = clock = FakeClock()
    bridge.modelLoaded.emit(fake_info(device="cuda:0"))
    bridge.statsUpdated.emit(stats())
    panel.tick()
    bridge.modelLoading.emit("next-model")
    clock.now += 1
    panel.tick()
    bridge.loadFailed.emit("no tokenizer")
    clock.now += 1
    panel.tick()
    assert ydata(panel, "weights") == [10.0, 10.0, 10.0]
    bridge.modelUnloaded.emit()  # made room for the next one
    panel.tick()
    assert ydata(panel, "weights")[-1] == 0.0 and math.isnan(ydata(panel, "running")[-1])


# -- drawing only what changed, only when seen (the idle page took 56% of a core) ----------

class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _count_calls(monkeypatch, obj, name) -> list:
    calls = []
    real = getattr(obj, name)
    monkeypatch.setattr(obj, name, lambda *a, **k: (calls.append(a), real(*a, **k))[1])
    return calls


def test_an_idle_page_redraws_once_a_second_and_an_active_one_at_every_tick(qtbot):
    panel, bridge = make_panel(qtbot, no_driver())
    panel.clock = clock = FakeClock()
    bridge.statsUpdated.emit(stats(running=0, waiting=0, gen=0.0))
    panel.tick()
    drawn = panel.draw_count
    for _ in range(3):  # only the machine's CPU / RSS move: nothing drawn within the second
        clock.now += 0.25
        panel.tick()
    assert panel.draw_count == drawn
    clock.now += 0.25  # a second since the last drawing
    panel.tick()
    assert panel.draw_count == drawn + 1
    bridge.statsUpdated.emit(stats(running=1, gen=12.0))  # the engine is busy: every tick
    for i in range(3):
        bridge.statsUpdated.emit(stats(running=1, gen=12.0 + i))
        clock.now += 0.25
        panel.tick()
    assert panel.draw_count == drawn + 4
    bridge.requestFinished.emit("r", finished("r"))  # a finished request is drawn at once
    panel.tick()
    assert panel.draw_count == drawn + 5 and ydata(panel, "ttft") == [120.0]


def test_nothing_is_drawn_on_another_page_or_in_a_minimised_window(qtbot):
    from PySide6.QtWidgets import QLabel, QStackedWidget

    stack = QStackedWidget()
    qtbot.addWidget(stack)
    bridge = FakeBridge()
    panel = PerfPanel(bridge, telemetry=Telemetry(nvml=one_gpu()))
    panel.timer.stop()
    stack.addWidget(QLabel("chat"))
    stack.addWidget(panel)
    stack.resize(900, 700)
    stack.show()
    qtbot.waitExposed(stack)
    bridge.statsUpdated.emit(stats(running=3))
    panel.tick()
    assert panel.draw_count == 0 and ydata(panel, "running") == []  # the chat page is shown
    stack.setCurrentWidget(panel)
    assert panel.draw_count == 1 and ydata(panel, "running") == [3.0]  # catches up when shown
    stack.showMinimized()
    qtbot.waitUntil(stack.isMinimized, timeout=2000)
    bridge.statsUpdated.emit(stats(running=5))
    panel.tick()
    assert panel.draw_count == 1
    stack.showNormal()
    qtbot.waitUntil(lambda: panel.draw_count == 2, timeout=2000)
    assert ydata(panel, "running") == [3.0, 5.0]


def test_a_tick_redraws_only_what_changed(qtbot, monkeypatch):
    panel, bridge = make_panel(qtbot, one_gpu())
    bridge.modelLoaded.emit(fake_info(device="cuda:0"))
    bridge.requestFinished.emit("r1", finished())
    bridge.statsUpdated.emit(stats(gen=10.0))
    panel.tick()
    ttft_draws = _count_calls(monkeypatch, panel.curves["ttft"], "setData")
    x_ranges = _count_calls(monkeypatch, panel.plots["ttft"], "setXRange")
    y_ranges = {k: _count_calls(monkeypatch, p, "setYRange") for k, p in panel.plots.items()}
    caption = _count_calls(monkeypatch, panel.values["ttft"], "setText")
    for i in range(20):  # five seconds of streaming, inside the first time step
        bridge.statsUpdated.emit(stats(gen=10.0 + i % 3))
        panel.tick()
    assert len(ydata(panel, "decode_aggregate")) == 21
    assert ttft_draws == [] and caption == []  # no new request: its chart and number untouched
    assert x_ranges == [] and all(v == [] for v in y_ranges.values())  # axes not regenerated
    for name in ("rss", "process_cpu"):  # hidden in GPU mode: not drawn at all
        assert ydata(panel, name) == []


def test_axes_start_at_zero_with_nice_tops_and_no_multiplier(qtbot):
    panel, bridge = make_panel(qtbot, one_gpu())

    def y_range(key):
        return tuple(round(v, 6) for v in panel.plots[key].getPlotItem().getViewBox().viewRange()[1])

    assert y_range("ttft") == (0, 100) and y_range("decode") == (0, 10) and y_range("kv") == (0, 100)
    left = panel.plots["decode"].getPlotItem().getAxis("left")
    assert "x0.001" not in left.labelString() and left.labelString().count("tok/s") == 1
    bridge.requestFinished.emit("r1", finished(ttft=494.6, tok_s=41.0))
    panel.tick()
    assert y_range("ttft") == (0, 600)  # one point: from zero, not 494.2-495.0
    assert y_range("decode") == (0, 50)
    x0, x1 = panel.plots["queue"].getPlotItem().getViewBox().viewRange()[0]  # linked to the first
    assert x0 <= panel.history.first_sample.t and x1 >= panel.history.last_request.t


def test_legends_sit_outside_the_data_area(qtbot):
    panel, bridge = make_panel(qtbot, one_gpu())
    bridge.modelLoaded.emit(fake_info(device="cuda:0"))
    bridge.statsUpdated.emit(stats())
    panel.tick()
    for key, plot in panel.plots.items():
        item = plot.getPlotItem()
        if not plot.isVisible():
            continue
        view = item.getViewBox().sceneBoundingRect()
        legend = item.legend.sceneBoundingRect()
        assert item.legend.items, key
        assert not view.intersects(legend), key
        assert legend.top() >= view.bottom(), key


def test_exports_open_in_pictures_or_documents_and_remember_the_last_folder(qtbot, tmp_path, monkeypatch):
    from PySide6.QtCore import QSettings, QStandardPaths
    from PySide6.QtWidgets import QFileDialog

    from app.gui.export_dirs import EXPORT_DIR_KEY

    home = tmp_path / "home"
    for sub in ("Documents", "Pictures", "charts"):
        (home / sub).mkdir(parents=True)
    folders = {QStandardPaths.StandardLocation.DocumentsLocation: home / "Documents",
               QStandardPaths.StandardLocation.PicturesLocation: home / "Pictures"}
    monkeypatch.setattr(QStandardPaths, "writableLocation", lambda loc: str(folders.get(loc, home)))
    settings = QSettings(str(tmp_path / "s.ini"), QSettings.Format.IniFormat)
    panel = PerfPanel(FakeBridge(), telemetry=Telemetry(nvml=one_gpu()), settings=settings)
    qtbot.addWidget(panel)
    panel.timer.stop()
    offered = []

    def fake_dialog(_parent, _caption, start, _filter):
        offered.append(start)
        return str(home / "charts" / "run.png"), ""
    monkeypatch.setattr(QFileDialog, "getSaveFileName", fake_dialog)
    qtbot.mouseClick(panel.findChild(QPushButton, "perfExportPngButton"), Qt.MouseButton.LeftButton)
    assert Path(offered[0]).parent == home / "Pictures"  # never the working directory
    assert (home / "charts" / "run.png").is_file()
    assert settings.value(EXPORT_DIR_KEY) == str(home / "charts")
    qtbot.mouseClick(panel.findChild(QPushButton, "perfExportCsvButton"), Qt.MouseButton.LeftButton)
    assert Path(offered[1]).parent == home / "charts"  # the last folder, remembered


def test_an_added_extension_never_replaces_a_file_unasked(qtbot, tmp_path):
    """The save dialog asked about "run", not "run.csv": replacing that one is asked here."""
    panel, _ = make_panel(qtbot, one_gpu())
    panel.tick()
    existing = tmp_path / "run.csv"
    existing.write_text("keep me")
    asked = []
    panel.choose_save_path = lambda *a: str(tmp_path / "run")
    panel.confirm_overwrite = lambda path: asked.append(path) or False
    qtbot.mouseClick(panel.findChild(QPushButton, "perfExportCsvButton"), Qt.MouseButton.LeftButton)
    assert asked == [existing] and existing.read_text() == "keep me"
    panel.confirm_overwrite = lambda path: True
    qtbot.mouseClick(panel.findChild(QPushButton, "perfExportCsvButton"), Qt.MouseButton.LeftButton)
    assert existing.read_text().startswith("series,") and "rows to" in panel.message.text()


def test_long_figures_wrap_instead_of_widening_the_window(qtbot):
    """Its row of figures (a CPU's "RSS 0.64 GiB · RAM 1.2 / 23.5 GiB" in a large bold font)
    set the page's minimum width, and with it the window's, to ~850 px once the page had been
    shown: the figures wrap now, and the page fits a 640-px-wide window."""
    panel, bridge = make_panel(qtbot, no_driver())
    bridge.modelLoaded.emit(fake_info(device="cpu"))
    bridge.statsUpdated.emit(stats(weights=GIB // 8, kv=GIB // 16))
    bridge.requestFinished.emit("r1", finished(ttft=12345.6, tok_s=1234.5))
    panel.tick()
    panel.values["memory"].setText("RSS 123.45 GiB · RAM 456.7 / 1023.5 GiB")  # a big machine's
    assert panel.minimumSizeHint().width() <= 520, panel.minimumSizeHint()
    panel.resize(520, 600)
    qtbot.waitUntil(lambda: panel.width() == 520)
    value = panel.values["memory"]
    assert value.height() >= 2 * value.fontMetrics().height() - 2  # wrapped onto a second line, not cut
    assert value.x() + value.width() <= panel.width()
    panel.resize(1300, 600)  # where there is room: one line
    qtbot.waitUntil(lambda: panel.width() == 1300)
    qtbot.waitUntil(lambda: value.height() < 2 * value.fontMetrics().height() - 2)
    assert value.width() >= value.fontMetrics().horizontalAdvance(value.text())


def test_a_narrow_page_takes_one_chart_a_row_rather_than_cutting_two_off(qtbot):
    """In a 640 x 480 window two charts a row were ~220 px each: "Time to first token per
    request" and the memory and CPU legends were cut off at the chart's edge."""
    panel, _bridge = make_panel(qtbot, no_driver())
    panel.tick()
    panel.redraw(force=True)  # the CPU chart and the process-memory legend of a machine without NVML
    panel.resize(490, 480)  # the page's size in a 640 x 480 window
    qtbot.waitUntil(lambda: panel.plots["ttft"].width() < 480)
    for key, plot in panel.plots.items():
        item = plot.getPlotItem()
        assert item.titleLabel.item.boundingRect().width() <= plot.width(), key
        assert item.legend.preferredWidth() <= plot.width(), key
    panel.resize(1000, 760)  # room for two a row again
    qtbot.waitUntil(lambda: panel.plots["ttft"].y() == panel.plots["decode"].y())
