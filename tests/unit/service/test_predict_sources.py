"""Where ``predict`` finds images: folders, globs, single files, CSV and JSONL lists, streamed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from service.predict_sources import Item, SourceError, iter_source


def _touch(*paths: Path) -> None:
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")


def _keys(items: object) -> list[str]:
    return [item.key for item in items]  # type: ignore[attr-defined]


def test_folder_is_walked_depth_first_in_name_order_images_only(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    _touch(root / "b.JPG", root / "a.png", root / "z" / "c.webp", root / "m" / "d.jpeg", root / "notes.txt")
    _touch(root / ".hidden" / "e.jpg", root / ".f.jpg")
    assert _keys(iter_source(str(root))) == [
        f"{root}/a.png",
        f"{root}/b.JPG",
        f"{root}/m/d.jpeg",
        f"{root}/z/c.webp",
    ]
    assert all(item.file == Path(item.key) and not item.error for item in iter_source(str(root)))


def test_folder_is_streamed_not_listed_first(tmp_path: Path) -> None:
    _touch(tmp_path / "a" / "1.jpg", tmp_path / "b" / "2.jpg")
    items = iter_source(str(tmp_path))
    assert next(items).key.endswith("a/1.jpg")
    _touch(tmp_path / "b" / "3.jpg")  # written after the walk began: folder b is listed only when reached
    assert _keys(items) == [f"{tmp_path}/b/2.jpg", f"{tmp_path}/b/3.jpg"]


def test_glob_recursive_and_files_only(tmp_path: Path) -> None:
    _touch(tmp_path / "x" / "1.jpg", tmp_path / "x" / "y" / "2.jpg", tmp_path / "x" / "3.png")
    (tmp_path / "x" / "dir.jpg").mkdir()
    found = sorted(_keys(iter_source(f"{tmp_path}/x/**/*.jpg")))
    assert found == [f"{tmp_path}/x/1.jpg", f"{tmp_path}/x/y/2.jpg"]
    assert list(iter_source(f"{tmp_path}/nothing/*.jpg")) == []


def test_single_image_and_missing_source(tmp_path: Path) -> None:
    _touch(tmp_path / "one.jpg")
    assert list(iter_source(str(tmp_path / "one.jpg"))) == [Item(str(tmp_path / "one.jpg"), tmp_path / "one.jpg")]
    with pytest.raises(SourceError, match="no such"):
        next(iter_source(str(tmp_path / "missing")))


def test_csv_paths_resolve_against_its_folder_or_root(tmp_path: Path) -> None:
    lists = tmp_path / "lists"
    lists.mkdir()
    listing = lists / "todo.csv"
    listing.write_text(f"id,path\n1,img/a.jpg\n2,{tmp_path}/abs.png\n3,\n")
    items = list(iter_source(str(listing)))
    assert [i.key for i in items] == ["img/a.jpg", f"{tmp_path}/abs.png", f"{listing}:4"]
    assert items[0].file == lists / "img" / "a.jpg" and items[1].file == tmp_path / "abs.png"
    assert items[2].error == f"{listing}:4: the row has no path"
    rooted = list(iter_source(str(listing), root=tmp_path / "data"))
    assert rooted[0].file == tmp_path / "data" / "img" / "a.jpg"


def test_csv_without_path_column_is_refused(tmp_path: Path) -> None:
    listing = tmp_path / "todo.csv"
    listing.write_text("file,label\na.jpg,x\n")
    with pytest.raises(SourceError, match="no 'path' column"):
        next(iter_source(str(listing)))


def test_jsonl_rows_and_bad_lines(tmp_path: Path) -> None:
    listing = tmp_path / "todo.jsonl"
    lines = [json.dumps({"path": "a.jpg", "extra": 1}), "", "{not json", json.dumps({"file": "b.jpg"})]
    listing.write_text("\n".join([*lines, json.dumps({"path": "/abs/c.jpg"})]) + "\n")
    items = list(iter_source(str(listing)))
    assert [i.key for i in items] == ["a.jpg", f"{listing}:3", f"{listing}:4", "/abs/c.jpg"]
    assert items[0].file == tmp_path / "a.jpg" and items[3].file == Path("/abs/c.jpg")
    assert "not a JSON object with a string 'path'" in items[1].error and items[2].error
