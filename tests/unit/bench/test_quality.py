"""The quality benchmark's pure parts: data builders (split by photo, counts, determinism), goals, report."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from bench import quality_data as qd
from bench.quality import command_for, get_args_parser, merge, plan_of, points, read_run
from bench.quality_report import HEADING, judge, render_section


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*.png")}


def _digits(classes: int = 3, per_class: int = 12) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(classes), per_class)
    return rng.integers(0, 256, size=(len(labels), 8, 8), dtype=np.uint8), labels


def test_digits_are_cut_per_class_without_overlap_and_the_same_every_time(tmp_path: Path) -> None:
    images, labels = _digits()
    one = qd.build_digits(tmp_path / "a", images, labels, per_class=(3, 2, 5), img_size=64, seed=1)
    two = qd.build_digits(tmp_path / "b", images, labels, per_class=(3, 2, 5), img_size=64, seed=1)
    assert one.counts == {"train": 9, "val": 6, "test": 15} and one.classes == ("0", "1", "2")
    assert not (one.sources["train"] & one.sources["test"] or one.sources["val"] & one.sources["test"])
    assert not one.sources["train"] & one.sources["val"]
    assert _digest(one.path) == _digest(two.path)
    with Image.open(next((one.path / "test" / "0").glob("*.png"))) as image:
        assert image.mode == "L" and image.size == (8, 8)
    other = qd.build_digits(tmp_path / "c", images, labels, per_class=(3, 2, 5), img_size=64, seed=2)
    assert other.sources["test"] != one.sources["test"]
    few = qd.build_digits(tmp_path / "d", images, labels, per_class=(3, 2, 5), img_size=64, seed=1, max_classes=2)
    assert few.classes == ("0", "1") and sorted(p.name for p in (few.path / "train").iterdir()) == ["0", "1"]
    with pytest.raises(ValueError, match="fewer than"):
        qd.build_digits(tmp_path / "e", images, labels, per_class=(8, 2, 5), img_size=64, seed=1)


@pytest.mark.parametrize(("photos", "expected"), [(4, (1, 1, 2)), (9, (5, 1, 3)), (12, (7, 2, 3)), (20, (12, 3, 5))])
def test_split_counts_keep_a_val_and_two_test_photos(photos: int, expected: tuple[int, int, int]) -> None:
    assert qd.split_counts(photos) == expected
    with pytest.raises(ValueError):
        qd.split_counts(3)


def _stamps(root: Path, categories: dict[str, int]) -> Path:
    """Tiny RGBA cut-outs: a coloured disc per photo on transparency; photo 0 also has a mirror."""
    for c, (category, count) in enumerate(categories.items()):
        folder = root / category
        folder.mkdir(parents=True)
        for i in range(count):
            pixels = np.zeros((20, 30, 4), dtype=np.uint8)
            pixels[4:16, 5 + i : 20 + i] = (40 * c, 20 * i, 200, 255)
            Image.fromarray(pixels).save(folder / f"p{i}.png")
        Image.open(folder / "p0.png").transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(folder / "p0_mirror.png")
    return root


def _photos_in(split: Path) -> set[str]:
    """``class/photo`` of every written image (``p0_mirror-2.png`` is photo p0)."""
    return {f"{p.parent.name}/{p.stem.rsplit('-', 1)[0].removesuffix('_mirror')}" for p in split.rglob("*.png")}


def test_tux_photos_split_by_photo_with_their_copies_and_mirrors(tmp_path: Path) -> None:
    stamps = _stamps(tmp_path / "stamps", {"a/fish": 5, "b/tools": 6})
    kwargs: dict[str, Any] = {"copies": (4, 1, 3), "img_size": 16, "seed": 3, "min_photos": 4}
    one = qd.build_tux(tmp_path / "one", stamps, ["a/fish", "b/tools"], **kwargs)
    assert one.classes == ("fish", "tools")
    assert one.photos == {"train": 2 + 3, "val": 1 + 1, "test": 2 + 2}
    written = {split: _photos_in(one.path / split) for split in qd.SPLITS}
    for split, other in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not one.sources[split] & one.sources[other] and not written[split] & written[other]
    for split, copies in zip(qd.SPLITS, kwargs["copies"], strict=True):
        for folder in (one.path / split).iterdir():  # every photo has its split's copies; a mirror stays with it
            names = [p.stem.rsplit("-", 1)[0] for p in folder.glob("*.png")]
            assert all(names.count(name) == copies for name in names)
            assert ("p0" in names) == ("p0_mirror" in names)
    for path in (one.path / "test").rglob("*.png"):
        with Image.open(path) as image:
            assert image.mode == "RGB" and image.size == (32, 32)
    assert _digest(one.path) == _digest(qd.build_tux(tmp_path / "two", stamps, ["a/fish", "b/tools"], **kwargs).path)
    with pytest.raises(ValueError, match="fewer than"):
        qd.build_tux(tmp_path / "three", stamps, ["a/fish"], **(kwargs | {"min_photos": 9}))
    with pytest.raises(qd.MissingSource, match="apt-get install tuxpaint-stamps-default"):
        qd.build_tux(tmp_path / "four", tmp_path / "absent", ["a/fish"], **kwargs)


@pytest.mark.skipif(not qd.TUX_ROOT.is_dir(), reason="tuxpaint-stamps-default is not installed")
def test_the_real_tux_categories_have_enough_photos_and_none_is_the_demos() -> None:
    demo = {"animals/birds", "plants/flowers", "food/fruit", "food/vegetables"}  # and animals/mammals/**
    used: set[Path] = set()
    for name in ("tux-10", "tux-5-160", "tux-8-112"):
        spec = qd.SETS[name]
        assert len({qd.category(entry)[0] for entry in spec.categories}) == len(spec.categories)
        for entry in spec.categories:
            _, folder, recursive = qd.category(entry)
            assert folder not in demo and not folder.startswith("animals/mammals")
            groups = qd.photo_groups(qd.TUX_ROOT / folder, recursive=recursive)
            assert len(groups) >= qd.MIN_PHOTOS
            files = {path for paths in groups.values() for path in paths}
            assert not files & used, f"{entry} shares images with an earlier set"
            used |= files


def test_a_named_recursive_category_groups_every_png_below_it(tmp_path: Path) -> None:
    stamps = _stamps(tmp_path / "stamps", {"v/cars": 3, "v/cars/old": 3, "v/trains": 4})
    assert qd.category("wheels=v/**") == ("wheels", "v", True) and qd.category("v/cars") == ("cars", "v/cars", False)
    assert len(qd.photo_groups(stamps / "v", recursive=True)) == 10 and len(qd.photo_groups(stamps / "v/cars")) == 3
    built = qd.build_tux(tmp_path / "out", stamps, ["wheels=v/**", "trains=v/trains"], copies=(1, 1, 1), img_size=16,
                         seed=0, min_photos=4)  # fmt: skip
    assert built.classes == ("wheels", "trains") and sum(built.photos.values()) == 10 + 4


def _run(point: str, acc: float | None, val: float = 0.5, wall: float = 100.0, error: str | None = None) -> dict:
    return {"point": point, "test_accuracy": acc, "val_accuracy": val, "wall_s": wall, "error": error}


def test_the_goal_is_the_strict_gap_to_the_grids_best_and_the_time_against_lr_1e_3() -> None:
    runs = [_run("defaults", 0.90, wall=190.0), _run("grid lr=3e-4", 0.85, val=0.9), _run("grid lr=1e-3", 0.92),
            _run("grid lr=3e-3", 0.919, val=0.7), _run("grid lr=1e-2", None, error="boom"),
            _run("random init", 0.3)]  # fmt: skip
    goal = judge("s", runs)
    assert goal.grid_best_point == "grid lr=1e-3" and goal.gap_points == pytest.approx(-2.0)
    assert goal.val_pick_point == "grid lr=3e-4" and goal.val_pick_accuracy == 0.85
    assert goal.time_ratio == pytest.approx(1.9) and goal.verdict == "met"
    assert judge("s", [runs[0] | {"test_accuracy": 0.8999}, *runs[1:]]).verdict == "not met"  # 2.01 points
    assert judge("s", [runs[0] | {"wall_s": 201.0}, *runs[1:]]).verdict == "not met"  # 2.01x
    assert judge("s", [runs[0] | {"error": "x"}, *runs[1:]]).verdict == "–"
    assert judge("s", [runs[0], runs[3]]).verdict == "–"  # no time reference
    assert judge("s", [runs[0] | {"wall_s": 900.0}, runs[3]]).verdict == "–"


def test_the_report_shows_sets_goals_and_the_quick_warning() -> None:
    defaults = {
        "chosen": {"lr": 0.00123, "epochs": 9, "freeze_epochs": 0},
        "auto": {"probe": True, "reason": {"lr": "range test", "epochs": "9, given"}},
    }
    runs = [_run("defaults", 0.95) | defaults, _run("grid lr=1e-3", 0.9), _run("random init", None, error="x")]
    results = {"options": {"quick": True}, "sets": [{"data": {"name": "digits-10", "classes": ["0", "1"],
               "counts": {"train": 2, "val": 2, "test": 4}, "img_size": 64}, "runs": runs}]}  # fmt: skip
    text = render_section(results)
    assert text.startswith(HEADING + "\n") and "mean nothing" in text and "`finetune --demo`" in text
    assert "| digits-10 | 1 | 95.0 | 90.0 (grid lr=1e-3) | +5.00 | grid lr=1e-3 (90.0) | 1.00× | **met** (quick" in text
    assert "| **met** (quick: means nothing) | – |" in text and "Weight EMA" not in text
    with_ema = {"sets": [{**results["sets"][0], "runs": [*runs, _run("defaults + EMA", 0.97)]}]}
    ema_text = render_section(with_ema)
    assert "| 97.0 |" in ema_text and "minus defaults at the same seeds: +2.0 points (mean +2.00)" in ema_text
    assert "| defaults | 95.0 | – | 50.0 | 100 | 0.00123 | 9 | 0 + head fit |" in text
    assert "- defaults chose: lr: range test\n" in text and "| random init | failed: x |" in text
    grid = {"chosen": {"lr": 1e-3}, "auto": {"reason": {"lr": "0.001, given"}}}
    assert "grid lr=1e-3 chose" not in render_section(results | {"sets": [{**results["sets"][0], "runs": [
        _run("grid lr=1e-3", 0.9) | grid]}]})  # fmt: skip


def test_quick_forces_one_epoch_onto_every_point_and_runs_are_read_from_their_files(tmp_path: Path) -> None:
    quick = points(quick=True)
    assert quick[0].label == "defaults" and quick[-1].args == ("--weights", "none", "--epochs", "1")
    assert all(p.args[p.args.index("--epochs") + 1] == "1" for p in quick)
    full = points(quick=False)
    assert full[0].args == () and full[1].args == ("--ema", "true") and "defaults + EMA" not in {p.label for p in quick}
    assert full[3].args == ("--lr", "1e-3", "--epochs", "10", "--freeze-epochs", "0")
    (tmp_path / "metrics.json").write_text(
        '{"test": {"accuracy": 0.8, "macro": {"f1": 0.7}}, "best_val": {"val_accuracy": 0.75}, "history": [{}, {}]}'
    )
    (tmp_path / "auto_choices.json").write_text('{"lr": 0.002, "reason": {"lr": "why"}, "lr_curve": {}}')
    read = read_run(tmp_path, ())
    assert read["test_accuracy"] == 0.8 and read["test_macro_f1"] == 0.7 and read["val_accuracy"] == 0.75
    assert read["auto"] == {"lr": 0.002, "reason": {"lr": "why"}} and read["epochs_run"] == 2
    assert read["chosen"] == {"lr": 0.002, "epochs": None, "freeze_epochs": None}
    assert read_run(tmp_path, full[2].args)["chosen"] == {"lr": 3e-4, "epochs": 10, "freeze_epochs": 0}


def test_several_seeds_are_judged_on_their_means_and_a_failed_seed_is_left_out() -> None:
    runs = [_run("defaults", 0.70, wall=180.0), _run("grid lr=1e-3", 0.74), _run("grid lr=1e-2", 0.72),
            _run("defaults", 0.74, wall=200.0) | {"seed": 1}, _run("grid lr=1e-3", 0.68) | {"seed": 1},
            _run("grid lr=1e-2", 0.74) | {"seed": 1}, _run("defaults", None, error="boom") | {"seed": 2}]  # fmt: skip
    goal = judge("s", runs)
    assert goal.seeds == 2 and goal.defaults_accuracy == pytest.approx(0.72)
    ema = judge("s", [*runs, _run("defaults + EMA", 0.75)]).ema_gain_points  # seed 0 only: against seed 0's 0.70
    assert ema == pytest.approx(5.0)
    assert goal.grid_best_point == "grid lr=1e-2" and goal.grid_best_accuracy == pytest.approx(0.73)
    assert goal.gap_points == pytest.approx(-1.0) and goal.time_ratio == pytest.approx(1.9)
    results = {"sets": [{"data": {"name": "tux-10", "classes": ["a"], "counts": {}, "img_size": 96}, "runs": runs}]}
    text = render_section(results)
    assert "| tux-10 | 2 | 72.0 | 73.0 (grid lr=1e-2) | -1.00 |" in text
    assert "| defaults (seed 1) | 74.0 |" in text and "| defaults (seed 2) | failed: boom |" in text


def test_points_runs_only_the_kinds_asked_and_a_seed_is_passed_and_named(tmp_path: Path) -> None:
    chosen = points(quick=False, kinds=("defaults", "grid"))
    assert [p.label for p in chosen] == ["defaults", "grid lr=3e-4", "grid lr=1e-3", "grid lr=3e-3", "grid lr=1e-2"]
    data = qd.DataSet(name="tux-10", path=tmp_path, img_size=96, classes=("a", "b"), counts={}, photos={}, sources={})
    seeded = command_for(data, chosen[1], tmp_path, seed=2)
    assert seeded[seeded.index("--seed") + 1] == "2"
    assert seeded[seeded.index("--run-name") + 1] == "tux-10-grid-lr3e-4-seed2"
    assert "--seed" not in command_for(data, chosen[1], tmp_path)  # seed 0 is finetune's default: the same command


@pytest.mark.parametrize(("argv", "message"), [
    (["--sets", "nope"], "unknown or no sets ['nope']"),
    (["--points", "defaults,best"], "--points 'defaults,best': choose from defaults, ema, grid, random"),
    (["--train-seeds", "1,x"], "--train-seeds '1,x': a comma list of integers"),
    (["--train-seeds", "1,1"], "--train-seeds '1,1': at least one, each once"),
])  # fmt: skip
def test_bad_plans_are_refused_with_what_is_wrong(argv: list[str], message: str) -> None:
    with pytest.raises(ValueError, match="^" + message.replace("[", r"\[").replace("]", r"\]")):
        plan_of(get_args_parser().parse_args(argv), argv)
    plan = plan_of(get_args_parser().parse_args(["--train-seeds", "1, 2", "--points", "grid"]), [])
    assert plan.train_seeds == [1, 2] and plan.kinds == ["grid"] and len(plan.sets) == 5


def test_merge_replaces_the_same_point_and_seed_adds_the_rest_and_refuses_other_data() -> None:
    data = {"name": "tux-10", "classes": ["a", "b"], "counts": {"test": 4}, "photos": {"test": 2}, "img_size": 96}
    saved = {"command": "first", "sets": [{"data": data | {"path": "/old"}, "runs": [
        _run("defaults", 0.7), _run("grid lr=1e-3", 0.7), _run("grid lr=1e-2", 0.6) | {"seed": 1}]}]}  # fmt: skip
    new = {"command": "second", "started": "s", "finished": "f", "seconds": 9.0, "host": {"cpu": "AMD EPYC"},
           "sets": [{"data": data | {"path": "/new"}, "runs": [_run("grid lr=1e-2", 0.8) | {"seed": 1},
                                                               _run("defaults", 0.9) | {"seed": 1}]},
                    {"data": data | {"name": "digits-10"}, "runs": [_run("defaults", 0.5)]}]}  # fmt: skip
    merged = merge(saved, new)
    runs = merged["sets"][0]["runs"]
    assert [(r["point"], r.get("seed", 0), r["test_accuracy"]) for r in runs] == [
        ("defaults", 0, 0.7), ("grid lr=1e-3", 0, 0.7), ("grid lr=1e-2", 1, 0.8), ("defaults", 1, 0.9)]  # fmt: skip
    assert [s["data"]["name"] for s in merged["sets"]] == ["tux-10", "digits-10"]
    assert saved["sets"][0]["runs"][2]["test_accuracy"] == 0.6  # the saved results are not changed in place
    assert merged["goals"][0]["defaults_accuracy"] == pytest.approx(0.8) and merged["goals"][0]["seeds"] == 2
    assert merged["added"] == [{"command": "second", "started": "s", "finished": "f", "seconds": 9.0, "cpu": "AMD EPYC",
                                "runs": ["tux-10 (2 runs)", "digits-10 (1 runs)"]}]  # fmt: skip
    added = "Added by `second`, run s to f (9 s) on AMD EPYC: tux-10 (2 runs), digits-10 (1 runs)."
    assert added in render_section(merged)
    other = {**new, "sets": [{"data": data | {"img_size": 64}, "runs": []}]}
    with pytest.raises(ValueError, match="tux-10 was built differently"):
        merge(saved, other)
    with pytest.raises(ValueError, match="--quick"):
        merge(saved, new | {"options": {"quick": True}})
