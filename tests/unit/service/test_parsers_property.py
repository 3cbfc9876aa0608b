"""Property tests: whatever bytes or JSON a client sends, the request parsers fail only with InvalidInput.

InvalidInput (and its subclass PayloadTooLarge) is what the adapters turn into 400/413 and
INVALID_ARGUMENT/RESOURCE_EXHAUSTED with a message; any other exception would be a 500. The codec's
raw tensor decoding has its own properties in test_codec.py.
"""

from __future__ import annotations

import base64
import io
import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from service.errors import InvalidInput
from service.http_v2 import parse_inputs, parse_outputs, split_body
from service.preprocess import decode_image
from service.types import NUMPY_DTYPES

# sized to a few seconds in all; a failure found once is replayed first from .hypothesis/
FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
BYTES_FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DATATYPES = [*NUMPY_DTYPES, "BYTES", "", "FP8", "fp32", "STRING"]

# ---- strategies ---------------------------------------------------------------------------------

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(),  # NaN and infinities too: json.loads accepts NaN/Infinity literals
    st.text(max_size=12),
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=8,
)
dims = st.one_of(st.integers(min_value=-2, max_value=4), st.sampled_from([2**31, 2**32, 2**63, 2**64]))
shapes = st.one_of(st.lists(dims, max_size=4), json_values)
base64_strings = st.binary(max_size=24).map(lambda b: base64.b64encode(b).decode())
element_data = st.one_of(
    json_values,
    st.lists(st.one_of(base64_strings, st.floats(), st.integers(-300, 300)), max_size=6),
    st.lists(st.lists(st.floats(width=32), max_size=3), max_size=3),
)
input_parameters = st.one_of(
    json_values,
    st.fixed_dictionaries({"binary_data_size": st.one_of(st.integers(-4, 64), json_scalars)}),
)


@st.composite
def v2_inputs(draw: st.DrawFn) -> dict[str, Any]:
    item: dict[str, Any] = {
        "name": draw(st.one_of(st.sampled_from(["image", "input"]), json_values)),
        "datatype": draw(st.one_of(st.sampled_from(DATATYPES), json_values)),
        "shape": draw(shapes),
    }
    if draw(st.booleans()):
        item["data"] = draw(element_data)
    if draw(st.booleans()):
        item["parameters"] = draw(input_parameters)
    return item


output_parameters = st.one_of(
    json_values,
    st.fixed_dictionaries({"classification": json_scalars}),
    st.fixed_dictionaries({"binary_data": json_scalars, "classification": st.integers(-3, 2**64)}),
)
v2_outputs = st.one_of(
    json_values,
    st.lists(
        st.one_of(
            json_values,
            st.fixed_dictionaries(
                {"name": st.one_of(st.sampled_from(["logits", "probabilities"]), json_values)},
                optional={"parameters": output_parameters},
            ),
        ),
        max_size=3,
    ),
)
headers = st.one_of(
    json_values,
    st.fixed_dictionaries(
        {},
        optional={
            "inputs": st.one_of(json_values, st.lists(st.one_of(v2_inputs(), json_values), max_size=3)),
            "outputs": v2_outputs,
            "parameters": json_values,
            "id": json_values,
        },
    ),
)


def _only_invalid_input(call: Any, *args: Any) -> Any:
    """Run ``call``; InvalidInput is an accepted outcome, anything else propagates and fails the test."""
    try:
        return call(*args)
    except InvalidInput as exc:
        assert exc.message and "Traceback" not in exc.message
        return None


# ---- split_body: the JSON header and the binary part ----------------------------------------------


@given(st.binary(max_size=256), st.one_of(st.none(), st.text(max_size=8), st.integers(-10, 300).map(str)))
@BYTES_FUZZ
def test_split_body_on_arbitrary_bytes(body: bytes, header_length: str | None) -> None:
    result = _only_invalid_input(split_body, body, header_length)
    if result is not None:
        header, binary = result
        assert isinstance(header, dict) and isinstance(binary, bytes)


@given(json_values, st.binary(max_size=32))
@FUZZ
def test_split_body_on_arbitrary_json(value: Any, tail: bytes) -> None:
    text = json.dumps(value).encode()
    result = _only_invalid_input(split_body, text + tail, str(len(text)))
    if result is not None:
        assert result == (value, tail) or json.dumps(result[0]) == json.dumps(value)


# ---- parse_inputs / parse_outputs: the v2 request structure ---------------------------------------


@given(headers, st.binary(max_size=64))
@FUZZ
def test_parse_inputs_on_arbitrary_requests(header: Any, binary: bytes) -> None:
    if not isinstance(header, dict):
        header = {"inputs": header}
    inputs = _only_invalid_input(parse_inputs, header, binary)
    for tensor in inputs or []:
        assert isinstance(tensor.name, str) and isinstance(tensor.shape, list)


@given(headers)
@FUZZ
def test_parse_outputs_on_arbitrary_requests(header: Any) -> None:
    if not isinstance(header, dict):
        header = {"outputs": header}
    outputs = _only_invalid_input(parse_outputs, header)
    for output in outputs or []:
        assert isinstance(output.classification, int) and not isinstance(output.classification, bool)
        assert output.classification >= 0


@given(st.binary(max_size=512))
@BYTES_FUZZ
def test_whole_body_pipeline_on_arbitrary_bytes(body: bytes) -> None:
    """What the infer route does with a body: split, then parse inputs and outputs."""
    split = _only_invalid_input(split_body, body, None)
    if split is not None:
        _only_invalid_input(parse_inputs, *split)
        _only_invalid_input(parse_outputs, split[0])


# ---- decode_image: arbitrary and damaged image bytes ----------------------------------------------


def _encoded(fmt: str, mode: str, **options: Any) -> bytes:
    out = io.BytesIO()
    image = Image.new(mode, (9, 7), color=None)
    image.putdata([(i * 37) % 256 if mode in ("L", "P", "1") else ((i * 37) % 256,) * 3 for i in range(63)])
    image.save(out, fmt, **options)
    return out.getvalue()


SEEDS = [
    _encoded("PNG", "RGB"),
    _encoded("PNG", "P"),
    _encoded("JPEG", "RGB", quality=50),
    _encoded("GIF", "L"),
    _encoded("BMP", "RGB"),
    _encoded("TIFF", "RGB"),
    _encoded("WEBP", "RGB"),
]


@st.composite
def damaged_images(draw: st.DrawFn) -> bytes:
    """A real encoding with bytes flipped, cut, or inserted: reaches deeper into each decoder than noise."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 6))):
        at = draw(st.integers(0, len(data) - 1))
        action = draw(st.sampled_from(["flip", "cut", "insert"]))
        if action == "flip":
            data[at] = draw(st.integers(0, 255))
        elif action == "cut":
            del data[at : at + draw(st.integers(1, 16))]
        else:
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        if not data:
            break
    return bytes(data)


@given(st.binary(max_size=256))
@BYTES_FUZZ
def test_decode_image_on_arbitrary_bytes(data: bytes) -> None:
    image = _only_invalid_input(lambda: decode_image(data, max_pixels=100_000, source="fuzz"))
    if image is not None:
        assert image.mode == "RGB" and min(image.size) >= 1


@given(damaged_images())
@BYTES_FUZZ
def test_decode_image_on_damaged_images(data: bytes) -> None:
    image = _only_invalid_input(lambda: decode_image(data, max_pixels=100_000, source="fuzz"))
    if image is not None:
        assert image.mode == "RGB" and image.width * image.height <= 100_000


def test_the_seeds_decode() -> None:
    for data in SEEDS:
        assert decode_image(data).size == (9, 7)
