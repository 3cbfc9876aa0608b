"""Faults: SIGTERM while HTTP and gRPC requests are in flight; ``finetune`` with outputs it cannot write."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import make_image_folder
from tests.e2e.conftest import Package, Server, start_server
from tests.e2e.test_overload import Result, Send, grpc_sender, http_sender

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
IN_FLIGHT = 48  # half over HTTP, half over gRPC
AFTER_SIGNAL_SECONDS = 20.0  # how long the after-the-signal senders may keep trying, at most
REFUSED_AFTER_SIGNAL = (503, "UNAVAILABLE", "CANCELLED", "ConnectError", "RemoteProtocolError", "ReadError")


def _admitted(server: Server) -> float:
    """Requests answered so far plus those waiting in the queue (one more may be computing)."""
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    families = {family.name: family for family in text_string_to_metric_families(text)}
    done = sum(s.value for s in families["inference_request_duration_seconds"].samples if s.name.endswith("_count"))
    return done + sum(s.value for s in families["inference_queue_depth"].samples)


async def _in_flight_then_sigterm(server: Server, image: bytes) -> tuple[list[Result], list[Result | str]]:
    """Send IN_FLIGHT requests, wait until the server holds them all, SIGTERM, keep sending until it exits."""
    before = _admitted(server)
    async with (
        httpx.AsyncClient(timeout=60) as client,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel,
    ):
        senders = [http_sender(client, server.url, image) for _ in range(IN_FLIGHT // 2)]
        senders += [grpc_sender(channel, image) for _ in range(IN_FLIGHT // 2)]
        in_flight = [asyncio.ensure_future(send()) for send in senders]
        deadline = time.monotonic() + 60
        while await asyncio.to_thread(_admitted, server) - before < IN_FLIGHT - 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert not all(task.done() for task in in_flight), "everything finished before the signal: nothing to drain"
        server.process.send_signal(signal.SIGTERM)
        after = await _send_until_exit(server, [http_sender(client, server.url, image), grpc_sender(channel, image)])
        return list(await asyncio.gather(*in_flight)), after


async def _send_until_exit(server: Server, senders: list[Send]) -> list[Result | str]:
    """New requests after the signal, until the process has exited (bounded in time)."""
    outcomes: list[Result | str] = []
    stop = time.monotonic() + AFTER_SIGNAL_SECONDS

    async def loop(send: Send) -> None:
        while server.process.poll() is None and time.monotonic() < stop:
            try:
                outcomes.append(await send())
            except httpx.HTTPError as exc:  # the listener is closed: nothing was accepted
                outcomes.append(type(exc).__name__)
            last = outcomes[-1]
            if isinstance(last, str) or last.status not in (200, "OK"):
                await asyncio.sleep(0.05)  # refused: like a client backing off, not a busy loop

    await asyncio.gather(*(loop(send) for send in senders))
    return outcomes


def test_sigterm_under_load_loses_no_accepted_request(demo_package: Package, tmp_path: Path) -> None:
    path, label = sorted(demo_package.predictions.items())[0]
    log = tmp_path / "serve.log"
    flags = ["--max-batch-size", "1", "--intra-op-threads", "1", "--max-queue-size", "64", "--max-queue-wait-ms", "0"]
    server = start_server(demo_package.store, log, *flags)
    try:
        assert httpx.post(f"{server.url}/predictions/demo", content=path.read_bytes(), timeout=60).status_code == 200
        in_flight, after = asyncio.run(_in_flight_then_sigterm(server, path.read_bytes()))
    finally:
        code = server.stop(timeout=60)
    assert code == 0, log.read_text()
    assert [(r.status, r.label) for r in in_flight] == [(200, label)] * (IN_FLIGHT // 2) + [("OK", label)] * (
        IN_FLIGHT // 2
    ), in_flight
    for outcome in after:  # sent after the signal: answered in full, refused, or never let in
        if isinstance(outcome, Result) and outcome.status in (200, "OK"):
            assert outcome.label == label, after
        else:  # CANCELLED: grpc core drops calls that reach it while it shuts down, before any handler runs
            assert (outcome if isinstance(outcome, str) else outcome.status) in REFUSED_AFTER_SIGNAL, after
    assert "Traceback" not in log.read_text()


# ---- finetune with outputs it cannot write --------------------------------------------------------------

TINY_RUN = [
    "--backbone", "mobilenet_v3_small", "--weights", "none", "--img-size", "32", "--batch-size", "4",
    "--workers", "0", "--val-split", "0.25", "--test-split", "0.25", "--tensorboard", "false", "--epochs", "1",
    "--export-formats", "torchscript",
]  # fmt: skip


def _finetune(*args: str, cwd: Path) -> subprocess.Popen[str]:
    command = [str(Path(sys.executable).parent / "finetune"), *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _assert_one_clear_error(proc: subprocess.Popen[str], stderr: str, *names: str) -> None:
    assert proc.returncode == 2, stderr[-3000:]
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1, stderr[-3000:]
    assert all(name in errors[0] for name in names), errors


def test_finetune_with_unwritable_outputs_fails_cleanly(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "imgs", {"a": 4, "b": 4, "c": 4}, size=32)
    (tmp_path / "taken").write_text("a file where a folder should go\n")
    # both at once: the second trains before it reaches its unwritable store
    output_is_a_file = _finetune(
        "--data", str(data), *TINY_RUN, "--output-dir", "taken", "--model-store", "store1", cwd=tmp_path
    )
    store_under_a_file = _finetune(
        "--data", str(data), *TINY_RUN, "--output-dir", "runs", "--model-store", "taken/store", cwd=tmp_path
    )
    _, err1 = output_is_a_file.communicate(timeout=600)
    _, err2 = store_under_a_file.communicate(timeout=600)

    _assert_one_clear_error(output_is_a_file, err1, "taken", "Not a directory")
    assert not (tmp_path / "store1").exists()
    _assert_one_clear_error(store_under_a_file, err2, "taken/store")
    assert (tmp_path / "taken").read_text() == "a file where a folder should go\n"
    assert not list(tmp_path.rglob(".staging-*")), "a half-written package was left behind"
    assert not list(tmp_path.rglob("manifest.json")), "a package was published somewhere"
