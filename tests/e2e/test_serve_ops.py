"""Operating ``serve``: broken packages, management API, deadlines, graceful shutdown."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import Package, Server, start_server
from tests.e2e.protocols import PROTOCOLS, Endpoint, send_image

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def store_with_broken(demo_package: Package, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo package, plus a copy whose ONNX file was changed after publishing."""
    store = tmp_path_factory.mktemp("store")
    shutil.copytree(demo_package.store / "demo", store / "demo")
    shutil.copytree(demo_package.store / "demo", store / "broken")
    manifest = (store / "broken" / "1" / "manifest.json").read_text().replace('"name": "demo"', '"name": "broken"')
    (store / "broken" / "1" / "manifest.json").write_text(manifest)
    with (store / "broken" / "1" / "model.onnx").open("ab") as fh:
        fh.write(b"tampered")
    return store


@pytest.fixture(scope="module")
def managed(store_with_broken: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("managed") / "serve.log"
    server = start_server(
        store_with_broken, log, "--enable-management", "--max-batch-size", "2", env={"SERVE_MANAGEMENT_TOKEN": TOKEN}
    )
    yield server
    assert server.stop() == 0, log.read_text()


def managed_store(server: Server) -> Path:
    args = server.process.args
    assert isinstance(args, list)
    return Path(args[args.index("--model-store") + 1])


def _image(package: Package) -> bytes:
    return sorted(package.predictions)[0].read_bytes()


def test_broken_package_is_reported_and_the_rest_serve(managed: Server, demo_package: Package) -> None:
    meta = httpx.get(f"{managed.url}/v2/models/broken").json()
    assert meta["ready"] is False and "sha256" in meta["reason"]
    assert httpx.get(f"{managed.url}/v2/models/broken/ready").status_code == 503
    refused = httpx.post(f"{managed.url}/predictions/broken", content=_image(demo_package))
    message = refused.json()["message"]
    assert refused.status_code == 503 and "no ready version" in message and "sha256" in message
    assert str(managed_store(managed)) not in message
    assert httpx.post(f"{managed.url}/predictions/demo", content=_image(demo_package)).status_code == 200
    assert httpx.get(f"{managed.url}/v2/health/ready").status_code == 200


def test_management_needs_the_token(managed: Server) -> None:
    assert httpx.post(f"{managed.url}/v2/repository/index").status_code == 401
    wrong = httpx.post(f"{managed.url}/v2/repository/index", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    auth = {"Authorization": f"Bearer {TOKEN}"}
    index = httpx.post(f"{managed.url}/v2/repository/index", headers=auth).json()
    assert {(row["name"], row["state"]) for row in index} == {("demo", "READY"), ("broken", "UNAVAILABLE")}
    assert httpx.post(f"{managed.url}/v2/repository/models/demo/unload", headers=auth).status_code == 200
    assert httpx.get(f"{managed.url}/v2/models/demo/ready").status_code in (404, 503)
    assert httpx.post(f"{managed.url}/v2/repository/models/demo/load", headers=auth).status_code == 200
    assert httpx.get(f"{managed.url}/v2/models/demo/ready").status_code == 200
    escape = httpx.post(f"{managed.url}/v2/repository/models/..%2F..%2Fetc/load", headers=auth)
    assert escape.status_code in (400, 404)


def test_management_is_off_by_default(server: Server) -> None:
    response = httpx.post(f"{server.url}/v2/repository/index", headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 403 and "disabled" in response.json()["error"]


def test_expired_deadline_is_refused(managed: Server, demo_package: Package) -> None:
    response = httpx.post(
        f"{managed.url}/predictions/demo", content=_image(demo_package), headers={"X-Request-Timeout-Ms": "0.001"}
    )
    assert response.status_code == 504 and "deadline" in response.json()["message"]


def test_sigterm_finishes_in_flight_requests(demo_package: Package, tmp_path: Path) -> None:
    server = start_server(
        demo_package.store, tmp_path / "serve.log", "--max-batch-size", "1", "--backend", "torchscript"
    )
    image = _image(demo_package)
    statuses: list[int] = []
    started = threading.Barrier(9)

    def call() -> None:
        started.wait()
        statuses.append(httpx.post(f"{server.url}/predictions/demo", content=image, timeout=60).status_code)

    threads = [threading.Thread(target=call) for _ in range(8)]
    for thread in threads:
        thread.start()
    started.wait()
    while not statuses:  # the first answer proves the rest are queued or computing
        threading.Event().wait(0.01)
    assert server.stop() == 0, (tmp_path / "serve.log").read_text()
    for thread in threads:
        thread.join(timeout=60)
    assert statuses == [200] * 8


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_either_event_loop_serves_every_protocol(loop: str, demo_package: Package, tmp_path: Path) -> None:
    log = tmp_path / "serve.log"
    server = start_server(demo_package.store, log, "--event-loop", loop)
    try:
        image, label = next(iter(sorted(demo_package.predictions.items())))
        endpoint = Endpoint(server.http_port, server.grpc_port)
        outcomes = [send_image(endpoint, protocol, image.read_bytes()) for protocol in PROTOCOLS]
    finally:
        assert server.stop() == 0, log.read_text()
    assert all(o.ok and o.label == label for o in outcomes), outcomes
    assert f"(event loop: {loop})" in log.read_text()
