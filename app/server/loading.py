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

import json
import socket
import threading

#: Seconds a client is asked to wait before trying again.
RETRY_AFTER_S = 5
#: Seconds a connection may take to send its request head before it is answered anyway.
READ_TIMEOUT_S = 2.0
#: The longest request head read (the rest, a body included, is not needed for the answer).
MAX_HEAD = 16384
#: Connections answered at once; more wait in the listening socket's queue.
MAX_OPEN = 64


def _response(status: str, body: dict) -> bytes:
    data = json.dumps(body).encode()
    head = (f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n"
            f"Retry-After: {RETRY_AFTER_S}\r\nConnection: close\r\n\r\n")
    return head.encode("ascii") + data


class LoadingResponder:
    """Answers ``sock`` (listening) with 503 "loading" until ``stop()``. ``model``: the name
    in the messages (what the user asked to load)."""

    def __init__(self, sock: socket.socket, model: str) -> None:
        self._sock = sock
        self._model = model
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
        line = head.split(b"\r\n", 1)[0].split(b"\n", 1)[0].decode("latin-1")
        parts = line.split()
        path = parts[1].split("?", 1)[0] if len(parts) >= 2 else ""
        if path == "/health":
            return _response("503 Service Unavailable", {"status": "loading", "model": None})
        message = (f"the model ({self._model}) is still loading: try again in a few seconds "
                   f"(GET /health says \"ok\" once it answers).")
        return _response("503 Service Unavailable", {"error": {
            "message": message, "type": "service_unavailable", "param": None, "code": "model_loading"}})

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except (TimeoutError, socket.timeout, BlockingIOError, InterruptedError):
                continue
            except OSError:  # the socket was closed (the load failed and run_serve is leaving)
                return
            if not self._slots.acquire(blocking=False):
                conn.close()  # more than MAX_OPEN slow clients at once: they try again
                continue
            threading.Thread(target=self._serve_one, args=(conn,), name="hearth-serve-loading-conn",
                             daemon=True).start()

    def _serve_one(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(READ_TIMEOUT_S)
            head = b""
            try:
                while b"\r\n\r\n" not in head and b"\n\n" not in head and len(head) < MAX_HEAD:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    head += chunk
            except OSError:  # slow or gone: answer what came (or nothing)
                pass
            if head:
                try:
                    conn.sendall(self.answer(head))
                    # A request body we did not read would make close() reset the connection,
                    # and the client might see that instead of the answer: drain it briefly.
                    conn.shutdown(socket.SHUT_WR)
                    conn.settimeout(0.5)
                    drained = 0
                    while drained < (1 << 20):
                        chunk = conn.recv(65536)
                        if not chunk:
                            break
                        drained += len(chunk)
                except OSError:
                    pass
        finally:
            try:
                conn.close()
            finally:
                self._slots.release()
