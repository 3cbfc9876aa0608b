"""The dynamic batcher: one bounded queue per model version, an explicit batch loop per instance.

Each loop waits for the first request, gathers what is already queued (and, with
``max_queue_delay_s`` > 0, what arrives within that delay) up to ``max_batch_size`` images,
runs the model in a worker thread, checks it returned one row per image, and hands each
caller exactly its rows.

    batcher = Batcher(backend.run, BatcherConfig(max_batch_size=8), model="flowers", version="1")
    await batcher.start()
    logits = await batcher.submit(images, deadline=time.monotonic() + 2.0)  # (n, C) for n images
    await batcher.stop(drain=True)
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from service import metrics
from service.admission import Ewma
from service.errors import (
    DeadlineExceeded,
    InternalError,
    InvalidInput,
    ModelNotReady,
    QueueFull,
    ServiceError,
    ShuttingDown,
)

logger = logging.getLogger(__name__)

_NEW, _RUNNING, _STOPPING, _STOPPED = "new", "running", "stopping", "stopped"


@dataclass(frozen=True)
class BatcherConfig:
    """How a model version batches.

    ``max_batch_size`` counts images; ``max_queue_size`` counts *requests* waiting (a request
    holds one or more images), beyond it ``submit`` refuses with QueueFull. ``instances``
    batches may compute at once, each formed by its own loop.
    """

    max_batch_size: int = 8
    max_queue_delay_s: float = 0.0
    max_queue_size: int = 64
    instances: int = 1

    def __post_init__(self) -> None:
        if min(self.max_batch_size, self.max_queue_size, self.instances) < 1:
            raise ValueError("max_batch_size, max_queue_size and instances must be at least 1")
        if self.max_queue_delay_s < 0:
            raise ValueError(f"max_queue_delay_s must be >= 0, got {self.max_queue_delay_s}")


@dataclass(eq=False)
class _Request:
    inputs: np.ndarray
    future: asyncio.Future[np.ndarray]
    deadline: float | None  # absolute time.monotonic()
    enqueued: float
    queued: bool = True  # False once taken into a batch or settled while waiting
    timer: asyncio.TimerHandle | None = None  # fails the request at its deadline while it waits

    @property
    def size(self) -> int:
        return int(self.inputs.shape[0])

    def fits_with(self, other: _Request) -> bool:
        """Same image shape and dtype: a wrong-shaped request then fails alone, not its neighbours."""
        return self.inputs.shape[1:] == other.inputs.shape[1:] and self.inputs.dtype == other.inputs.dtype


def _fail(batch: Iterable[_Request], make_error: Callable[[], BaseException]) -> None:
    """Fail every request still waiting; a caller that went away (cancelled future) is skipped."""
    for request in batch:
        if not request.future.done():
            request.future.set_exception(make_error())


class Batcher:
    """Batches the requests of one model version and runs them through ``run`` in worker threads.

    ``run`` maps a float32 ``(N, ...)`` batch to an ``(N, C)`` array. Without an ``executor``
    the batcher owns a pool of ``config.instances`` threads, so compute never waits behind
    other users of the event loop's default executor. ``compute_per_image`` is an EWMA of the
    measured seconds per image of its batches (None until the first one): admission's service time.
    """

    def __init__(
        self,
        run: Callable[[np.ndarray], np.ndarray],
        config: BatcherConfig,
        *,
        model: str = "",
        version: str = "",
        executor: concurrent.futures.Executor | None = None,
    ) -> None:
        self.config = config
        self.model = model
        self.version = version
        self._run = run
        self._own_executor = executor is None
        self._executor = executor or concurrent.futures.ThreadPoolExecutor(
            max_workers=config.instances, thread_name_prefix=f"batcher-{model}-{version}"
        )
        self._pending: deque[_Request] = deque()
        self._computing = 0  # images in batches computing now
        self.compute_per_image = Ewma()
        self._arrived = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._state = _NEW
        self._label = f"model {model!r} version {version or '?'}"
        self._queue_seconds = metrics.QUEUE_SECONDS.labels(model, version)
        self._compute_seconds = metrics.COMPUTE_SECONDS.labels(model, version)
        self._batch_size = metrics.BATCH_SIZE.labels(model, version)
        self._depth = metrics.QUEUE_DEPTH.labels(model, version)

    @property
    def queue_depth(self) -> int:
        """Requests waiting to be batched (not those already computing)."""
        return len(self._pending)

    @property
    def queued_images(self) -> int:
        """Images waiting to be batched."""
        return sum(request.size for request in self._pending)

    @property
    def computing_images(self) -> int:
        """Images in the batches computing now."""
        return self._computing

    async def start(self) -> None:
        """Start ``config.instances`` batch loops on the running event loop."""
        if self._state != _NEW:
            raise RuntimeError(f"batcher for {self._label} was already started")
        loop = asyncio.get_running_loop()
        for index in range(self.config.instances):
            task = loop.create_task(self._loop(), name=f"batcher {self._label} #{index}")
            task.add_done_callback(self._loop_ended)
            self._tasks.append(task)
        self._state = _RUNNING

    async def submit(self, inputs: np.ndarray, *, deadline: float | None = None) -> np.ndarray:
        """Queue ``inputs`` (n >= 1 images) and return their n output rows.

        Raises QueueFull at once when ``config.max_queue_size`` requests wait, ShuttingDown once
        stopping, DeadlineExceeded when ``deadline`` (absolute ``time.monotonic()``) passes while
        the request waits (it is then never computed; one already computing finishes), and a
        plain ServiceError (500, "internal error") when the model fails on its batch.
        """
        self._check_accepting()
        if inputs.ndim == 0 or inputs.shape[0] == 0:
            raise InvalidInput("a request needs at least one image")
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            raise DeadlineExceeded(f"the deadline passed before the request reached {self._label}")
        if len(self._pending) >= self.config.max_queue_size:
            raise QueueFull(f"{self._label} has {len(self._pending)} requests waiting; retry later")
        loop = asyncio.get_running_loop()
        request = _Request(inputs, loop.create_future(), deadline, now)
        if deadline is not None:
            request.timer = loop.call_later(deadline - now, self._expire, request)
        request.future.add_done_callback(lambda _: self._settled(request))
        self._pending.append(request)
        self._depth.set(len(self._pending))
        self._arrived.set()
        return await request.future

    async def stop(self, *, drain: bool = True, timeout: float = 30.0) -> None:
        """Refuse new requests; with ``drain`` finish everything queued, else fail it with ShuttingDown.

        Batches already computing always finish. After ``timeout`` seconds the loops are
        cancelled and whatever is left fails with ShuttingDown.
        """
        if self._state in (_NEW, _RUNNING):
            self._state = _STOPPING
            self._arrived.set()  # wake idle loops so they see the state
            if not drain:
                self._fail_pending()
        await self._wait_for_loops(timeout)
        self._fail_pending()
        self._state = _STOPPED
        if self._own_executor:
            self._executor.shutdown(wait=False, cancel_futures=True)

    # ---- submit and stop helpers --------------------------------------------------------------
    def _check_accepting(self) -> None:
        if self._state == _NEW:
            raise ModelNotReady(f"{self._label} is not started")
        if self._state != _RUNNING:
            raise ShuttingDown(f"{self._label} is shutting down and accepts no new requests")

    def _expire(self, request: _Request) -> None:
        """At the deadline, fail a request still waiting (one already computing finishes)."""
        if request.queued and not request.future.done():
            self._fail_late(request)

    def _fail_late(self, request: _Request) -> None:
        waited = time.monotonic() - request.enqueued
        request.future.set_exception(
            DeadlineExceeded(f"the deadline passed after {waited:.3f}s waiting for {self._label}")
        )

    def _settled(self, request: _Request) -> None:
        """Done callback: free the queue slot of a request failed or cancelled while it waited."""
        if request.timer is not None:
            request.timer.cancel()
        if request.queued:
            request.queued = False
            self._queue_seconds.observe(time.monotonic() - request.enqueued)
            with contextlib.suppress(ValueError):  # already dropped by _fail_pending
                self._pending.remove(request)
            self._depth.set(len(self._pending))

    def _fail_pending(self) -> None:
        pending, self._pending = self._pending, deque()
        self._depth.set(0)
        _fail(pending, lambda: ShuttingDown(f"{self._label} stopped before this request was computed"))

    async def _wait_for_loops(self, timeout: float) -> None:
        running = [task for task in self._tasks if not task.done()]
        if not running:
            return
        _, late = await asyncio.wait(running, timeout=timeout)
        if late:
            logger.warning("%s did not drain within %.1fs; cancelling its batch loops", self._label, timeout)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)

    def _loop_ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            logger.error("batch loop of %s died", self._label, exc_info=task.exception())

    # ---- the batch loop -----------------------------------------------------------------------
    async def _loop(self) -> None:
        """Form a batch, compute it, repeat; returns once stopping and nothing is queued."""
        while (batch := await self._next_batch()) is not None:
            await self._compute(batch)

    async def _next_batch(self) -> list[_Request] | None:
        """Wait for the first request, then take what is queued (and what arrives within the delay)."""
        while not self._pending:
            if self._state != _RUNNING:
                return None
            self._arrived.clear()
            await self._arrived.wait()
        batch: list[_Request] = []
        images = self._take(batch, 0)
        if batch and self.config.max_queue_delay_s > 0:
            await self._gather_late(batch, images)
        return batch

    def _take(self, batch: list[_Request], images: int) -> int:
        """Move queued requests into ``batch`` up to ``max_batch_size`` images; returns its image count.

        A request that would overflow the batch stays queued for the next one; a request larger
        than ``max_batch_size`` is taken only into an empty batch, so it runs alone.
        """
        now = time.monotonic()
        while self._pending and images < self.config.max_batch_size:
            head = self._pending[0]
            if batch and (images + head.size > self.config.max_batch_size or not head.fits_with(batch[0])):
                break
            self._pending.popleft()
            head.queued = False
            self._queue_seconds.observe(now - head.enqueued)
            if self._admit(head, now):
                batch.append(head)
                images += head.size
        self._depth.set(len(self._pending))
        return images

    async def _gather_late(self, batch: list[_Request], images: int) -> None:
        """Wait up to ``max_queue_delay_s`` for arrivals while the batch has room and the queue is empty."""
        loop = asyncio.get_running_loop()
        until = loop.time() + self.config.max_queue_delay_s
        # A non-empty queue after _take means its head does not fit: the batch is closed.
        while images < self.config.max_batch_size and not self._pending and self._state == _RUNNING:
            remaining = until - loop.time()
            if remaining <= 0:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except TimeoutError:
                return
            images = self._take(batch, images)

    def _admit(self, request: _Request, now: float) -> bool:
        """False for a caller that went away, or one whose deadline passed (failed, never computed)."""
        if request.future.done():
            return False
        if request.deadline is not None and now >= request.deadline:
            self._fail_late(request)
            return False
        return True

    async def _compute(self, batch: list[_Request]) -> None:
        """Run one batch and resolve its callers; a failure fails this batch only."""
        now = time.monotonic()
        batch = [request for request in batch if self._admit(request, now)]
        if not batch:
            return
        try:
            outputs = await self._execute(batch)
            self._resolve(batch, outputs)
        except asyncio.CancelledError:
            _fail(batch, lambda: ShuttingDown(f"{self._label} stopped while computing this request"))
            raise
        except ServiceError as exc:  # ``run`` chose what its callers see
            error = exc
            _fail(batch, lambda: error)
        except Exception:
            logger.exception("%s failed on a batch of %d requests", self._label, len(batch))
            _fail(batch, lambda: InternalError(f"internal error: {self._label} failed to compute this request"))

    async def _execute(self, batch: list[_Request]) -> np.ndarray:
        inputs = batch[0].inputs if len(batch) == 1 else np.concatenate([r.inputs for r in batch])
        self._batch_size.observe(inputs.shape[0])
        images = int(inputs.shape[0])
        self._computing += images
        start = time.perf_counter()
        try:
            outputs = await asyncio.get_running_loop().run_in_executor(self._executor, self._run, inputs)
        finally:
            self._computing -= images
        elapsed = time.perf_counter() - start
        self._compute_seconds.observe(elapsed)
        self.compute_per_image.observe(elapsed, images)
        return outputs

    def _resolve(self, batch: list[_Request], outputs: np.ndarray) -> None:
        """Hand each caller its rows, after checking there is one output row per input image."""
        images = sum(request.size for request in batch)
        rows = outputs.shape[0] if isinstance(outputs, np.ndarray) and outputs.ndim > 0 else None
        if rows != images:
            logger.error("%s returned %s output rows for %d input images", self._label, rows, images)
            raise InternalError(f"internal error: {self._label} returned {rows} output rows for {images} images")
        offset = 0
        for request in batch:
            if not request.future.done():
                request.future.set_result(outputs[offset : offset + request.size])
            offset += request.size
