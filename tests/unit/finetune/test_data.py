from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from finetune.data import (
    DataError,
    DataSplits,
    ImageDataset,
    Sample,
    check_images,
    class_counts,
    class_weights,
    load_splits,
    make_sampler,
    prepare_data,
    resolve_balance,
    save_splits,
    scan_folder,
    stratified_split,
)
from tests.conftest import make_image_folder


def _paths(samples: object) -> set[Path]:
    return {s.path for s in samples}  # type: ignore[attr-defined]


def _write_corrupt(folder: Path) -> list[Path]:
    good = folder / "red_000.png"
    truncated = folder / "truncated.jpg"
    Image.open(good).convert("RGB").save(truncated, format="JPEG")
    truncated.write_bytes(truncated.read_bytes()[:200])
    text = folder / "notes.jpg"
    text.write_text("this is not an image", encoding="utf-8")
    empty = folder / "empty.png"
    empty.write_bytes(b"")
    return [truncated, text, empty]


# --------------------------------------------------------------------------- scan_folder


def test_scan_folder_sorts_classes_and_ignores_hidden_and_non_images(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "imgs", {"zebra": 2, "apple": 3})
    (root / "apple" / "readme.txt").write_text("x", encoding="utf-8")
    (root / "apple" / ".hidden.png").write_bytes((root / "apple" / "apple_000.png").read_bytes())
    (root / ".cache").mkdir()
    nested = root / "zebra" / "more"
    nested.mkdir()
    shutil.copy(root / "zebra" / "zebra_000.png", nested / "UPPER.JPG")

    classes, samples = scan_folder(root)

    assert classes == ("apple", "zebra")
    assert class_counts(samples, 2) == [3, 3]
    assert all(s.path.suffix.lower() in (".png", ".jpg") and not s.path.name.startswith(".") for s in samples)


def test_scan_folder_with_given_classes_rejects_unknown_folder(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "val", {"cat": 1, "dog": 1, "emu": 1})
    with pytest.raises(DataError, match="emu"):
        scan_folder(root, ["cat", "dog"])


# --------------------------------------------------------------------------- stratified_split


def test_stratified_split_is_deterministic_complete_and_disjoint(image_folder: Path) -> None:
    _, samples = scan_folder(image_folder)
    first = stratified_split(samples, val_fraction=0.2, test_fraction=0.2, seed=1)
    again = stratified_split(list(reversed(samples)), val_fraction=0.2, test_fraction=0.2, seed=1)
    other = stratified_split(samples, val_fraction=0.2, test_fraction=0.2, seed=2)

    assert first == again
    assert first != other
    train, val, test = (_paths(split) for split in first)
    assert not (train & val or train & test or val & test)
    assert train | val | test == _paths(samples)
    for split in first:
        assert {s.label for s in split} == {0, 1, 2}


@pytest.mark.parametrize(
    ("count", "val_fraction", "test_fraction", "expected"),
    [(3, 0.15, 0.15, (1, 1, 1)), (2, 0.2, 0.0, (1, 1, 0)), (2, 0.0, 0.3, (1, 0, 1)), (10, 0.5, 0.4, (1, 5, 4))],
)
def test_stratified_split_small_classes_keep_one_in_each_split(
    count: int, val_fraction: float, test_fraction: float, expected: tuple[int, int, int]
) -> None:
    samples = [Sample(Path(f"{i}.png"), 0) for i in range(count)]
    splits = stratified_split(samples, val_fraction=val_fraction, test_fraction=test_fraction, seed=0)
    assert tuple(len(s) for s in splits) == expected


# --------------------------------------------------------------------------- check_images / prepare_data


def test_corrupt_images_are_skipped_and_named(image_folder: Path, caplog: pytest.LogCaptureFixture) -> None:
    bad = _write_corrupt(image_folder / "red")
    with caplog.at_level(logging.WARNING, logger="finetune.data"):
        splits = prepare_data(image_folder, seed=0)

    skipped = dict(splits.skipped)
    assert set(skipped) == {p.resolve() for p in bad}
    assert all(p.name in reason or "empty" in reason for p, reason in skipped.items())
    used = _paths(splits.train) | _paths(splits.val) | _paths(splits.test)
    assert not used & set(skipped)
    assert len(used) == 36
    for path in bad:
        assert path.name in caplog.text


def test_check_images_reasons(image_folder: Path) -> None:
    bad = _write_corrupt(image_folder / "red")
    samples = [Sample(p, 0) for p in bad]
    good, skipped = check_images(samples)
    assert good == []
    reasons = dict(skipped)
    assert "truncated" in reasons[bad[0]]
    assert "not a recognised image" in reasons[bad[1]]
    assert "empty" in reasons[bad[2]]


def test_class_with_too_few_images_is_named(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "imgs", {"plenty": 10, "rare": 2})
    with pytest.raises(DataError, match=r"'rare' has 2") as info:
        prepare_data(root, min_images_per_class=3)
    assert "plenty" not in str(info.value)


def test_corrupt_files_count_against_the_minimum(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "imgs", {"red": 3, "blue": 5})
    (root / "red" / "red_000.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"'red' has 2"):
        prepare_data(root, min_images_per_class=3)


def test_empty_folder_is_an_error_naming_it(tmp_path: Path) -> None:
    empty = tmp_path / "nothing_here"
    empty.mkdir()
    with pytest.raises(DataError, match="nothing_here"):
        prepare_data(empty)
    with pytest.raises(DataError, match="missing_folder"):
        prepare_data(tmp_path / "missing_folder")


def test_single_class_is_an_error(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "imgs", {"only": 6})
    with pytest.raises(DataError, match="only"):
        prepare_data(root)


def test_pre_split_layout_keeps_the_given_splits(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "d" / "train", {"a": 4, "b": 4}, seed=1)
    make_image_folder(tmp_path / "d" / "val", {"a": 2, "b": 1}, seed=2)
    make_image_folder(tmp_path / "d" / "test", {"a": 1, "b": 3}, seed=3)

    splits = prepare_data(tmp_path / "d")

    assert splits.classes == ("a", "b")
    assert [len(splits.train), len(splits.val), len(splits.test)] == [8, 3, 4]
    assert all("/test/" in str(s.path) for s in splits.test)


def test_pre_split_without_test_uses_val_and_says_so(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    make_image_folder(tmp_path / "d" / "train", {"a": 3, "b": 3})
    make_image_folder(tmp_path / "d" / "val", {"a": 1, "b": 1})
    with caplog.at_level(logging.INFO, logger="finetune.data"):
        splits = prepare_data(tmp_path / "d")
    assert splits.test == splits.val
    assert "no test/" in caplog.text


def test_pre_split_class_missing_from_val_is_named(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "d" / "train", {"a": 3, "b": 3, "c": 3})
    make_image_folder(tmp_path / "d" / "val", {"a": 1, "c": 1})
    with pytest.raises(DataError, match=r"'b' has 0"):
        prepare_data(tmp_path / "d")


def test_pre_split_class_lists_must_agree(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "d" / "train", {"a": 3, "b": 3})
    make_image_folder(tmp_path / "d" / "val", {"a": 1, "b": 1, "extra": 1})
    with pytest.raises(DataError, match="extra"):
        prepare_data(tmp_path / "d")


# --------------------------------------------------------------------------- save / load


def test_save_load_round_trip(image_folder: Path, tmp_path: Path) -> None:
    (image_folder / "red" / "broken.jpg").write_bytes(b"not\nan image")
    splits = prepare_data(image_folder, seed=3)
    save_splits(splits, tmp_path / "run")

    loaded = load_splits(tmp_path / "run")

    assert loaded == splits
    assert (tmp_path / "run" / "splits" / "classes.txt").read_text(encoding="utf-8") == "blue\ngreen\nred\n"
    assert "broken.jpg" in (tmp_path / "run" / "splits" / "skipped.txt").read_text(encoding="utf-8")


def test_load_splits_after_data_moved_is_a_clear_error(image_folder: Path, tmp_path: Path) -> None:
    save_splits(prepare_data(image_folder), tmp_path / "run")
    image_folder.rename(tmp_path / "moved")
    with pytest.raises(DataError, match="no longer exist"):
        load_splits(tmp_path / "run")
    with pytest.raises(DataError, match="no saved splits"):
        load_splits(tmp_path / "elsewhere")


# --------------------------------------------------------------------------- balance and dataset


def test_class_weights_and_balance_on_imbalanced_counts() -> None:
    weights = class_weights([10, 40, 0, 20])
    assert weights[2] == 0
    assert torch.allclose(weights[[0, 1, 3]].mean(), torch.tensor(1.0))
    assert weights[0] > weights[3] > weights[1]
    assert torch.allclose(class_weights([5, 5, 5]), torch.ones(3))

    assert resolve_balance("auto", [10, 40, 20]) == "weights"
    assert resolve_balance("auto", [10, 12, 15]) == "none"
    assert resolve_balance("sampler", [10, 10]) == "sampler"
    with pytest.raises(ValueError, match="balance"):
        resolve_balance("bogus", [1, 2])


def test_make_sampler_draws_classes_evenly_and_is_seeded() -> None:
    samples = [Sample(Path(f"a{i}"), 0) for i in range(90)] + [Sample(Path(f"b{i}"), 1) for i in range(10)]
    first = list(make_sampler(samples, 2, seed=7))
    assert first == list(make_sampler(samples, 2, seed=7))
    assert first != list(make_sampler(samples, 2, seed=8))
    assert len(first) == 100
    draws = [idx for _ in range(20) for idx in make_sampler(samples, 2, seed=_)]
    minority = sum(samples[i].label for i in draws) / len(draws)
    assert 0.4 < minority < 0.6


def test_image_dataset_items(image_folder: Path) -> None:
    splits: DataSplits = prepare_data(image_folder)
    dataset = ImageDataset(splits.train, lambda im: torch.zeros(3, im.height, im.width))
    image, label = dataset[0]
    assert image.shape == (3, 48, 48)
    assert label == splits.train[0].label
    assert len(dataset) == len(splits.train)
    assert dataset.targets == [s.label for s in splits.train]


def test_evaluation_decodes_a_large_jpeg_as_the_server_does(tmp_path: Path) -> None:
    from finetune.transforms import eval_transform
    from service.manifest import Preprocess
    from service.preprocess import draft_size, preprocess_bytes

    y, x = np.mgrid[0:1200, 0:1600]
    pixels = np.stack([x % 256, y % 256, (x + y) % 256], axis=-1).astype(np.uint8)
    path = tmp_path / "big.jpg"
    Image.fromarray(pixels).save(path, quality=90)
    spec = Preprocess(resize=128, crop=112, jpeg_draft=True)
    dataset = ImageDataset([Sample(path, 0)], eval_transform(spec), draft_to=draft_size(spec))
    served = preprocess_bytes(path.read_bytes(), spec)
    assert np.array_equal(dataset[0][0].numpy(), served)
    whole = ImageDataset([Sample(path, 0)], eval_transform(spec))[0][0].numpy()
    assert not np.array_equal(whole, served)  # the draft really was taken


# --------------------------------------------------------------------------- tasks: multilabel and binary


def _multilabel_folder(root: Path) -> Path:
    """Twelve images each of three colours; labels.csv and labels.jsonl give each some of warm, dark, round."""
    make_image_folder(root, {"red": 12, "green": 12, "blue": 12})
    rows: list[tuple[str, list[str]]] = []
    for colour in ("red", "green", "blue"):
        for i in range(12):
            names = [n for n, on in (("warm", colour == "red"), ("dark", i % 3 == 0), ("round", i < 4)) if on]
            rows.append((f"{colour}/{colour}_{i:03d}.png", names))
    csv_lines = ["path,labels", *(f"{path},{';'.join(names)}" for path, names in rows)]
    (root / "labels.csv").write_text("\n".join(csv_lines) + "\n", encoding="utf-8")
    jsonl = (json.dumps({"path": path, "labels": names}) for path, names in rows)
    (root / "labels.jsonl").write_text("\n".join(jsonl) + "\n", encoding="utf-8")
    return root


def test_multilabel_labels_file_is_stratified_per_label(tmp_path: Path) -> None:
    root = _multilabel_folder(tmp_path / "imgs")

    splits = prepare_data(root, labels_file=root / "labels.jsonl", seed=1)

    assert splits.task == "multilabel" and splits.classes == ("dark", "round", "warm")
    assert all(s.label == -1 for s in splits.train + splits.val + splits.test)
    for part in (splits.train, splits.val, splits.test):
        assert all(n > 0 for n in class_counts(part, 3))
    assert len(_paths(splits.train) | _paths(splits.val) | _paths(splits.test)) == 36
    assert splits.skipped == ()
    assert prepare_data(root, labels_file=root / "labels.jsonl", seed=1) == splits


def test_min_images_per_class_counts_positives_per_label(tmp_path: Path) -> None:
    root = _multilabel_folder(tmp_path / "imgs")
    with pytest.raises(DataError, match=r"need at least 13\): 'dark' has 12, 'round' has 12, 'warm' has 12"):
        prepare_data(root, labels_file=root / "labels.csv", min_images_per_class=13)


def test_class_counts_of_multilabel_samples_are_positives() -> None:
    samples = [Sample(Path("a"), -1, (0, 2)), Sample(Path("b"), -1, ()), Sample(Path("c"), -1, (2,))]
    assert class_counts(samples, 3) == [1, 0, 2]
    assert class_counts([Sample(Path("a"), 1), Sample(Path("b"), 1)], 2) == [0, 2]


def test_save_load_round_trip_multilabel(tmp_path: Path) -> None:
    root = _multilabel_folder(tmp_path / "imgs")
    splits = prepare_data(root, labels_file=root / "labels.jsonl", seed=2)
    save_splits(splits, tmp_path / "run")

    loaded = load_splits(tmp_path / "run")

    assert loaded == splits
    folder = tmp_path / "run" / "splits"
    assert (folder / "task.txt").read_text(encoding="utf-8") == "multilabel\n"
    lines = "\n".join((folder / name).read_text(encoding="utf-8") for name in ("train.txt", "val.txt", "test.txt"))
    assert f"{root / 'red' / 'red_000.png'}\tdark\tround\twarm\n" in lines
    assert f"{root / 'green' / 'green_005.png'}\t\n" in lines  # none of the labels


def test_save_load_round_trip_binary(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "imgs", {"cat": 6, "dog": 6})
    splits = prepare_data(root, task="binary", positive="cat")
    save_splits(splits, tmp_path / "run")

    loaded = load_splits(tmp_path / "run")

    assert loaded == splits and loaded.task == "binary" and loaded.classes == ("dog", "cat")
    first = (tmp_path / "run" / "splits" / "train.txt").read_text(encoding="utf-8").splitlines()[0]
    assert first.count("\t") == 1 and first.split("\t")[1] in ("cat", "dog")


def test_old_run_folder_without_task_file_loads_as_multiclass(image_folder: Path, tmp_path: Path) -> None:
    splits = prepare_data(image_folder)
    save_splits(splits, tmp_path / "run")
    (tmp_path / "run" / "splits" / "task.txt").unlink()

    loaded = load_splits(tmp_path / "run")

    assert loaded.task == "multiclass" and loaded == splits
    (tmp_path / "run" / "splits" / "task.txt").write_text("regression\n", encoding="utf-8")
    with pytest.raises(DataError, match="unknown task 'regression'"):
        load_splits(tmp_path / "run")


def test_load_multilabel_split_with_an_unknown_label_names_the_line(tmp_path: Path) -> None:
    root = _multilabel_folder(tmp_path / "imgs")
    save_splits(prepare_data(root, labels_file=root / "labels.csv"), tmp_path / "run")
    val = tmp_path / "run" / "splits" / "val.txt"
    val.write_text(val.read_text(encoding="utf-8") + f"{root / 'red' / 'red_000.png'}\tsquare\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"val.txt:\d+: expected 'path<TAB>label<TAB>\.\.\."):
        load_splits(tmp_path / "run")


def test_make_sampler_weighs_a_multi_label_image_as_its_rarest_label() -> None:
    samples = [Sample(Path(f"{i}"), -1, (0,)) for i in range(8)] + [
        Sample(Path("r"), -1, (0, 1)),
        Sample(Path("n"), -1, ()),
    ]
    weights = make_sampler(samples, 2, seed=0).weights.tolist()
    assert (
        weights[-2] == pytest.approx(1.0) and weights[0] == pytest.approx(1 / 9) and weights[-1] == pytest.approx(0.1)
    )
