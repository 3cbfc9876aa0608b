from __future__ import annotations

import asyncio
import threading
import time
import types
from collections.abc import Callable, Coroutine
from typing import Any

import numpy as np
import pytest

from service import batcher as batcher_module
from service import metrics
from service.batcher import Batcher, BatcherConfig
from service.errors import DeadlineExceeded, InternalError, ModelNotReady, QueueFull, ServiceError, ShuttingDown

WAIT_S = 5.0  # generous bound for anything that should happen "at once"


def _request(ident: float, n: int = 1) -> np.ndarray:
    """``n`` images whose every pixel is ``ident + row``: the model echoes them back."""
    rows = np.arange(n, dtype=np.float32) + ident
    return np.broadcast_to(rows[:, None, None, None], (n, 3, 2, 2)).copy()


def _echo(batch: np.ndarray) -> np.ndarray:
    return batch.reshape(len(batch), -1)[:, :1] * 1


class Model:
    """A ``run`` that records the batches it sees and can hold the first one until released."""

    def __init__(self, fn: Callable[[np.ndarray], np.ndarray] = _echo, *, hold_first: bool = False) -> None:
        self.fn = fn
        self.hold_first = hold_first
        self.sizes: list[int] = []
        self.seen: list[float] = []
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.sizes.append(len(batch))
        self.seen.extend(batch.reshape(len(batch), -1)[:, 0].tolist())
        self.entered.set()
        if self.hold_first and len(self.sizes) == 1:
            assert self.release.wait(WAIT_S)
        return self.fn(batch)


async def _until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.001)


def _spawn(batcher: Batcher, ident: float, n: int = 1, **kwargs: Any) -> asyncio.Task[np.ndarray]:
    return asyncio.ensure_future(batcher.submit(_request(ident, n), **kwargs))


async def _started(model: Model, config: BatcherConfig, name: str) -> Batcher:
    batcher = Batcher(model, config, model=name, version="1")
    await batcher.start()
    return batcher


async def _hold(batcher: Batcher, model: Model) -> asyncio.Task[np.ndarray]:
    """Submit a blocker (id -1) and wait until ``run`` is busy with it, so later requests queue up."""
    blocker = _spawn(batcher, -1)
    await _until(model.entered.is_set)
    return blocker


def _run(main: Callable[[], Coroutine[Any, Any, None]], model: Model) -> None:
    try:
        asyncio.run(main())
    finally:
        model.release.set()


def test_queued_requests_form_batches_up_to_the_limit_and_answers_go_to_their_callers() -> None:
    model = Model(hold_first=True)

    async def main() -> None:
        batcher = await _started(model, BatcherConfig(max_batch_size=8), "batch-form")
        blocker = await _hold(batcher, model)
        tasks = [_spawn(batcher, i) for i in range(20)]
        await _until(lambda: batcher.queue_depth == 20)
        model.release.set()
        results = await asyncio.wait_for(asyncio.gather(*tasks), WAIT_S)
        assert [r.tolist() for r in results] == [[[float(i)]] for i in range(20)]
        assert (await blocker).tolist() == [[-1.0]]
        await batcher.stop()

    _run(main, model)
    assert model.sizes == [1, 8, 8, 4]
    labels = {"model": "batch-form", "version": "1"}
    assert metrics.REGISTRY.get_sample_value("inference_batch_size_count", labels) == 4
    assert metrics.REGISTRY.get_sample_value("inference_queue_duration_seconds_count", labels) == 21
    assert metrics.REGISTRY.get_sample_value("inference_queue_depth", labels) == 0


def test_multi_image_requests_keep_their_rows_and_an_oversized_one_runs_alone() -> None:
    model = Model(hold_first=True)

    async def main() -> None:
        batcher = await _started(model, BatcherConfig(max_batch_size=4), "batch-rows")
        await _hold(batcher, model)
        small, big, last = _spawn(batcher, 10, 2), _spawn(batcher, 20, 6), _spawn(batcher, 30, 1)
        await _until(lambda: batcher.queue_depth == 3)
        model.release.set()
        assert (await small).ravel().tolist() == [10, 11]
        assert (await big).ravel().tolist() == [20, 21, 22, 23, 24, 25]
        assert (await last).ravel().tolist() == [30]
        await batcher.stop()

    _run(main, model)
    assert model.sizes == [1, 2, 6, 1]


def test_full_queue_refuses_at_once() -> None:
    model = Model(hold_first=True)

    async def main() -> None:
        batcher = await _started(model, BatcherConfig(max_queue_size=2), "queue-full")
        await _hold(batcher, model)
        queued = [_spawn(batcher, 1), _spawn(batcher, 2)]
        await _until(lambda: batcher.queue_depth == 2)
        with pytest.raises(QueueFull, match="2 requests waiting"):
            await asyncio.wait_for(batcher.submit(_request(3)), WAIT_S)
        model.release.set()
        assert [r.item() for r in await asyncio.gather(*queued)] == [1, 2]
        await batcher.stop()

    _run(main, model)
    assert 3 not in model.seen


def test_abandoned_requests_free_their_queue_slots_and_are_never_computed() -> None:
    model = Model(hold_first=True)

    async def main() -> None:
        batcher = await _started(model, BatcherConfig(max_queue_size=1), "cancelled")
        await _hold(batcher, model)
        gone = _spawn(batcher, 7)
        await _until(lambda: batcher.queue_depth == 1)
        gone.cancel()
        await _until(lambda: batcher.queue_depth == 0)
        stays = _spawn(batcher, 8)  # the cancelled request's slot is free again
        await _until(lambda: batcher.queue_depth == 1)
        model.release.set()
        assert (await stays).item() == 8
        await batcher.stop()

    _run(main, model)
    assert 7 not in model.seen


def test_expired_deadline_is_refused_without_being_computed() -> None:
    model = Model(hold_first=True)

    async def main() -> None:
        batcher = await _started(model, BatcherConfig(), "deadline")
        with pytest.raises(DeadlineExceeded):
            await batcher.submit(_request(1), deadline=time.monotonic() - 1)
        await _hold(batcher, model)
        soon = time.monotonic() + 0.05
        expires, keeps = _spawn(batcher, 2, deadline=soon), _spawn(batcher, 3, deadline=time.monotonic() + 60)
        with pytest.raises(DeadlineExceeded, match="deadline passed"):
            await asyncio.wait_for(expires, WAIT_S)  # at its deadline, not when the queue moves
        assert batcher.queue_depth == 1
        model.release.set()
        assert (await keeps).item() == 3
        await batcher.stop()

    _run(main, model)
    assert model.seen == [-1, 3]


def test_exception_in_run_fails_only_its_batch(caplog: pytest.LogCaptureFixture) -> None:
    def fragile(batch: np.ndarray) -> np.ndarray:
        if (batch == 13).any():
            raise RuntimeError("boom on 13")
        return _echo(batch)

    model = Model(fragile)

    async def main() -> None:
        batcher = await _started(model, BatcherConfig(), "raises")
        with pytest.raises(ServiceError, match="internal error") as caught:
            await batcher.submit(_request(13))
        assert type(caught.value) is InternalError and "boom" not in caught.value.message
        assert (await batcher.submit(_request(14))).item() == 14
        await batcher.stop()

    _run(main, model)
    record = next(r for r in caplog.records if r.name == "service.batcher")
    assert record.exc_info is not None and "boom on 13" in str(record.exc_info[1])


@pytest.mark.parametrize("bad_output", [lambda b: _echo(b)[:-1], lambda b: float(b.sum())])
def test_wrong_number_of_output_rows_fails_the_batch(bad_output: Callable[[np.ndarray], Any]) -> None:
    model = Model(bad_output)

    async def main() -> None:
        batcher = await _started(model, BatcherConfig(), "rows")
        with pytest.raises(ServiceError, match="output rows for 3 images"):
            await batcher.submit(_request(1, 3))
        await batcher.stop()

    _run(main, model)


def test_stop_with_drain_finishes_queued_work_then_refuses() -> None:
    model = Model(hold_first=True)

    async def main() -> None:
        batcher = await _started(model, BatcherConfig(max_batch_size=2), "drain")
        blocker = await _hold(batcher, model)
        queued = [_spawn(batcher, i) for i in range(5)]
        await _until(lambda: batcher.queue_depth == 5)
        stopping = asyncio.ensure_future(batcher.stop(drain=True, timeout=WAIT_S))
        await asyncio.sleep(0)
        with pytest.raises(ShuttingDown):
            await batcher.submit(_request(99))
        model.release.set()
        await asyncio.wait_for(stopping, WAIT_S)
        assert [r.item() for r in await asyncio.gather(blocker, *queued)] == [-1, 0, 1, 2, 3, 4]
        with pytest.raises(ShuttingDown):
            await batcher.submit(_request(99))

    _run(main, model)
    assert model.sizes == [1, 2, 2, 1]


def test_stop_without_drain_fails_queued_but_finishes_in_flight() -> None:
    model = Model(hold_first=True)

    async def main() -> None:
        batcher = await _started(model, BatcherConfig(), "no-drain")
        blocker = await _hold(batcher, model)
        queued = [_spawn(batcher, i) for i in range(3)]
        await _until(lambda: batcher.queue_depth == 3)
        stopping = asyncio.ensure_future(batcher.stop(drain=False, timeout=WAIT_S))
        outcomes = await asyncio.gather(*queued, return_exceptions=True)
        assert all(isinstance(o, ShuttingDown) for o in outcomes)
        model.release.set()
        await asyncio.wait_for(stopping, WAIT_S)
        assert (await blocker).item() == -1

    _run(main, model)
    assert model.seen == [-1]


def test_max_queue_delay_gathers_late_arrivals() -> None:
    model = Model()

    async def main() -> None:
        # The delay is long, but a batch that fills up runs at once, so this stays fast.
        batcher = await _started(model, BatcherConfig(max_batch_size=4, max_queue_delay_s=30), "delay")
        tasks = [_spawn(batcher, 0)]
        for i in range(1, 4):
            await _until(lambda: batcher.queue_depth == 0)  # the loop took the earlier ones
            await asyncio.sleep(0.01)
            tasks.append(_spawn(batcher, i))
        results = await asyncio.wait_for(asyncio.gather(*tasks), WAIT_S)
        assert [r.item() for r in results] == [0, 1, 2, 3]
        await batcher.stop()

    _run(main, model)
    assert model.sizes == [4]


def test_short_delay_does_not_hold_a_lone_request() -> None:
    model = Model()

    async def main() -> None:
        batcher = await _started(model, BatcherConfig(max_batch_size=4, max_queue_delay_s=0.01), "lone")
        assert (await asyncio.wait_for(batcher.submit(_request(5)), WAIT_S)).item() == 5
        await batcher.stop()

    _run(main, model)
    assert model.sizes == [1]


def test_instances_compute_batches_concurrently() -> None:
    both_inside = threading.Barrier(2, timeout=WAIT_S)

    def rendezvous(batch: np.ndarray) -> np.ndarray:
        both_inside.wait()  # raises BrokenBarrierError unless two batches run at the same time
        return _echo(batch)

    model = Model(rendezvous)

    async def main() -> None:
        batcher = await _started(model, BatcherConfig(max_batch_size=1, instances=2), "instances")
        results = await asyncio.wait_for(asyncio.gather(_spawn(batcher, 1), _spawn(batcher, 2)), 2 * WAIT_S)
        assert [r.item() for r in results] == [1, 2]
        await batcher.stop()

    _run(main, model)


def test_unstarted_batcher_and_bad_config_are_refused() -> None:
    async def main() -> None:
        batcher = Batcher(_echo, BatcherConfig())
        with pytest.raises(ModelNotReady):
            await batcher.submit(_request(1))
        await batcher.stop()

    asyncio.run(main())
    with pytest.raises(ValueError):
        BatcherConfig(max_batch_size=0)
    with pytest.raises(ValueError):
        BatcherConfig(max_queue_delay_s=-1)


def test_work_ahead_and_the_measured_compute_time_per_image(monkeypatch: pytest.MonkeyPatch) -> None:
    """What admission reads: images queued and computing, and an EWMA of seconds per image (a fake clock)."""
    ticks = iter(range(1000))
    fake_time = types.SimpleNamespace(monotonic=time.monotonic, perf_counter=lambda: 0.1 * next(ticks))
    monkeypatch.setattr(batcher_module, "time", fake_time)  # every batch takes 0.1 s of this clock
    model = Model(hold_first=True)

    async def main() -> None:
        batcher = await _started(model, BatcherConfig(max_batch_size=8), "work-ahead")
        blocker = await _hold(batcher, model)
        tasks = [_spawn(batcher, 10, 2), _spawn(batcher, 20, 3)]
        await _until(lambda: batcher.queue_depth == 2)
        assert (batcher.queued_images, batcher.computing_images) == (5, 1)
        assert batcher.compute_per_image.value is None  # nothing measured yet: admission's cold start
        model.release.set()
        await asyncio.wait_for(asyncio.gather(blocker, *tasks), WAIT_S)
        assert (batcher.queued_images, batcher.computing_images) == (0, 0)
        await batcher.stop()
        # 0.1 s for 1 image, then 0.1 s for 5: 0.1 + 0.2 * (0.02 - 0.1)
        assert batcher.compute_per_image.value == pytest.approx(0.084)

    _run(main, model)
    assert model.sizes == [1, 5]
