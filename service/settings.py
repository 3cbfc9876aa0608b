"""Server settings: typed, frozen, resolved once at the edge (CLI < config file < environment < flags).

Every field can come from a YAML config file (``--config``), an environment variable
``SERVE_<FIELD>`` (upper case), or a command-line flag ``--<field-with-dashes>``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from service.registry import BACKEND_CHOICES as BACKENDS
from service.registry import PRECISION_CHOICES as PRECISIONS
from service.versions import parse_version_policy

EVENT_LOOPS = ("auto", "uvloop", "asyncio")
MODEL_CONTROL_MODES = ("none", "poll", "explicit")
ENV_PREFIX = "SERVE_"


@dataclass(frozen=True)
class Settings:
    """Everything ``serve`` can be told. Defaults are safe: loopback only, management off."""

    model_store: Path = Path("model_store")
    model_control: str = "none"  # none: load the store at start; poll: follow it; explicit: the management API
    poll_interval_s: float = 5.0  # poll mode: seconds between rescans of the store
    version_policy: str = "all"  # which versions of each model are served: all, latest:N, specific:V[,V...]
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 0  # 0: /metrics on the HTTP port
    backend: str = "auto"  # auto: the fastest engine measured at load among those that read the package
    model_backends: dict[str, str] = field(default_factory=dict)  # per model name
    precision: str = "auto"  # auto: the fastest precision that passes the accuracy guard on this host
    model_precisions: dict[str, str] = field(default_factory=dict)  # per model name
    device: str = "auto"  # auto: CUDA when available
    max_batch_size: int = 8
    max_queue_delay_ms: float = 0.0  # Triton-style: batch what is already queued, wait no longer
    max_queue_size: int = 64  # per model version; beyond it requests are refused (429)
    max_queue_wait_ms: float = 350.0  # refuse (429) what could not be answered within this; 0: length bound only
    refusal_pause_ms: float = 250.0  # HTTP: a connection refused 429 is not read again for this long
    model_instances: int = 1  # batches computed concurrently per model version
    decode_workers: int = 4  # threads decoding and preprocessing images beside compute
    intra_op_threads: int = 0  # 0: the backend's default
    intra_op_spinning: bool = True  # ONNX Runtime's threads busy-wait between operators
    max_payload_bytes: int = 16 * 1024 * 1024  # request body / gRPC message cap, equal on every protocol
    max_image_pixels: int = 40_000_000  # decompression-bomb cap
    request_timeout_s: float = 0.0  # 0: no server-side default deadline
    enable_management: bool = False
    management_token: str = ""  # required when management is enabled
    inference_token: str = ""  # optional: when set, inference needs it too
    tls_cert: Path | None = None
    tls_key: Path | None = None
    drain_timeout_s: float = 30.0
    drain_grace_s: float = 5.0  # SIGTERM: not ready but still serving this long, so load balancers notice
    max_connections: int = 1000  # per listener (HTTP, gRPC); beyond it new connections are refused
    grpc_max_concurrent_rpcs: int = 1000  # beyond it gRPC answers RESOURCE_EXHAUSTED
    keep_alive_timeout_s: int = 5  # HTTP: an idle keep-alive connection is closed after this
    header_timeout_s: float = 10.0  # HTTP: a request head must arrive within this (slowloris)
    body_timeout_s: float = 60.0  # HTTP: a request body must arrive within this of its head
    event_loop: str = "auto"  # auto: uvloop when installed, else asyncio's own
    default_top_k: int = 5  # TorchServe-style answers: this many labels
    ui: bool = True  # the page at / (service.http_ui): try a model in a browser, watch the server
    log_level: str = "INFO"

    def __post_init__(self) -> None:
        if not isinstance(logging.getLevelName(self.log_level.upper()), int):
            raise ValueError(f"log_level={self.log_level!r} is not one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
        if self.event_loop not in EVENT_LOOPS:
            raise ValueError(f"event_loop={self.event_loop!r} is not one of {', '.join(EVENT_LOOPS)}")
        _check_choices("backend", self.backend, self.model_backends, BACKENDS)
        _check_choices("precision", self.precision, self.model_precisions, PRECISIONS)
        if self.max_batch_size < 1 or self.max_queue_size < 1 or self.model_instances < 1:
            raise ValueError("max_batch_size, max_queue_size and model_instances must be at least 1")
        for name in ("max_queue_wait_ms", "refusal_pause_ms"):
            value = getattr(self, name)
            if not (value >= 0 and value != float("inf")):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        _check_model_control(self)
        _check_connections(self)
        if self.enable_management and not self.management_token:
            raise ValueError("enable_management needs a management_token (SERVE_MANAGEMENT_TOKEN)")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both tls_cert and tls_key")

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    def backend_for(self, model: str) -> str:
        return self.model_backends.get(model, self.backend)

    def precision_for(self, model: str) -> str:
        return self.model_precisions.get(model, self.precision)

    def public_dict(self) -> dict[str, Any]:
        """Settings for logs, tokens masked."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for secret in ("management_token", "inference_token"):
            data[secret] = "***" if data[secret] else ""
        return {k: str(v) if isinstance(v, Path) else v for k, v in data.items()}


def _check_model_control(settings: Settings) -> None:
    """Model control settings; ``explicit`` turns the management API on (it then needs its token)."""
    if settings.model_control not in MODEL_CONTROL_MODES:
        raise ValueError(f"model_control={settings.model_control!r} is not one of {', '.join(MODEL_CONTROL_MODES)}")
    if not settings.poll_interval_s > 0 or settings.poll_interval_s == float("inf"):
        raise ValueError(f"poll_interval_s must be a number of seconds > 0, got {settings.poll_interval_s}")
    parse_version_policy(settings.version_policy)
    if settings.model_control == "explicit":
        object.__setattr__(settings, "enable_management", True)  # frozen: set once, while being built


def _check_connections(settings: Settings) -> None:
    """Drain and connection bounds: counts at least 1, times finite and >= 0 (the read timeouts > 0)."""
    if settings.max_connections < 1 or settings.grpc_max_concurrent_rpcs < 1:
        raise ValueError("max_connections and grpc_max_concurrent_rpcs must be at least 1")
    for name in ("drain_timeout_s", "drain_grace_s", "keep_alive_timeout_s", "header_timeout_s", "body_timeout_s"):
        value = getattr(settings, name)
        least = 0.001 if name in ("header_timeout_s", "body_timeout_s") else 0
        if not least <= value < float("inf"):
            raise ValueError(f"{name} must be a number of seconds >= {least:g}, got {value}")


def _check_choices(name: str, value: str, per_model: Mapping[str, str], choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(choices)}")
    for model, choice in per_model.items():
        if choice not in choices:
            raise ValueError(f"model_{name}s[{model}]={choice!r} is not one of {', '.join(choices)}")


def _coerce(name: str, value: Any) -> Any:
    """Turn a string or YAML value into the field's type."""
    kind = Settings.__dataclass_fields__[name].type
    if value is None:
        return None
    if "Path" in str(kind):
        return Path(value) if str(value) else None
    if kind == "bool" and isinstance(value, str):
        return _parse_bool(name, value)
    if "dict" in str(kind):
        return _parse_mapping(value)
    for text, cast in (("int", int), ("float", float), ("bool", bool)):
        if kind == text:
            return cast(value)
    return str(value)


def _parse_bool(name: str, text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected true/false (1/0, yes/no, on/off), got {text!r}")


def _coerce_named(name: str, value: Any) -> Any:
    try:
        return _coerce(name, value)
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from exc


def _parse_mapping(value: Any) -> dict[str, str]:
    if isinstance(value, Mapping):
        return {str(k): str(v) for k, v in value.items()}
    pairs = [item.split("=", 1) for item in str(value).split(",") if item.strip()]
    if any(len(pair) != 2 for pair in pairs):
        raise ValueError(f"expected model=value[,model=value], got {value!r}")
    return {k.strip(): v.strip() for k, v in pairs}


def from_sources(
    *, flags: Mapping[str, Any], environ: Mapping[str, str] | None = None, config_file: Path | None = None
) -> Settings:
    """Resolve settings: defaults < config file < environment (SERVE_*) < command-line flags."""
    known = set(Settings.__dataclass_fields__)
    values: dict[str, Any] = {}
    if config_file is not None:
        loaded = yaml.safe_load(config_file.read_text(encoding="utf-8")) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{config_file}: expected a mapping of setting names to values")
        values.update({str(k).replace("-", "_"): v for k, v in loaded.items()})
    env = os.environ if environ is None else environ
    values.update({k[len(ENV_PREFIX) :].lower(): v for k, v in env.items() if k.startswith(ENV_PREFIX)})
    values.update({k: v for k, v in flags.items() if v is not None})
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown settings: {', '.join(unknown)}")
    return Settings(**{k: _coerce_named(k, v) for k, v in values.items()})
