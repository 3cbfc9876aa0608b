"""The model repository: every ``<store>/<name>/<version>/`` package, loaded, checked and batched.

A package that fails to load (bad checksum, missing file, broken model) is recorded as
UNAVAILABLE with its reason; the others keep serving. Loading runs in a worker thread so the
event loop keeps answering while a model loads.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from service import metrics
from service.backends import Backend, LoadOptions, warm_up
from service.batcher import Batcher, BatcherConfig
from service.errors import ModelNotFound, ModelNotReady, PackageError
from service.manifest import Manifest, load_manifest, package_versions, validate_name, verify_files
from service.precision import Choice, select
from service.settings import Settings
from service.types import ModelStatus

logger = logging.getLogger(__name__)
READY, UNAVAILABLE, LOADING = "READY", "UNAVAILABLE", "LOADING"


@dataclass
class ModelEntry:
    """One model version and its state; ``manifest``/``backend``/``batcher`` are set when READY.

    ``reason`` says why a version is not ready, or for a ready one which precision it was refused
    and why (it then serves a fallback); ``choice`` says how its backend and precision were chosen.
    """

    name: str
    version: str
    path: Path
    state: str = LOADING
    reason: str = ""
    manifest: Manifest | None = None
    backend: Backend | None = None
    batcher: Batcher | None = None
    choice: str = ""

    def status(self) -> ModelStatus:
        return ModelStatus(self.name, self.version, self.state, self.reason)


def open_package(
    path: Path,
    *,
    backend: str = "auto",
    precision: str = "auto",
    device: str = "auto",
    options: LoadOptions | None = None,
    batch_sizes: Sequence[int] = (1,),
) -> tuple[Manifest, Choice]:
    """Blocking: read and verify a package, choose and check its backend and precision, warm it up.

    What ``serve`` does for each version it loads, and ``predict`` for its one package; PackageError
    when the package cannot be served.
    """
    manifest = load_manifest(path)
    verify_files(path, manifest)
    choice = select(
        path,
        manifest,
        backend=backend,
        precision=precision,
        device=device,
        options=options,
        batch_size=max(batch_sizes),
    )
    warm_up(choice.backend, manifest, batch_sizes=sorted(set(batch_sizes)))
    return manifest, choice


def _load_package(path: Path, settings: Settings, name: str) -> tuple[Manifest, Choice]:
    """:func:`open_package` with the server's settings for ``name``, checking the folder is ``name``'s."""
    manifest = load_manifest(path)
    if manifest.name != name or str(manifest.version) != path.name:
        raise PackageError(f"{path}: manifest says {manifest.name}/{manifest.version}")
    options = LoadOptions(
        intra_op_threads=settings.intra_op_threads,
        intra_op_spinning=settings.intra_op_spinning,
        instances=settings.model_instances,
    )
    return open_package(
        path,
        backend=settings.backend_for(name),
        precision=settings.precision_for(name),
        device=settings.device,
        options=options,
        batch_sizes=(1, settings.max_batch_size),
    )


class ModelRepository:
    """Loads, serves and unloads model versions from the store folder."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store = settings.model_store
        self._models: dict[str, dict[str, ModelEntry]] = {}
        self._lock = asyncio.Lock()

    def names_on_disk(self) -> list[str]:
        if not self.store.is_dir():
            return []
        return sorted(p.name for p in self.store.iterdir() if p.is_dir() and not p.name.startswith("."))

    async def load_all(self) -> None:
        for name in self.names_on_disk():
            try:
                await self.load_model(name)
            except ModelNotFound as exc:
                logger.warning("skipping %s: %s", name, exc.message)

    async def load_model(self, name: str) -> None:
        """(Re)load every version of ``name`` found on disk; old versions are drained, then replaced."""
        _check_name(name)
        versions = [str(v) for v in package_versions(self.store, name)]
        if not versions:
            raise ModelNotFound(f"no versions of model '{name}' in the model store")
        async with self._lock:
            entries = {v: await self._load_version(name, v) for v in versions}
            old = self._models.get(name, {})
            self._models[name] = entries
        await self._retire(old.values())

    async def _load_version(self, name: str, version: str) -> ModelEntry:
        entry = ModelEntry(name, version, self.store / name / version)
        try:
            manifest, choice = await asyncio.to_thread(_load_package, entry.path, self.settings, name)
            backend = choice.backend
            entry.batcher = Batcher(backend.run, self._batcher_config(), model=name, version=version)
            await entry.batcher.start()
            entry.manifest, entry.backend, entry.state, entry.reason = manifest, backend, READY, choice.reason
            entry.choice = choice.summary
            logger.info(
                "model %s version %s ready: %s %s on %s (%s)",
                name,
                version,
                backend.name,
                backend.precision,
                backend.device,
                choice.summary or "no other candidate",
            )
        except Exception as exc:  # any failure makes this version unavailable, never the server
            # clients see the reason: name files relative to the store, not by their server path
            reason = (
                (str(exc) or type(exc).__name__).replace(f"{self.store.resolve()}/", "").replace(f"{self.store}/", "")
            )
            entry.state, entry.reason = UNAVAILABLE, reason
            logger.error("model %s version %s failed to load: %s", name, version, entry.reason)
        metrics.MODEL_READY.labels(name, version).set(1 if entry.state == READY else 0)
        return entry

    def _batcher_config(self) -> BatcherConfig:
        s = self.settings
        return BatcherConfig(
            max_batch_size=s.max_batch_size,
            max_queue_delay_s=s.max_queue_delay_ms / 1000.0,
            max_queue_size=s.max_queue_size,
            instances=s.model_instances,
        )

    async def unload_model(self, name: str) -> None:
        _check_name(name)
        async with self._lock:
            old = self._models.pop(name, None)
        if old is None:
            raise ModelNotFound(f"model '{name}' is not loaded")
        await self._retire(old.values())
        for version in old:
            metrics.forget_model(name, version)
        logger.info("model %s unloaded", name)

    async def _retire(self, entries: Iterable[ModelEntry]) -> None:
        for entry in list(entries):
            if entry.batcher is not None:
                await entry.batcher.stop(drain=True, timeout=self.settings.drain_timeout_s)

    def get(self, name: str, version: str | None = None) -> ModelEntry:
        """The requested version, or the newest READY one; raises ModelNotFound / ModelNotReady."""
        versions = self._models.get(name)
        if versions is None:
            raise ModelNotFound(f"model '{name}' not found" if _valid(name) else "invalid model name")
        if version is not None:
            entry = versions.get(version)
            if entry is None:
                raise ModelNotFound(f"model '{name}' has no version '{version}'")
            if entry.state != READY:
                raise ModelNotReady(f"model '{name}' version {version} is not ready: {entry.reason}")
            return entry
        ready = [e for e in versions.values() if e.state == READY]
        if not ready:
            reasons = "; ".join(f"v{e.version}: {e.reason}" for e in versions.values())
            raise ModelNotReady(f"model '{name}' has no ready version ({reasons})")
        return max(ready, key=lambda e: int(e.version))

    def versions(self, name: str) -> list[ModelEntry]:
        if name not in self._models:
            raise ModelNotFound(f"model '{name}' not found" if _valid(name) else "invalid model name")
        return sorted(self._models[name].values(), key=lambda e: int(e.version))

    def index(self) -> list[ModelStatus]:
        """Every model version on disk or loaded, with its state (Triton's repository index)."""
        rows = [e.status() for versions in self._models.values() for e in versions.values()]
        loaded = set(self._models)
        for name in self.names_on_disk():
            if name not in loaded and _valid(name):
                rows += [ModelStatus(name, str(v), UNAVAILABLE, "unloaded") for v in package_versions(self.store, name)]
        return sorted(rows, key=lambda r: (r.name, int(r.version)))

    def any_ready(self) -> bool:
        return any(e.state == READY for versions in self._models.values() for e in versions.values())

    async def close(self, *, timeout: float) -> None:
        """Drain every batcher (finishing queued and in-flight work), then forget the models."""
        async with self._lock:
            entries = [e for versions in self._models.values() for e in versions.values()]
            self._models = {}
        await asyncio.gather(
            *(e.batcher.stop(drain=True, timeout=timeout) for e in entries if e.batcher is not None),
            return_exceptions=True,
        )


def _valid(name: str) -> bool:
    try:
        validate_name(name)
    except ValueError:
        return False
    return True


def _check_name(name: str) -> None:
    if not _valid(name):
        raise ModelNotFound("invalid model name: use letters, digits, '_', '-', '.' (no path separators)")
