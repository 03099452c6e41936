"""A tensor-parallel rank that ended, as the engine sees it (without killing a process):
every model step raises EngineDeadError, worded as ``tp_host`` words it. The idle engine's
release of finished requests (a runner call without rows) still runs: a dead rank refuses
only steps, and raising there too ended the loop at a moment that depended on timing."""

from __future__ import annotations

from engine.errors import EngineDeadError
from engine.runner.model_runner import ModelRunner

WHY = "tensor parallel: rank 1 (cpu) ended (killed by signal 9). Reload the model."


def end_steps(monkeypatch, why: str = WHY):
    """From now on every step fails with ``EngineDeadError(why)``; returns the real
    ``ModelRunner.execute`` (to put back for a later load)."""
    plain = ModelRunner.execute

    def execute(self, inp):
        if not inp.rows:
            return plain(self, inp)
        raise EngineDeadError(why)

    monkeypatch.setattr(ModelRunner, "execute", execute)
    return plain
