"""Tensor parallel's processes, rank 0's side (issue 18, ``--split tensor``).

Rank 0 is the engine's own process: the scheduler, the sampler and its shard of the
model (``TensorParallelRunner``, a ``ModelRunner`` whose steps are sent to the other
ranks first). Every other rank is a worker process started for the load
(``engine.runner.tp_worker``: a plain subprocess, so the desktop app's engine process,
itself a daemonic child, can start it), holding its shard on its device and running the
same steps in the same order: their collectives (gloo on CPUs, NCCL on GPUs, through
``ProcessGroup`` objects of this load only, so a second tensor-parallel load in the same
process gets its own group) pair up.

The wire: each worker connects back to a ``multiprocessing.connection`` listener on
127.0.0.1 (a random key), says hello, gets the load's arguments, brings its runner up,
then says ready (or the error that stopped it) and takes calls: each step's
``RunnerInput`` (``execute``), scores and warm-ups, then ``exit``. Nothing is sent back
per step: the steps wait on each other inside the collectives only.

A rank that dies (killed, out of memory, a failed step) fails the step it was in on every
rank: a watch thread on rank 0 sees the process end and aborts the process group (NCCL
would otherwise wait out its timeout; gloo also raises when a peer's socket closes); rank
0 then names the rank and why it ended (``EngineDeadError``: reload the model), and every
later step is refused at once. Any error of a step on rank 0 is fatal the same way (the
others would wait in a collective it never reaches). The workers ignore Ctrl+C (their own
session): a terminal's interrupt stops an answer, not the model.
Releasing the runner (an unload, a reload, a failed load, the engine's shutdown) ends
every worker: asked first, killed after ``EXIT_WAIT_S``. A worker whose parent is gone
exits on its own.
"""

from __future__ import annotations

import datetime
import logging
import os
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection, Listener

import torch

from engine.errors import EngineDeadError, HearthError, LoadCancelledError, ModelLoadError
from engine.layers.parallel import TPGroup
from engine.runner.lifecycle import release_runner
from engine.runner.model_runner import ModelRunner

log = logging.getLogger("hearth.loader")

#: How long a collective may wait for a rank that is alive but stuck (a hung GPU), and
#: how long the workers have to start and connect.
COLLECTIVE_TIMEOUT_S = 600
CONNECT_TIMEOUT_S = 180
#: How long a worker has to exit when asked before it is killed.
EXIT_WAIT_S = 10
#: How long a rank's report of a failed step waits for another rank to be seen killed (the cause).
REPORT_WAIT_S = 0.5


def process_group(backend: str, store, rank: int, world: int, device: torch.device):
    """This load's process group (not torch's default one): gloo or NCCL."""
    timeout = datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S)
    if backend == "gloo":
        return torch.distributed.ProcessGroupGloo(store, rank, world, timeout)
    torch.cuda.set_device(device)
    opts = torch.distributed.ProcessGroupNCCL.Options()
    opts._timeout = timeout
    return torch.distributed.ProcessGroupNCCL(store, rank, world, opts)


def connect(pg, device: torch.device) -> None:
    """The group's first collective, at once (NCCL connects lazily: a rank that failed
    early would otherwise hold the others in their first real collective, unwatched)."""
    one = torch.zeros(1, device=device)
    pg.allreduce([one]).wait()
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Ranks:
    """Rank 0's handles on the worker processes: their connections, and why one ended."""

    def __init__(self, devices: tuple[str, ...]) -> None:
        self.devices = devices
        self.procs: dict[int, subprocess.Popen] = {}
        self.conns: dict[int, Connection] = {}
        self.failure: str | None = None  # set once a rank is known dead: every step refused
        self._listener: Listener | None = None
        self._key = secrets.token_bytes(16)
        self.store = None
        self.pg = None  # rank 0's process group, once made (aborted when a rank dies)
        self.aborted = False  # the watch aborted the group: what a step returns since is void
        self._closing = threading.Event()

    # -- start -------------------------------------------------------------------------
    def start(self, store_port: int) -> None:
        """Start ranks 1.. and wait until each has connected (CONNECT_TIMEOUT_S)."""
        self._listener = Listener(("127.0.0.1", 0), authkey=self._key)
        host, port = self._listener.address
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p),
               "HEARTH_TP_CONNECT": f"{host}:{port}", "HEARTH_TP_KEY": self._key.hex()}
        for rank in range(1, len(self.devices)):
            # A session of its own: the terminal's Ctrl+C is for rank 0 (stop an answer), not them.
            self.procs[rank] = subprocess.Popen([sys.executable, "-m", "engine.runner.tp_worker", str(rank)],
                                                env=env, stdin=subprocess.DEVNULL, start_new_session=True)
        threading.Thread(target=self._watch, name="hearth-tp-watch", daemon=True).start()
        accepted: list[Connection] = []
        errors: list[BaseException] = []

        def accept() -> None:
            try:
                for _ in self.procs:
                    accepted.append(self._listener.accept())
            except BaseException as e:  # the listener closed under it (a failed start)
                errors.append(e)

        thread = threading.Thread(target=accept, name="hearth-tp-accept", daemon=True)
        thread.start()
        deadline = time.monotonic() + CONNECT_TIMEOUT_S
        while thread.is_alive():
            thread.join(0.1)
            gone = self._gone()
            if gone is not None:
                raise ModelLoadError(f"tensor parallel: {gone} before it connected{self._why_gone(gone)}.")
            if time.monotonic() > deadline:
                raise ModelLoadError(f"tensor parallel: the worker processes did not connect within "
                                     f"{CONNECT_TIMEOUT_S} s.")
        if errors:
            raise ModelLoadError(f"tensor parallel: could not accept the worker processes: {errors[0]}")
        for conn in accepted:
            hello = conn.recv()  # ("hello", rank)
            self.conns[hello[1]] = conn

    def _watch(self) -> None:
        """Abort the process group as soon as a worker ends unasked: a collective waiting
        for it then fails at once instead of after the timeout (NCCL never notices)."""
        while not self._closing.wait(0.2):
            pg = self.pg
            if pg is not None and self._gone() is not None:
                self.aborted = True  # first: an aborted NCCL collective returns without an error
                try:
                    pg.abort()
                except Exception:  # noqa: BLE001 - best effort: the step still fails by its timeout
                    log.debug("could not abort the process group", exc_info=True)
                return  # (before the group exists, make_group watches the workers itself)

    def make_group(self, backend: str, device: torch.device, should_stop: Callable[[], bool] | None):
        """Rank 0's process group, made on a thread while the workers are watched: one that
        failed before making its own would otherwise hold rank 0 in the rendezvous until
        the timeout."""
        made: list = []

        def make() -> None:
            try:
                if device.type == "cuda":
                    torch.cuda.set_device(device)  # (per thread: the caller sets it too)
                pg = process_group(backend, self.store, 0, len(self.devices), device)
                connect(pg, device)
                made.append(pg)
            except BaseException as e:  # noqa: BLE001 - reported below
                made.append(e)

        thread = threading.Thread(target=make, name="hearth-tp-group", daemon=True)
        thread.start()
        while thread.is_alive():
            thread.join(0.1)
            if should_stop is not None and should_stop():
                raise LoadCancelledError("loading cancelled")
            if self._gone() is not None:
                raise self.why(None)
        if isinstance(made[0], BaseException):
            raise self.why(made[0])
        self.pg = made[0]
        return self.pg

    def send_load(self, args: dict) -> None:
        for rank, conn in self.conns.items():
            conn.send(("load", {**args, "rank": rank}))

    def wait_ready(self, should_stop: Callable[[], bool] | None) -> None:
        """Wait for every worker's bring-up to end; raise the first one's error."""
        for rank, conn in sorted(self.conns.items()):
            while not conn.poll(0.1):
                if should_stop is not None and should_stop():
                    raise LoadCancelledError("loading cancelled")
                gone = self._gone()
                if gone is not None:
                    raise ModelLoadError(f"tensor parallel: {gone} while loading{self._why_gone(gone)}.")
            msg = self._recv(rank)
            if msg[0] != "ready":
                raise _worker_error(rank, self.devices[rank], msg)

    # -- steps -------------------------------------------------------------------------
    def call(self, name: str, *args) -> None:
        """Have every worker run ``runner.<name>(*args)`` (no reply)."""
        if self.failure is not None:
            raise EngineDeadError(self.failure)
        msg = ("call", name, args, {})
        for rank, conn in self.conns.items():
            try:
                conn.send(msg)
            except (OSError, EOFError):
                raise self.dead(None) from None

    def why(self, error: BaseException | None) -> HearthError:
        """What ended a rank, after rank 0 saw ``error`` (a collective a peer left, or
        None): the worker's own report if it sent one (a user-worded error keeps its
        type), else which rank ended and how."""
        deadline = time.monotonic() + 2  # a peer's exit may lag its closed socket a little
        reported = None
        while time.monotonic() < deadline:
            # A rank killed outright (a signal: SIGKILL, the OOM killer, a crash) is the cause:
            # the others then report the collective it left ("connection reset by peer"), so
            # a report waits REPORT_WAIT_S for such a rank to be seen ended (its exit, and
            # Popen.poll while the watch thread polls, may lag the closed socket)
            killed = self._gone(killed_only=True)
            if killed is not None:
                return ModelLoadError(f"tensor parallel: {killed}{self._why_gone(killed)}")
            if reported is None:
                reported = self._reported()
                if reported is not None:
                    deadline = min(deadline, time.monotonic() + REPORT_WAIT_S)
                    continue
            else:
                time.sleep(0.05)
                continue
            gone = self._gone()
            if gone is not None:
                return ModelLoadError(f"tensor parallel: {gone}{self._why_gone(gone)}")
            time.sleep(0.05)
        if reported is not None:
            return reported
        what = f"{type(error).__name__}: {error}" if error is not None else "a worker's connection closed"
        return ModelLoadError(f"tensor parallel: rank 0 ({self.devices[0]}) failed: {what}")

    def dead(self, error: BaseException | None) -> EngineDeadError:
        """The error for a step that failed, naming the rank and why; every later step
        is refused at once."""
        self.failure = f"{self.why(error).args[0]}. The model can't run on: reload it."
        return EngineDeadError(self.failure)

    def _reported(self) -> HearthError | None:
        """A worker's own report of the error that ended it, if one came."""
        for rank, conn in self.conns.items():
            try:
                if conn.poll(0):
                    msg = conn.recv()
                    if msg[0] == "error":
                        return _worker_error(rank, self.devices[rank], msg)
            except (OSError, EOFError):
                continue
        return None

    @staticmethod
    def _why_gone(gone: str) -> str:
        """Where to look for why the rank ``gone`` (``_gone``'s words) ended: its log, unless a
        signal killed it (it leaves none then)."""
        if "killed by signal" in gone:
            return (", outside Hearth: out of memory is the usual cause (the system's log says if its OOM "
                    "killer ended it)")
        return "; its log above says why"

    def _gone(self, killed_only: bool = False) -> str | None:
        for rank, proc in self.procs.items():
            code = proc.poll()
            if code is not None and (code < 0 or not killed_only):
                how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
                return f"rank {rank} ({self.devices[rank]}) ended ({how})"
        return None

    def _recv(self, rank: int):
        try:
            return self.conns[rank].recv()
        except (OSError, EOFError):
            gone = self._gone() or f"rank {rank}'s connection closed"
            raise ModelLoadError(f"tensor parallel: {gone}{self._why_gone(gone)}.") from None

    # -- end ---------------------------------------------------------------------------
    def close(self) -> None:
        """End every worker (asked, then killed after EXIT_WAIT_S) and the listener."""
        self._closing.set()
        for conn in self.conns.values():
            try:
                conn.send(("exit",))
            except (OSError, EOFError, ValueError):
                pass
        deadline = time.monotonic() + EXIT_WAIT_S
        for proc in self.procs.values():
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for conn in self.conns.values():
            conn.close()
        self.conns.clear()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self.pg is not None:  # the peers are gone: let go of the group without waiting on them
            try:
                self.pg.abort()
            except Exception:  # noqa: BLE001 - freeing must not fail an unload
                log.debug("could not abort the process group", exc_info=True)
        self.store = self.pg = None


def _worker_error(rank: int, device: str, msg) -> HearthError:
    """A worker's ("error", kind, text) as the error rank 0 raises (a user-worded one
    keeps its type)."""
    from engine import errors

    kind, text = msg[1], msg[2]
    options = tuple(msg[3]) if len(msg) > 3 else ()
    cls = getattr(errors, kind, None)
    if isinstance(cls, type) and issubclass(cls, HearthError):
        return cls(f"{text} (on tensor-parallel rank {rank}, {device})", options=options)
    return ModelLoadError(f"tensor-parallel rank {rank} ({device}) failed: {kind}: {text}")


class TensorParallelRunner(ModelRunner):
    """Rank 0's runner: each call that runs the model is sent to the other ranks first."""

    ranks: Ranks | None = None

    def execute(self, inp):
        if not inp.rows and self.ranks is not None and self.ranks.failure is not None:
            return super().execute(inp)  # only rank 0's bookkeeping (finished requests): nothing to refuse
        return self._on_every_rank("execute", inp)

    def score(self, token_ids, block_table, chunk: int, top: int = 0):
        return self._on_every_rank("score", list(token_ids), list(block_table), chunk, top)

    def warm_attention(self, max_tokens: int, should_stop=None) -> int:
        # (the cancel check is rank 0's: a cancelled load ends the workers with it)
        return self._on_every_rank("warm_attention", max_tokens, here={"should_stop": should_stop})

    def _on_every_rank(self, name: str, *args, here: dict | None = None):
        """``name(*args)`` on every rank (``here``: keywords for rank 0's call only)."""
        mine = getattr(super(), name)
        if self.ranks is None:  # world size 1
            return mine(*args, **(here or {}))
        self.ranks.call(name, *args)
        try:
            out = mine(*args, **(here or {}))
        except LoadCancelledError:  # a cancelled warm-up: the load fails quietly (the ranks end with it)
            self.ranks.failure = "loading cancelled"
            raise
        except Exception as e:  # a peer that left fails the collective (say which and why); an
            raise self.ranks.dead(e) from e  # error here leaves the peers in one: fatal either way
        if self.ranks.aborted:  # a rank died during the step: its collectives returned half-summed
            raise self.ranks.dead(None)
        return out

    def close_ranks(self) -> None:
        if self.ranks is not None:
            self.ranks.close()


def bring_up_ranks(config, spec, weights, *, device: torch.device, dtype: torch.dtype, kv_dtype: torch.dtype,
                   attention: str, max_model_len: int, progress=None, should_stop=None) -> TensorParallelRunner:
    """A tensor-parallel load over ``config.model.devices``: check that the model divides,
    start the other ranks, bring every rank up at once; returns rank 0's runner."""
    from engine.runner.bring_up import build_on_meta, model_transforms
    from engine.runner.tensor_parallel import rank_spec

    devices = config.model.devices
    world = len(devices)
    for rank in range(world):  # heads, KV heads, MLP width: refused before anything starts
        rank_spec(spec, rank, world)
        # and what the transforms refuse (a group size a rank's slice can't take, a quantized
        # embedding): on the meta device, before any process starts
        sizing = TPGroup(rank, world, sizing=True)
        build_on_meta(spec, dtype, max_model_len, model_transforms(config, weights, sizing))
    say = progress or (lambda msg: log.info(msg))
    if world == 1 and os.environ.get("HEARTH_TP_ONE_RANK_GROUP", "") in ("", "0"):
        runner = TensorParallelRunner.create(config, spec, weights, device=device, dtype=dtype, kv_dtype=kv_dtype,
                                             attention=attention, max_model_len=max_model_len,
                                             tp=TPGroup(0, 1), progress=say, should_stop=should_stop)
        runner.load_info["tensor_parallel"] = {"world": 1, "devices": list(devices), "backend": None}
        return runner
    backend = "gloo" if devices[0] == "cpu" else "nccl"
    # (HEARTH_TP_ONE_RANK_GROUP=1 at world size 1: a group of one rank, so that the
    # collectives, their CUDA graphs and the lock-step of several ranks run on one device)
    say(f"tensor parallel: starting {world - 1} more rank(s) ({', '.join(devices[1:])}, {backend})" if world > 1
        else f"tensor parallel: one rank in a {backend} group of its own")
    ranks = Ranks(devices)
    runner = None
    try:
        ranks.store = store = torch.distributed.TCPStore("127.0.0.1", 0, world, is_master=True,
                                                         wait_for_workers=False)
        ranks.start(store.port)
        ranks.send_load(dict(config=config, spec=spec, weights=weights, dtype=dtype, kv_dtype=kv_dtype,
                             attention=attention, max_model_len=max_model_len, store_port=store.port,
                             world=world, backend=backend, device=devices))
        if device.type == "cuda":
            torch.cuda.set_device(device)  # this thread's current device: rank 0's (Triton launches follow it)
        pg = ranks.make_group(backend, device, should_stop)

        def stop() -> bool:  # a rank that died ends rank 0's bring-up at its next check
            return ranks.aborted or ranks._gone() is not None or (should_stop is not None and should_stop())

        try:
            runner = TensorParallelRunner.create(config, spec, weights, device=device, dtype=dtype,
                                                 kv_dtype=kv_dtype, attention=attention, max_model_len=max_model_len,
                                                 tp=TPGroup(0, world, pg), progress=say, should_stop=stop)
        except LoadCancelledError:
            if should_stop is not None and should_stop():
                raise
            raise ranks.why(None) from None
        except HearthError:
            raise
        except Exception as e:  # a collective a failed rank left: its own error says more
            raise ranks.why(e) from e
        if ranks.aborted:  # (an aborted collective may have returned without an error)
            raise ranks.why(None)
        ranks.wait_ready(should_stop)
        runner.ranks = ranks
        runner.load_info["tensor_parallel"] = {"world": world, "devices": list(devices), "backend": backend}
        say(f"tensor parallel: {world} ranks ready")
        return runner
    except BaseException:
        if runner is not None:
            release_runner(runner)
        ranks.close()
        raise
