"""The model repository over a real store: the tiny package published by ``finetune.publish``.

Each test runs its coroutine with ``asyncio.run``: the batchers live on that loop and are drained
before it ends.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import pytest

from service import metrics
from service.errors import ModelNotFound, ModelNotReady, ShuttingDown
from service.repository import READY, UNAVAILABLE, ModelRepository
from service.settings import Settings
from service.types import ModelStatus

if TYPE_CHECKING:
    from tests.unit.service.conftest import TinyStore

T = TypeVar("T")


def _settings(store: Path, **overrides: Any) -> Settings:
    return Settings(model_store=store, device="cpu", max_batch_size=4, drain_timeout_s=5.0, **overrides)


def _run(settings: Settings, body: Callable[[ModelRepository], Awaitable[T]]) -> T:
    """Load the whole store, run ``body``, then close the repository (draining its batchers)."""

    async def main() -> T:
        repository = ModelRepository(settings)
        await repository.load_all()
        try:
            return await body(repository)
        finally:
            await repository.close(timeout=5.0)

    return asyncio.run(main())


def _ready_gauge(name: str, version: str) -> float | None:
    return metrics.REGISTRY.get_sample_value("inference_model_ready", {"model": name, "version": version})


def _image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 3, 32, 32), dtype=np.float32)


@pytest.mark.parametrize(
    ("overrides", "backend"),
    [
        ({}, ("onnxruntime", "openvino")),  # auto: the faster of the two, timed at load
        ({"backend": "torchscript"}, ("torchscript",)),
        ({"backend": "onnxruntime"}, ("onnxruntime",)),
        ({"backend": "openvino"}, ("openvino",)),
        ({"model_backends": {"tiny": "torchscript"}}, ("torchscript",)),
        ({"backend": "torchscript", "model_backends": {"tiny": "onnxruntime"}}, ("onnxruntime",)),
    ],
)
def test_load_all_serves_the_package_with_the_chosen_backend(
    tiny_store: TinyStore, overrides: dict[str, Any], backend: tuple[str, ...]
) -> None:
    async def body(repository: ModelRepository) -> None:
        entry = repository.get("tiny")
        assert (entry.name, entry.version, entry.state, entry.reason) == ("tiny", "1", READY, "")
        assert entry.backend is not None and entry.backend.name in backend and entry.backend.device == "cpu"
        assert entry.backend.precision == "fp32"  # the tiny package has no parity set: no reduced precision
        assert entry.manifest is not None and entry.manifest.labels == ("a", "b", "c")
        assert entry.path == tiny_store.folder
        assert entry.batcher is not None
        logits = await entry.batcher.submit(_image())
        assert logits.shape == (1, 3) and logits.dtype == np.float32
        assert repository.index() == [ModelStatus("tiny", "1", READY, "")]
        assert repository.any_ready()
        assert _ready_gauge("tiny", "1") == 1

    _run(_settings(tiny_store.store, **overrides), body)


def test_a_tampered_file_makes_the_version_unavailable_without_leaking_the_store_path(tiny_store: TinyStore) -> None:
    with (tiny_store.folder / "model.pt").open("ab") as fh:  # not even the backend in use: every file is checked
        fh.write(b"\0")

    async def body(repository: ModelRepository) -> str:
        entry = repository.versions("tiny")[0]
        assert entry.state == UNAVAILABLE and entry.backend is None and entry.batcher is None
        assert not repository.any_ready()
        assert _ready_gauge("tiny", "1") == 0
        with pytest.raises(ModelNotReady, match=r"model 'tiny' has no ready version \(v1: .*sha256") as latest:
            repository.get("tiny")
        with pytest.raises(ModelNotReady, match=r"model 'tiny' version 1 is not ready: .*sha256") as pinned:
            repository.get("tiny", "1")
        assert repository.index() == [ModelStatus("tiny", "1", UNAVAILABLE, entry.reason)]
        return entry.reason + latest.value.message + pinned.value.message

    text = _run(_settings(tiny_store.store, backend="onnxruntime"), body)
    assert "sha256" in text and "tiny/1/model.pt" in text
    assert str(tiny_store.store.resolve()) not in text and str(tiny_store.store) not in text


def test_a_relative_store_path_is_not_leaked_either(tiny_store: TinyStore, monkeypatch: pytest.MonkeyPatch) -> None:
    with (tiny_store.folder / "model.onnx").open("ab") as fh:
        fh.write(b"\0")
    monkeypatch.chdir(tiny_store.store.parent)

    async def body(repository: ModelRepository) -> str:
        return repository.versions("tiny")[0].reason

    reason = _run(_settings(Path("store")), body)
    assert reason.startswith("tiny/1/model.onnx: sha256 "), reason
    assert str(tiny_store.store) not in reason


def test_a_version_folder_without_a_manifest_is_unavailable(tiny_store: TinyStore) -> None:
    (tiny_store.store / "empty" / "1").mkdir(parents=True)
    (tiny_store.store / "bare").mkdir()  # no versions at all: skipped, not an error

    async def body(repository: ModelRepository) -> list[ModelStatus]:
        with pytest.raises(ModelNotReady, match=r"no manifest\.json"):
            repository.get("empty")
        with pytest.raises(ModelNotFound, match="model 'bare' not found"):
            repository.get("bare")
        assert repository.get("tiny").state == READY  # the other models keep serving
        return repository.index()

    rows = _run(_settings(tiny_store.store), body)
    assert rows == [
        ModelStatus("empty", "1", UNAVAILABLE, "empty/1: no manifest.json"),
        ModelStatus("tiny", "1", READY),
    ]


def test_a_manifest_naming_another_model_or_version_is_unavailable(tiny_store: TinyStore) -> None:
    shutil.copytree(tiny_store.folder, tiny_store.store / "other" / "1")
    shutil.copytree(tiny_store.folder, tiny_store.store / "tiny" / "3")  # its manifest says version 1

    async def body(repository: ModelRepository) -> list[ModelStatus]:
        assert repository.get("tiny").version == "1"  # the newest *ready* version
        with pytest.raises(ModelNotReady, match="version 3 is not ready: tiny/3: manifest says tiny/1"):
            repository.get("tiny", "3")
        return repository.index()

    rows = _run(_settings(tiny_store.store), body)
    assert rows == [
        ModelStatus("other", "1", UNAVAILABLE, "other/1: manifest says tiny/1"),
        ModelStatus("tiny", "1", READY),
        ModelStatus("tiny", "3", UNAVAILABLE, "tiny/3: manifest says tiny/1"),
    ]


def test_get_picks_the_newest_ready_version_or_the_one_asked_for(tiny_store: TinyStore) -> None:
    assert tiny_store.publish() == tiny_store.store / "tiny" / "2"

    async def body(repository: ModelRepository) -> None:
        assert repository.get("tiny").version == "2"
        assert repository.get("tiny", "1").version == "1"
        assert repository.get("tiny", "2").version == "2"
        assert [e.version for e in repository.versions("tiny")] == ["1", "2"]
        with pytest.raises(ModelNotFound, match="model 'tiny' has no version '3'"):
            repository.get("tiny", "3")
        with pytest.raises(ModelNotFound, match="model 'nope' not found"):
            repository.get("nope")
        with pytest.raises(ModelNotFound, match="model 'nope' not found"):
            repository.versions("nope")

    _run(_settings(tiny_store.store), body)


@pytest.mark.parametrize("name", ["../x", "..", ".hidden", "a/b", "", "x" * 200])
def test_invalid_model_names_are_not_found_without_touching_the_disk(tiny_store: TinyStore, name: str) -> None:
    async def body(repository: ModelRepository) -> None:
        for call in (lambda: repository.get(name), lambda: repository.versions(name)):
            with pytest.raises(ModelNotFound, match=r"^invalid model name$"):
                call()
        with pytest.raises(ModelNotFound, match=r"^invalid model name: use letters"):
            await repository.load_model(name)
        with pytest.raises(ModelNotFound, match=r"^invalid model name: use letters"):
            await repository.unload_model(name)

    _run(_settings(tiny_store.store), body)


def test_loading_a_model_that_is_not_on_disk_is_not_found(tiny_store: TinyStore) -> None:
    async def body(repository: ModelRepository) -> None:
        with pytest.raises(ModelNotFound, match="no versions of model 'ghost' in the model store"):
            await repository.load_model("ghost")

    _run(_settings(tiny_store.store), body)


def test_unload_then_get_is_not_found(tiny_store: TinyStore) -> None:
    async def body(repository: ModelRepository) -> None:
        batcher = repository.get("tiny").batcher
        assert batcher is not None
        await repository.unload_model("tiny")
        with pytest.raises(ModelNotFound, match="model 'tiny' not found"):
            repository.get("tiny")
        with pytest.raises(ShuttingDown):  # the old version was drained and stopped
            await batcher.submit(_image())
        assert repository.index() == [ModelStatus("tiny", "1", UNAVAILABLE, "unloaded")]
        assert not repository.any_ready()
        assert _ready_gauge("tiny", "1") is None  # its gauges are forgotten
        with pytest.raises(ModelNotFound, match="model 'tiny' is not loaded"):
            await repository.unload_model("tiny")
        await repository.load_model("tiny")
        assert repository.get("tiny").state == READY

    _run(_settings(tiny_store.store), body)


def test_reload_picks_up_a_new_version_and_retires_the_old_batchers(tiny_store: TinyStore) -> None:
    async def body(repository: ModelRepository) -> None:
        old = repository.get("tiny")
        assert old.version == "1" and old.batcher is not None
        tiny_store.publish()
        assert repository.get("tiny").version == "1"  # nothing changes until asked
        await repository.load_model("tiny")
        new = repository.get("tiny")
        assert new.version == "2" and new.batcher is not None
        assert repository.get("tiny", "1") is not old  # every version was reloaded
        with pytest.raises(ShuttingDown):
            await old.batcher.submit(_image())
        assert (await new.batcher.submit(_image())).shape == (1, 3)
        assert [(r.version, r.state) for r in repository.index()] == [("1", READY), ("2", READY)]

    _run(_settings(tiny_store.store), body)


def test_index_lists_every_version_on_disk_and_ignores_what_is_not_a_model(tiny_store: TinyStore) -> None:
    tiny_store.publish()
    tiny_store.publish(name="zeta")
    (tiny_store.store / ".staging").mkdir()
    (tiny_store.store / "README.txt").write_text("not a model")
    (tiny_store.store / "tiny" / "notes").mkdir()  # not a version number
    (tiny_store.store / "tiny" / "0").mkdir()  # versions start at 1

    async def body(repository: ModelRepository) -> list[ModelStatus]:
        assert repository.names_on_disk() == ["tiny", "zeta"]
        await repository.unload_model("zeta")
        return repository.index()

    assert _run(_settings(tiny_store.store), body) == [
        ModelStatus("tiny", "1", READY),
        ModelStatus("tiny", "2", READY),
        ModelStatus("zeta", "1", UNAVAILABLE, "unloaded"),
    ]


def test_a_missing_store_is_empty(tmp_path: Path) -> None:
    async def body(repository: ModelRepository) -> list[ModelStatus]:
        assert repository.names_on_disk() == [] and not repository.any_ready()
        return repository.index()

    assert _run(_settings(tmp_path / "absent"), body) == []


def test_close_drains_queued_requests_then_forgets_the_models(tiny_store: TinyStore) -> None:
    async def main() -> None:
        repository = ModelRepository(_settings(tiny_store.store))
        await repository.load_all()
        batcher = repository.get("tiny").batcher
        assert batcher is not None
        pending = [asyncio.create_task(batcher.submit(_image(i))) for i in range(6)]
        await asyncio.sleep(0)  # every request is queued now
        assert batcher.queue_depth > 0
        await repository.close(timeout=5.0)
        results = await asyncio.gather(*pending)
        assert [r.shape for r in results] == [(1, 3)] * 6
        with pytest.raises(ModelNotFound):
            repository.get("tiny")
        with pytest.raises(ShuttingDown):
            await batcher.submit(_image())
        assert repository.index() == [ModelStatus("tiny", "1", UNAVAILABLE, "unloaded")]

    asyncio.run(main())
