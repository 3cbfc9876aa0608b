"""The v2 HTTP adapter's pure conversions: body splitting, input/output parsing, encoding.

No app and no model. The token, body and deadline helpers are tested in ``test_http_common.py``.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import numpy as np
import pytest
import tritonclient.http as triton_http

from service.codec import serialize_bytes_tensor
from service.errors import InvalidInput
from service.http_v2 import HEADER_LENGTH, encode_response, parse_inputs, parse_outputs, split_body
from service.types import InferOutput, InferResponse, RequestedOutput


# ---- split_body -------------------------------------------------------------------------------
def test_split_body_without_binary_data() -> None:
    assert split_body(b'{"inputs": []}', None) == ({"inputs": []}, b"")


def test_split_body_with_the_header_length() -> None:
    header = b'{"id": "x"}'
    assert split_body(header + b"\x00\x01\x02", str(len(header))) == ({"id": "x"}, b"\x00\x01\x02")
    assert split_body(header, str(len(header))) == ({"id": "x"}, b"")


@pytest.mark.parametrize(
    ("body", "length", "message"),
    [
        (b"{}", "two", f"{HEADER_LENGTH} is not an integer"),
        (b"{}", "1.5", f"{HEADER_LENGTH} is not an integer"),
        (b"{}", "-1", f"{HEADER_LENGTH}=-1 but the body has 2 bytes"),
        (b"{}", "3", f"{HEADER_LENGTH}=3 but the body has 2 bytes"),
        (b'{"a": 1}', "3", "request body is not valid JSON"),
        (b"not json", None, "request body is not valid JSON"),
        (b"", None, "request body is not valid JSON"),
        (b"\xff\xfe\x00", None, "request body is not valid JSON"),
        (b"[1, 2]", None, "request body must be a JSON object"),
        (b'"text"', None, "request body must be a JSON object"),
        (b"null", None, "request body must be a JSON object"),
    ],
)
def test_split_body_refusals(body: bytes, length: str | None, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        split_body(body, length)


# ---- parse_inputs -----------------------------------------------------------------------------
def test_json_numeric_inputs_take_their_shape_and_dtype() -> None:
    header = {
        "inputs": [
            {"name": "x", "datatype": "FP32", "shape": [2, 3], "data": [[1, 2, 3], [4, 5, 6.5]]},
            {"name": "y", "datatype": "INT64", "shape": [3], "data": [1, 2, 3], "parameters": {"note": "kept"}},
            {"name": "z", "datatype": "FP64", "shape": [], "data": 2.5},
        ]
    }
    x, y, z = parse_inputs(header, b"")
    assert (x.name, x.datatype, x.shape, x.parameters) == ("x", "FP32", [2, 3], {})
    assert isinstance(x.data, np.ndarray) and x.data.dtype == np.float32
    np.testing.assert_array_equal(x.data, [[1, 2, 3], [4, 5, 6.5]])
    assert isinstance(y.data, np.ndarray) and y.data.dtype == np.int64 and y.parameters == {"note": "kept"}
    assert isinstance(z.data, np.ndarray) and z.data.shape == () and float(z.data) == 2.5


def test_json_bytes_inputs_are_base64() -> None:
    images = [b"\x89PNG\r\n\x1a\n", b"", b"\xff\xd8\xff"]
    data = [base64.b64encode(x).decode() for x in images]
    (tensor,) = parse_inputs({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [3], "data": data}]}, b"")
    assert tensor.data == images


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ({"datatype": "BYTES", "shape": [1], "data": ["!!not base64!!"]}, "BYTES elements in JSON must be base64"),
        ({"datatype": "BYTES", "shape": [1], "data": ["abc"]}, "BYTES elements in JSON must be base64"),
        ({"datatype": "FP32", "shape": [2], "data": [1.0, "x"]}, "data is not FP32"),
        ({"datatype": "INT8", "shape": [1], "data": [300]}, "data is not INT8"),
        ({"datatype": "FP32", "shape": [2], "data": [[1.0], [2.0, 3.0]]}, r"input 'in'"),
        ({"datatype": "FP32", "shape": [2, 2], "data": [1, 2, 3]}, r"3 elements for shape \[2, 2\] \(4\)"),
        ({"datatype": "FP32", "shape": [2], "data": [1, 2, 3]}, r"more than the 2 elements its shape \[2\] holds"),
        ({"datatype": "FP32", "shape": [1]}, r"no data \(and no binary_data_size\)"),
        ({"datatype": "FP32", "shape": [-1, 3], "data": [1, 2, 3]}, r"shape \[-1, 3\] must be non-negative integers"),
        ({"datatype": "FP32", "shape": [True], "data": [1]}, "shape must be a list of non-negative integers"),
        ({"datatype": "FP32", "shape": "3", "data": [1, 2, 3]}, "shape must be a list of non-negative integers"),
        ({"datatype": "FP32", "shape": [1.5], "data": [1]}, "shape must be a list of non-negative integers"),
        ({"datatype": "FP32", "data": [1]}, "shape must be a list of non-negative integers"),
        ({"datatype": "FP8", "shape": [1], "data": [1]}, "input 'in': unknown datatype 'FP8'"),
        ({"shape": [1], "data": [1]}, "input 'in': unknown datatype ''"),
    ],
)
def test_json_input_refusals_name_the_input(item: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidInput, match=message) as caught:
        parse_inputs({"inputs": [{"name": "in", **item}]}, b"")
    assert "'in'" in caught.value.message


@pytest.mark.parametrize(
    "header",
    [{}, {"inputs": {"name": "x"}}, {"inputs": "x"}],
)
def test_a_request_without_inputs_is_refused(header: dict[str, Any]) -> None:
    with pytest.raises(InvalidInput, match="request has no 'inputs' list"):
        parse_inputs(header, b"")


def test_an_empty_inputs_list_is_left_to_the_data_plane() -> None:
    assert parse_inputs({"inputs": []}, b"") == []  # refused there, with the message gRPC gets too


@pytest.mark.parametrize("item", [{"datatype": "FP32"}, {"name": 3}, "x"])
def test_an_input_without_a_name_is_refused(item: Any) -> None:
    with pytest.raises(InvalidInput, match="each input needs a 'name'"):
        parse_inputs({"inputs": [item]}, b"")


def test_binary_fp32_and_bytes_inputs_are_read_in_order() -> None:
    pixels = np.arange(6, dtype=np.float32).reshape(2, 3)
    images = [b"first image", b"", b"third"]
    blob = serialize_bytes_tensor(images)
    header = {
        "inputs": [
            {"name": "x", "datatype": "FP32", "shape": [2, 3], "parameters": {"binary_data_size": 24}},
            {"name": "j", "datatype": "INT32", "shape": [1], "data": [7]},
            {"name": "image", "datatype": "BYTES", "shape": [3], "parameters": {"binary_data_size": len(blob)}},
        ]
    }
    x, j, image = parse_inputs(header, pixels.tobytes() + blob)
    np.testing.assert_array_equal(x.data, pixels)
    assert x.parameters == {"binary_data_size": 24}
    np.testing.assert_array_equal(j.data, [7])
    assert image.data == images


def test_tritonclients_own_binary_request_parses() -> None:
    images = np.array([b"\x89PNG one", b"\xff\xd8 two"], dtype=np.object_)
    pixels = np.random.default_rng(0).standard_normal((1, 3, 4, 4), dtype=np.float32)
    first = triton_http.InferInput("image", [2], "BYTES")
    first.set_data_from_numpy(images, binary_data=True)
    second = triton_http.InferInput("input", [1, 3, 4, 4], "FP32")
    second.set_data_from_numpy(pixels, binary_data=True)
    outputs = [triton_http.InferRequestedOutput("probabilities", binary_data=True, class_count=2)]
    body, json_size = triton_http.InferenceServerClient.generate_request_body(
        [first, second], outputs=outputs, request_id="r1"
    )
    header, binary = split_body(body, str(json_size))
    assert header["id"] == "r1"
    image, tensor = parse_inputs(header, binary)
    assert image.data == list(images)
    np.testing.assert_array_equal(tensor.data, pixels)
    (wanted,) = parse_outputs(header) or []
    assert (wanted.name, wanted.classification, wanted.parameters["binary_data"]) == ("probabilities", 2, True)


@pytest.mark.parametrize(
    ("size", "binary", "message"),
    [
        (24, b"\0" * 28, "4 bytes of binary data are not claimed by any input"),
        (24, b"\0" * 20, "binary_data_size 24 runs past the end of the body"),
        (-4, b"\0" * 24, "binary_data_size -4 runs past the end of the body"),
        ("24", b"\0" * 24, "binary_data_size 24 runs past the end of the body"),
        (20, b"\0" * 20, r"20 bytes of raw data, but shape \[2, 3\] of FP32 needs 24"),
    ],
)
def test_binary_input_refusals(size: Any, binary: bytes, message: str) -> None:
    header = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 3], "parameters": {"binary_data_size": size}}]}
    with pytest.raises(InvalidInput, match=message):
        parse_inputs(header, binary)


def test_binary_data_with_only_json_inputs_is_unclaimed() -> None:
    header = {"inputs": [{"name": "x", "datatype": "INT32", "shape": [1], "data": [1]}]}
    with pytest.raises(InvalidInput, match="3 bytes of binary data are not claimed by any input"):
        parse_inputs(header, b"abc")


def test_binary_bytes_refusals_come_from_the_codec() -> None:
    blob = serialize_bytes_tensor([b"a", b"b"])
    header = {"inputs": [{"name": "img", "datatype": "BYTES", "shape": [3], "parameters": {"binary_data_size": 10}}]}
    with pytest.raises(InvalidInput, match=r"input 'img': 2 elements for shape \[3\] \(3\)"):
        parse_inputs(header, blob)
    header["inputs"][0]["parameters"]["binary_data_size"] = 9
    with pytest.raises(InvalidInput, match="input 'img': BYTES element 1 declares 1 bytes, 0 remain"):
        parse_inputs(header, blob[:9])
    header["inputs"][0]["parameters"]["binary_data_size"] = 7
    with pytest.raises(InvalidInput, match="input 'img': truncated BYTES length prefix at byte 5"):
        parse_inputs(header, blob[:7])


# ---- parse_outputs ----------------------------------------------------------------------------
def test_parse_outputs() -> None:
    assert parse_outputs({}) is None
    assert parse_outputs({"outputs": []}) == []
    outputs = parse_outputs(
        {
            "outputs": [
                {"name": "logits"},
                {"name": "probabilities", "parameters": {"classification": 3, "binary_data": True}},
            ]
        }
    )
    assert outputs == [
        RequestedOutput("logits", 0, {}),
        RequestedOutput("probabilities", 3, {"classification": 3, "binary_data": True}),
    ]


@pytest.mark.parametrize(
    ("outputs", "message"),
    [
        ("logits", "'outputs' must be a list"),
        ({"name": "logits"}, "'outputs' must be a list"),
        ([{"parameters": {}}], "each requested output needs a 'name'"),
        (["logits"], "each requested output needs a 'name'"),
        ([{"name": "p", "parameters": {"classification": -1}}], "output 'p': classification must be a non-negative"),
        ([{"name": "p", "parameters": {"classification": "2"}}], "output 'p': classification must be a non-negative"),
        ([{"name": "p", "parameters": {"classification": 1.5}}], "output 'p': classification must be a non-negative"),
        ([{"name": "p", "parameters": {"classification": True}}], "output 'p': classification must be a non-negative"),
    ],
)
def test_parse_outputs_refusals(outputs: Any, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        parse_outputs({"outputs": outputs})


@pytest.mark.parametrize("parameters", ["binary", 5, [1, 2]])
def test_output_parameters_that_are_not_an_object_are_invalid_input(parameters: Any) -> None:
    with pytest.raises(InvalidInput, match="output 'logits': 'parameters' must be an object"):
        parse_outputs({"outputs": [{"name": "logits", "parameters": parameters}]})


# ---- encode_response --------------------------------------------------------------------------
def _response() -> InferResponse:
    logits = np.array([[1.5, -2.0, 0.25]], np.float32)
    strings = [b"0.700000:1:b", b"0.200000:2:c"]
    return InferResponse(
        "tiny",
        "1",
        [InferOutput("logits", "FP32", [1, 3], logits), InferOutput("probabilities", "BYTES", [1, 2], strings)],
        id="r9",
    )


def test_encode_response_as_json() -> None:
    response = encode_response(_response(), binary_default=False)
    assert response.media_type == "application/json" and HEADER_LENGTH not in response.headers
    assert json.loads(bytes(response.body)) == {
        "model_name": "tiny",
        "model_version": "1",
        "id": "r9",
        "outputs": [
            {"name": "logits", "datatype": "FP32", "shape": [1, 3], "data": [1.5, -2.0, 0.25]},
            {"name": "probabilities", "datatype": "BYTES", "shape": [1, 2], "data": ["0.700000:1:b", "0.200000:2:c"]},
        ],
    }


def test_encode_response_as_binary_with_the_header_length() -> None:
    response = encode_response(_response(), binary_default=True)
    body = bytes(response.body)
    length = int(response.headers[HEADER_LENGTH])
    assert response.media_type == "application/octet-stream"
    header = json.loads(body[:length])
    sizes = [item["parameters"]["binary_data_size"] for item in header["outputs"]]
    assert all("data" not in item for item in header["outputs"])
    assert sizes == [12, 8 + len(b"0.700000:1:b") + len(b"0.200000:2:c")]
    assert length + sum(sizes) == len(body)
    result = triton_http.InferenceServerClient.parse_response_body(body, header_length=length)
    np.testing.assert_array_equal(result.as_numpy("logits"), [[1.5, -2.0, 0.25]])
    assert result.as_numpy("probabilities").tolist() == [[b"0.700000:1:b", b"0.200000:2:c"]]
    assert result.get_response()["id"] == "r9"


def test_each_output_may_choose_binary_or_json() -> None:
    response = _response()
    response.outputs[0].parameters = {"binary_data": True}
    response.outputs[1].parameters = {"binary_data": False}
    mixed = encode_response(response, binary_default=False)
    length = int(mixed.headers[HEADER_LENGTH])
    header = json.loads(bytes(mixed.body)[:length])
    assert header["outputs"][0]["parameters"] == {"binary_data_size": 12} and "data" not in header["outputs"][0]
    assert header["outputs"][1]["data"] == ["0.700000:1:b", "0.200000:2:c"]
    assert len(bytes(mixed.body)) == length + 12
    response.outputs[0].parameters = {"binary_data": False}
    assert encode_response(response, binary_default=True).media_type == "application/json"
