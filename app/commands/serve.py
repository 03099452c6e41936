"""``hearth serve``: the OpenAI-compatible server (``app.server``) on one loaded model, with
uvicorn in this process and the engine in a process of its own (``EngineProcess``). Imports
no Qt.

Safe by default: it listens on 127.0.0.1 only; any other address lets other machines in,
so it needs an API key, and says so when it starts. Ctrl+C aborts the answers being
written (their clients hear why), stops the server and shuts the engine down."""

from __future__ import annotations

import signal
import socket
import sys
import threading
from pathlib import Path

from app.commands.load_options import add_load_args, config_from_args, options_from_args
from app.server.limits import MAX_QUEUE
from app.server.listen import base_url, bind, exposure_problem, is_loopback, parse_origins
from app.server.loading import LoadingResponder
from app.services.engine_host import EngineHost
from app.services.engine_process import EngineProcess, load_and_wait, say_on_stderr
from engine.api import InvalidRequestError

__all__ = ["add_serve_parser", "check_serve_args", "is_loopback", "run_serve"]


def add_serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="an OpenAI-compatible API server (chat and completions) on a model")
    add_load_args(p)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1",
                   help="the address to listen on (default 127.0.0.1: this machine only); any other "
                        "(0.0.0.0: every network) needs an API key")
    g.add_argument("--port", type=int, default=8000, help="the port (default 8000)")
    key = g.add_mutually_exclusive_group()
    key.add_argument("--api-key", default=None, metavar="KEY",
                     help="clients must send 'Authorization: Bearer KEY' (every route but /health)")
    key.add_argument("--api-key-file", default=None, metavar="FILE",
                     help="read the API key from FILE (keeps it out of the process list and shell history)")
    g.add_argument("--max-queue", type=int, default=MAX_QUEUE, metavar="N",
                   help=f"when N answers already wait for the model, new requests are refused with 429 "
                        f"and Retry-After (default {MAX_QUEUE}: a burst of a few hundred streams waits; "
                        "past that, clients do better to retry than to hold a connection for minutes)")
    g.add_argument("--allowed-origins", nargs="+", default=[], metavar="ORIGIN",
                   help="web pages (origins, e.g. http://localhost:3000) whose scripts may call the server "
                        "(CORS); none by default")


def api_key_of(args) -> str | None:
    """The key of --api-key or --api-key-file (its first line), or None; refuses an empty one."""
    if args.api_key_file:
        try:
            text = Path(args.api_key_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise InvalidRequestError(f"cannot read --api-key-file: {e}") from None
        key = text.strip().splitlines()[0].strip() if text.strip() else ""
        if not key:
            raise InvalidRequestError(f"--api-key-file {args.api_key_file} is empty: put the key on its first line.")
        return key
    if args.api_key is not None and not args.api_key.strip():
        raise InvalidRequestError("--api-key is empty: give a key, or leave the flag out.")
    return args.api_key.strip() if args.api_key else None


def check_serve_args(args) -> str | None:
    """Everything refused before a model loads; returns the API key."""
    key = api_key_of(args)
    try:  # the app's Server page reads its origins the same way
        args.allowed_origins = list(parse_origins(" ".join(args.allowed_origins)))
    except InvalidRequestError as e:
        raise InvalidRequestError(f"--allowed-origins: {e}") from None
    problem = exposure_problem(args.host, key, args.allowed_origins)  # the app's Server page's rule too
    if problem:
        raise InvalidRequestError(f"{problem} Give one with --api-key KEY or --api-key-file FILE (or keep "
                                  "the default --host 127.0.0.1 and name the pages' origins).")
    if args.max_queue < 1:
        raise InvalidRequestError(f"--max-queue must be at least 1, got {args.max_queue}.")
    if not 0 <= args.port <= 65535:
        raise InvalidRequestError(f"--port must be from 0 to 65535, got {args.port}.")
    config_from_args(args)  # a bad load flag: one line, before anything loads
    return key


def load_model(host: EngineHost, options: dict) -> None:
    """Load the model on the host, printing its progress; raises ModelLoadError if it fails."""
    load_and_wait(host, options, say_on_stderr)


def run_serve(args) -> int:
    key = check_serve_args(args)
    sock = bind(args.host, args.port)
    name = args.model or "the default model"
    print(f"[hearth] loading {name}; until it is ready {base_url(args.host, sock.getsockname()[1])} answers "
          "503 (loading).", file=sys.stderr, flush=True)
    # Until uvicorn takes the socket, the port answers "loading" at once (app/server/loading.py)
    loading = LoadingResponder(sock, name, args.allowed_origins).start()
    try:
        # The engine runs in a process of its own (app/services/engine_process.py says why)
        host = EngineProcess.start(options_from_args(args))
    except BaseException:
        loading.stop()
        sock.close()
        raise
    try:
        return _serve(host, sock, args, key, loading)
    finally:
        loading.stop()
        sock.close()
        host.shutdown()
        print("[hearth] server stopped; the model is unloaded.", file=sys.stderr, flush=True)


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)


def _serve(host: EngineProcess, sock: socket.socket, args, key: str | None, loading: LoadingResponder) -> int:
    from app.server import create_app
    from app.server.background import uvicorn_server

    app = create_app(host, api_key=key, allowed_origins=args.allowed_origins, max_queue=args.max_queue)
    port = sock.getsockname()[1]
    shown = f"[{args.host}]" if ":" in args.host else args.host
    info = host.model_info
    print(f"[hearth] serving {info.name} ({info.device}, context {info.max_model_len}) at "
          f"http://{shown}:{port}/v1", file=sys.stderr, flush=True)
    if not is_loopback(args.host):
        print(f"[hearth] listening on {args.host}: other machines on the network can reach this server; "
              "every request but /health needs the API key.", file=sys.stderr, flush=True)
    elif key:
        print("[hearth] every request but /health needs the API key.", file=sys.stderr, flush=True)
    print("[hearth] press Ctrl+C to stop.", file=sys.stderr, flush=True)
    # Ctrl+C: the answers being written end now (their clients hear why), so the graceful
    # shutdown has no stream to wait for.
    server = uvicorn_server(app, verbose=args.verbose)
    gone: list[str] = []

    def engine_gone(why: str) -> None:  # the answers in flight have ended with an error: stop
        gone.append(why)
        print(f"[hearth] {why}: stopping the server (restart it to serve again).", file=sys.stderr, flush=True)
        server.should_exit = True

    host.on_gone = engine_gone
    if host.unavailable is not None:  # it ended before anyone listened
        engine_gone(host.unavailable)
        return 1
    if threading.current_thread() is threading.main_thread():
        # uvicorn stops gracefully on SIGTERM, then raises it again: a Python handler (not the
        # default, which kills at once) lets ``run_serve`` shut the engine's process down.
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    loading.stop()  # uvicorn answers from here on
    server.run(sockets=[sock])
    if gone:
        return 1
    # uvicorn raises the signal again once stopped (KeyboardInterrupt: the CLI's 130), but a
    # process started with SIGINT ignored (a background job, some launchers) gets no
    # exception: the exit status says the signal all the same (128 + its number).
    return 0 if server.exit_signal is None else 128 + int(server.exit_signal)
