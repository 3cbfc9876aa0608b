"""The raw engines at each precision: every (backend, precision) the registry, the package and this CPU allow,
loaded with ``service.backends.open_backend`` and timed on one preprocessed batch, no server.

    engines = RawEngines(package_dir, jpegs, batch_size=8)
    engines.sample(seconds=2.0)                     # one round: every engine, one after the other
    engines.throughput("openvino", "int8", 3.0)     # a paired window's figure, images/s
    engines.summary()                               # medians over the rounds, what was skipped and why
"""

from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import raw
from service import registry
from service.backends import Backend, LoadOptions, installed, open_backend
from service.manifest import Manifest, load_manifest
from service.parity import drift, load_parity
from service.precision import HostFeatures, host_features, run_batched

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Variant:
    """One engine at one precision."""

    backend: str
    precision: str

    @property
    def key(self) -> str:
        """``ov-int8``: the registry's short name and the precision."""
        return f"{registry.backend_spec(self.backend).short}-{self.precision}"


def variants(manifest: Manifest, host: HostFeatures) -> tuple[list[Variant], dict[str, str]]:
    """Every (backend, precision) to time here, fp32 first per backend; and those left out, with why."""
    found, skipped = [], {}
    for spec in registry.BACKENDS.values():
        for precision, fmt in spec.precisions.items():
            variant = Variant(spec.name, precision)
            why = _why_not(manifest, host, variant, fmt)
            if why:
                skipped[variant.key] = why
            else:
                found.append(variant)
    return found, skipped


def _why_not(manifest: Manifest, host: HostFeatures, variant: Variant, fmt: str) -> str:
    if not installed(variant.backend):
        return f"{registry.backend_spec(variant.backend).package} is not installed"
    if fmt not in manifest.formats:
        return f"the package has no {registry.FORMAT_FILES[fmt]}"
    return host.unsupported(variant.precision)


class RawEngines:
    """The engines loaded once in this process; timed in rounds, or a window at a time beside served windows."""

    def __init__(self, package_dir: Path, images: list[bytes], *, batch_size: int = 8) -> None:
        manifest = load_manifest(package_dir)
        chosen, self.skipped = variants(manifest, host_features())
        self.batch = raw.preprocessed_batch(images, manifest.preprocess, batch_size)
        self.engines: dict[str, Backend] = {}
        self.drift: dict[str, float] = {}
        parity = load_parity(package_dir, manifest)
        for variant in chosen:
            path = package_dir / manifest.formats[registry.backend_spec(variant.backend).precisions[variant.precision]]
            try:
                engine = open_backend(variant.backend, path, LoadOptions(precision=variant.precision))
                engine.run(self.batch)  # warm-up; a precision the engine cannot run fails here
            except Exception as exc:  # an engine that cannot load is a finding, not the end of the benchmark
                self.skipped[variant.key] = f"cannot load: {exc}"[:300]
                logger.warning("raw %s: %s", variant.key, self.skipped[variant.key])
                continue
            self.engines[variant.key] = engine
            if parity is not None:
                self.drift[variant.key] = drift(
                    parity.logits, run_batched(engine, parity.inputs), centred=manifest.head.shift_invariant
                )
        self.rounds: list[dict[str, float]] = []

    def throughput(self, backend: str, precision: str, seconds: float) -> float | None:
        """Images/s of one engine on the batch for ``seconds``; None when it is not loaded."""
        key = Variant(backend, precision).key
        if key not in self.engines:
            return None
        return self._time(key, seconds)

    def _time(self, key: str, seconds: float) -> float:
        engine = self.engines[key]
        return raw.time_backend(engine, self.batch, name=key, duration_s=seconds).items_per_second

    def sample(self, seconds: float) -> dict[str, float]:
        """One round: every engine for ``seconds``, one after the other."""
        found = {key: self._time(key, seconds) for key in self.engines}
        for key, value in found.items():
            logger.info("raw %-10s batch %d: %7.1f img/s", key, len(self.batch), value)
        self.rounds.append(found)
        return found

    def summary(self) -> dict[str, Any]:
        """Median images/s per engine over the rounds, every round, the parity drift and what was skipped."""
        medians = {key: statistics.median(r[key] for r in self.rounds) for key in self.engines if self.rounds}
        return {
            "batch": len(self.batch),
            "images_per_second": medians,
            "rounds": self.rounds,
            "drift": self.drift,
            "skipped": self.skipped,
        }
