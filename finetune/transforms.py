"""Training and evaluation transforms, built from the model's :class:`Preprocess` description.

Evaluation uses exactly the server's preprocessing (``service.preprocess.preprocess_image``);
training presets end in the same scaling, normalization and channel order. Presets are small
picklable classes with keyword-only arguments, as in torchvision's classification references.

    train_set = ImageDataset(splits.train, train_transform(spec, augment="light"))
    mixer = batch_mixer("mixup", num_classes=5)        # None for "none"
    images, soft_targets = mixer(images, labels)       # soft_targets: (N, 5), rows sum to 1
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from PIL import Image
from torch import Tensor
from torchvision import transforms as T
from torchvision.transforms import v2

from service.manifest import Preprocess
from service.preprocess import preprocess_image

AUGMENT_PRESETS = ("none", "light", "strong")
MIX_MODES = ("none", "mixup", "cutmix", "both")


class ClassificationPresetEval:
    """PIL image -> the server's float32 (3, crop, crop) tensor for the same image."""

    def __init__(self, *, spec: Preprocess) -> None:
        self.spec = spec

    def __call__(self, image: Image.Image) -> Tensor:
        return torch.from_numpy(preprocess_image(image, self.spec))


class _ToChannelOrder:
    """Reverse the channels of a normalized CHW tensor when the model wants BGR (as the server does)."""

    def __call__(self, tensor: Tensor) -> Tensor:
        return tensor.flip(0).contiguous()


class ClassificationPresetTrain:
    """Random crop/flip (light: + small rotation; strong: + TrivialAugmentWide, RandomErasing), normalize."""

    def __init__(self, *, spec: Preprocess, augment: str = "light") -> None:
        if augment not in ("light", "strong"):
            raise ValueError(f"augment={augment!r} is not one of light, strong (use eval_transform for none)")
        interpolation = T.InterpolationMode(spec.interpolation)
        fill = [round(m * 255) for m in spec.mean]  # rotated-in corners normalize to 0
        scale = (0.6, 1.0) if augment == "light" else (0.25, 1.0)
        steps: list[Callable[..., object]] = [
            T.RandomResizedCrop(spec.crop, scale=scale, interpolation=interpolation),
            T.RandomHorizontalFlip(),
        ]
        if augment == "light":
            steps.append(T.RandomRotation(10, interpolation=T.InterpolationMode.BILINEAR, fill=fill))
        else:
            steps.append(T.TrivialAugmentWide(interpolation=T.InterpolationMode.BILINEAR, fill=fill))
        steps += [T.ToTensor(), T.Normalize(spec.mean, spec.std)]
        if augment == "strong":
            steps.append(T.RandomErasing(p=0.25))
        if spec.channel_order == "BGR":
            steps.append(_ToChannelOrder())
        self.transforms = T.Compose(steps)

    def __call__(self, image: Image.Image) -> Tensor:
        out: Tensor = self.transforms(image)
        return out


def eval_transform(spec: Preprocess) -> Callable[[Image.Image], Tensor]:
    """The eval transform: ``torch.from_numpy(preprocess_image(image, spec))``, nothing else."""
    return ClassificationPresetEval(spec=spec)


def train_transform(spec: Preprocess, *, augment: str = "light") -> Callable[[Image.Image], Tensor]:
    """The training transform for an augmentation preset; ``none`` is the eval transform."""
    if augment not in AUGMENT_PRESETS:
        raise ValueError(f"augment={augment!r} is not one of {', '.join(AUGMENT_PRESETS)}")
    if augment == "none":
        return eval_transform(spec)
    return ClassificationPresetTrain(spec=spec, augment=augment)


class BatchMixer:
    """MixUp and/or CutMix on a collated batch: (images, int labels) -> (images, soft targets (N, C))."""

    def __init__(self, *, mode: str, num_classes: int, alpha: float, cutmix_alpha: float) -> None:
        mixup = v2.MixUp(alpha=alpha, num_classes=num_classes)
        cutmix = v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes)
        choices: dict[str, Callable[..., tuple[Tensor, Tensor]]] = {
            "mixup": mixup,
            "cutmix": cutmix,
            "both": v2.RandomChoice([mixup, cutmix]),
        }
        self.mode = mode
        self.transform = choices[mode]

    def __call__(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        mixed, targets = self.transform(images, labels)
        return mixed, targets


def batch_mixer(
    mode: str, *, num_classes: int, alpha: float = 0.2, cutmix_alpha: float | None = None
) -> Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] | None:
    """A batch MixUp/CutMix (``both`` picks one per batch), or None for ``none``.

    ``alpha`` is the Beta(alpha, alpha) parameter; ``cutmix_alpha`` defaults to ``alpha``.
    Train with a loss that takes soft targets (``nn.CrossEntropyLoss`` accepts them).
    """
    if mode not in MIX_MODES:
        raise ValueError(f"mix={mode!r} is not one of {', '.join(MIX_MODES)}")
    if mode == "none":
        return None
    if alpha <= 0 or (cutmix_alpha is not None and cutmix_alpha <= 0):
        raise ValueError("mixup/cutmix alpha must be > 0")
    return BatchMixer(mode=mode, num_classes=num_classes, alpha=alpha, cutmix_alpha=cutmix_alpha or alpha)
