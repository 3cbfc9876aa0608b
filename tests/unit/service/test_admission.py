"""The admission rule: the wait estimator (EWMA, cold start), decisions on a fake clock, Retry-After."""

from __future__ import annotations

import math

import numpy as np
import pytest

from service.admission import Admission, Decoding, Ewma, Load, WaitEstimate, image_count, retry_after_s
from service.errors import QueueFull
from service.settings import Settings, from_sources

LABEL = "model 'm' version 1"


class Clock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_ewma_starts_empty_then_follows_samples_per_image() -> None:
    ewma = Ewma(weight=0.5)
    assert ewma.value is None
    ewma.observe(0.08, images=8)  # the first sample is taken as is: 10 ms per image
    assert ewma.value == pytest.approx(0.010)
    ewma.observe(0.020)
    assert ewma.value == pytest.approx(0.015)


@pytest.mark.parametrize(("seconds", "images"), [(math.nan, 1), (math.inf, 1), (-1.0, 1), (1.0, 0)])
def test_ewma_ignores_meaningless_samples(seconds: float, images: int) -> None:
    ewma = Ewma()
    ewma.observe(0.01)
    ewma.observe(seconds, images)
    assert ewma.value == pytest.approx(0.01)


def test_ewma_weight_must_be_a_fraction() -> None:
    with pytest.raises(ValueError, match="weight"):
        Ewma(weight=0.0)


def test_wait_is_unknown_before_compute_is_measured() -> None:
    assert WaitEstimate(compute_s=None, decode_s=0.01).wait(Load(10, 10, 10, 8)) is None


def test_wait_counts_decode_half_the_computing_batch_the_batches_ahead_and_its_own() -> None:
    estimate = WaitEstimate(compute_s=0.010, decode_s=0.004, decode_workers=4, instances=1, batch_size=8)
    load = Load(waiting_requests=14, decoding_images=4, queued_images=10, computing_images=8)
    # own decode behind 4 decoding on 4 threads: 2 decodes; then 8/2 computing, one full batch of the 14
    # ahead (8), and its own batch (the other 6 ahead and itself, filled to 8) at 10 ms an image
    assert estimate.wait(load) == pytest.approx(2 * 0.004 + (4 + 8 + 8) * 0.010)


def test_a_short_queue_waits_for_its_own_partial_batch_only() -> None:
    estimate = WaitEstimate(compute_s=0.010, batch_size=8)
    assert estimate.wait(Load(0)) == pytest.approx(0.010)  # alone: its own image
    assert estimate.wait(Load(3, queued_images=3)) == pytest.approx(4 * 0.010)  # a batch of 4 with it


def test_wait_spreads_the_batches_ahead_over_instances() -> None:
    one = WaitEstimate(compute_s=0.010, instances=1, batch_size=4).wait(Load(0, queued_images=20))
    two = WaitEstimate(compute_s=0.010, instances=2, batch_size=4).wait(Load(0, queued_images=20))
    assert one == pytest.approx((20 + 4) * 0.010) and two == pytest.approx((10 + 4) * 0.010)


def _admission(clock: Clock, wait_s: float = 0.5, size: int = 64) -> Admission:
    return Admission(max_queue_size=size, max_queue_wait_s=wait_s, clock=clock)


MEASURED = WaitEstimate(compute_s=0.012, decode_s=0.0, batch_size=8)


def test_cold_start_falls_back_to_the_length_bound() -> None:
    admission, cold = _admission(Clock(), size=4), WaitEstimate(compute_s=None, batch_size=8)
    admission.check(Load(3, queued_images=1000), cold, deadline=None, label=LABEL)  # long, but not measured
    with pytest.raises(QueueFull, match="4 requests waiting") as caught:
        admission.check(Load(4, queued_images=4), cold, deadline=None, label=LABEL)
    assert caught.value.retry_after_s == 1


def test_the_length_bound_stays_hard_when_the_queue_is_cheap() -> None:
    fast = WaitEstimate(compute_s=1e-6, batch_size=8)
    with pytest.raises(QueueFull, match="64 requests waiting"):
        _admission(Clock()).check(Load(64, queued_images=64), fast, deadline=None, label=LABEL)


def test_refuses_what_could_not_be_answered_within_the_budget() -> None:
    admission = _admission(Clock(), wait_s=0.5)
    admission.check(Load(39, queued_images=39), MEASURED, deadline=None, label=LABEL)  # (32 + 8) x 12 ms: 0.48 s
    with pytest.raises(QueueFull, match=r"40 requests waiting, an expected wait of 0\.58s over the 0\.50s") as caught:
        admission.check(Load(40, queued_images=40), MEASURED, deadline=None, label=LABEL)  # (40 + 8) x 12 ms
    assert caught.value.retry_after_s == 1


def test_a_deadline_shorter_than_the_budget_wins() -> None:
    clock = Clock(now=100.0)
    admission = _admission(clock, wait_s=0.5)
    load = Load(20, queued_images=20)  # (16 + 8) x 12 ms = 0.288 s
    admission.check(load, MEASURED, deadline=100.3, label=LABEL)
    with pytest.raises(QueueFull, match=r"over the 0\.20s allowed"):
        admission.check(load, MEASURED, deadline=100.2, label=LABEL)
    clock.now = 99.0  # the same deadline, further away: admitted, the budget still caps it
    admission.check(load, MEASURED, deadline=100.2, label=LABEL)
    assert admission.budget(100.2) == pytest.approx(0.5)


def test_what_fits_the_next_batch_is_admitted_even_over_budget() -> None:
    slow = WaitEstimate(compute_s=1.0, batch_size=8)  # one batch alone is over budget: keep batches full
    admission = _admission(Clock(), wait_s=0.5)
    admission.check(Load(7, queued_images=7, computing_images=8), slow, deadline=None, label=LABEL)
    with pytest.raises(QueueFull) as caught:
        admission.check(Load(8, queued_images=8, computing_images=8), slow, deadline=None, label=LABEL)
    assert caught.value.retry_after_s == 20  # half of 8 computing, the 8 queued, its own batch of 8: 1 s each


def test_zero_turns_the_wait_bound_off() -> None:
    admission = _admission(Clock(), wait_s=0.0, size=64)
    assert admission.budget(None) is None and admission.budget(100.1) is None
    admission.check(Load(63, queued_images=1000), MEASURED, deadline=100.001, label=LABEL)


@pytest.mark.parametrize(("wait", "seconds"), [(None, 1), (0.0, 1), (0.4, 1), (1.0, 1), (1.01, 2), (7.5, 8)])
def test_retry_after_is_whole_seconds_of_the_expected_wait(wait: float | None, seconds: int) -> None:
    assert retry_after_s(wait) == seconds


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError):
        Admission(max_queue_size=0, max_queue_wait_s=0.5)
    with pytest.raises(ValueError):
        Admission(max_queue_size=1, max_queue_wait_s=-1)


def test_the_setting_comes_from_the_environment_and_is_checked() -> None:
    assert Settings().max_queue_wait_ms == 350.0
    assert Settings().refusal_pause_ms == 250.0
    assert from_sources(flags={}, environ={"SERVE_MAX_QUEUE_WAIT_MS": "250"}).max_queue_wait_ms == 250.0
    assert from_sources(flags={"max_queue_wait_ms": "0"}, environ={}).max_queue_wait_ms == 0.0
    for bad in ("-1", "nan", "inf"):
        with pytest.raises(ValueError, match="max_queue_wait_ms"):
            from_sources(flags={"max_queue_wait_ms": bad}, environ={})


def test_decoding_counts_images_per_model_version_while_held() -> None:
    decoding, key = Decoding(), ("m", "1")
    with decoding.hold(key, 3), decoding.hold(key, 1):
        assert (decoding.images(key), decoding.images(("m", "2"))) == (4, 0)
    with pytest.raises(RuntimeError), decoding.hold(key, 2):
        raise RuntimeError("a failed decode frees its count too")
    assert decoding.images(key) == 0
    assert decoding.timer(key) is decoding.timer(key) and decoding.timer(key).value is None


@pytest.mark.parametrize(
    ("data", "count"),
    [([b"a", b"b"], 2), ([], 1), (np.zeros((5, 3, 2, 2)), 5), (np.zeros(()), 1), (None, 1), ("text", 1)],
)
def test_image_count(data: object, count: int) -> None:
    assert image_count(data) == count
