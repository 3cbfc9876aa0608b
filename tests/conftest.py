"""Shared fixtures: small generated image folders for tests that need only mechanics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
DEMO_DATA = REPO / "finetune" / "demo_data"


def make_image_folder(root: Path, classes: dict[str, int], *, size: int = 48, seed: int = 0) -> Path:
    """Write ``root/<class>/<i>.png`` images; each class has its own dominant colour so it is learnable."""
    rng = np.random.default_rng(seed)
    for index, (name, count) in enumerate(classes.items()):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        base = np.zeros(3)
        base[index % 3] = 200
        for i in range(count):
            noise = rng.normal(0, 30, size=(size, size, 3))
            pixels = np.clip(base + 30 + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{name}_{i:03d}.png")
    return root


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """Three classes of 12 small generated images each."""
    return make_image_folder(tmp_path / "imgs", {"red": 12, "green": 12, "blue": 12})
