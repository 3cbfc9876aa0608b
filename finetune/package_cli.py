"""``finetune-package``: archive a published package for TorchServe 0.12 (``.mar`` + ``config.properties``).

finetune-package model_store/demo/1                      # -> model_store/demo.mar (TorchScript)
finetune-package model_store/demo/1 --format onnx        # -> model_store/demo-onnx.mar
finetune-package model_store/demo/1 --format both --out-dir ts_store --http-port 9080
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

from finetune.torchserve import FORMATS, ArchiveError, Ports, build_mar, modes_to_formats
from service.registry import PRECISION_CHOICES

logger = logging.getLogger("finetune")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="finetune-package",
        description="Build TorchServe archives from a package folder model_store/<name>/<version>/: <name>.mar "
        "(TorchScript) and/or <name>-onnx.mar, and write config.properties (loopback addresses) next to them.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("package", type=Path, help="a published package folder, e.g. model_store/demo/1")
    parser.add_argument("--format", choices=(*FORMATS, "both"), default="torchscript", help="model file to archive")
    parser.add_argument("--out-dir", type=Path, help="TorchServe model store to write into (default: the store)")
    parser.add_argument("--batch-size", type=int, default=8, help="TorchServe batchSize")
    parser.add_argument("--max-batch-delay-ms", type=int, default=50, help="TorchServe maxBatchDelay")
    parser.add_argument("--workers", type=int, default=1, help="TorchServe minWorkers = maxWorkers")
    parser.add_argument("--response-timeout-s", type=int, default=120, help="TorchServe responseTimeout")
    parser.add_argument("--top-k", type=int, default=5, help="labels in each answer")
    parser.add_argument(
        "--precision",
        choices=PRECISION_CHOICES,
        default="auto",
        help="our handler's precision, chosen and checked as serve --precision does (an ONNX archive carries the "
        "package's model.int8.onnx and parity set)",
    )
    parser.add_argument("--http-port", type=int, default=8080, help="inference port; management +1, metrics +2")
    parser.add_argument("--grpc-port", type=int, default=7070, help="gRPC inference port; gRPC management +1")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def main(args: argparse.Namespace) -> int:
    """Build the archives; returns the process exit code."""
    package: Path = args.package
    out_dir: Path = args.out_dir or package.resolve().parents[1]
    ports = Ports(args.http_port, args.http_port + 1, args.http_port + 2, args.grpc_port, args.grpc_port + 1)
    try:
        for fmt in modes_to_formats(args.format):
            path = build_mar(
                package,
                out_dir=out_dir,
                fmt=fmt,
                batch_size=args.batch_size,
                max_batch_delay_ms=args.max_batch_delay_ms,
                workers=args.workers,
                response_timeout_s=args.response_timeout_s,
                top_k=args.top_k,
                precision=args.precision,
                ports=ports,
            )
            print(f"archived: {path}")
    except ArchiveError as exc:
        logger.error("%s", exc)
        return 2
    print(f"serve it: torchserve --start --ncs --model-store {out_dir} --ts-config {out_dir / 'config.properties'}")
    return 0


def run(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point."""
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    raise SystemExit(main(args))


if __name__ == "__main__":
    run()
