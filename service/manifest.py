"""The model package contract shared by ``finetune`` (writer) and ``serve`` (reader).

A package is a folder ``model_store/<name>/<version>/`` holding ``manifest.json`` and the
model files it lists (``service.registry.FORMAT_FILES``: ``model.pt`` TorchScript, ``model.onnx``,
the calibrated ``model.int8.onnx``), each with its sha256, and a *parity set*: a few preprocessed
validation images (uint8, before normalization) and the eager fp32 model's logits for them, which
a server runs again at load to prove the precision it chose. Nothing in a package needs
unpickling to serve (``.npy`` files load with ``allow_pickle=False``).

    manifest = load_manifest(Path("model_store/flowers/1"))
    verify_files(Path("model_store/flowers/1"), manifest)
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from service.errors import PackageError
from service.registry import FORMAT_FILES
from service.tasks import Task, make_task

MANIFEST_FILE = "manifest.json"
SCHEMA_VERSION = 1
PARITY_KEYS = ("images", "logits")  # manifest.parity: the parity set's two .npy files
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


@dataclass(frozen=True)
class Preprocess:
    """Eval preprocessing: resize the shorter side, center-crop, scale to [0,1], normalize.

    The one description of preprocessing: fine-tune evaluation, the server and the
    TorchServe handler all build their transform from it (``service.preprocess``).
    """

    resize: int
    crop: int
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    channel_order: str = "RGB"
    layout: str = "NCHW"
    # decode a JPEG at least twice the resize size with libjpeg's DCT scaling (Pillow's draft mode) to
    # no less than the resize size: 3x faster on phone photos; finetune evaluates the same way
    jpeg_draft: bool = False

    def __post_init__(self) -> None:
        if self.crop <= 0 or self.resize < self.crop:
            raise ValueError(f"preprocess needs 0 < crop <= resize, got crop={self.crop} resize={self.resize}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"unknown interpolation {self.interpolation!r}; choose from {INTERPOLATIONS}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError("mean and std need three values each, std > 0")

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one preprocessed image."""
        return (3, self.crop, self.crop)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocess:
        return cls(
            resize=int(data["resize"]),
            crop=int(data["crop"]),
            interpolation=str(data.get("interpolation", "bilinear")),
            mean=_triple(data.get("mean", cls.mean)),
            std=_triple(data.get("std", cls.std)),
            channel_order=str(data.get("channel_order", "RGB")),
            layout=str(data.get("layout", "NCHW")),
            jpeg_draft=bool(data.get("jpeg_draft", False)),
        )


def _triple(values: Any) -> tuple[float, float, float]:
    a, b, c = (float(v) for v in values)
    return (a, b, c)


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output: name, KServe v2 datatype and shape (-1 = dynamic)."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TensorSpec:
        return cls(name=str(data["name"]), datatype=str(data["datatype"]), shape=tuple(int(s) for s in data["shape"]))


@dataclass(frozen=True)
class Manifest:
    """Everything a server needs to serve a package, and what it was made from."""

    name: str
    version: int
    backbone: str
    labels: tuple[str, ...]
    preprocess: Preprocess
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    files: dict[str, str]  # file name -> sha256
    formats: dict[str, str]  # registry format ("torchscript", "onnx", "onnx_int8") -> file name
    task: str = "multiclass"  # service.tasks.TASKS; absent in packages made before there were tasks
    thresholds: tuple[float, ...] = ()  # multilabel: one per label, binary: one; tuned on validation
    parity: dict[str, str] = field(default_factory=dict)  # "images"/"logits" -> .npy file name
    metrics: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    created: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        validate_name(self.name)
        if self.version < 1:
            raise ValueError(f"version must be a positive integer, got {self.version}")
        if not self.labels:
            raise ValueError("a manifest needs at least one label")
        unknown = set(self.formats) - set(FORMAT_FILES)
        if unknown:
            raise ValueError(f"unknown model formats {sorted(unknown)}; known: {sorted(FORMAT_FILES)}")
        if self.parity and set(self.parity) != set(PARITY_KEYS):
            raise ValueError(f"parity needs exactly {list(PARITY_KEYS)}, got {sorted(self.parity)}")
        self.head  # noqa: B018  an unknown task, or thresholds that do not fit it, is an invalid manifest

    @cached_property
    def head(self) -> Task:
        """The task of this model's output (``service.tasks``): how its logits become answers."""
        return make_task(self.task, self.labels, self.thresholds)

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["labels"] = list(self.labels)
        data["thresholds"] = list(self.thresholds)
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        try:
            return cls(
                name=str(data["name"]),
                version=int(data["version"]),
                backbone=str(data["backbone"]),
                labels=tuple(str(x) for x in data["labels"]),
                preprocess=Preprocess.from_dict(data["preprocess"]),
                inputs=tuple(TensorSpec.from_dict(t) for t in data["inputs"]),
                outputs=tuple(TensorSpec.from_dict(t) for t in data["outputs"]),
                files={str(k): str(v) for k, v in data["files"].items()},
                formats={str(k): str(v) for k, v in data["formats"].items()},
                task=str(data.get("task", "multiclass")),
                thresholds=tuple(float(t) for t in data.get("thresholds", ())),
                parity={str(k): str(v) for k, v in data.get("parity", {}).items()},
                metrics=dict(data.get("metrics", {})),
                versions={str(k): str(v) for k, v in data.get("versions", {}).items()},
                created=str(data.get("created", "")),
                extra=dict(data.get("extra", {})),
                schema_version=int(data.get("schema_version", SCHEMA_VERSION)),
            )
        except KeyError as exc:
            raise PackageError(f"invalid manifest: missing field {exc}") from exc
        except (TypeError, ValueError) as exc:
            raise PackageError(f"invalid manifest: {exc}") from exc


def validate_name(name: str) -> str:
    """Model names are plain file names: no path separators, no leading dot."""
    if not _NAME_RE.match(name):
        raise ValueError(f"invalid model name {name!r}: use letters, digits, '_', '-', '.', not starting with '.'")
    return name


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_manifest(package_dir: Path) -> Manifest:
    """Read ``manifest.json`` of a package folder; raises PackageError when missing or invalid."""
    path = package_dir / MANIFEST_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise PackageError(f"{package_dir}: no {MANIFEST_FILE}") from exc
    except (OSError, json.JSONDecodeError) as exc:
        raise PackageError(f"{path}: unreadable manifest: {exc}") from exc
    if not isinstance(data, dict):
        raise PackageError(f"{path}: manifest is not a JSON object")
    return Manifest.from_dict(data)


def verify_files(package_dir: Path, manifest: Manifest) -> None:
    """Check every listed file exists and matches its sha256; raises PackageError otherwise."""
    for file_name, expected in manifest.files.items():
        path = package_dir / file_name
        if Path(file_name).name != file_name or not path.is_file():
            raise PackageError(f"{package_dir}: listed file {file_name!r} is missing")
        actual = sha256_file(path)
        if actual != expected:
            raise PackageError(f"{path}: sha256 {actual[:12]}… does not match manifest {expected[:12]}…")


def package_versions(store: Path, name: str) -> list[int]:
    """Published versions of a model, ascending (folders named by a positive integer)."""
    model_dir = store / validate_name(name)
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit() and int(p.name) > 0)


def next_version(store: Path, name: str) -> int:
    versions = package_versions(store, name)
    return versions[-1] + 1 if versions else 1
