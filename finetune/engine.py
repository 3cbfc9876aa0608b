"""A fine-tuning run from image folder to published package.

    result = run_training(TrainConfig(data=Path("imgs"), backbone="resnet18"))
    print(result.package_dir)   # model_store/imgs/1

Run folder (``runs/<run>/``): config.yaml, run_info.json, splits/, checkpoints/{last,best}.pt,
tensorboard/, train.log, history.json, metrics.json, test_* evaluation files, report.md, export/.
"""

from __future__ import annotations

import json
import logging
import math
import re
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from finetune import auto, backbones, data, metrics, release, tblog, transforms
from finetune.checkpoint import BEST, LAST, TrainState, load_checkpoint, save_checkpoint
from finetune.config import TrainConfig
from finetune.distributed import init_from_env
from finetune.loop import (
    EpochStats,
    StepContext,
    WeightEMA,
    maybe_compile,
    predict,
    resolve_runtime,
    train_one_epoch,
)
from finetune.optim import build_optimizer, build_scheduler, schedule_factor
from finetune.release import RunResult
from finetune.runfolder import RunFolder
from finetune.setup import RUN_INFO, make_parts
from finetune.tblog import TensorBoardLog

logger = logging.getLogger(__name__)


def default_name(config: TrainConfig) -> str:
    """The model name: --name, or the data folder's name made safe for the store."""
    if config.name:
        return config.name
    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "-", config.data.resolve().name).strip("-.")
    return cleaned or "model"


def run_training(config: TrainConfig) -> RunResult:
    """Train, evaluate, export and publish; resumes when ``config.resume`` names a run folder."""
    return Trainer(config).run()


class Trainer:
    """Holds one run's pieces; each method is one stage."""

    def __init__(self, config: TrainConfig) -> None:
        self.dist = init_from_env(config.device)
        name = default_name(config)
        run_name = self.dist.broadcast(config.run_name or f"{name}-{datetime.now():%Y%m%d-%H%M%S}")
        self.config = config.replace(name=name, run_name=run_name)
        self.run_dir = config.resume if config.resume is not None else config.output_dir / run_name
        self.resuming = config.resume is not None and (self.run_dir / RUN_INFO).is_file()
        self.runtime = resolve_runtime(self.config.replace(device=self.dist.device(config.device)))
        self.folder = RunFolder(self.run_dir)

    def run(self) -> RunResult:
        try:
            if self.dist.is_main:
                self.folder.open(self.config)
            self.dist.barrier()
            return self._run()
        except BaseException:
            if self.folder.created and not (self.run_dir / "checkpoints" / LAST).is_file():
                if hasattr(self, "tb"):
                    self.tb.close()
                self.folder.discard()  # a run that never trained leaves nothing behind (typos, bad data)
            raise
        finally:
            self.folder.close()
            self.dist.close()

    def _run(self) -> RunResult:
        published = self.run_dir / release.PUBLISHED
        if published.is_file():
            package = Path(published.read_text(encoding="utf-8").strip())
            logger.info("this run is already finished and published at %s", package)
            stored = json.loads((self.run_dir / "metrics.json").read_text(encoding="utf-8"))
            return RunResult(self.run_dir, package, stored.get("test", {}))
        self._setup()
        self._fit()
        if not self.dist.is_main:  # rank 0 alone evaluates, exports and publishes
            return RunResult(self.run_dir, None)
        test_metrics = self._evaluate_test()
        self.tb.close()
        package = release.export_and_publish(self._finished(), self.model, test_metrics)
        return RunResult(self.run_dir, package, test_metrics)

    # ---- setup -------------------------------------------------------------------------------
    def _setup(self) -> None:
        self.parts = make_parts(self.config, self.run_dir, self.runtime, self.dist, resuming=self.resuming)
        self.splits, self.task, self.labels = self.parts.splits, self.parts.task, self.parts.splits.classes
        self.backbone, self.model, self.loaders = self.parts.backbone, self.parts.model, self.parts.loaders
        self.train_model: nn.Module = maybe_compile(self.model, enabled=self.config.compile)
        self.steps_per_epoch = len(self.loaders.train(0))
        resumed = (self.run_dir / "checkpoints" / LAST).is_file()
        if not resumed:
            self.tb = self._open_tensorboard(purge_step=None)
        probe = self._resolve_plan()
        cfg = self.config
        self.optimizer = build_optimizer(self.backbone, cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg, steps_per_epoch=self.steps_per_epoch)
        self.ema: WeightEMA | None = None
        if probe is not None:  # the fitted head is "epoch 0": the best so far, and the first checkpoint
            self.state = TrainState()
            self._record_probe(probe)
        self.ema = WeightEMA(self.model, cfg.ema_decay) if cfg.ema else None  # restored with the rest on resume
        self.dist.barrier()
        self.state = self._restore()
        if resumed:  # events after the checkpoint's epoch are dropped
            self.tb = self._open_tensorboard(purge_step=self.state.epoch + 1)

    def _open_tensorboard(self, *, purge_step: int | None) -> TensorBoardLog:
        enabled = self.config.tensorboard and self.dist.is_main
        return TensorBoardLog(self.run_dir / "tensorboard", enabled=enabled, purge_step=purge_step)

    def _resolve_plan(self) -> auto.Probe | None:
        """Resolve the ``auto`` settings (rank 0; the others read its choice). Returns the fitted head when
        it was fitted here, else None."""
        cfg, last = self.config, self.run_dir / "checkpoints" / LAST
        probe = None
        if self.dist.is_main and not last.is_file():
            fit = auto.HeadFit(
                self.task, self.parts.criterion, cfg.optimizer, cfg.weight_decay, cfg.momentum, cfg.batch_size, cfg.seed
            )  # fmt: skip
            inputs = auto.Inputs(
                self.model, self.backbone.head_prefixes, self.loaders.eval(self.splits.train),
                self.loaders.eval(self.splits.val), self.runtime, fit, self.steps_per_epoch,
                len(self.splits.train) / len(self.labels),
            )  # fmt: skip
            self.plan, probe = auto.resolve(cfg, inputs)
            self.plan.write(self.run_dir, self.tb)
        self.dist.barrier()
        if not self.dist.is_main or last.is_file():
            self.plan = auto.Plan.load(self.run_dir)
        self.config = self.plan.apply(cfg)
        self.epochs, self.freeze_epochs = self.plan.epochs, self.plan.freeze_epochs
        return probe

    def _record_probe(self, probe: auto.Probe) -> None:
        val = self._val_metrics(probe.logits.float().cpu().numpy(), probe.targets.cpu().numpy())
        score = self._score(val)
        self.state.best_metric, self.state.best_loss, self.state.best_epoch = score, float(val["loss"]), 0
        self.state.top_metric = score
        self.state.probe = {"val_loss": float(val["loss"]), "val_accuracy": float(val["accuracy"])}
        self.state.probe["val_macro_f1"] = float(val["macro"]["f1"])
        self._save(LAST)  # what training continues from (its head may be a new one)
        head = auto.head_module(self.model, self.backbone.head_prefixes)
        assert head is not None
        current = {k: v.clone() for k, v in head.state_dict().items()}
        head.load_state_dict(probe.head_state)
        self._save(BEST)  # the fitted head
        head.load_state_dict(current)

    def _restore(self) -> TrainState:
        last = self.run_dir / "checkpoints" / LAST
        if not last.is_file():
            return TrainState()
        state, tensors = load_checkpoint(last)
        self.model.load_state_dict(tensors["model"])
        self.optimizer.load_state_dict(tensors["optimizer"])
        self.scheduler.load_state_dict(tensors["scheduler"])
        if self.runtime.scaler is not None and "scaler" in tensors:
            self.runtime.scaler.load_state_dict(tensors["scaler"])
        if self.ema is not None and "ema" in tensors:
            self.ema.load_state_dict(tensors["ema"])
        elif self.ema is not None:  # a checkpoint from before the first epoch (the fitted head): start it here
            self.ema = WeightEMA(self.model, self.config.ema_decay)
        logger.info("resumed after epoch %d (best %s at epoch %d)", state.epoch, state.best_metric, state.best_epoch)
        return state

    # ---- training ----------------------------------------------------------------------------
    def _set_phase(self, epoch: int) -> bool:
        """Freeze the backbone (and its norm statistics) during the head-only epochs."""
        frozen = epoch < self.freeze_epochs
        backbones.set_backbone_trainable(self.backbone, not frozen)
        self.model.train()
        if frozen:
            self.model.eval()
            for name, module in self.model.named_modules():
                if backbones.is_head_parameter(name + ".", self.backbone.head_prefixes):
                    module.train()
        if epoch == self.freeze_epochs and epoch > 0:
            logger.info("epoch %d: backbone unfrozen (lr x %s)", epoch + 1, self.config.backbone_lr_scale)
            self.state.bad_epochs = 0
        return frozen

    def _fit(self) -> None:
        cfg = self.config
        if self.state.finished:
            return
        mixer = transforms.batch_mixer(cfg.mix, num_classes=len(self.labels), alpha=cfg.mix_alpha)
        ctx = StepContext(
            self.train_model, self.parts.criterion, self.optimizer, self.scheduler, self.runtime, cfg.clip_grad, mixer,
            self.ema, self.task.hits,
        )  # fmt: skip
        val_loader = self.loaders.eval(self.splits.val)
        if self.state.epoch == 0:
            self._log_inputs(val_loader)
        wrapped_frozen: bool | None = None
        for epoch in range(self.state.epoch, self.epochs):
            frozen = self._set_phase(epoch)
            if self.dist.enabled and frozen != wrapped_frozen:  # DDP syncs what requires grad when wrapped
                ctx.model, wrapped_frozen = maybe_compile(self.dist.wrap(self.model), enabled=cfg.compile), frozen
            torch.manual_seed(cfg.seed * 1000 + epoch)
            desc = f"epoch {epoch + 1}/{self.epochs}"
            stats = train_one_epoch(ctx, self.loaders.train(epoch), total=self.steps_per_epoch, desc=desc)
            val = self._validate(val_loader)
            if self._end_epoch(epoch, stats, val):
                break
        self.state.finished = True
        self._save(LAST)

    def _log_inputs(self, val_loader: DataLoader[Any]) -> None:
        images, _ = next(iter(self.loaders.train(0)))
        self.tb.images("train/augmented_inputs", images, self.backbone.preprocess, 0)
        example, _ = next(iter(val_loader))
        self.tb.graph(self.model, self.runtime.to_device(example[:1]))

    def _validate(self, loader: DataLoader[Any]) -> dict[str, Any]:
        model = self.ema.module if self.ema is not None else self.model
        logits, targets = predict(model, loader, self.runtime, total=len(loader), desc="validate")
        return self._val_metrics(logits, targets)

    def _val_metrics(self, logits: Any, targets: Any) -> dict[str, Any]:
        return self.task.metrics(targets, logits, topk=self.config.topk)

    def _score(self, val: dict[str, Any]) -> float:
        return self.task.score(val, self.config.early_stop_metric)

    def _end_epoch(self, epoch: int, stats: EpochStats, val: dict[str, Any]) -> bool:
        """Record, checkpoint, log; returns True when early stopping ends the run."""
        state, score, loss = self.state, self._score(val), float(val["loss"])
        previous = state.top_metric if state.top_metric is not None else state.best_metric  # a run from before it
        improved = previous is None or score > previous
        state.top_metric = top = score if previous is None else max(score, previous)
        state.bad_epochs = 0 if improved else state.bad_epochs + 1
        row = tblog.history_row(epoch, stats, val, lr=float(self.optimizer.param_groups[0]["lr"]))
        state.history.append(row)
        state.epoch, state.global_step = epoch + 1, state.global_step + self.steps_per_epoch
        if self._selects(score, top):
            state.best_metric, state.best_loss, state.best_epoch = score, loss, epoch + 1
            self._save(BEST)
        self._save(LAST)
        tblog.log_epoch(self.tb, self.model, self.labels, row, val, epochs=self.epochs)
        stop = epoch + 1 < self.epochs and self._may_stop(epoch)
        if stop:
            logger.info("early stopping: no validation improvement for %d epochs", state.bad_epochs)
        return stop

    def _selects(self, score: float, top: float) -> bool:
        """Is this epoch the one to publish (so far)? The latest epoch whose validation score is within
        the noise of the highest so far, ``top`` (``auto.selection_margin``: the standard error of that score
        on the validation split) is: on a small split the highest is mostly luck, and a later epoch, further
        down the LR schedule, generalises better (the fitted head, "epoch 0", included). With
        ``--early-stop-metric loss`` only a new best is."""
        if self.task.metric(self.config.early_stop_metric) == "loss":
            return score >= top
        return score >= top - auto.selection_margin(top, len(self.splits.val)) - 1e-12

    def _may_stop(self, epoch: int) -> bool:
        """Early stopping counts ``patience`` epochs after the selected one (none within the noise of the best)
        only once the backbone trains and the LR has decayed below half its peak: a plateau at a high LR is
        not a finished run."""

        def factor(done: int) -> float:
            return schedule_factor(
                done * self.steps_per_epoch, steps_per_epoch=self.steps_per_epoch, epochs=self.epochs,
                freeze_epochs=self.freeze_epochs, warmup_epochs=self.config.warmup_epochs,
            )  # fmt: skip

        warm = self.freeze_epochs + math.ceil(self.config.warmup_epochs)  # past the (last) warmup
        start = next((done for done in range(warm + 1, self.epochs + 1) if factor(done) <= 0.5), self.epochs)
        return epoch + 1 - max(start, self.state.best_epoch) >= self.config.patience

    def _save(self, which: str) -> None:
        if not self.dist.is_main:
            return
        tensors: dict[str, Any] = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
        }
        if self.runtime.scaler is not None:
            tensors["scaler"] = self.runtime.scaler.state_dict()
        if self.ema is not None:
            tensors["ema"] = self.ema.state_dict()
        save_checkpoint(self.run_dir / "checkpoints" / which, state=self.state, tensors=tensors)

    # ---- evaluation, export, publish -----------------------------------------------------------
    def _evaluate_test(self) -> dict[str, Any]:
        best = self.run_dir / "checkpoints" / BEST
        _, tensors = load_checkpoint(best)
        # with --ema the average is what was validated, so it is what is tested and published
        self.model.load_state_dict(tensors["ema"]["module"] if "ema" in tensors else tensors["model"])
        tuned = self.task.tune(*self._predict(self.splits.val, "validate"))
        if tuned:
            logger.info("decision %s", tuned)
        logits, targets = self._predict(self.splits.test, "test")
        result = self.task.metrics(targets, logits, topk=self.config.topk)
        self.task.write_evaluation(result, self.run_dir, split="test")
        release.write_predictions(self.run_dir, self.splits, self.task.head, logits)
        self.test_outputs = (logits, targets)
        if "confusion_matrix" in result:
            figure = metrics.confusion_figure(result["confusion_matrix"], result["labels"])
            self.tb.figure("test/confusion_matrix", figure, 0)
        logger.info(
            "test accuracy %.4f, macro F1 %.4f on %d images", result["accuracy"], result["macro"]["f1"], len(targets)
        )
        return result

    def _predict(self, samples: tuple[data.Sample, ...], desc: str) -> tuple[Any, Any]:
        loader = self.loaders.eval(samples)
        return predict(self.model, loader, self.runtime, total=len(loader), desc=desc, tta=self.config.tta)

    def _finished(self) -> release.FinishedRun:
        return release.FinishedRun(
            self.config, self.run_dir, self.backbone, self.splits, self.state, self.plan, self.task, self.test_outputs
        )
