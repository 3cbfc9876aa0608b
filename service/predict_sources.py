"""Where ``predict`` finds its images: a folder tree, a glob, one image, or the rows of a CSV or JSONL file.

Every source is a generator: a million-image folder is walked one directory at a time
(``os.scandir``, entries sorted within each directory, so a folder's order is reproducible), a glob
is expanded lazily (``glob.iglob``), a list is read row by row. Each item carries the path as the
output will show it (``key``: as found in the folder or glob, as written in the list) and the file
to read; an item the list itself makes unreadable (a row with no path) carries its error instead.

    for item in iter_source("photos/**/*.jpg"):             # or a folder, a .csv, a .jsonl
        item.key, item.file, item.error
"""

from __future__ import annotations

import csv
import glob
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
LIST_SUFFIXES = (".csv", ".jsonl", ".ndjson")
PATH_FIELD = "path"
_GLOB_CHARS = frozenset("*?[")


class SourceError(ValueError):
    """The source itself cannot be read: no such file or folder, a list without a ``path`` column."""


@dataclass(frozen=True)
class Item:
    """One image to classify: ``key`` is its path in the output, ``file`` what is read, ``error`` why it cannot be."""

    key: str
    file: Path
    error: str = ""


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


def iter_source(source: str, *, root: Path | None = None) -> Iterator[Item]:
    """The images of ``source``: a glob pattern, a folder (walked), a .csv/.jsonl list, or one image file.

    Relative paths in a list resolve against ``root``, else the list's own folder. SourceError when
    ``source`` is none of these (raised at the first ``next``).
    """
    if _GLOB_CHARS & set(source) and not os.path.exists(source):
        yield from _iter_glob(source)
        return
    path = Path(source)
    if path.is_dir():
        yield from _walk(source)
    elif path.suffix.lower() in LIST_SUFFIXES and path.is_file():
        base = root if root is not None else path.parent
        yield from (_iter_jsonl(path, base) if path.suffix.lower() != ".csv" else _iter_csv(path, base))
    elif path.is_file():
        yield Item(source, path)
    else:
        raise SourceError(f"{source}: no such folder, image, list (.csv, .jsonl) or glob match")


def _iter_glob(pattern: str) -> Iterator[Item]:
    for found in glob.iglob(pattern, recursive=True):
        if os.path.isfile(found):
            yield Item(found, Path(found))


def _walk(folder: str) -> Iterator[Item]:
    """Image files under ``folder``, depth first, each directory's entries in name order; hidden ones skipped."""
    try:
        with os.scandir(folder) as entries:
            listed = sorted((entry.name, entry.path, _is_dir(entry)) for entry in entries if entry.name[0] != ".")
    except OSError as exc:
        yield Item(folder, Path(folder), f"{folder}: cannot list the folder ({exc.strerror or exc})")
        return
    for name, path, is_dir in listed:
        if is_dir:
            yield from _walk(path)
        elif is_image_name(name):
            yield Item(path, Path(path))


def _is_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


def _resolve(value: str, base: Path) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else base / path


def _iter_csv(path: Path, base: Path) -> Iterator[Item]:
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or PATH_FIELD not in reader.fieldnames:
            raise SourceError(f"{path}: no '{PATH_FIELD}' column in its header ({', '.join(reader.fieldnames or [])})")
        for row in reader:
            value = (row.get(PATH_FIELD) or "").strip()
            if value:
                yield Item(value, _resolve(value, base))
            else:
                key = f"{path}:{reader.line_num}"
                yield Item(key, path, f"{key}: the row has no {PATH_FIELD}")


def _iter_jsonl(path: Path, base: Path) -> Iterator[Item]:
    with path.open(encoding="utf-8-sig") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            value = _json_path(line)
            if value:
                yield Item(value, _resolve(value, base))
            else:
                key = f"{path}:{number}"
                yield Item(key, path, f"{key}: not a JSON object with a string '{PATH_FIELD}'")


def _json_path(line: str) -> str:
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return ""
    value = row.get(PATH_FIELD) if isinstance(row, dict) else None
    return value.strip() if isinstance(value, str) else ""
