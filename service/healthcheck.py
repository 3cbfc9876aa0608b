"""The container images' HEALTHCHECK: ``python -m service.healthcheck`` exits 0 when the server in this
container answers ``/v2/health/ready`` (every model loaded and warmed up), else 1 with one line saying why.

It asks 127.0.0.1 on ``SERVE_HTTP_PORT`` (8000); with ``SERVE_TLS_CERT`` set, over HTTPS without verifying
the certificate, which names the service, not 127.0.0.1. Standard library only: it runs every 15 s.
"""

from __future__ import annotations

import os
import ssl
import sys
import urllib.request
from collections.abc import Mapping

TIMEOUT_S = 4.0  # under the HEALTHCHECK's --timeout=5s


def ready_url(environ: Mapping[str, str] = os.environ) -> str:
    scheme = "https" if environ.get("SERVE_TLS_CERT") else "http"
    return f"{scheme}://127.0.0.1:{environ.get('SERVE_HTTP_PORT', '8000')}/v2/health/ready"


def main() -> int:
    url = ready_url()
    context = None
    if url.startswith("https:"):
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S, context=context) as response:
            status = response.status
    except (OSError, ValueError) as exc:  # refused, timed out, 503 (HTTPError is an OSError)
        print(f"not ready: {url}: {exc}", file=sys.stderr)
        return 1
    if status != 200:
        print(f"not ready: {url} answered {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
