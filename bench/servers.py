"""Start and stop the servers under test on free loopback ports: our ``serve`` and real TorchServe 0.12.

    server = start_ours(store, model="resnet18", backend="onnxruntime", max_batch_size=8, work=tmp)
    ...                                            # server.endpoint, server.pids(), server.protocols
    server.stop()                                  # SIGTERM, graceful drain; killed if it hangs

TorchServe runs the README's ``torchserve --start`` from a private folder (logs, unpacked models,
pid file and worker sockets all in it, so parallel runs cannot collide) and is stopped with
``torchserve --stop``; whatever is left of its process tree is then killed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench import procs
from bench.clients import Endpoint

logger = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
START_TIMEOUT_S = 240.0
OUR_PROTOCOLS = ("v2-http", "v2-grpc", "ts-http", "ts-grpc")
TORCHSERVE_PROTOCOLS = ("ts-http", "ts-grpc")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def child_env(**extra: str) -> dict[str, str]:
    """This environment, with the repository importable and no proxy for loopback."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "NO_PROXY": "127.0.0.1,localhost", **extra}


@dataclass
class Running:
    """A started server: where it listens, which protocols it speaks, how to stop it."""

    label: str
    kind: str  # "ours" | "torchserve"
    endpoint: Endpoint
    model: str
    protocols: tuple[str, ...]
    process: subprocess.Popen[bytes] | None  # ours: the server; None for TorchServe (java is not our child)
    log: Path
    root_pid: int
    env: dict[str, str] = field(default_factory=dict)
    work: Path | None = None
    seen: dict[int, int] = field(default_factory=dict)  # pid -> start time, every process of the tree seen
    ready_s: float = 0.0  # seconds from launching it to its readiness answering 200

    def pids(self) -> list[int]:
        """The live process tree (TorchServe: java and its python workers)."""
        tree = procs.process_tree(self.root_pid) if procs.alive(self.root_pid) else []
        self.seen.update({pid: procs.start_time(pid) for pid in tree if pid not in self.seen})
        return tree

    def leftovers(self) -> list[int]:
        """Processes of this server's tree that are still running."""
        return [pid for pid, started in self.seen.items() if procs.same_process_alive(pid, started)]

    def stop(self, timeout: float = 60.0) -> list[int]:
        """Stop gracefully, kill what hangs; returns the pids that had to be killed."""
        self.pids()
        if self.process is None:
            _torchserve_stop(self, timeout)
        else:
            _terminate(self.process, timeout)
        return _kill_leftovers(self, timeout=30.0)


def _terminate(process: subprocess.Popen[bytes], timeout: float) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _kill_leftovers(server: Running, *, timeout: float) -> list[int]:
    """Wait for the tree to exit; SIGKILL (by pid and start time, never a reused pid) what is left."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and server.leftovers():
        time.sleep(0.2)
    left = server.leftovers()
    for pid in left:
        logger.warning("killing leftover process %d (%s)", pid, procs.command_name(pid))
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return left


def start_ours(
    store: Path, *, model: str, backend: str, max_batch_size: int, work: Path, label: str, extra: tuple[str, ...] = ()
) -> Running:
    """``serve`` with one backend and batch size over ``store``; returns once ``model`` is ready."""
    flags = ("--backend", backend, "--max-batch-size", str(max_batch_size), *extra)
    return start_serve(store, model=model, work=work, label=label, flags=flags)


def start_serve(
    store: Path,
    *,
    model: str,
    work: Path,
    label: str,
    flags: Sequence[str] = (),
    env: dict[str, str] | None = None,
    ready_path: str = "",
) -> Running:
    """``serve`` over ``store`` with ``flags`` (and ``env`` added to its environment); returns once ``model`` is
    ready (or ``ready_path``, e.g. ``/v2/health/ready``, answers 200), with the seconds that took in ``ready_s``."""
    started = time.monotonic()
    endpoint = Endpoint(free_port(), free_port())
    log = work / f"serve-{label}.log"
    cmd = [
        sys.executable, "-m", "service.cli", "--model-store", str(store),
        "--http-port", str(endpoint.http_port), "--grpc-port", str(endpoint.grpc_port), "--log-level", "WARNING",
        *flags,
    ]  # fmt: skip
    with log.open("wb") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=child_env(**(env or {})), cwd=REPO)
    server = Running(label, "ours", endpoint, model, OUR_PROTOCOLS, process, log, process.pid)
    try:
        _wait_until(server, endpoint.url + (ready_path or f"/v2/models/{model}/ready"), lambda r: r.status_code == 200)
    except BaseException:
        server.stop()
        raise
    server.ready_s = time.monotonic() - started
    return server


def start_torchserve(
    package_dir: Path,
    *,
    work: Path,
    fmt: str = "torchscript",
    label: str = "torchserve",
    batch_size: int = 8,
    max_batch_delay_ms: int = 50,
    workers: int = 1,
    precision: str = "fp32",
) -> Running:
    """Real TorchServe over a ``.mar`` of ``package_dir`` (``fmt``: torchscript or onnx; ``precision``: our handler's,
    as ``finetune-package --precision``), as ``finetune.torchserve`` builds it; returns once the model's worker is
    READY."""
    started = time.monotonic()
    from finetune.torchserve import Ports, build_mar
    from service.manifest import load_manifest

    model = load_manifest(package_dir).name
    ports = Ports(*(free_port() for _ in range(5)))
    store = work / "ts_store"
    archive = build_mar(
        package_dir, out_dir=store, fmt=fmt, batch_size=batch_size,
        max_batch_delay_ms=max_batch_delay_ms, workers=workers, ports=ports, precision=precision,
    )  # fmt: skip
    env = child_env(TMPDIR=str(work), TEMP=str(work), LOG_LOCATION=str(work / "logs"))
    env["METRICS_LOCATION"] = str(work / "logs")
    cmd = [
        str(BIN / "torchserve"), "--start", "--ncs", "--model-store", str(store),
        "--models", f"{model}={archive.name}", "--ts-config", str(store / "config.properties"),
    ]  # fmt: skip
    log = work / "torchserve.log"
    with log.open("wb") as out:  # a file, not a pipe: java inherits it and outlives the launcher
        subprocess.run(cmd, cwd=work, env=env, check=True, timeout=60, stdout=out, stderr=subprocess.STDOUT)
    java = int((work / ".model_server.pid").read_text().strip())
    endpoint = Endpoint(ports.inference, ports.grpc_inference)
    server = Running(label, "torchserve", endpoint, model, TORCHSERVE_PROTOCOLS, None, log, java, env, work)
    url = f"http://127.0.0.1:{ports.management}/models/{model}"
    try:
        _wait_until(server, url, lambda r: r.status_code == 200 and _workers_ready(r.json()))
    except BaseException:
        server.stop()
        raise
    server.ready_s = time.monotonic() - started
    return server


def _workers_ready(description: list[dict[str, object]]) -> bool:
    workers = description[0].get("workers") if description else None
    return isinstance(workers, list) and bool(workers) and all(w.get("status") == "READY" for w in workers)


def _torchserve_stop(server: Running, timeout: float) -> None:
    with server.log.open("ab") as out:
        subprocess.run(
            [str(BIN / "torchserve"), "--stop", "--foreground"],
            cwd=server.work, env=server.env, timeout=timeout + 30, check=False, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip


def _wait_until(server: Running, url: str, check: Callable[[httpx.Response], bool]) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        exited = server.process is not None and server.process.poll() is not None
        if exited or not procs.alive(server.root_pid):
            raise RuntimeError(f"{server.label} exited while starting; log {server.log}:\n{_tail(server.log)}")
        try:
            if check(httpx.get(url, timeout=2, trust_env=False)):
                server.pids()
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(
        f"{server.label} was not ready after {START_TIMEOUT_S:.0f}s; log {server.log}:\n{_tail(server.log)}"
    )


def _tail(path: Path, size: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-size:]
    except OSError:
        return "(no log)"
