"""Package a published model for TorchServe 0.12: a ``.mar`` archive and the server's ``config.properties``.

    build_mar(Path("model_store/demo/1"), out_dir=Path("model_store"))              # -> model_store/demo.mar
    build_mar(Path("model_store/demo/1"), out_dir=Path("model_store"), fmt="onnx")  # -> model_store/demo-onnx.mar
    # torchserve --start --ncs --model-store model_store --ts-config model_store/config.properties

Archive names: ``<name>.mar`` holds the TorchScript model (the default format), ``<name>-onnx.mar``
the ONNX one; the package version is inside (``MAR-INF/MANIFEST.json`` modelVersion) and a new
build replaces the file atomically. Each archive holds the model file, ``manifest.json``, the
handler ``ts_handler.py``, ``model-config.yaml`` (batching and workers) and the modules the
handler shares with the ``serve`` server under ``service/`` (``SHARED_MODULES``): one copy of the
preprocessing, travelling with the model. ``config.properties`` in ``out_dir`` binds every
address to loopback and loads, per model, the archive built last.
"""

from __future__ import annotations

import ast
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

from finetune.config import TORCHSERVE_MODES
from finetune.publish import PublishError
from service.manifest import MANIFEST_FILE, Manifest, load_manifest, verify_files
from service.registry import BACKENDS, EXPORT_FORMATS, FORMAT_FILES, PRECISION_CHOICES, derived_formats

logger = logging.getLogger(__name__)

FORMATS = EXPORT_FORMATS
DEFAULT_FORMAT = "torchscript"
HANDLER = Path(__file__).resolve().with_name("ts_handler.py")
SERVICE_DIR = Path(__file__).resolve().parents[1] / "service"
# of service/, see _check_closed: the handler's imports and every registered backend's module
SHARED_MODULES = (
    "errors.py",
    "manifest.py",
    "preprocess.py",
    "registry.py",
    "backends.py",
    "parity.py",
    "tasks.py",
    "precision.py",
    "rules.py",
    *(f"{spec.module.rpartition('.')[2]}.py" for spec in BACKENDS.values()),
)
MODEL_CONFIG = "model-config.yaml"
CONFIG_PROPERTIES = "config.properties"
LOOPBACK = "127.0.0.1"
_ARCHIVER_MAIN = "from model_archiver.model_packaging import generate_model_archive; generate_model_archive()"
_SHARED_INIT = '"""The part of imgclf\'s ``service`` package the TorchServe handler uses (shipped in the .mar)."""\n'


class ArchiveError(PublishError):
    """The TorchServe archive could not be built (missing format or tool, archiver failure, bad result)."""


@dataclass(frozen=True)
class Ports:
    """TorchServe's five listeners, all on loopback; the defaults are TorchServe's own."""

    inference: int = 8080
    management: int = 8081
    metrics: int = 8082
    grpc_inference: int = 7070
    grpc_management: int = 7071


def archive_name(name: str, fmt: str) -> str:
    """``<name>.mar`` for TorchScript (the default), ``<name>-<fmt>.mar`` for the others."""
    _check_format(fmt)
    return f"{name}.mar" if fmt == DEFAULT_FORMAT else f"{name}-{fmt}.mar"


def modes_to_formats(mode: str) -> tuple[str, ...]:
    """``--torchserve`` value -> formats to archive; the default format last, so config.properties loads it."""
    if mode not in TORCHSERVE_MODES:
        raise ValueError(f"torchserve={mode!r} is not one of {', '.join(TORCHSERVE_MODES)}")
    return {"none": (), "both": ("onnx", "torchscript")}.get(mode, (mode,))


def archive_for_torchserve(package_dir: Path, *, store: Path, mode: str) -> list[Path]:
    """What ``finetune`` runs after publishing: the archives ``--torchserve`` asks for, written into the store.

    The archive is a by-product of a published package, so what stops it only warns: a format the
    package was not exported in (``--export-formats``), or torch-model-archiver (an optional extra)
    not installed; ``finetune-package`` archives the package later.
    """
    wanted = modes_to_formats(mode)
    formats = [fmt for fmt in wanted if fmt in load_manifest(package_dir).formats]
    for fmt in sorted(set(wanted) - set(formats)):
        logger.warning("no %s TorchServe archive: the package has no %s model (see --export-formats)", fmt, fmt)
    if formats and find_spec("model_archiver") is None:
        logger.warning(
            "no TorchServe archive: torch-model-archiver is not installed (pip install 'imgclf[torchserve]', "
            "then finetune-package %s), or pass --torchserve none",
            package_dir,
        )
        return []
    return [build_mar(package_dir, out_dir=store, fmt=fmt) for fmt in formats]


def build_mar(
    package_dir: Path,
    *,
    out_dir: Path,
    fmt: str = DEFAULT_FORMAT,
    batch_size: int = 8,
    max_batch_delay_ms: int = 50,
    workers: int = 1,
    response_timeout_s: int = 120,
    top_k: int = 5,
    precision: str = "auto",
    ports: Ports | None = None,
) -> Path:
    """Archive the package at ``package_dir`` into ``out_dir/archive_name(...)`` and write ``config.properties``.

    The package is verified (sha256 of every file) first; the archive is checked (handler, model
    and shared modules listed) before it replaces an older one. The files made from the model file
    (an ONNX archive's ``model.int8.onnx``) and the parity set travel with it, so our handler chooses
    and checks the precision (``precision``, as ``serve --precision``) the way ``serve`` does. Raises ArchiveError.
    """
    _check_format(fmt)
    if precision not in PRECISION_CHOICES:
        raise ArchiveError(f"precision {precision!r} is not one of {', '.join(PRECISION_CHOICES)}")
    if min(batch_size, workers, response_timeout_s, top_k) < 1 or max_batch_delay_ms < 0:
        raise ArchiveError("batch_size, workers, response_timeout_s and top_k must be >= 1, max_batch_delay_ms >= 0")
    manifest = _verified_manifest(package_dir, fmt)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / archive_name(manifest.name, fmt)
    staging = Path(tempfile.mkdtemp(prefix=".mar-staging-", dir=out_dir))  # same file system: rename is atomic
    try:
        extra = _stage_extra_files(package_dir, staging / "extra", manifest=manifest, fmt=fmt)
        config = staging / MODEL_CONFIG
        config.write_text(
            model_config_yaml(
                batch_size=batch_size,
                max_batch_delay_ms=max_batch_delay_ms,
                workers=workers,
                response_timeout_s=response_timeout_s,
                top_k=top_k,
                precision=precision,
            ),
            encoding="utf-8",
        )
        built = _run_archiver(manifest, package_dir / FORMAT_FILES[fmt], extra=extra, config=config, staging=staging)
        check_archive(built, model_file=FORMAT_FILES[fmt])
        os.replace(built, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    write_config_properties(out_dir, models={manifest.name: target.name}, ports=ports or Ports(), workers=workers)
    logger.info("TorchServe archive %s (%s, %s v%s)", target, fmt, manifest.name, manifest.version)
    return target


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ArchiveError(f"unknown TorchServe archive format {fmt!r}; choose from {', '.join(FORMATS)}")


def _verified_manifest(package_dir: Path, fmt: str) -> Manifest:
    try:
        manifest = load_manifest(package_dir)
        verify_files(package_dir, manifest)
    except Exception as exc:  # PackageError and friends: the package is not fit to archive
        raise ArchiveError(f"cannot archive {package_dir}: {exc}") from exc
    if fmt not in manifest.formats:
        has = ", ".join(sorted(manifest.formats)) or "no model files"
        raise ArchiveError(f"{package_dir}: no {fmt} model to archive; the package has {has}")
    return manifest


def riders(manifest: Manifest, fmt: str) -> list[str]:
    """Package files that travel with a ``fmt`` model: the files made from it (int8) and the parity set."""
    derived = [manifest.formats[f] for f in derived_formats(fmt) if f in manifest.formats]
    return derived + list(manifest.parity.values())


def _stage_extra_files(package_dir: Path, extra: Path, *, manifest: Manifest, fmt: str) -> Path:
    """A folder whose items the archiver copies into the archive root: manifest.json, riders and service/."""
    shared = extra / "service"
    shared.mkdir(parents=True)
    shutil.copy2(package_dir / MANIFEST_FILE, extra / MANIFEST_FILE)
    for name in riders(manifest, fmt):
        shutil.copy2(package_dir / name, extra / name)
    (shared / "__init__.py").write_text(_SHARED_INIT, encoding="utf-8")
    for module in SHARED_MODULES:
        shutil.copy2(SERVICE_DIR / module, shared / module)
    _check_closed(shared, HANDLER)
    return extra


def _check_closed(shared: Path, handler: Path | None = None) -> None:
    """Every ``service.*`` import of the handler and the shipped modules must itself be shipped, or the
    worker cannot load."""
    shipped = {f"service.{p.stem}" for p in shared.glob("*.py")} | {"service"}
    for path in [*([handler] if handler is not None else []), *sorted(shared.glob("*.py"))]:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            names = _imported_modules(node)
            missing = sorted(n for n in names if n.split(".")[0] == "service" and n not in shipped)
            if missing:
                where = path.name if path == handler else f"service/{path.name}"
                raise ArchiveError(f"{where} imports {missing}, which the TorchServe archive does not ship")


def _imported_modules(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        return [node.module] + [f"{node.module}.{a.name}" for a in node.names if node.module == "service"]
    return []


def _run_archiver(manifest: Manifest, model_file: Path, *, extra: Path, config: Path, staging: Path) -> Path:
    """Run torch-model-archiver (its own temp folder is ``$TMPDIR/<model name>``: keep it private)."""
    if find_spec("model_archiver") is None:
        raise ArchiveError("torch-model-archiver is not installed: pip install 'imgclf[torchserve]'")
    private_tmp = staging / "tmp"
    private_tmp.mkdir()
    cmd = [
        sys.executable, "-c", _ARCHIVER_MAIN,
        "--model-name", manifest.name, "--version", str(manifest.version),
        "--serialized-file", str(model_file), "--handler", str(HANDLER),
        "--extra-files", str(extra), "--config-file", str(config),
        "--export-path", str(staging), "--archive-format", "default", "--force",
    ]  # fmt: skip
    env = {**os.environ, "TMPDIR": str(private_tmp)}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    built = staging / f"{manifest.name}.mar"
    if result.returncode != 0 or not built.is_file():
        output = (result.stderr or result.stdout)[-2000:]
        raise ArchiveError(f"torch-model-archiver failed ({result.returncode}): {output}")
    return built


def check_archive(path: Path, *, model_file: str) -> dict[str, object]:
    """Open a built archive: its MANIFEST must name our handler, the model and config; the files must be there."""
    with zipfile.ZipFile(path) as archive:
        names = set(archive.namelist())
        mar_manifest = json.loads(archive.read("MAR-INF/MANIFEST.json"))
    model = mar_manifest.get("model", {})
    expected = {"handler": HANDLER.name, "serializedFile": model_file, "configFile": MODEL_CONFIG}
    wrong = {k: model.get(k) for k, v in expected.items() if model.get(k) != v}
    needed = {HANDLER.name, model_file, MODEL_CONFIG, MANIFEST_FILE, "service/__init__.py"}
    needed |= {f"service/{m}" for m in SHARED_MODULES}
    if wrong or needed - names:
        raise ArchiveError(f"{path}: bad archive: MANIFEST {wrong or 'ok'}, missing {sorted(needed - names)}")
    result: dict[str, object] = mar_manifest
    return result


def model_config_yaml(
    *,
    batch_size: int,
    max_batch_delay_ms: int,
    workers: int,
    response_timeout_s: int,
    top_k: int,
    precision: str = "auto",
) -> str:
    """TorchServe's per-model config (``--config-file``): batching, workers, our handler's top-k and precision."""
    return (
        "# TorchServe model config written by imgclf (finetune/torchserve.py)\n"
        f"minWorkers: {workers}\nmaxWorkers: {workers}\n"
        f"batchSize: {batch_size}\nmaxBatchDelay: {max_batch_delay_ms}  # milliseconds\n"
        f"responseTimeout: {response_timeout_s}  # seconds\n"
        f"handler:\n  top_k: {top_k}  # labels per answer\n"
        f"  precision: {precision}  # auto, fp32, bf16 or int8, chosen and checked as serve --precision does\n"
    )


def write_config_properties(
    out_dir: Path, *, models: dict[str, str], ports: Ports = Ports(), workers: int = 1, model_store: Path | None = None
) -> Path:
    """Write ``out_dir/config.properties``; ``models`` (name -> archive file) replace those names' entries."""
    path = out_dir / CONFIG_PROPERTIES
    store = (model_store or out_dir).resolve()
    loaded = read_load_models(path, store=store) | models
    load_models = ",".join(f"{name}={archive}" for name, archive in sorted(loaded.items()))
    text = (
        "# TorchServe 0.12 config written by imgclf (finetune/torchserve.py); every archive build rewrites it.\n"
        f"#   torchserve --start --ncs --model-store {store} --ts-config {path.resolve()}\n"
        f"inference_address=http://{LOOPBACK}:{ports.inference}\n"
        f"management_address=http://{LOOPBACK}:{ports.management}\n"
        f"metrics_address=http://{LOOPBACK}:{ports.metrics}\n"
        f"grpc_inference_address={LOOPBACK}\ngrpc_inference_port={ports.grpc_inference}\n"
        f"grpc_management_address={LOOPBACK}\ngrpc_management_port={ports.grpc_management}\n"
        f"model_store={store}\n"
        f"load_models={load_models}\n"
        f"default_workers_per_model={workers}\n"
        "# Archives carry no requirements.txt: the worker uses this Python environment as it is.\n"
        "install_py_dep_per_model=false\n"
        "# Token authorization is off ONLY because every address above is loopback (127.0.0.1), reachable from\n"
        "# this machine alone. Before binding any other address, delete this line: TorchServe then writes\n"
        "# key_file.json and every request needs 'Authorization: Bearer <key>'.\n"
        "disable_token_authorization=true\n"
    )
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    staging.write_text(text, encoding="utf-8")
    os.replace(staging, path)  # a TorchServe starting now reads the old file or the new one, never half
    return path


def read_load_models(path: Path, *, store: Path) -> dict[str, str]:
    """``load_models`` of an existing config.properties as {model name: archive file}, archives still in ``store``."""
    if not path.is_file():
        return {}
    for line in path.read_text(encoding="utf-8").splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() == "load_models":
            pairs = (entry.strip().partition("=") for entry in value.split(","))
            found = {name: archive for name, eq, archive in pairs if eq and name and archive}
            return {name: archive for name, archive in found.items() if (store / archive).is_file()}
    return {}
