"""``predict`` end to end in-process on the tiny real package (ONNX Runtime): rows, order, errors, resume, exits."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest

from service.backends import load_backend
from service.manifest import load_manifest
from service.predict import AHEAD, Predictor, get_args_parser, main, predict_items
from service.predict_output import Row
from service.predict_sources import Item
from service.preprocess import preprocess_bytes
from tests.unit.service.conftest import TinyStore

ORT = ("--backend", "onnxruntime", "--precision", "fp32", "--device", "cpu")


def _predict(*argv: str) -> int:
    return main(get_args_parser().parse_args(list(argv)))


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture
def photos(tmp_path: Path, png: Callable[..., bytes]) -> Path:
    """photos/<a|b>/<i>.png, nine readable images in all, and one corrupt file."""
    root = tmp_path / "photos"
    for i in range(9):
        folder = root / ("a" if i < 5 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i}.png").write_bytes(png(i, width=40 + 7 * i))
    (root / "a" / "3.png").write_bytes(png(3)[:200])  # truncated
    return root


def _expected(store: TinyStore, files: Sequence[Path], k: int) -> list[dict[str, float]]:
    manifest = load_manifest(store.folder)
    backend = load_backend(store.folder, manifest, requested="onnxruntime", precision="fp32", device="cpu")
    batch = np.stack([preprocess_bytes(f.read_bytes(), manifest.preprocess) for f in files])
    return manifest.head.answers(manifest.head.probabilities(backend.run(batch)), k)


def test_folder_to_csv_answers_in_order_with_error_rows(
    shared_tiny_store: TinyStore, photos: Path, tmp_path: Path
) -> None:
    out = tmp_path / "p.csv"
    assert _predict(str(photos), "--package", str(shared_tiny_store.folder), "--out", str(out), "--top-k", "2",
                    "--batch-size", "2", *ORT) == 0  # fmt: skip
    rows = _rows(out)
    keys = [r["path"] for r in rows]
    assert keys == [f"{photos}/a/{i}.png" for i in range(5)] + [f"{photos}/b/{i}.png" for i in range(5, 9)]
    bad = rows[3]
    assert bad["labels"] == bad["scores"] == "" and bad["error"].startswith(f"{photos}/a/3.png: corrupt or truncated")
    good = [r for r in rows if not r["error"]]
    expected = _expected(shared_tiny_store, [Path(r["path"]) for r in good], 2)
    for row, answer in zip(good, expected, strict=True):
        assert row["labels"].split(";") == list(answer)
        assert [float(s) for s in row["scores"].split(";")] == pytest.approx(list(answer.values()), abs=1e-6)


def test_jsonl_list_relative_paths_missing_and_oversized(
    shared_tiny_store: TinyStore, photos: Path, tmp_path: Path
) -> None:
    listing = photos / "todo.jsonl"
    lines = [{"path": "b/5.png"}, {"path": "a/missing.png"}, {"path": "b/6.png"}]
    listing.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "p.jsonl"
    assert _predict(str(listing), "--package", str(shared_tiny_store.folder), "--out", str(out), *ORT) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["path"] for r in records] == ["b/5.png", "a/missing.png", "b/6.png"]
    assert records[1] == {"path": "a/missing.png", "error": "a/missing.png: cannot read the file (No such file or "
                          "directory)"}  # fmt: skip
    assert len(records[0]["labels"]) == 3 and records[0]["scores"] == sorted(records[0]["scores"], reverse=True)
    small = tmp_path / "small.jsonl"
    assert _predict(str(listing), "--package", str(shared_tiny_store.folder), "--out", str(small),
                    "--max-image-pixels", "1000", *ORT) == 0  # fmt: skip
    errors = [json.loads(line).get("error", "") for line in small.read_text().splitlines()]
    assert "pixels is over the limit of 1000" in errors[0] and "pixels is over the limit" in errors[2]


def test_glob_source(shared_tiny_store: TinyStore, photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "p.csv"
    assert _predict(f"{photos}/**/b/*.png", "--package", str(shared_tiny_store.folder), "--out", str(out), *ORT) == 0
    assert sorted(r["path"] for r in _rows(out)) == [f"{photos}/b/{i}.png" for i in range(5, 9)]


def test_resume_after_a_kill_mid_line_gives_one_row_per_image(
    shared_tiny_store: TinyStore, photos: Path, tmp_path: Path
) -> None:
    out = tmp_path / "p.csv"
    args = (str(photos), "--package", str(shared_tiny_store.folder), "--out", str(out), "--batch-size", "2", *ORT)
    assert _predict(*args) == 0
    whole = out.read_bytes()
    lines = whole.splitlines(keepends=True)
    out.write_bytes(b"".join(lines[:5]) + lines[5][:9])  # header, 4 rows and a half-written fifth
    assert _predict(*args) == 1  # without --resume the output is not clobbered
    assert _predict(*args, "--resume") == 0
    assert out.read_bytes() == whole
    assert _predict(*args, "--resume") == 0  # nothing left: still one row each
    assert out.read_bytes() == whole


class _Recorder:
    def __init__(self) -> None:
        self.rows: list[Row] = []
        self.pulled_at_write: list[int] = []
        self.pulled = 0

    def items(self, items: Sequence[Item]) -> Iterator[Item]:
        for item in items:
            self.pulled += 1
            yield item

    def write(self, rows: Sequence[Row]) -> None:
        self.rows += rows
        self.pulled_at_write.append(self.pulled)

    def close(self) -> None:
        pass


class _SlowFirst(Predictor):
    """Decodes the first image of every batch last, so decodes finish out of order."""

    def decode(self, item: Item) -> np.ndarray | str:
        if item.key.endswith(("0.png", "3.png", "6.png")):
            time.sleep(0.05)
        assert threading.current_thread() is not threading.main_thread()
        return super().decode(item)


def test_rows_keep_input_order_and_decoding_stays_a_few_batches_ahead(
    shared_tiny_store: TinyStore, tmp_path: Path, png: Callable[..., bytes]
) -> None:
    files = []
    for i in range(10):
        files.append(tmp_path / f"{i}.png")
        files[-1].write_bytes(png(i))
    manifest = load_manifest(shared_tiny_store.folder)
    backend = load_backend(shared_tiny_store.folder, manifest, requested="onnxruntime", device="cpu")
    recorder = _Recorder()
    items = [Item(str(f), f) for f in files]
    summary = predict_items(
        _SlowFirst(manifest, backend, top_k=1), recorder.items(items), recorder, batch_size=3, workers=4
    )
    assert [r.path for r in recorder.rows] == [str(f) for f in files]
    assert summary.images == 10 and summary.failed == 0
    expected = _expected(shared_tiny_store, files, 1)
    for row, answer in zip(recorder.rows, expected, strict=True):
        assert row.labels == tuple(answer) and row.scores == pytest.approx(tuple(answer.values()), abs=1e-6)
    written = np.cumsum([3, 3, 3, 1])
    assert all(pulled - done <= (AHEAD + 1) * 3 for pulled, done in zip(recorder.pulled_at_write, written, strict=True))


def _fails(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    with pytest.raises(SystemExit) as exited:
        from service.predict import run

        run(list(argv))
    assert exited.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def test_usage_and_package_errors_exit_1_with_one_line(
    capsys: pytest.CaptureFixture[str], shared_tiny_store: TinyStore, photos: Path, tmp_path: Path
) -> None:
    package, out = str(shared_tiny_store.folder), str(tmp_path / "p.csv")
    assert (
        _fails(capsys, str(photos), "--package", str(tmp_path), "--out", out)
        == f"predict: {tmp_path}: no manifest.json"
    )
    (tmp_path / "empty").mkdir()
    assert _fails(capsys, str(tmp_path / "empty"), "--package", package, "--out", out) == (
        f"predict: no images found in {tmp_path / 'empty'}"
    )
    assert "no such folder" in _fails(capsys, str(tmp_path / "nope"), "--package", package, "--out", out)
    assert "suffix" in _fails(capsys, str(photos), "--package", package, "--out", str(tmp_path / "p.txt"))
    assert "--batch-size" in _fails(capsys, str(photos), "--package", package, "--out", out, "--batch-size", "0")
    tampered = tmp_path / "tampered"
    shutil.copytree(shared_tiny_store.folder, tampered)
    with (tampered / "model.onnx").open("ab") as fh:
        fh.write(b"\0")
    assert "does not match manifest" in _fails(capsys, str(photos), "--package", str(tampered), "--out", out)
    assert not Path(out).exists()


def test_an_onnx_package_never_imports_torch(shared_tiny_store: TinyStore, photos: Path, tmp_path: Path) -> None:
    script = (
        "import sys\n"
        "from service.predict import get_args_parser, main\n"
        "code = main(get_args_parser().parse_args(sys.argv[1:]))\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "sys.exit(code)\n"
    )
    out = tmp_path / "p.csv"
    argv = [str(photos), "--package", str(shared_tiny_store.folder), "--out", str(out), "--device", "cpu"]
    done = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert len(_rows(out)) == 9 and "9 images in" in done.stderr
