"""The images' HEALTHCHECK (service/healthcheck.py); tests/e2e/test_prometheus.py runs it against a real server."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

from service.healthcheck import ready_url


def test_it_asks_loopback_on_the_http_port_and_https_with_a_certificate() -> None:
    assert ready_url({}) == "http://127.0.0.1:8000/v2/health/ready"
    tls = {"SERVE_HTTP_PORT": "9000", "SERVE_TLS_CERT": "/c.pem"}
    assert ready_url(tls) == "https://127.0.0.1:9000/v2/health/ready"


def _check(port: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "service.healthcheck"], env={"SERVE_HTTP_PORT": str(port)},
                          capture_output=True, text=True, timeout=30, check=False)  # fmt: skip


def test_not_ready_and_nothing_listening_exit_1_with_one_line() -> None:
    class NotReady(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(503)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), NotReady)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        busy = _check(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
    assert busy.returncode == 1 and busy.stderr.startswith("not ready: http://127.0.0.1:") and "503" in busy.stderr
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    closed = _check(port)
    assert closed.returncode == 1 and len(closed.stderr.strip().splitlines()) == 1
