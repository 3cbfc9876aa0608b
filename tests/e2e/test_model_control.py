"""Model lifecycle without restarts: ``serve --model-control poll`` under load while versions come and go.

Version 2 is published by a real ``finetune`` run into the served store; versions are removed the way
an operator would (renamed away, then deleted), and a corrupt version is copied in under a temporary
name and renamed into place (as ``finetune`` publishes), while unmodified ``tritonclient`` clients
(HTTP and gRPC) keep sending unversioned requests in closed loops.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http

from tests.e2e.conftest import BIN, Package, Server, start_server

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
TOKEN = "model-control-token"
POLL = ("--model-control", "poll", "--poll-interval-s", "0.5", "--backend", "onnxruntime", "--max-batch-size", "4")


def _publish(store: Path, version: int, *, corrupt: bool = False) -> None:
    """Version 1 copied as ``version`` under a temporary name, renamed into place (as finetune publishes)."""
    staging = store / "demo" / f".staging-{version}"
    shutil.copytree(store / "demo" / "1", staging)
    manifest = json.loads((staging / "manifest.json").read_text())
    manifest["version"] = version
    (staging / "manifest.json").write_text(json.dumps(manifest))
    if corrupt:
        with (staging / "model.onnx").open("ab") as fh:
            fh.write(b"tampered")
    staging.rename(store / "demo" / str(version))


def _finetune_version_2(store: Path, runs: Path) -> subprocess.Popen[bytes]:
    """A short real fine-tune of the demo, published into the served store as ``demo`` version 2."""
    args = [
        str(BIN / "finetune"), "--demo", "--epochs", "1", "--freeze-epochs", "1", "--img-size", "160",
        "--tensorboard", "false", "--torchserve", "none", "--export-formats", "onnx", "--error-analysis", "0",
        "--name", "demo", "--version", "2", "--model-store", str(store), "--output-dir", str(runs), "--run-name", "v2",
    ]  # fmt: skip
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _unpublish(store: Path, version: int) -> None:
    gone = store / "demo" / f".deleting-{version}"
    (store / "demo" / str(version)).rename(gone)
    shutil.rmtree(gone)


@dataclass
class Load:
    """Closed-loop clients sending unversioned requests until stopped; every answer's version, every failure."""

    answers: dict[str, list[str]] = field(default_factory=dict)  # client -> versions, in order
    failures: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self, name: str, send: Callable[[], str]) -> None:
        seen = self.answers.setdefault(name, [])
        while not self.stop.is_set():
            try:
                seen.append(send())
            except Exception as exc:  # every failure counts, whatever the client raises
                self.failures.append(f"{name}: {exc}")


def _http_sender(server: Server, image: bytes) -> Callable[[], str]:
    client = triton_http.InferenceServerClient(f"127.0.0.1:{server.http_port}", network_timeout=60)
    tensor = triton_http.InferInput("image", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([image], dtype=np.object_), binary_data=True)

    def send() -> str:
        return str(client.infer("demo", [tensor]).get_response()["model_version"])

    return send


def _grpc_sender(server: Server, image: bytes) -> Callable[[], str]:
    client = triton_grpc.InferenceServerClient(server.grpc_address)
    tensor = triton_grpc.InferInput("image", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([image], dtype=np.object_))

    def send() -> str:
        return str(client.infer("demo", [tensor], client_timeout=60).get_response().model_version)

    return send


def _metadata(server: Server) -> dict[str, Any]:
    body: dict[str, Any] = httpx.get(f"{server.url}/v2/models/demo", timeout=10).json()
    return body


def _wait_for(server: Server, check: Callable[[dict[str, Any]], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check(_metadata(server)):
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}: {_metadata(server)}\n{server.log.read_text()[-3000:]}")


def _states(meta: dict[str, Any]) -> dict[str, str]:
    return {row["version"]: row["state"] for row in meta["version_states"]}


def _transitions(server: Server) -> dict[tuple[str, str, str], float]:
    """``inference_model_transitions_total`` of model demo: (version, transition, outcome) -> count."""
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    counted = {}
    for labels, value in re.findall(r"^inference_model_transitions_total\{(.*)\} (\S+)$", text, re.MULTILINE):
        row = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        if row["model"] == "demo":
            counted[(row["version"], row["transition"], row["outcome"])] = float(value)
    return counted


def _collapse(versions: list[str]) -> list[str]:
    return [v for i, v in enumerate(versions) if i == 0 or versions[i - 1] != v]


def test_versions_come_and_go_under_load_without_a_failed_request(demo_package: Package, tmp_path: Path) -> None:
    store = tmp_path / "store"
    shutil.copytree(demo_package.store / "demo" / "1", store / "demo" / "1")
    server = start_server(
        store, tmp_path / "serve.log", *POLL, "--enable-management", env={"SERVE_MANAGEMENT_TOKEN": TOKEN}
    )
    try:
        _wait_for(server, lambda m: m["default_version"] == "1", "version 1")
        image = sorted(demo_package.predictions)[0].read_bytes()
        load = Load()
        senders = [(f"http{i}", _http_sender(server, image)) for i in range(2)]
        senders += [(f"grpc{i}", _grpc_sender(server, image)) for i in range(2)]
        threads = [threading.Thread(target=load.run, args=sender, daemon=True) for sender in senders]
        for thread in threads:
            thread.start()
        time.sleep(1.0)
        finetune = _finetune_version_2(store, tmp_path / "runs")
        _, errors = finetune.communicate(timeout=600)
        assert finetune.returncode == 0, errors.decode()[-3000:]
        _wait_for(server, lambda m: m["default_version"] == "2", "version 2 to become the default")
        meta = _metadata(server)
        assert _states(meta) == {"1": "READY", "2": "READY"} and meta["versions"] == ["1", "2"]
        time.sleep(1.5)
        _unpublish(store, 2)
        _wait_for(server, lambda m: m["versions"] == ["1"], "version 2 to be unloaded")
        assert _metadata(server)["default_version"] == "1"
        time.sleep(1.0)
        _publish(store, 3, corrupt=True)
        _wait_for(server, lambda m: _states(m).get("3") == "UNAVAILABLE", "version 3 to be reported")
        time.sleep(1.0)
        load.stop.set()
        for thread in threads:
            thread.join(timeout=60)

        assert load.failures == [], load.failures[:5]
        for name, versions in load.answers.items():
            assert _collapse(versions) == ["1", "2", "1"], (name, _collapse(versions))
        meta = _metadata(server)
        assert meta["default_version"] == "1" and _states(meta) == {"1": "READY", "3": "UNAVAILABLE"}
        broken = next(row for row in meta["version_states"] if row["version"] == "3")
        assert "sha256" in broken["reason"] and str(store) not in broken["reason"]
        index = httpx.post(f"{server.url}/v2/repository/index", headers={"Authorization": f"Bearer {TOKEN}"}).json()
        assert [(r["version"], r["state"]) for r in index] == [("1", "READY"), ("3", "UNAVAILABLE")]
        counted = _transitions(server)
        assert counted[("2", "load", "success")] == 1 and counted[("2", "unload", "success")] == 1
        assert counted[("2", "default", "success")] == 1 and counted[("1", "default", "success")] == 2
        assert counted[("3", "load", "failure")] == 1 and ("3", "default", "success") not in counted
    finally:
        code = server.stop()
    assert code == 0, server.log.read_text()[-3000:]


def test_a_missing_store_stops_the_server_with_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "nonexistent"
    done = subprocess.run(
        [str(BIN / "serve"), "--model-store", str(missing)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 1, done.stderr
    errors = [line for line in done.stderr.splitlines() if " ERROR " in line]
    assert errors == [errors[0]] and f"model store {missing} does not exist" in errors[0], done.stderr
    assert "Traceback" not in done.stderr


def test_poll_mode_warns_until_the_store_appears_then_serves_it(demo_package: Package, tmp_path: Path) -> None:
    store = tmp_path / "store"
    log = tmp_path / "serve.log"
    server = start_server(store, log, *POLL)
    try:
        deadline = time.monotonic() + 30
        while "does not exist" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert re.search(rf"WARNING .*model store {re.escape(str(store))} does not exist", log.read_text())
        assert httpx.get(f"{server.url}/v2/health/ready").status_code == 503
        staging = tmp_path / ".staging"
        shutil.copytree(demo_package.store / "demo" / "1", staging / "demo" / "1")
        staging.rename(store)
        deadline = time.monotonic() + 60
        while httpx.get(f"{server.url}/v2/health/ready").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert httpx.get(f"{server.url}/v2/health/ready").status_code == 200, log.read_text()[-3000:]
        assert "readable again" in log.read_text()
    finally:
        code = server.stop()
    assert code == 0, log.read_text()[-3000:]
