"""Splitting multi-label data: iterative stratification, seeded and deterministic.

Sechidis, Tsoumakas and Vlahavas (2011), "On the stratification of multi-label data" (ECML PKDD), as in
scikit-multilearn's ``IterativeStratification``: the label with the fewest images still to place goes
first; each of its images goes to the split that wants that label most (ties: the split that wants
the most images, then a seeded draw); images with no label fill the splits last. Two changes make
the result what ``stratified_split`` promises for single labels: a label's wanted counts are whole
numbers with at least one image in val and in test (:func:`split_sizes`), and a final pass moves an
image into any split a label with enough images (3 with val and test, 2 with one) still misses,
taking it from a split where none of its labels would then be missing.

    train, val, test = multilabel_split(samples, val_fraction=0.15, test_fraction=0.15, seed=0)
"""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from finetune.splits import Sample

TRAIN, VAL, TEST = 0, 1, 2


def check_fractions(val_fraction: float, test_fraction: float) -> None:
    """ValueError unless both fractions lie in [0, 1) and sum below 1."""
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(
            f"val and test fractions must be in [0, 1) and sum below 1, got {val_fraction}, {test_fraction}"
        )


def split_sizes(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    """(n_val, n_test) for a class of ``n``: at least 1 each when asked for, leaving >= 1 to train."""
    n_val = max(1, round(n * val_fraction)) if val_fraction > 0 else 0
    n_test = max(1, round(n * test_fraction)) if test_fraction > 0 else 0
    while n_val + n_test >= n and max(n_val, n_test) > 1:
        if n_val >= n_test:
            n_val -= 1
        else:
            n_test -= 1
    if n_val + n_test > n:  # too few images for every split: val first, then test
        n_val = min(n_val, n)
        n_test = n - n_val
    return n_val, n_test


@dataclass
class _Wanted:
    """How many more images each split wants, per label and in all; splits with fraction 0 take none."""

    per_label: dict[int, list[float]]
    total: list[float]
    active: list[int]

    @classmethod
    def build(cls, sets: Sequence[tuple[int, ...]], val_fraction: float, test_fraction: float) -> _Wanted:
        sizes: dict[int, int] = {}
        for labels in sets:
            for label in labels:
                sizes[label] = sizes.get(label, 0) + 1
        per_label: dict[int, list[float]] = {}
        for label, n in sizes.items():
            n_val, n_test = split_sizes(n, val_fraction, test_fraction)
            per_label[label] = [n - n_val - n_test, n_val, n_test]
        n = len(sets)
        total = [n * (1 - val_fraction - test_fraction), n * val_fraction, n * test_fraction]
        active = [TRAIN] + [j for j, f in ((VAL, val_fraction), (TEST, test_fraction)) if f > 0]
        return cls(per_label, total, active)

    def choose(self, label: int | None, rng: random.Random) -> int:
        """The split that wants ``label`` most (None: the most images); ties by total, then drawn."""

        def key(split: int) -> tuple[float, float]:
            return (self.per_label[label][split] if label is not None else 0.0), self.total[split]

        best = max(key(j) for j in self.active)
        tied = [j for j in self.active if key(j) == best]
        return tied[0] if len(tied) == 1 else rng.choice(tied)

    def take(self, labels: tuple[int, ...], split: int) -> None:
        for label in labels:
            self.per_label[label][split] -= 1
        self.total[split] -= 1


def _place_rarest_first(
    sets: Sequence[tuple[int, ...]], order: list[int], wanted: _Wanted, rng: random.Random
) -> list[int]:
    by_label: dict[int, list[int]] = {}
    for item in order:
        for label in sets[item]:
            by_label.setdefault(label, []).append(item)
    left = {label: len(items) for label, items in by_label.items()}
    split = [-1] * len(sets)
    while left:
        label = min(left, key=lambda lab: (left[lab], lab))
        for item in by_label[label]:
            if split[item] < 0:
                split[item] = wanted.choose(label, rng)
                wanted.take(sets[item], split[item])
                for other in sets[item]:
                    left[other] -= 1
        left = {lab: n for lab, n in left.items() if n > 0}
    for item in order:  # images with none of the labels
        if split[item] < 0:
            split[item] = wanted.choose(None, rng)
            wanted.take((), split[item])
    return split


def _counts(sets: Sequence[tuple[int, ...]], split: list[int]) -> dict[int, list[int]]:
    counts: dict[int, list[int]] = {}
    for labels, j in zip(sets, split, strict=True):
        for label in labels:
            counts.setdefault(label, [0, 0, 0])[j] += 1
    return counts


def _move_one(label: int, target: int, sets: Sequence[tuple[int, ...]], order: list[int], split: list[int],
              counts: dict[int, list[int]]) -> None:  # fmt: skip
    """Move one image of ``label`` into ``target`` from the split with most of it, leaving no label of
    the image missing from that split."""
    for donor in sorted(range(3), key=lambda j: -counts[label][j]):
        if counts[label][donor] < 2:
            return
        for item in order:
            if split[item] == donor and label in sets[item] and all(counts[lab][donor] > 1 for lab in sets[item]):
                split[item] = target
                for lab in sets[item]:
                    counts[lab][donor] -= 1
                    counts[lab][target] += 1
                return


def _fill_gaps(sets: Sequence[tuple[int, ...]], order: list[int], split: list[int], active: list[int]) -> None:
    counts = _counts(sets, split)
    for label in sorted(counts):
        for target in active:
            if counts[label][target] == 0 and sum(counts[label]) >= len(active):
                _move_one(label, target, sets, order, split, counts)


def iterative_stratification(
    label_sets: Sequence[Collection[int]], *, val_fraction: float, test_fraction: float, seed: int
) -> list[int]:
    """The split of each item (0 train, 1 val, 2 test), for items given as their label indices.

    Deterministic for a seed and the given order; :func:`multilabel_split` makes it independent of
    the order too.
    """
    check_fractions(val_fraction, test_fraction)
    sets = [tuple(sorted(set(labels))) for labels in label_sets]
    rng = random.Random(f"iterative:{seed}")
    order = list(range(len(sets)))
    rng.shuffle(order)
    wanted = _Wanted.build(sets, val_fraction, test_fraction)
    split = _place_rarest_first(sets, order, wanted, rng)
    _fill_gaps(sets, order, split, wanted.active)
    return split


def multilabel_split(
    samples: Sequence[Sample], *, val_fraction: float, test_fraction: float, seed: int
) -> tuple[list[Sample], list[Sample], list[Sample]]:
    """Split multi-label samples by iterative stratification; returns (train, val, test), each sorted by path.

    Deterministic for a seed and independent of the input order. Every label lands in every split
    when it has enough images (3 with both fractions > 0, 2 with one).
    """
    ordered = sorted(samples, key=lambda s: str(s.path))
    split = iterative_stratification(
        [s.indices for s in ordered], val_fraction=val_fraction, test_fraction=test_fraction, seed=seed
    )
    parts: tuple[list[Sample], list[Sample], list[Sample]] = ([], [], [])
    for sample, j in zip(ordered, split, strict=True):
        parts[j].append(sample)
    return parts
