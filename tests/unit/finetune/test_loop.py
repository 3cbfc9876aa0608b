"""``finetune/loop.py``: evaluation with and without test-time augmentation (horizontal flip)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from finetune import cli
from finetune.loop import Runtime, predict


class LeftMinusRight(nn.Module):
    """Logits (left-half mean - right-half mean, 0): a mirror image negates the first logit."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        score = x[..., :half].mean(dim=(1, 2, 3)) - x[..., half:].mean(dim=(1, 2, 3))
        return torch.stack([score, torch.zeros_like(score)], dim=1)


def test_tta_averages_each_image_with_its_mirror() -> None:
    images = torch.zeros(2, 3, 4, 4)
    images[..., :2] = 1.0  # bright left half
    loader = [(images, torch.tensor([0, 1]))]
    runtime = Runtime(torch.device("cpu"))
    plain, targets = predict(LeftMinusRight(), loader, runtime, total=1, desc="test")
    flipped, _ = predict(LeftMinusRight(), loader, runtime, total=1, desc="test", tta=True)
    np.testing.assert_allclose(plain[:, 0], [1.0, 1.0])
    np.testing.assert_allclose(flipped, np.zeros((2, 2)), atol=1e-6)
    assert targets.tolist() == [0, 1]


def test_tta_flag_reaches_the_config() -> None:
    args = cli.get_args_parser().parse_args(["--data", "imgs", "--tta", "true"])
    assert cli.resolve_config(args).tta is True
    assert cli.resolve_config(cli.get_args_parser().parse_args(["--data", "imgs"])).data == Path("imgs")
    assert cli.resolve_config(cli.get_args_parser().parse_args(["--data", "imgs"])).tta is False
