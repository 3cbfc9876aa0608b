"""Model control over a real store: the tiny package published by ``finetune.publish``, polled by hand.

Each test runs its coroutine with ``asyncio.run`` and calls :meth:`ModelControl.poll_once` itself
instead of waiting for the poll interval.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import pytest

from service import metrics
from service.control import ModelControl, store_problem
from service.dataplane import DataPlane
from service.errors import InvalidInput, ModelNotFound, ModelNotReady
from service.repository import READY, UNAVAILABLE, ModelRepository
from service.settings import Settings
from service.types import InferInput, InferRequest

if TYPE_CHECKING:
    from tests.unit.service.conftest import TinyStore

T = TypeVar("T")


def _settings(store: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {"model_control": "poll", "poll_interval_s": 60.0, "device": "cpu"}
    return Settings(
        model_store=store, max_batch_size=4, drain_timeout_s=5.0, decode_workers=1, **{**values, **overrides}
    )


def _run(settings: Settings, body: Callable[[ModelControl], Awaitable[T]]) -> T:
    """Start model control (the first poll), run ``body``, then stop polling and close the repository."""

    async def main() -> T:
        control = ModelControl(ModelRepository(settings), settings)
        await control.start()
        try:
            return await body(control)
        finally:
            await control.stop()
            await control.repository.close(timeout=5.0)

    return asyncio.run(main())


def _transitions(model: str, version: str, transition: str, outcome: str = "success") -> float:
    labels = {"model": model, "version": version, "transition": transition, "outcome": outcome}
    return metrics.REGISTRY.get_sample_value("inference_model_transitions_total", labels) or 0.0


def _states(repository: ModelRepository, name: str = "tiny") -> dict[str, str]:
    return {e.version: e.state for e in repository.versions(name)}


def _unpublish(store: Path, version: str, name: str = "tiny") -> None:
    """Remove a version the way an operator would without a half-deleted folder: rename it away, then delete."""
    gone = store / name / f".deleting-{version}"
    (store / name / version).rename(gone)
    shutil.rmtree(gone)


def _publish_corrupt(tiny_store: TinyStore, version: str, *, replace: bool = False) -> None:
    """A copy of version 1 as ``version``, its manifest right, its ONNX file not matching its sha256."""
    staging = tiny_store.store / "tiny" / f".staging-{version}"
    shutil.copytree(tiny_store.folder, staging)
    manifest = json.loads((staging / "manifest.json").read_text())
    manifest["version"] = int(version)
    (staging / "manifest.json").write_text(json.dumps(manifest))
    with (staging / "model.onnx").open("ab") as fh:
        fh.write(b"\0")
    if replace:
        _unpublish(tiny_store.store, version)
    staging.rename(tiny_store.store / "tiny" / version)


# ---- the store itself ------------------------------------------------------------------------------


def test_store_problems_are_named(tmp_path: Path) -> None:
    assert store_problem(tmp_path) is None
    assert store_problem(tmp_path / "nope") == f"model store {tmp_path / 'nope'} does not exist"
    (tmp_path / "file").write_text("x")
    assert store_problem(tmp_path / "file") == f"model store {tmp_path / 'file'} is not a folder"


@pytest.mark.parametrize("mode", ["none", "explicit"])
def test_a_missing_store_stops_the_start_outside_poll_mode(tmp_path: Path, mode: str) -> None:
    settings = _settings(tmp_path / "nope", model_control=mode, management_token="t")
    with pytest.raises(OSError, match=r"^model store .*nope does not exist \(--model-store; --model-control poll"):
        _run(settings, lambda control: asyncio.sleep(0))


def test_poll_mode_warns_about_a_missing_store_then_loads_it_when_it_appears(
    tiny_store: TinyStore, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = tmp_path / "later"

    async def body(control: ModelControl) -> None:
        assert not await control.poll_once()
        assert not control.repository.any_ready()
        shutil.copytree(tiny_store.store, store)
        assert await control.poll_once()
        assert _states(control.repository) == {"1": READY}

    with caplog.at_level(logging.INFO, logger="service.control"):
        _run(_settings(store, poll_interval_s=10.0), body)  # a slow poll warns every time
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 3, warnings
    assert all(f"model store {store} does not exist" in w for w in warnings[:2])
    assert "readable again" in warnings[2]


def test_fast_polls_warn_about_a_missing_store_once_in_a_while(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def body(control: ModelControl) -> None:
        for _ in range(5):
            await control.poll_once()

    with caplog.at_level(logging.WARNING, logger="service.control"):
        _run(_settings(tmp_path / "nope", poll_interval_s=0.5), body)
    assert len(caplog.records) == 1 and "does not exist" in caplog.records[0].getMessage()


# ---- versions appearing, disappearing, corrupt ------------------------------------------------------


def test_a_published_version_becomes_the_default_once_ready_and_a_removed_one_is_unloaded(
    tiny_store: TinyStore,
) -> None:
    async def body(control: ModelControl) -> None:
        repository = control.repository
        assert repository.get("tiny").version == "1" and repository.default_version("tiny") == "1"
        before = {t: _transitions("tiny", "2", t) for t in ("load", "unload", "default")}
        tiny_store.publish()
        assert repository.get("tiny").version == "1"  # on disk, not yet polled
        await control.poll_once()
        assert _states(repository) == {"1": READY, "2": READY}
        assert repository.get("tiny").version == "2"
        await control.poll_once()  # nothing changed: nothing reloaded
        _unpublish(tiny_store.store, "2")
        await control.poll_once()
        assert _states(repository) == {"1": READY}
        assert repository.get("tiny").version == "1"
        with pytest.raises(ModelNotFound, match="has no version '2'"):
            repository.get("tiny", "2")
        after = {t: _transitions("tiny", "2", t) for t in ("load", "unload", "default")}
        assert {t: after[t] - before[t] for t in after} == {"load": 1, "unload": 1, "default": 1}
        assert metrics.REGISTRY.get_sample_value("inference_model_ready", {"model": "tiny", "version": "2"}) is None

    _run(_settings(tiny_store.store), body)


def test_a_corrupt_version_is_unavailable_and_never_takes_traffic(tiny_store: TinyStore) -> None:
    async def body(control: ModelControl) -> None:
        repository = control.repository
        failures = _transitions("tiny", "3", "load", "failure")
        _publish_corrupt(tiny_store, "3")
        await control.poll_once()
        assert _states(repository) == {"1": READY, "3": UNAVAILABLE}
        assert "sha256" in repository.versions("tiny")[1].reason
        assert repository.get("tiny").version == "1"
        with pytest.raises(ModelNotReady, match=r"version 3 is not ready: .*sha256"):
            repository.get("tiny", "3")
        await control.poll_once()  # unchanged on disk: not retried
        assert _transitions("tiny", "3", "load", "failure") == failures + 1
        _unpublish(tiny_store.store, "3")
        await control.poll_once()
        assert _states(repository) == {"1": READY}

    _run(_settings(tiny_store.store), body)


def test_a_broken_republish_of_a_serving_version_keeps_what_was_loaded(tiny_store: TinyStore) -> None:
    async def body(control: ModelControl) -> None:
        repository = control.repository
        serving = repository.get("tiny", "1")
        _publish_corrupt(tiny_store, "1", replace=True)
        await control.poll_once()
        assert repository.get("tiny") is serving and serving.state == READY
        assert _transitions("tiny", "1", "reload", "failure") >= 1

    _run(_settings(tiny_store.store), body)


def test_a_removed_model_folder_drains_and_unloads_the_model(tiny_store: TinyStore) -> None:
    tiny_store.publish(name="other")

    async def body(control: ModelControl) -> None:
        repository = control.repository
        assert repository.get("other").state == READY
        shutil.rmtree(tiny_store.store / "other")
        await control.poll_once()
        with pytest.raises(ModelNotFound, match="model 'other' not found"):
            repository.get("other")
        assert [row.name for row in repository.index()] == ["tiny"]

    _run(_settings(tiny_store.store), body)


def test_the_version_policy_chooses_what_is_loaded(tiny_store: TinyStore) -> None:
    tiny_store.publish()

    async def body(control: ModelControl) -> None:
        repository = control.repository
        assert _states(repository) == {"2": READY}
        tiny_store.publish()
        await control.poll_once()
        assert _states(repository) == {"3": READY}  # latest:1: version 2 is drained once 3 is ready

    _run(_settings(tiny_store.store, version_policy="latest:1"), body)


def test_the_version_policy_applies_without_polling_too(tiny_store: TinyStore) -> None:
    tiny_store.publish()
    tiny_store.publish()

    async def body(control: ModelControl) -> None:
        assert _states(control.repository) == {"1": READY, "3": READY}

    _run(_settings(tiny_store.store, model_control="none", version_policy="specific:1,3"), body)


# ---- the default version ----------------------------------------------------------------------------


def test_a_default_file_pins_the_default_and_the_management_pin_overrides_it(tiny_store: TinyStore) -> None:
    tiny_store.publish()
    (tiny_store.store / "tiny" / "DEFAULT").write_text("1\n")

    async def body(control: ModelControl) -> None:
        repository = control.repository
        plane = DataPlane(repository, control.settings)
        meta = await plane.model_metadata("tiny")
        assert (meta.default_version, meta.pinned_version, meta.versions) == ("1", "1", ["1", "2"])
        assert [(s.version, s.state) for s in meta.version_states] == [("1", READY), ("2", READY)]
        assert repository.get("tiny").version == "1"
        assert await plane.set_default_version("tiny", "2") == {
            "name": "tiny",
            "default_version": "2",
            "pinned_version": "2",
        }
        assert repository.get("tiny").version == "2"
        await plane.set_default_version("tiny", None)  # back to the DEFAULT file
        assert repository.get("tiny").version == "1"
        (tiny_store.store / "tiny" / "DEFAULT").unlink()
        await control.poll_once()
        assert repository.get("tiny").version == "2"
        with pytest.raises(ModelNotFound, match="no version '7'"):
            await plane.set_default_version("tiny", "7")
        with pytest.raises(ModelNotFound, match="model 'ghost' not found"):
            await plane.set_default_version("ghost", "1")
        with pytest.raises(InvalidInput, match="model_control=poll"):
            await plane.load_model("tiny")
        await plane.shutdown(timeout=5.0)

    _run(_settings(tiny_store.store), body)


def test_in_flight_requests_finish_while_their_version_is_removed(tiny_store: TinyStore) -> None:
    tiny_store.publish()

    async def body(control: ModelControl) -> list[str]:
        plane = DataPlane(control.repository, control.settings)
        image = np.random.default_rng(0).standard_normal((1, 3, 32, 32), dtype=np.float32)

        def request() -> InferRequest:
            return InferRequest(model="tiny", inputs=[InferInput("input", "FP32", [1, 3, 32, 32], image)])

        first = [asyncio.create_task(plane.infer(request())) for _ in range(24)]
        await asyncio.sleep(0)  # they hold version 2 now
        _unpublish(tiny_store.store, "2")
        drop = asyncio.create_task(control.poll_once())
        await asyncio.sleep(0)
        later = [asyncio.create_task(plane.infer(request())) for _ in range(8)]
        answers = await asyncio.gather(*first, *later)
        await drop
        await plane.shutdown(timeout=5.0)
        return [a.version for a in answers]

    versions = _run(_settings(tiny_store.store), body)
    assert versions == ["2"] * 24 + ["1"] * 8


def test_torchserve_style_requests_decoding_while_their_version_is_removed_finish(
    tiny_store: TinyStore, png: Callable[..., bytes]
) -> None:
    tiny_store.publish()

    async def body(control: ModelControl) -> list[list[dict[str, float]]]:
        plane = DataPlane(control.repository, control.settings)
        images = [png(seed) for seed in range(16)]
        held = [
            asyncio.create_task(plane.predict_images("tiny", None, [image], protocol="http_torchserve", deadline=None))
            for image in images
        ]
        await asyncio.sleep(0)  # they hold version 2 and wait for a decode thread
        assert control.repository.versions("tiny")[1].decoding > 0
        _unpublish(tiny_store.store, "2")
        await control.poll_once()
        answers = await asyncio.gather(*held)
        assert _states(control.repository) == {"1": READY}
        await plane.shutdown(timeout=5.0)
        return answers

    answers = _run(_settings(tiny_store.store), body)
    assert len(answers) == 16 and all(set(answer[0]) <= {"a", "b", "c"} for answer in answers)


# ---- settings -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"model_control": "sometimes"}, "model_control='sometimes' is not one of none, poll, explicit"),
        ({"poll_interval_s": 0.0}, "poll_interval_s must be a number of seconds > 0"),
        ({"poll_interval_s": -1.0}, "poll_interval_s must be a number of seconds > 0"),
        ({"version_policy": "latest:0"}, "version_policy='latest:0' is not one of all, latest:N (N >= 1) or"),
        ({"model_control": "explicit"}, "enable_management needs a management_token"),
    ],
)
def test_bad_model_control_settings_name_the_accepted_forms(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        Settings(**overrides)


def test_explicit_control_implies_the_management_api() -> None:
    settings = Settings(model_control="explicit", management_token="t")
    assert settings.enable_management
    assert Settings().model_control == "none" and Settings().version_policy == "all"
    assert not Settings().enable_management
