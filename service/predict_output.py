"""``predict``'s output: one row per image, CSV or JSONL, written as batches finish; resumable.

CSV: header ``path,labels,scores,error``; ``labels`` and ``scores`` are joined by ``;``, best first;
``error`` is empty for a classified image and says why for one that could not be read (its labels
and scores are then empty). JSONL: ``{"path": ..., "labels": [...], "scores": [...]}`` per image, or
``{"path": ..., "error": "..."}``.

``--resume`` reopens an output that a killed run left behind: a partly written last line is cut
off, the paths already there are skipped, and new rows are appended, so each path has one row.

    writer, done = open_output(Path("predictions.csv"), "csv", resume=True)
    writer.write([Row("a.jpg", ("rose",), (0.93,))]); writer.close()
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol

FORMATS = ("csv", "jsonl")
CSV_COLUMNS = ("path", "labels", "scores", "error")
JOIN = ";"
DIGITS = 6  # decimals of a score


class OutputError(ValueError):
    """The output cannot be written or resumed (exists without --resume, not a predict output)."""


@dataclass(frozen=True)
class Row:
    """One image's answer (labels and probabilities, best first), or why it has none."""

    path: str
    labels: tuple[str, ...] = ()
    scores: tuple[float, ...] = ()
    error: str = ""


class Writer(Protocol):
    def write(self, rows: Sequence[Row]) -> None:
        """Append ``rows`` and flush them to the file."""
        ...

    def close(self) -> None: ...


def format_for(out: Path, requested: str | None = None) -> str:
    """``requested``, else the format named by ``out``'s suffix (.csv; .jsonl, .ndjson, .json)."""
    if requested:
        if requested not in FORMATS:
            raise OutputError(f"unknown output format {requested!r}: use {' or '.join(FORMATS)}")
        return requested
    suffix = out.suffix.lower()
    if suffix == ".csv":
        return "csv"
    if suffix in (".jsonl", ".ndjson", ".json"):
        return "jsonl"
    raise OutputError(f"{out}: cannot tell the format from its suffix: name it .csv or .jsonl, or pass --format")


class CsvWriter:
    def __init__(self, fh: IO[str], *, header: bool) -> None:
        self._fh = fh
        self._csv = csv.writer(fh, lineterminator="\n")
        if header:
            self._csv.writerow(CSV_COLUMNS)

    def write(self, rows: Sequence[Row]) -> None:
        for row in rows:
            scores = JOIN.join(f"{s:.{DIGITS}f}" for s in row.scores)
            self._csv.writerow((row.path, JOIN.join(row.labels), scores, row.error))
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


class JsonlWriter:
    def __init__(self, fh: IO[str]) -> None:
        self._fh = fh

    def write(self, rows: Sequence[Row]) -> None:
        for row in rows:
            record: dict[str, object] = {"path": row.path}
            if row.error:
                record["error"] = row.error
            else:
                record["labels"] = list(row.labels)
                record["scores"] = [round(s, DIGITS) for s in row.scores]
            self._fh.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def open_output(out: Path, fmt: str, *, resume: bool = False, overwrite: bool = False) -> tuple[Writer, set[str]]:
    """A writer for ``out`` and the paths it already holds (empty unless ``resume``).

    OutputError when ``out`` exists and neither ``resume`` nor ``overwrite`` is set, or when the file
    to resume is not a ``predict`` output of this format.
    """
    exists = check_writable(out, resume=resume, overwrite=overwrite)
    done: set[str] = set()
    if exists and resume:
        cut_partial_line(out)
        done = set(done_paths(out, fmt))
    append = resume and out.is_file() and out.stat().st_size > 0
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fh = out.open("a" if append else "w", encoding="utf-8", newline="")
    except OSError as exc:
        raise OutputError(f"{out}: cannot write ({exc.strerror or exc})") from exc
    writer: Writer = CsvWriter(fh, header=not append) if fmt == "csv" else JsonlWriter(fh)
    return writer, done


def check_writable(out: Path, *, resume: bool, overwrite: bool) -> bool:
    """Whether ``out`` holds rows already; OutputError when it does and may be neither resumed nor replaced."""
    if out.is_dir():
        raise OutputError(f"{out} is a folder: name the output file")
    exists = out.is_file() and out.stat().st_size > 0
    if exists and not (resume or overwrite):
        raise OutputError(f"{out} exists: pass --resume to continue it or --overwrite to replace it")
    return exists


def cut_partial_line(path: Path) -> int:
    """Truncate ``path`` after its last newline (a killed writer's half row); returns the bytes cut."""
    size = path.stat().st_size
    with path.open("rb+") as fh:
        keep = _last_newline_end(fh, size)
        if keep < size:
            fh.truncate(keep)
            fh.flush()
            os.fsync(fh.fileno())
    return size - keep


def _last_newline_end(fh: IO[bytes], size: int, chunk: int = 1 << 16) -> int:
    """The offset just after the last b"\\n" (0 when there is none), reading backwards from the end."""
    end = size
    while end > 0:
        start = max(0, end - chunk)
        fh.seek(start)
        found = fh.read(end - start).rfind(b"\n")
        if found >= 0:
            return start + found + 1
        end = start
    return 0


def done_paths(path: Path, fmt: str) -> Iterable[str]:
    """The ``path`` of every complete row of an existing output, read as a stream."""
    with path.open(encoding="utf-8", newline="") as fh:
        if fmt == "csv":
            yield from _csv_paths(fh, path)
        else:
            yield from _jsonl_paths(fh, path)


def _csv_paths(fh: IO[str], path: Path) -> Iterable[str]:
    reader = csv.reader(fh)
    header = next(reader, None)
    if header is None:
        return
    if tuple(header) != CSV_COLUMNS:
        raise OutputError(f"{path}: not a predict CSV (header {','.join(header)}, expected {','.join(CSV_COLUMNS)})")
    for row in reader:
        if row:
            yield row[0]


def _jsonl_paths(fh: IO[str], path: Path) -> Iterable[str]:
    for number, line in enumerate(fh, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise OutputError(f"{path}:{number}: not a predict JSONL row ({exc.msg})") from exc
        if not isinstance(record, dict) or not isinstance(record.get("path"), str):
            raise OutputError(f"{path}:{number}: not a predict JSONL row (no 'path')")
        yield record["path"]
