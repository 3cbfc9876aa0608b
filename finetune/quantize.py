"""Reduced precisions at export time: INT8 by calibration, and the evidence for bf16 and int8.

INT8 is ``nncf.quantize`` on the exported ``model.onnx`` (NNCF's ONNX path: one QDQ file that both
ONNX Runtime and OpenVINO run with their int8 kernels), calibrated on a stratified sample of the
training split through the eval preprocessing. Each recipe is judged by :func:`finetune.guard.judge`
against the eager fp32 model on every held-out image (validation and test, none used for
calibration), on every installed backend that runs the precision; the first recipe that some
backend may serve is kept. bf16 is a runtime choice: judged the same way where this CPU has bf16.

    evidence = evaluate(export_dir, eager_runner(model), held_out, spec, task=manifest.head, int8=Int8Options(train))
    evidence.metrics        # -> manifest.metrics["precisions"]
    evidence.formats        # ("onnx_int8",) when an int8 recipe passed
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from finetune.data import Sample
from finetune.guard import PUBLISHED, judge
from finetune.tasks import truth_matrix
from service import registry
from service.backends import Backend, LoadOptions, installed, open_backend
from service.manifest import Preprocess
from service.precision import host_features
from service.preprocess import crop_pixels, decode_image, draft_size, normalize_array
from service.tasks import Task

logger = logging.getLogger(__name__)

RECIPES = ("performance", "mixed", "mixed-float-ends")  # tried in this order until one passes
INT8_FORMAT = "onnx_int8"
CHUNK = 32  # images decoded and run at a time

Runner = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Int8Options:
    """What ``--int8 true`` calibrates on."""

    calibration: Sequence[Sample]  # the training split: a stratified sample of ``size`` is drawn from it
    size: int = 300


@dataclass
class Evidence:
    """What the guard found: ``metrics`` for the manifest, the extra ``formats`` to publish."""

    metrics: dict[str, Any] = field(default_factory=dict)
    formats: tuple[str, ...] = ()

    def lines(self) -> list[str]:
        """One line per precision and backend, for the log and report.md."""
        out = []
        for precision, entry in self.metrics.items():
            if "backends" not in entry:
                out.append(f"{precision}: {entry.get('summary', entry.get('verdict', ''))}")
            for backend, figures in entry.get("backends", {}).items():
                recipe = f" ({entry['recipe']})" if entry.get("recipe") else ""
                out.append(f"{precision} on {backend}{recipe}: {figures['verdict']}, {figures['summary']}")
        return out


def load_pixels(samples: Sequence[Sample], spec: Preprocess) -> np.ndarray:
    """The uint8 (N, crop, crop, 3) pixels of ``samples``, decoded and preprocessed as the server does."""
    crop, draft_to = spec.crop, draft_size(spec)
    pixels = [
        crop_pixels(decode_image(s.path.read_bytes(), source=str(s.path), draft_to=draft_to), spec) for s in samples
    ]
    return np.stack(pixels) if pixels else np.zeros((0, crop, crop, 3), dtype=np.uint8)


def stratified_sample(samples: Sequence[Sample], size: int, *, seed: int) -> list[Sample]:
    """Up to ``size`` samples, each class in proportion to its share (at least one each), seeded."""
    if len(samples) <= size:
        return list(samples)
    groups: dict[int, list[Sample]] = {}
    for sample in samples:
        groups.setdefault(sample.label, []).append(sample)
    chosen: list[Sample] = []
    for label, group in sorted(groups.items()):
        take = max(1, round(size * len(group) / len(samples)))
        chosen += random.Random(f"{seed}:{label}").sample(group, min(take, len(group)))
    return chosen[:size]


def _chunks(samples: Sequence[Sample], spec: Preprocess) -> Iterator[np.ndarray]:
    for start in range(0, len(samples), CHUNK):
        pixels = load_pixels(samples[start : start + CHUNK], spec)
        yield np.stack([normalize_array(p, spec) for p in pixels])


def logits_of(runners: dict[str, Runner], samples: Sequence[Sample], spec: Preprocess) -> dict[str, np.ndarray]:
    """Each runner's logits on ``samples``, decoding each image once for all of them."""
    parts: dict[str, list[np.ndarray]] = {name: [] for name in runners}
    for batch in _chunks(samples, spec):
        for name, run in runners.items():
            parts[name].append(run(batch))
    return {name: np.concatenate(chunks) for name, chunks in parts.items()}


def eager_runner(model: nn.Module) -> Runner:
    def run(batch: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return np.asarray(model(torch.from_numpy(batch)).float().numpy())

    return run


def quantize_int8(onnx_path: Path, calibration: np.ndarray, out_path: Path, *, recipe: str) -> Path:
    """``nncf.quantize`` ``onnx_path`` on ``calibration`` (float32 N,3,H,W) into ``out_path`` (one QDQ file)."""
    import nncf
    import onnx

    logging.getLogger("nncf").setLevel(logging.ERROR)  # its progress notes; not nncf.set_log_level: that sets handlers
    model = onnx.load(str(onnx_path))
    preset = nncf.QuantizationPreset.PERFORMANCE if recipe == "performance" else nncf.QuantizationPreset.MIXED
    ignored = nncf.IgnoredScope(names=_float_ends(model)) if recipe == "mixed-float-ends" else None
    dataset = nncf.Dataset([calibration[i : i + 1] for i in range(len(calibration))], lambda x: {"input": x})
    quantized = nncf.quantize(model, dataset, preset=preset, subset_size=len(calibration), ignored_scope=ignored)
    onnx.save(quantized, str(out_path))
    return out_path


def _float_ends(model: Any) -> list[str]:
    """The first convolution and the last matrix product: the layers most sensitive to int8."""
    nodes = model.graph.node
    first = next((n.name for n in nodes if n.op_type == "Conv"), None)
    last = next((n.name for n in reversed(nodes) if n.op_type in ("Gemm", "MatMul")), None)
    return [name for name in (first, last) if name]


def _backends(precision: str, export_dir: Path) -> dict[str, Backend]:
    """Every installed backend that runs ``precision`` from a file in ``export_dir``, loaded on the CPU."""
    loaded = {}
    for name, spec in registry.BACKENDS.items():
        fmt = spec.format_for(precision)
        path = export_dir / registry.FORMAT_FILES[fmt] if fmt else None
        if path is not None and path.is_file() and installed(name):
            loaded[name] = open_backend(name, path, LoadOptions(precision=precision))
    return loaded


def _judge_all(
    precision: str, export_dir: Path, reference: np.ndarray, held_out: Sequence[Sample], spec: Preprocess, **kw: Any
) -> dict[str, Any]:
    backends = _backends(precision, export_dir)
    outputs = logits_of({name: b.run for name, b in backends.items()}, held_out, spec)
    truth = truth_matrix(held_out, len(kw["task"].labels))
    verdicts = {name: judge(reference, logits, truth, **kw) for name, logits in outputs.items()}
    passed = [v for v in verdicts.values() if v["verdict"] in PUBLISHED]
    best = "pass" if any(v["verdict"] == "pass" for v in passed) else ("inconclusive" if passed else "fail")
    return {"verdict": best if verdicts else "not measured", "backends": verdicts}


def evaluate(
    export_dir: Path,
    reference_model: Runner,
    held_out: Sequence[Sample],
    spec: Preprocess,
    *,
    task: Task,
    int8: Int8Options | None,
    max_accuracy_drop: float = 0.5,
    seed: int = 0,
) -> Evidence:
    """Judge bf16 (where this CPU has it) and, with ``int8``, calibrate and judge int8 recipe by recipe.

    ``reference_model`` gives the fp32 logits everything is judged against: the eager model
    (:func:`eager_runner`) at fine-tune time, the package's own fp32 ONNX model for an existing package.
    """
    evidence = Evidence()
    if not held_out or not (export_dir / registry.FORMAT_FILES["onnx"]).is_file():
        return evidence
    reference = logits_of({"fp32": reference_model}, held_out, spec)["fp32"]
    kw = {"task": task, "max_drop": max_accuracy_drop}
    why = host_features().unsupported("bf16")
    bf16 = (
        {"verdict": "not measured", "summary": why}
        if why
        else _judge_all("bf16", export_dir, reference, held_out, spec, **kw)
    )
    evidence.metrics["bf16"] = bf16
    if int8 is not None:
        evidence.metrics["int8"] = _int8(export_dir, reference, held_out, spec, int8, seed=seed, **kw)
        if evidence.metrics["int8"]["verdict"] in PUBLISHED:
            evidence.formats = (INT8_FORMAT,)
    return evidence


def _int8(
    export_dir: Path,
    reference: np.ndarray,
    held_out: Sequence[Sample],
    spec: Preprocess,
    options: Int8Options,
    *,
    seed: int,
    **kw: Any,
) -> dict[str, Any]:
    chosen = stratified_sample(options.calibration, options.size, seed=seed)
    calibration = np.concatenate(list(_chunks(chosen, spec)))
    target = export_dir / registry.FORMAT_FILES[INT8_FORMAT]
    tried = []
    for recipe in RECIPES:
        quantize_int8(export_dir / registry.FORMAT_FILES["onnx"], calibration, target, recipe=recipe)
        result = _judge_all("int8", export_dir, reference, held_out, spec, **kw)
        result |= {"recipe": f"nncf-{recipe}", "calibration_images": len(chosen)}
        tried.append({"recipe": result["recipe"], "verdict": result["verdict"]})
        logger.info("int8 recipe nncf-%s: %s", recipe, result["verdict"])
        if result["verdict"] in PUBLISHED:
            return result | {"tried": tried}
    target.unlink(missing_ok=True)
    return {"verdict": "fail", "summary": "no recipe passed the guard", "tried": tried, "backends": result["backends"]}
