from __future__ import annotations

import io
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import ExifTags, Image, ImageOps

from service.errors import InvalidInput, PayloadTooLarge
from service.manifest import Preprocess
from service.preprocess import (
    IMAGE_BLOCKS_CACHED,
    allow_pixels,
    decode_image,
    preprocess_bytes,
    preprocess_image,
    to_rgb,
)

SPEC = Preprocess(resize=64, crop=56, interpolation="bilinear")


def _encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize(("width", "height"), [(100, 80), (80, 100), (64, 64), (300, 57)])
@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_matches_torchvision_eval_transform(width: int, height: int, interpolation: str) -> None:
    spec = Preprocess(resize=64, crop=56, interpolation=interpolation, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    image = _random_image(width, height)
    mode = T.InterpolationMode(interpolation)
    reference = T.Compose(
        [T.Resize(64, interpolation=mode), T.CenterCrop(56), T.ToTensor(), T.Normalize(spec.mean, spec.std)]
    )(image)
    ours = torch.from_numpy(preprocess_image(image, spec))
    assert ours.shape == (3, 56, 56)
    assert torch.allclose(ours, reference, atol=1e-5)


def test_bgr_reverses_channels_with_their_statistics() -> None:
    image = _random_image(64, 64, seed=1)
    rgb = Preprocess(resize=64, crop=56, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    bgr = Preprocess(resize=64, crop=56, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3), channel_order="BGR")
    ours_rgb, ours_bgr = preprocess_image(image, rgb), preprocess_image(image, bgr)
    assert ours_bgr.flags["C_CONTIGUOUS"] and ours_bgr.dtype == np.float32
    np.testing.assert_array_equal(ours_bgr, ours_rgb[::-1])


@pytest.mark.parametrize("mode", ["L", "RGBA", "LA", "CMYK", "P", "I;16", "1"])
def test_every_mode_becomes_rgb(mode: str) -> None:
    image = _random_image(20, 10).convert(mode) if mode != "I;16" else Image.new("I;16", (20, 10), 40000)
    assert to_rgb(image).mode == "RGB"
    assert preprocess_image(image, SPEC).shape == (3, 56, 56)


def test_alpha_is_composited_on_white() -> None:
    transparent = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    assert np.asarray(to_rgb(transparent)).min() == 255


def test_decode_round_trip_jpeg_png_webp() -> None:
    image = _random_image(40, 30)
    for fmt in ("JPEG", "PNG", "WEBP"):
        assert decode_image(_encode(image, fmt)).size == (40, 30)
    assert preprocess_bytes(_encode(image), SPEC).dtype == np.float32


def test_bad_inputs_name_the_problem() -> None:
    with pytest.raises(InvalidInput, match="empty"):
        decode_image(b"", source="cat.jpg")
    with pytest.raises(InvalidInput, match=r"cat\.jpg: not a recognised image"):
        decode_image(b"hello, I am text", source="cat.jpg")
    truncated = _encode(_random_image(64, 64), "JPEG")[:300]
    with pytest.raises(InvalidInput, match="corrupt or truncated"):
        decode_image(truncated)


def test_pixel_cap_refuses_before_decoding() -> None:
    big = _encode(Image.new("L", (3000, 3000)), "PNG")
    with pytest.raises(PayloadTooLarge, match="over the limit"):
        decode_image(big, max_pixels=1_000_000)


def test_a_cap_above_pillows_own_limit_is_honoured(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pillow warns above its MAX_IMAGE_PIXELS and refuses above twice it; our cap decides instead."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    between, beyond = _encode(Image.new("RGB", (12, 12))), _encode(Image.new("RGB", (20, 20)))
    with pytest.warns(Image.DecompressionBombWarning):  # 144 px: Pillow's warning, not an error
        assert decode_image(between, max_pixels=1000).size == (12, 12)
    with pytest.raises(PayloadTooLarge, match="too large to decode"):  # 400 px: Pillow refuses
        decode_image(beyond, max_pixels=1000)
    allow_pixels(1000)
    assert decode_image(beyond, max_pixels=1000).size == (20, 20)


def test_allow_pixels_only_ever_raises_pillows_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    allow_pixels(50)
    assert Image.MAX_IMAGE_PIXELS == 100
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # a process that turned Pillow's check off
    allow_pixels(50)
    assert Image.MAX_IMAGE_PIXELS is None


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_once(orientation: int) -> None:
    upright = _random_image(6, 4, seed=orientation)
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    buffer = io.BytesIO()
    upright.save(buffer, format="PNG", exif=exif)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(buffer.getvalue()))))
    decoded = decode_image(buffer.getvalue())
    assert decoded.size == ((4, 6) if orientation >= 5 else (6, 4))
    assert np.array_equal(np.asarray(decoded), expected)
    assert np.array_equal(np.asarray(to_rgb(decoded)), expected)  # already upright: not turned again
    spec = Preprocess(resize=4, crop=4, interpolation="bilinear")
    assert np.array_equal(preprocess_bytes(buffer.getvalue(), spec), preprocess_image(Image.fromarray(expected), spec))


@pytest.mark.parametrize(("environment", "blocks"), [({}, IMAGE_BLOCKS_CACHED), ({"PILLOW_BLOCKS_MAX": "0"}, 0)])
def test_pillow_memory_pool_is_on_unless_the_environment_says(environment: dict[str, str], blocks: int) -> None:
    code = "import service.preprocess; from PIL import Image; print(Image.core.get_blocks_max())"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PILLOW_")} | environment
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert int(out.stdout) == blocks
