"""Real TorchServe 0.12 serving our ``.mar`` archives (TorchScript and ONNX) built from a package made by ``finetune``.

Image by image, TorchServe's answer over HTTP and gRPC must have the top-1 label of finetune's own
evaluation and the same answer as our ``serve`` over the same package. TorchServe runs on free
loopback ports with its logs, unpacked models, sockets and pid file in a private temp folder, and
is stopped with ``torchserve --stop``; no java or worker process may be left behind.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import psutil
import pytest

from finetune.torchserve import Ports, build_mar, check_archive, write_config_properties
from finetune.ts_handler import backend_for_format
from service.protos import load_torchserve
from service.registry import backends_reading
from tests.e2e.conftest import BIN, Package, Server, free_port, start_server

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("java") is None, reason="TorchServe needs Java (JRE 11+); java is not on PATH"),
]
IMAGES = 8


@dataclass
class TorchServe:
    work: Path
    ports: Ports
    env: dict[str, str]
    processes: list[psutil.Process]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.ports.inference}"

    @property
    def management_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.management}"

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.ports.grpc_inference}"

    def logs(self) -> str:
        parts = [(self.work / "logs" / name) for name in ("ts_log.log", "model_log.log")]
        return "\n".join(p.read_text()[-6000:] for p in parts if p.is_file())

    def stop(self) -> list[psutil.Process]:
        """``torchserve --stop``; returns the processes (java, workers) still alive afterwards."""
        subprocess.run(
            [str(BIN / "torchserve"), "--stop", "--foreground"], cwd=self.work, env=self.env, timeout=90, check=False
        )
        _, alive = psutil.wait_procs(self.processes, timeout=30)
        for process in alive:
            process.kill()
        return list(alive)


def start_torchserve(store: Path, models: dict[str, str], work: Path) -> TorchServe:
    """The README's command on free ports, from a private folder, serving ``{name: archive}``; returns once
    java runs (see wait_ready)."""
    ports = Ports(*(free_port() for _ in range(5)))
    config = write_config_properties(work, models=models, ports=ports, model_store=store)
    # TorchServe writes logs/ to LOG_LOCATION (else the cwd), unpacks archives into TEMP and keeps
    # its pid file and worker sockets in TMPDIR: all private, so parallel runs cannot collide.
    env = {**os.environ, "TMPDIR": str(work), "TEMP": str(work)}
    env |= {"LOG_LOCATION": str(work / "logs"), "METRICS_LOCATION": str(work / "logs")}
    listed = [f"{name}={archive}" for name, archive in models.items()]
    cmd = ["--start", "--ncs", "--model-store", str(store), "--models", *listed, "--ts-config", str(config)]
    with (work / "torchserve.out").open("w") as out:  # java inherits it: a pipe would never reach EOF
        launcher = [str(BIN / "torchserve"), *cmd]
        subprocess.run(launcher, cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT, check=True, timeout=60)
    java = psutil.Process(int((work / ".model_server.pid").read_text().strip()))
    return TorchServe(work, ports, env, [java])


def wait_ready(server: TorchServe, names: tuple[str, ...] = ("demo",)) -> None:
    """Poll the management API until each model's worker is READY; then its processes are known."""
    java = server.processes[0]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if not java.is_running():
            raise RuntimeError(f"TorchServe exited:\n{server.logs()}")
        if all(_worker_ready(server, name) for name in names):
            server.processes += java.children(recursive=True)
            return
        time.sleep(0.5)
    raise RuntimeError(f"TorchServe's workers for {', '.join(names)} did not become READY:\n{server.logs()}")


def _worker_ready(server: TorchServe, name: str) -> bool:
    try:
        response = httpx.get(f"{server.management_url}/models/{name}", timeout=2)
    except httpx.HTTPError:
        return False
    return response.status_code == 200 and [w["status"] for w in response.json()[0]["workers"]] == ["READY"]


@pytest.fixture(scope="module")
def archives(demo_package: Package, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A TorchServe model store holding demo.mar (TorchScript) and demo-onnx.mar."""
    store = tmp_path_factory.mktemp("ts_store")
    for fmt in ("onnx", "torchscript"):
        build_mar(demo_package.store / "demo" / "1", out_dir=store, fmt=fmt, precision="fp32")  # as ours below
    return store


@dataclass
class Pair:
    fmt: str
    torchserve: TorchServe
    ours: Server


@pytest.fixture(scope="module", params=["torchscript", "onnx"])
def pair(
    request: pytest.FixtureRequest, archives: Path, demo_package: Package, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pair]:
    """Real TorchServe with one archive, and our server with the same backend over the same package."""
    fmt: str = request.param
    work = tmp_path_factory.mktemp(f"torchserve-{fmt}")
    torchserve = start_torchserve(archives, {"demo": "demo.mar" if fmt == "torchscript" else "demo-onnx.mar"}, work)
    try:  # ours starts while TorchServe loads
        ours = start_server(demo_package.store, work / "serve.log", "--backend", backend_for_format(fmt))
        try:
            wait_ready(torchserve)
        except BaseException:
            ours.stop()
            raise
    except BaseException:
        torchserve.stop()
        raise
    yield Pair(fmt, torchserve, ours)
    ours.stop()
    left = torchserve.stop()
    assert not left, f"TorchServe left processes behind: {left}"
    assert not (work / ".model_server.pid").exists()


def _predict(url: str, body: bytes) -> httpx.Response:
    return httpx.post(f"{url}/predictions/demo", content=body, timeout=60)


def _images(package: Package) -> list[tuple[Path, bytes, str]]:
    return [(path, path.read_bytes(), label) for path, label in sorted(package.predictions.items())[:IMAGES]]


def test_finetune_wrote_the_default_archive(demo_package: Package) -> None:
    mar_manifest = check_archive(demo_package.store / "demo.mar", model_file="model.pt")
    assert mar_manifest["model"]["modelVersion"] == "1"  # type: ignore[index]
    assert "load_models=demo=demo.mar" in (demo_package.store / "config.properties").read_text()


def test_http_and_grpc_answers_match_finetune_and_serve(pair: Pair, demo_package: Package) -> None:
    images = _images(demo_package)
    ts = pair.torchserve
    with ThreadPoolExecutor(len(images)) as pool:  # concurrent, so TorchServe batches them
        answers = list(pool.map(lambda item: _predict(ts.url, item[1]), images))
    protos = load_torchserve()
    with grpc.insecure_channel(ts.grpc_address) as channel:
        stub = protos.services.InferenceAPIsServiceStub(channel)
        for (path, data, label), response in zip(images, answers, strict=True):
            assert response.status_code == 200, response.text
            answer = response.json()
            ours = httpx.post(f"{pair.ours.url}/predictions/demo", content=data, timeout=60).json()
            assert next(iter(answer)) == label == next(iter(ours)), path
            assert list(answer) == list(ours) and list(answer.values()) == pytest.approx(list(ours.values()), abs=1e-4)
            reply = stub.Predictions(protos.messages.PredictionsRequest(model_name="demo", input={"data": data}))
            assert json.loads(reply.prediction) == pytest.approx(answer, abs=1e-5), path
    path, data, label = images[0]
    multipart = httpx.post(f"{ts.url}/predictions/demo/1", files={"data": (path.name, data)}, timeout=60)
    assert multipart.status_code == 200 and next(iter(multipart.json())) == label


def test_a_bad_image_fails_only_its_request(pair: Pair, demo_package: Package) -> None:
    ts = pair.torchserve
    _, good, label = _images(demo_package)[0]
    bodies = [good, b"not an image", good, good]
    with ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(pool.map(lambda body: _predict(ts.url, body), bodies))
    assert [r.status_code for r in responses] == [200, 400, 200, 200]
    assert responses[1].json()["message"] == "body: not a recognised image (JPEG, PNG, WebP, BMP, GIF, TIFF)"
    assert next(iter(responses[3].json())) == label
    protos = load_torchserve()
    with grpc.insecure_channel(ts.grpc_address) as channel:
        stub = protos.services.InferenceAPIsServiceStub(channel)
        reply = stub.Predictions(protos.messages.PredictionsRequest(model_name="demo", input={"data": b"garbage"}))
    # TorchServe 0.12's gRPC path drops a handler's per-request status: OK, with our error as the prediction.
    error = json.loads(reply.prediction)
    assert error["code"] == 400 and error["message"].startswith("data: not a recognised image")
    assert httpx.get(f"{ts.url}/ping", timeout=10).json() == {"status": "Healthy"}  # the worker survived


def test_model_config_and_shipped_preprocessing(pair: Pair) -> None:
    ts = pair.torchserve
    (description,) = httpx.get(f"{ts.management_url}/models/demo", timeout=10).json()
    assert (description["batchSize"], description["maxBatchDelay"]) == (8, 50)
    assert (description["minWorkers"], description["maxWorkers"], description["responseTimeout"]) == (1, 1, 120)
    log = (ts.work / "logs" / "model_log.log").read_text()
    line = next(x for x in log.splitlines() if "imgclf handler: demo v1 on " in x)
    assert any(f"on {backend} fp32/cpu" in line for backend in backends_reading(pair.fmt))
    shipped = Path(line.rsplit("preprocessing from ", 1)[1].strip())
    assert shipped.is_relative_to(ts.work / "models") and shipped.parts[-2:] == ("service", "preprocess.py")
