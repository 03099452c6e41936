"""The signals the engine bridge delivers to the pages (``app.gui.bridge.EngineBridge``
emits them, queued from the engine host's events; test fakes subclass ``BridgeSignals`` too)."""

from __future__ import annotations

from PySide6.QtCore import QObject, Signal


class BridgeSignals(QObject):
    """The signals the bridge delivers (pages connect to these; test fakes subclass it).

    Every load asked for ends in exactly one of ``modelLoaded``, ``loadFailed`` (its
    message is ``LOAD_CANCELLED`` when the user cancelled it) or ``loadSuperseded`` (a
    newer load replaced it: not a failure, and pages need not show it). A load that failed
    after the loaded model was unloaded for it brings that model back: its ``loadFailed``
    says so, and a ``modelLoaded`` follows with ``reloaded`` True (it ends no load asked
    for). ``modelLoaded``'s info is the engine's ``ModelInfo``.

    ``requestStarted``'s info names the model that answers (``model``) and how many old
    messages were left out of what it sees (``dropped``)."""

    modelLoading = Signal(str)
    loadProgress = Signal(str)
    modelLoaded = Signal(object, bool)  # ModelInfo, reloaded (slots may take the info alone)
    loadFailed = Signal(str)
    loadSuperseded = Signal(str)  # the display name of the load another one replaced
    modelUnloaded = Signal()
    unloadWithdrawn = Signal(str)  # an unload(after_answers=True) given up for a load (its display name)
    tokenReceived = Signal(str, str)
    requestFinished = Signal(str, object)
    requestStarted = Signal(str, dict)  # request id, {"model": name, "dropped": n}
    promptProgress = Signal(str, int, int)  # request id, prompt tokens read, prompt tokens
    statsUpdated = Signal(object)
    engineError = Signal(str)

    SIGNALS = ("modelLoading", "loadProgress", "modelLoaded", "loadFailed", "loadSuperseded", "modelUnloaded",
               "unloadWithdrawn",
               "tokenReceived", "requestFinished", "requestStarted", "promptProgress", "statsUpdated",
               "engineError")
