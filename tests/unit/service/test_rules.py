"""The protocol-neutral request rules: deadlines and their precedence, classification, outputs, inputs, image field."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from service import rules
from service.errors import InvalidInput

NOW = 1000.0


def _deadline(
    parameters: dict[str, Any] | None = None,
    header: str | None = None,
    transport_s: float | None = None,
    default_s: float = 0.0,
) -> float | None:
    return rules.deadline(
        parameters=parameters or {}, header=header, transport_s=transport_s, default_s=default_s, now=NOW
    )


# ---- deadlines --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("parameters", "header", "transport_s", "default_s", "seconds"),
    [
        ({}, None, None, 0.0, None),  # nothing given, no default: no deadline
        ({}, None, None, 3.0, 3.0),  # the default, when the client gave nothing
        ({"timeout": 2_000_000}, None, None, 3.0, 2.0),  # µs
        ({"timeout": 9_000_000}, None, None, 3.0, 9.0),  # the default is not a cap
        ({}, "250", None, 3.0, 0.25),  # ms
        ({}, None, 30.0, 3.0, 30.0),  # the transport's deadline (gRPC)
        ({"timeout": 2_000_000}, "250", None, 0.0, 0.25),  # the earliest wins
        ({"timeout": 2_000_000}, "5000", None, 0.0, 2.0),
        ({"timeout": 2_000_000}, "5000", 1.0, 0.0, 1.0),
        ({"timeout": 2_000_000}, None, 30.0, 0.0, 2.0),
        ({"timeout": 1.5e6}, None, None, 0.0, 1.5),  # the same value forms everywhere: int, float, string
        ({"timeout": "1500000"}, None, None, 0.0, 1.5),
        ({"timeout": " 1.5e6 "}, None, None, 0.0, 1.5),
        ({}, "1.5", None, 0.0, 0.0015),
    ],
)
def test_deadline_precedence(
    parameters: dict[str, Any], header: str | None, transport_s: float | None, default_s: float, seconds: float | None
) -> None:
    deadline = _deadline(parameters, header, transport_s, default_s)
    assert deadline == (None if seconds is None else pytest.approx(NOW + seconds))


@pytest.mark.parametrize("value", ["abc", "", None, True, False, [1], {"a": 1}, 0, -5, -0.5, "nan", "inf", 10**400])
def test_bad_timeout_values_are_refused_whatever_their_source(value: Any) -> None:
    with pytest.raises(InvalidInput, match=r"invalid timeout: parameter 'timeout' must be a positive number of micro"):
        _deadline({"timeout": value}, transport_s=5.0)  # even beside a valid limit
    if isinstance(value, str):
        with pytest.raises(InvalidInput, match="invalid timeout: header X-Request-Timeout-Ms must be a positive"):
            _deadline(header=value, default_s=3.0)


def test_the_time_left_of_a_transport_deadline_may_already_be_gone() -> None:
    assert _deadline(transport_s=-0.5) == pytest.approx(NOW - 0.5)  # refused later as DeadlineExceeded


# ---- classification and top-k -------------------------------------------------------------------
@pytest.mark.parametrize(("parameters", "k"), [({}, 0), ({"classification": 0}, 0), ({"classification": 3}, 3)])
def test_classification(parameters: dict[str, Any], k: int) -> None:
    assert rules.classification(parameters, "probabilities") == k


@pytest.mark.parametrize("value", [-1, True, "3", 1.5, None, [1], 2**63])
def test_bad_classification_values(value: Any) -> None:
    with pytest.raises(InvalidInput, match="output 'probabilities': classification must be a non-negative integer"):
        rules.classification({"classification": value}, "probabilities")


@pytest.mark.parametrize(("k", "labels", "expected"), [(5, 3, 3), (2, 3, 2), (0, 3, 1), (-4, 3, 1)])
def test_top_k_stays_within_the_labels(k: int, labels: int, expected: int) -> None:
    assert rules.top_k(k, labels) == expected


# ---- outputs ----------------------------------------------------------------------------------
def test_check_outputs() -> None:
    rules.check_outputs([], ("logits", "probabilities"))
    rules.check_outputs(["probabilities", "logits"], ("logits", "probabilities"))
    with pytest.raises(InvalidInput, match="unknown output 'x'; this model has logits, probabilities"):
        rules.check_outputs(["logits", "x"], ("logits", "probabilities"))
    rules.check_outputs(["logits", "logits"], ("logits", "probabilities"))  # e.g. as top-k and as a tensor


# ---- inputs -----------------------------------------------------------------------------------
@dataclass
class Tensor:
    name: str
    datatype: str


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ([Tensor("image", "BYTES")], None),
        ([Tensor("input", "FP32")], None),
        ([], r"expected exactly one input \('image' BYTES or 'input' FP32\), got 0"),
        ([Tensor("image", "BYTES")] * 2, "got 2"),
        ([Tensor("nope", "BYTES")], r"unknown input 'nope'; send 'image' \(BYTES\) or 'input' \(FP32\)"),
        ([Tensor("input", "INT32")], "input 'input': datatype INT32 not supported; send FP32"),
        ([Tensor("image", "FP32")], "input 'image': datatype FP32 not supported; send BYTES"),
    ],
)
def test_check_inputs(inputs: list[Tensor], message: str | None) -> None:
    if message is None:
        rules.check_inputs(inputs, image_input="image", tensor_input="input")
        return
    with pytest.raises(InvalidInput, match=message):
        rules.check_inputs(inputs, image_input="image", tensor_input="input")


# ---- the image of a TorchServe request ----------------------------------------------------------
@pytest.mark.parametrize(
    ("fields", "chosen"),
    [
        ({"body": b"raw"}, ("body", b"raw")),
        ({"data": b"img"}, ("data", b"img")),
        ({"data": b"img", "other": b"x"}, ("data", b"img")),  # other fields are left alone
    ],
)
def test_image_field(fields: dict[str, bytes], chosen: tuple[str, bytes]) -> None:
    assert rules.image_field(fields) == chosen


@pytest.mark.parametrize(
    ("fields", "got"),
    [({}, "nothing"), ({"file": b"x"}, "'file'"), ({"data": b"1", "body": b"2"}, "'data', 'body'")],
)
def test_image_field_is_never_guessed(fields: dict[str, bytes], got: str) -> None:
    message = f"send one image as the raw request body or as a multipart/gRPC field named 'data' (got {got})"
    with pytest.raises(InvalidInput) as caught:
        rules.image_field(fields)
    assert caught.value.message == message
