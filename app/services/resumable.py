"""Fetch one file over HTTP into a partial file that survives failures and restarts.

The transfer goes through huggingface_hub's own HTTP session (``http_stream_backoff``:
its proxies, user agent and Hub error mapping). What is added here is the part
huggingface_hub (>= 1.x) no longer does across calls: keep the partial file and continue
it with a ``Range`` request after a dropped connection, a failure or an app restart.
Progress and cancellation are the caller's, through small callbacks.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("hearth.app.downloads")

CHUNK = 128 * 1024   # small enough that progress and cancel react within a fraction of a second
_TRANSIENT_STATUS = (408, 429, 500, 502, 503, 504)


class Stopped(Exception):
    """The caller asked to stop (cancel or shutdown); the partial file is left as it is."""


def is_connection_error(exc: BaseException) -> bool:
    """A network-level failure (refused, reset, dropped mid-body, timeout): worth a resume."""
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    # httpx (or huggingface_hub's httpx2 fork) transport errors: DNS, refused, reset, timeouts.
    return any(cls.__name__ in ("TransportError", "ConnectError", "TimeoutException", "NetworkError")
               and cls.__module__.startswith(("httpx", "httpcore")) for cls in type(exc).__mro__)


def fetch_resumable(url: str, partial: Path, size: int, *, token: str | None,
                    on_bytes: Callable[[int], None], should_stop: Callable[[], bool],
                    sleep: Callable[[float], bool], max_retries: int = 3, retry_wait_s: float = 1.0,
                    label: str = "") -> bool:
    """Grow ``partial`` until it holds all ``size`` bytes of ``url``; returns whether the
    file was assembled from more than one response (then its checksum should be verified).

    Starts from whatever ``partial`` already holds. ``on_bytes(n)`` reports bytes added
    (negative if the server ignored the Range and the file restarts); ``should_stop()`` is
    polled per chunk; ``sleep(s)`` waits between reconnects and returns True to stop early.
    A dropped connection is retried ``max_retries`` times (reset whenever bytes arrive).

    Raises:
        Stopped: ``should_stop()`` or ``sleep()`` said so.
        huggingface_hub errors (HfHubHTTPError, GatedRepoError, ...) and connection errors
        once the retries are spent; OSError from the disk.
    """
    from huggingface_hub.utils import build_hf_headers, hf_raise_for_status, http_stream_backoff

    have = partial.stat().st_size if partial.exists() else 0
    stitched = have > 0
    attempts = 0
    auth = token if sends_token_to(url) else False
    while have < size:
        headers = build_hf_headers(token=auth)
        headers["Accept-Encoding"] = "identity"  # byte offsets must be of the file itself
        if have:
            headers["Range"] = f"bytes={have}-"
        try:
            with http_stream_backoff("GET", url, headers=headers, timeout=30, retry_on_exceptions=(),
                                     retry_on_status_codes=_TRANSIENT_STATUS) as r:
                hf_raise_for_status(r)
                mode = "ab"
                content_range = r.headers.get("Content-Range", "")
                if have and (r.status_code != 206 or not content_range.startswith(f"bytes {have}-")):
                    # The server ignored the Range (or answered another one): start over.
                    on_bytes(-have)
                    mode, have = "wb", 0
                elif have:
                    stitched = True
                with open(partial, mode) as f:
                    for chunk in r.iter_bytes(CHUNK):
                        if should_stop():
                            raise Stopped()
                        f.write(chunk)
                        have += len(chunk)
                        attempts = 0  # progress was made: a later drop gets fresh retries
                        on_bytes(len(chunk))
        except Stopped:
            raise
        except Exception as exc:
            if not is_connection_error(exc) or should_stop():
                if should_stop():
                    raise Stopped() from None
                raise
            attempts += 1
            if attempts > max_retries:
                raise
            log.info("connection dropped at byte %d of %s; resuming (%d/%d)", have, label, attempts, max_retries)
            if sleep(retry_wait_s * 2 ** (attempts - 1)):
                raise Stopped() from None
            continue
        if have < size:  # a clean but short response: resume like after a drop
            attempts += 1
            if attempts > max_retries:
                raise ConnectionError(f"the server kept ending {label} early")
    if have > size:
        partial.unlink(missing_ok=True)
        raise OSError(f"{label} came out larger than the Hub announced ({have} > {size} bytes); "
                      "press Retry to download it again.")
    return stitched


def sends_token_to(url: str) -> bool:
    """Whether the Hugging Face token may go with a request to ``url``: only to the Hub
    endpoint itself, never to the CDN or storage host a file download is redirected to
    (huggingface_hub drops it there too; pre-signed storage URLs even reject it)."""
    from urllib.parse import urlsplit

    from huggingface_hub import constants

    host = urlsplit(url).netloc.lower()
    return host == urlsplit(constants.ENDPOINT).netloc.lower() or host in ("huggingface.co", "hf.co")


def sha256_matches(path: Path, sha256: str, should_stop: Callable[[], bool]) -> bool:
    """Whether the file's sha256 is ``sha256`` (hashing can be stopped between MiBs)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            if should_stop():
                raise Stopped()
            h.update(block)
    return h.hexdigest() == sha256
