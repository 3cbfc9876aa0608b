from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from finetune.data import DataError, prepare_data
from finetune.labels import infer_task, read_labels, resolve_labels
from tests.conftest import make_image_folder


def _pngs(root: Path, count: int, *, prefix: str = "img") -> list[str]:
    """``count`` small PNGs directly in ``root``; returns their names."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(count)
    names = [f"{prefix}_{i:03d}.png" for i in range(count)]
    for name in names:
        Image.fromarray(rng.integers(0, 255, size=(16, 16, 3), dtype=np.uint8)).save(root / name)
    return names


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    return path


def _reasons(skipped: tuple[tuple[Path, str], ...]) -> list[str]:
    return [reason for _, reason in skipped]


# --------------------------------------------------------------------------- reading the layouts


def test_csv_path_label_is_multiclass(tmp_path: Path) -> None:
    names = _pngs(tmp_path, 4)
    source = _write(
        tmp_path / "labels.csv", ["path,label", *(f"{n},{'cat' if i % 2 else 'dog'}" for i, n in enumerate(names))]
    )

    table = read_labels(source, tmp_path)
    labelled = resolve_labels(table)

    assert table.names == ("cat", "dog") and not table.columns and not table.skipped
    assert labelled.task == "multiclass" and labelled.classes == ("cat", "dog")
    assert [(s.path.name, s.label, split) for s, split in labelled.samples][:2] == [
        (names[0], 1, None),
        (names[1], 0, None),
    ]


def test_csv_labels_column_with_delimiter_is_multilabel(tmp_path: Path) -> None:
    names = _pngs(tmp_path, 3)
    source = _write(
        tmp_path / "l.csv", ["path,labels", f"{names[0]},cat; dog", f"{names[1]},dog", f'"{names[2]}","sky;;cat"']
    )

    labelled = resolve_labels(read_labels(source, tmp_path))

    assert labelled.task == "multilabel" and labelled.classes == ("cat", "dog", "sky")
    assert [s.labels for s, _ in labelled.samples] == [(0, 1), (1,), (0, 2)]
    assert all(s.label == -1 for s, _ in labelled.samples)


def test_label_delimiter_is_an_argument(tmp_path: Path) -> None:
    names = _pngs(tmp_path, 2)
    source = _write(tmp_path / "l.csv", ["path,label", f"{names[0]},a|b", f"{names[1]},a;b"])

    labelled = resolve_labels(read_labels(source, tmp_path, delimiter="|"))

    assert labelled.classes == ("a", "a;b", "b")
    assert [s.indices for s, _ in labelled.samples] == [(0, 2), (1,)]


def test_csv_flag_columns_are_multilabel_and_an_all_zero_row_is_none(tmp_path: Path) -> None:
    names = _pngs(tmp_path, 3)
    source = _write(tmp_path / "l.csv", ["path,sky,cat", f"{names[0]},1,1", f"{names[1]},0,0", f"{names[2]},0,1"])

    table = read_labels(source, tmp_path)
    labelled = resolve_labels(table)

    assert table.columns and infer_task(table) == "multilabel"
    assert labelled.classes == ("cat", "sky")
    assert [s.labels for s, _ in labelled.samples] == [(0, 1), (), (0,)]


def test_one_flag_column_is_binary_with_not_name(tmp_path: Path) -> None:
    names = _pngs(tmp_path, 3)
    source = _write(tmp_path / "l.csv", ["path,defect", f"{names[0]},1", f"{names[1]},0", f"{names[2]}, 1 "])

    labelled = resolve_labels(read_labels(source, tmp_path))

    assert labelled.task == "binary" and labelled.classes == ("not defect", "defect")
    assert [s.label for s, _ in labelled.samples] == [1, 0, 1]


def test_jsonl_labels_and_label(tmp_path: Path) -> None:
    names = _pngs(tmp_path, 3)
    rows = [
        {"path": names[0], "labels": ["b", "a"]},
        {"path": names[1], "label": "c"},
        {"path": names[2], "labels": []},
    ]
    source = _write(tmp_path / "l.jsonl", [json.dumps(r) for r in rows])

    labelled = resolve_labels(read_labels(source, tmp_path))

    assert labelled.task == "multilabel" and labelled.classes == ("a", "b", "c")
    assert [s.labels for s, _ in labelled.samples] == [(0, 1), (2,), ()]


def test_jsonl_single_labels_are_multiclass(tmp_path: Path) -> None:
    names = _pngs(tmp_path, 2)
    source = _write(
        tmp_path / "l.jsonl",
        [json.dumps({"path": names[0], "label": "x"}), json.dumps({"path": names[1], "labels": ["y"]})],
    )

    labelled = resolve_labels(read_labels(source, tmp_path))

    assert labelled.task == "multiclass" and [s.label for s, _ in labelled.samples] == [0, 1]


def test_paths_in_subfolders_and_split_values(tmp_path: Path) -> None:
    names = _pngs(tmp_path / "sub", 3)
    source = _write(
        tmp_path / "l.csv",
        ["path,label,split", f"sub/{names[0]},a,train", f"sub/{names[1]},b, VAL ", f"sub/{names[2]},a,"],
    )

    labelled = resolve_labels(read_labels(source, tmp_path))

    assert [split for _, split in labelled.samples] == ["train", "val", None]
    assert labelled.samples[0][0].path == tmp_path / "sub" / names[0]


# --------------------------------------------------------------------------- bad rows and files


def test_every_bad_csv_row_is_named_with_file_and_line(tmp_path: Path) -> None:
    names = _pngs(tmp_path, 3)
    lines = [
        "path,label,split",
        f"{names[0]},a,train",  # 2: good
        "missing.png,a,",  # 3
        f"{names[1]},,",  # 4: no label
        f"{names[1]},b,val,extra",  # 5: unknown column
        f"{names[0]},b,",  # 6: duplicate
        f"{names[2]},b,holdout",  # 7: unknown split
    ]
    table = read_labels(_write(tmp_path / "labels.csv", lines), tmp_path)

    reasons = _reasons(table.skipped)
    assert [r.split(":")[1] for r in reasons] == ["3", "4", "5", "6", "7"]
    assert "labels.csv:3: missing.png: no such file" in reasons
    assert reasons[1] == "labels.csv:4: no label"
    assert "4 fields, the header has 3" in reasons[2]
    assert reasons[3] == f"labels.csv:6: {names[0]}: duplicate of labels.csv:2"
    assert "unknown split 'holdout'" in reasons[4]
    assert table.skipped[0][0] == tmp_path / "missing.png"
    assert [row.path.name for row in table.rows] == [names[0]]


def test_bad_flag_value_is_named(tmp_path: Path) -> None:
    names = _pngs(tmp_path, 2)
    table = read_labels(_write(tmp_path / "l.csv", ["path,a,b", f"{names[0]},1,yes", f"{names[1]},0,1"]), tmp_path)
    assert _reasons(table.skipped) == ["l.csv:2: column 'b' must be 0 or 1, got 'yes'"]


def test_every_bad_jsonl_line_is_named(tmp_path: Path) -> None:
    names = _pngs(tmp_path, 2)
    lines = [
        json.dumps({"path": names[0], "labels": ["a"]}),
        "{not json",
        json.dumps({"path": names[1], "labels": ["a"], "weight": 2}),
        json.dumps(["a"]),
        json.dumps({"path": names[1], "label": "a", "labels": ["b"]}),
        json.dumps({"path": names[1], "labels": "a"}),
        json.dumps({"path": names[1], "label": "b", "split": "dev"}),
        "",
        json.dumps({"labels": ["a"]}),
    ]
    table = read_labels(_write(tmp_path / "l.jsonl", lines), tmp_path)

    reasons = _reasons(table.skipped)
    assert [r.split(":")[1] for r in reasons] == ["2", "3", "4", "5", "6", "7", "9"]
    assert "not valid JSON" in reasons[0] and "unknown key(s) weight" in reasons[1]
    assert "expected a JSON object" in reasons[2] and "both 'label' and 'labels'" in reasons[3]
    assert "'labels' must be a list" in reasons[4] and "unknown split 'dev'" in reasons[5]
    assert "no 'path'" in reasons[6]


@pytest.mark.parametrize(
    ("header", "message"),
    [("path,label,weight", "unknown column"), ("file,label", "no 'path' column"), ("path,split", "no label column"),
     ("path,a,a", "duplicate column")],
)  # fmt: skip
def test_a_header_that_fits_no_layout_is_an_error(tmp_path: Path, header: str, message: str) -> None:
    with pytest.raises(DataError, match=message):
        read_labels(_write(tmp_path / "l.csv", [header]), tmp_path)


def test_bad_rows_reach_the_splits_and_nothing_usable_is_one_error(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "d", {"a": 4, "b": 4})
    good = [f"{c}/{c}_{i:03d}.png" for c in "ab" for i in range(4)]
    source = _write(tmp_path / "d" / "labels.csv", ["path,label", *(f"{p},{p[0]}" for p in good), "gone.png,a"])
    (tmp_path / "d" / "a" / "a_003.png").write_bytes(b"not an image")

    splits = prepare_data(tmp_path / "d", labels_file=source, min_images_per_class=1)

    reasons = _reasons(splits.skipped)
    assert "labels.csv:10: gone.png: no such file" in reasons
    assert any("a_003.png" in str(path) for path, _ in splits.skipped)
    bad = _write(tmp_path / "bad.csv", ["path,label", "gone.png,a", "also-gone.png,b"])
    with pytest.raises(DataError, match=r"no usable images \(2 skipped: bad.csv:2: gone.png: no such file"):
        prepare_data(tmp_path / "d", labels_file=bad)


def test_label_file_is_found_inside_the_data_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_image_folder(tmp_path / "d", {"a": 3, "b": 3})
    _write(tmp_path / "d" / "labels.csv", ["path,label", *(f"{c}/{c}_{i:03d}.png,{c}" for c in "ab" for i in range(3))])
    monkeypatch.chdir(tmp_path)
    assert prepare_data(Path("d"), labels_file=Path("labels.csv")).classes == ("a", "b")
    with pytest.raises(DataError, match="no such label file"):
        prepare_data(Path("d"), labels_file=Path("nothing.csv"))


# --------------------------------------------------------------------------- tasks


def _two_label_csv(tmp_path: Path, rows: list[str]) -> Path:
    make_image_folder(tmp_path / "d", {"a": 4, "b": 4})
    return _write(tmp_path / "d" / "labels.csv", ["path,label", *rows])


def test_explicit_multiclass_with_a_multi_label_row_names_it(tmp_path: Path) -> None:
    source = _two_label_csv(tmp_path, ["a/a_000.png,a", "a/a_001.png,a;b"])
    with pytest.raises(DataError, match=r"labels.csv:3: 2 labels \(a, b\) but a multiclass task"):
        prepare_data(tmp_path / "d", labels_file=source, task="multiclass")


def test_binary_positive_defaults_to_the_second_sorted_and_can_be_named(tmp_path: Path) -> None:
    source = _two_label_csv(
        tmp_path, [f"{c}/{c}_{i:03d}.png,{'ok' if c == 'a' else 'bad'}" for c in "ab" for i in range(4)]
    )

    default = prepare_data(tmp_path / "d", labels_file=source, task="binary")
    named = prepare_data(tmp_path / "d", labels_file=source, task="binary", positive="bad")

    assert default.task == "binary" and default.classes == ("bad", "ok")
    assert named.classes == ("ok", "bad")
    assert all(s.label == 1 for s in named.train if s.path.parent.name == "b")
    with pytest.raises(DataError, match="positive label 'good' is not one of"):
        prepare_data(tmp_path / "d", labels_file=source, task="binary", positive="good")


def test_binary_needs_two_classes_and_positive_needs_binary(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "d", {"a": 3, "b": 3, "c": 3})
    with pytest.raises(DataError, match="exactly two classes, found 3"):
        prepare_data(tmp_path / "d", task="binary")
    with pytest.raises(DataError, match="only for a binary task, the task is multiclass"):
        prepare_data(tmp_path / "d", positive="a")
    with pytest.raises(ValueError, match="task must be one of"):
        prepare_data(tmp_path / "d", task="regression")


def test_folders_stay_multiclass_and_can_be_binary_or_multilabel(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "d", {"cat": 4, "dog": 4})

    auto = prepare_data(tmp_path / "d")
    binary = prepare_data(tmp_path / "d", task="binary", positive="cat")
    multilabel = prepare_data(tmp_path / "d", task="multilabel")

    assert auto.task == "multiclass" and auto.classes == ("cat", "dog")
    assert binary.task == "binary" and binary.classes == ("dog", "cat")
    assert {s.path.parent.name for s in binary.train if s.label == 1} == {"cat"}
    assert multilabel.task == "multilabel" and multilabel.classes == ("cat", "dog")
    assert {(s.path.parent.name, s.label, s.labels) for s in multilabel.val} == {("cat", -1, (0,)), ("dog", -1, (1,))}


def test_explicit_multilabel_on_single_labels_and_binary_on_a_flag_column(tmp_path: Path) -> None:
    source = _two_label_csv(tmp_path, [f"{c}/{c}_{i:03d}.png,{c}" for c in "ab" for i in range(4)])
    assert prepare_data(tmp_path / "d", labels_file=source, task="multilabel").task == "multilabel"
    flags = _write(
        tmp_path / "d" / "flags.csv",
        ["path,b", *(f"{c}/{c}_{i:03d}.png,{int(c == 'b')}" for c in "ab" for i in range(4))],
    )
    splits = prepare_data(tmp_path / "d", labels_file=flags)
    assert splits.task == "binary" and splits.classes == ("not b", "b")
    assert len(splits.train) + len(splits.val) + len(splits.test) == 8


def test_split_column_is_honoured_rows_without_it_train_and_no_test_is_val(tmp_path: Path) -> None:
    rows = [f"{c}/{c}_{i:03d}.png,{c},{'val' if i == 3 else ''}" for c in "ab" for i in range(4)]
    make_image_folder(tmp_path / "d", {"a": 4, "b": 4})
    source = _write(tmp_path / "d" / "labels.csv", ["path,label,split", *rows])

    splits = prepare_data(tmp_path / "d", labels_file=source)

    assert {s.path.name for s in splits.val} == {"a_003.png", "b_003.png"}
    assert len(splits.train) == 6 and splits.test == splits.val
    no_val = _write(tmp_path / "d" / "nv.csv", ["path,label,split", "a/a_000.png,a,test", "b/b_000.png,b,"])
    with pytest.raises(DataError, match="no val rows"):
        prepare_data(tmp_path / "d", labels_file=no_val)
