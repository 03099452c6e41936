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

from engine.api import format_bytes

log = logging.getLogger("hearth.app.downloads")

CHUNK = 128 * 1024   # small enough that progress and cancel react within a fraction of a second
_TRANSIENT_STATUS = (408, 429, 500, 502, 503, 504)
#: The longest wait between two attempts (the backoff doubles up to it).
MAX_RETRY_WAIT_S = 60.0


class Stopped(Exception):
    """The caller asked to stop (cancel or shutdown); the partial file is left as it is."""


class TransferFailed(Exception):
    """Attempt after attempt ended early without getting further; the message says why
    (naming a server that ignores Range requests) and what to do."""


def retry_wait(base_s: float, failures: int) -> float:
    """Seconds to wait after the ``failures``-th attempt in a row that made no progress
    (1, 2, ...): ``base_s`` doubled each time, at most ``MAX_RETRY_WAIT_S``."""
    return min(base_s * 2 ** (failures - 1), MAX_RETRY_WAIT_S)


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
    polled per chunk; ``sleep(s)`` waits between attempts and returns True to stop early.

    An attempt that ends early (a dropped connection, or a clean but short response) is
    retried after ``retry_wait`` seconds. Only attempts that get the file further than it
    ever was count as progress: a server that ignores Range and cuts every response short
    restarts the file each time and gets nowhere, so after ``max_retries`` attempts in a
    row without progress the transfer fails (a server that answers a Range request with
    the whole file still succeeds when that whole file arrives).

    Raises:
        Stopped: ``should_stop()`` or ``sleep()`` said so.
        TransferFailed: the retries were spent on short responses, or on a server that
            ignores Range requests (the message says which).
        huggingface_hub errors (HfHubHTTPError, GatedRepoError, ...) and connection errors
        once the retries are spent; OSError from the disk.
    """
    from huggingface_hub.utils import build_hf_headers, hf_raise_for_status, http_stream_backoff

    have = partial.stat().st_size if partial.exists() else 0
    stitched = have > 0
    best = have          # the most of the file ever on disk: progress means getting past it
    failures = 0         # attempts in a row that ended early (reset by progress)
    range_ignored = False
    auth = token if sends_token_to(url) else False
    while have < size:
        headers = build_hf_headers(token=auth)
        headers["Accept-Encoding"] = "identity"  # byte offsets must be of the file itself
        if have:
            headers["Range"] = f"bytes={have}-"
        error: Exception | None = None
        try:
            with http_stream_backoff("GET", url, headers=headers, timeout=30, retry_on_exceptions=(),
                                     retry_on_status_codes=_TRANSIENT_STATUS) as r:
                hf_raise_for_status(r)
                mode = "ab"
                content_range = r.headers.get("Content-Range", "")
                if have and (r.status_code != 206 or not content_range.startswith(f"bytes {have}-")):
                    # The server ignored the Range (or answered another one): start over.
                    range_ignored = True
                    log.info("the server ignored the Range request for %s; starting it over", label)
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
                        on_bytes(len(chunk))
        except Stopped:
            raise
        except Exception as exc:
            if should_stop():
                raise Stopped() from None
            if not is_connection_error(exc):
                raise
            error = exc
        if have >= size:
            break
        if have > best:  # further than ever before: the retries start afresh
            best, failures = have, 0
        failures += 1
        if failures > max_retries:
            if range_ignored:
                raise TransferFailed(
                    f"the server ignores requests to resume {label} (it answers a Range request with the "
                    f"whole file) and ended the download early {failures} times in a row, never getting "
                    f"past {format_bytes(best)} of {format_bytes(size)}. Press Retry to try again later, or download "
                    "from another network.") from error
            if error is not None:
                raise error
            raise TransferFailed(
                f"the server ended {label} early {failures} times in a row, never getting past "
                f"{format_bytes(best)} of {format_bytes(size)}. Press Retry to try again later; it continues where it "
                "stopped.")
        why = f"connection dropped ({error})" if error is not None else "short response"
        log.info("%s at byte %d of %s; retry %d of %d", why, have, label, failures, max_retries)
        if sleep(retry_wait(retry_wait_s, failures)):
            raise Stopped() from None
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
