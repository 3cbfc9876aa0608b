"""Image folders and label files: scan, check, split (stratified, seeded), and class balance.

Two folder layouts are accepted: one folder of class subfolders (split here, per class), or ``train/``
and ``val/`` (and optionally ``test/``) subfolders that each hold the same class subfolders. Or a
label file (``finetune.labels``: CSV or JSONL, optionally with a split column) names the images and
their labels, one or many per image. Every image is decoded once up front with the server's
decoder, so a corrupt file is reported by name before training instead of failing an epoch.
Multi-label data is split by iterative stratification (``finetune.stratify``); the splits are
saved and loaded by ``finetune.splits`` (re-exported here).

    splits = prepare_data(Path("imgs"), val_split=0.15, test_split=0.15, seed=0)
    splits = prepare_data(Path("imgs"), labels_file=Path("imgs/labels.csv"), task="auto")
    train_set = ImageDataset(splits.train, train_transform(spec))
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset, WeightedRandomSampler

from finetune.config import BALANCE_MODES
from finetune.labels import binary_classes, check_task, read_labels, resolve_labels
from finetune.splits import SPLIT_NAMES as SPLIT_NAMES
from finetune.splits import SPLITS_DIR as SPLITS_DIR
from finetune.splits import DataError as DataError
from finetune.splits import DataSplits as DataSplits
from finetune.splits import Sample as Sample
from finetune.splits import load_splits as load_splits
from finetune.splits import save_splits as save_splits
from finetune.stratify import check_fractions, multilabel_split, split_sizes
from service.errors import InvalidInput
from service.preprocess import DEFAULT_MAX_PIXELS, decode_image

logger = logging.getLogger(__name__)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
IMBALANCE_RATIO = 1.5  # "auto" balancing turns on above this max/min class-count ratio


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


def stratified_split(
    samples: Sequence[Sample], *, val_fraction: float, test_fraction: float, seed: int
) -> tuple[list[Sample], list[Sample], list[Sample]]:
    """Split per class with a seeded shuffle; returns (train, val, test), each sorted by label and path.

    Deterministic for a seed and independent of the input order. Every class gets at least one
    image in val and in test (when its fraction is > 0) and at least one in train when it has
    enough images (3 with both fractions > 0, 2 with one).
    """
    check_fractions(val_fraction, test_fraction)
    train: list[Sample] = []
    val: list[Sample] = []
    test: list[Sample] = []
    for label, group in sorted(_by_label(samples).items()):
        group = sorted(group, key=_order)
        random.Random(f"{seed}:{label}").shuffle(group)  # per class: other classes do not shift it
        n_val, n_test = split_sizes(len(group), val_fraction, test_fraction)
        val += group[:n_val]
        test += group[n_val : n_val + n_test]
        train += group[n_val + n_test :]
    return sorted(train, key=_order), sorted(val, key=_order), sorted(test, key=_order)


# --------------------------------------------------------------------------- preparing a dataset


@dataclass(frozen=True)
class _Options:
    val_split: float
    test_split: float
    seed: int
    minimum: int
    task: str
    positive: str | None


def _require_counts(samples: Sequence[Sample], classes: Sequence[str], minimum: int, where: object) -> None:
    counts = class_counts(samples, len(classes))
    few = [f"{name!r} has {n}" for name, n in zip(classes, counts, strict=True) if n < minimum]
    if few:
        raise DataError(
            f"{where}: too few usable images per class (need at least {minimum}): {', '.join(few)}; "
            "add images or remove the class"
        )


def _require_classes(classes: Sequence[str], task: str, where: object) -> None:
    if task == "multilabel" and not classes:
        raise DataError(f"{where}: no labels found")
    if task != "multilabel" and len(classes) < 2:
        raise DataError(f"{where}: found only the class {', '.join(classes)}; a classifier needs at least two")


def _require_usable(samples: Sequence[object], skipped: Sequence[tuple[Path, str]], where: object) -> None:
    if not samples:
        reasons = "; ".join(reason for _, reason in skipped[:3]) + ("; ..." if len(skipped) > 3 else "")
        raise DataError(f"{where}: no usable images ({len(skipped)} skipped: {reasons or 'none listed'})")


def _folder_task(
    classes: tuple[str, ...], parts: list[list[Sample]], options: _Options, root: Path
) -> tuple[str, tuple[str, ...], list[list[Sample]]]:
    """Folders for a task: multiclass as scanned (``auto`` too); binary reorders the two classes to
    (negative, positive); multilabel gives each image its one folder label."""
    task = "multiclass" if options.task == "auto" else options.task
    check_task(options.task, options.positive, task, root)
    if task == "multilabel":
        return task, classes, [[Sample(s.path, -1, (s.label,)) for s in part] for part in parts]
    if task == "binary":
        ordered = binary_classes(classes, options.positive, root)
        new_index = [ordered.index(name) for name in classes]
        return task, ordered, [[Sample(s.path, new_index[s.label]) for s in part] for part in parts]
    return task, classes, parts


def _split_here(
    classes: tuple[str, ...], task: str, good: list[Sample], skipped: Sequence[tuple[Path, str]],
    options: _Options, where: object,
) -> DataSplits:  # fmt: skip
    needed = 1 + (options.val_split > 0) + (options.test_split > 0)
    _require_counts(good, classes, max(options.minimum, needed), where)
    split = multilabel_split if task == "multilabel" else stratified_split
    train, val, test = split(good, val_fraction=options.val_split, test_fraction=options.test_split, seed=options.seed)
    return DataSplits(classes, tuple(train), tuple(val), tuple(test), tuple(skipped), task)


def _keep_given(
    classes: tuple[str, ...], task: str, parts: dict[str, list[Sample]], skipped: Sequence[tuple[Path, str]],
    minimum: int, where: dict[str, object],
) -> DataSplits:  # fmt: skip
    """Splits as given; without a test split, test is val."""
    if not parts.get("test"):
        logger.info("no test/ folder or test rows (%s): the test split is the validation split", where["test"])
        parts["test"] = parts["val"]
    for name, part in parts.items():
        _require_counts(part, classes, minimum if name == "train" else 1, where[name])
    train, val, test = (tuple(sorted(parts[name], key=_order)) for name in SPLIT_NAMES)
    return DataSplits(classes, train, val, test, tuple(skipped), task)


def _prepare_single(root: Path, options: _Options) -> DataSplits:
    classes, samples = scan_folder(root)
    _require_classes(classes, "multiclass", root)
    task, classes, (samples,) = _folder_task(classes, [samples], options, root)
    good, skipped = check_images(samples)
    return _split_here(classes, task, good, skipped, options, root)


def _prepare_presplit(root: Path, options: _Options) -> DataSplits:
    classes, train = scan_folder(root / "train")
    _require_classes(classes, "multiclass", root / "train")
    names = ["train", "val"] + (["test"] if (root / "test").is_dir() else [])
    scanned = [train] + [scan_folder(root / name, classes)[1] for name in names[1:]]
    task, classes, scanned = _folder_task(classes, scanned, options, root)
    checked: dict[str, list[Sample]] = {}
    skipped: list[tuple[Path, str]] = []
    for name, part in zip(names, scanned, strict=True):
        checked[name], bad = check_images(part)
        skipped += bad
    return _keep_given(classes, task, checked, skipped, options.minimum, {name: root / name for name in SPLIT_NAMES})


def _prepare_labelled(root: Path, source: Path, options: _Options, delimiter: str) -> DataSplits:
    table = read_labels(source, root, delimiter=delimiter)
    labelled = resolve_labels(table, task=options.task, positive=options.positive)
    _require_usable(labelled.samples, labelled.skipped, source)
    _require_classes(labelled.classes, labelled.task, source)
    good, bad = check_images([sample for sample, _ in labelled.samples])
    skipped = [*labelled.skipped, *bad]
    _require_usable(good, skipped, source)
    asked = {sample.path: split for sample, split in labelled.samples}
    if not any(asked.values()):
        return _split_here(labelled.classes, labelled.task, good, skipped, options, source)
    parts = {name: [s for s in good if (asked[s.path] or "train") == name] for name in SPLIT_NAMES}
    if not parts["val"]:
        raise DataError(f"{source}: the split column names no val rows; mark some rows val, or drop the column")
    where: dict[str, object] = {name: f"{source} ({name} rows)" for name in SPLIT_NAMES}
    return _keep_given(labelled.classes, labelled.task, parts, skipped, options.minimum, where)


def _label_path(labels_file: Path, root: Path) -> Path:
    """The label file as given, or inside the data folder when only that one exists."""
    path = labels_file.expanduser()
    return root / path if not path.is_file() and not path.is_absolute() and (root / path).is_file() else path


def prepare_data(
    data_dir: Path,
    *,
    val_split: float = 0.15,
    test_split: float = 0.15,
    seed: int = 0,
    min_images_per_class: int = 3,
    labels_file: Path | None = None,
    task: str = "auto",
    positive: str | None = None,
    label_delimiter: str = ";",
) -> DataSplits:
    """Scan, check and split an image folder (either layout) or the images a label file names; raises
    DataError on unusable data.

    With ``train/`` and ``val/`` subfolders (or a label file with a split column) the given split is
    kept (``val_split``/``test_split`` and ``seed`` are unused) and, without a test split, test is val.
    ``min_images_per_class`` counts usable images (multilabel: per label, the images that have it) in
    the whole data set, or in train for a given split. ``task``: ``auto`` (``finetune.labels.infer_task``;
    folders: multiclass), ``multiclass``, ``multilabel`` or ``binary`` (two classes, ordered
    (negative, positive); ``positive`` names the positive one). ``label_delimiter`` separates several
    labels in a path,label CSV cell.
    """
    root = data_dir.expanduser().resolve()
    if not root.is_dir():
        raise DataError(f"{data_dir}: no such folder")
    options = _Options(val_split, test_split, seed, min_images_per_class, task, positive)
    has_train, has_val = (root / "train").is_dir(), (root / "val").is_dir()
    if labels_file is not None:
        splits = _prepare_labelled(root, _label_path(labels_file, root), options, label_delimiter)
    elif has_train and has_val:
        splits = _prepare_presplit(root, options)
    elif has_train or has_val:
        raise DataError(f"{root}: found only one of train/ and val/; give both, or one folder of class subfolders")
    else:
        splits = _prepare_single(root, options)
    logger.info(
        "%s, %d classes; %d train, %d val, %d test images; %d skipped", splits.task,
        splits.num_classes, len(splits.train), len(splits.val), len(splits.test), len(splits.skipped),
    )  # fmt: skip
    return splits


# --------------------------------------------------------------------------- dataset and balance


class ImageDataset(Dataset[tuple[torch.Tensor, Any]]):
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
        target: Callable[[Sample], Any] | None = None,
    ) -> None:
        self.samples = tuple(samples)
        self.transform = transform
        self.max_pixels = max_pixels
        self.draft_to = draft_to
        self.target = target  # the task's target encoding (finetune.tasks); None: the class index

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Any]:
        sample = self.samples[index]
        data = sample.path.read_bytes()
        image = decode_image(data, max_pixels=self.max_pixels, source=str(sample.path), draft_to=self.draft_to)
        return self.transform(image), sample.label if self.target is None else self.target(sample)

    @property
    def targets(self) -> list[int]:
        return [s.label for s in self.samples]


def class_counts(samples: Iterable[Sample], num_classes: int) -> list[int]:
    """Images per class index; for multi-label samples, the images that have each label (positives)."""
    counts = [0] * num_classes
    for sample in samples:
        for index in sample.indices:
            counts[index] += 1
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
    """Draw ``len(samples)`` per epoch with replacement, each class equally likely; seeded. A multi-label
    image weighs as its rarest label (one with none of the labels: as a label of ``len(samples)``)."""
    counts = class_counts(samples, num_classes)
    weights = [max((1.0 / counts[i] for i in s.indices), default=1.0 / len(samples)) for s in samples]
    generator = torch.Generator().manual_seed(seed)
    return WeightedRandomSampler(weights, len(samples), replacement=True, generator=generator)
