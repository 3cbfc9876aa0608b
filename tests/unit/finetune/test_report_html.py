"""report.html (finetune.report_html): from a real tiny run whose labels are markup, and its parts.

The page is parsed with Python's own HTML parser: every label must arrive as text, every image embedded.
tests/e2e/test_ui_browser.py opens the demo run's report in a real browser.
"""

from __future__ import annotations

import base64
import io
import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from finetune.cli import run
from finetune.config import TrainConfig
from finetune.engine import run_training
from finetune.label_metrics import multilabel_metrics
from finetune.report_html import REPORT, confused_pairs, table, write_comparison, write_report
from tests.conftest import make_image_folder

TINY = {"backbone": "mobilenet_v3_small", "weights": "none", "img_size": 32, "workers": 0, "batch_size": 8}
MARKUP = "<b onmouseover=x>bold"  # a folder name (no "/"): labels come from the data's folder names


class Page(HTMLParser):
    """The tags, the text and the images of a page."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.text: list[str] = []
        self.images: list[dict[str, str | None]] = []
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        if tag == "img":
            self.images.append(dict(attrs))

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def _picture(source: str | None) -> Image.Image:
    assert source is not None and source.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(source.split(",", 1)[1])))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real run: three classes (one named with markup), one unreadable file, two epochs, published."""
    root = tmp_path_factory.mktemp("report")
    data = make_image_folder(root / "imgs", {MARKUP: 10, "a&b": 10, "plain": 10})
    (data / "plain" / "broken.png").write_bytes(b"not an image")
    config = TrainConfig(
        data=data, output_dir=root / "runs", model_store=root / "store", tensorboard=False, epochs=2,
        freeze_epochs=0, export_formats=("onnx",), torchserve="none", error_analysis=4, **TINY,  # type: ignore[arg-type]
    )  # fmt: skip
    return run_training(config).run_dir


def test_a_run_writes_its_report_with_every_section(run_dir: Path) -> None:
    page = Page((run_dir / REPORT).read_text(encoding="utf-8"))
    text = " ".join(page.text)
    for heading in ("Summary", "Configuration", "Data", "Training curves", "Confusion matrix (test split)",
                    "Per class", "Export checks", "Worst mistakes"):  # fmt: skip
        assert heading in text, heading
    assert "broken.png" in text and "1 file(s) skipped" in text
    alts = [image["alt"] for image in page.images]
    assert "training curves" in alts and "confusion matrix of the test split" in alts
    for image in page.images:
        assert _picture(image["src"]).size[0] > 100  # embedded, decodable: the page stands alone
    assert "script" not in page.tags


def test_labels_are_text_not_markup(run_dir: Path) -> None:
    source = (run_dir / REPORT).read_text(encoding="utf-8")
    page = Page(source)
    assert "b" not in page.tags  # the label did not become an element
    assert MARKUP in " ".join(page.text) and "a&b" in page.text  # but reads as itself
    assert "&lt;b onmouseover=x&gt;bold" in source


def test_the_report_can_be_made_again_from_the_folder(run_dir: Path) -> None:
    first = (run_dir / REPORT).read_text(encoding="utf-8")
    (run_dir / REPORT).unlink()
    assert write_report(run_dir) == run_dir / REPORT
    assert (run_dir / REPORT).read_text(encoding="utf-8") == first


def test_finetune_report_makes_it_again_and_refuses_other_folders(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (run_dir / REPORT).unlink()
    with pytest.raises(SystemExit) as exited:
        run(["report", str(run_dir)])
    assert exited.value.code == 0 and (run_dir / REPORT).is_file()
    assert capsys.readouterr().out.strip() == str(run_dir / REPORT)
    with pytest.raises(SystemExit) as exited:
        run(["report", str(run_dir), str(tmp_path)])
    assert exited.value.code == 2 and not (tmp_path / REPORT).exists()


def test_a_linear_probe_says_why_it_has_no_curves(run_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "metrics.json").write_text('{"test": {}, "history": []}', encoding="utf-8")
    page = Page(write_report(tmp_path).read_text(encoding="utf-8"))
    assert "no curves" in " ".join(page.text) and page.images == []


def test_a_multilabel_report_has_per_label_counts(tmp_path: Path) -> None:
    """The metrics a multi-label run stores (finetune.label_metrics), with a label that is markup."""
    labels = ("a", "b", "<c>")
    truth = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=bool)
    probs = np.array([[0.9, 0.2, 0.7], [0.1, 0.8, 0.6], [0.6, 0.4, 0.1], [0.3, 0.1, 0.9]])
    test = multilabel_metrics(truth, probs, probs >= 0.5, labels)
    (tmp_path / "metrics.json").write_text(json.dumps({"test": test, "history": []}), encoding="utf-8")
    page = Page(write_report(tmp_path).read_text(encoding="utf-8"))
    text = " ".join(page.text)
    assert "Per label (multi-label):" in text and "multilabel" in page.text and "<c>" in page.text
    assert "c" not in page.tags and "ap" in page.text  # per class: precision, recall, F1, support, AP


def test_confused_pairs_largest_first_with_the_share_of_the_true_class() -> None:
    test = {"labels": ["a", "b", "c"], "confusion_matrix": [[5, 1, 0], [3, 1, 0], [0, 0, 4]]}
    assert confused_pairs(test) == [("b", "a", 3, "75.0%"), ("a", "b", 1, "16.7%")]


def test_tables_escape_text_and_align_numbers() -> None:
    html = table(("<h>", "n"), [("<i>", 3), ("x", 0.5), ("y", 5e-6)])
    assert "&lt;h&gt;" in html and "&lt;i&gt;" in html and "<i>" not in html
    assert '<td class="n">3</td>' in html and '<td class="n">0.5000</td>' in html and "5e-06" in html


def test_the_comparison_page_links_each_run(tmp_path: Path) -> None:
    Image.new("RGB", (120, 80)).save(tmp_path / "comparison.png")
    path = write_comparison(tmp_path, ["backbone", "test accuracy"], [["<x>", "0.9"]], ["x/report.html"])
    page = Page(path.read_text(encoding="utf-8"))
    assert "<x>" in page.text and "x" not in page.tags and len(page.images) == 1
    assert 'href="x/report.html"' in path.read_text(encoding="utf-8")
