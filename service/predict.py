"""``predict``: classify a folder, glob or list of images offline with a model package, no server.

predict --package model_store/flowers/2 ./new_photos --out predictions.csv
predict --package model_store/flowers/2 'photos/**/*.jpg' --out predictions.jsonl --top-k 3
predict --package model_store/flowers/2 list.csv --root /data/photos --out predictions.csv --resume

The server's code path without the server: the package is loaded, checked and given its backend and
precision by :func:`service.repository.open_package` (as ``serve`` does), images are decoded with
:func:`service.preprocess.preprocess_bytes`, and answers come from the package's task
(:mod:`service.tasks`). Decoding runs in a thread pool a few batches ahead of the model, so batch
i+1 decodes while batch i computes; rows are written in input order as their batch finishes.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import logging
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import numpy as np

from service.backends import Backend, LoadOptions
from service.errors import PackageError, ServiceError
from service.manifest import Manifest
from service.predict_output import FORMATS, OutputError, Row, Writer, check_writable, format_for, open_output
from service.predict_sources import Item, SourceError, iter_source
from service.preprocess import DEFAULT_MAX_PIXELS, allow_pixels, preprocess_bytes
from service.registry import BACKEND_CHOICES, PRECISION_CHOICES
from service.repository import open_package

logger = logging.getLogger("service.predict")

AHEAD = 2  # batches decoding beyond the one computing: bounds the images held in memory
MAX_FILE_BYTES = 256 * 1024 * 1024  # a larger "image" is refused before it is read
DEFAULT_TOP_K = 5  # as serve's default_top_k
OUTPUT_HELP = (
    "CSV columns path,labels,scores,error: labels and scores (probabilities, 6 decimals) joined by ';', best "
    "first; error is empty, or for an image that cannot be read (missing, corrupt, not an image, too many pixels) "
    "the reason, with labels and scores empty. JSONL: {path, labels, scores} or {path, error} per line. "
    "Every input gets one row, in input order."
)


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors exit with 1, as every other refusal of ``predict`` does."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(1, f"{self.prog}: error: {message}\n")


def get_args_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="predict",
        description="Classify every image of a folder tree, a glob ('photos/**/*.jpg') or the 'path' column of a "
        "CSV / key of a JSONL file with a model package, as the server would answer, without a server.",
        epilog=OUTPUT_HELP,
    )
    parser.add_argument("source", help="folder, glob (quote it), image, or .csv/.jsonl list with a 'path' column/key")
    parser.add_argument("--package", type=Path, required=True, help="a package folder, e.g. model_store/flowers/2")
    parser.add_argument("--out", type=Path, required=True, help="output file: .csv or .jsonl (or see --format)")
    parser.add_argument("--format", choices=FORMATS, help="output format (default: from the --out suffix)")
    parser.add_argument(
        "--root", type=Path, help="folder that relative paths of a list resolve against (default: the list's folder)"
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="skip the paths already in --out and append the rest "
        "(after an interruption; a half-written last line is cut off)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    _add_engine_arguments(parser)
    return parser


def _add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """How the model runs: serve's choices of backend, precision, device, batching and threads."""
    parser.add_argument(
        "--backend",
        default="auto",
        choices=BACKEND_CHOICES,
        help="auto: the fastest checked engine that reads the package, as serve --backend auto",
    )
    parser.add_argument(
        "--precision",
        default="auto",
        choices=PRECISION_CHOICES,
        help="auto: the fastest precision that passes the package's accuracy guard and its parity "
        "check here, as serve --precision auto",
    )
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    parser.add_argument("--batch-size", type=_positive, default=8, help="images per model run (default 8)")
    parser.add_argument(
        "--top-k",
        type=_positive,
        default=DEFAULT_TOP_K,
        help="labels per image of a multiclass model (default 5); a multi-label or binary model "
        "gives the labels it decides on",
    )
    parser.add_argument(
        "--workers", type=_positive, default=4, help="threads decoding images beside the model (default 4)"
    )
    parser.add_argument(
        "--intra-op-threads", type=int, default=0, help="threads inside one model run; 0: the engine's default"
    )
    parser.add_argument(
        "--intra-op-spinning",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="let ONNX Runtime's threads busy-wait between operators (default on)",
    )
    parser.add_argument(
        "--max-image-pixels",
        type=_positive,
        default=DEFAULT_MAX_PIXELS,
        help="larger images are listed as unreadable (default 40 Mpx)",
    )


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


@dataclass
class Summary:
    """What one run did."""

    images: int = 0  # rows written by this run
    failed: int = 0  # of them, unreadable images
    skipped: int = 0  # already in the output (--resume)
    seconds: float = 0.0

    def add(self, rows: Sequence[Row]) -> None:
        self.images += len(rows)
        self.failed += sum(1 for row in rows if row.error)

    def describe(self) -> str:
        rate = self.images / self.seconds if self.seconds > 0 else 0.0
        return (
            f"{self.images} images in {self.seconds:.1f} s ({rate:.1f} img/s): {self.images - self.failed} "
            f"classified, {self.failed} unreadable, {self.skipped} already in the output"
        )


class Predictor:
    """A loaded package: one image decoded (``decode``), a batch of them answered (``answer``)."""

    def __init__(
        self, manifest: Manifest, backend: Backend, *, top_k: int = DEFAULT_TOP_K, max_pixels: int = DEFAULT_MAX_PIXELS
    ) -> None:
        self.manifest, self.backend = manifest, backend
        self.task = manifest.head
        self.top_k, self.max_pixels = top_k, max_pixels

    def decode(self, item: Item) -> np.ndarray | str:
        """The preprocessed image, or the reason it cannot be read (never raises for a bad file)."""
        if item.error:
            return item.error
        try:
            size = item.file.stat().st_size
            if size > MAX_FILE_BYTES:
                return f"{item.key}: file of {size} bytes is over the limit of {MAX_FILE_BYTES}"
            data = item.file.read_bytes()
        except OSError as exc:
            return f"{item.key}: cannot read the file ({exc.strerror or exc})"
        try:
            return preprocess_bytes(data, self.manifest.preprocess, max_pixels=self.max_pixels, source=item.key)
        except ServiceError as exc:
            return exc.message
        except Exception as exc:  # one odd file must never end a run over a million others
            logger.warning("%s: unexpected decode failure", item.key, exc_info=True)
            return f"{item.key}: cannot decode ({type(exc).__name__}: {exc})"

    def answer(self, items: Sequence[Item], decoded: Sequence[np.ndarray | str]) -> list[Row]:
        """One row per item, in order: the task's answer for each decoded image, the reason for the others."""
        rows = [
            Row(item.key, error=d) if isinstance(d, str) else Row(item.key)
            for item, d in zip(items, decoded, strict=True)
        ]
        good = [i for i, d in enumerate(decoded) if not isinstance(d, str)]
        if good:
            logits = self.backend.run(np.stack([decoded[i] for i in good]))
            answers = self.task.answers(self.task.probabilities(logits), self.top_k)
            for i, answer in zip(good, answers, strict=True):
                rows[i] = Row(items[i].key, tuple(answer), tuple(answer.values()))
        return rows


def predict_items(
    predictor: Predictor,
    items: Iterable[Item],
    writer: Writer,
    *,
    batch_size: int = 8,
    workers: int = 4,
    on_rows: Callable[[int], object] | None = None,
) -> Summary:
    """Classify ``items`` a batch at a time, decoding up to :data:`AHEAD` batches ahead; write rows in order."""
    summary = Summary()
    start = time.perf_counter()
    batches = _chunks(iter(items), batch_size)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="predict-decode")
    pending: deque[tuple[list[Item], list[Future[np.ndarray | str]]]] = deque()
    try:
        _submit(pending, batches, pool, predictor)
        while pending:
            chunk, futures = pending.popleft()
            _submit(pending, batches, pool, predictor)  # the next batches decode while this one computes
            rows = predictor.answer(chunk, [future.result() for future in futures])
            writer.write(rows)
            summary.add(rows)
            if on_rows is not None:
                on_rows(len(rows))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    summary.seconds = time.perf_counter() - start
    return summary


def _chunks(items: Iterator[Item], size: int) -> Iterator[list[Item]]:
    while chunk := list(itertools.islice(items, size)):
        yield chunk


def _submit(
    pending: deque[tuple[list[Item], list[Future[np.ndarray | str]]]],
    batches: Iterator[list[Item]],
    pool: ThreadPoolExecutor,
    predictor: Predictor,
) -> None:
    while len(pending) < AHEAD:
        chunk = next(batches, None)
        if chunk is None:
            return
        pending.append((chunk, [pool.submit(predictor.decode, item) for item in chunk]))


def _not_done(items: Iterable[Item], done: set[str], summary: Summary) -> Iterator[Item]:
    for item in items:
        if item.key in done:
            summary.skipped += 1
        else:
            yield item


def _first(source: str, root: Path | None) -> Iterator[Item]:
    """The source's items, SourceError at once when it is unreadable or holds no image."""
    items = iter_source(source, root=root)
    first = next(items, None)
    if first is None:
        raise SourceError(f"no images found in {source}")
    return itertools.chain([first], items)


def _load(args: argparse.Namespace) -> Predictor:
    options = LoadOptions(intra_op_threads=args.intra_op_threads, intra_op_spinning=args.intra_op_spinning)
    manifest, choice = open_package(
        args.package,
        backend=args.backend,
        precision=args.precision,
        device=args.device,
        options=options,
        batch_sizes=(args.batch_size,),
    )
    backend = choice.backend
    logger.info(
        "%s v%s: %s %s on %s (%s)",
        manifest.name,
        manifest.version,
        backend.name,
        backend.precision,
        backend.device,
        choice.summary or "no other candidate",
    )
    return Predictor(manifest, backend, top_k=args.top_k, max_pixels=args.max_image_pixels)


def main(args: argparse.Namespace) -> int:
    """Run ``predict``; 0 when every image got a row (readable or not), 1 with one line on a usage or package error."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        fmt = format_for(args.out, args.format)
        check_writable(args.out, resume=args.resume, overwrite=args.overwrite)
        items = _first(args.source, args.root)
        allow_pixels(args.max_image_pixels)
        predictor = _load(args)
        writer, done = open_output(args.out, fmt, resume=args.resume, overwrite=args.overwrite)
    except (SourceError, OutputError, PackageError, ValueError, OSError) as exc:
        print(f"predict: {exc}", file=sys.stderr)
        return 1
    summary = Summary()
    try:
        with _progress() as bar:
            found = predict_items(
                predictor,
                _not_done(items, done, summary),
                writer,
                batch_size=args.batch_size,
                workers=args.workers,
                on_rows=bar,
            )
    except (OSError, ValueError) as exc:  # a list unreadable part-way (bad encoding): the rows so far are kept
        print(f"predict: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"predict: interrupted; the rows so far are in {args.out}: add --resume to go on", file=sys.stderr)
        return 130
    finally:
        writer.close()
    found.skipped = summary.skipped
    logger.info("%s; wrote %s", found.describe(), args.out)
    return 0


@contextlib.contextmanager
def _progress() -> Iterator[Callable[[int], object]]:
    """A tqdm bar of images and images/s on a terminal (stderr); a no-op otherwise (the summary is logged)."""
    if not sys.stderr.isatty():
        yield lambda count: None
        return
    from tqdm import tqdm

    with tqdm(unit="img", desc="predict", file=sys.stderr, dynamic_ncols=True) as bar:
        yield bar.update


def run(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point."""
    raise SystemExit(main(get_args_parser().parse_args(argv)))


if __name__ == "__main__":
    run()
