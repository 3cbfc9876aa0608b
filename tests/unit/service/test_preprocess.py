from __future__ import annotations

import io
import os
import subprocess
import sys
from dataclasses import replace

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
    draft_size,
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


def _photo(width: int = 2400, height: int = 1800) -> bytes:
    """A smooth, photo-like JPEG (gradients and a disc), the kind DCT scaling reproduces well."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    disc = ((x - width / 2) ** 2 + (y - height / 2) ** 2 < (height / 3) ** 2) * 120.0
    pixels = np.stack([x / width * 255, y / height * 255, disc + 60], axis=-1).clip(0, 255).astype(np.uint8)
    return _encode(Image.fromarray(pixels), "JPEG")


def test_jpeg_draft_decodes_a_large_photo_at_a_reduced_scale() -> None:
    data = _photo()
    assert decode_image(data).size == (2400, 1800)
    assert decode_image(data, draft_to=256).size == (600, 450)  # 1/4: the largest reduction keeping 256
    assert decode_image(data, draft_to=500).size == (1200, 900)
    assert decode_image(data, draft_to=1000).size == (2400, 1800)  # not twice the size: decoded whole
    png = _encode(Image.open(io.BytesIO(data)), "PNG")
    assert decode_image(png, draft_to=256).size == (2400, 1800)  # only JPEG has DCT scaling


def test_jpeg_draft_is_the_manifests_choice_and_stays_close_to_a_full_decode() -> None:
    data = _photo()
    full = preprocess_bytes(data, Preprocess(resize=256, crop=224))
    drafted = preprocess_bytes(data, Preprocess(resize=256, crop=224, jpeg_draft=True))
    assert draft_size(Preprocess(resize=256, crop=224, jpeg_draft=True)) == 256
    assert not np.array_equal(full, drafted)
    assert float(np.abs(full - drafted).mean()) < 0.01  # normalized units: a few hundredths of a grey level
    small = _encode(_random_image(300, 280), "JPEG")  # under twice the resize: identical either way
    spec = Preprocess(resize=256, crop=224)
    assert np.array_equal(preprocess_bytes(small, spec), preprocess_bytes(small, replace(spec, jpeg_draft=True)))
