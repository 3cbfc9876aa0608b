"""Error analysis (``finetune/analysis.py``): top losses of the wrong images, their sheets, confused pairs."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from finetune import analysis
from finetune.analysis import Case
from service.manifest import Preprocess
from service.tasks import make_task

SPEC = Preprocess(resize=40, crop=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
LABELS = ("cat", "dog", "bird")
COLOURS = {"red": (230, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 230), "grey": (120, 120, 120)}


def write_png(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (80, 60)) -> Path:
    """A solid image with a white stripe on the left, wider than high (so the crop matters)."""
    pixels = np.empty((size[1], size[0], 3), dtype=np.uint8)
    pixels[:] = colour
    pixels[:, : size[0] // 8] = 255
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture
def images(tmp_path: Path) -> dict[str, Path]:
    folder = tmp_path / "imgs"
    folder.mkdir()
    return {name: write_png(folder / f"{name}.png", colour) for name, colour in COLOURS.items()}


def case(path: Path, loss: float, *, wrong: bool = True, cam_label: int | None = None) -> Case:
    return Case(path, loss, "cat", "dog 0.91" if wrong else "cat 0.80", wrong, cam_label)


def png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        return image.size


def share_of(path: Path, colour: tuple[int, int, int]) -> float:
    """Share of the PNG's pixels within 10 levels of ``colour`` on each channel."""
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"), dtype=np.int16)
    return float((np.abs(pixels - np.asarray(colour)).max(axis=2) <= 10).mean())


# ---- choosing the cases -----------------------------------------------------------------------------
def test_top_losses_are_the_wrong_ones_highest_first_capped(tmp_path: Path) -> None:
    cases = [
        case(tmp_path / "a", 0.5),
        case(tmp_path / "b", 9.0, wrong=False),  # the highest loss, but right: never shown
        case(tmp_path / "c", 2.0),
        case(tmp_path / "d", float("nan")),
        case(tmp_path / "e", 4.0),
        case(tmp_path / "f", 2.0),  # ties keep the input order
    ]
    assert [c.path.name for c in analysis.top_losses(cases, 10)] == ["e", "c", "f", "a", "d"]
    assert [c.path.name for c in analysis.top_losses(cases, 2)] == ["e", "c"]
    assert analysis.top_losses(cases[1:2], 5) == []


def test_top_n_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="top_n"):
        analysis.analyse_errors(tmp_path, [], preprocess=SPEC, labels=LABELS, top_n=0)


# ---- the sheet and the report -----------------------------------------------------------------------
def test_sheet_and_markdown_of_the_top_losses(tmp_path: Path, images: dict[str, Path]) -> None:
    cases = [
        case(images["red"], 3.25),
        case(images["green"], 0.01, wrong=False),
        case(images["blue"], 1.5),
        Case(images["grey"], 0.75, "cat, dog", "bird 0.62 | x", True, None),
    ]
    lines = analysis.analyse_errors(tmp_path, cases, preprocess=SPEC, labels=LABELS, top_n=2)
    sheet = tmp_path / "errors" / "top_losses.png"
    assert png_size(sheet) == (520, 340)  # two cells of 2.6 x 3.0 inches (+ 0.4 for the title) at 100 dpi
    assert share_of(sheet, COLOURS["red"]) > 0.05 and share_of(sheet, COLOURS["blue"]) > 0.05
    assert share_of(sheet, COLOURS["green"]) < 0.001  # the right image is not drawn, nor the third wrong one
    assert share_of(sheet, COLOURS["grey"]) < 0.001
    assert not (tmp_path / "errors" / "top_losses_gradcam.png").exists()
    text = "\n".join(lines)
    assert lines[0] == "## Error analysis"
    assert "The 2 wrong test images of highest loss (3 wrong of 4)" in text
    assert "![top losses](errors/top_losses.png)" in text
    rows = [line for line in lines if line.startswith("| 1 ") or line.startswith("| 2 ")]
    assert rows == [
        f"| 1 | `{images['red']}` | cat | dog 0.91 | 3.2500 |",
        f"| 2 | `{images['blue']}` | cat | dog 0.91 | 1.5000 |",
    ]
    assert "Most confused" not in text  # no confusion matrix given


def test_a_full_sheet_wraps_into_rows_and_escapes_cells(tmp_path: Path, images: dict[str, Path]) -> None:
    long = ", ".join(f"label{i} 0.{i}{i}" for i in range(1, 9))
    cases = [Case(images["grey"], float(i), "cat, dog", long + " | x", True, None) for i in range(6)]
    lines = analysis.analyse_errors(tmp_path, cases, preprocess=SPEC, labels=LABELS)
    assert png_size(tmp_path / "errors" / "top_losses.png") == (1040, 640)  # 4 columns, 2 rows
    assert f"| 1 | `{images['grey']}` | cat, dog | {long} \\| x | 5.0000 |" in lines


def test_an_unreadable_image_is_drawn_grey(
    tmp_path: Path, images: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    assert analysis.load_crop(images["red"], SPEC).shape == (32, 32, 3)
    with caplog.at_level(logging.WARNING, logger="finetune.analysis"):
        crop = analysis.load_crop(broken, SPEC)
    assert (crop == 128).all() and crop.shape == (32, 32, 3)
    assert "broken.png" in caplog.text


def test_no_wrong_case_writes_no_png_and_says_so(tmp_path: Path, images: dict[str, Path]) -> None:
    stale = tmp_path / "errors" / "top_losses.png"
    stale.parent.mkdir()
    stale.write_bytes(b"from an earlier run")
    cases = [case(images["red"], 0.2, wrong=False), case(images["blue"], 0.1, wrong=False)]
    lines = analysis.analyse_errors(tmp_path, cases, preprocess=SPEC, labels=LABELS, confusion=np.eye(3, dtype=int))
    assert not stale.exists()
    text = "\n".join(lines)
    assert "No wrong predictions among the 2 test images." in text
    assert ".png" not in text and "| # |" not in text
    assert "No confusions" in text


# ---- most confused pairs ----------------------------------------------------------------------------
CONFUSION = [
    [10, 4, 1],  # cat: 15 images, 4 called dog
    [2, 6, 0],  # dog: 8 images
    [0, 4, 2],  # bird: 6 images, 4 called dog (a larger share than cat's 4)
]


def test_most_confused_pairs_ranking() -> None:
    pairs = analysis.most_confused(CONFUSION, LABELS)
    assert [(p.truth, p.predicted, p.count) for p in pairs] == [
        ("bird", "dog", 4),
        ("cat", "dog", 4),
        ("dog", "cat", 2),
        ("cat", "bird", 1),
    ]
    assert pairs[0].share == pytest.approx(4 / 6) and pairs[1].share == pytest.approx(4 / 15)
    assert len(analysis.most_confused(CONFUSION, LABELS, top=2)) == 2
    with pytest.raises(ValueError, match="does not match 2 labels"):
        analysis.most_confused(CONFUSION, LABELS[:2])


def test_confused_pairs_in_the_report(tmp_path: Path, images: dict[str, Path]) -> None:
    lines = analysis.analyse_errors(
        tmp_path, [case(images["red"], 1.0)], preprocess=SPEC, labels=LABELS, confusion=CONFUSION
    )
    at = lines.index("### Most confused pairs (true → predicted)")
    assert lines[at + 2 : at + 5] == [
        "| True | Predicted | Images | Share of true |",
        "|---|---|---:|---:|",
        "| bird | dog | 4 | 66.7% |",
    ]
    assert "| cat | bird | 1 | 6.7% |" in lines


# ---- Grad-CAM ---------------------------------------------------------------------------------------
def left_half(pixels: np.ndarray, label: int) -> np.ndarray:
    """A deterministic cam: hot on the left half of the crop, whatever the label."""
    heat = np.zeros(pixels.shape[:2], dtype=np.float32)
    heat[:, : pixels.shape[1] // 2] = 1.0
    return heat


def test_gradcam_sheet_for_the_cam_labels(tmp_path: Path, images: dict[str, Path]) -> None:
    calls: list[tuple[tuple[int, ...], str, int]] = []

    def cam(pixels: np.ndarray, label: int) -> np.ndarray:
        calls.append((pixels.shape, str(pixels.dtype), label))
        return left_half(pixels, label)

    cases = [case(images["green"], 2.0, cam_label=1), case(images["blue"], 1.0, cam_label=None)]
    lines = analysis.analyse_errors(tmp_path, cases, preprocess=SPEC, labels=LABELS, cam=cam)
    assert calls == [((32, 32, 3), "uint8", 1)]  # only the case with a label to explain
    sheet = tmp_path / "errors" / "top_losses_gradcam.png"
    assert png_size(sheet) == png_size(tmp_path / "errors" / "top_losses.png") == (520, 340)
    assert share_of(sheet, COLOURS["blue"]) > 0.05  # drawn as it is
    assert share_of(sheet, COLOURS["green"]) < 0.001  # blended with the jet colours
    assert "![Grad-CAM of the top losses](errors/top_losses_gradcam.png)" in lines


def test_a_failing_cam_leaves_the_plain_sheet(
    tmp_path: Path, images: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    def cam(pixels: np.ndarray, label: int) -> np.ndarray:
        raise RuntimeError("boom")

    with caplog.at_level(logging.WARNING, logger="finetune.analysis"):
        lines = analysis.analyse_errors(
            tmp_path, [case(images["red"], 1.0, cam_label=0)], preprocess=SPEC, labels=LABELS, cam=cam
        )
    assert (tmp_path / "errors" / "top_losses.png").is_file()
    assert not (tmp_path / "errors" / "top_losses_gradcam.png").exists()
    assert "boom" in caplog.text and not any("gradcam" in line for line in lines)


def test_cam_from_a_real_exported_module(tmp_path: Path, images: dict[str, Path]) -> None:
    from torchvision.models import resnet18

    from finetune.explain import CAM_FILE, export_for_package

    assert analysis.cam_from_file(tmp_path / CAM_FILE, SPEC) is None
    torch.manual_seed(0)
    model = resnet18(num_classes=len(LABELS)).eval()
    assert export_for_package(model, "resnet18", torch.rand(2, 3, SPEC.crop, SPEC.crop), tmp_path) == (CAM_FILE,)
    cam = analysis.cam_from_file(tmp_path / CAM_FILE, SPEC)
    assert cam is not None
    heat = cam(analysis.load_crop(images["red"], SPEC), 2)
    assert heat.shape == (32, 32) and heat.dtype == np.float32 and 0.0 <= heat.min() <= heat.max() <= 1.0
    cases = [case(images["red"], 1.0, cam_label=2), case(images["blue"], 0.5, cam_label=0)]
    analysis.analyse_errors(tmp_path / "run", cases, preprocess=SPEC, labels=LABELS, cam=cam)
    assert png_size(tmp_path / "run" / "errors" / "top_losses_gradcam.png") == (520, 340)


def test_a_corrupt_cam_file_gives_no_cam(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "cam.pt").write_bytes(b"not torchscript")
    with caplog.at_level(logging.WARNING, logger="finetune.analysis"):
        assert analysis.cam_from_file(tmp_path / "cam.pt", SPEC) is None
    assert "cannot be loaded" in caplog.text


# ---- cases from a test split's outputs --------------------------------------------------------------
def test_cases_from_multiclass_outputs(tmp_path: Path) -> None:
    logits = np.array([[3.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    truth = np.array([[True, False, False], [True, False, False]])
    paths = [tmp_path / "a.png", tmp_path / "b.png"]
    right, wrong = analysis.cases_from_outputs(
        paths, logits=logits, truth=truth, losses=np.array([0.1, 2.2]), task=make_task("multiclass", LABELS)
    )
    assert right == Case(paths[0], pytest.approx(0.1), "cat", "cat 0.91", False, None)  # type: ignore[arg-type]
    assert (wrong.truth, wrong.predicted, wrong.wrong, wrong.cam_label) == ("cat", "dog 0.79", True, 1)


def test_cases_from_multilabel_outputs(tmp_path: Path) -> None:
    task = make_task("multilabel", LABELS, [0.5, 0.5, 0.5])
    logits = np.array([[0.2, 1.4, -3.0], [-2.0, -2.0, -2.0], [1.0, -1.0, 2.0]])
    truth = np.array([[True, False, False], [False, True, False], [True, False, True]])
    cases = analysis.cases_from_outputs(
        [tmp_path / f"{i}.png" for i in range(3)], logits=logits, truth=truth, losses=np.ones(3), task=task
    )
    assert [(c.truth, c.predicted, c.wrong, c.cam_label) for c in cases] == [
        ("cat", "dog 0.80, cat 0.55", True, 1),  # dog is the false positive to explain
        ("dog", "(none)", True, 1),  # a miss only: explain the missed label
        ("cat, bird", "bird 0.88, cat 0.73", False, None),
    ]


def test_cases_from_binary_outputs(tmp_path: Path) -> None:
    task = make_task("binary", ("ok", "defect"), [0.5])
    truth = np.array([[True, False], [False, True]])
    cases = analysis.cases_from_outputs(
        [tmp_path / "a.png", tmp_path / "b.png"],
        logits=np.array([[2.0], [-1.0]]),
        truth=truth,
        losses=np.ones(2),
        task=task,
    )
    assert [(c.truth, c.predicted, c.wrong, c.cam_label) for c in cases] == [
        ("ok", "defect 0.88", True, 1),
        ("defect", "ok 0.73", True, 0),
    ]
    with pytest.raises(ValueError, match="1 paths, 2 outputs"):
        analysis.cases_from_outputs(
            [tmp_path / "a.png"], logits=np.zeros((2, 1)), truth=truth, losses=np.ones(2), task=task
        )
