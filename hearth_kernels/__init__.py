"""Hearth's Triton kernels: one op per module, each a private ``@triton.jit`` kernel and a
public launcher that checks shapes, strides and dtypes. Imports only torch and triton.

Launchers are imported from their modules (``from hearth_kernels.rmsnorm import rms_norm``) so
importing this package stays cheap (it touches Triton only under TRITON_INTERPRET=1, to
apply the interpreter fix in ``hearth_kernels._compat``).
"""

from hearth_kernels._compat import fix_interpreter_scalar_index

fix_interpreter_scalar_index()
