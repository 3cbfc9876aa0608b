"""Error analysis of a test split: the wrong images with the highest loss, and the most confused pairs.

fastai's "top losses" for every task: the caller says, per test image, its loss, what it is, what the
model answered and whether that was wrong (a :class:`Case`); :func:`analyse_errors` draws the worst
wrong ones as the model sees them (the eval crop) into ``errors/top_losses.png``, their Grad-CAM
overlays into ``errors/top_losses_gradcam.png`` when given a ``cam``, and returns report.md lines.

    head = task.head                                           # finetune.tasks.TrainingTask
    cases = cases_from_outputs([s.path for s in splits.test], logits=logits, truth=task.truth(targets),
                               losses=task.losses(logits, targets), task=head)
    cam = cam_from_file(run_dir / "export" / CAM_FILE, spec)   # None without cam.pt
    lines = analyse_errors(run_dir, cases, preprocess=spec, labels=head.labels,
                           confusion=test_metrics.get("confusion_matrix"), cam=cam)

The figures use Matplotlib's object API on the Agg canvas (no pyplot), as ``finetune.metrics`` does.
"""

from __future__ import annotations

import logging
import math
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from finetune.explain import overlay
from service.errors import InvalidInput, PayloadTooLarge
from service.explain import grad_cam_with_logits, load_cam
from service.manifest import Preprocess
from service.preprocess import crop_pixels, decode_image, draft_size, normalize_array
from service.tasks import Task

if TYPE_CHECKING:
    from matplotlib.figure import Figure

logger = logging.getLogger(__name__)
ERRORS_DIR = "errors"
SHEET = "top_losses.png"
CAM_SHEET = "top_losses_gradcam.png"
TOP_PAIRS = 10  # rows of the most-confused-pairs table
COLUMNS = 4  # images per row of a contact sheet
_TITLE_WIDTH = 30  # characters per title line before it wraps

Cam = Callable[[np.ndarray, int], np.ndarray]  # (uint8 HxWx3 crop, label index) -> HxW heatmap in [0, 1]


@dataclass(frozen=True)
class Case:
    """One test image as the error analysis sees it; ``truth`` and ``predicted`` are display text."""

    path: Path  # the test image
    loss: float  # its loss under the task (cross-entropy, or summed BCE for multi-label)
    truth: str  # e.g. "cat", "cat, dog" or "(none)"
    predicted: str  # e.g. "dog 0.91" or "cat 0.55, person 0.80"
    wrong: bool  # the labels given differ from the true labels
    cam_label: int | None = None  # label index whose Grad-CAM to draw (the wrongly predicted one); None: none


def analyse_errors(
    out_dir: Path,
    cases: Sequence[Case],
    *,
    preprocess: Preprocess,
    labels: Sequence[str],
    confusion: Sequence[Sequence[int]] | np.ndarray | None = None,
    cam: Cam | None = None,
    top_n: int = 16,
) -> list[str]:
    """Write ``out_dir/errors/top_losses.png`` (and ``_gradcam.png`` with ``cam``); return report.md lines.

    The ``top_n`` wrong cases of highest loss are drawn, highest first. ``confusion`` (rows true,
    columns predicted; multiclass) adds the most confused pairs. Links are relative to ``out_dir``,
    where report.md is expected to live. Without a wrong case no PNG is written (stale ones removed).
    """
    if top_n < 1:
        raise ValueError(f"top_n must be at least 1, got {top_n}")
    errors_dir = out_dir / ERRORS_DIR
    for name in (SHEET, CAM_SHEET):
        (errors_dir / name).unlink(missing_ok=True)
    worst = top_losses(cases, top_n)
    lines = ["## Error analysis", ""]
    if not worst:
        lines += [f"No wrong predictions among the {len(cases)} test images.", ""]
    else:
        wrong = sum(case.wrong for case in cases)
        lines += [
            f"The {len(worst)} wrong test images of highest loss ({wrong} wrong of {len(cases)}), highest first, "
            "as the model sees them (eval crop):",
            "",
        ]
        lines += _draw(errors_dir, worst, preprocess, labels, cam)
        lines += _cases_table(worst)
    if confusion is not None:
        lines += _pairs_section(most_confused(confusion, labels))
    return lines


def top_losses(cases: Sequence[Case], top_n: int) -> list[Case]:
    """The wrong cases, highest loss first (a NaN loss last, ties in input order), at most ``top_n``."""
    wrong = [case for case in cases if case.wrong]
    return sorted(wrong, key=lambda case: -math.inf if math.isnan(case.loss) else case.loss, reverse=True)[:top_n]


def _draw(
    errors_dir: Path, worst: Sequence[Case], spec: Preprocess, labels: Sequence[str], cam: Cam | None
) -> list[str]:
    errors_dir.mkdir(parents=True, exist_ok=True)
    crops = [load_crop(case.path, spec) for case in worst]
    titles = [_title(rank, case) for rank, case in enumerate(worst, 1)]
    contact_sheet(crops, titles, title="Top losses: wrong test images").savefig(errors_dir / SHEET)
    lines = [f"![top losses]({ERRORS_DIR}/{SHEET})", ""]
    if cam is not None and _draw_cams(errors_dir / CAM_SHEET, worst, crops, labels, cam):
        lines += [f"![Grad-CAM of the top losses]({ERRORS_DIR}/{CAM_SHEET})", ""]
    return lines


def _draw_cams(path: Path, worst: Sequence[Case], crops: Sequence[np.ndarray], labels: Sequence[str], cam: Cam) -> bool:
    """The Grad-CAM sheet; False (and a warning) when the cam fails: an explanation never fails a run."""
    pictures, titles = [], []
    try:
        for rank, (case, crop) in enumerate(zip(worst, crops, strict=True), 1):
            if case.cam_label is None:
                pictures.append(crop)
                titles.append(f"#{rank}  (no label to explain)\ntrue: {_wrap(case.truth)}")
            else:
                heat = cam(crop, case.cam_label)
                pictures.append(np.asarray(overlay(Image.fromarray(crop), heat)))
                titles.append(f"#{rank}  Grad-CAM of {_wrap(labels[case.cam_label])}\ntrue: {_wrap(case.truth)}")
    except (RuntimeError, ValueError, IndexError) as exc:
        logger.warning("no Grad-CAM sheet of the top losses: %s", exc)
        return False
    contact_sheet(pictures, titles, title="Top losses: Grad-CAM of the wrongly predicted label").savefig(path)
    return True


def load_crop(path: Path, spec: Preprocess) -> np.ndarray:
    """The uint8 (crop, crop, 3) pixels the model saw of the image at ``path``; mid-grey when unreadable."""
    try:
        image = decode_image(path.read_bytes(), source=str(path), draft_to=draft_size(spec))
    except (OSError, InvalidInput, PayloadTooLarge) as exc:
        logger.warning("error analysis: %s", exc)
        return np.full((spec.crop, spec.crop, 3), 128, dtype=np.uint8)
    return crop_pixels(image, spec)


def _title(rank: int, case: Case) -> str:
    return f"#{rank}  loss {case.loss:.3f}\ntrue: {_wrap(case.truth)}\npred: {_wrap(case.predicted)}"


def _wrap(text: str) -> str:
    """At most two title lines: long label lists are cut with "..."."""
    return "\n".join(textwrap.wrap(textwrap.shorten(text, width=2 * _TITLE_WIDTH, placeholder="..."), _TITLE_WIDTH))


def contact_sheet(images: Sequence[np.ndarray], titles: Sequence[str], *, title: str) -> Figure:
    """A grid of RGB images, :data:`COLUMNS` a row, each with its (multi-line) title; Agg canvas, no pyplot."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    columns = min(COLUMNS, len(images))
    rows = math.ceil(len(images) / columns)
    fig = Figure(figsize=(2.6 * columns, 3.0 * rows + 0.4), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    fig.suptitle(title, fontsize=11)
    for index, (image, text) in enumerate(zip(images, titles, strict=True)):
        ax = fig.add_subplot(rows, columns, index + 1)
        ax.imshow(image, interpolation="bilinear")
        ax.set_title(text, fontsize=8, loc="left")
        ax.set_axis_off()
    return fig


def _cases_table(worst: Sequence[Case]) -> list[str]:
    lines = ["| # | Image | Truth | Predicted | Loss |", "|---:|---|---|---|---:|"]
    lines += [
        f"| {rank} | `{_cell(str(case.path))}` | {_cell(case.truth)} | {_cell(case.predicted)} | {case.loss:.4f} |"
        for rank, case in enumerate(worst, 1)
    ]
    return [*lines, ""]


@dataclass(frozen=True)
class Pair:
    """An off-diagonal cell of a confusion matrix: ``count`` images of ``truth`` predicted as ``predicted``."""

    truth: str
    predicted: str
    count: int
    share: float  # of the true class's images


def most_confused(
    confusion: Sequence[Sequence[int]] | np.ndarray, labels: Sequence[str], *, top: int = TOP_PAIRS
) -> list[Pair]:
    """The ``top`` non-zero off-diagonal cells, most images first (ties: larger share, then matrix order)."""
    counts = np.asarray(confusion, dtype=np.int64)
    if counts.shape != (len(labels), len(labels)):
        raise ValueError(f"confusion matrix of shape {counts.shape} does not match {len(labels)} labels")
    totals = counts.sum(axis=1)
    pairs = [
        Pair(str(labels[row]), str(labels[col]), int(count), float(count / totals[row]))
        for (row, col), count in np.ndenumerate(counts)
        if row != col and count > 0
    ]
    return sorted(pairs, key=lambda pair: (-pair.count, -pair.share))[:top]


def _pairs_section(pairs: Sequence[Pair]) -> list[str]:
    lines = ["### Most confused pairs (true → predicted)", ""]
    if not pairs:
        return [*lines, "No confusions: every test image of every class was predicted as its class.", ""]
    lines += ["| True | Predicted | Images | Share of true |", "|---|---|---:|---:|"]
    lines += [f"| {_cell(p.truth)} | {_cell(p.predicted)} | {p.count} | {p.share:.1%} |" for p in pairs]
    return [*lines, ""]


def _cell(text: str) -> str:
    """Escape text for a Markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


# ---- building the cases and the cam -----------------------------------------------------------------
def cases_from_outputs(
    paths: Sequence[Path], *, logits: np.ndarray, truth: np.ndarray, losses: np.ndarray, task: Task
) -> list[Case]:
    """Cases from a test split's outputs: ``truth`` is (N, labels) booleans (``TrainingTask.truth``),
    ``losses`` per image (``TrainingTask.losses``). An image is wrong when the labels ``task`` gives it
    differ from its true ones; its Grad-CAM label is the wrongly given label of highest probability, or
    (only misses) the missed label of highest probability."""
    probs = task.probabilities(np.asarray(logits))
    scores = task.label_scores(probs, logits=False)
    given = task.decisions(probs)
    truth = np.asarray(truth, dtype=bool)
    if not len(paths) == len(scores) == len(truth) == len(losses):
        raise ValueError(f"{len(paths)} paths, {len(scores)} outputs, {len(truth)} truths, {len(losses)} losses")
    return [
        Case(
            path=Path(path),
            loss=float(loss),
            truth=", ".join(task.labels[i] for i in np.flatnonzero(is_true)) or "(none)",
            predicted=_answer(task.labels, row, picked),
            wrong=bool((picked != is_true).any()),
            cam_label=_cam_label(row, picked, is_true),
        )
        for path, loss, row, picked, is_true in zip(paths, losses, scores, given, truth, strict=True)
    ]


def _answer(labels: Sequence[str], scores: np.ndarray, picked: np.ndarray) -> str:
    order = [int(i) for i in np.argsort(-scores, kind="stable") if picked[i]]
    return ", ".join(f"{labels[i]} {scores[i]:.2f}" for i in order) or "(none)"


def _cam_label(scores: np.ndarray, picked: np.ndarray, is_true: np.ndarray) -> int | None:
    for mistakes in (picked & ~is_true, ~picked & is_true):
        if mistakes.any():
            return int(np.flatnonzero(mistakes)[np.argmax(scores[mistakes])])
    return None


def cam_from_file(path: Path, spec: Preprocess) -> Cam | None:
    """The ``cam`` of :func:`analyse_errors` from a run's exported Grad-CAM module (``export/cam.pt``);
    None when there is none or it cannot be loaded. The crop is normalized per ``spec``; CPU."""
    if not path.is_file():
        return None
    try:
        module = load_cam(path)
    except (RuntimeError, ValueError) as exc:
        logger.warning("Grad-CAM module %s cannot be loaded, no overlays: %s", path, exc)
        return None

    def cam(pixels: np.ndarray, label: int) -> np.ndarray:
        batch = torch.from_numpy(normalize_array(pixels, spec))[None]
        heatmaps = grad_cam_with_logits(module, batch, label)[0]
        return np.asarray(heatmaps[0], dtype=np.float32)

    return cam
