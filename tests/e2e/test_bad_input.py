"""Bad input over every protocol, against one real ``serve`` process: refused cleanly, never a 5xx.

Each case must be refused with its 4xx (or the gRPC code that maps to it) and a message that
names the problem, without a traceback or the server's paths in the answer; the server log must
hold no traceback either (no unexpected error inside), and after everything the server is still
live and classifies a good image correctly on every protocol.
"""

from __future__ import annotations

import base64
import functools
import io
import json
import math
import re
import struct
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from service.protos import load_v2
from tests.e2e.conftest import Package, Server, start_server
from tests.e2e.protocols import (
    GRPC_V2,
    HTTP_TORCHSERVE,
    HTTP_V2_BINARY,
    HTTP_V2_JSON,
    PROTOCOLS,
    Endpoint,
    Outcome,
    grpc_call,
    http_outcome,
    send_image,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
PAYLOAD_CAP = 2_000_000
PIXEL_CAP = 4_000_000


@pytest.fixture(scope="module")
def capped(demo_package: Package, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("bad-input") / "serve.log"
    caps = ["--max-payload-bytes", str(PAYLOAD_CAP), "--max-image-pixels", str(PIXEL_CAP)]
    server = start_server(demo_package.store, log, *caps)
    yield server
    assert server.stop() == 0, log.read_text()
    assert "Traceback" not in log.read_text(), "a bad request reached an unexpected error inside the server"


@pytest.fixture(scope="module")
def endpoint(capped: Server) -> Endpoint:
    return Endpoint(capped.http_port, capped.grpc_port)


@pytest.fixture(scope="module")
def good(demo_package: Package) -> tuple[bytes, str]:
    """A test image of the demo package and the label finetune's own evaluation gave it."""
    path, label = sorted(demo_package.predictions.items())[0]
    return path.read_bytes(), label


def assert_refused(outcome: Outcome, http_status: int, pattern: str, *, store: Path | None = None) -> None:
    """Refused with ``http_status`` (or its gRPC code), a message matching ``pattern``, nothing internal."""
    assert outcome.is_refusal(http_status), outcome
    assert re.search(pattern, outcome.message, re.IGNORECASE), outcome
    assert "Traceback" not in outcome.body and "Traceback" not in outcome.message
    if store is not None:
        assert str(store) not in outcome.body and str(store) not in outcome.message


# ---- images ---------------------------------------------------------------------------------------


def _encode(image: Image.Image, fmt: str, **options: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def zero_size_png() -> bytes:
    """A well-formed PNG (valid CRCs) that declares 0x0 pixels: no encoder writes one, an attacker can."""
    header = struct.pack(">IIBBBBB", 0, 0, 8, 2, 0, 0, 0)
    chunks = _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(b"")) + _png_chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + chunks


def corrupt_png() -> bytes:
    """A PNG whose pixel data is damaged (its chunk CRCs still check out)."""
    data = bytearray(_encode(Image.new("RGB", (32, 32), (10, 200, 30)), "PNG", compress_level=0))
    start = data.index(b"IDAT")
    length = struct.unpack(">I", data[start - 4 : start])[0]
    pixels = bytearray(data[start + 4 : start + 4 + length])
    pixels[2:40] = b"\xff" * 38
    data[start + 4 : start + 4 + length] = pixels
    data[start + 4 + length : start + 8 + length] = struct.pack(">I", zlib.crc32(b"IDAT" + bytes(pixels)))
    return bytes(data)


@functools.cache
def bomb(side: int) -> bytes:
    """A 1-bit PNG of side x side pixels: a few KB on the wire, side² pixels once decoded."""
    return _encode(Image.new("1", (side, side)), "PNG", optimize=True)


BAD_IMAGES: dict[str, tuple[Callable[[bytes], bytes], int, str]] = {
    "empty": (lambda good: b"", 400, "empty image"),
    "truncated-jpeg": (lambda good: good[: len(good) // 2], 400, "truncated"),
    "corrupt-png": (lambda good: corrupt_png(), 400, "corrupt"),
    "text": (lambda good: b"this is not an image\n" * 10, 400, "not a recognised image"),
    "zero-size-png": (lambda good: zero_size_png(), 400, "not a recognised image|zero size"),
    # over the server's 4 Mpx cap, under Pillow's own bomb check (89 Mpx): our cap refuses it
    "bomb-5000x5000": (lambda good: bomb(5000), 413, f"over the limit of {PIXEL_CAP}"),
    # over Pillow's own warning limit (89 Mpx) too: Pillow only warns, our cap refuses it by name
    "bomb-10000x10000": (lambda good: bomb(10000), 413, f"10000x10000 pixels is over the limit of {PIXEL_CAP}"),
    # over twice Pillow's limit: Pillow refuses it while opening, before our cap is asked
    "bomb-15000x15000": (lambda good: bomb(15000), 413, "too large to decode"),
}


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("case", list(BAD_IMAGES))
def test_bad_images_are_refused(
    endpoint: Endpoint, good: tuple[bytes, str], demo_package: Package, case: str, protocol: str
) -> None:
    make, status, pattern = BAD_IMAGES[case]
    data = make(good[0])
    assert len(data) < 100_000  # the bombs are small on the wire: the cap on pixels is what stops them
    assert_refused(send_image(endpoint, protocol, data), status, pattern, store=demo_package.store)


def _sixteen_bit_png() -> bytes:
    gradient = np.linspace(0, 65535, 48 * 40, dtype=np.uint16).reshape(40, 48)
    return _encode(Image.fromarray(gradient), "PNG")


def _palette_with_transparency() -> bytes:
    image = Image.new("P", (30, 20), 1)
    image.putpalette([0, 0, 0, 200, 30, 30] + [0] * 762)
    return _encode(image, "PNG", transparency=0)


UNUSUAL_IMAGES: dict[str, Callable[[], bytes]] = {
    "1x1": lambda: _encode(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"),
    "grayscale-jpeg": lambda: _encode(Image.new("L", (64, 48), 120), "JPEG"),
    "cmyk-jpeg": lambda: _encode(Image.new("CMYK", (64, 48), (0, 120, 200, 10)), "JPEG"),
    "rgba-png": lambda: _encode(Image.new("RGBA", (64, 48), (10, 200, 10, 100)), "PNG"),
    "16-bit-png": _sixteen_bit_png,
    "palette-transparent-png": _palette_with_transparency,
    "1x4000-strip": lambda: _encode(Image.new("RGB", (1, 4000), (10, 10, 200)), "PNG"),
    "webp": lambda: _encode(Image.new("RGB", (64, 48), (200, 200, 10)), "WEBP"),
}


@pytest.mark.parametrize("case", list(UNUSUAL_IMAGES))
def test_unusual_images_are_answered_alike_on_every_protocol(
    endpoint: Endpoint, demo_package: Package, case: str
) -> None:
    data = UNUSUAL_IMAGES[case]()
    outcomes = [send_image(endpoint, protocol, data) for protocol in PROTOCOLS]
    assert all(o.ok for o in outcomes), outcomes
    labels = {o.label for o in outcomes}
    assert len(labels) == 1 and labels <= set(_labels(demo_package)), outcomes


def _labels(package: Package) -> list[str]:
    return json.loads((package.store / "demo" / "1" / "manifest.json").read_text())["labels"]


# ---- the payload cap: the same number on every protocol ---------------------------------------------


def _padded(good: bytes, size: int) -> bytes:
    """The good JPEG followed by zeros up to ``size`` bytes (decoders ignore bytes after the image)."""
    return good + b"\0" * (size - len(good))


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_payload_just_over_the_cap_is_refused(endpoint: Endpoint, good: tuple[bytes, str], protocol: str) -> None:
    outcome = send_image(endpoint, protocol, _padded(good[0], PAYLOAD_CAP + 1))
    assert_refused(outcome, 413, rf"limit of {PAYLOAD_CAP}|larger than max \(\d+ vs\. {PAYLOAD_CAP}\)")


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_payload_just_under_the_cap_is_answered(endpoint: Endpoint, good: tuple[bytes, str], protocol: str) -> None:
    room = PAYLOAD_CAP - 4096  # what the protocol wraps around the image fits in 4 KiB
    size = room * 3 // 4 if protocol == HTTP_V2_JSON else room  # base64 takes 4 bytes for 3
    outcome = send_image(endpoint, protocol, _padded(good[0], size))
    assert outcome.ok and outcome.label == good[1], outcome


# ---- model names and versions -----------------------------------------------------------------------

NAMES = {
    "unknown-model": ("nope", None, "model 'nope' not found"),
    "unknown-version": ("demo", "9", "no version '9'"),
    "dot-dot-slash": ("../demo", None, "invalid model name|not found"),
    "encoded-dot-dot": ("%2e%2e%2fdemo", None, "invalid model name|not found"),
    "absolute-path": ("/etc/passwd", None, "invalid model name|not found"),
    "url": ("http://example.invalid/demo.mar", None, "invalid model name|not found"),
    "version-traversal": ("demo", "../1", "no version|not found"),
}


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("case", list(NAMES))
def test_unknown_and_crafted_model_names_are_not_found(
    endpoint: Endpoint, good: tuple[bytes, str], demo_package: Package, case: str, protocol: str
) -> None:
    name, version, pattern = NAMES[case]
    if protocol.startswith("http"):  # in a URL path: percent-encode, so '/' and '..' reach the server as sent
        name, version = _quote(name), _quote(version) if version else None
    outcome = send_image(endpoint, protocol, good[0], model=name, version=version)
    assert_refused(outcome, 404, pattern, store=demo_package.store)


def _quote(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_%" else f"%{ord(c):02X}" for c in text)


# ---- v2 requests that are malformed as requests -----------------------------------------------------


def _image_tensor(good: bytes, **overrides: Any) -> dict[str, Any]:
    tensor = {"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(good).decode()]}
    return {**tensor, **overrides}


def _image_request(good: bytes, *, tensor: dict[str, Any] | None = None, **fields: Any) -> dict[str, Any]:
    """A v2 request for the image with some fields (or some of its tensor's fields) replaced."""
    return {"inputs": [_image_tensor(good, **(tensor or {}))], **fields}


def _classification(value: Any) -> list[dict[str, Any]]:
    return [{"name": "probabilities", "parameters": {"classification": value}}]


def _fp32_request(shape: list[int], count: int, datatype: str = "FP32") -> dict[str, Any]:
    return {"inputs": [{"name": "input", "datatype": datatype, "shape": shape, "data": [0.0] * count}]}


FULL = 3 * 160 * 160
NAN_JSON = json.dumps(
    {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 160, 160], "data": [math.nan] * FULL}]}
).encode()
BINARY_PAST_END = {"name": "image", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 64}}
LENGTH = "Inference-Header-Content-Length"
HTTP_V2_CASES: dict[str, tuple[Callable[[bytes], Any], dict[str, str], str]] = {
    "malformed-json": (lambda g: b'{"inputs": [', {}, "not valid JSON"),
    "not-utf8": (lambda g: b"\xff\xfe\x00", {}, "not valid JSON"),
    "json-array": (lambda g: b"[1, 2]", {}, "must be a JSON object"),
    "empty-body": (lambda g: b"", {}, "not valid JSON"),
    "no-inputs": (lambda g: {"inputs": []}, {}, "exactly one input"),
    "input-name": (lambda g: _image_request(g, tensor={"name": "nope"}), {}, "unknown input 'nope'"),
    "two-inputs": (lambda g: {"inputs": [_image_tensor(g), _image_tensor(g)]}, {}, "exactly one input"),
    "shape-too-big": (lambda g: _image_request(g, tensor={"shape": [2]}), {}, r"1 elements for shape \[2\]"),
    "shape-negative": (lambda g: _image_request(g, tensor={"shape": [-1]}), {}, "shape"),
    "shape-not-a-list": (lambda g: _image_request(g, tensor={"shape": "1"}), {}, "shape"),
    "unknown-datatype": (lambda g: _image_request(g, tensor={"datatype": "FP8"}), {}, "unknown datatype"),
    "image-as-fp32": (lambda g: _image_request(g, tensor={"datatype": "FP32"}), {}, "not FP32"),
    "int32-tensor": (lambda g: _fp32_request([1, 3, 160, 160], FULL, "INT32"), {}, "INT32 not supported"),
    "fp32-wrong-shape": (lambda g: _fp32_request([1, 3, 8, 8], 192), {}, "does not match"),
    "fp32-element-count": (lambda g: _fp32_request([1, 3, 160, 160], 10), {}, "10 elements for shape"),
    "fp32-nan": (lambda g: NAN_JSON, {}, "NaN or infinity"),
    "bytes-not-base64": (lambda g: _image_request(g, tensor={"data": ["%%%"]}), {}, "base64"),
    "no-data": (lambda g: _image_request(g, tensor={"data": None}), {}, "no data"),
    "unknown-output": (lambda g: _image_request(g, outputs=[{"name": "x"}]), {}, "unknown output 'x'"),
    "classification-negative": (
        lambda g: _image_request(g, outputs=_classification(-1)),
        {},
        "classification must be a non-negative integer",
    ),
    "classification-boolean": (
        lambda g: _image_request(g, outputs=_classification(True)),
        {},
        "classification must be a non-negative integer",
    ),
    "output-parameters-not-an-object": (
        lambda g: _image_request(g, outputs=[{"name": "probabilities", "parameters": "binary"}]),
        {},
        "'parameters' must be an object",
    ),
    "timeout-not-a-number": (lambda g: _image_request(g, parameters={"timeout": "abc"}), {}, "invalid timeout"),
    "timeout-negative": (lambda g: _image_request(g, parameters={"timeout": -5}), {}, "'timeout' must be a positive"),
    "timeout-header-nan": (lambda g: _image_request(g), {"X-Request-Timeout-Ms": "nan"}, "Ms must be a positive"),
    "parameters-not-an-object": (lambda g: _image_request(g, parameters=[1]), {}, "'parameters' must be an object"),
    "header-length-not-a-number": (lambda g: _image_request(g), {LENGTH: "ten"}, "not an integer"),
    "header-length-past-the-end": (lambda g: _image_request(g), {LENGTH: "99999"}, "but the body has"),
    # the JSON claims 64 bytes of binary data after it, and none follow
    "binary-size-past-the-end": (lambda g: {"inputs": [BINARY_PAST_END]}, {LENGTH: "-"}, "runs past the end"),
}


@pytest.mark.parametrize("case", list(HTTP_V2_CASES))
def test_malformed_v2_http_requests(endpoint: Endpoint, good: tuple[bytes, str], case: str) -> None:
    make, headers, pattern = HTTP_V2_CASES[case]
    body = make(good[0])
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    if headers.get(LENGTH) == "-":
        headers = {LENGTH: str(len(content))}
    response = httpx.post(f"{endpoint.url}/v2/models/demo/infer", content=content, headers=headers, timeout=60)
    assert_refused(http_outcome(HTTP_V2_JSON, response), 400, pattern)


def test_malformed_binary_tensor(endpoint: Endpoint, good: tuple[bytes, str]) -> None:
    """A BYTES element whose length prefix claims more bytes than the body holds."""
    header = json.dumps(
        {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 8}}]}
    ).encode()
    body = header + struct.pack("<I", 1_000_000) + b"abcd"
    response = httpx.post(
        f"{endpoint.url}/v2/models/demo/infer",
        content=body,
        headers={"Inference-Header-Content-Length": str(len(header))},
        timeout=60,
    )
    assert_refused(http_outcome(HTTP_V2_BINARY, response), 400, "declares 1000000 bytes")


def _grpc_request(good: bytes, *, datatype: str = "BYTES", shape: tuple[int, ...] = (1,)) -> Any:
    messages = load_v2().messages
    request = messages.ModelInferRequest(model_name="demo")
    request.inputs.add(name="image", datatype=datatype, shape=list(shape)).contents.bytes_contents.append(good)
    return request


def _with_output_parameter(request: Any, key: str, value: Any) -> Any:
    parameter = request.outputs.add(name="probabilities").parameters[key]
    if isinstance(value, str):
        parameter.string_param = value
    else:
        parameter.int64_param = value
    return request


def _with_raw(request: Any) -> Any:
    request.raw_input_contents.append(b"x")
    return request


def _with_output(request: Any, name: str) -> Any:
    request.outputs.add(name=name)
    return request


def _with_request_parameter(request: Any, key: str, value: str) -> Any:
    request.parameters[key].string_param = value
    return request


def _renamed(request: Any, name: str) -> Any:
    request.inputs[0].name = name
    return request


def _fp32_raw(shape: list[int], raw: bytes) -> Any:
    messages = load_v2().messages
    request = messages.ModelInferRequest(model_name="demo", raw_input_contents=[raw])
    request.inputs.add(name="input", datatype="FP32", shape=shape)
    return request


GRPC_V2_CASES: dict[str, tuple[Callable[[bytes], Any], str]] = {
    "shape-too-big": (lambda g: _grpc_request(g, shape=(2,)), "1 elements for shape"),
    "shape-negative": (lambda g: _grpc_request(g, shape=(-1,)), "non-negative"),
    "unknown-datatype": (lambda g: _grpc_request(g, datatype="FP8"), "unknown datatype"),
    "image-as-fp32": (lambda g: _grpc_request(g, datatype="FP32"), "elements for shape"),
    "fp32-raw-size": (lambda g: _fp32_raw([1, 3, 160, 160], b"\0" * 7), "7 bytes of raw data"),
    "fp32-wrong-shape": (lambda g: _fp32_raw([1, 3, 8, 8], b"\0" * 768), "does not match"),
    "fp32-nan": (
        lambda g: _fp32_raw([1, 3, 160, 160], np.full(3 * 160 * 160, np.nan, np.float32).tobytes()),
        "NaN",
    ),
    "no-inputs": (lambda g: load_v2().messages.ModelInferRequest(model_name="demo"), "exactly one input"),
    "raw-and-contents": (lambda g: _with_raw(_grpc_request(g)), "both contents and raw_input_contents"),
    "classification-negative": (
        lambda g: _with_output_parameter(_grpc_request(g), "classification", -1),
        "classification must be a non-negative integer",
    ),
    "classification-string": (
        lambda g: _with_output_parameter(_grpc_request(g), "classification", "3"),
        "classification must be a non-negative integer",
    ),
    "timeout-not-a-number": (
        lambda g: _with_request_parameter(_grpc_request(g), "timeout", "abc"),
        "'timeout' must be a positive number",
    ),
    "unknown-output": (lambda g: _with_output(_grpc_request(g), "x"), "unknown output 'x'"),
    "input-name": (lambda g: _renamed(_grpc_request(g), "nope"), "unknown input 'nope'"),
}


@pytest.mark.parametrize("case", list(GRPC_V2_CASES))
def test_malformed_v2_grpc_requests(endpoint: Endpoint, good: tuple[bytes, str], case: str) -> None:
    make, pattern = GRPC_V2_CASES[case]
    _, error = grpc_call(endpoint, "v2", "ModelInfer", make(good[0]))
    assert error is not None
    outcome = Outcome(GRPC_V2, error.code().name, error.details() or "", None, error.details() or "")
    assert_refused(outcome, 400, pattern)


@pytest.mark.parametrize("value", ["abc", "nan", "-1"])
def test_torchserve_timeout_header_must_be_a_number(endpoint: Endpoint, good: tuple[bytes, str], value: str) -> None:
    response = httpx.post(
        f"{endpoint.url}/predictions/demo", content=good[0], headers={"X-Request-Timeout-Ms": value}, timeout=60
    )
    assert_refused(http_outcome(HTTP_TORCHSERVE, response), 400, "timeout")


def test_torchserve_grpc_request_without_an_image(endpoint: Endpoint) -> None:
    from service.protos import load_torchserve

    messages = load_torchserve().messages
    _, error = grpc_call(endpoint, "torchserve", "Predictions", messages.PredictionsRequest(model_name="demo"))
    assert error is not None and error.code().name == "INVALID_ARGUMENT"
    assert "send one image as the raw request body or as a multipart/gRPC field named 'data'" in (error.details() or "")


def test_a_body_far_over_the_cap_gets_a_readable_413(endpoint: Endpoint) -> None:
    """80 MB against a 2 MB cap: the server drains the body, so the client reads the 413 (no reset)."""
    body, step = b"\0" * 80_000_000, 1 << 20
    pattern = rf"request body (of 80000000 bytes )?is over the limit of {PAYLOAD_CAP}"
    for path, key in (("/predictions/demo", "message"), ("/v2/models/demo/infer", "error")):
        for content in (body, (body[i : i + step] for i in range(0, len(body), step))):  # sized, then chunked
            response = httpx.post(f"{endpoint.url}{path}", content=content, timeout=60)
            assert response.status_code == 413, response.text
            assert re.search(pattern, response.json()[key]), response.text


# ---- and after all of that ----------------------------------------------------------------------------


def test_still_live_and_correct_after_all_of_the_above(capped: Server, good: tuple[bytes, str]) -> None:
    endpoint = Endpoint(capped.http_port, capped.grpc_port)
    assert capped.process.poll() is None
    assert httpx.get(f"{endpoint.url}/v2/health/live").status_code == 200
    assert httpx.get(f"{endpoint.url}/v2/health/ready").status_code == 200
    for protocol in PROTOCOLS:
        outcome = send_image(endpoint, protocol, good[0])
        assert outcome.ok and outcome.label == good[1], outcome
