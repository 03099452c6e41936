"""The engine sets OpenMP's idle policy to passive before torch loads (spinning OpenMP
workers made an engine loaded on a worker thread, as the app and the server load it, read
prompts 2-4x slower on 2 cores), and leaves a policy the user chose alone."""

from __future__ import annotations

import os
import subprocess
import sys

# engine's own __init__ runs before anything of the engine imports torch (the policy is
# read once, when torch's OpenMP runtime loads)
CHECK = ("import os, sys; import engine; assert 'torch' not in sys.modules, 'torch loaded first'; "
         "import engine.api, torch; print(os.environ['OMP_WAIT_POLICY'])")


def _policy(env_value: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if env_value is not None:
        env["OMP_WAIT_POLICY"] = env_value
    out = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_passive_unless_the_user_chose():
    assert _policy(None) == "PASSIVE"
    assert _policy("ACTIVE") == "ACTIVE"
