"""Work around a Triton 3.6 interpreter bug with NumPy >= 2.4 (triton-lang/triton#9171).

Under ``TRITON_INTERPRET=1`` a scalar is a 1-element NumPy array, and the interpreter turns
it into a Python int with ``int(array)``, which NumPy 2.4 rejects. Every kernel loop whose
bounds come from device data (``for n in range(start, end, BLOCK)``) hits it. Kernels
must keep those loops (only ``for range`` loops are software-pipelined on the GPU), so
the interpreter gets the upstream fix instead. Only applied in interpreter mode; a no-op
once Triton ships the fix (the patched call is then equivalent).
"""

from __future__ import annotations

import functools
import os
import re

#: the values of TRITON_INTERPRET that Triton 3.4+ takes as on (its knobs' getenv_bool: any
#: case); earlier Triton took "1" alone
_ON = ("1", "true", "on", "yes", "y")


@functools.cache
def _reads_words() -> bool:
    """Whether the installed Triton reads TRITON_INTERPRET through its knobs (3.4 and later)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        found = [int(n) for n in re.findall(r"\d+", version("triton"))[:2]]
    except PackageNotFoundError:
        return True
    return len(found) < 2 or tuple(found) >= (3, 4)


def interpreting() -> bool:
    """Whether Triton's interpreter runs the kernels (``TRITON_INTERPRET`` read as the installed
    Triton reads it, without importing Triton): the one check for the kernels' CPU paths (no
    inline assembly, no PDL launch, the TMA descriptors emulated)."""
    value = os.environ.get("TRITON_INTERPRET", "0")
    return value.lower() in _ON if _reads_words() else value == "1"


def fix_interpreter_scalar_index() -> None:
    """Make interpreted scalars usable as loop bounds (idempotent, interpreter mode only)."""
    if not interpreting():
        return
    try:
        from triton.runtime import interpreter
    except ImportError:  # Triton without an interpreter: nothing to fix
        return
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_hearth_scalar_index", False):
        return

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patch_lang_tensor._hearth_scalar_index = True
    interpreter._patch_lang_tensor = patch_lang_tensor
