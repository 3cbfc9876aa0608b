"""Fixtures that run the real commands: a package made by ``finetune``, a ``serve`` subprocess."""

from __future__ import annotations

import csv
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class Package:
    store: Path
    name: str
    run_dir: Path
    predictions: dict[Path, str]  # test image -> label predicted by finetune's own evaluation


@pytest.fixture(scope="session")
def demo_package(tmp_path_factory: pytest.TempPathFactory) -> Package:
    """A real package: the demo data, real pretrained weights, a short linear probe, both formats, int8 too."""
    root = tmp_path_factory.mktemp("finetuned")
    args = [
        str(BIN / "finetune"), "--demo", "--epochs", "2", "--freeze-epochs", "2", "--img-size", "160", "--int8", "true",
        "--tensorboard", "false", "--model-store", str(root / "store"), "--output-dir", str(root / "runs"),
        "--run-name", "demo",
    ]  # fmt: skip
    subprocess.run(args, check=True, capture_output=True, timeout=600)
    run_dir = root / "runs" / "demo"
    with (run_dir / "test_predictions.tsv").open() as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    return Package(root / "store", "demo", run_dir, {Path(r["path"]): r["predicted"] for r in rows})


@dataclass
class Server:
    process: subprocess.Popen[str]
    http_port: int
    grpc_port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def stop(self, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def start_server(store: Path, log: Path, *extra: str, env: dict[str, str] | None = None) -> Server:
    """Start ``serve`` on free loopback ports and wait until it is ready (or fail with its log).

    At fp32 unless ``extra`` names a precision: answers are then those of finetune's own evaluation.
    """
    http_port, grpc_port = free_port(), free_port()
    if not any(arg.startswith("--precision") for arg in extra) and "SERVE_PRECISION" not in (env or {}):
        extra = ("--precision", "fp32", *extra)
    env = {"SERVE_DRAIN_GRACE_S": "0", **(env or {})}  # stop at once unless a test is about the grace period
    cmd = [
        str(BIN / "serve"),
        "--model-store",
        str(store),
        "--http-port",
        str(http_port),
        "--grpc-port",
        str(grpc_port),
    ]
    with log.open("w") as out:  # the child keeps its own copy of the descriptor
        process = subprocess.Popen(
            [*cmd, *extra], stdout=out, stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})}
        )
    server = Server(process, http_port, grpc_port, log)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"serve exited with {process.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"{server.url}/v2/health/live", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"serve did not become live:\n{log.read_text()}")


@pytest.fixture(scope="session", params=["onnxruntime", "torchscript"])
def server(
    request: pytest.FixtureRequest, demo_package: Package, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    running = start_server(demo_package.store, log, "--backend", request.param, "--max-batch-size", "4")
    yield running
    assert running.stop() == 0, log.read_text()
