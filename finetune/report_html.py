"""``report.html``: a run folder as one page to look at, standalone (every image embedded), made from the
files the run wrote, so it can be made again for any run folder.

It holds the configuration, the data (images per class and split, skipped files and why), the training
curves (loss, accuracy, LR, images/s, the share of time waiting for data), the confusion matrix, the
per-class precision/recall/F1, the export checks and reduced precisions, and the worst mistakes with
their Grad-CAM. ``finetune compare`` writes one for the comparison too: its plot, its table and a link to
each backbone's page. Labels come from folder names, so every text is escaped (``html.escape``).

    write_report(Path("runs/flowers-20260101-120000"))       # -> .../report.html; or: finetune report RUN_DIR
    write_comparison(out_dir, headers, cells, links)          # -> runs/compare-<time>/report.html

The figures use Matplotlib's object API on the Agg canvas (no pyplot), as ``finetune.metrics`` does.
"""

from __future__ import annotations

import argparse
import base64
import csv
import html
import io
import json
import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml

logger = logging.getLogger(__name__)
REPORT = "report.html"
SPLITS = ("train", "val", "test")
CURVES = (  # (title, [(history key, legend)])
    ("loss", [("train_loss", "train"), ("val_loss", "validation")]),
    ("accuracy", [("train_accuracy", "train"), ("val_accuracy", "validation"), ("val_macro_f1", "val macro F1")]),
    ("learning rate (head)", [("lr", "LR")]),
    ("training images/s", [("images_per_second", "images/s")]),
    ("share of time waiting for data", [("data_wait_fraction", "data wait")]),
)
STYLE = """
body { font-family: system-ui, sans-serif; color: #1d2430; max-width: 72rem; margin: 1rem auto; padding: 0 1rem; }
h1 { font-size: 1.4rem; } h2 { font-size: 1.15rem; border-bottom: 1px solid #d7dde5; padding-bottom: .2rem; }
table { border-collapse: collapse; font-size: .9rem; margin: .5rem 0 1rem; }
th, td { text-align: left; padding: .25rem .6rem; border-bottom: 1px solid #e3e7ec; vertical-align: top; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; height: auto; }
.muted { color: #5b6675; }
code { font-size: .85rem; overflow-wrap: anywhere; }
"""


# ---- small HTML helpers: every text goes through html.escape ----------------------------------------
def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _cell(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return f"<td>{_e(value)}</td>"
    if isinstance(value, float):
        text = f"{value:.4f}" if value == 0 or 1e-3 <= abs(value) < 1e4 else f"{value:.4g}"
        return f'<td class="n">{text}</td>'
    if isinstance(value, int):
        return f'<td class="n">{value:,}</td>'
    return f"<td>{_e(value)}</td>"


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """An HTML table; numbers right-aligned, everything else escaped."""
    head = "<thead><tr>" + "".join(f"<th>{_e(h)}</th>" for h in headers) + "</tr></thead>" if headers else ""
    body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in rows)
    return f"<table>{head}<tbody>{body}</tbody></table>"


def image(data: bytes, alt: str, *, media_type: str = "image/png") -> str:
    """An ``<img>`` with the picture embedded as a data: URI, so the page needs no file beside it."""
    encoded = base64.b64encode(data).decode("ascii")
    return f'<img src="data:{media_type};base64,{encoded}" alt="{_e(alt)}">'


def _image_file(path: Path, alt: str) -> str:
    return image(path.read_bytes(), alt) if path.is_file() else ""


def page(title: str, sections: Iterable[str]) -> str:
    """The whole document: one inline style sheet, no script."""
    body = "\n".join(section for section in sections if section)
    return (
        f'<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{_e(title)}</title>\n'
        f"<style>{STYLE}</style>\n</head>\n<body>\n<h1>{_e(title)}</h1>\n{body}\n</body>\n</html>\n"
    )


# ---- reading the run folder --------------------------------------------------------------------------
def _json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _lines(path: Path) -> list[str]:
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line] if path.is_file() else []


def split_counts(run_dir: Path) -> tuple[list[str], dict[str, Counter[str]]]:
    """The labels (``splits/classes.txt``) and, per split, images per label (``splits/<split>.txt``)."""
    folder = run_dir / "splits"
    labels = _lines(folder / "classes.txt")
    counts: dict[str, Counter[str]] = {}
    for split in SPLITS:
        counts[split] = Counter(label for line in _lines(folder / f"{split}.txt") for label in line.split("\t")[1:])
    return labels, counts


# ---- sections ----------------------------------------------------------------------------------------
def _summary(run_dir: Path, metrics: dict[str, Any], config: dict[str, Any]) -> str:
    test = metrics.get("test", {})
    published = _lines(run_dir / "published.txt")
    rows: list[tuple[str, Any]] = [
        ("backbone", config.get("backbone", "")),
        ("task", test.get("task", "multiclass")),
        ("data", config.get("data", "")),
        ("test images", test.get("num_samples", "")),
    ]
    rows += [(name, test[key]) for key, name in _HEADLINES if isinstance(test.get(key), float)]
    rows += [(f"{avg} F1", test[avg]["f1"]) for avg in ("macro", "weighted") if isinstance(test.get(avg), dict)]
    rows.append(("best validation epoch", metrics.get("best_epoch", "")))
    rows.append(("package", published[0] if published else "not published"))
    return "<h2>Summary</h2>" + table((), rows)


_HEADLINES = (("accuracy", "accuracy"), ("top5_accuracy", "top-5 accuracy"), ("loss", "loss"), ("mAP", "mAP"),
              ("roc_auc", "ROC AUC"), ("pr_auc", "PR AUC"))  # fmt: skip


def _configuration(config: dict[str, Any], auto: dict[str, Any]) -> str:
    rows = [(key, value if isinstance(value, str) else json.dumps(value)) for key, value in config.items()]
    out = "<h2>Configuration</h2><details><summary>every setting of the run (config.yaml)</summary>"
    out += table(("setting", "value"), rows) + "</details>"
    if auto:
        out += "<p>What the automatic settings resolved to, and why:</p>" + table(("setting", "choice"), auto.items())
    return out


def _data(run_dir: Path, metrics: dict[str, Any]) -> str:
    labels, counts = split_counts(run_dir)
    rows = [(label, *(counts[split][label] for split in SPLITS)) for label in labels]
    rows.append(("all", *(sum(counts[split].values()) for split in SPLITS)))
    out = "<h2>Data</h2>" + table(("label", *SPLITS), rows)
    skipped = [line.split("\t", 1) for line in _lines(run_dir / "splits" / "skipped.txt")]
    if not skipped:
        skipped = [list(row) for row in metrics.get("skipped_images", [])]
    if skipped:
        out += f"<p>{len(skipped)} file(s) skipped:</p>" + table(("file", "why"), skipped)
    else:
        out += '<p class="muted">No file was skipped.</p>'
    return out


def curves_png(history: Sequence[dict[str, Any]]) -> bytes:
    """The training curves as one PNG: a panel per quantity of ``CURVES``, by epoch."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(12, 6.5), dpi=90, layout="constrained")
    FigureCanvasAgg(figure)
    epochs = [row["epoch"] for row in history]
    for index, (title, series) in enumerate(CURVES):
        axes = figure.add_subplot(2, 3, index + 1)
        for key, legend in series:
            if all(key in row for row in history):
                axes.plot(epochs, [row[key] for row in history], marker="o", label=legend)
        axes.set_title(title)
        axes.set_xlabel("epoch")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
        if len(series) > 1:
            axes.legend(fontsize="small")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _curves(metrics: dict[str, Any]) -> str:
    history = metrics.get("history") or []
    if not history:
        return (
            "<h2>Training curves</h2><p class='muted'>No epoch was trained end to end: the head was fitted on "
            "cached features (a linear probe), so there are no curves.</p>"
        )
    return "<h2>Training curves</h2>" + image(curves_png(history), "training curves")


def _confusion(run_dir: Path, test: dict[str, Any]) -> str:
    picture = _image_file(run_dir / "test_confusion_matrix.png", "confusion matrix of the test split")
    out = "<h2>Confusion matrix (test split)</h2>" + picture
    matrix, labels = test.get("confusion_matrix"), test.get("labels")
    if matrix and labels:
        out += table(("true \\ predicted", *labels), ([label, *row] for label, row in zip(labels, matrix, strict=True)))
    elif isinstance(test.get("label_confusion"), dict):
        rows = (
            [label, *(c.get(k, "") for k in ("tp", "fp", "fn", "tn"))] for label, c in test["label_confusion"].items()
        )
        out += "<p>Per label (multi-label):</p>" + table(("label", "TP", "FP", "FN", "TN"), rows)
    return out


def _per_class(test: dict[str, Any]) -> str:
    per_class = test.get("per_class") or {}
    if not per_class:
        return ""
    keys = ["precision", "recall", "f1", "support"] + [
        k for k in ("ap", "threshold") if k in next(iter(per_class.values()))
    ]
    rows = ([label, *(values.get(k, "") for k in keys)] for label, values in per_class.items())
    return "<h2>Per class</h2>" + table(("label", *keys), rows)


def _checks(metrics: dict[str, Any]) -> str:
    parity = metrics.get("export_parity") or {}
    rows = [
        (fmt, "passed" if r.get("passed") else "FAILED", r.get("max_abs_diff"), r.get("tolerance"),
         r.get("top1_agreement"), r.get("num_images"))
        for fmt, r in parity.items()
    ]  # fmt: skip
    out = "<h2>Export checks</h2><p>Each export loaded back and compared with the eager model:</p>"
    out += table(("format", "verdict", "max |logit diff|", "tolerance", "top-1 agreement", "images"), rows)
    precisions = []
    for precision, evidence in (metrics.get("precisions") or {}).items():
        for backend, judged in (evidence.get("backends") or {}).items():
            precisions.append((precision, backend, judged.get("verdict", ""), judged.get("summary", "")))
    if precisions:
        out += "<p>Reduced precisions judged against fp32:</p>"
        out += table(("precision", "backend", "verdict", "evidence"), precisions)
    return out


def _wrong_predictions(run_dir: Path) -> list[list[str]]:
    path = run_dir / "test_predictions.tsv"
    if not path.is_file():
        return []
    with path.open(encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    wrong = (r for r in rows if set(r["true"].split(";")) != set(r["predicted"].split(";")))  # multi-label: any order
    return [[r["path"], r["true"], r["predicted"], r["probability"]] for r in wrong]


def confused_pairs(test: dict[str, Any], top: int = 10) -> list[tuple[str, str, int, str]]:
    """The off-diagonal cells of the confusion matrix, largest first: (true, predicted, images, share of true)."""
    matrix, labels = test.get("confusion_matrix") or [], test.get("labels") or []
    pairs = [
        (labels[i], labels[j], count, f"{100 * count / max(sum(row), 1):.1f}%")
        for i, row in enumerate(matrix)
        for j, count in enumerate(row)
        if i != j and count > 0
    ]
    return sorted(pairs, key=lambda pair: -pair[2])[:top]


def _mistakes(run_dir: Path, test: dict[str, Any]) -> str:
    errors = run_dir / "errors"
    out = "<h2>Worst mistakes</h2>"
    sheets = _image_file(errors / "top_losses.png", "the wrong test images of highest loss")
    sheets += _image_file(errors / "top_losses_gradcam.png", "Grad-CAM of the wrongly predicted label")
    out += sheets or '<p class="muted">No contact sheet: no wrong test image, or error analysis was off.</p>'
    pairs = confused_pairs(test)
    if pairs:
        out += "<h3>Most confused pairs</h3>" + table(("true", "predicted", "images", "share of true"), pairs)
    wrong = _wrong_predictions(run_dir)
    if wrong:
        out += f"<h3>Every wrong test image ({len(wrong)})</h3>"
        out += table(("image", "true", "predicted", "probability"), wrong)
    return out


def write_report(run_dir: Path) -> Path:
    """Write ``run_dir/report.html`` from the files of the run folder; returns its path."""
    metrics = _json(run_dir / "metrics.json")
    config_path = run_dir / "config.yaml"
    config = (yaml.safe_load(config_path.read_text(encoding="utf-8")) if config_path.is_file() else None) or {}
    test = metrics.get("test", {})
    title = f"{config.get('name', run_dir.name)}: run {run_dir.name}"
    sections = [
        _summary(run_dir, metrics, config),
        _configuration(config, metrics.get("auto") or {}),
        _data(run_dir, metrics),
        _curves(metrics),
        _image_file(run_dir / "lr_find.png", "learning-rate range test"),
        _confusion(run_dir, test),
        _per_class(test),
        _checks(metrics),
        _mistakes(run_dir, test),
    ]
    path = run_dir / REPORT
    path.write_text(page(title, sections), encoding="utf-8")
    return path


def write_comparison(
    out_dir: Path, headers: Sequence[str], cells: Sequence[Sequence[str]], links: Sequence[str]
) -> Path:
    """``out_dir/report.html`` of ``finetune compare``: the time-vs-accuracy plot (``comparison.png``), the
    table (``cells``, already formatted) and a link to each run's own report (``links``, relative paths)."""
    rows = "".join(
        "<tr>" + "".join(f"<td>{_e(cell)}</td>" for cell in row) + f'<td><a href="{_e(link)}">report</a></td></tr>'
        for row, link in zip(cells, links, strict=True)
    )
    head = "".join(f"<th>{_e(h)}</th>" for h in (*headers, "run"))
    sections = [
        _image_file(out_dir / "comparison.png", "test accuracy against training time"),
        f"<h2>Backbones</h2><table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>",
    ]
    path = out_dir / REPORT
    path.write_text(page(f"comparison {out_dir.name}", sections), encoding="utf-8")
    return path


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="finetune report", description="Write (again) the report.html of run folders, from their files."
    )
    parser.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN_DIR", help="a run folder (runs/<name>-<time>)")
    return parser


def main(args: argparse.Namespace) -> int:
    """``finetune report RUN_DIR...``: 0 when every folder got its page, 2 when one is not a run folder."""
    status = 0
    for run_dir in args.run_dirs:
        if not (run_dir / "metrics.json").is_file():
            logger.error("%s is not a finished run folder (no metrics.json)", run_dir)
            status = 2
            continue
        print(write_report(run_dir))
    return status
