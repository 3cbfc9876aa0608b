"""The protocol-neutral data plane: health, metadata and inference, shared by every adapter.

It imports neither the web framework nor grpc. Images are decoded and preprocessed in a thread
pool, beside the model's compute, then queued to the model version's dynamic batcher.

    plane = DataPlane(repository, settings)
    response = await plane.infer(InferRequest(model="demo", inputs=[InferInput("image", "BYTES", [1], [jpeg])]))
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from service import metrics, rules
from service.admission import Admission, Decoding, Ewma, Load, WaitEstimate, image_count
from service.errors import DeadlineExceeded, Forbidden, InvalidInput, ServiceError, ShuttingDown, Unauthorized
from service.explain import Explainer, cam_file, label_index
from service.manifest import Manifest, Preprocess
from service.model_summary import manifest_summary
from service.preprocess import allow_pixels, preprocess_bytes
from service.registry import PLATFORMS
from service.repository import READY, ModelEntry, ModelRepository
from service.settings import Settings
from service.types import (
    InferInput,
    InferOutput,
    InferRequest,
    InferResponse,
    ModelMetadata,
    ModelStatus,
    RequestedOutput,
    ServerMetadata,
    TensorMetadata,
)

SERVER_NAME = "imgclf"
SERVER_VERSION = "0.1.0"
EXTENSIONS = ["classification", "binary_tensor_data", "model_repository", "schedule_policy"]
IMAGE_INPUT = "image"
OUTPUT_NAMES = ("logits", "probabilities")


class DataPlane:
    """Health, metadata and inference over a :class:`ModelRepository`."""

    def __init__(self, repository: ModelRepository, settings: Settings) -> None:
        self.repository = repository
        self.settings = settings
        allow_pixels(settings.max_image_pixels)
        self._decode_pool = ThreadPoolExecutor(max_workers=settings.decode_workers, thread_name_prefix="decode")
        self._draining = False
        self._leaving = False  # SIGTERM's grace period: not ready, still serving
        self._decoding = Decoding()  # images being decoded and decode time, per model version
        self._admission = Admission(
            max_queue_size=settings.max_queue_size, max_queue_wait_s=settings.max_queue_wait_ms / 1000
        )
        self._explainer = Explainer()  # loads torch and a package's cam.pt on the first explanation only

    # ---- health and metadata -------------------------------------------------------------------
    async def live(self) -> bool:
        return True

    async def ready(self) -> bool:
        """Ready when not draining or leaving and at least one model version is ready to serve."""
        return not (self._draining or self._leaving) and self.repository.any_ready()

    def begin_leaving(self) -> None:
        """Report not ready from now on (load balancers stop sending) while still answering requests."""
        self._leaving = True

    def server_metadata(self) -> ServerMetadata:
        return ServerMetadata(SERVER_NAME, SERVER_VERSION, list(EXTENSIONS))

    async def model_ready(self, name: str, version: str | None = None) -> bool:
        entries = self.repository.versions(name)
        return any(e.state == READY and (version is None or e.version == version) for e in entries)

    async def model_metadata(self, name: str, version: str | None = None) -> ModelMetadata:
        entries = self.repository.versions(name)
        chosen = self._pick_for_metadata(name, entries, version)
        manifest = chosen.manifest
        backend = chosen.backend
        platform = PLATFORMS.get(backend.name, "") if backend is not None else ""
        return ModelMetadata(
            name=name,
            versions=[e.version for e in entries] if version is None else [chosen.version],
            platform=platform,
            inputs=_input_metadata(manifest),
            outputs=_output_metadata(manifest),
            ready=chosen.state == READY,
            reason=chosen.reason,
            labels=list(manifest.labels) if manifest is not None else [],
            precision=backend.precision if backend is not None else "",
            precision_notes=chosen.choice,
            task=manifest.task if manifest is not None else "",
            thresholds=list(manifest.thresholds) if manifest is not None else [],
            default_version=self.repository.default_version(name) or "",
            pinned_version=self.repository.pinned_version(name) or "",
            version_states=[e.status() for e in entries],
            **manifest_summary(manifest),
        )

    def _pick_for_metadata(self, name: str, entries: list[ModelEntry], version: str | None) -> ModelEntry:
        if version is not None:
            for entry in entries:
                if entry.version == version:
                    return entry
            from service.errors import ModelNotFound

            raise ModelNotFound(f"model '{name}' has no version '{version}'")
        default = self.repository.default_version(name)
        return next((e for e in entries if e.version == default), entries[-1])

    # ---- inference ---------------------------------------------------------------------------
    async def infer(self, request: InferRequest) -> InferResponse:
        """Run one request; raises a ServiceError subclass naming what was wrong with it."""
        start = time.perf_counter()
        version = request.version or ""
        try:
            self._check_accepting()
            entry = self.repository.get(request.model, request.version)
            version = entry.version
            assert entry.manifest is not None and entry.batcher is not None
            _check_request(request, entry.manifest)
            batch = await self._admit(entry, request)
            _check_deadline(request.deadline)
            logits = await entry.batcher.submit(batch, deadline=request.deadline)
            outputs = _make_outputs(logits, entry.manifest, request.outputs)
        except BaseException as exc:
            metrics.REQUESTS.labels(request.model, version, request.protocol, metrics.outcome_for(exc)).inc()
            raise
        metrics.REQUESTS.labels(request.model, version, request.protocol, "success").inc()
        metrics.REQUEST_SECONDS.labels(request.model, version, request.protocol).observe(time.perf_counter() - start)
        return InferResponse(model=request.model, version=version, outputs=outputs, id=request.id)

    def _check_accepting(self) -> None:
        if self._draining:
            raise ShuttingDown("the server is shutting down and accepts no new requests")

    def check_admission(
        self, model: str, version: str | None = None, *, deadline: float | None = None, protocol: str = ""
    ) -> None:
        """Refuse at once what ``infer`` would refuse before decoding: draining, unknown or unready model,
        no room (QueueFull, with ``retry_after_s``). Adapters call it before reading a request's body, so a
        flood is refused without paying for its bytes; it reserves nothing (``infer`` checks again)."""
        try:
            self._check_accepting()
            entry = self.repository.get(model, version)
            self._check_room(entry, deadline)
        except ServiceError as exc:
            metrics.REQUESTS.labels(model, version or "", protocol, metrics.outcome_for(exc)).inc()
            raise

    def _check_room(self, entry: ModelEntry, deadline: float | None) -> None:
        """The admission rule (service.admission): QueueFull unless the model version could answer the
        request within its budget, judged from the work ahead (being decoded, queued, computing)."""
        assert entry.batcher is not None
        key, batcher, config = (entry.name, entry.version), entry.batcher, entry.batcher.config
        load = Load(
            entry.decoding + batcher.queue_depth,
            self._decoding.images(key),
            batcher.queued_images,
            batcher.computing_images,
        )
        decode_s, workers = self._decoding.timer(key).value, self.settings.decode_workers
        estimate = WaitEstimate(
            batcher.compute_per_image.value, decode_s, workers, config.instances, config.max_batch_size
        )
        self._admission.check(load, estimate, deadline=deadline, label=f"model '{entry.name}' version {entry.version}")

    async def _admit(self, entry: ModelEntry, request: InferRequest) -> np.ndarray:
        """Decode the request's images if the model version has room, else refuse at once (QueueFull).

        Requests being decoded count with those queued in the batcher (against ``max_queue_size`` and in
        the expected wait): otherwise a flood would wait, unbounded, in front of the decode threads.
        """
        self._check_room(entry, request.deadline)
        images = image_count(request.inputs[0].data if len(request.inputs) == 1 else None)
        entry.decoding += 1  # counted ahead of the queue (_check_room); unloading waits for them (_retire)
        try:
            with self._decoding.hold((entry.name, entry.version), images):
                return await self._to_batch(entry, request)
        finally:
            entry.decoding -= 1

    async def _to_batch(self, entry: ModelEntry, request: InferRequest) -> np.ndarray:
        assert entry.manifest is not None
        tensor = request.inputs[0]  # one input, of a name and datatype the model takes: _check_request
        if tensor.datatype == "BYTES":
            return await self._decode_images(entry, tensor)
        return _check_fp32(tensor, entry.manifest)

    async def _decode_images(self, entry: ModelEntry, tensor: InferInput) -> np.ndarray:
        assert entry.manifest is not None and isinstance(tensor.data, list)
        images = tensor.data
        if not images:
            raise InvalidInput(f"input '{tensor.name}': no images")
        if len(images) > self.settings.max_batch_size * 16:
            raise InvalidInput(f"input '{tensor.name}': {len(images)} images is more than one request may carry")
        loop = asyncio.get_running_loop()
        spec, cap = entry.manifest.preprocess, self.settings.max_image_pixels
        start = time.perf_counter()
        timer = self._decoding.timer((entry.name, entry.version))
        decode = functools.partial(_decode_one, spec=spec, max_pixels=cap, name=tensor.name, timer=timer)
        if len(images) == 1:  # the common case: no gather task, and a view instead of np.stack's copy
            batch = (await loop.run_in_executor(self._decode_pool, decode, 0, images[0]))[None]
        else:
            arrays = await asyncio.gather(
                *(loop.run_in_executor(self._decode_pool, decode, i, data) for i, data in enumerate(images))
            )
            batch = np.stack(arrays)
        metrics.PREPROCESS_SECONDS.labels(entry.name, entry.version).observe(time.perf_counter() - start)
        return batch

    async def predict_images(
        self, name: str, version: str | None, images: list[bytes], *, protocol: str, deadline: float | None
    ) -> list[dict[str, float]]:
        """TorchServe-style answers, ``{label: probability}`` best first per image: the top ``default_top_k``
        labels of a multiclass model, the labels a multi-label or binary model gives the image (its most
        probable one where it gives none)."""
        request = InferRequest(
            model=name,
            version=version,
            inputs=[InferInput(IMAGE_INPUT, "BYTES", [len(images)], images)],
            outputs=[RequestedOutput("probabilities")],
            deadline=deadline,
            protocol=protocol,
        )
        response = await self.infer(request)
        probs = np.asarray(response.outputs[0].data)
        # the version that answered, even if it is draining now (get() would refuse it)
        served = next(e for e in self.repository.versions(name) if e.version == response.version)
        task = served.manifest.head  # type: ignore[union-attr]
        return task.answers(probs, self.settings.default_top_k)

    async def explain(self, name: str, version: str | None, image: bytes, label: str | None = None) -> np.ndarray:
        """Grad-CAM heatmap (H, W) in [0, 1] of ``label`` (default: the image's first answer, e.g. its predicted
        class), at the model's input size.

        InvalidInput when the package carries no Grad-CAM module; computed in a thread, beside the batcher.
        """
        self._check_accepting()
        entry = self.repository.get(name, version)
        assert entry.manifest is not None
        cam_file(entry.manifest)  # refuse before decoding
        label_index(entry.manifest, label)
        loop = asyncio.get_running_loop()
        spec, cap = entry.manifest.preprocess, self.settings.max_image_pixels
        decode = functools.partial(_decode_one, spec=spec, max_pixels=cap, name="image")
        array = await loop.run_in_executor(self._decode_pool, decode, 0, image)
        heatmaps = await asyncio.to_thread(self._explainer.explain, entry.path, entry.manifest, array[None], label)
        heatmap: np.ndarray = heatmaps[0]
        return heatmap

    # ---- tokens and management -------------------------------------------------------------------
    def check_inference_token(self, token: str | None) -> None:
        expected = self.settings.inference_token
        if expected and not _same(token, expected):
            raise Unauthorized("missing or wrong inference token (Authorization: Bearer <token>)")

    def check_management_token(self, token: str | None) -> None:
        if not self.settings.enable_management:
            raise Forbidden("the model management API is disabled on this server (enable_management)")
        if not _same(token, self.settings.management_token):
            raise Unauthorized("missing or wrong management token (Authorization: Bearer <token>)")

    async def repository_index(self) -> list[ModelStatus]:
        return self.repository.index()

    async def load_model(self, name: str) -> None:
        self._check_explicit_control("load")
        await self.repository.load_model(name)

    async def unload_model(self, name: str) -> None:
        self._check_explicit_control("unload")
        await self.repository.unload_model(name)

    async def set_default_version(self, name: str, version: str | None) -> dict[str, str]:
        """Pin the version unversioned requests get (READY only); None: the newest READY one again."""
        self.repository.pin_default(name, version)
        return {
            "name": name,
            "default_version": self.repository.default_version(name) or "",
            "pinned_version": self.repository.pinned_version(name) or "",
        }

    def _check_explicit_control(self, action: str) -> None:
        if self.settings.model_control == "poll":
            raise InvalidInput(
                f"cannot {action} models with model_control=poll: the store decides; publish or remove version folders"
            )

    async def shutdown(self, *, timeout: float) -> None:
        """Refuse new requests, finish everything accepted, release the models and threads."""
        self._draining = True
        await self.repository.close(timeout=timeout)
        self._decode_pool.shutdown(wait=True, cancel_futures=False)


def _decode_one(
    index: int, data: bytes, *, spec: Preprocess, max_pixels: int, name: str, timer: Ewma | None = None
) -> np.ndarray:
    start = time.perf_counter()  # timed in the thread: the wait for a decode thread is not decode time
    array = preprocess_bytes(data, spec, max_pixels=max_pixels, source=f"{name}[{index}]")
    if timer is not None:
        timer.observe(time.perf_counter() - start)
    return array


def _same(token: str | None, expected: str) -> bool:
    return token is not None and hmac.compare_digest(token.encode(), expected.encode())


def _check_deadline(deadline: float | None) -> None:
    if deadline is not None and time.monotonic() >= deadline:
        raise DeadlineExceeded("the request's deadline passed before it could be computed")


def _check_request(request: InferRequest, manifest: Manifest) -> None:
    """The request rules (service.rules) on its inputs and requested outputs, before any work is done."""
    rules.check_inputs(request.inputs, image_input=IMAGE_INPUT, tensor_input=manifest.inputs[0].name)
    rules.check_outputs([output.name for output in request.outputs or ()], OUTPUT_NAMES)


def _check_fp32(tensor: InferInput, manifest: Manifest) -> np.ndarray:
    expected = manifest.preprocess.input_shape
    data = tensor.data
    if not isinstance(data, np.ndarray):
        raise InvalidInput(f"input '{tensor.name}': FP32 data must be numeric")
    if data.ndim != 4 or tuple(data.shape[1:]) != expected or data.shape[0] < 1:
        raise InvalidInput(
            f"input '{tensor.name}': shape {list(data.shape)} does not match [N, {', '.join(map(str, expected))}]"
        )
    with np.errstate(over="ignore", invalid="ignore"):
        array = np.ascontiguousarray(data, dtype=np.float32)
    if not np.isfinite(array).all():
        raise InvalidInput(f"input '{tensor.name}': contains NaN or infinity (as float32)")
    return array


def _make_outputs(logits: np.ndarray, manifest: Manifest, requested: list[RequestedOutput] | None) -> list[InferOutput]:
    task = manifest.head
    values = {"logits": logits.astype(np.float32, copy=False), "probabilities": task.probabilities(logits)}
    wanted = requested or [RequestedOutput(name) for name in OUTPUT_NAMES]
    outputs = []
    for item in wanted:  # names checked by _check_request
        if item.classification > 0:
            strings = task.classification(logits, item.classification, of_logits=item.name == "logits")
            columns = task.answer_columns(item.classification)
            outputs.append(InferOutput(item.name, "BYTES", [logits.shape[0], columns], strings, item.parameters))
        else:
            data = values[item.name].astype(np.float32, copy=False)
            outputs.append(InferOutput(item.name, "FP32", list(data.shape), data, item.parameters))
    return outputs


def _input_metadata(manifest: Manifest | None) -> list[TensorMetadata]:
    if manifest is None:
        return []
    fp32 = manifest.inputs[0]
    return [TensorMetadata(IMAGE_INPUT, "BYTES", [-1]), TensorMetadata(fp32.name, "FP32", list(fp32.shape))]


def _output_metadata(manifest: Manifest | None) -> list[TensorMetadata]:
    if manifest is None:
        return []
    return [TensorMetadata(name, "FP32", [-1, manifest.head.width]) for name in OUTPUT_NAMES]


def public_dict(value: Any) -> Any:
    """Dataclass-ish metadata to plain JSON-able values (used by adapters)."""
    from dataclasses import asdict, is_dataclass

    return asdict(value) if is_dataclass(value) and not isinstance(value, type) else value
