#!/usr/bin/env python3
"""The container's health check: exit 0 when ``GET /health`` on this container's server
answers ``{"status": "ok"}`` (a model is loaded and serving), else 1 with the reason on stderr
(Docker shows it in ``docker inspect``; while the model loads: ``HTTP 503, status 'loading'``).
Standard library only; /health needs no key. ``HEARTH_PORT`` names the port (default 8000)."""

import json
import os
import sys
import urllib.error
import urllib.request


def main() -> int:
    url = f"http://127.0.0.1:{os.environ.get('HEARTH_PORT', '8000')}/health"
    try:
        with urllib.request.urlopen(url, timeout=4) as r:
            status = json.load(r).get("status")
    except urllib.error.HTTPError as e:  # 503 {"status": "loading"} while the model loads
        try:
            body = json.load(e)
            status, error = body.get("status"), body.get("error")
        except (OSError, ValueError, AttributeError):
            status = error = None
        # (503 {"status": "error", "error": ...}: the model can answer no more; say why)
        print(f"{url}: HTTP {e.code}" + (f", status {status!r}" if status else "") + (f": {error}" if error else ""),
              file=sys.stderr)
        return 1
    except (OSError, ValueError) as e:  # refused, timed out, not JSON
        print(f"{url}: {e}", file=sys.stderr)
        return 1
    if status != "ok":
        print(f"{url}: status {status!r} (no model loaded)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
