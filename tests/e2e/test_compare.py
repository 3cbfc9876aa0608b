"""``finetune compare`` end to end: two tiny backbones on generated images, every column filled."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from finetune import cli
from finetune.compare import COLUMNS
from service.manifest import load_manifest
from tests.conftest import make_image_folder

pytestmark = pytest.mark.e2e
ARGS = [
    "--weights", "none", "--img-size", "32", "--epochs", "1", "--batch-size", "8", "--workers", "0",
    "--val-split", "0.25", "--test-split", "0.25", "--tensorboard", "false", "--export-formats", "onnx",
    "--torchserve", "none", "--latency-runs", "3",
]  # fmt: skip


def test_compare_two_backbones(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = make_image_folder(tmp_path / "imgs", {"red": 6, "green": 6}, size=32)
    argv = ["compare", "--backbones", "resnet18,mobilenet_v3_small", "--data", str(data)]
    with pytest.raises(SystemExit) as exit_info:
        cli.run([*argv, *ARGS, "--output-dir", str(tmp_path / "runs"), "--model-store", str(tmp_path / "store")])
    assert exit_info.value.code == 0
    (out_dir,) = (tmp_path / "runs").glob("compare-*")
    with (out_dir / "comparison.csv").open(encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert [row["backbone"] for row in rows] == ["resnet18", "mobilenet_v3_small"]
    for row in rows:
        assert list(row) == list(COLUMNS)
        assert all(value not in ("", "nan") for value in row.values()), row
        for key in ("parameters", "gflops", "train_time_s", "train_images_per_s", "onnx_mb", "latency_ms"):
            assert float(row[key]) > 0, key
        manifest = load_manifest(Path(row["package"]))
        assert manifest.name == f"imgs-{row['backbone']}"
        assert manifest.extra["explain"] == "cam.pt" and "cam.pt" in manifest.files  # CNNs get Grad-CAM
    markdown = (out_dir / "comparison.md").read_text(encoding="utf-8")
    assert all(header in markdown for header in COLUMNS.values())
    assert (out_dir / "comparison.png").stat().st_size > 1000
    page = (out_dir / "report.html").read_text(encoding="utf-8")  # the plot embedded, a link to each run's page
    assert "data:image/png;base64," in page and all(header in page for header in ("GFLOPs", "test accuracy"))
    for backbone in ("resnet18", "mobilenet_v3_small"):
        assert f'href="{backbone}/report.html"' in page and (out_dir / backbone / "report.html").is_file()
    assert (out_dir / "resnet18" / "splits" / "test.txt").read_text() == (
        out_dir / "mobilenet_v3_small" / "splits" / "test.txt"
    ).read_text()  # same split for every backbone
    assert "test accuracy" in capsys.readouterr().out
