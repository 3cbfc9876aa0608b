"""The model repository: every ``<store>/<name>/<version>/`` package, loaded, checked and batched.

A package that fails to load (bad checksum, missing file, broken model) is recorded as
UNAVAILABLE with its reason; the others keep serving. Loading runs in a worker thread so the
event loop keeps answering while a model loads. Which versions are served follows the version
policy; unversioned requests get the default version (:meth:`ModelRepository.default_version`).
:meth:`ModelRepository.sync` makes the loaded versions match the store (poll mode): new versions are
loaded and checked before they take traffic, removed ones drained, then released.
"""

from __future__ import annotations

import asyncio
import logging
import time
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
from service.versions import Signature, choose_default, folder_signature, parse_version_policy, plan_versions
from service.versions import read_default_file as _read_default_file

logger = logging.getLogger(__name__)
READY, UNAVAILABLE, LOADING, UNLOADING = "READY", "UNAVAILABLE", "LOADING", "UNLOADING"


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
    signature: Signature = ()  # the folder as it was read (service.versions.folder_signature)
    # requests holding this entry before they reach its batcher: the data plane counts them, admits new ones
    # with them counted ahead of the queue, and unloading waits for them
    decoding: int = 0

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
        self.policy = parse_version_policy(settings.version_policy)
        self._pins: dict[str, str] = {}  # pinned by the management API
        self._file_pins: dict[str, str | None] = {}  # pinned by <model>/DEFAULT, read when the model is (re)read
        self._defaults: dict[str, str] = {}  # the default version last announced, per model

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
        versions = self._wanted(name)
        if not versions:
            raise ModelNotFound(f"no versions of model '{name}' in the model store (version policy {self.policy})")
        async with self._lock:
            self._file_pins[name] = _read_default_file(self.store / name)
            entries = {v: await self._load_version(name, v) for v in versions}
            old = self._models.get(name, {})
            self._models[name] = entries
            self._note_default(name)
        await self._retire(old.values())

    def _wanted(self, name: str) -> list[str]:
        """The versions of ``name`` on disk that the version policy serves."""
        return [str(v) for v in self.policy.select(package_versions(self.store, name))]

    async def sync(self) -> None:
        """Make the loaded models match the store: load new versions, reload changed ones, drain removed ones."""
        names = {n for n in self.names_on_disk() if _valid(n)} | set(self._models)
        for name in sorted(names):
            await self.sync_model(name)

    async def sync_model(self, name: str) -> None:
        """One model: new versions are loaded and checked before they take traffic; a version that fails to
        load never replaces a working one; versions gone from disk are drained (in-flight requests finish),
        then released, after the new ones are ready."""
        wanted = {v: folder_signature(self.store / name / v) for v in self._wanted(name)}
        async with self._lock:
            current = self._models.get(name, {})
            plan = plan_versions({v: e.signature for v, e in current.items()}, wanted)
            self._file_pins[name] = _read_default_file(self.store / name)
            for version in plan.load:
                await self._add(name, version)
            for version in plan.reload:
                await self._reload(name, version)
            self._note_default(name)
            for version in plan.unload:
                await self._drop(name, version)
            if name in self._models and not self._models[name]:
                self._forget(name)

    async def _add(self, name: str, version: str) -> None:
        placeholder = ModelEntry(name, version, self.store / name / version)  # LOADING in the index meanwhile
        self._models.setdefault(name, {})[version] = placeholder
        self._models[name][version] = await self._load_version(name, version)

    async def _reload(self, name: str, version: str) -> None:
        old = self._models[name][version]
        new = await self._load_version(name, version, transition="reload")
        if new.state != READY and old.state == READY:
            logger.error("model %s version %s keeps serving what it had loaded: %s", name, version, new.reason)
            old.signature = new.signature  # retried when the folder changes again, not at every poll
            return
        self._models[name][version] = new
        await self._retire([old], forget=False)

    async def _drop(self, name: str, version: str) -> None:
        entry = self._models[name][version]
        entry.state = UNLOADING  # no new request gets it; the ones holding it finish
        self._note_default(name)
        await self._retire([entry])
        del self._models[name][version]

    def _forget(self, name: str) -> None:
        self._models.pop(name, None)
        self._file_pins.pop(name, None)
        self._defaults.pop(name, None)
        logger.info("model %s unloaded: the store holds no version of it to serve", name)

    async def _load_version(self, name: str, version: str, *, transition: str = "load") -> ModelEntry:
        entry = ModelEntry(name, version, self.store / name / version)
        entry.signature = folder_signature(entry.path)
        started = time.monotonic()
        try:
            manifest, choice = await asyncio.to_thread(_load_package, entry.path, self.settings, name)
            backend = choice.backend
            entry.batcher = Batcher(backend.run, self._batcher_config(), model=name, version=version)
            await entry.batcher.start()
            entry.manifest, entry.backend, entry.state, entry.reason = manifest, backend, READY, choice.reason
            entry.choice = choice.summary
            logger.info(
                "model %s version %s ready in %.1fs: %s %s on %s (%s)",
                name,
                version,
                time.monotonic() - started,
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
        outcome = "success" if entry.state == READY else "failure"
        metrics.MODEL_TRANSITIONS.labels(name, version, transition, outcome).inc()
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
        self._defaults.pop(name, None)
        await self._retire(old.values())
        logger.info("model %s unloaded", name)

    async def _retire(self, entries: Iterable[ModelEntry], *, forget: bool = True) -> None:
        """Drain each entry: wait for requests holding it to reach its batcher, let the batcher finish them."""
        for entry in list(entries):
            state, entry.state = entry.state, UNLOADING
            deadline = time.monotonic() + self.settings.drain_timeout_s
            # a request holds the entry without an await only between get() and the data plane's decode count,
            # and from the end of decoding to the batcher's queue: so decoding == 0 means all are queued
            while entry.decoding > 0 and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
            if entry.batcher is not None:
                await entry.batcher.stop(drain=True, timeout=max(0.0, deadline - time.monotonic()))
            current = self._models.get(entry.name, {}).get(entry.version)
            if forget and (current is None or current is entry):
                metrics.forget_model(entry.name, entry.version)
            if state != LOADING:
                metrics.MODEL_TRANSITIONS.labels(entry.name, entry.version, "unload", "success").inc()
                logger.info("model %s version %s unloaded", entry.name, entry.version)

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
        default = self.default_version(name)
        if default is None:
            reasons = "; ".join(f"v{e.version}: {e.reason or e.state}" for e in versions.values())
            raise ModelNotReady(f"model '{name}' has no ready version ({reasons})")
        return versions[default]

    def default_version(self, name: str) -> str | None:
        """The version unversioned requests get: the pinned one (management API, else ``<model>/DEFAULT``)
        if it is READY, else the newest READY one; None when none is ready."""
        ready = [v for v, e in self._models.get(name, {}).items() if e.state == READY]
        return choose_default(ready, self.pinned_version(name))

    def pinned_version(self, name: str) -> str | None:
        return self._pins.get(name) or self._file_pins.get(name)

    def pin_default(self, name: str, version: str | None) -> None:
        """Pin ``version`` (READY) as ``name``'s default; None removes the management pin."""
        entries = self._models.get(name)
        if entries is None:
            raise ModelNotFound(f"model '{name}' not found" if _valid(name) else "invalid model name")
        if version is None:
            self._pins.pop(name, None)
        elif version not in entries:
            raise ModelNotFound(f"model '{name}' has no version '{version}'")
        elif entries[version].state != READY:
            raise ModelNotReady(f"model '{name}' version {version} is not ready: {entries[version].reason}")
        else:
            self._pins[name] = version
        logger.info("model %s: default version pinned to %s", name, version or "none (newest ready)")
        self._note_default(name)

    def _note_default(self, name: str) -> None:
        """Log and count a change of ``name``'s default version."""
        current = self.default_version(name)
        if current == self._defaults.get(name):
            return
        if current is None:
            logger.warning("model %s: no ready version left to answer unversioned requests", name)
            self._defaults.pop(name, None)
            return
        previous = self._defaults.get(name, "none")
        self._defaults[name] = current
        logger.info("model %s: default version %s -> %s", name, previous, current)
        metrics.MODEL_TRANSITIONS.labels(name, current, "default", "success").inc()

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
