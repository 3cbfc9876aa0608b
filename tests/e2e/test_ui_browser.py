"""The page at ``/`` in a real browser (Debian's chromium, headless, driven by Selenium through its
chromium-driver) against a real ``serve`` with the demo package, and the demo run's report.html.

Each state leaves a screenshot in ``test-artifacts/ui/`` (ignored by git). Without chromium the tests
skip, except where ``CI`` is set (.ci/run installs the browser): there a missing browser fails them.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from service.manifest import MANIFEST_FILE
from tests.conftest import DEMO_DATA
from tests.e2e.conftest import Package, Server, start_server

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts" / "ui"
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
PHOTO = DEMO_DATA / "birds" / "adelaide-rosella.jpg"
MARKUP_LABELS = ["<script>window.__labelRan = 1</script>", '<img src=x onerror="window.__labelRan = 2">']
WAIT_S = 30
CAPS = ("--max-payload-bytes", "1000000", "--max-image-pixels", "4000000")  # small, for the refusals


def _need_browser() -> None:
    """Skip without the browser, but fail in CI, where .ci/run installs it: a green run must have run these."""
    missing = [name for name, path in (("chromium", CHROMIUM), ("chromedriver", CHROMEDRIVER)) if path is None]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip install -e '.[test]')")
    if missing:
        reason = f"no {', '.join(missing)}: apt-get install chromium chromium-driver (.ci/run does)"
        if os.environ.get("CI"):
            pytest.fail(f"CI is set but the browser tests cannot run: {reason}")
        pytest.skip(reason)


@pytest.fixture(scope="session", autouse=True)
def _browser_installed() -> None:
    """Before any other fixture of these tests (the demo package takes minutes): is there a browser to drive?"""
    _need_browser()


@pytest.fixture(scope="module")
def store(demo_package: Package, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo package; a copy named ``markup`` whose first labels are markup; and a copy named ``tags`` served
    as a multi-label model (each label on its own at a 0.5 threshold). Their files are hard links."""
    root = tmp_path_factory.mktemp("ui-store")
    demo = demo_package.store / demo_package.name / "1"
    shutil.copytree(demo, root / "demo" / "1", copy_function=os.link)
    _variant(demo, root, "markup", labels=MARKUP_LABELS)
    _variant(demo, root, "tags", task="multilabel", thresholds=[0.5] * 5)
    return root


def _variant(demo: Path, root: Path, name: str, *, labels: list[str] | None = None, **changes: Any) -> None:
    shutil.copytree(demo, root / name / "1", copy_function=os.link)
    manifest_path = root / name / "1" / MANIFEST_FILE
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    manifest_path.unlink()  # a hard link: write a new file, not through the demo's
    manifest |= {"name": name, **changes}
    manifest["labels"][: len(labels or [])] = labels or []
    manifest_path.write_text(json.dumps(manifest), encoding="utf-8")


@pytest.fixture(scope="module")
def server(store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("serve-ui") / "serve.log"
    running = start_server(store, log, "--backend", "onnxruntime", *CAPS)
    yield running
    assert running.stop() == 0, log.read_text()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root, where Chromium's sandbox cannot start
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1280,1300",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    driver.set_script_timeout(WAIT_S)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    yield driver
    driver.quit()


def _wait(browser: Any, condition: Any) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, WAIT_S).until(condition)


def _by_id(browser: Any, element_id: str) -> Any:
    return browser.find_element("id", element_id)


def _console_errors(browser: Any, *, expected_status: int | None = None) -> list[dict[str, Any]]:
    """Severe console entries since the last call, but for the network line of an error status the test asked
    for (Chrome logs every 4xx answer of fetch(), even one the page handles)."""
    entries = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    expected = f"status of {expected_status}" if expected_status else None
    return [e for e in entries if not (expected and e["source"] == "network" and expected in e["message"])]


def _shot(browser: Any, name: str) -> None:
    browser.save_screenshot(str(ARTIFACTS / f"{name}.png"))
    print(f"screenshot: {ARTIFACTS / name}.png")


def _open(browser: Any, server: Server) -> None:
    browser.get(server.url + "/")
    _wait(browser, lambda b: _by_id(b, "models-section").get_attribute("data-loaded") == "true")


def _try(browser: Any, model: str, path: Path) -> str:
    browser.find_element("css selector", f'#models tr[data-model="{model}"] button.try').click()
    _by_id(browser, "file").send_keys(str(path))
    _wait(browser, lambda b: _by_id(b, "try-section").get_attribute("data-state") in ("answered", "failed"))
    return str(_by_id(browser, "try-section").get_attribute("data-state"))


def _api_answers(server: Server, model: str, image: bytes, count: int) -> httpx.Response:
    """The v2 JSON API's answer for the same image, as any client gets it."""
    body = {
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(image).decode()]}],
        "outputs": [{"name": "probabilities", "parameters": {"classification": count}}],
    }
    return httpx.post(f"{server.url}/v2/models/{model}/versions/1/infer", json=body, timeout=60)


def test_the_model_list_shows_the_demo(browser: Any, server: Server) -> None:
    _open(browser, server)
    row = browser.find_element("css selector", '#models tr[data-model="demo"]')
    cells = [cell.text for cell in row.find_elements("tag name", "td")]
    assert cells[:5] == ["demo", "1 (default)", "READY", "multiclass", "timm/tf_efficientnet_lite0"]
    assert "onnxruntime_onnx fp32" in cells[5] and "accuracy" in cells[6]
    _shot(browser, "models")
    assert _console_errors(browser) == []


def test_a_photo_shows_the_api_answer_and_the_heatmap(browser: Any, server: Server) -> None:
    _open(browser, server)
    assert _try(browser, "demo", PHOTO) == "answered"
    shown = [(li.get_attribute("data-label"), li.get_attribute("data-score")) for li in _answers(browser)]
    api = _api_answers(server, "demo", PHOTO.read_bytes(), 5).json()["outputs"][0]["data"]
    assert shown[0][0] == "birds"
    assert [f"{score}:{label}" for label, score in shown] == [f"{s}:{label}" for s, _, label in _split(api)]
    heat = _wait(browser, lambda b: b.find_element("css selector", '#heat[data-loaded="true"]'))
    crop = _server_crop(server)
    assert browser.execute_script("return [arguments[0].naturalWidth, arguments[0].complete]", heat) == [crop, True]
    slider = _by_id(browser, "opacity")
    browser.execute_script("arguments[0].value = 80; arguments[0].dispatchEvent(new Event('input'))", slider)
    assert heat.value_of_css_property("opacity") == "0.8"
    assert "v2 infer:" in _by_id(browser, "timing").text and "Grad-CAM:" in _by_id(browser, "timing").text
    _shot(browser, "answer-and-heatmap")
    assert _console_errors(browser) == []


def test_a_non_image_shows_the_api_error(browser: Any, server: Server, tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not an image\n", encoding="utf-8")
    _open(browser, server)
    assert _try(browser, "demo", text) == "failed"
    api = _api_answers(server, "demo", text.read_bytes(), 5)
    assert api.status_code == 400
    assert _by_id(browser, "error").text == api.json()["error"]
    assert not _by_id(browser, "result").is_displayed()
    _shot(browser, "not-an-image")
    assert _console_errors(browser, expected_status=400) == []


def test_uploads_meet_the_api_caps_and_show_its_message(browser: Any, server: Server, tmp_path: Path) -> None:
    wide = tmp_path / "wide.png"
    Image.new("RGB", (2100, 2000), (40, 120, 200)).save(wide)  # 4.2 Mpx, a few kB
    _open(browser, server)
    assert _try(browser, "demo", wide) == "failed"
    api = _api_answers(server, "demo", wide.read_bytes(), 5)
    assert api.status_code == 413 and _by_id(browser, "error").text == api.json()["error"]
    assert "pixels is over the limit of 4000000" in api.json()["error"]
    heavy = tmp_path / "heavy.jpg"
    heavy.write_bytes(PHOTO.read_bytes() + bytes(1_100_000))  # a body over --max-payload-bytes
    assert _try(browser, "demo", heavy) == "failed"
    assert re.fullmatch(r"request body of \d+ bytes is over the limit of 1000000", _by_id(browser, "error").text)
    _shot(browser, "too-large")
    assert _console_errors(browser, expected_status=413) == []


def test_labels_with_markup_are_shown_as_text(browser: Any, server: Server) -> None:
    _open(browser, server)
    assert _try(browser, "markup", PHOTO) == "answered"
    _wait(browser, lambda b: b.find_element("css selector", '#heat[data-loaded="true"]'))
    shown = {li.get_attribute("data-label"): li.find_element("class name", "label").text for li in _answers(browser)}
    for label in MARKUP_LABELS:
        assert shown[label] == label  # the text itself, on the page
    assert browser.find_elements("css selector", "#answers script, #answers img") == []
    assert browser.execute_script("return window.__labelRan === undefined")
    _shot(browser, "markup-labels")
    assert _console_errors(browser) == []


def test_a_multilabel_model_shows_the_labels_over_their_thresholds(browser: Any, server: Server) -> None:
    _open(browser, server)
    assert _try(browser, "tags", PHOTO) == "answered"
    api = _split(_api_answers(server, "tags", PHOTO.read_bytes(), 5).json()["outputs"][0]["data"])
    shown = [(li.get_attribute("data-label"), li.get_attribute("data-score")) for li in _answers(browser)]
    assert shown == [(label, score) for score, _, label in api] and shown  # the labels given, none padded
    assert _by_id(browser, "answers-title").text == "Labels at or above their thresholds"
    assert all("threshold 0.500" in li.text for li in _answers(browser))
    _shot(browser, "multilabel")
    assert _console_errors(browser) == []


def test_an_image_can_be_dropped_or_pasted(browser: Any, server: Server) -> None:
    _open(browser, server)
    browser.find_element("css selector", '#models tr[data-model="demo"] button.try').click()
    for event in ("drop", "paste"):
        browser.execute_script("document.getElementById('try-section').dataset.state = 'idle'")
        browser.execute_script(_SEND_FILE, event, base64.b64encode(PHOTO.read_bytes()).decode())
        _wait(browser, lambda b: _by_id(b, "try-section").get_attribute("data-state") == "answered")
        assert _answers(browser)[0].get_attribute("data-label") == "birds", event
    assert _console_errors(browser) == []


# A photo as a File in a DataTransfer, dropped on the drop zone or pasted into the page, as a user's would be.
_SEND_FILE = """
const [kind, encoded] = arguments;
const bytes = Uint8Array.from(atob(encoded), (c) => c.charCodeAt(0));
const data = new DataTransfer();
data.items.add(new File([bytes], "photo.jpg", { type: "image/jpeg" }));
const event = kind === "drop"
  ? new DragEvent("drop", { dataTransfer: data, bubbles: true, cancelable: true })
  : new ClipboardEvent("paste", { clipboardData: data, bubbles: true, cancelable: true });
(kind === "drop" ? document.getElementById("drop") : document).dispatchEvent(event);
"""


def test_the_live_panel_reads_the_server_metrics(browser: Any, server: Server) -> None:
    _open(browser, server)
    for _ in range(3):
        _api_answers(server, "demo", PHOTO.read_bytes(), 1).raise_for_status()
    _wait(browser, lambda b: _by_id(b, "rate").text != "–" and int(_by_id(b, "total").text) >= 3)  # 2nd reading
    assert float(_by_id(browser, "rate").text) >= 0
    assert _by_id(browser, "p50").text.endswith("ms") and _by_id(browser, "p99").text.endswith("ms")
    _shot(browser, "live-panel")
    assert _console_errors(browser) == []


def test_the_page_draws_the_crop_the_server_takes(browser: Any, server: Server) -> None:
    """overlay.js's centre crop, run in the browser, against the server's own resize-and-crop arithmetic."""
    _open(browser, server)
    sizes = [(640, 480), (480, 640), (300, 300), (1001, 517), (183, 4000)]
    found = browser.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "import('/ui/overlay.js').then((m) => done(arguments[0].map(([w, h]) => m.cropBox(w, h, 183, 160))));",
        sizes,
    )
    for (width, height), box in zip(sizes, found, strict=True):
        assert box == pytest.approx(_server_box(width, height, resize=183, crop=160)), (width, height)


def test_the_live_panel_reads_the_real_metrics_text(browser: Any, server: Server) -> None:
    """promtext.js, in the browser, on the server's own /metrics: the same sums as Prometheus's own parser,
    and histogram_quantile's interpolation."""
    from prometheus_client.parser import text_string_to_metric_families

    _api_answers(server, "demo", PHOTO.read_bytes(), 1).raise_for_status()
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    requests, buckets = 0.0, {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "inference_requests_total":
                requests += sample.value
            elif sample.name == "inference_request_duration_seconds_bucket":
                bound = sample.labels["le"]
                buckets[bound] = buckets.get(bound, 0.0) + sample.value
    _open(browser, server)
    found = browser.execute_async_script(_READ_METRICS, text)
    assert found[0] == requests > 0
    assert {("+Inf" if bound == "Infinity" else float(bound)): count for bound, count in found[1]} == {
        ("+Inf" if bound == "+Inf" else float(bound)): count for bound, count in buckets.items()
    }
    assert found[2:] == pytest.approx([0.005 + 0.005 * 3 / 4, 0.01 + 0.015 * 3.9 / 4])


# promtext.js on a /metrics text, and on a toy histogram (cumulative counts 2, 6, 10 at 5, 10, 25 ms)
_READ_METRICS = """
const done = arguments[arguments.length - 1];
import("/ui/promtext.js").then((m) => {
  const read = m.readRequests(arguments[0]);
  const toy = new Map([[0.005, 2], [0.01, 6], [0.025, 10], [Infinity, 10]]);
  const buckets = [...read.buckets].map(([bound, count]) => [String(bound), count]);
  done([read.requests, buckets, m.quantile(0.5, toy), m.quantile(0.99, toy)]);
});
"""


def test_the_run_report_opens_and_shows_the_confusion_matrix(browser: Any, demo_package: Package) -> None:
    report = demo_package.run_dir / "report.html"
    browser.get(report.as_uri())
    picture = _wait(browser, lambda b: b.find_element("css selector", 'img[alt="confusion matrix of the test split"]'))
    assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", picture) > 100
    browser.execute_script("arguments[0].scrollIntoView()", picture)
    assert picture.is_displayed()
    assert "Worst mistakes" in browser.find_element("tag name", "body").text
    _shot(browser, "run-report")
    assert _console_errors(browser) == []


def test_with_a_token_the_page_signs_in_and_sends_it(
    browser: Any, store: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    token = "ui-test-token"
    log = tmp_path_factory.mktemp("serve-ui-token") / "serve.log"
    guarded = start_server(store, log, "--backend", "onnxruntime", env={"SERVE_INFERENCE_TOKEN": token})
    try:
        browser.get(guarded.url + "/")
        _sign_in(browser, "wrong")
        _wait(browser, lambda b: _by_id(b, "error").is_displayed())
        assert "not accepted" in _by_id(browser, "error").text
        _shot(browser, "sign-in-refused")
        _sign_in(browser, token)
        _wait(browser, lambda b: _by_id(b, "models-section").get_attribute("data-loaded") == "true")
        assert _try(browser, "demo", PHOTO) == "answered"  # infer and explain with the bearer token
        _wait(browser, lambda b: b.find_element("css selector", '#heat[data-loaded="true"]'))
        _shot(browser, "signed-in")
        assert _console_errors(browser, expected_status=401) == []  # the sign-in page's own 401
    finally:
        browser.delete_all_cookies()
        browser.execute_script("sessionStorage.clear()")
        assert guarded.stop() == 0, log.read_text()


# ---- helpers ---------------------------------------------------------------------------------------------
def _sign_in(browser: Any, token: str) -> None:
    field = _wait(browser, lambda b: b.find_element("id", "token"))
    field.send_keys(token)
    browser.find_element("css selector", "#login button").click()


def _answers(browser: Any) -> list[Any]:
    return list(browser.find_elements("css selector", "#answers li[data-label]"))


def _split(strings: list[str]) -> list[tuple[str, int, str]]:
    rows = []
    for text in filter(None, strings):  # "": a column a multi-label answer pads
        score, index, label = text.split(":", 2)
        rows.append((score, int(index), label))
    return rows


def _server_crop(server: Server) -> int:
    meta = httpx.get(f"{server.url}/v2/models/demo", timeout=10).json()
    return int(meta["preprocess"]["crop"])


def _server_box(width: int, height: int, *, resize: int, crop: int) -> tuple[float, float, float, float]:
    """The crop of service.preprocess.resize_and_crop in the image's own pixels (its large-image path's box)."""
    short, long = (width, height) if width <= height else (height, width)
    size = (resize, int(resize * long / short)) if width <= height else (int(resize * long / short), resize)
    left, top = round((size[0] - crop) / 2.0), round((size[1] - crop) / 2.0)
    scale_x, scale_y = width / size[0], height / size[1]
    return (left * scale_x, top * scale_y, crop * scale_x, crop * scale_y)
