from __future__ import annotations

import random
from pathlib import Path

import pytest

from finetune.splits import Sample
from finetune.stratify import iterative_stratification, multilabel_split, split_sizes


def _skewed(n: int, seed: int) -> list[tuple[int, ...]]:
    """Label sets of ``n`` images over 8 labels from common (~60%) to rare (3 images), co-occurring; some empty."""
    rng = random.Random(seed)
    rates = [0.6, 0.4, 0.25, 0.1, 0.05, 0.03]
    sets = [tuple(label for label, rate in enumerate(rates) if rng.random() < rate) for _ in range(n)]
    for label in (6, 7):  # rare labels, each on images that also carry common ones
        for item in rng.sample(range(n), 3):
            sets[item] = (*sets[item], label)
    return sets


def _samples(sets: list[tuple[int, ...]]) -> list[Sample]:
    return [Sample(Path(f"/d/img_{i:04d}.png"), -1, labels) for i, labels in enumerate(sets)]


def _per_split(split: list[int], sets: list[tuple[int, ...]]) -> dict[int, list[int]]:
    counts: dict[int, list[int]] = {}
    for j, labels in zip(split, sets, strict=True):
        for label in labels:
            counts.setdefault(label, [0, 0, 0])[j] += 1
    return counts


@pytest.mark.parametrize("seed", range(12))
def test_every_label_with_three_images_lands_in_every_split(seed: int) -> None:
    sets = _skewed(200, seed)

    split = iterative_stratification(sets, val_fraction=0.15, test_fraction=0.15, seed=seed)

    counts = _per_split(split, sets)
    assert sorted(counts) == list(range(8))
    assert sum(counts[6]) == sum(counts[7]) == 3
    for label, per_split in counts.items():
        assert min(per_split) >= 1 or sum(per_split) < 3, (label, per_split)
    sizes = [split.count(j) for j in range(3)]
    assert sizes[0] > 120 and 15 <= sizes[1] <= 45 and 15 <= sizes[2] <= 45


def test_proportions_follow_the_fractions_per_label() -> None:
    sets = _skewed(1000, 0)
    counts = _per_split(iterative_stratification(sets, val_fraction=0.2, test_fraction=0.1, seed=0), sets)
    for label in range(4):  # the common labels: within a few images of their share
        total = sum(counts[label])
        assert abs(counts[label][1] - 0.2 * total) <= 3 and abs(counts[label][2] - 0.1 * total) <= 3


def test_deterministic_for_a_seed_and_independent_of_order() -> None:
    samples = _samples(_skewed(150, 1))
    shuffled = samples[::-1]
    random.Random(5).shuffle(shuffled)

    first = multilabel_split(samples, val_fraction=0.15, test_fraction=0.15, seed=7)
    again = multilabel_split(shuffled, val_fraction=0.15, test_fraction=0.15, seed=7)
    other = multilabel_split(samples, val_fraction=0.15, test_fraction=0.15, seed=8)

    assert first == again
    assert first != other
    assert sorted(s.path for part in first for s in part) == sorted(s.path for s in samples)
    assert all(part == sorted(part, key=lambda s: str(s.path)) for part in first)


def test_a_zero_fraction_split_gets_nothing_and_two_images_suffice() -> None:
    sets = [(0,), (0,), (1,), (1,), (0, 1), ()]
    split = iterative_stratification(sets, val_fraction=0.3, test_fraction=0.0, seed=0)
    assert 2 not in split
    assert all(per_split[:2] >= [1, 1] for per_split in _per_split(split, sets).values())


def test_images_without_labels_are_spread_by_size() -> None:
    split = iterative_stratification([()] * 20, val_fraction=0.25, test_fraction=0.25, seed=0)
    assert [split.count(j) for j in range(3)] == [10, 5, 5]


def test_split_sizes_keep_one_image_per_split() -> None:
    assert split_sizes(3, 0.15, 0.15) == (1, 1)
    assert split_sizes(100, 0.15, 0.15) == (15, 15)
    assert split_sizes(2, 0.15, 0.15) == (1, 1)
    assert split_sizes(10, 0.0, 0.2) == (0, 2)


def test_fractions_are_checked() -> None:
    with pytest.raises(ValueError, match="fractions"):
        iterative_stratification([(0,)], val_fraction=0.6, test_fraction=0.5, seed=0)
