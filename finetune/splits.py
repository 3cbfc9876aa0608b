"""The data splits of a run: their types (:class:`Sample`, :class:`DataSplits`) and their files in the run folder.

``save_splits`` writes ``<run>/splits/`` so that ``--resume`` (and every DDP rank) reads back exactly the
split the run started with; ``load_splits`` reads it. A single-label line is ``path<TAB>class``; a
multi-label line is ``path<TAB>label<TAB>label...`` (just ``path<TAB>`` for an image with none of the
labels). ``task.txt`` names the task; a run folder without it (written before tasks) is multiclass.

    save_splits(prepare_data(Path("imgs")), run_dir)
    splits = load_splits(run_dir)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from service.tasks import TASKS

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


def _line(sample: Sample, classes: tuple[str, ...], task: str) -> str:
    names = [classes[i] for i in sample.labels] if task == "multilabel" else [classes[sample.label]]
    return "\t".join([str(sample.path), *names]) + ("\n" if names else "\t\n")  # no labels: "path<TAB>"


def save_splits(splits: DataSplits, out_dir: Path) -> None:
    """Write ``out_dir/splits/``: classes.txt, task.txt, {train,val,test}.txt, skipped.txt."""
    folder = out_dir / SPLITS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "classes.txt").write_text("".join(f"{c}\n" for c in splits.classes), encoding="utf-8")
    (folder / "task.txt").write_text(f"{splits.task}\n", encoding="utf-8")
    for name in SPLIT_NAMES:
        lines = (_line(s, splits.classes, splits.task) for s in getattr(splits, name))
        (folder / f"{name}.txt").write_text("".join(lines), encoding="utf-8")
    skipped = (f"{path}\t{' '.join(reason.split())}\n" for path, reason in splits.skipped)
    (folder / "skipped.txt").write_text("".join(skipped), encoding="utf-8")


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError as exc:
        raise DataError(f"{path}: missing; the run folder has no saved splits") from exc


def _parse_line(line: str, index: dict[str, int], task: str) -> Sample | None:
    """The sample of one line, or None when it does not parse."""
    if task == "multilabel":
        file_name, *names = line.split("\t")
        names = [n for n in names if n]
        if ("\t" not in line) or any(n not in index for n in names):
            return None
        return Sample(Path(file_name), -1, tuple(index[n] for n in names))
    file_name, sep, class_name = line.rpartition("\t")
    return Sample(Path(file_name), index[class_name]) if sep and class_name in index else None


def _load_split(path: Path, classes: tuple[str, ...], task: str) -> tuple[Sample, ...]:
    index = {name: i for i, name in enumerate(classes)}
    expected = (
        "path<TAB>label<TAB>... with known labels" if task == "multilabel" else "path<TAB>class with a known class"
    )
    samples: list[Sample] = []
    for number, line in enumerate(_read_lines(path), start=1):
        sample = _parse_line(line, index, task)
        if sample is None:
            raise DataError(f"{path}:{number}: expected '{expected}', got {line!r}")
        samples.append(sample)
    missing = [s.path for s in samples if not s.path.is_file()]
    if missing:
        raise DataError(
            f"{path}: {len(missing)} listed image(s) no longer exist (first: {missing[0]}); "
            "the data was moved or deleted since the run started"
        )
    return tuple(samples)


def _read_task(folder: Path) -> str:
    path = folder / "task.txt"
    task = path.read_text(encoding="utf-8").strip() if path.exists() else "multiclass"  # before tasks: multiclass
    if task not in TASKS:
        raise DataError(f"{path}: unknown task {task!r} (expected one of {', '.join(TASKS)})")
    return task


def load_splits(out_dir: Path) -> DataSplits:
    """Read the splits written by :func:`save_splits` (for ``--resume``); DataError if files moved."""
    folder = out_dir / SPLITS_DIR
    classes = tuple(_read_lines(folder / "classes.txt"))
    if not classes:
        raise DataError(f"{folder / 'classes.txt'}: no classes")
    task = _read_task(folder)
    train, val, test = (_load_split(folder / f"{name}.txt", classes, task) for name in SPLIT_NAMES)
    skipped_path = folder / "skipped.txt"
    skipped_lines = _read_lines(skipped_path) if skipped_path.exists() else []
    skipped = tuple((Path(p), r) for p, _, r in (line.partition("\t") for line in skipped_lines))
    return DataSplits(classes, train, val, test, skipped, task)
