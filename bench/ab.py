"""A/B: variants of our server side by side, points interleaved round by round (the medians decide).

python -m bench.ab --store S --model resnet18 \\
    --variant "default=--backend onnxruntime" --variant "nospin=--backend onnxruntime --no-intra-op-spinning" \\
    --concurrency 1,8 --rounds 4

Each variant is ``name=<serve flags>``; upper-case ``ENV=value`` words among them go to the server's environment
(e.g. ``OMP_WAIT_POLICY=PASSIVE``).

``--paired-rounds N`` compares latency at concurrency 1 instead, the way the report's overhead is measured:
per round and variant, blocks of served requests alternate with blocks of the raw pipeline in this process
(decode + preprocess + ONNX Runtime at batch 1), and the medians over the rounds are printed.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import shlex
import statistics
from pathlib import Path

from bench.__main__ import _images, newest_version
from bench.clients import PROTOCOLS, make_client
from bench.loadgen import closed_loop
from bench.raw import RawSampler
from bench.servers import Running, start_serve
from bench.serving import PROBE_CLIENT, interleaved, shuffled

logger = logging.getLogger("bench.ab")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", type=Path, required=True, help="model store to serve")
    parser.add_argument("--model", required=True)
    parser.add_argument("--variant", action="append", required=True, help="name=<serve flags> (repeat)")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="v2-http")
    parser.add_argument("--concurrency", default="1,8", help="closed-loop levels, comma separated")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--duration", type=float, default=4.0, help="seconds measured per point")
    parser.add_argument("--paired-rounds", type=int, default=0, help="compare c=1 latency against the raw pipeline")
    return parser


def _start(name: str, spec: str, *, store: Path, model: str, work: Path) -> Running:
    """One variant's ``serve``: upper-case ``ENV=value`` words of ``spec`` go to its environment, the rest are flags."""
    words = shlex.split(spec)
    assignments = [w for w in words if re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", w)]
    env = dict(w.split("=", 1) for w in assignments)
    flags = [w for w in words if w not in assignments]
    return start_serve(store, model=model, work=work, label=f"ab-{name}", flags=flags, env=env)


async def _rounds(servers: dict[str, Running], args: argparse.Namespace) -> dict[tuple[str, int], list[float]]:
    images = _images()
    found: dict[tuple[str, int], list[float]] = {}
    levels = [int(c) for c in args.concurrency.split(",")]
    for _ in range(args.rounds):
        for level in levels:
            for name, server in servers.items():
                client = make_client(args.protocol, server.endpoint, model=args.model, images=images, concurrency=level)
                try:
                    result = await closed_loop(client.send, concurrency=level, duration_s=args.duration, warmup_s=1.0)
                finally:
                    await client.aclose()
                found.setdefault((name, level), []).append(result.throughput)
                found.setdefault((name, -level), []).append(result.p50_ms)
    return found


async def _paired(servers: dict[str, Running], args: argparse.Namespace) -> dict[str, list[dict[str, float]]]:
    images = _images()
    package = newest_version(args.store / args.model)
    sampler = RawSampler(package, images, backends=("onnxruntime",), batch_sizes=(1,), duration_s=1.0)
    found: dict[str, list[dict[str, float]]] = {}
    for round_ in range(args.paired_rounds):
        for name in shuffled(list(servers), round_):
            server = servers[name]
            client = make_client(args.protocol, server.endpoint, model=args.model, images=images, concurrency=1,
                                 http=PROBE_CLIENT)  # fmt: skip
            try:
                pair = await interleaved(client.send, lambda i: sampler.jpeg_step("onnxruntime", i),
                                         duration_s=args.duration, warmup_s=1.0, timeout_s=30.0)  # fmt: skip
            finally:
                await client.aclose()
            found.setdefault(name, []).append(pair)
    return found


def _print_paired(found: dict[str, list[dict[str, float]]]) -> None:
    for name, pairs in found.items():
        overhead = [p["overhead_ms"] for p in pairs]
        beyond = [p["beyond_decode_ms"] for p in pairs]
        served = statistics.median(p["served_p50_ms"] for p in pairs)
        print(f"{name:16s} c=1 p50 {served:6.2f} ms  overhead {statistics.median(overhead):5.2f} ms "
              f"(rounds: {' '.join(f'{v:.2f}' for v in overhead)})  beyond decode {statistics.median(beyond):5.2f} ms "
              f"(rounds: {' '.join(f'{v:.2f}' for v in beyond)})")  # fmt: skip


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    work = Path(args.store).resolve().parent
    servers: dict[str, Running] = {}
    try:
        for spec in args.variant:
            name, _, flags = spec.partition("=")
            servers[name] = _start(name, flags, store=args.store, model=args.model, work=work)
        if args.paired_rounds:
            _print_paired(asyncio.run(_paired(servers, args)))
            return 0
        found = asyncio.run(_rounds(servers, args))
    finally:
        for server in servers.values():
            server.stop()
    for (name, level), values in sorted(found.items()):
        if level > 0:
            p50 = statistics.median(found[(name, -level)])
            runs = " ".join(f"{v:.1f}" for v in values)
            print(f"{name:16s} c={level:<3d} {statistics.median(values):7.1f} req/s (rounds: {runs})  p50 {p50:.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(get_args_parser().parse_args()))
