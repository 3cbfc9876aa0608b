"""The one registry of model file formats and backends; every other list is derived from it.

A *format* is a file a package may carry (``model.onnx``); a *backend* is an engine that reads
one or more formats and runs them at one or more precisions. One format may feed several backends
(ONNX Runtime and OpenVINO both read ``model.onnx``), and a precision may need its own file
(``int8`` reads the calibrated ``model.int8.onnx``) or be a runtime choice (``bf16``).

Adding a backend is one module with a ``load(path, options) -> Backend`` function
(see :mod:`service.backends`) and one line in ``BACKENDS`` below. Nothing here imports an engine.

    spec = backend_spec("openvino")
    spec.format_for("int8")          # -> "onnx_int8"
    FORMAT_FILES["onnx_int8"]        # -> "model.int8.onnx"
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType

PRECISIONS = ("fp32", "bf16", "int8")  # fastest last is not implied: the host decides


@dataclass(frozen=True)
class FormatSpec:
    """A model file a package may carry.

    ``exported``: written by finetune's float export (and so a choice of ``--export-formats``);
    the others are derived from an exported file (``onnx_int8`` is calibrated from ``onnx``).
    """

    name: str
    file: str
    exported: bool = True
    derived_from: str = ""


@dataclass(frozen=True)
class BackendSpec:
    """An engine: the formats it reads for each precision, where its loader lives, how metadata names it.

    ``precisions`` maps a precision to the format it runs from. ``platform`` is the KServe/Triton
    metadata value. ``short`` is the benchmark label (``ours-<short>-b8``). ``module`` is imported
    only when the backend is loaded, so an ONNX-only server never imports torch. ``package`` is the
    Python module the loader imports (checked, not imported, to tell whether the backend is installed).
    """

    name: str
    platform: str
    short: str
    module: str
    package: str
    gpu: str  # how it reaches an NVIDIA GPU: "onnxruntime" (its CUDA provider), "torch", or "" (CPU only)
    precisions: MappingProxyType[str, str] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def formats(self) -> tuple[str, ...]:
        """The formats this backend reads, fp32's first."""
        return tuple(dict.fromkeys(self.precisions.values()))

    def format_for(self, precision: str) -> str | None:
        return self.precisions.get(precision)


def _backend(name: str, platform: str, short: str, package: str, gpu: str, **precisions: str) -> BackendSpec:
    """A backend whose loader is the module ``service.backend_<name>``."""
    return BackendSpec(name, platform, short, f"service.backend_{name}", package, gpu, MappingProxyType(precisions))


_FORMATS = (
    FormatSpec("torchscript", "model.pt"),
    FormatSpec("onnx", "model.onnx"),
    FormatSpec("onnx_int8", "model.int8.onnx", exported=False, derived_from="onnx"),
)
_BACKENDS = (  # the order is the rule's preference where nothing is timed (service.backends.choose_backend)
    _backend("onnxruntime", "onnxruntime_onnx", "ort", "onnxruntime", "onnxruntime", fp32="onnx", int8="onnx_int8"),
    _backend("openvino", "openvino_onnx", "ov", "openvino", "", fp32="onnx", bf16="onnx", int8="onnx_int8"),
    _backend("torchscript", "pytorch_libtorch", "ts", "torch", "torch", fp32="torchscript", bf16="torchscript"),
)  # fmt: skip

FORMATS: MappingProxyType[str, FormatSpec] = MappingProxyType({f.name: f for f in _FORMATS})
BACKENDS: MappingProxyType[str, BackendSpec] = MappingProxyType({b.name: b for b in _BACKENDS})

# ---- derived lists: every place that used to keep its own copy reads one of these -----------------
FORMAT_FILES: MappingProxyType[str, str] = MappingProxyType({f.name: f.file for f in _FORMATS})
EXPORT_FORMATS: tuple[str, ...] = tuple(f.name for f in _FORMATS if f.exported)
BACKEND_NAMES: tuple[str, ...] = tuple(BACKENDS)
BACKEND_CHOICES: tuple[str, ...] = ("auto", *BACKEND_NAMES)
PRECISION_CHOICES: tuple[str, ...] = ("auto", *PRECISIONS)
PLATFORMS: MappingProxyType[str, str] = MappingProxyType({b.name: b.platform for b in _BACKENDS})
SHORT_NAMES: MappingProxyType[str, str] = MappingProxyType({b.short: b.name for b in _BACKENDS})


def backend_spec(name: str) -> BackendSpec:
    """The spec of a registered backend; ValueError naming the choices otherwise."""
    try:
        return BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; choose from {', '.join(BACKEND_NAMES)}") from None


def backends_reading(fmt: str) -> tuple[str, ...]:
    """Backends that can run a package's ``fmt`` file at some precision."""
    return tuple(b.name for b in _BACKENDS if fmt in b.formats)


def fp32_format(backend: str) -> str:
    """The float format a backend reads (what it needs from a package at the least)."""
    return BACKENDS[backend].precisions["fp32"]


def derived_formats(fmt: str) -> tuple[str, ...]:
    """Formats made from ``fmt`` after export (``onnx`` -> ``onnx_int8``)."""
    return tuple(f.name for f in _FORMATS if f.derived_from == fmt)
