"""A real Prometheus scraping a real ``serve``, and the image's health check against that server.

The server runs as the image configures it (metrics on their own port, SERVE_METRICS_PORT); Prometheus
(the Debian package's binary, started directly, not as a service) runs the scrape job of
deploy/prometheus.yml with its target pointed at that port and a 1 s interval. The Grafana dashboard's
queries then run against it. Everything listens on 127.0.0.1 and stops at the end.
"""

from __future__ import annotations

import base64
import json
import math
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.e2e.conftest import Package, Server, free_port, start_server
from tests.unit.test_dockerfile import DOCKERFILE, parse_dockerfile

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
PROMETHEUS = shutil.which("prometheus")
needs_prometheus = pytest.mark.skipif(
    PROMETHEUS is None, reason="no prometheus binary: apt-get install prometheus (.ci/run does)"
)
REQUESTS = 4


@dataclass(frozen=True)
class Serving:
    server: Server
    metrics_port: int


@pytest.fixture(scope="module")
def serving(demo_package: Package, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serving]:
    metrics_port = free_port()
    log = tmp_path_factory.mktemp("serve-prometheus") / "serve.log"
    server = start_server(demo_package.store, log, env={"SERVE_METRICS_PORT": str(metrics_port)})
    yield Serving(server, metrics_port)
    assert server.stop() == 0, log.read_text()


def scrape_config(metrics_port: int) -> dict[str, Any]:
    """deploy/prometheus.yml with its one job pointed at ``metrics_port`` on loopback, every second."""
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text(encoding="utf-8"))
    config["global"]["scrape_interval"] = "1s"
    (job,) = config["scrape_configs"]
    job["scrape_interval"] = "1s"
    job["static_configs"][0]["targets"] = [f"127.0.0.1:{metrics_port}"]
    return config


@pytest.fixture(scope="module")
def prometheus(serving: Serving, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    assert PROMETHEUS is not None
    root = tmp_path_factory.mktemp("prometheus")
    (root / "prometheus.yml").write_text(yaml.safe_dump(scrape_config(serving.metrics_port)), encoding="utf-8")
    port = free_port()
    args = [
        PROMETHEUS,
        f"--config.file={root / 'prometheus.yml'}",
        f"--storage.tsdb.path={root / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    log = root / "prometheus.log"
    with log.open("w") as out:
        process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: process.poll() is None and httpx.get(f"{url}/-/ready", timeout=1).status_code == 200, log)
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_until(condition: Any, log: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise AssertionError(f"gave up after {timeout} s; log:\n{log.read_text()[-4000:]}")


def query(prometheus: str, promql: str) -> list[dict[str, Any]]:
    response = httpx.get(f"{prometheus}/api/v1/query", params={"query": promql}, timeout=5)
    body = response.json()
    assert response.status_code == 200 and body["status"] == "success", f"{promql}: {body}"
    return list(body["data"]["result"])


def send_requests(server: Server, images: list[Path]) -> None:
    for image in images:
        encoded = base64.b64encode(image.read_bytes()).decode()
        body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [encoded]}]}
        response = httpx.post(f"{server.url}/v2/models/demo/infer", json=body, timeout=60)
        assert response.status_code == 200, response.text


@pytest.fixture(scope="module")
def scraped(serving: Serving, prometheus: str, demo_package: Package) -> str:
    """Prometheus, once it has scraped the counts of a few inference requests sent to the server."""
    images = sorted(demo_package.predictions)[:REQUESTS]
    send_requests(serving.server, images)
    promql = 'sum(inference_request_duration_seconds_count{model="demo", job="imgclf"})'

    def counted() -> bool:
        result = query(prometheus, promql)
        return bool(result) and float(result[0]["value"][1]) >= len(images)

    wait_until(counted, serving.server.log)
    return prometheus


@needs_prometheus
def test_prometheus_scrapes_request_latency_of_the_model(scraped: str) -> None:
    assert query(scraped, 'up{job="imgclf"}')[0]["value"][1] == "1"
    p95 = 'histogram_quantile(0.95, sum by (le) (inference_request_duration_seconds_bucket{model="demo"}))'
    (sample,) = query(scraped, p95)
    assert 0 < float(sample["value"][1]) < 60


GPU_ONLY = {"GPU memory held"}  # exported on a GPU host only


@needs_prometheus
def test_every_dashboard_query_returns_the_served_models_series(
    serving: Serving, scraped: str, demo_package: Package
) -> None:
    """Under live traffic, each panel's query (``$model`` = demo) returns finite values of the demo model's
    series; only the GPU panel may be empty, and only on a host whose server exports no GPU gauge."""
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "imgclf.json").read_text(encoding="utf-8"))
    panels = [(p["title"], t["expr"].replace("$model", "demo")) for p in dashboard["panels"] for t in p["targets"]]
    exported = httpx.get(f"http://127.0.0.1:{serving.metrics_port}/metrics", timeout=5).text
    has_gpu = re.search(r"^inference_gpu_memory_bytes[{ ]", exported, re.MULTILINE) is not None
    stop = threading.Event()
    traffic = threading.Thread(target=keep_sending, args=(serving.server, sorted(demo_package.predictions), stop))
    traffic.start()
    try:
        for title, promql in panels:
            if title in GPU_ONLY and not has_gpu:
                assert query(scraped, promql) == [], f"{title}: a GPU series on a host without one"
                continue
            wait_until(lambda promql=promql: finds_demo(query(scraped, promql)), serving.server.log, timeout=45)
    finally:
        stop.set()
        traffic.join(timeout=60)


def finds_demo(result: list[dict[str, Any]]) -> bool:
    """At least one series, every one finite and the demo model's (or aggregated over the model filter)."""
    finite = [s for s in result if math.isfinite(float(s["value"][1]))]
    return bool(finite) and all(s["metric"].get("model", "demo") == "demo" for s in finite)


def keep_sending(server: Server, images: list[Path], stop: threading.Event) -> None:
    """Inference requests one after another until ``stop``: rates and quantiles over [1m] need live traffic."""
    index = 0
    while not stop.is_set():
        send_requests(server, [images[index % len(images)]])
        index += 1
        stop.wait(0.2)


def healthcheck_command() -> list[str]:
    instructions = parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))
    # serve's; serve-cpu's runs the same command (tests/unit/test_dockerfile.py checks that)
    (check,) = [i.args for i in instructions if i.keyword == "HEALTHCHECK" and i.stage == "serve"]
    command = json.loads(check[check.index(" CMD ") + len(" CMD ") :])
    assert command[0] == "python"
    return [sys.executable, *command[1:]]


def test_image_healthcheck_and_kubernetes_probes_against_the_server(serving: Serving) -> None:
    command = healthcheck_command()
    ok = subprocess.run(command, env={"SERVE_HTTP_PORT": str(serving.server.http_port)}, timeout=30)
    assert ok.returncode == 0
    closed = subprocess.run(command, env={"SERVE_HTTP_PORT": str(free_port())}, capture_output=True, timeout=30)
    assert closed.returncode != 0
    (deployment,) = yaml.safe_load_all((DEPLOY / "k8s" / "deployment.yaml").read_text(encoding="utf-8"))
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        path = container[probe]["httpGet"]["path"]
        assert httpx.get(f"{serving.server.url}{path}", timeout=5).status_code == 200, probe
