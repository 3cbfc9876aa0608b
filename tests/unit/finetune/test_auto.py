"""finetune.auto: the range test on cached features, the fitted head, the budget and the plan."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import nn

from finetune import auto
from finetune.backbones import _resize_for
from finetune.config import TrainConfig
from finetune.loop import Runtime
from finetune.optim import schedule_factor
from finetune.tasks import training_task

CLASSES = 3


class Toy(nn.Module):
    """A fixed random "backbone" (8 features) and a new head ``fc`` (Dropout + Linear), like a real Backbone."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU())
        self.fc = nn.Sequential(OrderedDict(drop=nn.Dropout(0.2), linear=nn.Linear(8, CLASSES)))
        nn.init.normal_(self.fc.linear.weight, std=0.01)
        nn.init.zeros_(self.fc.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fc(self.body(x))
        return out


def separable(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 3, 2, 2) whose class sets one channel high: easy once the head is fitted."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(count) % CLASSES
    images = torch.randn(count, 3, 2, 2, generator=generator) * 0.3
    images[torch.arange(count), labels] += 2.0
    return images, labels


def batches(images: torch.Tensor, labels: torch.Tensor, size: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(images[i : i + size], labels[i : i + size]) for i in range(0, len(images), size)]


def fit_settings() -> auto.HeadFit:
    task = training_task("multiclass", [f"c{i}" for i in range(CLASSES)])
    return auto.HeadFit(task, nn.CrossEntropyLoss(), "adamw", 0.0, 0.9, 8, seed=0)


def inputs(model: Toy, *, per_class: float, train: int = 60) -> auto.Inputs:
    return auto.Inputs(
        model, ("fc.",), batches(*separable(train, 1)), batches(*separable(30, 2)), Runtime(torch.device("cpu")),
        fit_settings(), steps_per_epoch=max(1, train // 8), images_per_class=per_class,
    )  # fmt: skip


def test_epochs_for_is_a_step_budget_within_bounds() -> None:
    assert auto.epochs_for(1000) == auto.MIN_EPOCHS  # big data: the floor
    assert auto.epochs_for(15) == 17  # 500 images at batch 32: 255 steps
    assert auto.epochs_for(1) == auto.MAX_EPOCHS  # tiny data: the cap


def test_head_inputs_are_what_the_head_receives() -> None:
    model = Toy()
    images, labels = separable(20, 0)
    features, targets = auto.head_inputs(model, model.fc, batches(images, labels), Runtime(torch.device("cpu")),
                                         total=3, desc="t")  # fmt: skip
    assert features.shape == (20, 8) and torch.equal(targets, labels)
    assert torch.allclose(features, model.body(images))


def test_range_test_leaves_the_head_alone_and_suggests_a_tenth_of_the_minimum() -> None:
    model = Toy()
    before = {k: v.clone() for k, v in model.fc.state_dict().items()}
    features = auto.head_inputs(model, model.fc, batches(*separable(60, 1)), Runtime(torch.device("cpu")),
                                total=8, desc="t")  # fmt: skip
    result = auto.head_range_test(model.fc, *features, fit_settings())
    assert all(torch.equal(before[k], v) for k, v in model.fc.state_dict().items())
    lowest = result.lrs[min(range(len(result.smoothed)), key=result.smoothed.__getitem__)]
    assert result.suggestion == pytest.approx(lowest / 10)
    assert auto.LR_RANGE[0] <= result.suggestion <= auto.LR_RANGE[1]
    assert min(result.losses) < result.losses[0] / 2  # the loss fell: the curve is real
    assert auto.clamp_lr(1e-9) == auto.LR_BOUNDS[0] and auto.clamp_lr(5.0) == auto.LR_BOUNDS[1]


def test_fit_head_learns_and_keeps_its_best_epoch() -> None:
    model = Toy()
    runtime = Runtime(torch.device("cpu"))
    train = auto.head_inputs(model, model.fc, batches(*separable(60, 1)), runtime, total=8, desc="t")
    val = auto.head_inputs(model, model.fc, batches(*separable(30, 2)), runtime, total=4, desc="v")
    chance = nn.functional.cross_entropy(model.fc.eval()(val[0]), val[1]).item()
    best = auto.fit_head(model.fc, train, val, fit_settings(), lr=1e-2, epochs=20)
    assert best["accuracy"] > 0.9 and best["loss"] < chance / 2
    assert 1 <= best["epoch"] <= 20
    again = nn.functional.cross_entropy(model.fc.eval()(val[0]), val[1]).item()
    assert again == pytest.approx(best["loss"], rel=1e-5)  # the head holds the best epoch's weights


def test_resolve_on_small_data_fits_the_head_then_probes(tmp_path: Path) -> None:
    model = Toy()
    plan, probe = auto.resolve(TrainConfig(data=tmp_path), inputs(model, per_class=10))
    assert plan.probe and plan.freeze_epochs == plan.epochs  # below PROBE_ONLY_BELOW: a linear probe
    assert auto.LR_BOUNDS[0] <= plan.lr <= auto.LR_BOUNDS[1] and plan.lr_curve is not None
    assert plan.probe_val is not None and plan.probe_val["accuracy"] > 0.9
    assert probe is not None and probe.logits.shape == (30, CLASSES) and "linear.weight" in probe.head_state
    assert set(plan.reason) == {"lr", "epochs", "freeze_epochs", "backbone_lr_scale"}
    assert "linear probe" in plan.reason["freeze_epochs"]
    plan.save(tmp_path)
    assert auto.Plan.load(tmp_path) == plan


def test_resolve_on_larger_data_fine_tunes_the_whole_network_at_one_capped_lr(tmp_path: Path) -> None:
    plan, _ = auto.resolve(TrainConfig(data=tmp_path), inputs(Toy(), per_class=100))
    assert plan.freeze_epochs == 0 and plan.backbone_lr_scale == 1.0
    assert plan.lr <= auto.BACKBONE_LR_CAP["adamw"]
    given, _ = auto.resolve(TrainConfig(data=tmp_path, lr=1e-2), inputs(Toy(), per_class=100))
    assert (given.lr, given.backbone_lr_scale) == (1e-2, 1.0)  # a given LR is not capped
    assert given.reason["lr"] == "0.01, given" and given.lr_curve is None


def test_explicit_settings_win_and_skip_the_probe(tmp_path: Path) -> None:
    model = Toy()
    head = {k: v.clone() for k, v in model.fc.state_dict().items()}
    config = TrainConfig(data=tmp_path, lr=3e-3, epochs=4, freeze_epochs=1, backbone_lr_scale=0.5)
    plan, probe = auto.resolve(config, inputs(model, per_class=10))
    assert (plan.lr, plan.epochs, plan.freeze_epochs, plan.backbone_lr_scale) == (3e-3, 4, 1, 0.5)
    assert not plan.probe and probe is None
    assert all(torch.equal(head[k], v) for k, v in model.fc.state_dict().items())
    assert all(text.endswith("given") for text in plan.reason.values())


def test_explicit_freeze_with_auto_lr_still_runs_the_range_test(tmp_path: Path) -> None:
    plan, _ = auto.resolve(TrainConfig(data=tmp_path, freeze_epochs=0), inputs(Toy(), per_class=10))
    assert plan.lr_curve is not None and not plan.probe
    assert plan.backbone_lr_scale == auto.DEFAULT_BACKBONE_LR_SCALE


def test_auto_settings_round_trip_through_yaml(tmp_path: Path) -> None:
    config = TrainConfig(data=tmp_path)
    assert config.auto_fields == ("lr", "epochs", "freeze_epochs", "backbone_lr_scale")
    assert config.to_dict()["lr"] == "auto"
    config.save(tmp_path / "config.yaml")
    assert TrainConfig.load(tmp_path / "config.yaml") == config
    assert TrainConfig.from_dict({"data": str(tmp_path), "epochs": "auto"}).epochs is None
    with pytest.raises(ValueError, match="epochs"):
        TrainConfig(data=tmp_path, epochs=0)


def test_the_lr_warms_up_again_when_the_backbone_unfreezes() -> None:
    def factor(step: int) -> float:
        return schedule_factor(step, steps_per_epoch=10, epochs=6, freeze_epochs=2, warmup_epochs=1)

    assert factor(0) == pytest.approx(0.1) and factor(9) == pytest.approx(1.0)
    assert factor(19) < 0.05  # the head phase decays to its floor...
    assert factor(20) == pytest.approx(0.1)  # ...and the whole network warms up from ~0
    linear_probe = [schedule_factor(s, steps_per_epoch=10, epochs=4, freeze_epochs=4, warmup_epochs=1) for s in (0, 9)]
    assert linear_probe == pytest.approx([0.1, 1.0])


def test_small_inputs_are_resized_without_a_centre_crop() -> None:
    assert _resize_for(64, crop=224, resize=256) == 64  # far below the pretraining size: nothing cut off
    assert _resize_for(112, crop=224, resize=256) == 112
    assert _resize_for(160, crop=224, resize=256) == 183  # near it: the pretraining ratio


def test_weight_ema_warms_up_and_follows_the_weights() -> None:
    from finetune.loop import WeightEMA

    model = nn.Linear(2, 1)
    nn.init.zeros_(model.weight)
    ema = WeightEMA(model, decay=0.998)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update()  # first update: decay (1+1)/(10+1) = 0.18, so the average moves most of the way
    assert ema.module.weight.mean().item() == pytest.approx(1 - 2 / 11)
    for _ in range(2000):
        ema.update()
    assert ema.module.weight.mean().item() == pytest.approx(1.0, abs=1e-3)
    assert not any(p.requires_grad for p in ema.module.parameters())
    restored = WeightEMA(model, decay=0.998)
    restored.load_state_dict(ema.state_dict())
    assert restored.updates == 2001 and torch.equal(restored.module.weight, ema.module.weight)


def test_train_mode_loss_uses_batch_statistics_and_changes_nothing() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.BatchNorm1d(8), nn.Linear(8, CLASSES))
    norm = model[2]
    assert isinstance(norm, nn.BatchNorm1d)
    with torch.no_grad():
        norm.running_mean.fill_(50.0)  # running statistics far from the data's: eval mode is off, train mode is not
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images, labels = separable(32, 0)
    task = training_task("multiclass", [f"c{i}" for i in range(CLASSES)])
    loss = auto.train_mode_loss(model, batches(images, labels), Runtime(torch.device("cpu")), task)
    batch_stats = nn.functional.cross_entropy(model.train()(images[:8]), labels[:8]).item()
    model.load_state_dict(before)
    eval_loss = nn.functional.cross_entropy(model.eval()(images), labels).item()
    assert loss == pytest.approx(batch_stats, rel=0.5) and loss < eval_loss / 10
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_fitted_head_that_breaks_under_batch_statistics_is_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(auto, "train_mode_loss", lambda *_a, **_k: 9.0)  # far above chance, ln 3
    model = Toy()
    plan, probe = auto.resolve(TrainConfig(data=tmp_path), inputs(model, per_class=100))
    assert probe is not None and plan.freeze_epochs == 0
    assert "new head" in plan.reason["freeze_epochs"] and "9.00" in plan.reason["freeze_epochs"]
    fitted = probe.head_state["linear.weight"]
    assert model.fc.linear.weight.abs().max() < fitted.abs().max()  # the model's head was re-initialised
    assert plan.backbone_lr_scale == pytest.approx(min(1.0, auto.BACKBONE_LR_CAP["adamw"] / plan.lr))


def test_ready_features_move_the_backbone_at_a_tenth_after_the_fitted_head(tmp_path: Path) -> None:
    config, reason = TrainConfig(data=tmp_path), {"lr": "range test"}
    lr, scale = auto._fine_tune_lr(config, 5e-3, fitted=True, ready=True, frozen=False, reason=reason)
    assert (lr, scale) == (auto.BACKBONE_LR_CAP["adamw"], auto.DEFAULT_BACKBONE_LR_SCALE)
    assert "already separate" in reason["backbone_lr_scale"] and "at most" in reason["lr"]
    lr, scale = auto._fine_tune_lr(config, 5e-4, fitted=True, ready=False, frozen=False, reason=reason)
    assert (lr, scale) == (5e-4, 1.0) and "must adapt" in reason["backbone_lr_scale"]


@pytest.mark.parametrize(("score", "count", "expected"), [(0.75, 12, 0.125), (1.0, 50, 0.0), (0.5, 100, 0.05)])
def test_the_selection_margin_is_the_best_scores_standard_error(score: float, count: int, expected: float) -> None:
    assert auto.selection_margin(score, count) == pytest.approx(expected)


def test_the_latest_epoch_within_the_noise_of_the_best_is_selected() -> None:
    from types import SimpleNamespace

    from finetune.engine import Trainer
    from finetune.tasks import training_task

    task = training_task("multiclass", ["a", "b"])  # its own metric: accuracy
    val = [None] * 21  # margin at 0.76: 0.093

    def selects(top: float, score: float, metric: str = "auto") -> bool:
        trainer = SimpleNamespace(task=task, splits=SimpleNamespace(val=val),
                                  config=SimpleNamespace(early_stop_metric=metric))  # fmt: skip
        return Trainer._selects(trainer, score, top)

    assert selects(0.76, 0.68) and not selects(0.76, 0.66)
    assert selects(0.76, 0.76) and not selects(0.76, 0.7599, "loss") and selects(0.76, 0.76, "loss")
    assert selects(0.0, 0.0)  # the first epoch: its own score is the top
