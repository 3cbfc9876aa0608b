"""TorchServe 0.12 handler for imgclf packages (the ``handler`` of the ``.mar`` built by ``finetune.torchserve``).

It does not subclass TorchServe's ``BaseHandler`` (that imports its profiler/ONNX/IPEX switches
at import time) and needs no captum. It reads the package's ``manifest.json`` from the model
dir, preprocesses with :func:`service.preprocess.preprocess_bytes` and runs the model with
:mod:`service.precision`, which chooses and checks the backend and precision as ``serve --precision``
does (``handler.precision`` in the model config, default auto): the very modules the ``serve`` server
uses, shipped inside the archive
under ``service/`` (TorchServe puts the model dir first on the worker's ``PYTHONPATH``).
``model.pt`` loads with ``torch.jit.load`` (nothing is unpickled), ``model.onnx`` with
onnxruntime, which TorchServe's own handlers cannot run.

Each request holds one image: the raw request body (TorchServe calls it ``body``) or one
multipart form field / gRPC ``input`` entry named ``data``. The batch TorchServe hands over runs
as one forward pass. Each answer is ``{label: probability}``, best first, from the package's task
(:mod:`service.tasks`): the top-k of a multiclass model, like TorchServe's image_classifier; the labels
at or above their thresholds of a multi-label model (at most top-k, at least its most probable one);
the decided label of a binary one. A bad image fails only its own request (status 400 and a JSON
``{"code", "type", "message"}`` naming the field), the rest of the batch is answered.

    torch-model-archiver --handler finetune/ts_handler.py ...   # done by finetune.torchserve.build_mar
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from service.backends import Backend, warm_up
from service.errors import InvalidInput, PackageError, ServiceError
from service.manifest import Manifest, load_manifest, sha256_file
from service.precision import select
from service.preprocess import preprocess_bytes
from service.registry import backends_reading, derived_formats
from service.rules import image_field
from service.rules import top_k as answer_count

logger = logging.getLogger(__name__)

DEFAULT_TOP_K = 5
JSON = "application/json"


class ImageClassifier:
    """One TorchServe worker's model: manifest, backend and top-k; ``handle`` answers a batch."""

    def __init__(
        self,
        model_dir: Path,
        *,
        model_file: str,
        device: str = "cpu",
        top_k: int = DEFAULT_TOP_K,
        precision: str = "auto",
        batch_size: int = 8,
    ) -> None:
        self.manifest: Manifest = load_manifest(model_dir)
        fmt = format_of_file(self.manifest, model_file)
        shipped = archived_manifest(model_dir, self.manifest, fmt)
        for name in shipped.formats.values():
            verify_model_file(model_dir, self.manifest, name)
        choice = select(
            model_dir,
            shipped,
            backend=backend_for_format(fmt),
            precision=precision,
            device=device,
            batch_size=batch_size,
        )
        self.backend: Backend = choice.backend
        self.reason = choice.reason
        self.top_k = answer_count(top_k, self.manifest.num_classes)

    @classmethod
    def from_context(cls, context: Any) -> ImageClassifier:
        """Build from TorchServe's context: model dir, the archive's serialized file, GPU and model config."""
        props = context.system_properties
        gpu_id = props.get("gpu_id")
        handler_config = (getattr(context, "model_yaml_config", None) or {}).get("handler") or {}
        batch_size = int(props.get("batch_size") or 1)
        classifier = cls(
            Path(props["model_dir"]),
            model_file=context.manifest["model"]["serializedFile"],
            device="cpu" if gpu_id is None else f"cuda:{int(gpu_id)}",
            top_k=int(handler_config.get("top_k", DEFAULT_TOP_K)),
            precision=str(handler_config.get("precision", "auto")),
            batch_size=batch_size,
        )
        warm_up(classifier.backend, classifier.manifest, batch_sizes=sorted({1, batch_size}))
        logger.info(
            "imgclf handler: %s v%s on %s %s/%s (%s), preprocessing from %s",
            classifier.manifest.name,
            classifier.manifest.version,
            classifier.backend.name,
            classifier.backend.precision,
            classifier.backend.device,
            classifier.reason or "no other candidate",
            inspect.getsourcefile(preprocess_bytes),
        )
        return classifier

    def handle(self, rows: Sequence[Mapping[str, Any]], context: Any) -> list[Any]:
        """One answer per request, in order; a request whose image is bad gets its own error."""
        answers: list[Any] = [None] * len(rows)
        arrays: list[np.ndarray] = []
        good: list[int] = []
        for index, row in enumerate(rows):
            context.set_response_content_type(index, JSON)
            try:
                field, data = image_bytes(row)
                arrays.append(preprocess_bytes(data, self.manifest.preprocess, source=field))
                good.append(index)
            except ServiceError as exc:
                answers[index] = error_answer(exc, context, index)
        if arrays:
            task = self.manifest.head
            for index, answer in zip(
                good, task.answers(task.probabilities(self.backend.run(np.stack(arrays))), self.top_k), strict=True
            ):
                answers[index] = answer
        return answers


def format_of_file(manifest: Manifest, model_file: str) -> str:
    """The registry format of the archive's serialized file."""
    for fmt, file_name in manifest.formats.items():
        if file_name == model_file:
            return fmt
    raise PackageError(f"{model_file!r} is not a model file of {manifest.name} v{manifest.version}: {manifest.formats}")


def backend_for_format(fmt: str) -> str:
    """The backend to ask for: the one that reads ``fmt``, or "auto" (timed) where several do."""
    readers = backends_reading(fmt)
    if not readers:
        raise PackageError(f"no backend reads {fmt} files")
    return readers[0] if len(readers) == 1 else "auto"


def archived_manifest(model_dir: Path, manifest: Manifest, fmt: str) -> Manifest:
    """The manifest as this archive has it: the serialized format and the formats made from it that travelled."""
    formats = {f: manifest.formats[f] for f in (fmt, *derived_formats(fmt)) if f in manifest.formats}
    present = {f: name for f, name in formats.items() if f == fmt or (model_dir / name).is_file()}
    return dataclasses.replace(manifest, formats=present)


def verify_model_file(model_dir: Path, manifest: Manifest, model_file: str) -> None:
    """The archive carries one of the package's model files: it must match the manifest's sha256."""
    expected = manifest.files.get(model_file)
    path = model_dir / model_file
    if expected is None or not path.is_file():
        raise PackageError(f"{model_dir}: model file {model_file!r} is missing or not listed in manifest.json")
    if sha256_file(path) != expected:
        raise PackageError(f"{path}: sha256 does not match manifest.json; rebuild the archive")


def image_bytes(row: Mapping[str, Any]) -> tuple[str, bytes]:
    """(field name, encoded image) of one request: the raw body, or the one field named ``data``
    (:func:`service.rules.image_field`, the rule ``serve`` applies too)."""
    field, value = image_field(row)
    if isinstance(value, bytes | bytearray | memoryview):
        return field, bytes(value)
    raise InvalidInput(
        f"{field}: expected encoded image bytes, got {type(value).__name__} "
        "(TorchServe decodes JSON and text bodies: send the image with an image/* or application/octet-stream type)"
    )


def error_answer(exc: ServiceError, context: Any, index: int) -> dict[str, Any]:
    """Mark request ``index`` as failed with the error's HTTP status; the body names the problem."""
    context.set_response_status(exc.http_status, exc.message, index)
    return {"code": exc.http_status, "type": type(exc).__name__, "message": exc.message}


_classifier: ImageClassifier | None = None


def handle(data: list[Mapping[str, Any]] | None, context: Any) -> list[Any] | None:
    """TorchServe's entry point: called once with ``data=None`` to initialize, then once per batch."""
    global _classifier
    if _classifier is None:
        _classifier = ImageClassifier.from_context(context)
    if data is None:
        return None
    return _classifier.handle(data, context)
