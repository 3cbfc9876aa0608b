"""The data plane over a real repository: the tiny package, real backends, real image decoding.

Expected values come from running the exported model files directly (``finetune.export``'s
``run_onnx``/``run_torchscript``) on ``service.preprocess.preprocess_bytes`` output. Tests that change
nothing share one plane (``live``) on a module-long event loop; the others build their own with ``_run``.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import pytest
from PIL import Image

from service import metrics
from service.dataplane import DataPlane
from service.errors import (
    DeadlineExceeded,
    Forbidden,
    InvalidInput,
    ModelNotFound,
    PayloadTooLarge,
    ShuttingDown,
    Unauthorized,
)
from service.preprocess import preprocess_bytes
from service.repository import ModelRepository
from service.settings import Settings
from service.tasks import softmax
from service.types import InferInput, InferRequest, RequestedOutput, TensorMetadata

if TYPE_CHECKING:
    from tests.unit.service.conftest import TinyStore

T = TypeVar("T")
PngFactory = Callable[..., bytes]


def _settings(store: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {"device": "cpu", "max_batch_size": 4, "decode_workers": 2, "drain_timeout_s": 5.0}
    return Settings(model_store=store, **{**values, **overrides})


def _run(settings: Settings, body: Callable[[DataPlane], Awaitable[T]]) -> T:
    """A data plane over the loaded store, shut down (drained) once ``body`` is done."""

    async def main() -> T:
        repository = ModelRepository(settings)
        await repository.load_all()
        plane = DataPlane(repository, settings)
        try:
            return await body(plane)
        finally:
            await plane.shutdown(timeout=5.0)

    return asyncio.run(main())


def _infer(settings: Settings, request: InferRequest) -> Any:
    async def body(plane: DataPlane) -> Any:
        return await plane.infer(request)

    return _run(settings, body)


class LivePlane:
    """A data plane over ``shared_tiny_store`` on an event loop kept for the whole module."""

    def __init__(self, plane: DataPlane, loop: asyncio.AbstractEventLoop, folder: Path) -> None:
        self.plane, self.loop, self.folder = plane, loop, folder

    def infer(self, request: InferRequest) -> Any:
        return self.loop.run_until_complete(self.plane.infer(request))


@pytest.fixture(scope="module")
def live(shared_tiny_store: TinyStore) -> Iterator[LivePlane]:
    """For the tests that change neither the store nor the plane: one load for all of them."""
    settings = _settings(shared_tiny_store.store)
    loop = asyncio.new_event_loop()
    repository = ModelRepository(settings)
    loop.run_until_complete(repository.load_all())
    plane = DataPlane(repository, settings)
    try:
        yield LivePlane(plane, loop, shared_tiny_store.folder)
    finally:
        loop.run_until_complete(plane.shutdown(timeout=5.0))
        loop.run_until_complete(loop.shutdown_default_executor())
        loop.close()


def _exported_logits(folder: Path, backend: str, batch: np.ndarray) -> np.ndarray:
    from finetune.export import run_onnx, run_torchscript

    run = run_onnx if backend == "onnxruntime" else run_torchscript
    return run(folder / ("model.onnx" if backend == "onnxruntime" else "model.pt"), batch)


def _images_request(images: list[bytes], **kwargs: Any) -> InferRequest:
    return InferRequest(model="tiny", inputs=[InferInput("image", "BYTES", [len(images)], images)], **kwargs)


def _fp32_request(data: Any, name: str = "input", **kwargs: Any) -> InferRequest:
    shape = list(np.shape(data))
    return InferRequest(model="tiny", inputs=[InferInput(name, "FP32", shape, data)], **kwargs)


def _requests_counted(outcome: str) -> float:
    labels = {"model": "tiny", "version": "1", "protocol": "http_v2", "outcome": outcome}
    return metrics.REGISTRY.get_sample_value("inference_requests_total", labels) or 0.0


@pytest.mark.parametrize("backend", ["onnxruntime", "torchscript"])
def test_images_give_the_exported_models_logits_and_probabilities(
    tiny_store: TinyStore, png: PngFactory, backend: str
) -> None:
    images = [png(1), png(2, width=64, height=30), png(3, width=32, height=32)]
    request = _images_request(images, id="req-7")
    response = _infer(_settings(tiny_store.store, backend=backend), request)

    batch = np.stack([preprocess_bytes(data, tiny_store.preprocess) for data in images])
    expected = _exported_logits(tiny_store.folder, backend, batch)
    assert (response.model, response.version, response.id) == ("tiny", "1", "req-7")
    assert [(o.name, o.datatype, o.shape) for o in response.outputs] == [
        ("logits", "FP32", [3, 3]),
        ("probabilities", "FP32", [3, 3]),
    ]
    logits, probabilities = (np.asarray(o.data) for o in response.outputs)
    assert logits.dtype == probabilities.dtype == np.float32
    np.testing.assert_allclose(logits, expected, atol=1e-5)
    np.testing.assert_allclose(probabilities, softmax(expected.astype(np.float64)), atol=1e-5)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-6)


def test_fp32_input_skips_preprocessing(live: LivePlane) -> None:
    batch = np.random.default_rng(0).standard_normal((2, 3, 32, 32))  # float64: converted, not refused
    response = live.infer(_fp32_request(batch, outputs=[RequestedOutput("logits")], version="1"))
    assert [o.name for o in response.outputs] == ["logits"]
    expected = _exported_logits(live.folder, "onnxruntime", batch.astype(np.float32))
    np.testing.assert_allclose(np.asarray(response.outputs[0].data), expected, atol=1e-5)


def _nan_batch() -> np.ndarray:
    batch = np.zeros((2, 3, 32, 32), np.float32)
    batch[1, 0, 0, 0] = np.nan
    return batch


def _inf_batch() -> np.ndarray:
    batch = np.zeros((1, 3, 32, 32), np.float32)
    batch[0, 2, 5, 5] = -np.inf
    return batch


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (
            _fp32_request(np.zeros((1, 3, 16, 16), np.float32)),
            r"'input': shape \[1, 3, 16, 16\] does not match \[N, 3, 32, 32\]",
        ),
        (_fp32_request(np.zeros((3, 32, 32), np.float32)), r"shape \[3, 32, 32\] does not match \[N, 3, 32, 32\]"),
        (_fp32_request(np.zeros((0, 3, 32, 32), np.float32)), r"shape \[0, 3, 32, 32\] does not match"),
        (_fp32_request(np.zeros((1, 32, 32, 3), np.float32)), r"shape \[1, 32, 32, 3\] does not match"),
        (_fp32_request(_nan_batch()), "input 'input': contains NaN or infinity"),
        (_fp32_request(_inf_batch()), "input 'input': contains NaN or infinity"),
        (
            InferRequest("tiny", [InferInput("input", "FP32", [1], [b"\x00\x00\x00\x00"])]),
            "input 'input': FP32 data must be numeric",
        ),
        (
            InferRequest("tiny", [InferInput("input", "INT64", [1, 3, 32, 32], np.zeros((1, 3, 32, 32), np.int64))]),
            "input 'input': datatype INT64 not supported; send FP32",
        ),
        (
            InferRequest(
                "tiny",
                [InferInput("image", "BYTES", [1], [b"x"]), InferInput("input", "FP32", [1], np.zeros(1, np.float32))],
            ),
            r"expected exactly one input \('image' BYTES or 'input' FP32\), got 2",
        ),
        (InferRequest("tiny", []), "expected exactly one input .*, got 0"),
        (_images_request([]), "input 'image': no images"),
        (_images_request([b"x"] * 65), "input 'image': 65 images is more than one request may carry"),
        (
            _fp32_request(np.zeros((1, 3, 32, 32), np.float32), outputs=[RequestedOutput("scores")]),
            "unknown output 'scores'; this model has logits, probabilities",
        ),
    ],
    ids=[
        "fp32-small",
        "fp32-3d",
        "fp32-empty-batch",
        "fp32-nhwc",
        "nan",
        "inf",
        "fp32-not-numeric",
        "int64",
        "two-inputs",
        "no-inputs",
        "no-images",
        "too-many-images",
        "unknown-output",
    ],
)
def test_malformed_requests_are_invalid_input_naming_the_problem(
    live: LivePlane, request_: InferRequest, message: str
) -> None:
    before = _requests_counted("invalid")
    with pytest.raises(InvalidInput, match=message) as caught:
        live.infer(request_)
    assert type(caught.value) is InvalidInput
    assert _requests_counted("invalid") == before + 1


def test_classification_answers_score_index_label_strings(live: LivePlane, png: PngFactory) -> None:
    images = [png(4), png(5)]
    outputs = [
        RequestedOutput("probabilities", classification=2),
        RequestedOutput("logits", classification=10),  # more than the 3 classes: clipped
        RequestedOutput("probabilities"),
    ]
    response = live.infer(_images_request(images, outputs=outputs))
    top2, top_all, probs = response.outputs
    assert (top2.datatype, top2.shape, top_all.datatype, top_all.shape) == ("BYTES", [2, 2], "BYTES", [2, 3])
    probabilities = np.asarray(probs.data)
    for row in range(2):
        parsed = [item.decode().split(":") for item in top2.data[row * 2 : row * 2 + 2]]
        order = np.argsort(-probabilities[row], kind="stable")[:2]
        assert [int(index) for _, index, _ in parsed] == list(order)
        assert [label for _, _, label in parsed] == ["abc"[i] for i in order]
        np.testing.assert_allclose([float(score) for score, _, _ in parsed], probabilities[row, order], atol=1e-6)
        labels = [item.decode().split(":")[2] for item in top_all.data[row * 3 : row * 3 + 3]]
        assert sorted(labels) == ["a", "b", "c"]


def test_a_corrupt_image_is_named_by_its_position(live: LivePlane, png: PngFactory) -> None:
    truncated = png(7)[:60]
    for images, name in (([png(6), b"definitely not an image"], r"image\[1\]"), ([truncated, png(6)], r"image\[0\]")):
        with pytest.raises(InvalidInput, match=name) as caught:
            live.infer(_images_request(images))
        other = r"image\[0\]" if name == r"image\[1\]" else r"image\[1\]"
        assert not re.search(other, caught.value.message)


def test_an_image_over_the_pixel_cap_is_payload_too_large(tiny_store: TinyStore, png: PngFactory) -> None:
    with pytest.raises(PayloadTooLarge, match=r"image\[0\]: 40x48 pixels is over the limit of 1000"):
        _infer(_settings(tiny_store.store, max_image_pixels=1000), _images_request([png(8)]))


def test_a_pixel_cap_above_pillows_limit_decodes_what_it_allows(
    tiny_store: TinyStore, png: PngFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # under the 40x48 test image; Pillow would refuse it
    result = _infer(_settings(tiny_store.store, max_image_pixels=5000), _images_request([png(8)]))
    assert result.outputs[0].shape[0] == 1 and Image.MAX_IMAGE_PIXELS == 5000


@pytest.mark.parametrize("kind", ["bytes", "fp32"])
def test_a_deadline_already_passed_is_deadline_exceeded(live: LivePlane, png: PngFactory, kind: str) -> None:
    deadline = time.monotonic() - 0.001
    request = (
        _images_request([png(9)], deadline=deadline)
        if kind == "bytes"
        else _fp32_request(np.zeros((1, 3, 32, 32), np.float32), deadline=deadline)
    )
    before = _requests_counted("timeout")
    with pytest.raises(DeadlineExceeded, match="deadline passed"):
        live.infer(request)
    assert _requests_counted("timeout") == before + 1


def test_a_generous_deadline_is_met(live: LivePlane, png: PngFactory) -> None:
    response = live.infer(_images_request([png(9)], deadline=time.monotonic() + 30))
    assert response.outputs[0].shape == [1, 3]


@pytest.mark.parametrize(("top_k", "expected_labels"), [(2, 2), (5, 3)])
def test_predict_images_answers_top_k_labels_best_first(
    tiny_store: TinyStore, png: PngFactory, top_k: int, expected_labels: int
) -> None:
    images = [png(10), png(11)]

    async def body(plane: DataPlane) -> tuple[list[dict[str, float]], np.ndarray]:
        answers = await plane.predict_images("tiny", None, images, protocol="http_torchserve", deadline=None)
        response = await plane.infer(_images_request(images, outputs=[RequestedOutput("probabilities")]))
        return answers, np.asarray(response.outputs[0].data)

    answers, probabilities = _run(_settings(tiny_store.store, default_top_k=top_k), body)
    assert len(answers) == 2
    for answer, row in zip(answers, probabilities, strict=True):
        assert len(answer) == expected_labels
        scores = list(answer.values())
        assert scores == sorted(scores, reverse=True)
        order = np.argsort(-row, kind="stable")[:expected_labels]
        assert list(answer) == ["abc"[i] for i in order]
        np.testing.assert_allclose(scores, row[order], atol=1e-6)


def test_inference_token() -> None:
    open_plane = DataPlane(ModelRepository(Settings()), Settings(decode_workers=1))
    for token in (None, "", "anything"):
        open_plane.check_inference_token(token)
    guarded = DataPlane(ModelRepository(Settings()), Settings(inference_token="s3cret", decode_workers=1))
    guarded.check_inference_token("s3cret")
    for token in (None, "", "wrong", "s3cret ", "s3cre"):
        with pytest.raises(Unauthorized, match="missing or wrong inference token"):
            guarded.check_inference_token(token)
    for plane in (open_plane, guarded):
        asyncio.run(plane.shutdown(timeout=1.0))


def test_management_token() -> None:
    disabled = DataPlane(ModelRepository(Settings()), Settings(decode_workers=1))
    for token in (None, "", "anything"):
        with pytest.raises(Forbidden, match="management API is disabled"):
            disabled.check_management_token(token)
    settings = Settings(enable_management=True, management_token="adm", decode_workers=1)
    enabled = DataPlane(ModelRepository(settings), settings)
    enabled.check_management_token("adm")
    for token in (None, "", "wrong", "ADM"):
        with pytest.raises(Unauthorized, match="missing or wrong management token"):
            enabled.check_management_token(token)
    for plane in (disabled, enabled):
        asyncio.run(plane.shutdown(timeout=1.0))


def test_shutdown_refuses_new_requests(tiny_store: TinyStore, png: PngFactory) -> None:
    async def main() -> None:
        settings = _settings(tiny_store.store)
        repository = ModelRepository(settings)
        await repository.load_all()
        plane = DataPlane(repository, settings)
        assert await plane.live() and await plane.ready()
        await plane.shutdown(timeout=5.0)
        assert await plane.live() and not await plane.ready()
        with pytest.raises(ShuttingDown, match="shutting down"):
            await plane.infer(_images_request([png(12)]))
        with pytest.raises(ShuttingDown):
            await plane.predict_images("tiny", None, [png(12)], protocol="grpc_torchserve", deadline=None)

    asyncio.run(main())


def test_unknown_models_and_versions_are_not_found(tiny_store: TinyStore, png: PngFactory) -> None:
    async def body(plane: DataPlane) -> None:
        for model, version, message in (
            ("nope", None, "model 'nope' not found"),
            ("../x", None, "invalid model name"),
            ("tiny", "2", "model 'tiny' has no version '2'"),
        ):
            request = InferRequest(model, [InferInput("image", "BYTES", [1], [png(13)])], version=version)
            with pytest.raises(ModelNotFound, match=message):
                await plane.infer(request)

    _run(_settings(tiny_store.store), body)


def test_metadata_and_readiness(tiny_store: TinyStore) -> None:
    async def body(plane: DataPlane) -> None:
        server = plane.server_metadata()
        assert (server.name, server.version) == ("imgclf", "0.1.0")
        assert {"classification", "binary_tensor_data", "model_repository"} <= set(server.extensions)
        meta = await plane.model_metadata("tiny")
        assert (meta.name, meta.versions, meta.platform, meta.ready, meta.reason) == (
            "tiny",
            ["1"],
            "pytorch_libtorch",
            True,
            "",
        )
        assert meta.inputs == [
            TensorMetadata("image", "BYTES", [-1]),
            TensorMetadata("input", "FP32", [-1, 3, 32, 32]),
        ]
        assert meta.outputs == [
            TensorMetadata("logits", "FP32", [-1, 3]),
            TensorMetadata("probabilities", "FP32", [-1, 3]),
        ]
        assert meta.labels == ["a", "b", "c"]
        assert (await plane.model_metadata("tiny", "1")).versions == ["1"]
        with pytest.raises(ModelNotFound, match="model 'tiny' has no version '7'"):
            await plane.model_metadata("tiny", "7")
        with pytest.raises(ModelNotFound, match="model 'nope' not found"):
            await plane.model_metadata("nope")
        assert await plane.model_ready("tiny") and await plane.model_ready("tiny", "1")
        assert not await plane.model_ready("tiny", "2")
        with pytest.raises(ModelNotFound):
            await plane.model_ready("nope")

    _run(_settings(tiny_store.store, backend="torchscript"), body)


def test_metadata_of_an_unavailable_version_carries_its_reason(tiny_store: TinyStore) -> None:
    with (tiny_store.folder / "model.onnx").open("ab") as fh:
        fh.write(b"\0")

    async def body(plane: DataPlane) -> None:
        meta = await plane.model_metadata("tiny")
        assert not meta.ready and "sha256" in meta.reason
        assert (meta.platform, meta.inputs, meta.outputs, meta.labels) == ("", [], [], [])
        assert not await plane.model_ready("tiny")
        assert not await plane.ready()

    _run(_settings(tiny_store.store), body)


def test_repository_operations_pass_through(tiny_store: TinyStore, png: PngFactory) -> None:
    async def body(plane: DataPlane) -> None:
        assert [(r.name, r.version, r.state) for r in await plane.repository_index()] == [("tiny", "1", "READY")]
        await plane.unload_model("tiny")
        assert not await plane.ready()
        with pytest.raises(ModelNotFound):
            await plane.infer(_images_request([png(14)]))
        await plane.load_model("tiny")
        assert (await plane.infer(_images_request([png(14)]))).version == "1"

    _run(_settings(tiny_store.store), body)


def test_fp32_values_beyond_float32_range_are_refused(live: LivePlane) -> None:
    request = _fp32_request(np.full((1, 3, 32, 32), 1e39))  # float64, finite, but inf as float32
    with pytest.raises(InvalidInput, match="contains NaN or infinity"):
        live.infer(request)
