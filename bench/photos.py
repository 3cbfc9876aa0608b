"""Payloads and the host's decode ceiling: phone-size JPEGs made from the demo photos, and how fast both
cores can decode and preprocess a payload class with no model at all.

    paths = phone_photos(DEMO_JPEGS, cache=work / "phone", count=6)          # 4032x3024, quality 90, cached
    with DecodeCeiling(package_dir, {"small": small_paths, "phone": paths}, workers=2) as ceiling:
        ceiling.window("phone", seconds=3.0)     # {"images_per_second": ..., "p50_ms": ...}
"""

from __future__ import annotations

import io
import logging
import multiprocessing
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

PHONE_SIZE = (4032, 3024)  # 12 MP, 4:3: what a phone camera writes
PHONE_QUALITY = 90
SENSOR_NOISE = 6.0  # std of the grain added after upscaling: a smooth upscale compresses to a third of a real photo


def phone_photo(
    source: Path, *, size: tuple[int, int] = PHONE_SIZE, quality: int = PHONE_QUALITY, seed: int = 0
) -> bytes:
    """``source`` upscaled to ``size`` (bicubic), with a little grain so it weighs what a phone's JPEG does."""
    with Image.open(source) as image:
        big = image.convert("RGB").resize(size, Image.Resampling.BICUBIC)
    grain = np.random.default_rng(seed).normal(0.0, SENSOR_NOISE, (size[1], size[0], 3))
    pixels = np.clip(np.asarray(big, dtype=np.float32) + grain, 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=quality)
    return out.getvalue()


def phone_photos(sources: list[Path], *, cache: Path, count: int) -> list[Path]:
    """``count`` phone-size JPEGs made from ``sources`` (spread over them), written once into ``cache``."""
    cache.mkdir(parents=True, exist_ok=True)
    step = max(len(sources) // max(count, 1), 1)
    made = []
    for k, source in enumerate(sources[::step][:count]):
        target = cache / f"phone-{k}-{source.stem}.jpg"
        if not target.is_file():
            partial = target.with_suffix(".part")
            partial.write_bytes(phone_photo(source, seed=k))
            partial.rename(target)
        made.append(target)
    logger.info("%d phone-size JPEGs in %s (%.1f MB each on average)", len(made), cache, _mean_mb(made))
    return made


def _mean_mb(paths: list[Path]) -> float:
    return statistics.fmean(p.stat().st_size for p in paths) / 1e6 if paths else 0.0


# ---- the decode-and-preprocess ceiling: worker processes, one per core -----------------------------
_PAYLOADS: dict[str, list[bytes]] = {}
_SPEC: Any = None


def _init_worker(package_dir: str, payloads: dict[str, list[str]]) -> None:
    global _SPEC
    from service.manifest import load_manifest

    _SPEC = load_manifest(Path(package_dir)).preprocess
    _PAYLOADS.update({kind: [Path(p).read_bytes() for p in paths] for kind, paths in payloads.items()})


def _decode_for(kind: str, seconds: float) -> list[float]:
    """Decode and preprocess ``kind``'s images round robin for ``seconds``: each one's seconds."""
    from service.preprocess import preprocess_bytes

    images, times = _PAYLOADS[kind], list[float]()
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        started = time.perf_counter()
        preprocess_bytes(images[len(times) % len(images)], _SPEC)
        times.append(time.perf_counter() - started)
    return times


class DecodeCeiling:
    """``workers`` processes running :func:`service.preprocess.preprocess_bytes` flat out: the host's ceiling.

    No model, no server, no network: what the CPUs can decode and preprocess, against which a
    server's img/s on the same payload is judged. Processes, not threads, so nothing shares a GIL.
    """

    def __init__(self, package_dir: Path, payloads: dict[str, list[Path]], *, workers: int = 2) -> None:
        self.workers = workers
        self._pool = ProcessPoolExecutor(
            max_workers=workers,
            mp_context=multiprocessing.get_context("spawn"),  # not fork: this process runs engine thread pools
            initializer=_init_worker,
            initargs=(str(package_dir), {kind: [str(p) for p in paths] for kind, paths in payloads.items()}),
        )
        for kind in payloads:  # start the workers and pay the first decode before anything is timed
            self.window(kind, seconds=0.2)

    def window(self, kind: str, *, seconds: float) -> dict[str, float]:
        """Every worker decoding ``kind`` for ``seconds`` at once: images/s in all, and one image's p50 ms."""
        started = time.perf_counter()
        jobs = [self._pool.submit(_decode_for, kind, seconds) for _ in range(self.workers)]
        times = [t for job in jobs for t in job.result()]
        elapsed = time.perf_counter() - started
        return {
            "images_per_second": len(times) / elapsed if elapsed > 0 else 0.0,
            "p50_ms": 1000.0 * statistics.median(times) if times else float("nan"),
            "images": float(len(times)),
        }

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> DecodeCeiling:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()
