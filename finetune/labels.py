"""Label files beside the image folder (``--labels``): read them, infer the task, build the samples.

Three layouts, paths relative to the data folder, an optional ``split`` column/key (train, val, test):

- CSV ``path,label``: one row per image; several labels in one cell are split at ``delimiter``
  (default ``;``); the column may also be called ``labels``.
- CSV ``path`` plus one 0/1 column per label (any other column names; the names are the labels); an
  all-zero row means "none of the labels".
- JSONL: one object per line, ``{"path": ..., "labels": [...]}`` (or ``"label": "x"``).

A bad row (missing file, no label in a path,label file, an unknown column or key, a duplicate path, an
unknown split, a line that does not parse) is left out and named as ``file:line: reason`` in the
skipped list; a header that fits no layout is a DataError.

    table = read_labels(Path("imgs/labels.csv"), Path("imgs"))
    labelled = resolve_labels(table, task="auto")       # task, classes, (sample, split) pairs
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.config import TASK_CHOICES
from finetune.splits import SPLIT_NAMES, DataError, Sample

logger = logging.getLogger(__name__)

LABEL_COLUMNS = ("label", "labels")
JSON_KEYS = frozenset({"path", "label", "labels", "split"})

Skipped = tuple[Path, str]


class BadRow(ValueError):
    """One row of a label file that cannot be used; the message says why."""


@dataclass(frozen=True)
class LabelRow:
    """One usable row: the image (data folder / path), its label names, the split it asks for."""

    path: Path
    names: tuple[str, ...]
    split: str | None
    where: str  # "labels.csv:3"


@dataclass(frozen=True)
class LabelTable:
    """A label file read: its rows, every label name (sorted), whether it has one 0/1 column per label."""

    source: Path
    rows: tuple[LabelRow, ...]
    names: tuple[str, ...]
    columns: bool
    skipped: tuple[Skipped, ...] = ()


@dataclass(frozen=True)
class Labelled:
    """The rows as samples of the resolved task, each with the split its row asks for (None: any)."""

    task: str
    classes: tuple[str, ...]
    samples: tuple[tuple[Sample, str | None], ...]
    skipped: tuple[Skipped, ...]


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class _Raw:
    """A row as parsed, before the checks that need the data folder."""

    path: str
    names: tuple[str, ...]
    split: str | None


def _csv_layout(header: list[str], source: Path) -> tuple[str | None, tuple[str, ...]]:
    """(the label column, or None for 0/1 columns; the 0/1 label columns)."""
    duplicated = sorted({name for name in header if header.count(name) > 1})
    if duplicated or "path" not in header:
        why = f"duplicate column(s) {', '.join(duplicated)}" if duplicated else "no 'path' column"
        raise DataError(f"{source}:1: {why}; expected path,label or path plus one 0/1 column per label")
    label_columns = [name for name in header if name in LABEL_COLUMNS]
    others = [name for name in header if name not in ("path", "split", *LABEL_COLUMNS)]
    if len(label_columns) > 1 or (label_columns and others):
        extra = label_columns[1:] + others
        raise DataError(
            f"{source}:1: unknown column(s) {', '.join(extra)} beside {label_columns[0]!r}; a path,label file has "
            "only path, label and split columns"
        )
    if not label_columns and not others:
        raise DataError(f"{source}:1: no label column; expected path,label or path plus one 0/1 column per label")
    return (label_columns[0] if label_columns else None), tuple(sorted(others))


def _flag(value: str, column: str) -> bool:
    if value.strip() not in ("0", "1"):
        raise BadRow(f"column {column!r} must be 0 or 1, got {value!r}")
    return value.strip() == "1"


def _csv_row(cells: dict[str, str], label_column: str | None, flags: tuple[str, ...], delimiter: str) -> _Raw:
    if label_column is None:
        names = tuple(name for name in flags if _flag(cells[name], name))
    else:
        names = tuple(dict.fromkeys(p.strip() for p in cells[label_column].split(delimiter) if p.strip()))
        if not names:
            raise BadRow("no label")
    return _Raw(cells["path"].strip(), names, cells.get("split"))


def _read_csv(source: Path, delimiter: str) -> tuple[tuple[str, ...], bool, Iterator[tuple[int, _Raw | BadRow]]]:
    """(the 0/1 label columns, whether the file has them, the rows by line number)."""
    reader = csv.reader(source.read_text(encoding="utf-8-sig").splitlines(keepends=True))
    header = [name.strip() for name in next(reader, [])]
    if not header:
        raise DataError(f"{source}: empty; expected a header line such as path,label")
    label_column, flags = _csv_layout(header, source)

    def rows() -> Iterator[tuple[int, _Raw | BadRow]]:
        for cells in reader:
            if not any(cell.strip() for cell in cells):
                continue
            if len(cells) != len(header):
                yield reader.line_num, BadRow(f"{len(cells)} fields, the header has {len(header)} (an unknown column?)")
                continue
            try:
                yield reader.line_num, _csv_row(dict(zip(header, cells, strict=True)), label_column, flags, delimiter)
            except BadRow as exc:
                yield reader.line_num, exc

    return flags, label_column is None, rows()


def _json_names(item: dict[str, Any]) -> tuple[str, ...]:
    if "label" in item and "labels" in item:
        raise BadRow("both 'label' and 'labels'")
    if "label" in item:
        if not isinstance(item["label"], str) or not item["label"].strip():
            raise BadRow(f"'label' must be a non-empty string, got {item['label']!r}")
        return (item["label"].strip(),)
    labels = item.get("labels")
    if not isinstance(labels, list) or not all(isinstance(n, str) and n.strip() for n in labels):
        raise BadRow(f"'labels' must be a list of non-empty strings, got {labels!r}")
    return tuple(dict.fromkeys(n.strip() for n in labels))


def _json_row(line: str) -> _Raw:
    try:
        item = json.loads(line)
    except json.JSONDecodeError as exc:
        raise BadRow(f"not valid JSON ({exc.msg})") from exc
    if not isinstance(item, dict):
        raise BadRow('expected a JSON object such as {"path": ..., "labels": [...]}')
    unknown = sorted(set(item) - JSON_KEYS)
    if unknown:
        raise BadRow(f"unknown key(s) {', '.join(unknown)} (expected path, labels or label, split)")
    if not isinstance(item.get("path"), str):
        raise BadRow("no 'path' string")
    split = item.get("split")
    if split is not None and not isinstance(split, str):
        raise BadRow(f"'split' must be a string, got {split!r}")
    return _Raw(item["path"].strip(), _json_names(item), split)


def _read_jsonl(source: Path) -> Iterator[tuple[int, _Raw | BadRow]]:
    with source.open(encoding="utf-8-sig") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield number, _json_row(line)
            except BadRow as exc:
                yield number, exc


def _checked_row(raw: _Raw, root: Path, where: str, seen: dict[Path, str]) -> LabelRow:
    """The row of a parsed line; BadRow when the file is missing or listed before, or the split is unknown."""
    if not raw.path:
        raise BadRow("empty path")
    image = Path(os.path.normpath(root / raw.path))
    split = (raw.split or "").strip().lower() or None
    if split is not None and split not in SPLIT_NAMES:
        raise BadRow(f"unknown split {raw.split!r} (expected {', '.join(SPLIT_NAMES)})")
    if not image.is_file():
        raise BadRow(f"{raw.path}: no such file")
    if image in seen:
        raise BadRow(f"{raw.path}: duplicate of {seen[image]}")
    return LabelRow(image, raw.names, split, where)


def read_labels(source: Path, root: Path, *, delimiter: str = ";") -> LabelTable:
    """Read a ``.csv`` or ``.jsonl`` label file; image paths are relative to ``root``. Bad rows are skipped."""
    if not source.is_file():
        raise DataError(f"{source}: no such label file")
    if not delimiter:
        raise ValueError("the label delimiter must not be empty")
    flags: tuple[str, ...] = ()
    if source.suffix.lower() == ".jsonl":
        columns, parsed = False, _read_jsonl(source)
    else:
        flags, columns, parsed = _read_csv(source, delimiter)
    rows: list[LabelRow] = []
    skipped: list[Skipped] = []
    seen: dict[Path, str] = {}
    for number, raw in parsed:
        where = f"{source.name}:{number}"
        try:
            if isinstance(raw, BadRow):
                raise raw
            row = _checked_row(raw, root, where, seen)
        except BadRow as exc:
            named = root / raw.path if isinstance(raw, _Raw) and raw.path else source
            skipped.append((named, f"{where}: {exc}"))
            logger.warning("skipping %s", skipped[-1][1])
            continue
        seen[row.path] = where
        rows.append(row)
    names = flags if columns else tuple(sorted({n for row in rows for n in row.names}))
    return LabelTable(source, tuple(rows), names, columns, tuple(skipped))


# --------------------------------------------------------------------------- tasks


def infer_task(table: LabelTable) -> str:
    """multilabel when a row has several labels or the file has 0/1 columns for 2+ labels; binary with one
    0/1 column; else multiclass."""
    if table.columns:
        return "multilabel" if len(table.names) >= 2 else "binary"
    return "multilabel" if any(len(row.names) > 1 for row in table.rows) else "multiclass"


def binary_classes(
    names: Sequence[str], positive: str | None, where: object, *, default: str | None = None
) -> tuple[str, str]:
    """(negative, positive) of two classes: ``positive`` when given, else ``default``, else the second sorted."""
    if len(names) != 2:
        found = ", ".join(names) or "none"
        raise DataError(f"{where}: a binary task needs exactly two classes, found {len(names)} ({found})")
    chosen = positive if positive is not None else default or sorted(names)[1]
    if chosen not in names:
        raise DataError(f"{where}: positive label {chosen!r} is not one of the classes {', '.join(names)}")
    return next(n for n in names if n != chosen), chosen


def check_task(task: str, positive: str | None, resolved: str, where: object) -> None:
    """ValueError for an unknown task; DataError for a positive label with a task that is not binary."""
    if task not in TASK_CHOICES:
        raise ValueError(f"task must be one of {', '.join(TASK_CHOICES)}, got {task!r}")
    if positive is not None and resolved != "binary":
        raise DataError(f"{where}: a positive label ({positive!r}) is only for a binary task, the task is {resolved}")


def _single_names(table: LabelTable, task: str) -> tuple[list[tuple[LabelRow, str]], list[Skipped], tuple[str, ...]]:
    """The rows with their one label, rows without one (skipped), and the classes before a binary order."""
    single: list[tuple[LabelRow, str]] = []
    skipped: list[Skipped] = []
    one_column = table.columns and len(table.names) == 1
    for row in table.rows:
        if len(row.names) > 1:
            raise DataError(
                f"{row.where}: {len(row.names)} labels ({', '.join(row.names)}) but a {task} task takes one label "
                "per image; use the multilabel task"
            )
        if one_column:
            single.append((row, row.names[0] if row.names else f"not {table.names[0]}"))
        elif row.names:
            single.append((row, row.names[0]))
        else:
            skipped.append((row.path, f"{row.where}: no label (an image without labels needs the multilabel task)"))
    classes = (f"not {table.names[0]}", table.names[0]) if one_column else tuple(sorted({n for _, n in single}))
    return single, skipped, classes


def resolve_labels(table: LabelTable, *, task: str = "auto", positive: str | None = None) -> Labelled:
    """The task (``auto``: :func:`infer_task`), the classes (binary: (negative, positive)) and the samples."""
    resolved = infer_task(table) if task == "auto" else task
    check_task(task, positive, resolved, table.source)
    if resolved == "multilabel":
        index = {name: i for i, name in enumerate(table.names)}
        samples = tuple((Sample(r.path, -1, tuple(sorted(index[n] for n in r.names))), r.split) for r in table.rows)
        return Labelled(resolved, table.names, samples, table.skipped)
    single, skipped, classes = _single_names(table, resolved)
    if resolved == "binary":
        one_column = table.columns and len(table.names) == 1
        classes = binary_classes(classes, positive, table.source, default=table.names[0] if one_column else None)
    index = {name: i for i, name in enumerate(classes)}
    pairs = tuple((Sample(row.path, index[name]), row.split) for row, name in single)
    return Labelled(resolved, classes, pairs, table.skipped + tuple(skipped))
