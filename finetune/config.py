"""The resolved, typed configuration of one fine-tuning run (parsed at the edge by ``finetune.cli``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from service.registry import EXPORT_FORMATS
from service.tasks import TASKS

OPTIMIZERS = ("adamw", "sgd")
BALANCE_MODES = ("auto", "weights", "sampler", "none")
AUGMENT_MODES = ("none", "light", "strong")
MIX_MODES = ("none", "mixup", "cutmix", "both")
AMP_MODES = ("auto", "bf16", "fp16", "off")
EARLY_STOP_METRICS = ("auto", "accuracy", "macro_f1", "loss")  # auto: the task's (finetune.tasks)
AUTO = "auto"
TASK_CHOICES = ("auto", *TASKS)  # auto: multilabel or binary when the label file says so, else multiclass
AUTO_FIELDS = ("lr", "epochs", "freeze_epochs", "backbone_lr_scale")  # None means: chosen from the data (finetune.auto)
TORCHSERVE_MODES = ("none", *EXPORT_FORMATS, "both")  # .mar archives written after publishing


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a run. ``freeze_epochs >= epochs`` is a linear probe (only the head trains); ``None`` in
    an ``AUTO_FIELDS`` setting is resolved from the data at the start of the run (``finetune.auto``)."""

    data: Path
    labels: Path | None = None  # a CSV/JSONL label file (finetune.labels); None: class subfolders
    task: str = "auto"  # multiclass, multilabel, binary, or auto: from the labels
    positive_label: str | None = None  # binary: the positive class (default the second in sorted order)
    label_delimiter: str = ";"  # between the labels of one image in a CSV label column
    backbone: str = "resnet50"
    weights: str = "DEFAULT"
    name: str = ""
    version: int | None = None
    output_dir: Path = Path("runs")
    run_name: str = ""
    model_store: Path = Path("model_store")
    epochs: int | None = None  # None: auto (finetune.auto: a budget in optimizer steps)
    batch_size: int = 32
    optimizer: str = "adamw"
    lr: float | None = None  # None: auto (the range test on the head)
    backbone_lr_scale: float | None = None  # None: auto (finetune.auto: BACKBONE_LR_CAP after a fitted head)
    weight_decay: float = 0.05
    momentum: float = 0.9
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    head_dropout: float = 0.2
    freeze_epochs: int | None = None  # None: auto (head fitted on cached features, then the whole network)
    val_split: float = 0.15
    test_split: float = 0.15
    min_images_per_class: int = 3
    seed: int = 0
    balance: str = "auto"
    augment: str = "light"
    mix: str = "none"
    mix_alpha: float = 0.2
    img_size: int | None = None
    amp: str = "auto"
    channels_last: bool = True
    compile: bool = False
    clip_grad: float = 1.0
    ema: bool = False  # validate, test and publish an exponential moving average of the weights
    ema_decay: float = 0.998
    early_stop_metric: str = "auto"
    patience: int = 5
    workers: int = 2
    device: str = "auto"
    export_formats: tuple[str, ...] = EXPORT_FORMATS
    torchserve: str = "torchscript"
    opset: int = 18
    parity_atol: float = 1e-3
    int8: bool = False  # calibrate an int8 model.int8.onnx and publish it if the accuracy guard passes
    calibration_images: int = 300  # stratified sample of the training split
    max_accuracy_drop: float = 0.5  # points of accuracy a reduced precision may lose against fp32
    topk: int = 5
    tta: bool = False  # test evaluation averages the logits of each image and its mirror image
    error_analysis: int = 16  # the wrong test images of highest loss drawn in report.md (0: none)
    tensorboard: bool = True
    resume: Path | None = None

    def __post_init__(self) -> None:
        _check_choice("task", self.task, TASK_CHOICES)
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("balance", self.balance, BALANCE_MODES)
        _check_choice("augment", self.augment, AUGMENT_MODES)
        _check_choice("mix", self.mix, MIX_MODES)
        _check_choice("amp", self.amp, AMP_MODES)
        _check_choice("early_stop_metric", self.early_stop_metric, EARLY_STOP_METRICS)
        for fmt in self.export_formats:
            _check_choice("export_formats", fmt, EXPORT_FORMATS)
        _check_choice("torchserve", self.torchserve, TORCHSERVE_MODES)
        if (self.epochs is not None and self.epochs < 1) or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be at least 1")
        if self.freeze_epochs is not None and self.freeze_epochs < 0:
            raise ValueError("freeze_epochs must be >= 0")
        if not (0.0 <= self.val_split < 1.0 and 0.0 <= self.test_split < 1.0 and self.val_split + self.test_split < 1):
            raise ValueError("val_split and test_split must be in [0, 1) and sum to less than 1")
        if (self.lr is not None and self.lr <= 0) or (self.backbone_lr_scale or 0) < 0:
            raise ValueError("lr must be > 0 and backbone_lr_scale >= 0")
        if self.int8 and "onnx" not in self.export_formats:
            raise ValueError("int8 is calibrated from the ONNX export: keep onnx in export_formats")
        if not 0.0 < self.ema_decay < 1.0:
            raise ValueError("ema_decay must be in (0, 1)")
        if self.error_analysis < 0:
            raise ValueError("error_analysis must be >= 0 (0 draws no images)")
        if self.calibration_images < 1 or self.max_accuracy_drop < 0:
            raise ValueError("calibration_images must be at least 1 and max_accuracy_drop >= 0")

    @property
    def linear_probe(self) -> bool:
        return self.freeze_epochs is not None and self.epochs is not None and self.freeze_epochs >= self.epochs

    @property
    def auto_fields(self) -> tuple[str, ...]:
        """The settings left to ``finetune.auto`` (None here, ``auto`` on the command line and in YAML)."""
        return tuple(name for name in AUTO_FIELDS if getattr(self, name) is None)

    def data_options(self) -> dict[str, Any]:
        """The keyword arguments of ``finetune.data.prepare_data`` that this config sets."""
        return {
            "val_split": self.val_split,
            "test_split": self.test_split,
            "seed": self.seed,
            "min_images_per_class": self.min_images_per_class,
            "labels_file": self.labels,
            "task": self.task,
            "positive": self.positive_label,
            "label_delimiter": self.label_delimiter,
        }

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML-safe values (paths as strings, tuples as lists)."""
        out: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is None and field.name in AUTO_FIELDS:
                value = AUTO
            elif isinstance(value, Path):
                value = str(value)
            elif isinstance(value, tuple):
                value = list(value)
            out[field.name] = value
        return out

    def save(self, path: Path) -> None:
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False), encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> TrainConfig:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown config keys: {', '.join(unknown)}")
        values: dict[str, Any] = {k: None if k in AUTO_FIELDS and v == AUTO else v for k, v in data.items()}
        for key in ("data", "labels", "output_dir", "model_store", "resume"):
            if values.get(key) is not None:
                values[key] = Path(values[key])
        if "export_formats" in values:
            values["export_formats"] = tuple(values["export_formats"])
        return cls(**values)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(choices)}")
