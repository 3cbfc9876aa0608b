from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from finetune.transforms import AUGMENT_PRESETS, batch_mixer, eval_transform, train_transform
from service.manifest import Preprocess
from service.preprocess import preprocess_image

SPEC = Preprocess(resize=40, crop=32, interpolation="bicubic", mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))


@pytest.fixture
def image() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, size=(50, 70, 3), dtype=np.uint8))


def test_eval_transform_is_the_server_preprocessing(image: Image.Image) -> None:
    out = eval_transform(SPEC)(image)
    assert out.dtype == torch.float32
    assert torch.equal(out, torch.from_numpy(preprocess_image(image, SPEC)))


@pytest.mark.parametrize("augment", AUGMENT_PRESETS)
def test_train_transform_shape_and_seeded(image: Image.Image, augment: str) -> None:
    transform = train_transform(SPEC, augment=augment)
    torch.manual_seed(3)
    first = transform(image)
    torch.manual_seed(3)
    again = transform(image)
    assert first.shape == (3, SPEC.crop, SPEC.crop)
    assert first.dtype == torch.float32
    assert torch.equal(first, again)
    pickle.dumps(transform)  # DataLoader workers under spawn need it


def test_train_transform_augments(image: Image.Image) -> None:
    transform = train_transform(SPEC, augment="light")
    outputs = [transform(image) for _ in range(4)]
    assert any(not torch.equal(outputs[0], other) for other in outputs[1:])


def test_train_transform_follows_channel_order(image: Image.Image) -> None:
    bgr = Preprocess(resize=32, crop=32, channel_order="BGR")
    rgb = Preprocess(resize=32, crop=32)
    square = image.resize((32, 32))
    torch.manual_seed(0)
    out_bgr = train_transform(bgr, augment="light")(square)
    torch.manual_seed(0)
    out_rgb = train_transform(rgb, augment="light")(square)
    assert torch.equal(out_bgr, out_rgb.flip(0))


def test_unknown_augment_preset() -> None:
    with pytest.raises(ValueError, match="augment"):
        train_transform(SPEC, augment="extreme")


@pytest.mark.parametrize("mode", ["mixup", "cutmix", "both"])
def test_batch_mixer_soft_targets(mode: str) -> None:
    mixer = batch_mixer(mode, num_classes=5, alpha=0.4)
    assert mixer is not None
    images = torch.rand(6, 3, 16, 16)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    torch.manual_seed(0)
    mixed, targets = mixer(images, labels)
    assert mixed.shape == images.shape
    assert targets.shape == (6, 5)
    assert torch.allclose(targets.sum(dim=1), torch.ones(6))
    assert (targets >= 0).all()


def test_batch_mixer_none_and_invalid() -> None:
    assert batch_mixer("none", num_classes=3) is None
    with pytest.raises(ValueError, match="mix"):
        batch_mixer("blend", num_classes=3)
