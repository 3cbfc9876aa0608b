"""``serve``: serve every package in a model store over KServe v2 (HTTP + gRPC) and TorchServe's API.

serve --model-store ./model_store
serve --config serve.yaml --http-port 8080     # file < SERVE_* environment < flags
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from service.registry import BACKEND_CHOICES as BACKENDS
from service.registry import PRECISION_CHOICES as PRECISIONS
from service.settings import EVENT_LOOPS, Settings, from_sources

logger = logging.getLogger("service")

HELP = {
    "model_store": "folder of <name>/<version>/ packages (default model_store); must exist unless --model-control poll",
    "model_control": "none: load the store at start (default); poll: rescan it every --poll-interval-s, loading "
    "new versions and draining removed ones; explicit: load at start, then the management API loads and unloads "
    "(implies --enable-management)",
    "poll_interval_s": "poll mode: seconds between rescans of the model store (default 5)",
    "version_policy": "versions of each model to serve: all (default), latest:N or specific:V[,V...]",
    "host": "address to bind; loopback by default, 0.0.0.0 to listen on every interface",
    "http_port": "HTTP port: KServe v2, TorchServe /predictions, /metrics (default 8000)",
    "grpc_port": "gRPC port: inference.GRPCInferenceService and TorchServe's InferenceAPIsService (default 8001)",
    "metrics_port": "serve /metrics on its own port instead of the HTTP port (default 0: HTTP port)",
    "backend": f"model backend for every model: {', '.join(BACKENDS)} (auto: the fastest, timed at load, of the "
    "installed engines that read the package; TorchScript only for a package without ONNX)",
    "model_backends": "per-model backend, e.g. flowers=torchscript,pets=onnxruntime",
    "precision": f"{', '.join(PRECISIONS)} (auto: the fastest precision this CPU runs well that passes the "
    "package's accuracy guard and its parity check here; a refused one falls back to fp32)",
    "model_precisions": "per-model precision, e.g. flowers=int8,pets=fp32",
    "device": "auto (CUDA when available), cpu, cuda or cuda:N",
    "max_batch_size": "largest batch the dynamic batcher forms, in images (default 8)",
    "max_queue_delay_ms": "how long a batch may wait for more requests; 0 batches what is already queued",
    "max_queue_size": "requests waiting per model version (being decoded or queued) before new ones are refused "
    "with 429 (default 64)",
    "max_queue_wait_ms": "refuse with 429 a request that could not be answered within this many ms (or its "
    "deadline), judged from the measured service time and the work ahead; 0: the length bound only (default 350)",
    "refusal_pause_ms": "HTTP: after refusing a request with 429, leave that connection's next request unread this "
    "many ms (backpressure on clients that retry at once instead of honouring Retry-After); 0: off (default 250)",
    "model_instances": "batches computed concurrently per model version (default 1)",
    "decode_workers": "threads decoding and preprocessing images beside the model (default 4)",
    "intra_op_threads": "threads inside one model run; 0 leaves the backend's default",
    "intra_op_spinning": "let ONNX Runtime's threads busy-wait between operators (default on: fastest on dedicated "
    "CPUs; turn off when the server shares its CPUs or runs under a CPU quota)",
    "max_payload_bytes": "largest request body or gRPC message, equal on every protocol (default 16 MiB)",
    "max_image_pixels": "largest decoded image, against decompression bombs (default 40 Mpx)",
    "request_timeout_s": "default deadline for requests that carry none; 0 for none",
    "enable_management": "enable the model repository API (load/unload/index); needs --management-token",
    "management_token": "bearer token for the management API (prefer SERVE_MANAGEMENT_TOKEN)",
    "inference_token": "if set, inference requests need this bearer token too (prefer SERVE_INFERENCE_TOKEN)",
    "tls_cert": "PEM certificate: serve HTTPS and gRPC over TLS (with --tls-key)",
    "tls_key": "PEM private key for --tls-cert",
    "drain_timeout_s": "on SIGTERM, after the grace period, how long to let accepted requests finish (default 30)",
    "drain_grace_s": "on SIGTERM, report not ready (/v2/health/ready 503, ServerReady false, /ping Unhealthy) but "
    "keep serving this many seconds so load balancers stop sending, then close the listeners (default 5; 0: "
    "close at once; a second signal ends it early)",
    "max_connections": "connections open at once per listener (HTTP, gRPC); beyond it HTTP answers a new "
    "connection 503 and closes it, gRPC stops accepting (default 1000)",
    "grpc_max_concurrent_rpcs": "gRPC calls in progress at once; beyond it RESOURCE_EXHAUSTED (default 1000)",
    "keep_alive_timeout_s": "HTTP: close a keep-alive connection idle this many seconds (default 5)",
    "header_timeout_s": "HTTP: close (408) a connection whose request head is not complete this many seconds after "
    "its first byte or its connection; gRPC: the connection handshake bound (default 10)",
    "body_timeout_s": "HTTP: close a connection whose request body is not complete this many seconds after its head "
    "(default 60)",
    "event_loop": f"{', '.join(EVENT_LOOPS)}: the loop HTTP and gRPC share (auto: uvloop when installed)",
    "default_top_k": "labels in TorchServe-style answers (default 5)",
    "ui": "serve the page at / to try a model in a browser and watch the server (default on; behind the "
    "inference token when one is set; --no-ui or --ui false to turn it off)",
    "log_level": "DEBUG, INFO, WARNING or ERROR",
}


class BooleanFlag(argparse.BooleanOptionalAction):
    """``--ui``, ``--no-ui`` and also ``--ui false`` (any value SERVE_UI takes), as the issue and config
    files spell it; the value is checked with the settings, so a typo is refused in one line."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.nargs = "?"

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option: str | None = None
    ) -> None:
        negated = bool(option and option.startswith("--no-"))
        if values is None:
            setattr(namespace, self.dest, not negated)
        elif negated:
            parser.error(f"{option} takes no value")
        else:
            setattr(namespace, self.dest, values)  # a string: service.settings parses it like SERVE_<NAME>


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="serve",
        description="Serve image classifiers from a model store over the Open Inference Protocol v2 (HTTP and "
        "gRPC) and TorchServe's inference API, with dynamic batching and Prometheus metrics. Every setting may "
        "also come from a YAML --config file or an environment variable SERVE_<SETTING>.",
    )
    parser.add_argument("--config", type=Path, help="YAML file of settings (names as below, dashes or _)")
    for field in dataclasses.fields(Settings):
        flag = "--" + field.name.replace("_", "-")
        if field.type == "bool":
            parser.add_argument(flag, action=BooleanFlag, default=None, metavar="BOOL", help=HELP[field.name])
        else:
            parser.add_argument(flag, default=None, metavar=field.name.upper(), help=HELP[field.name])
    return parser


def resolve_settings(args: argparse.Namespace) -> Settings:
    flags: dict[str, Any] = {k: v for k, v in vars(args).items() if k != "config"}
    return from_sources(flags=flags, config_file=args.config)


def main(args: argparse.Namespace) -> int:
    try:
        settings = resolve_settings(args)
    except (ValueError, OSError) as exc:
        print(f"serve: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logger.info("settings %s", settings.public_dict())
    from service.protos import ensure_generated

    ensure_generated()  # the gRPC modules are generated from proto/ at first start if the build did not
    from service.server import serve

    try:
        with asyncio.Runner(loop_factory=loop_factory(settings.event_loop)) as runner:
            runner.run(serve(settings))
    except OSError as exc:
        logger.error("cannot start: %s", exc)
        return 1
    return 0


def loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop for ``uvloop`` (and for ``auto`` when it is installed), else asyncio's default."""
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise OSError("event_loop=uvloop but uvloop is not installed (pip install uvloop)") from None
        return None
    return uvloop.new_event_loop


def run(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point."""
    raise SystemExit(main(get_args_parser().parse_args(argv)))


if __name__ == "__main__":
    run()
