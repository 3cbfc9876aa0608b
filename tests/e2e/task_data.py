"""Real-photo data sets for the multi-label and binary end-to-end tests, built from the demo photos.

Multi-label: each image is a 2x2 grid holding one to three demo photos of different classes (grey
where empty); its labels are those classes, listed in ``labels.csv`` (``path,labels,split``,
';'-separated labels).
Binary: the demo photos themselves with one 0/1 column, ``birds``, in ``labels.csv``.
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

from PIL import Image

from tests.conftest import DEMO_DATA

TILE = 112
SPLITS = ("train", "val", "test")


def demo_photos() -> dict[str, list[Path]]:
    return {folder.name: sorted(folder.glob("*.jpg")) for folder in sorted(DEMO_DATA.iterdir()) if folder.is_dir()}


def _tile(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB").resize((TILE, TILE), Image.Resampling.BILINEAR)


def build_multilabel(root: Path, *, sizes: tuple[int, int, int] = (100, 30, 30), seed: int = 0) -> Path:
    """``root/imgs/*.jpg`` and ``root/imgs/labels.csv`` (with a ``split`` column); returns the data folder.

    Each class's photos are dealt 60/20/20 to train/val/test first and a split's composites use only its
    own photos, so no test photo was seen in training."""
    rng = random.Random(seed)
    pools: dict[str, dict[str, list[Path]]] = {split: {} for split in SPLITS}
    for cls, paths in demo_photos().items():
        shuffled = rng.sample(paths, len(paths))
        cut = (len(paths) * 3 // 5, len(paths) * 4 // 5)
        for split, part in zip(
            SPLITS, (shuffled[: cut[0]], shuffled[cut[0] : cut[1]], shuffled[cut[1] :]), strict=True
        ):
            pools[split][cls] = part
    data = root / "imgs"
    data.mkdir(parents=True)
    rows = []
    for split, count in zip(SPLITS, sizes, strict=True):
        for index in range(count):
            name, classes = f"{split}_{index:03d}.jpg", _composite(pools[split], rng)
            _draw(pools[split], classes, rng).save(data / name, quality=90)
            rows.append((name, ";".join(classes), split))
    with (data / "labels.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "labels", "split"])
        writer.writerows(rows)
    return data


def _composite(pool: dict[str, list[Path]], rng: random.Random) -> list[str]:
    return sorted(rng.sample(sorted(pool), rng.choice((1, 2, 2, 3))))


def _draw(pool: dict[str, list[Path]], classes: list[str], rng: random.Random) -> Image.Image:
    canvas = Image.new("RGB", (2 * TILE, 2 * TILE), (128, 128, 128))
    for cls, slot in zip(classes, rng.sample(range(4), len(classes)), strict=False):
        canvas.paste(_tile(rng.choice(pool[cls])), ((slot % 2) * TILE, (slot // 2) * TILE))
    return canvas


def build_binary(root: Path) -> Path:
    """``root/photos/<class>/*.jpg`` (the demo photos) and ``labels.csv`` with a ``birds`` 0/1 column."""
    data = root / "photos"
    rows = []
    for cls, paths in demo_photos().items():
        (data / cls).mkdir(parents=True)
        for path in paths:
            (data / cls / path.name).write_bytes(path.read_bytes())
            rows.append((f"{cls}/{path.name}", int(cls == "birds")))
    with (data / "labels.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "birds"])
        writer.writerows(rows)
    return data
