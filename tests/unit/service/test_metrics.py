from __future__ import annotations

import asyncio
import sys
import types

import pytest
from prometheus_client.parser import text_string_to_metric_families

from service import errors, metrics


def _families() -> dict[str, list[tuple[str, dict[str, str], float]]]:
    body, _ = metrics.render()
    return {
        family.name: [(s.name, dict(s.labels), s.value) for s in family.samples]
        for family in text_string_to_metric_families(body.decode())
    }


def test_every_family_renders_with_its_labels() -> None:
    model, version = "render-test", "3"
    metrics.REQUEST_SECONDS.labels(model, version, "grpc_v2").observe(0.02)
    for histogram in (metrics.QUEUE_SECONDS, metrics.PREPROCESS_SECONDS, metrics.COMPUTE_SECONDS):
        histogram.labels(model, version).observe(0.001)
    metrics.BATCH_SIZE.labels(model, version).observe(5)
    metrics.REQUESTS.labels(model, version, "http_v2", metrics.outcome_for(errors.QueueFull("full"))).inc()
    metrics.QUEUE_DEPTH.labels(model, version).set(2)
    metrics.MODEL_READY.labels(model, version).set(1)

    _, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    families = _families()
    expected = {
        "inference_request_duration_seconds": {"model": model, "version": version, "protocol": "grpc_v2"},
        "inference_queue_duration_seconds": {"model": model, "version": version},
        "inference_preprocess_duration_seconds": {"model": model, "version": version},
        "inference_compute_duration_seconds": {"model": model, "version": version},
        "inference_batch_size": {"model": model, "version": version},
        "inference_requests": {"model": model, "version": version, "protocol": "http_v2", "outcome": "rejected"},
        "inference_queue_depth": {"model": model, "version": version},
        "inference_model_ready": {"model": model, "version": version},
    }
    for name, labels in expected.items():
        samples = [s for s in families[name] if all(s[1].get(k) == v for k, v in labels.items())]
        assert samples, f"{name} has no sample labelled {labels}"
        assert {k for k in samples[0][1] if k not in ("le", "quantile")} == set(labels)
    assert "inference_gpu_memory_bytes" in families
    buckets = {s[1]["le"]: s[2] for s in families["inference_batch_size"] if s[0].endswith("_bucket")}
    assert buckets["4.0"] == 0 and buckets["8.0"] == 1


@pytest.mark.parametrize(
    ("exc", "outcome"),
    [
        (None, "success"),
        (errors.InvalidInput("bad"), "invalid"),
        (errors.PayloadTooLarge("big"), "invalid"),
        (errors.Unauthorized("who"), "invalid"),
        (errors.ModelNotFound("nope"), "not_found"),
        (errors.ModelNotReady("later"), "unavailable"),
        (errors.ShuttingDown("bye"), "unavailable"),
        (errors.QueueFull("full"), "rejected"),
        (errors.DeadlineExceeded("late"), "timeout"),
        (TimeoutError(), "timeout"),
        (asyncio.CancelledError(), "cancelled"),
        (errors.ServiceError("internal"), "error"),
        (RuntimeError("bug"), "error"),
    ],
)
def test_outcome_for(exc: BaseException | None, outcome: str) -> None:
    assert metrics.outcome_for(exc) == outcome
    assert outcome in metrics.OUTCOMES


def test_forget_model_drops_its_gauges() -> None:
    metrics.QUEUE_DEPTH.labels("forget-me", "1").set(3)
    metrics.MODEL_READY.labels("forget-me", "1").set(1)
    metrics.forget_model("forget-me", "1")
    metrics.forget_model("forget-me", "1")  # twice, and never-seen versions, are fine
    families = _families()
    for name in ("inference_queue_depth", "inference_model_ready"):
        assert all(s[1].get("model") != "forget-me" for s in families[name])


def test_gpu_memory_only_from_an_already_imported_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)
    metrics.update_gpu_memory()  # no torch: nothing happens, nothing is imported
    fake_cuda = types.SimpleNamespace(is_available=lambda: True, device_count=lambda: 1, memory_reserved=lambda i: 4096)
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(cuda=fake_cuda))
    try:
        metrics.update_gpu_memory()
        assert metrics.REGISTRY.get_sample_value("inference_gpu_memory_bytes", {"device": "cuda:0"}) == 4096
    finally:
        metrics.GPU_MEMORY_BYTES.remove("cuda:0")


def test_a_scrape_while_torch_is_being_imported_reports_no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first explanation imports torch in a thread; a scrape meanwhile finds it in sys.modules without its
    attributes (a partially initialized module) and must still answer (it failed with a 500 before)."""
    monkeypatch.setitem(sys.modules, "torch", types.ModuleType("torch"))
    body, _ = metrics.render()
    assert b"inference_request_duration_seconds" in body
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(cuda=types.ModuleType("torch.cuda")))
    metrics.update_gpu_memory()  # torch.cuda half made: nothing reported, nothing raised
