"""The ceiling: the backends the server runs, called directly on preprocessed batches (no server).

    sampler = RawSampler(package_dir, jpegs, backends=("onnxruntime", "torchscript"), duration_s=3.0)
    sampler.sample()                # decode+preprocess alone, then each backend at batch 1 and 8
    sampler.summary()               # median of the rounds taken so far

The backends are ``service.backends``' own classes with the server's defaults, so the numbers
are what the server's batcher calls cost.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from service.manifest import Preprocess, load_manifest
from service.preprocess import preprocess_bytes


@dataclass(frozen=True)
class Timing:
    """Repeated calls of one function: per-call milliseconds and items per second."""

    name: str
    batch: int
    calls: int
    p50_ms: float
    p95_ms: float
    mean_ms: float
    items_per_second: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def repeat(name: str, call: Callable[[int], object], *, batch: int, duration_s: float, min_calls: int = 5) -> Timing:
    """Call ``call(i)`` for ``duration_s`` (at least ``min_calls`` times, at most 100,000) after one warm-up."""
    call(0)
    times: list[float] = []
    end = time.perf_counter() + duration_s
    while (time.perf_counter() < end or len(times) < min_calls) and len(times) < 100_000:
        start = time.perf_counter()
        call(len(times))
        times.append(time.perf_counter() - start)
    ms = np.asarray(times) * 1000.0
    return Timing(
        name=name,
        batch=batch,
        calls=len(times),
        p50_ms=float(np.percentile(ms, 50)),
        p95_ms=float(np.percentile(ms, 95)),
        mean_ms=float(ms.mean()),
        items_per_second=batch * len(times) / float(np.sum(times)),
    )


def time_preprocess(images: list[bytes], spec: Preprocess, *, duration_s: float) -> Timing:
    """``service.preprocess.preprocess_bytes`` (decode, resize, crop, normalize) per JPEG, one thread."""
    return repeat(
        "decode+preprocess", lambda i: preprocess_bytes(images[i % len(images)], spec), batch=1, duration_s=duration_s
    )


def preprocessed_batch(images: list[bytes], spec: Preprocess, size: int) -> np.ndarray:
    """``size`` real images, preprocessed as the server does, stacked into one float32 batch."""
    return np.stack([preprocess_bytes(images[i % len(images)], spec) for i in range(size)])


class HalfTorchScript:
    """The package's TorchScript module cast to FP16 (CUDA): what FP16 would buy; the server computes in FP32."""

    name = "torchscript-fp16"

    def __init__(self, path: Path, *, device: str) -> None:
        import torch

        self._device = torch.device(device)
        self._module = torch.jit.load(str(path), map_location=self._device).half().eval()  # type: ignore[no-untyped-call]

    def run(self, batch: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            logits = self._module(torch.from_numpy(batch).to(self._device).half())
        return np.asarray(logits.float().cpu().numpy())


def load(backend: str, package_dir: Path, *, device: str = "cpu") -> Any:
    """The server's backend object for ``package_dir`` ("onnxruntime", "torchscript"), or "torchscript-fp16"."""
    from service.backends import load_backend

    manifest = load_manifest(package_dir)
    if backend == HalfTorchScript.name:
        return HalfTorchScript(package_dir / manifest.formats["torchscript"], device=device)
    return load_backend(package_dir, manifest, requested=backend, device=device)


def time_backend(backend: Any, batch: np.ndarray, *, name: str, duration_s: float) -> Timing:
    """``backend.run`` on one batch, repeatedly."""
    return repeat(name, lambda _: backend.run(batch), batch=int(batch.shape[0]), duration_s=duration_s)


class RawSampler:
    """The backends loaded once, timed in rounds that the serving sweep interleaves with its points.

    A busy machine changes speed from minute to minute; rounds spread over the sweep, and their
    median, keep "served / raw" a comparison of the same minutes.
    """

    def __init__(
        self,
        package_dir: Path,
        images: list[bytes],
        *,
        backends: tuple[str, ...],
        batch_sizes: tuple[int, ...] = (1, 8),
        duration_s: float,
        device: str = "cpu",
    ) -> None:
        self.spec = load_manifest(package_dir).preprocess
        self.images = images
        self.duration_s = duration_s
        self.backends = {name: load(name, package_dir, device=device) for name in backends}
        self.batches = {size: preprocessed_batch(images, self.spec, size) for size in batch_sizes}
        self.rounds: list[list[Timing]] = []

    def sample(self) -> list[Timing]:
        """One round: decode+preprocess, then each backend at each batch size, one after the other."""
        found = [time_preprocess(self.images, self.spec, duration_s=max(self.duration_s / 2, 0.2))]
        for name, backend in self.backends.items():
            for batch in self.batches.values():
                found.append(time_backend(backend, batch, name=name, duration_s=self.duration_s))
        self.rounds.append(found)
        return found

    def throughput(self, backend: str, batch: int, duration_s: float) -> float:
        """Items per second of ``backend`` on this sampler's ``batch``-image batch, called for ``duration_s``."""
        found = time_backend(self.backends[backend], self.batches[batch], name=backend, duration_s=duration_s)
        return found.items_per_second

    def jpeg_step(self, backend: str, index: int) -> tuple[float, float]:
        """Decode and preprocess image ``index``, then run ``backend`` on it at batch 1: (seconds, seconds)."""
        started = time.perf_counter()
        batch = preprocess_bytes(self.images[index % len(self.images)], self.spec)[np.newaxis]
        decoded = time.perf_counter()
        self.backends[backend].run(batch)
        return decoded - started, time.perf_counter() - decoded

    def summary(self) -> dict[str, Any]:
        """Median of the rounds per (name, batch); every round kept too."""
        merged = [median_timing([r[i] for r in self.rounds]) for i in range(len(self.rounds[0]))]
        return {
            "preprocess": merged[0].to_dict(),
            "backends": [t.to_dict() for t in merged[1:]],
            "rounds": [[t.to_dict() for t in r] for r in self.rounds],
        }


def median_timing(timings: list[Timing]) -> Timing:
    def med(values: list[float]) -> float:
        return float(np.median(values))

    first = timings[0]
    return Timing(
        name=first.name,
        batch=first.batch,
        calls=sum(t.calls for t in timings),
        p50_ms=med([t.p50_ms for t in timings]),
        p95_ms=med([t.p95_ms for t in timings]),
        mean_ms=med([t.mean_ms for t in timings]),
        items_per_second=med([t.items_per_second for t in timings]),
    )
