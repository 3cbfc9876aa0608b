"""Image folders: scan, check, split (stratified, seeded), save/load the splits, and class balance.

Two layouts are accepted: one folder of class subfolders (split here, per class), or ``train/``
and ``val/`` (and optionally ``test/``) subfolders that each hold the same class subfolders.
Every image is decoded once up front with the server's decoder, so a corrupt file is reported
by name before training instead of failing an epoch.

    splits = prepare_data(Path("imgs"), val_split=0.15, test_split=0.15, seed=0)
    train_set = ImageDataset(splits.train, train_transform(spec))
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset, WeightedRandomSampler

from service.errors import InvalidInput
from service.preprocess import DEFAULT_MAX_PIXELS, decode_image

logger = logging.getLogger(__name__)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
BALANCE_MODES = ("auto", "weights", "sampler", "none")
IMBALANCE_RATIO = 1.5  # "auto" balancing turns on above this max/min class-count ratio
SPLIT_NAMES = ("train", "val", "test")
SPLITS_DIR = "splits"


class DataError(ValueError):
    """A problem with the dataset that the user must fix; the message names the class, folder or file."""


@dataclass(frozen=True)
class Sample:
    """One image file and its label: ``label`` is the class index of a single-label image (multiclass; binary:
    0 negative, 1 positive); a multi-label image has ``label`` -1 and its label indices in ``labels``
    (empty: none of the labels)."""

    path: Path
    label: int
    labels: tuple[int, ...] = ()

    @property
    def indices(self) -> tuple[int, ...]:
        """The label indices of the image, whatever the task."""
        return self.labels if self.label < 0 else (self.label,)


@dataclass(frozen=True)
class DataSplits:
    """The classes (index -> name), the three splits, the files left out with the reason, and the task
    the labels were read for (``service.tasks``; binary classes are (negative, positive))."""

    classes: tuple[str, ...]
    train: tuple[Sample, ...]
    val: tuple[Sample, ...]
    test: tuple[Sample, ...]
    skipped: tuple[tuple[Path, str], ...] = ()
    task: str = "multiclass"

    @property
    def num_classes(self) -> int:
        return len(self.classes)


# --------------------------------------------------------------------------- scanning and checking


def _visible(path: Path, root: Path) -> bool:
    return not any(part.startswith(".") for part in path.relative_to(root).parts)


def _image_files(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursive, sorted), hidden files and folders ignored."""
    return sorted(
        p for p in folder.rglob("*") if p.suffix.lower() in IMG_EXTENSIONS and _visible(p, folder) and p.is_file()
    )


def scan_folder(root: Path, classes: Sequence[str] | None = None) -> tuple[tuple[str, ...], list[Sample]]:
    """Read an ImageFolder layout ``root/<class>/**/<image>``; classes are the sorted subfolder names.

    With ``classes`` given (e.g. train's classes when scanning ``val/``) labels follow that
    order and a subfolder not among them is a DataError; a missing class just has no samples.
    """
    if not root.is_dir():
        raise DataError(f"{root}: not a folder")
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if classes is None:
        if not found:
            raise DataError(f"{root}: no class subfolders found (expected {root}/<class>/<image>.jpg)")
        classes = found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise DataError(f"{root}: class folder(s) {', '.join(unknown)} are not among the classes {', '.join(classes)}")
    samples = [
        Sample(path, label)
        for label, name in enumerate(classes)
        if (root / name).is_dir()
        for path in _image_files(root / name)
    ]
    return tuple(classes), samples


def _check_one(sample: Sample, max_pixels: int) -> str | None:
    try:
        decode_image(sample.path.read_bytes(), max_pixels=max_pixels, source=str(sample.path))
    except InvalidInput as exc:  # includes PayloadTooLarge
        return exc.message
    except OSError as exc:
        return f"{sample.path}: unreadable ({exc.strerror or exc})"
    return None


def check_images(
    samples: Sequence[Sample], *, max_pixels: int = DEFAULT_MAX_PIXELS, workers: int = 4
) -> tuple[list[Sample], list[tuple[Path, str]]]:
    """Decode every image with the server's decoder; returns (good samples, [(path, reason)]).

    Corrupt, truncated, empty, oversized or non-image files are skipped and logged as warnings.
    """
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:  # Pillow decodes without the GIL
        reasons = list(pool.map(lambda s: _check_one(s, max_pixels), samples))
    good: list[Sample] = []
    skipped: list[tuple[Path, str]] = []
    for sample, reason in zip(samples, reasons, strict=True):
        if reason is None:
            good.append(sample)
        else:
            logger.warning("skipping %s: %s", sample.path, reason)
            skipped.append((sample.path, reason))
    return good, skipped


# --------------------------------------------------------------------------- splitting


def _by_label(samples: Iterable[Sample]) -> dict[int, list[Sample]]:
    groups: dict[int, list[Sample]] = {}
    for sample in samples:
        groups.setdefault(sample.label, []).append(sample)
    return groups


def _order(sample: Sample) -> tuple[int, str]:
    return sample.label, str(sample.path)


def _split_sizes(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
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


def stratified_split(
    samples: Sequence[Sample], *, val_fraction: float, test_fraction: float, seed: int
) -> tuple[list[Sample], list[Sample], list[Sample]]:
    """Split per class with a seeded shuffle; returns (train, val, test), each sorted by label and path.

    Deterministic for a seed and independent of the input order. Every class gets at least one
    image in val and in test (when its fraction is > 0) and at least one in train when it has
    enough images (3 with both fractions > 0, 2 with one).
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(
            f"val and test fractions must be in [0, 1) and sum below 1, got {val_fraction}, {test_fraction}"
        )
    train: list[Sample] = []
    val: list[Sample] = []
    test: list[Sample] = []
    for label, group in sorted(_by_label(samples).items()):
        group = sorted(group, key=_order)
        random.Random(f"{seed}:{label}").shuffle(group)  # per class: other classes do not shift it
        n_val, n_test = _split_sizes(len(group), val_fraction, test_fraction)
        val += group[:n_val]
        test += group[n_val : n_val + n_test]
        train += group[n_val + n_test :]
    return sorted(train, key=_order), sorted(val, key=_order), sorted(test, key=_order)


# --------------------------------------------------------------------------- preparing a dataset


def _require_counts(samples: Sequence[Sample], classes: Sequence[str], minimum: int, where: Path) -> None:
    counts = class_counts(samples, len(classes))
    few = [f"{name!r} has {n}" for name, n in zip(classes, counts, strict=True) if n < minimum]
    if few:
        raise DataError(
            f"{where}: too few usable images per class (need at least {minimum}): {', '.join(few)}; "
            "add images or remove the class folder"
        )


def _require_two_classes(classes: Sequence[str], root: Path) -> None:
    if len(classes) < 2:
        raise DataError(f"{root}: found only the class {', '.join(classes)}; a classifier needs at least two")


def _prepare_single(root: Path, *, val_split: float, test_split: float, seed: int, minimum: int) -> DataSplits:
    classes, samples = scan_folder(root)
    _require_two_classes(classes, root)
    good, skipped = check_images(samples)
    needed = 1 + (val_split > 0) + (test_split > 0)
    _require_counts(good, classes, max(minimum, needed), root)
    train, val, test = stratified_split(good, val_fraction=val_split, test_fraction=test_split, seed=seed)
    return DataSplits(classes, tuple(train), tuple(val), tuple(test), tuple(skipped))


def _prepare_presplit(root: Path, *, minimum: int) -> DataSplits:
    classes, train = scan_folder(root / "train")
    _require_two_classes(classes, root / "train")
    names = ["train", "val"] + (["test"] if (root / "test").is_dir() else [])
    scanned = {"train": train} | {name: scan_folder(root / name, classes)[1] for name in names[1:]}
    checked: dict[str, list[Sample]] = {}
    skipped: list[tuple[Path, str]] = []
    for name in names:
        checked[name], bad = check_images(scanned[name])
        skipped += bad
        _require_counts(checked[name], classes, minimum if name == "train" else 1, root / name)
    if "test" not in checked:
        logger.info("%s has no test/ folder: the test split is the validation split", root)
        checked["test"] = checked["val"]
    return DataSplits(classes, tuple(checked["train"]), tuple(checked["val"]), tuple(checked["test"]), tuple(skipped))


def prepare_data(
    data_dir: Path,
    *,
    val_split: float = 0.15,
    test_split: float = 0.15,
    seed: int = 0,
    min_images_per_class: int = 3,
) -> DataSplits:
    """Scan, check and split an image folder (either layout); raises DataError on unusable data.

    With ``train/`` and ``val/`` subfolders the given split is kept (``val_split``/``test_split``
    and ``seed`` are unused) and, without ``test/``, test is val. ``min_images_per_class`` counts
    usable images in the whole folder, or in ``train/`` for a pre-split layout.
    """
    root = data_dir.expanduser().resolve()
    if not root.is_dir():
        raise DataError(f"{data_dir}: no such folder")
    has_train, has_val = (root / "train").is_dir(), (root / "val").is_dir()
    if has_train and has_val:
        splits = _prepare_presplit(root, minimum=min_images_per_class)
    elif has_train or has_val:
        raise DataError(f"{root}: found only one of train/ and val/; give both, or one folder of class subfolders")
    else:
        splits = _prepare_single(
            root, val_split=val_split, test_split=test_split, seed=seed, minimum=min_images_per_class
        )
    logger.info(
        "%d classes; %d train, %d val, %d test images; %d skipped",
        splits.num_classes, len(splits.train), len(splits.val), len(splits.test), len(splits.skipped),
    )  # fmt: skip
    return splits


# --------------------------------------------------------------------------- saving and loading


def save_splits(splits: DataSplits, out_dir: Path) -> None:
    """Write ``out_dir/splits/``: classes.txt, {train,val,test}.txt (``path<TAB>class``), skipped.txt."""
    folder = out_dir / SPLITS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "classes.txt").write_text("".join(f"{c}\n" for c in splits.classes), encoding="utf-8")
    for name in SPLIT_NAMES:
        lines = (f"{s.path}\t{splits.classes[s.label]}\n" for s in getattr(splits, name))
        (folder / f"{name}.txt").write_text("".join(lines), encoding="utf-8")
    skipped = (f"{path}\t{' '.join(reason.split())}\n" for path, reason in splits.skipped)
    (folder / "skipped.txt").write_text("".join(skipped), encoding="utf-8")


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError as exc:
        raise DataError(f"{path}: missing; the run folder has no saved splits") from exc


def _load_split(path: Path, classes: tuple[str, ...]) -> tuple[Sample, ...]:
    index = {name: i for i, name in enumerate(classes)}
    samples: list[Sample] = []
    for number, line in enumerate(_read_lines(path), start=1):
        file_name, sep, class_name = line.rpartition("\t")
        if not sep or class_name not in index:
            raise DataError(f"{path}:{number}: expected 'path<TAB>class' with a known class, got {line!r}")
        samples.append(Sample(Path(file_name), index[class_name]))
    missing = [s.path for s in samples if not s.path.is_file()]
    if missing:
        raise DataError(
            f"{path}: {len(missing)} listed image(s) no longer exist (first: {missing[0]}); "
            "the data was moved or deleted since the run started"
        )
    return tuple(samples)


def load_splits(out_dir: Path) -> DataSplits:
    """Read the splits written by :func:`save_splits` (for ``--resume``); DataError if files moved."""
    folder = out_dir / SPLITS_DIR
    classes = tuple(_read_lines(folder / "classes.txt"))
    if not classes:
        raise DataError(f"{folder / 'classes.txt'}: no classes")
    train, val, test = (_load_split(folder / f"{name}.txt", classes) for name in SPLIT_NAMES)
    skipped_path = folder / "skipped.txt"
    skipped_lines = _read_lines(skipped_path) if skipped_path.exists() else []
    skipped = tuple((Path(p), r) for p, _, r in (line.partition("\t") for line in skipped_lines))
    return DataSplits(classes, train, val, test, skipped)


# --------------------------------------------------------------------------- dataset and balance


class ImageDataset(Dataset[tuple[torch.Tensor, int]]):
    """Samples decoded with the server's decoder (RGB PIL image), then ``transform`` -> tensor.

    ``draft_to`` > 0 decodes a large JPEG in draft mode as the server does (``service.preprocess.draft_size``):
    for evaluation, so finetune's answers are the server's; training decodes whole images.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        transform: Callable[[Image.Image], torch.Tensor],
        *,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        draft_to: int = 0,
    ) -> None:
        self.samples = tuple(samples)
        self.transform = transform
        self.max_pixels = max_pixels
        self.draft_to = draft_to

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        sample = self.samples[index]
        data = sample.path.read_bytes()
        image = decode_image(data, max_pixels=self.max_pixels, source=str(sample.path), draft_to=self.draft_to)
        return self.transform(image), sample.label

    @property
    def targets(self) -> list[int]:
        return [s.label for s in self.samples]


def class_counts(samples: Iterable[Sample], num_classes: int) -> list[int]:
    """Images per class index."""
    counts = [0] * num_classes
    for sample in samples:
        counts[sample.label] += 1
    return counts


def class_weights(counts: Sequence[int]) -> torch.Tensor:
    """Inverse-frequency loss weights (float32), mean 1 over the classes present; absent classes get 0."""
    inverse = torch.tensor([1.0 / n if n > 0 else 0.0 for n in counts], dtype=torch.float32)
    present = int((inverse > 0).sum())
    return inverse * (present / inverse.sum()) if present else inverse


def resolve_balance(mode: str, counts: Sequence[int]) -> str:
    """``auto`` -> ``weights`` when the largest class is over 1.5x the smallest, else ``none``."""
    if mode not in BALANCE_MODES:
        raise ValueError(f"balance={mode!r} is not one of {', '.join(BALANCE_MODES)}")
    if mode != "auto":
        return mode
    present = [n for n in counts if n > 0]
    ratio = max(present) / min(present) if present else 1.0
    resolved = "weights" if ratio > IMBALANCE_RATIO else "none"
    logger.info("balance auto: largest/smallest class = %.2f -> %s", ratio, resolved)
    return resolved


def make_sampler(samples: Sequence[Sample], num_classes: int, *, seed: int) -> WeightedRandomSampler:
    """Draw ``len(samples)`` per epoch with replacement, each class equally likely; seeded."""
    counts = class_counts(samples, num_classes)
    weights = [1.0 / counts[s.label] for s in samples]
    generator = torch.Generator().manual_seed(seed)
    return WeightedRandomSampler(weights, len(samples), replacement=True, generator=generator)
