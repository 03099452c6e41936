"""A minimal Hugging Face Hub look-alike for tests.

Serves model repos held in memory over HTTP on 127.0.0.1 so the real ``huggingface_hub``
client (``snapshot_download``, ``hf_hub_download``, ``model_info``) can be exercised with no
internet. Only what that client uses is implemented:

* ``GET /api/models/{repo}`` and ``/api/models/{repo}/revision/{rev}``: repo info (sha, siblings)
* ``GET /api/models/{repo}/tree/{rev}[/{path}]``: file listing (recursive)
* ``HEAD``/``GET /{repo}/resolve/{rev}/{file}``: file metadata headers and content,
  with ``Range`` requests for resumed downloads.
* ``GET /api/models?search=&author=&filter=&pipeline_tag=&num_parameters=&gated=&sort=
  &direction=&limit=&expand=``: the model search used by ``HfApi.list_models``.

Repo info carries what the Hub derives from a repo: ``cardData`` (the README's YAML
front matter, e.g. the license), ``safetensors`` parameter counts read from the
safetensors headers, and, with ``?blobs=true`` (``files_metadata=True``), every sibling's
size and LFS data. Listing fields (downloads, likes, tags, ...) come from ``HubRepo.meta``.

For download tests a file can be served slowly (``throttle``), cut off part-way once
(``interrupt``) or on every request (``short_bodies``: a dropped connection, or a clean but
short response), Range headers can be ignored (``ignore_ranges``), and ``log`` records
each request's query, ``Range`` header and bytes sent.

Errors mimic the Hub: 404 + ``X-Error-Code: RepoNotFound`` / ``RevisionNotFound`` /
``EntryNotFound``; gated repos answer file requests (except the README) with 401 (no
token) or 403 (token without access) + ``X-Error-Code: GatedRepo``. With ``valid_tokens``
set, a request bearing any other token gets the Hub's 401 "Invalid credentials".
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
import threading
import time
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
    # Listing data the Hub keeps beside the files: downloads, likes, lastModified, createdAt,
    # tags, pipeline_tag, library_name; cardData / safetensors here override the derived ones.
    meta: dict = field(default_factory=dict)

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

    def card_data(self) -> dict | None:
        """The README's YAML front matter, as the Hub serves it in ``cardData``."""
        if "cardData" in self.meta:
            return self.meta["cardData"]
        text = self.files.get("README.md", b"").decode("utf-8", "replace")
        m = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, re.S)
        if m is None:
            return None
        import yaml

        data = yaml.safe_load(m[1])
        return data if isinstance(data, dict) else None

    def safetensors_info(self) -> dict | None:
        """``{"parameters": {dtype: count}, "total": n}`` summed over the safetensors headers."""
        if "safetensors" in self.meta:
            return self.meta["safetensors"]
        counts: dict[str, int] = {}
        for name, data in self.files.items():
            if not name.endswith(".safetensors") or len(data) < 8:
                continue
            (size,) = struct.unpack("<Q", data[:8])
            header = json.loads(data[8:8 + size])
            for key, tensor in header.items():
                if key == "__metadata__":
                    continue
                n = 1
                for dim in tensor["shape"]:
                    n *= dim
                counts[tensor["dtype"]] = counts.get(tensor["dtype"], 0) + n
        return {"parameters": counts, "total": sum(counts.values())} if counts else None

    def sibling(self, name: str, blobs: bool) -> dict:
        entry: dict = {"rfilename": name}
        if blobs:
            data = self.files[name]
            entry.update(size=len(data), blobId=_git_blob_sha(data))
            if self.is_lfs(name):
                entry["lfs"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "pointerSize": 134}
        return entry

    def info(self, blobs: bool = False) -> dict:
        """Everything ``/api/models/{repo}`` can return about this repo."""
        info = {
            "_id": self.sha[:24],
            "id": self.repo_id,
            "modelId": self.repo_id,
            "author": self.repo_id.split("/")[0] if "/" in self.repo_id else None,
            "sha": self.sha,
            "lastModified": "2024-01-01T00:00:00.000Z",
            "createdAt": "2023-01-01T00:00:00.000Z",
            "private": False,
            "gated": "manual" if self.gated else False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": [self.sibling(name, blobs) for name in sorted(self.files)],
        }
        info.update({k: v for k, v in self.meta.items() if k not in ("cardData", "safetensors")})
        if (card := self.card_data()) is not None:
            info["cardData"] = card
        if (st := self.safetensors_info()) is not None:
            info["safetensors"] = st
        return info

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
        # One dict per request: method, path, query (parsed), range (the Range header or None),
        # sent (body bytes).
        self.log: list[dict] = []
        # When set, a Bearer token outside this set (and outside every gated repo's allowed
        # tokens) is refused with 401, like the Hub does for a revoked or mistyped token.
        self.valid_tokens: set[str] | None = None
        # Answer Range requests with the whole file (200), as some proxies and CDNs do.
        self.ignore_ranges = False
        self._throttle: dict[str, tuple[int, float]] = {}
        self._interrupt: dict[str, int] = {}
        self._short: dict[str, tuple[int, bool]] = {}
        self._lock = threading.Lock()
        for repo_id, files in (repos or {}).items():
            self.add_repo(repo_id, files)
        for repo_id, tokens in (gated or {}).items():
            self.repos[repo_id].gated = True
            self.repos[repo_id].allowed_tokens = set(tokens)
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def add_repo(self, repo_id: str, files: dict[str, bytes], *, gated: bool = False,
                 allowed_tokens: set[str] | None = None, **meta) -> HubRepo:
        """Add (or replace) a repo; returns it so tests can read its ``sha``.

        Keyword ``meta`` fields (``downloads=``, ``likes=``, ``tags=``, ``pipeline_tag=``,
        ``lastModified=``, ``cardData=``, ``safetensors=``, ...) appear in its repo info.
        """
        repo = HubRepo(repo_id, dict(files), gated=gated, allowed_tokens=set(allowed_tokens or ()),
                       meta=dict(meta))
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
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="hub-server", daemon=True)
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

    def throttle(self, filename: str, delay_s: float, chunk_size: int = 16384) -> None:
        """Serve ``filename`` (any repo) in ``chunk_size`` pieces with ``delay_s`` between them."""
        self._throttle[filename] = (chunk_size, delay_s)

    def interrupt(self, filename: str, after_bytes: int) -> None:
        """Cut the next GET of ``filename`` off after ``after_bytes`` body bytes (once)."""
        self._interrupt[filename] = after_bytes

    def short_bodies(self, filename: str, after_bytes: int, *, clean: bool = False) -> None:
        """Send at most ``after_bytes`` of the body of every GET of ``filename``: the
        connection drops there, or with ``clean`` the response says it is that long and
        ends normally (a misbehaving proxy or CDN)."""
        self._short[filename] = (after_bytes, clean)

    def ranges(self, filename: str) -> list[str | None]:
        """The Range header (or None) of each GET of ``filename``, in order."""
        return [e["range"] for e in self.log
                if e["method"] == "GET" and "/resolve/" in e["path"] and e["path"].endswith("/" + filename)]

    def bytes_sent(self, filename: str) -> int:
        """Body bytes sent for ``filename`` over all GETs (what a resume must keep small)."""
        return sum(e["sent"] for e in self.log
                   if e["method"] == "GET" and "/resolve/" in e["path"] and e["path"].endswith("/" + filename))

    def downloads(self, filename: str | None = None) -> int:
        """Count GET requests on ``/resolve/`` URLs (optionally for one file name)."""
        return sum(
            1 for method, path in self.requests
            if method == "GET" and "/resolve/" in path and (filename is None or path.endswith("/" + filename))
        )


_LIST_RE = re.compile(r"^/api/models/?$")
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
        self._entry = {"method": self.command, "path": path, "query": parse_qs(parts.query),
                       "range": self.headers.get("Range"), "sent": 0}
        with self.hub._lock:
            self.hub.requests.append((self.command, path))
            self.hub.log.append(self._entry)
        query = parse_qs(parts.query)
        try:
            self._check_token()
            if _LIST_RE.match(path):
                self._list(query, head)
            elif m := _TREE_RE.match(path):
                self._tree(m["repo"], m["rev"], m["path"] or "", query, head)
            elif m := _API_RE.match(path):
                self._info(m["repo"], m["rev"], query, head)
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

    def _token(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        return auth.removeprefix("Bearer ").strip() if auth.startswith("Bearer ") else None

    def _check_token(self) -> None:
        token, valid = self._token(), self.hub.valid_tokens
        if token is None or valid is None:
            return
        allowed = set(valid).union(*(r.allowed_tokens for r in self.hub.repos.values()))
        if token not in allowed:
            raise _Error(401, None, "Invalid credentials in Authorization header")

    def _check_access(self, repo: HubRepo, filename: str) -> None:
        # The model card stays readable on gated repos, as on the Hub.
        if not repo.gated or filename in ("README.md", ".gitattributes"):
            return
        token = self._token()
        if token is None:
            raise _Error(401, "GatedRepo", f"Access to model {repo.repo_id} is restricted. You must have "
                         "access to it and be authenticated to access it. Please log in.")
        if token not in repo.allowed_tokens:
            raise _Error(403, "GatedRepo", f"Access to model {repo.repo_id} is restricted and you are not "
                         "in the authorized list. Visit the repo page to ask for access.")

    # ------------------------------------------------------------------ endpoints

    def _info(self, repo_id: str, rev: str | None, query: dict, head: bool) -> None:
        repo = self._repo(repo_id)
        self._check_revision(repo, rev)
        info = repo.info(blobs=_flag(query, "blobs"))
        self._send_json(_expanded(info, query), head)

    def _list(self, query: dict, head: bool) -> None:
        """``GET /api/models``: filter, sort (descending unless direction=1), limit."""
        repos = list(self.hub.repos.values())
        infos = [r.info() for r in repos]
        search = _arg(query, "search", "").lower()
        author = _arg(query, "author")
        pipeline = _arg(query, "pipeline_tag")
        gated = _arg(query, "gated")
        lo, hi = _param_range(_arg(query, "num_parameters"))
        out = []
        for info in infos:
            tags = set(info.get("tags") or ()) | {info.get("library_name"), info.get("pipeline_tag")}
            params = (info.get("safetensors") or {}).get("total")
            if search and search not in info["id"].lower():
                continue
            if author and info["author"] != author:
                continue
            if pipeline and info.get("pipeline_tag") != pipeline:
                continue
            if any(f not in tags for f in query.get("filter", [])):
                continue
            if gated is not None and bool(info["gated"]) != (gated.lower() == "true"):
                continue
            if (lo is not None or hi is not None) and (
                    params is None or (lo is not None and params < lo) or (hi is not None and params > hi)):
                continue
            out.append(info)
        sort = _arg(query, "sort")
        if sort:
            key = {"trending_score": "trendingScore", "last_modified": "lastModified"}.get(sort, sort)
            ascending = _arg(query, "direction", "-1") == "1"
            out.sort(key=lambda i: (i.get(key) is not None, i.get(key) or 0), reverse=not ascending)
        limit = _arg(query, "limit")
        if limit:
            out = out[:int(limit)]
        if not _flag(query, "full") and "expand" not in query:
            # The Hub's default listing: no file list and no card unless asked for.
            keep = {"_id", "id", "modelId", "likes", "downloads", "tags", "pipeline_tag", "library_name",
                    "createdAt", "private", "gated"}
            if _flag(query, "cardData"):
                keep.add("cardData")
            out = [{k: v for k, v in i.items() if k in keep} for i in out]
        self._send_json([_expanded(i, query) for i in out], head)

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
        self._check_access(repo, filename)
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
        if range_header and not head and not self.hub.ignore_ranges:
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
        if head:
            self._send(status, headers, body, head)
            return
        with self.hub._lock:
            cut = self.hub._interrupt.pop(filename, None)
            short = self.hub._short.get(filename)
        if short is not None:
            if short[1]:
                body = body[:short[0]]  # Content-Length follows: a clean, short response
            else:
                cut = short[0] if cut is None else min(cut, short[0])
        chunk, delay = self.hub._throttle.get(filename, (len(body) or 1, 0.0))
        self._send(status, headers, body, head, chunk=chunk, delay=delay, cut=cut)

    # ------------------------------------------------------------------ output

    def _send_json(self, obj, head: bool) -> None:
        self._send(200, {"Content-Type": "application/json"}, json.dumps(obj).encode(), head)

    def _send(self, status: int, headers: dict[str, str], body: bytes, head: bool, *,
              chunk: int | None = None, delay: float = 0.0, cut: int | None = None) -> None:
        """Send a response; the body goes in ``chunk``-sized pieces ``delay`` seconds apart,
        and stops after ``cut`` bytes (then the connection closes short of Content-Length)."""
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        # HEAD reports the length a GET would return, as the client reads sizes from it.
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if head:
            return
        limit = len(body) if cut is None else min(cut, len(body))
        step = max(chunk or len(body), 1)
        try:
            for start in range(0, limit, step):
                piece = body[start:min(start + step, limit)]
                self.wfile.write(piece)
                self.wfile.flush()
                self._entry["sent"] += len(piece)
                if delay and start + step < limit:
                    time.sleep(delay)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away (a cancelled download): nothing more to send
        if cut is not None:
            self.close_connection = True


def _arg(query: dict, name: str, default: str | None = None) -> str | None:
    values = query.get(name)
    return values[-1] if values else default


def _flag(query: dict, name: str) -> bool:
    return (_arg(query, name) or "").lower() in {"true", "1"}


def _expanded(info: dict, query: dict) -> dict:
    """Keep only ``id`` plus the ``expand`` fields, when ``expand`` is given (as the Hub does)."""
    expand = query.get("expand")
    if not expand:
        return info
    return {k: v for k, v in info.items() if k in {"_id", "id", *expand}}


_SIZE_RE = re.compile(r"^(\d+(?:\.\d+)?)([KMBT]?)$", re.I)
_SCALE = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "T": 10**12}


def _param_range(text: str | None) -> tuple[int | None, int | None]:
    """Parse the Hub's ``num_parameters`` syntax, e.g. ``min:3B,max:8B``."""
    lo = hi = None
    for part in (text or "").split(","):
        if not part.strip():
            continue
        bound, _, value = part.partition(":")
        m = _SIZE_RE.match(value.strip())
        if m is None or bound not in ("min", "max"):
            raise _Error(400, None, f"bad num_parameters {text!r}")
        n = int(float(m[1]) * _SCALE[m[2].upper()])
        lo, hi = (n, hi) if bound == "min" else (lo, n)
    return lo, hi
