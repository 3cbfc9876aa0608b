"""Admission by expected wait: refuse at once what could not be answered within its time budget.

A queue bounded only in requests is a long queue when each request costs tens of milliseconds: the
accepted wait seconds while the refused retry. So a model version admits a request only when the
work already ahead of it (images being decoded, queued and computing) and its own batch would let it
be answered within its budget: its deadline, capped by ``max_queue_wait_s``. A request that fits in the
next batch is always admitted, so the model never idles for want of admitted work. The cost of that
work comes from what the server measured, per model version: an EWMA of the per-image compute time of
its batches (from the batcher) and of the per-image decode time. Before any batch was measured (a cold start) only the
length bound (``max_queue_size`` requests waiting) applies; it stays a hard bound throughout.

    estimate = WaitEstimate(compute_s=0.012, decode_s=0.004, decode_workers=4, instances=1, batch_size=8)
    load = Load(waiting_requests=20, decoding_images=4, queued_images=16, computing_images=8)
    admission = Admission(max_queue_size=64, max_queue_wait_s=0.5)
    admission.check(load, estimate, deadline=None, label="model 'demo' version 1")   # raises QueueFull
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from service.errors import QueueFull

EWMA_WEIGHT = 0.2  # weight of the newest sample: follows a change of load within about ten batches
Key = tuple[str, str]  # (model, version)


class Ewma:
    """An exponentially weighted moving average of per-image seconds; ``value`` is None until the first sample."""

    def __init__(self, weight: float = EWMA_WEIGHT) -> None:
        if not 0 < weight <= 1:
            raise ValueError(f"weight must be in (0, 1], got {weight}")
        self.weight = weight
        self.value: float | None = None
        self._lock = threading.Lock()  # decode threads observe concurrently

    def observe(self, seconds: float, images: int = 1) -> None:
        """Fold in ``seconds`` spent on ``images`` images (>= 1); non-finite or negative samples are ignored."""
        if images < 1 or not math.isfinite(seconds) or seconds < 0:
            return
        sample = seconds / images
        with self._lock:
            self.value = sample if self.value is None else self.value + self.weight * (sample - self.value)


@dataclass(frozen=True)
class Load:
    """The work ahead of a new request for one model version."""

    waiting_requests: int  # being decoded or queued: what ``max_queue_size`` bounds
    decoding_images: int = 0
    queued_images: int = 0
    computing_images: int = 0


@dataclass(frozen=True)
class WaitEstimate:
    """Measured per-image costs of one model version (None: not measured yet) and its parallelism."""

    compute_s: float | None
    decode_s: float | None = None
    decode_workers: int = 1
    instances: int = 1
    batch_size: int = 1  # the batcher's max_batch_size, in images

    def wait(self, load: Load) -> float | None:
        """Seconds until a new request's answer; None before any compute was measured.

        Its own decode waits behind the images being decoded (spread over the decode threads). Then, on
        average, half of the batch computing now; then the full batches of the ``k`` images ahead of it
        (decoded before it or queued), spread over the model's instances; then its own batch: the images
        ahead that share it and itself (``k + 1``), a full batch at most.
        """
        if self.compute_s is None:
            return None
        decode = self.decode_s or 0.0
        decode_wait = (load.decoding_images / max(1, self.decode_workers) + 1) * decode
        batch = max(1, self.batch_size)
        ahead = load.decoding_images + load.queued_images
        before = load.computing_images / 2 + ahead // batch * batch
        own = min(batch, ahead + 1)  # a full batch once others are ahead: it may wait for it to fill
        return decode_wait + (before / max(1, self.instances) + own) * self.compute_s


def retry_after_s(wait: float | None) -> int:
    """Whole seconds a refused client should wait before retrying (HTTP ``Retry-After``): at least 1."""
    if wait is None or not math.isfinite(wait):
        return 1
    return max(1, math.ceil(wait))


class Admission:
    """The admission rule of one server: a hard length bound, and a wait bound once service times are known.

    ``max_queue_wait_s`` = 0 turns the wait bound off (length bound only). ``clock`` is
    ``time.monotonic`` (deadlines are absolute monotonic times); tests pass their own.
    """

    def __init__(
        self, *, max_queue_size: int, max_queue_wait_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if max_queue_size < 1 or max_queue_wait_s < 0:
            raise ValueError("max_queue_size must be >= 1 and max_queue_wait_s >= 0")
        self.max_queue_size = max_queue_size
        self.max_queue_wait_s = max_queue_wait_s
        self._clock = clock

    def budget(self, deadline: float | None) -> float | None:
        """Seconds a request may wait for its answer: ``max_queue_wait_s`` capped by its deadline; None: unbounded."""
        if self.max_queue_wait_s <= 0:
            return None
        if deadline is None:
            return self.max_queue_wait_s
        return min(self.max_queue_wait_s, deadline - self._clock())

    def check(self, load: Load, estimate: WaitEstimate, *, deadline: float | None, label: str) -> None:
        """Raise QueueFull (with ``retry_after_s``) when the request should be refused; else return."""
        wait = estimate.wait(load)
        if load.waiting_requests >= self.max_queue_size:
            raise QueueFull(
                f"{label} has {load.waiting_requests} requests waiting; retry later", retry_after_s=retry_after_s(wait)
            )
        budget = self.budget(deadline)
        next_batch_has_room = load.decoding_images + load.queued_images < estimate.batch_size
        if wait is None or budget is None or wait <= budget or next_batch_has_room:
            return
        raise QueueFull(
            f"{label} has {load.waiting_requests} requests waiting, an expected wait of {wait:.2f}s "
            f"over the {max(budget, 0.0):.2f}s allowed; retry later",
            retry_after_s=retry_after_s(wait),
        )


class Decoding:
    """Per model version: the images being decoded now, and the measured decode time per image. (The
    requests being decoded are counted once, on the version's entry: ``ModelEntry.decoding``.)"""

    def __init__(self) -> None:
        self._images: dict[Key, int] = {}
        self._timers: dict[Key, Ewma] = {}

    def images(self, key: Key) -> int:
        return self._images.get(key, 0)

    def timer(self, key: Key) -> Ewma:
        """The EWMA of seconds per decoded image (``value`` None until one was decoded)."""
        return self._timers.setdefault(key, Ewma())

    @contextlib.contextmanager
    def hold(self, key: Key, images: int) -> Iterator[None]:
        """Count ``images`` images as being decoded while the block runs."""
        self._images[key] = self.images(key) + images
        try:
            yield
        finally:
            self._images[key] -= images


def image_count(data: Any) -> int:
    """Images in a request's input tensor data (a list of encoded images or an (N, ...) array); at least 1."""
    if hasattr(data, "ndim") and hasattr(data, "shape"):
        return max(1, int(data.shape[0])) if data.ndim else 1
    return max(1, len(data)) if isinstance(data, list) else 1
