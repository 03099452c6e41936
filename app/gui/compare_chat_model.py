"""The chat's model around a comparison: unloaded for it when the user says so, and loaded
again when it ends.

The chat's model stays loaded unless told otherwise, and a comparison loads one
configuration after another beside it: they may not fit together, the configurations
measure slower, and on the CPU its memory counts in every configuration's peak. So the
Compare page asks first (``ask``: unload it, the default, or keep it). One unloaded is
loaded again by itself when the comparison ends (finished, failed or cancelled) with the
options it was loaded with, so the chat is back as it was. A model the user loads for the
chat while the unload waits for an answer to end withdraws the unload (the engine host
loads that one instead, ``unloadWithdrawn``): the comparison doesn't start, and the page
says why.
"""

from __future__ import annotations

from collections.abc import Callable

from PySide6.QtCore import QObject
from PySide6.QtWidgets import QMessageBox, QWidget

from app.gui.load_dialog import saved_load_options
from engine.api import ModelInfo, model_display_name

#: Answers of ``ask``: unload the chat's model for the comparison, or keep it loaded.
UNLOAD, KEEP = "unload", "keep"


class ChatModelHandoff(QObject):
    """Unloads the chat's model for a comparison and loads it again afterwards, through the
    ``EngineBridge`` (``bridge``); ``settings`` hold the options it was loaded with."""

    def __init__(self, bridge, settings, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.bridge = bridge
        self.settings = settings
        self.ask: Callable[[str], str | None] = self._ask
        self._reload: dict | None = None  # the chat model's load options, to load it again after
        self._then: Callable[[], None] | None = None  # what runs once it is unloaded
        self._withdrawn: Callable[[str], None] | None = None  # what runs if a load withdraws the unload

    @property
    def waiting(self) -> bool:
        """An unload was asked for and hasn't happened yet."""
        return self._then is not None

    @property
    def released(self) -> bool:
        """The chat's model was unloaded for the comparison (and is to be loaded again)."""
        return self._reload is not None

    def name(self) -> str | None:
        """The chat's model (loaded, or loading), as shown; None when there is none."""
        info: ModelInfo | None = getattr(self.bridge, "model_info", None)
        if info is not None:
            return info.name
        if getattr(self.bridge, "is_loading", False):
            return getattr(self.bridge, "loading_name", None) or "The chat's model"
        return None

    def ref(self) -> str:
        """What the chat's model loads from (else the last one loaded, else the default)."""
        info = getattr(self.bridge, "model_info", None)
        if info is not None:
            return info.ref or info.path or "default"
        if self.settings is not None:
            return str(self.settings.value("load/model", "default") or "default")
        return "default"

    def release(self, then: Callable[[], None], withdrawn: Callable[[str], None] | None = None) -> None:
        """Unload the chat's model, then call ``then`` (once the engine let it go). If the
        user loads a model for the chat before that (the unload waits for an answer to
        end), the unload is withdrawn: ``withdrawn`` gets the new model's name, ``then``
        never runs, and nothing is loaded again afterwards (the chat has the new one)."""
        self._reload = self._reload_options()
        self._then, self._withdrawn = then, withdrawn
        self.bridge.modelUnloaded.connect(self._unloaded)
        self.bridge.unloadWithdrawn.connect(self._withdrawn_by_load)
        self.bridge.unload(after_answers=True)  # an answer the chat is writing ends first

    def abandon(self) -> None:
        """Forget the waiting and the reload (the window is closing)."""
        self._disconnect()
        self._reload = None

    def restore(self) -> str:
        """Load the chat's model again if it was released, and stop waiting for the unload;
        returns the sentence that says so ("" when there was nothing to do)."""
        unloading = self._then is not None  # cancelled before the unload finished: the model is still there
        self._disconnect()
        options, self._reload = self._reload, None
        if not options:
            return ""
        if unloading:  # still waiting for the chat's answer: it stays (or comes back if it just went)
            self.bridge.keep_loaded(options)
            return ""
        if self.bridge.model_info is not None or self.bridge.is_loading:
            # the user loaded a model for the chat during the comparison: that one stays
            return f" {model_display_name(options.get('model'))} is not loaded again: the chat has another model now."
        self.bridge.load(options)
        return f" Loading {model_display_name(options.get('model'))} again for the chat."

    def _unloaded(self) -> None:
        then = self._then
        self._disconnect()
        if then is not None:
            then()

    def _withdrawn_by_load(self, name: str) -> None:
        """A load was asked for while the unload waited: the engine host gave the unload up
        (the model asked for replaces the chat's, not no model), so no modelUnloaded comes."""
        withdrawn = self._withdrawn
        if self._then is None:
            return
        self._disconnect()
        self._reload = None  # the chat gets the model asked for (or keeps its own if that fails): none is brought back
        if withdrawn is not None:
            withdrawn(name)

    def _disconnect(self) -> None:
        if self._then is not None:
            self._then = self._withdrawn = None
            for signal, slot in ((self.bridge.modelUnloaded, self._unloaded),
                                 (self.bridge.unloadWithdrawn, self._withdrawn_by_load)):
                try:
                    signal.disconnect(slot)
                except (RuntimeError, TypeError):
                    pass

    def _reload_options(self) -> dict | None:
        """How to load the chat's model again: the options it was loaded with (the saved
        ones, when they name it), else what its ModelInfo says."""
        saved = saved_load_options(self.settings) if self.settings is not None else None
        info = getattr(self.bridge, "model_info", None)
        if info is None:  # it was loading: what was asked for
            return saved if getattr(self.bridge, "is_loading", False) else None
        if saved is not None and saved.get("model") in (info.ref, info.path):
            return saved
        return {"model": info.ref or info.path, "device": info.device, "attention": info.attention,
                "dtype": info.dtype, "max_model_len": info.max_model_len, "quantization": info.quantization}

    def _ask(self, name: str) -> str | None:
        box = QMessageBox(QMessageBox.Icon.Question, "Unload the chat's model?",
                          f"{name} is loaded for the chat. A comparison loads its configurations one after "
                          "another; with the chat's model still in memory they may not fit, they measure slower, "
                          "and on the CPU its memory counts in every configuration's peak.\n\nUnload it for "
                          "the comparison? It is loaded again when the comparison ends.",
                          QMessageBox.StandardButton.Cancel, self.parent())
        unload = box.addButton("Unload and compare", QMessageBox.ButtonRole.AcceptRole)
        keep = box.addButton("Keep it loaded", QMessageBox.ButtonRole.ActionRole)
        box.setDefaultButton(unload)
        box.exec()
        clicked = box.clickedButton()
        return UNLOAD if clicked is unload else KEEP if clicked is keep else None
