"""A minimal Hugging Face Hub look-alike for tests.

Serves model repos held in memory over HTTP on 127.0.0.1 so the real ``huggingface_hub``
client (``snapshot_download``, ``hf_hub_download``, ``model_info``) can be exercised with no
internet. Only what that client uses is implemented:

* ``GET /api/models/{repo}`` and ``/api/models/{repo}/revision/{rev}``: repo info (sha, siblings)
* ``GET /api/models/{repo}/tree/{rev}[/{path}]``: file listing (recursive)
* ``HEAD``/``GET /{repo}/resolve/{rev}/{file}``: file metadata headers and content,
  with ``Range`` requests for resumed downloads.

Errors mimic the Hub: 404 + ``X-Error-Code: RepoNotFound`` / ``RevisionNotFound`` /
``EntryNotFound``; gated repos answer file requests with 401 (no token) or 403 (token
without access) + ``X-Error-Code: GatedRepo``.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

# Extensions the real Hub stores in LFS; their ETag is the content's sha256.
_LFS_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".ckpt", ".h5", ".onnx", ".msgpack")


def _git_blob_sha(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class HubRepo:
    """One model repo: its files at a single commit, reachable as ``main`` or by the sha."""

    repo_id: str
    files: dict[str, bytes]
    gated: bool = False
    # Tokens allowed to download a gated repo.
    allowed_tokens: set[str] = field(default_factory=set)

    @property
    def sha(self) -> str:
        """A stable 40-hex commit id derived from the files."""
        h = hashlib.sha1(self.repo_id.encode())
        for name in sorted(self.files):
            h.update(name.encode() + b"\0" + hashlib.sha256(self.files[name]).digest())
        return h.hexdigest()

    def is_lfs(self, name: str) -> bool:
        return name.endswith(_LFS_SUFFIXES)

    def etag(self, name: str) -> str:
        data = self.files[name]
        return hashlib.sha256(data).hexdigest() if self.is_lfs(name) else _git_blob_sha(data)

    def tree_entry(self, name: str) -> dict:
        data = self.files[name]
        entry = {"type": "file", "oid": _git_blob_sha(data), "size": len(data), "path": name}
        if self.is_lfs(name):
            entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        return entry


class HubServer:
    """In-memory Hub on a free localhost port; use as a context manager or start()/stop().

    ``repos`` maps repo id to ``{filename: bytes}``; ``gated`` names repos that need a token
    from ``tokens`` (``{repo_id: {token, ...}}``). ``requests`` logs ``(method, path)``
    of every request, for tests that count downloads.
    """

    def __init__(
        self,
        repos: dict[str, dict[str, bytes]] | None = None,
        *,
        gated: dict[str, set[str]] | None = None,
    ) -> None:
        self.repos: dict[str, HubRepo] = {}
        self.requests: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        for repo_id, files in (repos or {}).items():
            self.add_repo(repo_id, files)
        for repo_id, tokens in (gated or {}).items():
            self.repos[repo_id].gated = True
            self.repos[repo_id].allowed_tokens = set(tokens)
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def add_repo(self, repo_id: str, files: dict[str, bytes], *, gated: bool = False,
                 allowed_tokens: set[str] | None = None) -> HubRepo:
        """Add (or replace) a repo; returns it so tests can read its ``sha``."""
        repo = HubRepo(repo_id, dict(files), gated=gated, allowed_tokens=set(allowed_tokens or ()))
        with self._lock:
            self.repos[repo_id] = repo
        return repo

    @property
    def url(self) -> str:
        """Base URL to use as ``HF_ENDPOINT``."""
        if self._httpd is None:
            raise RuntimeError("HubServer is not running; call start() first")
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HubServer:
        """Bind to 127.0.0.1 on a free port and serve in a daemon thread."""
        handler = type("_BoundHandler", (_Handler,), {"hub": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="hub-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the port, so clients get connection errors afterwards."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join(timeout=5)
            self._httpd = None
            self._thread = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def downloads(self, filename: str | None = None) -> int:
        """Count GET requests on ``/resolve/`` URLs (optionally for one file name)."""
        return sum(
            1 for method, path in self.requests
            if method == "GET" and "/resolve/" in path and (filename is None or path.endswith("/" + filename))
        )


_API_RE = re.compile(r"^/api/models/(?P<repo>[^/]+(?:/[^/]+)?)(?:/revision/(?P<rev>[^/]+))?$")
_TREE_RE = re.compile(r"^/api/models/(?P<repo>[^/]+(?:/[^/]+)?)/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?$")
_RESOLVE_RE = re.compile(r"^/(?P<repo>[^/]+(?:/[^/]+)?)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")
_RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")


class _Error(Exception):
    def __init__(self, status: int, code: str | None, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    # HTTP/1.0: one request per connection, so a stopped server never answers from a
    # kept-alive connection's handler thread.
    protocol_version = "HTTP/1.0"

    def log_message(self, format: str, *args) -> None:  # keep test output quiet
        pass

    def do_GET(self) -> None:
        self._dispatch(head=False)

    def do_HEAD(self) -> None:
        self._dispatch(head=True)

    # ------------------------------------------------------------------ routing

    def _dispatch(self, head: bool) -> None:
        parts = urlsplit(self.path)
        path = unquote(parts.path)
        with self.hub._lock:
            self.hub.requests.append((self.command, path))
        try:
            if m := _TREE_RE.match(path):
                self._tree(m["repo"], m["rev"], m["path"] or "", parse_qs(parts.query), head)
            elif m := _API_RE.match(path):
                self._info(m["repo"], m["rev"], head)
            elif m := _RESOLVE_RE.match(path):
                self._resolve(m["repo"], m["rev"], m["file"], head)
            else:
                raise _Error(404, None, f"no route for {path}")
        except _Error as err:
            body = json.dumps({"error": err.message}).encode()
            headers = {"Content-Type": "application/json", **err.headers}
            if err.code:
                headers["X-Error-Code"] = err.code
            headers["X-Error-Message"] = err.message
            self._send(err.status, headers, body, head)

    def _repo(self, repo_id: str) -> HubRepo:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            raise _Error(404, "RepoNotFound", "Repository not found")
        return repo

    @staticmethod
    def _check_revision(repo: HubRepo, rev: str | None) -> None:
        if rev not in (None, "main", repo.sha):
            raise _Error(404, "RevisionNotFound", f"Invalid rev id: {rev}")

    def _check_access(self, repo: HubRepo) -> None:
        if not repo.gated:
            return
        auth = self.headers.get("Authorization", "")
        token = auth.removeprefix("Bearer ").strip() if auth.startswith("Bearer ") else None
        if token is None:
            raise _Error(401, "GatedRepo", f"Access to model {repo.repo_id} is restricted. You must have "
                         "access to it and be authenticated to access it. Please log in.")
        if token not in repo.allowed_tokens:
            raise _Error(403, "GatedRepo", f"Access to model {repo.repo_id} is restricted and you are not "
                         "in the authorized list. Visit the repo page to ask for access.")

    # ------------------------------------------------------------------ endpoints

    def _info(self, repo_id: str, rev: str | None, head: bool) -> None:
        repo = self._repo(repo_id)
        self._check_revision(repo, rev)
        info = {
            "_id": repo.sha[:24],
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "author": repo.repo_id.split("/")[0] if "/" in repo.repo_id else None,
            "sha": repo.sha,
            "lastModified": "2024-01-01T00:00:00.000Z",
            "private": False,
            "gated": "manual" if repo.gated else False,
            "disabled": False,
            "tags": [],
            "siblings": [{"rfilename": name} for name in sorted(repo.files)],
        }
        self._send_json(info, head)

    def _tree(self, repo_id: str, rev: str, sub: str, query: dict, head: bool) -> None:
        repo = self._repo(repo_id)
        self._check_revision(repo, rev)
        recursive = query.get("recursive", ["false"])[0].lower() in {"true", "1"}
        prefix = sub.strip("/") + "/" if sub.strip("/") else ""
        entries: list[dict] = []
        folders: set[str] = set()
        for name in sorted(repo.files):
            if not name.startswith(prefix):
                continue
            rest = name[len(prefix):]
            if "/" in rest:
                # Every folder level is listed, like the Hub does.
                parts = rest.split("/")[:-1]
                depth = len(parts) if recursive else 1
                for i in range(1, depth + 1):
                    folders.add(prefix + "/".join(parts[:i]))
                if not recursive:
                    continue
            entries.append(repo.tree_entry(name))
        entries += [{"type": "directory", "oid": _git_blob_sha(f.encode()), "size": 0, "path": f}
                    for f in sorted(folders)]
        self._send_json(entries, head)

    def _resolve(self, repo_id: str, rev: str, filename: str, head: bool) -> None:
        repo = self._repo(repo_id)
        self._check_revision(repo, rev)
        self._check_access(repo)
        commit = {"X-Repo-Commit": repo.sha}
        if filename not in repo.files:
            raise _Error(404, "EntryNotFound", f"{filename} does not exist on \"{rev}\"", commit)
        data = repo.files[filename]
        etag = repo.etag(filename)
        headers = {
            **commit,
            "ETag": f'"{etag}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
            "Content-Disposition": f'inline; filename="{filename.rsplit("/", 1)[-1]}";',
        }
        if repo.is_lfs(filename):
            # The Hub reports LFS files' sha256 and size in these for every response.
            headers["X-Linked-Etag"] = f'"{etag}"'
            headers["X-Linked-Size"] = str(len(data))
        status, body = 200, data
        range_header = self.headers.get("Range")
        if range_header and not head:
            m = _RANGE_RE.match(range_header.strip())
            if m is None or (m[1] == "" and m[2] == ""):
                raise _Error(416, None, f"bad Range header {range_header!r}", {"Content-Range": f"bytes */{len(data)}"})
            if m[1] == "":  # suffix range: the last N bytes
                start, end = max(len(data) - int(m[2]), 0), len(data) - 1
            else:
                start = int(m[1])
                end = min(int(m[2]), len(data) - 1) if m[2] else len(data) - 1
            if start >= len(data) or start > end:
                raise _Error(416, None, "Requested range not satisfiable", {"Content-Range": f"bytes */{len(data)}"})
            status, body = 206, data[start:end + 1]
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        self._send(status, headers, body, head)

    # ------------------------------------------------------------------ output

    def _send_json(self, obj, head: bool) -> None:
        self._send(200, {"Content-Type": "application/json"}, json.dumps(obj).encode(), head)

    def _send(self, status: int, headers: dict[str, str], body: bytes, head: bool) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        # HEAD reports the length a GET would return, as the client reads sizes from it.
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)
