"""Which backend and precision a model is served at, and the evidence that it may be.

A reduced precision (bf16, int8) is served only with evidence, checked twice:
- at export (``finetune``): accuracy and agreement against fp32 on held-out images, stored in the
  manifest as ``metrics.precisions[<precision>]``; a precision whose verdict there is "fail" is never served;
- at load, on this host: the package's parity set (preprocessed validation images and the eager fp32
  model's logits) is run again; a precision whose confident images disagree, or whose logits drift
  beyond :data:`service.parity.DRIFT_TOLERANCE` of their scale, is refused and the server falls back to fp32.

``--precision auto`` (and ``--backend auto``) load every candidate the package, the settings and
this CPU allow, check each on the parity set, time the survivors on one batch, and keep the fastest.

    choice = select(package_dir, manifest, backend="auto", precision="auto", batch_size=8)
    choice.backend.run(batch); choice.precision; choice.reason
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service import registry
from service.backends import Backend, LoadOptions, _only_torch_reaches_gpu, installed, load_backend, not_installed
from service.errors import PackageError
from service.manifest import Manifest
from service.parity import ParitySet, load_parity, parity_failure

logger = logging.getLogger(__name__)

CPUINFO = Path("/proc/cpuinfo")
CPU_FLAGS = ("amx_tile", "amx_bf16", "amx_int8", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni")
TIMED_RUNS = 3


@dataclass(frozen=True)
class HostFeatures:
    """The CPU's name and the instruction-set flags that decide which reduced precisions pay off."""

    model: str
    flags: frozenset[str]

    @property
    def bf16(self) -> bool:
        return bool({"avx512_bf16", "amx_bf16"} & self.flags)

    @property
    def int8(self) -> bool:
        return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & self.flags)

    def describe(self) -> str:
        present = [flag for flag in CPU_FLAGS if flag in self.flags]
        return f"{self.model or 'unknown CPU'} ({', '.join(present) or 'none of ' + ', '.join(CPU_FLAGS)})"

    def unsupported(self, precision: str) -> str:
        """Why this CPU should not run ``precision`` (empty when it may)."""
        if precision == "bf16" and not self.bf16:
            return "this CPU has no bf16 instructions (AVX512_BF16 or AMX)"
        if precision == "int8" and not self.int8:
            return "this CPU has no int8 dot-product instructions (VNNI or AMX): int8 would be slow and may saturate"
        return ""


@functools.cache
def host_features(cpuinfo: Path = CPUINFO) -> HostFeatures:
    """Read the CPU model and flags from ``/proc/cpuinfo`` (empty where there is none)."""
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return HostFeatures("", frozenset())
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    return HostFeatures(fields.get("model name", ""), frozenset(fields.get("flags", "").split()))


# ---- choosing ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Choice:
    """The backend a model is served with, at which precision, and why.

    ``refused``: precisions that were asked for, or that failed their evidence (the export's guard,
    the parity set), and why: the readiness reason of a model served in a fallback precision.
    ``notes``: those and everything else considered (precisions this package or CPU cannot run,
    the timings), for the log and the model's metadata.
    """

    backend: Backend
    refused: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def precision(self) -> str:
        return self.backend.precision

    @property
    def reason(self) -> str:
        return "; ".join(self.refused)

    @property
    def summary(self) -> str:
        return "; ".join(self.notes)


class _Notes:
    """What :func:`select` considered: every note, and the refusals among them."""

    def __init__(self) -> None:
        self.said: list[str] = []
        self.refused: list[str] = []

    def add(self, text: str, *, refusal: bool = False) -> None:
        self.said.append(text)
        if refusal:
            self.refused.append(text)


@dataclass(frozen=True)
class _Request:
    backend: str
    precisions: tuple[str, ...]
    device: str
    options: LoadOptions


def select(
    package_dir: Path,
    manifest: Manifest,
    *,
    backend: str = "auto",
    precision: str = "auto",
    device: str = "auto",
    options: LoadOptions | None = None,
    batch_size: int = 8,
    host: HostFeatures | None = None,
) -> Choice:
    """Load, check and (when there is a choice) time the candidates; return the fastest that passed.

    A precision that cannot be served (no file, no instructions on this CPU, refused at export or
    on the parity set) is noted and skipped; when nothing reduced survives, fp32 is served and the
    notes say why. fp32 failing its own parity set is a PackageError: the package is broken.
    """
    if precision not in registry.PRECISION_CHOICES:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(registry.PRECISION_CHOICES)}")
    wanted = registry.PRECISIONS if precision == "auto" else (precision,)
    request = _Request(backend, wanted, device, options or LoadOptions())
    parity = load_parity(package_dir, manifest)
    notes = _Notes()
    pairs = _candidates(manifest, request, host or host_features(), notes, parity=parity is not None)
    best = _best(package_dir, manifest, request, pairs, parity, batch_size, notes)
    if best is None and "fp32" not in wanted:  # every reduced precision refused: serve fp32, say why
        fp32 = _Request(backend, ("fp32",), device, request.options)
        best = _best(
            package_dir,
            manifest,
            fp32,
            _candidates(manifest, fp32, host or host_features(), notes, parity=True),
            parity,
            batch_size,
            notes,
        )
    if best is None:
        raise PackageError(f"{manifest.name} v{manifest.version}: nothing could be served: {'; '.join(notes.said)}")
    return Choice(best, tuple(notes.refused), tuple(notes.said))


def _candidates(
    manifest: Manifest, request: _Request, host: HostFeatures, notes: _Notes, *, parity: bool
) -> list[tuple[str, str]]:
    """(backend, precision) pairs to try, precision by precision; what rules a precision out goes to ``notes``.

    A precision asked for by name, or refused by the export's guard, is a refusal; one that ``auto``
    merely cannot use here (no file, no instructions) is a note.
    """
    names = _backends_for(manifest, request)
    explicit = len(request.precisions) == 1
    pairs: list[tuple[str, str]] = []
    for precision in request.precisions:
        why, evidence = _refusal(manifest, precision, request, host, parity=parity)
        serving = [name for name in names if _serves(name, manifest, precision)]
        if not why and not serving:
            why = _missing(manifest, names, precision)
        if why:
            notes.add(f"{precision}: {why}", refusal=explicit or evidence)
            continue
        for name in serving:
            judged = manifest.metrics.get("precisions", {}).get(precision, {}).get("backends", {}).get(name, {})
            if judged.get("verdict") == "fail":
                notes.add(
                    f"{name} {precision}: refused by the export's accuracy guard ({judged.get('summary')})",
                    refusal=True,
                )
            else:
                pairs.append((name, precision))
    return pairs


def _backends_for(manifest: Manifest, request: _Request) -> list[str]:
    """The requested backend, or for "auto" every registered one, TorchScript only where it is needed.

    TorchScript imports torch (hundreds of MiB): "auto" uses it when the package has no ONNX file or
    when only torch reaches this host's GPU, as the rule in :func:`service.backends.choose_backend` does.
    """
    if request.backend != "auto":
        return [request.backend]
    if "onnx" not in manifest.formats or (request.device != "cpu" and _only_torch_reaches_gpu(manifest)):
        return ["torchscript"]
    return [name for name in registry.BACKEND_NAMES if name != "torchscript"]


def _serves(name: str, manifest: Manifest, precision: str) -> bool:
    return registry.backend_spec(name).format_for(precision) in manifest.formats and installed(name)


def _refusal(
    manifest: Manifest, precision: str, request: _Request, host: HostFeatures, *, parity: bool
) -> tuple[str, bool]:
    """Why ``precision`` is out before anything loads, and whether that is the export's evidence."""
    if precision == "fp32":
        return "", False
    verdict = manifest.metrics.get("precisions", {}).get(precision, {})
    if verdict.get("verdict") == "fail":
        return f"refused by the export's accuracy guard ({verdict.get('summary', 'see metrics.precisions')})", True
    if request.device.startswith("cuda"):
        return "reduced precisions are served on the CPU only", False
    if not parity:
        return "the package has no parity set to check it with here (publish it again with this version)", False
    return host.unsupported(precision), False


def _missing(manifest: Manifest, names: list[str], precision: str) -> str:
    """Why no backend of ``names`` serves ``precision``: no such precision, no file, or no engine."""
    formats = {registry.backend_spec(n).format_for(precision) for n in names} - {None}
    if not formats:
        return f"{', '.join(names)} cannot run it"
    present = [fmt for fmt in formats if fmt in manifest.formats]
    if not present:
        files = ", ".join(sorted(registry.FORMAT_FILES[str(fmt)] for fmt in formats))
        hint = " (finetune --int8 true, or finetune quantize PACKAGE)" if precision == "int8" else ""
        return f"the package has no {files}{hint}"
    return "; ".join(not_installed(n) for n in names if registry.backend_spec(n).format_for(precision) in present)


def _best(
    package_dir: Path,
    manifest: Manifest,
    request: _Request,
    pairs: list[tuple[str, str]],
    parity: ParitySet | None,
    batch_size: int,
    notes: _Notes,
) -> Backend | None:
    """Load each pair, check it on the parity set, time it when there is a choice; keep the fastest."""
    best: Backend | None = None
    best_seconds, timings = float("inf"), []
    for name, precision in pairs:
        backend = _checked(package_dir, manifest, request, (name, precision), parity, notes)
        if backend is None:
            continue
        if len(pairs) == 1:
            return backend
        seconds = _time(backend, _timing_batch(manifest, parity, batch_size))
        timings.append(f"{name} {precision} {1000 * seconds / batch_size:.2f}")
        if seconds < best_seconds:
            best, best_seconds = backend, seconds
    if timings:
        notes.add(f"ms/image at batch {batch_size}: {', '.join(timings)}")
    return best


def _checked(
    package_dir: Path,
    manifest: Manifest,
    request: _Request,
    pair: tuple[str, str],
    parity: ParitySet | None,
    notes: _Notes,
) -> Backend | None:
    name, precision = pair
    try:
        backend = load_backend(
            package_dir, manifest, requested=name, precision=precision, device=request.device, options=request.options
        )
    except PackageError as exc:
        if precision == "fp32":
            raise
        notes.add(f"{name} {precision}: {exc}", refusal=True)
        return None
    if parity is None:
        return backend
    try:
        failure = parity_failure(parity.logits, run_batched(backend, parity.inputs), precision, manifest.head)
    except Exception as exc:  # a backend that cannot run its own parity images cannot serve
        failure = f"it cannot run the parity set: {exc}"
    if not failure:
        return backend
    if precision == "fp32":
        raise PackageError(
            f"{manifest.name} v{manifest.version}: {name} fp32 disagrees with the package's parity set: {failure}"
        )
    notes.add(f"{name} {precision} refused: {failure}", refusal=True)
    logger.warning("%s v%s: %s %s refused: %s", manifest.name, manifest.version, name, precision, failure)
    return None


def run_batched(backend: Backend, inputs: np.ndarray, batch_size: int = 8) -> np.ndarray:
    """Logits of ``inputs`` run ``batch_size`` at a time."""
    return np.concatenate([backend.run(inputs[i : i + batch_size]) for i in range(0, len(inputs), batch_size)])


def _timing_batch(manifest: Manifest, parity: ParitySet | None, batch_size: int) -> np.ndarray:
    if parity is not None:
        return parity.inputs[np.arange(batch_size) % len(parity.inputs)]
    return np.zeros((batch_size, *manifest.preprocess.input_shape), dtype=np.float32)


def _time(backend: Backend, batch: np.ndarray) -> float:
    """Seconds for one batch: the best of a few runs after one warm-up."""
    backend.run(batch)
    best = float("inf")
    for _ in range(TIMED_RUNS):
        start = time.perf_counter()
        backend.run(batch)
        best = min(best, time.perf_counter() - start)
    return best
