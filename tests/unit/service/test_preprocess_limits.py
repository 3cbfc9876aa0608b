"""Preprocessing cost is bounded by the image's pixels, not by its aspect ratio.

A 1x4000 strip is 4000 pixels (a few hundred bytes of PNG), but resizing its short side to 182
makes a 182x728000 image: 400 MB and seconds of CPU per request before the center crop throws
almost all of it away.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from PIL import Image

from service import preprocess
from service.manifest import Preprocess

SPEC = Preprocess(resize=182, crop=160, interpolation="bilinear")


def _record_resizes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    sizes: list[tuple[int, int]] = []
    original = Image.Image.resize

    def resize(self: Image.Image, size: tuple[int, int], *args: Any, **kwargs: Any) -> Image.Image:
        sizes.append(tuple(size))  # type: ignore[arg-type]
        return original(self, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", resize)
    return sizes


@pytest.mark.parametrize("size", [(1, 4000), (4000, 1), (2, 1_000_000)])
def test_extreme_strips_resize_only_what_the_crop_keeps(monkeypatch: pytest.MonkeyPatch, size: tuple[int, int]) -> None:
    sizes = _record_resizes(monkeypatch)
    array = preprocess.preprocess_image(Image.new("RGB", size, (200, 10, 10)), SPEC)
    assert array.shape == (3, 160, 160)
    assert sizes and all(w * h <= preprocess.MAX_RESIZED_PIXELS for w, h in sizes)
    red = (200 / 255 - SPEC.mean[0]) / SPEC.std[0]
    assert np.allclose(array[0], red, atol=1e-5)  # a uniform image stays uniform


def test_ordinary_images_still_resize_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    sizes = _record_resizes(monkeypatch)
    preprocess.preprocess_image(Image.new("RGB", (640, 480)), SPEC)
    assert sizes == [(242, 182)]  # torchvision's Resize(182): the exact path, then CenterCrop


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_the_region_path_is_close_to_the_whole_resize(monkeypatch: pytest.MonkeyPatch, interpolation: str) -> None:
    """On a smooth image the shortcut differs from the full resize by at most a few levels of 255."""
    spec = Preprocess(resize=64, crop=56, interpolation=interpolation)
    ramp = np.linspace(0, 255, 600, dtype=np.float64)
    pixels = np.stack([np.tile(ramp, (9, 1)), np.tile(ramp[::-1], (9, 1)), np.full((9, 600), 90.0)], axis=-1)
    image = Image.fromarray(pixels.astype(np.uint8))  # 600x9: resized to 4266x64
    whole = np.asarray(preprocess.resize_and_crop(image, spec), dtype=np.int16)
    monkeypatch.setattr(preprocess, "MAX_RESIZED_PIXELS", 0)
    region = np.asarray(preprocess.resize_and_crop(image, spec), dtype=np.int16)
    assert region.shape == whole.shape == (56, 56, 3)
    assert np.abs(region - whole).max() <= 3
