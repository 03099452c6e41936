"""Work around a Triton 3.6 interpreter bug with NumPy >= 2.4 (triton-lang/triton#9171).

Under ``TRITON_INTERPRET=1`` a scalar is a 1-element NumPy array, and the interpreter turns
it into a Python int with ``int(array)``, which NumPy 2.4 rejects. Every kernel loop whose
bounds come from device data (``for n in range(start, end, BLOCK)``) hits it. Kernels
must keep those loops (only ``for range`` loops are software-pipelined on the GPU), so
the interpreter gets the upstream fix instead. Only applied in interpreter mode; a no-op
once Triton ships the fix (the patched call is then equivalent).
"""

from __future__ import annotations

import os

#: the values of TRITON_INTERPRET that Triton 3.6 takes as on (its getenv_bool: any case)
_ON = ("1", "true", "on", "yes", "y")


def interpreting() -> bool:
    """Whether Triton's interpreter runs the kernels (``TRITON_INTERPRET`` read as Triton reads
    it, without importing Triton): the one check for the kernels' CPU paths (no inline
    assembly, no PDL launch, the TMA descriptors emulated)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in _ON


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
