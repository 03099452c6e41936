"""A tensor-parallel rank other than 0 (issue 18): ``python -m engine.runner.tp_worker RANK``,
started by rank 0 (``engine.runner.tp_host``), which it connects back to
(``HEARTH_TP_CONNECT``, ``HEARTH_TP_KEY``).

It brings its shard up with the load's arguments, in step with rank 0 (the same steps,
their collectives paired), then runs each call rank 0 sends (every step's ``RunnerInput``,
scores, warm-ups) on its runner. Its runner samples nothing (``samples = False``: rank 0
holds the sampler, the RNGs and the grammars); the tokens a pipelined decode step is
launched from are rank 0's, broadcast (``engine.runner.execute``).

It ends when told to, when its connection closes, when its parent is gone, or after an
error, which it reports first (rank 0 names it).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import traceback
from multiprocessing.connection import Client

import torch

from engine.errors import HearthError
from engine.layers.parallel import TPGroup
from engine.runner.model_runner import ModelRunner
from engine.runner.tp_host import connect, process_group


class FollowerRunner(ModelRunner):
    """A rank's runner: the model's steps, no sampling."""

    samples = False


def _watch_parent(parent: int) -> None:
    """Exit once the process that started this one is gone (never outlive the engine)."""
    while True:
        time.sleep(0.5)
        if os.getppid() != parent:
            os._exit(1)


def main(rank: int) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C is rank 0's (stop an answer)
    host, port = os.environ["HEARTH_TP_CONNECT"].rsplit(":", 1)
    conn = Client((host, int(port)), authkey=bytes.fromhex(os.environ["HEARTH_TP_KEY"]))
    threading.Thread(target=_watch_parent, args=(os.getppid(),), name="hearth-tp-parent", daemon=True).start()
    conn.send(("hello", rank))
    runner = None
    try:
        msg = conn.recv()
        if msg[0] != "load":
            return 0
        a = msg[1]
        device = torch.device(a["device"][rank])
        store = torch.distributed.TCPStore("127.0.0.1", a["store_port"], a["world"], is_master=False)
        pg = process_group(a["backend"], store, rank, a["world"], device)
        connect(pg, device)
        if device.type == "cpu":  # ranks share the cores (torch would give each all of them)
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // a["world"]))
        runner = FollowerRunner.create(a["config"], a["spec"], a["weights"], device=device, dtype=a["dtype"],
                                 kv_dtype=a["kv_dtype"], attention=a["attention"],
                                 max_model_len=a["max_model_len"], tp=TPGroup(rank, a["world"], pg))
        conn.send(("ready", {}))
        while True:
            msg = conn.recv()
            if msg[0] == "exit":
                return 0
            _, name, args, kwargs = msg
            getattr(runner, name)(*args, **kwargs)
    except (EOFError, OSError):  # rank 0 is gone
        return 1
    except BaseException as e:
        if not isinstance(e, HearthError):  # (a user-worded error: rank 0 says it)
            traceback.print_exc()
        try:
            conn.send(("error", type(e).__name__, str(e), tuple(getattr(e, "options", ()))))
        except (OSError, EOFError):
            pass
        return 1
    finally:
        if runner is not None:
            from engine.runner.lifecycle import release_runner

            release_runner(runner)


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1])))
