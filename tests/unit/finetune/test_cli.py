from __future__ import annotations

from pathlib import Path

import pytest

from finetune.cli import DEMO_CONFIG, get_args_parser, resolve_config
from finetune.config import TrainConfig


def _resolve(argv: list[str]) -> TrainConfig:
    return resolve_config(get_args_parser().parse_args(argv))


def test_defaults_and_command_line(tmp_path: Path) -> None:
    config = _resolve(["--data", str(tmp_path), "--epochs", "3", "--export-formats", "onnx"])
    assert config.backbone == "resnet50" and config.weights == "DEFAULT"
    assert config.epochs == 3 and config.export_formats == ("onnx",)


def test_yaml_supplies_flags_and_command_line_wins(tmp_path: Path) -> None:
    (tmp_path / "imgs").mkdir()
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("data: imgs\nbackbone: resnet18\nbatch-size: 8\nepochs: 7\n")
    config = _resolve(["--config", str(yaml_file), "--epochs", "2"])
    assert config.data == (tmp_path / "imgs").resolve()
    assert (config.backbone, config.batch_size, config.epochs) == ("resnet18", 8, 2)


def test_unknown_yaml_key_is_an_error(tmp_path: Path) -> None:
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("data: .\nlearning_rate: 0.1\n")
    with pytest.raises(ValueError, match="unknown config keys: learning_rate"):
        _resolve(["--config", str(yaml_file)])


def test_demo_config_points_at_embedded_data() -> None:
    config = _resolve(["--demo", "--epochs", "1"])
    assert config.backbone == "timm/tf_efficientnet_lite0"
    assert config.data == (DEMO_CONFIG.parent.parent / "demo_data").resolve()
    assert config.data.is_dir() and config.epochs == 1


def test_missing_data_and_bad_choices() -> None:
    with pytest.raises(ValueError, match="--data is required"):
        _resolve([])
    with pytest.raises(SystemExit):
        get_args_parser().parse_args(["--data", ".", "--optimizer", "rmsprop"])
    with pytest.raises(ValueError, match="val_split"):
        _resolve(["--data", ".", "--val-split", "0.6", "--test-split", "0.5"])


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    config = _resolve(["--data", str(tmp_path), "--img-size", "96"])
    config.save(tmp_path / "config.yaml")
    assert TrainConfig.load(tmp_path / "config.yaml") == config


def test_every_flag_has_help() -> None:
    for action in get_args_parser()._actions:
        assert action.help, action.dest


def test_learning_settings_default_to_auto_and_numbers_win(tmp_path: Path) -> None:
    config = _resolve(["--data", str(tmp_path)])
    assert (config.lr, config.epochs, config.freeze_epochs, config.backbone_lr_scale) == (None, None, None, None)
    config = _resolve(["--data", str(tmp_path), "--lr", "3e-3", "--epochs", "7", "--freeze-epochs", "auto"])
    assert (config.lr, config.epochs, config.freeze_epochs) == (3e-3, 7, None)
    with pytest.raises(SystemExit):
        get_args_parser().parse_args(["--data", ".", "--lr", "fast"])
