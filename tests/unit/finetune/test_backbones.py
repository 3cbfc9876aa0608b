"""finetune.backbones: head replacement per family, freezing, optimizer groups, eval preprocessing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from finetune.backbones import (
    LITE0_BACKBONE,
    LITE0_WEIGHTS,
    Backbone,
    create_backbone,
    eval_preprocess,
    is_head_parameter,
    list_backbones,
    parameter_groups,
    set_backbone_trainable,
)
from service.manifest import Preprocess

# The cheapest member of each torchvision family (resnext/wide_resnet share resnet's head) at the
# smallest input it accepts (ViT is built for the img_size asked for with random weights).
FAMILIES = {
    "resnet18": 64,
    "alexnet": 64,
    "squeezenet1_1": 64,
    "densenet121": 64,
    "googlenet": 64,
    "inception_v3": 75,
    "mobilenet_v2": 64,
    "mobilenet_v3_small": 64,
    "efficientnet_b0": 64,
    "regnet_x_400mf": 64,
    "shufflenet_v2_x0_5": 64,
    "mnasnet0_5": 64,
    "convnext_tiny": 64,
    "vit_b_16": 32,
    "swin_t": 64,
}
# MaxViT takes multiples of 224 only; a real forward costs 5-15 s on two busy cores, so its shapes
# are checked on the meta device (no compute) instead.
ON_META = {"maxvit_t": 224}


def _head(backbone: Backbone) -> nn.Module:
    (prefix,) = backbone.head_prefixes
    return backbone.model.get_submodule(prefix.rstrip("."))


def _outputs(layer: nn.Module) -> int:
    if isinstance(layer, nn.Sequential):
        layer = layer[-1]
    assert isinstance(layer, nn.Linear | nn.Conv2d)
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


# ---- head replacement --------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "size"), [*FAMILIES.items(), *ON_META.items()])
def test_each_family_outputs_num_classes_in_train_and_eval(name: str, size: int) -> None:
    torch.manual_seed(0)
    device = torch.device("meta" if name in ON_META else "cpu")
    with device:
        backbone = create_backbone(name, num_classes=3, weights="none", img_size=size)
    x = torch.randn(2, 3, size, size, device=device)
    with torch.no_grad():
        for train in (False, True):
            out = backbone.model.train(train)(x)
            assert type(out) is torch.Tensor, f"{name} train={train} returned {type(out).__name__}"
            assert out.shape == (2, 3)
    assert (backbone.name, backbone.weights, backbone.preprocess.crop) == (name, "none", size)


@pytest.fixture
def regnet_on_meta(monkeypatch: pytest.MonkeyPatch) -> None:
    """RegNet computes its block widths with tensors and reads them back, impossible on "meta"."""
    from torchvision.models.regnet import BlockParams

    original = BlockParams.from_init_params.__func__  # type: ignore[attr-defined]

    def on_cpu(cls: type, *args: object, **kwargs: object) -> BlockParams:
        with torch.device("cpu"):
            return original(cls, *args, **kwargs)  # type: ignore[no-any-return]

    monkeypatch.setattr(BlockParams, "from_init_params", classmethod(on_cpu))


@pytest.mark.usefixtures("regnet_on_meta")
def test_every_listed_backbone_gets_a_new_head() -> None:
    names = list_backbones()
    assert "resnet50" in names and "vit_b_16" in names and len(names) > 50
    for name in names:
        with torch.device("meta"):
            backbone = create_backbone(name, num_classes=7, weights="none")
        assert _outputs(_head(backbone)) == 7, name
        params = [n for n, _ in backbone.model.named_parameters()]
        assert any(is_head_parameter(n, backbone.head_prefixes) for n in params), name
        assert backbone.preprocess == eval_preprocess(name), name


def test_head_dropout_wraps_the_new_head() -> None:
    backbone = create_backbone("resnet18", num_classes=4, weights="none", head_dropout=0.3)
    head = backbone.model.fc
    assert isinstance(head, nn.Sequential)
    assert isinstance(head[0], nn.Dropout) and head[0].p == 0.3
    assert isinstance(head[1], nn.Linear) and head[1].out_features == 4
    head_params = {n for n, _ in backbone.model.named_parameters() if is_head_parameter(n, backbone.head_prefixes)}
    assert head_params == {"fc.1.weight", "fc.1.bias"}


def test_squeezenet_head_is_a_conv_and_num_classes_follows() -> None:
    backbone = create_backbone("squeezenet1_1", num_classes=6, weights="none")
    assert isinstance(backbone.model.classifier[1], nn.Conv2d)
    assert backbone.model.classifier[1].out_channels == 6
    assert backbone.model.num_classes == 6


def test_googlenet_and_inception_lose_their_aux_heads() -> None:
    with torch.device("meta"):
        googlenet = create_backbone("googlenet", num_classes=2, weights="none").model
        inception = create_backbone("inception_v3", num_classes=2, weights="none").model
    assert googlenet.aux_logits is False and googlenet.aux1 is None and googlenet.aux2 is None
    assert inception.aux_logits is False and inception.AuxLogits is None


def test_timm_fixed_size_model_is_built_for_img_size() -> None:
    backbone = create_backbone("timm/vit_tiny_patch16_224", num_classes=2, weights="none", img_size=64)
    assert backbone.head_prefixes == ("head.",)
    with torch.no_grad():
        assert backbone.model.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 2)
    assert backbone.preprocess.crop == 64


def test_rejects_unknown_names_and_weight_names() -> None:
    with pytest.raises(ValueError, match="unknown backbone"):
        create_backbone("resnet17", num_classes=2, weights="none")
    with pytest.raises(ValueError, match=r"ResNet18_Weights\.IMAGENET1K_V1"):
        eval_preprocess("resnet18", "IMAGENET1K_V9")
    with pytest.raises(ValueError, match="unknown timm model"):
        eval_preprocess("timm/not_a_model")


# ---- freezing and optimizer groups --------------------------------------------------------------
def test_set_backbone_trainable_touches_only_the_backbone() -> None:
    backbone = create_backbone("mobilenet_v3_small", num_classes=3, weights="none")
    set_backbone_trainable(backbone, False)
    for name, param in backbone.model.named_parameters():
        assert param.requires_grad == is_head_parameter(name, backbone.head_prefixes), name
    set_backbone_trainable(backbone, True)
    assert all(p.requires_grad for p in backbone.model.parameters())


def test_parameter_groups_split_head_backbone_and_decay() -> None:
    backbone = create_backbone("resnet18", num_classes=3, weights="none")
    set_backbone_trainable(backbone, False)  # frozen parameters are still handed to the optimizer
    groups = parameter_groups(backbone, lr=0.1, backbone_lr=0.01, weight_decay=0.05)
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"head_decay", "head_no_decay", "backbone_decay", "backbone_no_decay"}
    model = backbone.model
    assert by_name["head_decay"]["params"] == [model.fc.weight]
    assert by_name["head_no_decay"]["params"] == [model.fc.bias]
    no_decay = {id(p) for p in by_name["backbone_no_decay"]["params"]}
    assert id(model.bn1.weight) in no_decay and id(model.bn1.bias) in no_decay
    assert id(model.conv1.weight) in {id(p) for p in by_name["backbone_decay"]["params"]}
    assert [(g["lr"], g["weight_decay"]) for g in groups] == [(0.1, 0.05), (0.1, 0.0), (0.01, 0.05), (0.01, 0.0)]
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    torch.optim.AdamW(groups, lr=0.1)  # a valid optimizer spec


def test_parameter_groups_skip_empty_groups() -> None:
    backbone = create_backbone("squeezenet1_1", num_classes=3, weights="none")
    for module in backbone.model.modules():
        if isinstance(module, nn.Conv2d) and module.bias is not None:
            module.bias = None  # no 1-d parameters left anywhere
    names = [g["name"] for g in parameter_groups(backbone, lr=1.0, backbone_lr=0.1, weight_decay=0.1)]
    assert names == ["head_decay", "backbone_decay"]


# ---- eval preprocessing -------------------------------------------------------------------------
def test_eval_preprocess_follows_the_weights() -> None:
    assert eval_preprocess("resnet50") == Preprocess(resize=232, crop=224, interpolation="bilinear", jpeg_draft=True)
    assert eval_preprocess("resnet50", "IMAGENET1K_V1") == Preprocess(resize=256, crop=224, jpeg_draft=True)
    assert eval_preprocess("resnet50", "ResNet50_Weights.IMAGENET1K_V1") == eval_preprocess("resnet50", "IMAGENET1K_V1")
    assert eval_preprocess("resnet50", "none") == eval_preprocess("resnet50")
    assert eval_preprocess("inception_v3").crop == 299


def test_img_size_overrides_crop_and_scales_resize() -> None:
    spec = eval_preprocess("resnet50", img_size=160)
    assert (spec.crop, spec.resize) == (160, round(160 * 232 / 224))
    lite0 = eval_preprocess(LITE0_BACKBONE, img_size=192)
    assert (lite0.crop, lite0.resize, lite0.interpolation) == (192, 219, "bicubic")


def test_fixed_size_models_refuse_other_sizes_with_pretrained_weights() -> None:
    with pytest.raises(ValueError, match="224x224 inputs only"):
        create_backbone("vit_b_16", num_classes=2, weights="IMAGENET1K_V1", img_size=160)


def test_lite0_preprocessing_comes_from_the_timm_config() -> None:
    expected = Preprocess(
        resize=256, crop=224, interpolation="bicubic", mean=(0.5,) * 3, std=(0.5,) * 3, jpeg_draft=True
    )
    assert eval_preprocess(LITE0_BACKBONE, LITE0_WEIGHTS) == expected
    assert eval_preprocess(LITE0_BACKBONE, "none") == expected
