"""What a trained run leaves behind: its test files, checked exports, the package and its .mar.

Once the best checkpoint is evaluated, :func:`write_predictions` writes the per-image test answers,
and :func:`export_and_publish`, given the engine's :class:`FinishedRun`, writes the exports (checked
against the eager model), metrics.json and report.md, the package in the model store, its
TorchServe archive and report.html (:mod:`finetune.report_html`).
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from finetune import backbones, data, metrics, quantize
from finetune.analysis import analyse_errors, cam_from_file, cases_from_outputs
from finetune.auto import Plan
from finetune.checkpoint import TrainState
from finetune.config import TrainConfig
from finetune.explain import CAM_FILE, export_for_package
from finetune.export import export_and_check
from finetune.publish import PackageSpec, publish_package
from finetune.report_html import write_report
from finetune.tasks import TrainingTask
from finetune.torchserve import archive_for_torchserve
from service.explain import EXPLAIN_KEY
from service.preprocess import normalize_array
from service.tasks import Task, make_task

logger = logging.getLogger(__name__)
PUBLISHED = "published.txt"  # in the run folder: the package's path, once published
PARITY_IMAGES = 32  # validation images the exports are checked on, and the package's parity set
PARITY_FILES = {"images": "parity_images.npy", "logits": "parity_logits.npy"}


@dataclass
class RunResult:
    run_dir: Path
    package_dir: Path | None
    test_metrics: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        test = self.test_metrics
        lines = [f"run folder: {self.run_dir}"]
        if "accuracy" in test:
            accuracy = "subset accuracy" if test.get("task") == "multilabel" else "accuracy"
            extra = "".join(
                f"  {name}: {test[key]:.4f}" for key, name in (("mAP", "mAP"), ("roc_auc", "ROC AUC")) if key in test
            )
            lines.append(
                f"test {accuracy}: {test['accuracy']:.4f}  macro F1: {test['macro']['f1']:.4f}{extra}  "
                f"({test.get('num_samples')} images)"
            )
        lines.append(f"published: {self.package_dir}")
        return "\n".join(lines)


@dataclass(frozen=True)
class FinishedRun:
    """The parts of a trained run that its outputs are written from."""

    config: TrainConfig
    run_dir: Path
    backbone: backbones.Backbone
    splits: data.DataSplits
    state: TrainState
    plan: Plan | None = None  # what the auto settings resolved to (finetune.auto)
    task: TrainingTask | None = None  # with its tuned thresholds; None: multiclass
    test_outputs: tuple[np.ndarray, np.ndarray] | None = None  # test logits and targets, in splits.test order

    @property
    def head(self) -> Task:
        """The serving-side task, with the thresholds tuned on validation."""
        return self.task.head if self.task is not None else make_task("multiclass", self.splits.classes)

    @property
    def best_val(self) -> dict[str, Any]:
        if self.state.best_epoch:
            return self.state.history[self.state.best_epoch - 1]
        return {"epoch": 0, **self.state.probe} if self.state.probe else {}


def write_predictions(run_dir: Path, splits: data.DataSplits, task: Task, logits: np.ndarray) -> None:
    """Per-image test predictions, so a server's answers can be compared image by image: the labels the
    image has, and what the model decides (``task.decided``: the top-1 class of a multiclass model, the
    labels at or above their thresholds of a multi-label one, at least one), ';'-separated."""
    answers = task.decided(task.probabilities(logits))
    lines = ["path\ttrue\tpredicted\tprobability"]
    for sample, answer in zip(splits.test, answers, strict=True):
        truth = ";".join(splits.classes[i] for i in sample.indices)
        scores = ";".join(f"{p:.6f}" for p in answer.values())
        lines.append(f"{sample.path}\t{truth}\t{';'.join(answer)}\t{scores}")
    (run_dir / "test_predictions.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")


def export_and_publish(run: FinishedRun, model: nn.Module, test_metrics: dict[str, Any]) -> Path:
    """Export ``model`` and check each format against it, judge the reduced precisions, write the run's
    reports, publish the package (with its parity set), archive it."""
    cfg = run.config
    export_dir = run.run_dir / "export"
    export_dir.mkdir(exist_ok=True)
    eager = copy.deepcopy(model).cpu().to(memory_format=torch.contiguous_format).float().eval()
    spec = run.backbone.preprocess
    pixels = quantize.load_pixels(run.splits.val[:PARITY_IMAGES], spec)
    images = torch.from_numpy(np.stack([normalize_array(p, spec) for p in pixels]))
    formats, opset, atol = cfg.export_formats, cfg.opset, cfg.parity_atol
    reports = export_and_check(eager, images, export_dir, formats=formats, opset=opset, atol=atol, task=run.head)
    write_parity_set(export_dir, pixels, quantize.eager_runner(eager)(images.numpy()))
    extra_files = export_for_package(eager, run.backbone.name, images[:2], export_dir)
    analysis = _error_analysis(run, export_dir / CAM_FILE, test_metrics)
    evidence = _precisions(run, eager, export_dir)
    parity = {fmt: report.to_dict() for fmt, report in reports.items()}
    checks = [report.describe() for report in reports.values()]
    for line in checks:
        logger.info("export check %s", line)
    for line in evidence.lines():
        logger.info("precision %s", line)
    _write_metrics(run, test_metrics, parity, checks + evidence.lines(), evidence.metrics, analysis)
    package_spec = PackageSpec(
        name=cfg.name,
        backbone=run.backbone.name,
        labels=tuple(run.splits.classes),
        preprocess=spec,
        metrics=_summary_metrics(run, test_metrics, parity) | {"precisions": evidence.metrics},
        extra={
            "run": str(run.run_dir.resolve()),
            "weights": run.backbone.weights,
            "onnx_opset": parity.get("onnx", {}).get("opset"),
        }
        | ({EXPLAIN_KEY: extra_files[0]} if extra_files else {}),
        parity=dict(PARITY_FILES),
        task=run.head.name,
        thresholds=tuple(float(t) for t in run.head.thresholds),
    )
    package = publish_package(
        package_spec,
        export_dir=export_dir,
        store=cfg.model_store,
        formats=(*cfg.export_formats, *evidence.formats),
        version=cfg.version,
        extra_files=extra_files,
    )
    (run.run_dir / PUBLISHED).write_text(f"{package}\n", encoding="utf-8")
    archive_for_torchserve(package, store=cfg.model_store, mode=cfg.torchserve)
    write_report(run.run_dir)  # last: it shows every file above, the package's path too
    return package


def write_parity_set(export_dir: Path, pixels: np.ndarray, logits: np.ndarray) -> None:
    """The parity set: uint8 (N, H, W, 3) preprocessed pixels and the eager model's float32 logits for them."""
    np.save(export_dir / PARITY_FILES["images"], np.ascontiguousarray(pixels, dtype=np.uint8), allow_pickle=False)
    np.save(export_dir / PARITY_FILES["logits"], np.asarray(logits, dtype=np.float32), allow_pickle=False)


def _precisions(run: FinishedRun, eager: nn.Module, export_dir: Path) -> quantize.Evidence:
    """bf16 and (``--int8 true``) int8 judged on every held-out image: validation and test, once each."""
    cfg = run.config
    held_out = tuple({s.path: s for s in (*run.splits.val, *run.splits.test)}.values())
    int8 = quantize.Int8Options(run.splits.train, cfg.calibration_images) if cfg.int8 else None
    return quantize.evaluate(
        export_dir,
        quantize.eager_runner(eager),
        held_out,
        run.backbone.preprocess,
        task=run.head,
        int8=int8,
        max_accuracy_drop=cfg.max_accuracy_drop,
        seed=cfg.seed,
    )


def _summary_metrics(run: FinishedRun, test: dict[str, Any], parity: dict[str, Any]) -> dict[str, Any]:
    keys = ("accuracy", f"top{run.config.topk}_accuracy", "loss", "num_samples", "mAP", "roc_auc", "pr_auc")
    return {
        "test": {k: test[k] for k in keys if k in test}
        | {"macro_f1": test["macro"]["f1"], "weighted_f1": test["weighted"]["f1"]},
        "best_val": run.best_val,
        "export_parity": parity,
    }


def _error_analysis(run: FinishedRun, cam_path: Path, test: dict[str, Any]) -> list[str]:
    """The top-losses contact sheets (with Grad-CAM overlays where the backbone has ``cam.pt``) and the
    most confused pairs, as report.md lines."""
    if run.test_outputs is None or run.task is None or run.config.error_analysis == 0:
        return []
    logits, targets = run.test_outputs
    cases = cases_from_outputs(
        [s.path for s in run.splits.test], logits=logits, truth=run.task.truth(targets),
        losses=run.task.losses(logits, targets), task=run.head,
    )  # fmt: skip
    spec = run.backbone.preprocess
    return analyse_errors(
        run.run_dir, cases, preprocess=spec, labels=run.head.labels, confusion=test.get("confusion_matrix"),
        cam=cam_from_file(cam_path, spec), top_n=run.config.error_analysis,
    )  # fmt: skip


def _write_metrics(
    run: FinishedRun,
    test: dict[str, Any],
    parity: dict[str, Any],
    checks: list[str],
    precisions: dict[str, Any],
    analysis: list[str],
) -> None:
    state, skipped = run.state, run.splits.skipped
    payload = {
        "test": test,
        "best_epoch": state.best_epoch,
        "best_val": run.best_val,
        "history": state.history,
        "export_parity": parity,
        "precisions": precisions,
        "auto": run.plan.reason if run.plan is not None else {},
        "skipped_images": [[str(p), reason] for p, reason in skipped],
    }
    (run.run_dir / "metrics.json").write_text(json.dumps(payload, indent=2), encoding="utf-8")
    (run.run_dir / "history.json").write_text(json.dumps(state.history, indent=2), encoding="utf-8")
    title = f"{run.config.name}: test set ({run.backbone.name}, {run.head.describe()})"
    report = [run.task.report(test, title=title) if run.task else metrics.format_report(test, title=title)]
    best = "the head fitted on cached features" if state.best_epoch == 0 else f"{state.best_epoch}"
    report.append(f"\nBest validation epoch: {best} (of {state.epoch}).\n")
    if run.plan is not None:
        report.append("## Learning rate, budget and schedule\n")
        report += [f"- {line}" for line in run.plan.summary()]
        report.append("")
    report.append("## Export checks and reduced precisions\n")
    report += [f"- {line}" for line in checks]
    if analysis:
        report += ["", *analysis]
    if skipped:
        report.append("\n## Skipped images\n")
        report += [f"- `{path}`: {reason}" for path, reason in skipped]
    (run.run_dir / "report.md").write_text("\n".join(report) + "\n", encoding="utf-8")
