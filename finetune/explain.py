"""Grad-CAM explanations: which part of the image drove the predicted (or a chosen) class.

    export_cam(model, "resnet18", example, Path("export/cam.pt"))   # ValueError for ViT/Swin
    cam = torch.jit.load("export/cam.pt")
    heatmaps = grad_cam(cam, batch)            # (N, H, W) in [0, 1], H, W = the input's
    overlay(cropped_image, heatmaps[0]).save("heat.png")

``cam.pt`` is a TorchScript module returning ``(logits, activations)``, the activations being
the last convolutional feature map (found by forward hooks: the last 4-D output, at the last
convolution's resolution, of a module that is not a pooling layer). Published packages carry it
as ``manifest.extra["explain"]`` (listed in ``files`` with its sha256).

``finetune explain --package model_store/<name>/<version> image.jpg --out heat.png [--class LABEL]``
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from finetune.export import _quiet_tracing
from service.explain import EXPLAIN_KEY, grad_cam_with_logits, load_cam

logger = logging.getLogger(__name__)
CAM_FILE = "cam.pt"
_POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AvgPool2d, nn.MaxPool2d, nn.Flatten)


def find_feature_layer(model: nn.Module, backbone_name: str, example: Tensor) -> str:
    """Name of the module whose output is the last conv feature map; ValueError when there is none."""
    if any(isinstance(m, nn.MultiheadAttention) or "Attention" in type(m).__name__ for m in model.modules()):
        raise ValueError(
            f"backbone {backbone_name!r} is a transformer (attention layers): it has no last convolutional "
            "feature map for Grad-CAM; explanations are available for CNN backbones"
        )
    outputs: list[tuple[str, nn.Module, tuple[int, ...]]] = []
    hooks = [
        module.register_forward_hook(_recorder(name, outputs))
        for name, module in model.named_modules()
        if name  # the model itself outputs logits
    ]
    try:
        with torch.no_grad():
            model.eval()(example[:1])
    finally:
        for hook in hooks:
            hook.remove()
    convs = [shape for _, module, shape in outputs if isinstance(module, nn.Conv2d)]
    if not convs:
        raise ValueError(f"backbone {backbone_name!r} has no nn.Conv2d feature map for Grad-CAM")
    last = [name for name, module, shape in outputs if shape[2:] == convs[-1][2:] and not isinstance(module, _POOLS)]
    return last[-1]


def _recorder(name: str, outputs: list[tuple[str, nn.Module, tuple[int, ...]]]) -> Callable[..., None]:
    def hook(module: nn.Module, _inputs: object, output: object) -> None:
        if isinstance(output, Tensor) and output.dim() == 4:
            outputs.append((name, module, tuple(output.shape)))

    return hook


class CamModel(nn.Module):
    """``forward(x) -> (logits, activations of one submodule)``, for tracing."""

    def __init__(self, model: nn.Module, layer: str) -> None:
        super().__init__()
        self.model = model
        self.layer = layer

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        captured: list[Tensor] = []
        hook = self.model.get_submodule(self.layer).register_forward_hook(lambda _m, _i, out: captured.append(out))
        try:
            logits = self.model(x)
        finally:
            hook.remove()
        return logits, captured[-1]


def export_cam(model: nn.Module, backbone_name: str, example: Tensor, path: Path, *, atol: float = 1e-3) -> str:
    """Trace ``model`` into a Grad-CAM TorchScript file at ``path``; returns the feature layer's name.

    The file is loaded back and its logits compared with the eager model's before it is accepted.
    """
    model = model.eval()
    layer = find_feature_layer(model, backbone_name, example)
    wrapper = CamModel(model, layer).eval()
    with torch.no_grad(), _quiet_tracing():
        traced = torch.jit.trace(wrapper, example, check_trace=False)  # type: ignore[no-untyped-call]
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.jit.save(traced, str(path))
        loaded = torch.jit.load(str(path))  # type: ignore[no-untyped-call]
        expected, got = model(example), loaded(example)[0]
    diff = float((expected - got).abs().max())
    if diff > atol:
        path.unlink()
        raise RuntimeError(f"Grad-CAM export of {backbone_name} differs from the eager model by {diff:.3e}")
    logger.info("Grad-CAM module %s (feature map of %s), max |logit diff| %.2e", path, layer, diff)
    return layer


def grad_cam(cam_module: nn.Module, batch: Tensor, class_index: int | None = None) -> np.ndarray:
    """Heatmaps (N, H, W) in [0, 1]: gradient-weighted activations of the class logit, upsampled to the input."""
    return grad_cam_with_logits(cam_module, batch, class_index)[0]


def overlay(image: Image.Image, heatmap: np.ndarray, *, alpha: float = 0.5) -> Image.Image:
    """The image with the heatmap (jet colours) blended over it, at the image's size."""
    from matplotlib import colormaps

    heat = Image.fromarray(np.uint8(np.clip(heatmap, 0, 1) * 255)).resize(image.size, Image.Resampling.BILINEAR)
    colours = colormaps["jet"](np.asarray(heat, dtype=np.float32) / 255.0)[..., :3]
    coloured = Image.fromarray(np.uint8(colours * 255))
    return Image.blend(image.convert("RGB"), coloured, alpha)


def export_for_package(model: nn.Module, backbone_name: str, example: Tensor, export_dir: Path) -> tuple[str, ...]:
    """Export ``cam.pt`` into ``export_dir`` when the backbone allows; returns the files to publish."""
    try:
        export_cam(model, backbone_name, example, export_dir / CAM_FILE)
    except ValueError as exc:
        logger.info("no Grad-CAM module: %s", exc)
        return ()
    except RuntimeError as exc:  # an explanation is an extra: it never fails the run
        logger.warning("Grad-CAM export failed, the package has no explanations: %s", exc)
        return ()
    return (CAM_FILE,)


# ---- ``finetune explain`` ---------------------------------------------------------------------------
def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="finetune explain",
        description="Grad-CAM heatmap of a published package's prediction for one image, written as an overlay PNG.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("image", type=Path, help="the image to explain")
    parser.add_argument("--package", type=Path, required=True, help="package folder, e.g. model_store/demo/1")
    parser.add_argument("--out", type=Path, default=Path("heatmap.png"), help="overlay PNG to write")
    parser.add_argument("--class", dest="label", help="explain this label instead of the predicted one")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def explain_image(package: Path, image: Image.Image, label: str | None = None) -> tuple[np.ndarray, str, Image.Image]:
    """(heatmap, predicted label(s), overlay on the model's crop) for one image and a published package."""
    from service.manifest import load_manifest, verify_files
    from service.preprocess import preprocess_image, resize_and_crop, to_rgb

    manifest = load_manifest(package)
    if not manifest.extra.get(EXPLAIN_KEY):
        raise ValueError(f"{package}: this package has no Grad-CAM module (manifest extra '{EXPLAIN_KEY}')")
    if label is not None and label not in manifest.labels:
        raise ValueError(f"--class {label!r} is not one of the labels: {', '.join(manifest.labels)}")
    verify_files(package, manifest)
    cam_module = load_cam(package / manifest.extra[EXPLAIN_KEY])
    batch = torch.from_numpy(preprocess_image(image, manifest.preprocess))[None]
    index = None if label is None else manifest.labels.index(label)
    task = manifest.head
    heat, logits = grad_cam_with_logits(cam_module, batch, index, task)
    predicted = ", ".join(task.answers(task.probabilities(logits.float().numpy()))[0])
    crop = resize_and_crop(to_rgb(image), manifest.preprocess)
    return heat[0], predicted, overlay(crop, heat[0])


def main(args: argparse.Namespace) -> int:
    """Write the overlay PNG and print the predicted label; returns the exit code."""
    from service.errors import PackageError

    try:
        with Image.open(args.image) as image:
            image.load()
        _, predicted, picture = explain_image(args.package, image, args.label)
    except (OSError, ValueError, PackageError) as exc:
        logger.error("%s", exc)
        return 2
    picture.save(args.out)
    print(f"predicted: {predicted}")
    print(f"heatmap: {args.out}")
    return 0
