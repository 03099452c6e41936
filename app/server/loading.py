"""What ``hearth serve``'s port answers while the model is still loading (a minute for an 8B
model, longer from the Hub): every request gets a prompt ``503 Service Unavailable`` with
``Retry-After``, ``/health`` says ``{"status": "loading"}``, and everything else gets the
OpenAI error shape (``code: "model_loading"``), so a health check or a client's retry loop
learns at once that the server is coming up, instead of hanging on a port that accepted the
connection but has nobody reading it until the load ends (what it did before).

Standard library only, on the listening socket that ``app.server.listen.bind`` made: a
thread accepts, answers each connection on a short-lived thread of its own (so a client
that sends half a request holds only that one) and closes it; ``stop`` hands the socket on,
untouched and blocking again, to uvicorn, which answers from then on. (Ollama answers at
once too; vLLM refuses connections until it is ready. A refused connection reads as "no
server here", so we answer.)"""

from __future__ import annotations

import errno
import json
import socket
import threading
import time

#: Seconds a client is asked to wait before trying again.
RETRY_AFTER_S = 5
#: Seconds a connection has, in all, to send its request head (answered anyway after that).
READ_TIMEOUT_S = 2.0
#: Seconds, in all, spent reading (and dropping) a request body after the answer.
DRAIN_S = 1.0
#: The longest request head read (the rest, a body included, is not needed for the answer).
MAX_HEAD = 16384
#: Connections answered at once on threads of their own; beyond, answered by the accepting
#: thread without waiting for the request.
MAX_OPEN = 64


def _response(status: str, body: dict | None, extra: str = "", head_only: bool = False) -> bytes:
    data = b"" if body is None else json.dumps(body).encode()
    head = (f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n"
            f"Retry-After: {RETRY_AFTER_S}\r\n{extra}Connection: close\r\n\r\n")
    return head.encode("ascii") + (b"" if head_only else data)


def _request(head: bytes) -> tuple[str, str, dict[str, str]]:
    """(method, path, headers with lower-case names) of a request head, as far as it came."""
    lines = head.decode("latin-1").replace("\r\n", "\n").split("\n")
    parts = lines[0].split()
    method = parts[0].upper() if parts else ""
    target = parts[1] if len(parts) >= 2 else ""
    if "://" in target:  # absolute form (a proxy's): keep the path
        target = "/" + target.split("://", 1)[1].partition("/")[2]
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return method, target.split("?", 1)[0], headers


class LoadingResponder:
    """Answers ``sock`` (listening) with 503 "loading" until ``stop()``. ``model``: the name
    in the messages (what the user asked to load); ``allowed_origins``: the server's CORS
    origins, so that a web page the server will serve hears "loading" too."""

    def __init__(self, sock: socket.socket, model: str, allowed_origins=()) -> None:
        self._sock = sock
        self._model = model
        self._origins = tuple(allowed_origins)  # CORS, as the server will answer them
        self._stop = threading.Event()
        self._slots = threading.BoundedSemaphore(MAX_OPEN)
        self._thread = threading.Thread(target=self._accept, name="hearth-serve-loading", daemon=True)

    def start(self) -> "LoadingResponder":
        self._sock.settimeout(0.1)  # accept wakes up to see stop()
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop answering (the connections being answered finish on their own threads) and
        leave the socket blocking, as ``bind`` made it."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        try:
            self._sock.settimeout(None)
        except OSError:  # already closed
            pass

    def __enter__(self) -> "LoadingResponder":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def answer(self, head: bytes) -> bytes:
        """The response to a request whose head (start line first) is ``head``."""
        method, path, headers = _request(head)
        cors = ""
        origin = headers.get("origin")
        if origin and ("*" in self._origins or origin in self._origins):
            cors = f"Access-Control-Allow-Origin: {origin}\r\nVary: Origin\r\n"
            if method == "OPTIONS":  # a preflight: let the real request come and hear "loading"
                asked = headers.get("access-control-request-headers", "")
                return _response("204 No Content", None, cors + "Access-Control-Allow-Methods: GET, POST, "
                                 f"OPTIONS\r\nAccess-Control-Allow-Headers: {asked}\r\nAccess-Control-Max-Age: 5\r\n")
        if path == "/health":
            body = {"status": "loading", "model": None}
        else:
            message = (f"the model ({self._model}) is still loading: try again in a few seconds "
                       f"(GET /health says \"ok\" once it answers).")
            body = {"error": {"message": message, "type": "service_unavailable", "param": None,
                              "code": "model_loading"}}
        return _response("503 Service Unavailable", body, cors, head_only=method == "HEAD")

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except (TimeoutError, socket.timeout, BlockingIOError, InterruptedError):
                continue
            except (ConnectionAbortedError, ConnectionResetError):  # a client gone before we took it
                continue
            except OSError as e:
                if self._stop.is_set() or self._sock.fileno() == -1:
                    return  # closed: the load failed and run_serve is leaving
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    time.sleep(0.1)  # out of descriptors for now: the queue waits, as asyncio's server does
                continue
            if not self._slots.acquire(blocking=False):
                self._answer_at_once(conn)  # MAX_OPEN slow clients at once: no waiting for this one
                continue
            try:
                threading.Thread(target=self._serve_one, args=(conn,), name="hearth-serve-loading-conn",
                                 daemon=True).start()
            except RuntimeError:  # no thread to be had
                self._slots.release()
                self._answer_at_once(conn)

    def _answer_at_once(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(0.05)
            conn.sendall(self.answer(b"GET / HTTP/1.1\r\n\r\n"))
        except OSError:
            pass
        finally:
            conn.close()

    def _serve_one(self, conn: socket.socket) -> None:
        try:
            head = b""
            deadline = time.monotonic() + READ_TIMEOUT_S
            try:
                while b"\r\n\r\n" not in head and b"\n\n" not in head and len(head) < MAX_HEAD:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break  # slow: answered with what came
                    conn.settimeout(left)
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    head += chunk
            except OSError:  # slow or gone: answer what came (or nothing)
                pass
            if head:
                try:
                    conn.settimeout(DRAIN_S)
                    conn.sendall(self.answer(head))
                    # A request body we did not read would make close() reset the connection,
                    # and the client might see that instead of the answer: drain it briefly.
                    conn.shutdown(socket.SHUT_WR)
                    deadline = time.monotonic() + DRAIN_S
                    while (left := deadline - time.monotonic()) > 0:
                        conn.settimeout(left)
                        if not conn.recv(65536):
                            break
                except OSError:
                    pass
        finally:
            try:
                conn.close()
            finally:
                self._slots.release()
