"""What a run trains with, made in one place and in one order: data and task, backbone, loss, loaders.

    parts = make_parts(config, run_dir, runtime, dist, resuming=False)
    parts.loaders.train(epoch=0)        # augmented, shuffled (or sampled/distributed), the task's targets
    parts.loaders.eval(parts.splits.val)

The order is the dependency order: the splits give the task (multiclass, multilabel, binary), the task
gives the model's output width and the loss, the loss resolves the balance mode the training loader
samples with. Each piece is an explicit field of :class:`RunParts`; nothing is read before it is made.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from finetune import backbones, data, transforms
from finetune.config import TrainConfig
from finetune.distributed import DistContext
from finetune.loop import Runtime
from finetune.tasks import TrainingTask, training_task
from service.manifest import Preprocess
from service.preprocess import draft_size

logger = logging.getLogger(__name__)
RUN_INFO = "run_info.json"


@dataclass(frozen=True)
class Loaders:
    """DataLoaders over the run's splits: the training one per epoch (seeded), evaluation ones as the server
    decodes (draft mode for large JPEGs), both yielding the task's targets."""

    config: TrainConfig
    splits: data.DataSplits
    task: TrainingTask
    preprocess: Preprocess
    runtime: Runtime
    dist: DistContext
    balance: str  # "sampler": the training loader draws each class equally often

    def train(self, epoch: int) -> DataLoader[Any]:
        preset = transforms.train_transform(self.preprocess, augment=self.config.augment)
        return self._loader(self.splits.train, preset, epoch=epoch, train=True)

    def eval(self, samples: tuple[data.Sample, ...]) -> DataLoader[Any]:
        return self._loader(samples, transforms.eval_transform(self.preprocess), epoch=0, train=False)

    def _loader(self, samples: tuple[data.Sample, ...], transform: Any, *, epoch: int, train: bool) -> DataLoader[Any]:
        cfg = self.config
        generator = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
        draft_to = 0 if train else draft_size(self.preprocess)  # evaluation decodes as the server does
        dataset = data.ImageDataset(samples, transform, draft_to=draft_to, target=self.task.target)
        sampler: Any = None
        if train and self.dist.enabled:
            sampler = DistributedSampler(dataset, self.dist.world_size, self.dist.rank, shuffle=True, seed=cfg.seed)
            sampler.set_epoch(epoch)
        elif train and self.balance == "sampler":
            sampler = data.make_sampler(samples, len(self.splits.classes), seed=cfg.seed * 1000 + epoch)
        return DataLoader(
            dataset,
            batch_size=cfg.batch_size,
            shuffle=train and sampler is None,
            sampler=sampler,
            generator=generator,
            num_workers=cfg.workers,
            drop_last=train and len(samples) > cfg.batch_size,
            pin_memory=self.runtime.device.type == "cuda",
        )


@dataclass(frozen=True)
class RunParts:
    splits: data.DataSplits
    task: TrainingTask
    backbone: backbones.Backbone
    model: nn.Module  # the backbone's model, on the run's device and memory format
    criterion: nn.Module
    loaders: Loaders


def make_parts(config: TrainConfig, run_dir: Path, runtime: Runtime, dist: DistContext, *, resuming: bool) -> RunParts:
    """Splits (made and saved by rank 0, read by the others and on resume), the task, the backbone (pretrained
    on a new run; a resumed run's checkpoint supplies the weights), the loss and the loaders."""
    splits = load_or_make_splits(config, run_dir, dist)
    task = training_task(splits.task, splits.classes)
    if config.mix != "none" and task.name != "multiclass":
        raise ValueError(f"--mix {config.mix} mixes one-label targets; it is not available for the {task.name} task")
    backbone = make_backbone(config, run_dir, task, dist, resuming=resuming)
    model = backbone.model.to(runtime.device)
    if runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    criterion = task.criterion(splits.train, balance=config.balance, label_smoothing=config.label_smoothing)
    loaders = Loaders(config, splits, task, backbone.preprocess, runtime, dist, task.balance)
    return RunParts(splits, task, backbone, model, criterion.to(runtime.device), loaders)


def load_or_make_splits(config: TrainConfig, run_dir: Path, dist: DistContext) -> data.DataSplits:
    """Rank 0 splits and saves; every other rank, and a resumed run, reads the saved split (one source of truth)."""
    if not dist.is_main or (run_dir / data.SPLITS_DIR).is_dir():
        dist.barrier()
        return data.load_splits(run_dir)
    splits = data.prepare_data(config.data, **config.data_options())
    data.save_splits(splits, run_dir)
    dist.barrier()
    return splits


def make_backbone(
    config: TrainConfig, run_dir: Path, task: TrainingTask, dist: DistContext, *, resuming: bool
) -> backbones.Backbone:
    """Pretrained weights on a new run (recorded in run_info.json); on resume the checkpoint supplies them
    (no download) and run_info.json the preprocessing."""
    info_path = run_dir / RUN_INFO
    torch.manual_seed(config.seed)
    backbone = backbones.create_backbone(
        config.backbone,
        num_classes=task.width,
        weights="none" if resuming else config.weights,
        head_dropout=config.head_dropout,
        img_size=config.img_size,
    )
    if resuming:
        info = json.loads(info_path.read_text(encoding="utf-8"))
        backbone.weights = info["weights"]
        backbone.preprocess = Preprocess.from_dict(info["preprocess"])
    elif dist.is_main:
        info = {"weights": backbone.weights, "preprocess": backbone.preprocess.__dict__, "labels": task.labels}
        info_path.write_text(json.dumps(info, indent=2, default=list), encoding="utf-8")
    logger.info("backbone %s, weights %s, eval preprocessing %s", backbone.name, backbone.weights, backbone.preprocess)
    return backbone
