"""Checkpoints: written atomically, loaded with ``weights_only=True`` (no arbitrary unpickling)."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

LAST = "last.pt"
BEST = "best.pt"


@dataclass
class TrainState:
    """Progress of a run: everything besides tensors that a resume needs."""

    epoch: int = 0  # epochs completed
    global_step: int = 0
    best_metric: float | None = None
    best_loss: float | None = None  # the selected epoch's validation loss
    best_epoch: int = 0  # the selected epoch (0: the fitted head), what is tested and published
    top_metric: float | None = None  # the highest validation score so far (the selection margin is below it)
    bad_epochs: int = 0
    finished: bool = False
    history: list[dict[str, float]] = field(default_factory=list)
    probe: dict[str, float] | None = None  # the head fitted on cached features, scored as epoch 0 (finetune.auto)


def save_checkpoint(path: Path, *, state: TrainState, tensors: dict[str, Any]) -> None:
    """Write to a temporary file and rename over ``path``: a kill never leaves a torn checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"state": asdict(state), **tensors}, tmp)
    with tmp.open("rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> tuple[TrainState, dict[str, Any]]:
    """Returns the state and the rest of the saved dict (model, optimizer, scheduler, scaler)."""
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}: the run folder has nothing to resume")
    data: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    state = TrainState(**data.pop("state"))
    return state, data
