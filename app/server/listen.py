"""Where the server listens, shared by ``hearth serve`` and the desktop app's Server panel:
which addresses are this machine only, the rule that any other needs an API key, and the
listening socket, made before uvicorn runs so that a port in use is one clear sentence
(and, in the app, a message in the panel rather than a thread that dies).

Imports no web framework: the CLI's parser and the GUI read it without loading FastAPI."""

from __future__ import annotations

import errno
import ipaddress
import os
import socket

from engine.api import InvalidRequestError

LOOPBACK_NAMES = {"localhost"}
#: Every interface: "allow other machines on my network" (IPv4).
ALL_INTERFACES = "0.0.0.0"


class PortInUse(InvalidRequestError):
    """The address cannot be listened on (most often: another program holds the port)."""


def is_loopback(host: str) -> bool:
    """Whether ``host`` is this machine only (127.x, ::1, localhost); a name may reach the
    network, so it is not."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def exposure_problem(host: str, api_key: str | None, allowed_origins=()) -> str | None:
    """Why the server must not listen on ``host`` with this key and these CORS origins
    (None: it may): any address but loopback lets other machines use the model, and the
    origin ``*`` lets every web page the user opens use it (and read its answers), so
    either needs a key."""
    if api_key:
        return None
    if not is_loopback(host):
        return (f"listening on {host} lets other machines on the network use the model, so it needs an "
                "API key (without one, anyone who can reach this machine could run it).")
    if "*" in allowed_origins:
        return ("the CORS origin * lets every web page you open use the model and read its answers, so it "
                "needs an API key; or name the pages' origins instead (e.g. http://localhost:3000).")
    return None


def bind(host: str, port: int, advice: str = "choose another with --port") -> socket.socket:
    """The listening socket on ``host:port`` (0: a free port); raises ``PortInUse`` with
    ``advice`` (what the user can change) when it can't be had."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as e:
        raise PortInUse(f"cannot listen on {host}:{port} ({e.strerror or e}).") from None
    try:
        # Elsewhere SO_REUSEADDR only lets a restart bind while the old connections wait out
        # TIME_WAIT. On Windows it would let a second server bind the same port beside this one
        # (no "in use" error, connections shared), and SO_EXCLUSIVEADDRUSE would refuse a quick
        # restart: there, as CPython's socket.create_server does, neither.
        if os.name != "nt":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise PortInUse(f"cannot listen on {host}:{port}: port {port} is already in use (another program, "
                            f"or another server, listens on it); {advice}.") from None
        raise PortInUse(f"cannot listen on {host}:{port} ({e.strerror or e}): another program may use "
                        f"that port; {advice}.") from None
    sock.set_inheritable(True)
    return sock


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (for a server started a moment later: another
    program may take it meanwhile, so that server's bind still checks)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def base_url(host: str, port: int) -> str:
    """The URL clients on this machine use (``http://127.0.0.1:8000/v1``); an all-interfaces
    bind is reached locally through the loopback."""
    if host in (ALL_INTERFACES, "::", ""):
        host = "127.0.0.1"
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/v1"


def lan_address() -> str | None:
    """This machine's address on its local network (the one other machines use), or None.
    A UDP socket "connected" to a private address picks the outgoing interface without
    sending anything, so this works offline too."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))
            address = s.getsockname()[0]
    except OSError:
        return None
    return None if address.startswith("127.") or address == "0.0.0.0" else address


def new_api_key() -> str:
    """A fresh random API key (192 bits; URL-safe, so it pastes anywhere)."""
    import secrets

    return "sk-hearth-" + secrets.token_urlsafe(24)


def parse_origins(text: str) -> tuple[str, ...]:
    """CORS origins typed as a list separated by commas or spaces (``http://localhost:3000``,
    ``https://app.example.com``; ``*``: any page); raises ``InvalidRequestError`` naming
    one that is not an origin (a path or a missing scheme would never match a browser's)."""
    origins = []
    for item in text.replace(",", " ").split():
        item = item.rstrip("/")
        if item != "*":
            scheme, sep, rest = item.partition("://")
            if not sep or scheme not in ("http", "https") or not rest or "/" in rest:
                raise InvalidRequestError(
                    f"{item!r} is not a web origin: write it as scheme://host[:port], e.g. "
                    "http://localhost:3000 (no path).")
        if item not in origins:
            origins.append(item)
    return tuple(origins)
