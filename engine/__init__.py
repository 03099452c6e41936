"""Hearth's engine: ``engine.api`` is its public face.

OpenMP's idle threads sleep at once (``OMP_WAIT_POLICY=PASSIVE``, set here before torch
loads, unless the environment says otherwise). torch's default lets them spin for a while
after every parallel op; on a CPU-only machine with few cores they then fight the
engine's own kernel threads (hearth_kernels/cpu/hq_pool.h) and the engine thread itself. It
bites hardest where the app and the server run the engine: loaded on a worker thread
(the engine host's), where a 1,000-token prompt took twice as long to read (about 9 s
against 4.5 s on 2 cores) and a 32-token one three to four times as long. Passive
costs the bench's main-thread loads nothing measurable.
"""

import os

#: The policy the environment had before this (None: unset). ``hearth bench`` restores it
#: for llama.cpp's own OpenMP runtime, so the baseline runs as it would on its own.
USER_OMP_WAIT_POLICY = os.environ.get("OMP_WAIT_POLICY")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
