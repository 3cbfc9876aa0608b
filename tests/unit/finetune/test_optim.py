from __future__ import annotations

import itertools

import pytest

from finetune.optim import MIN_LR_FACTOR, warmup_cosine


def test_warmup_then_cosine() -> None:
    factors = [warmup_cosine(step, warmup_steps=10, total_steps=100) for step in range(100)]
    assert factors[0] == pytest.approx(0.1)
    assert factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(factors[10:]))
    assert factors[-1] == pytest.approx(MIN_LR_FACTOR, abs=1e-3)


def test_no_warmup_starts_at_peak() -> None:
    assert warmup_cosine(0, warmup_steps=0, total_steps=10) == pytest.approx(1.0)
