from __future__ import annotations

import struct

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service import codec
from service.errors import InvalidInput
from service.types import NUMPY_DTYPES

DATATYPES = sorted(NUMPY_DTYPES)


def _prefixed(*items: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


# ---- BYTES: 4-byte little-endian length prefixes ---------------------------------------------------


def test_bytes_tensor_layout() -> None:
    assert codec.serialize_bytes_tensor([b"ab", b"", "é"]) == _prefixed(b"ab", b"", "é".encode())


@given(st.lists(st.binary(max_size=64), max_size=20))
def test_bytes_tensor_round_trip(items: list[bytes]) -> None:
    buffer = codec.serialize_bytes_tensor(items)
    assert codec.deserialize_bytes_tensor(buffer, name="x") == items
    assert codec.decode_raw(buffer, "BYTES", [len(items)], name="x") == items


@given(st.binary(max_size=64), st.integers(min_value=0, max_value=8))
@settings(max_examples=300)
def test_bytes_tensor_never_fails_with_anything_but_invalid_input(buffer: bytes, count: int) -> None:
    try:
        items = codec.deserialize_bytes_tensor(buffer, name="x", count=count)
    except InvalidInput as exc:
        assert "'x'" in exc.message
    else:
        assert codec.serialize_bytes_tensor(items) == buffer


@pytest.mark.parametrize(
    ("buffer", "fragment"),
    [
        (b"\x01\x00", "truncated BYTES length prefix"),
        (struct.pack("<I", 10) + b"abc", "declares 10 bytes, 3 remain"),
        (struct.pack("<I", 2**32 - 1), "declares 4294967295 bytes"),
    ],
)
def test_malformed_bytes_tensor(buffer: bytes, fragment: str) -> None:
    with pytest.raises(InvalidInput, match=fragment) as caught:
        codec.deserialize_bytes_tensor(buffer, name="image")
    assert "input 'image'" in caught.value.message


def test_bytes_element_count_must_fill_the_shape() -> None:
    with pytest.raises(InvalidInput, match=r"1 elements for shape \[2\] \(2\)"):
        codec.decode_raw(_prefixed(b"a"), "BYTES", [2], name="image")
    with pytest.raises(InvalidInput, match=r"more than the 1 elements its shape \[1\] holds"):
        codec.decode_raw(_prefixed(b"a", b"b"), "BYTES", [1], name="image")


# ---- numeric raw data -------------------------------------------------------------------------------


@st.composite
def numeric_arrays(draw: st.DrawFn) -> tuple[str, np.ndarray]:
    datatype = draw(st.sampled_from(DATATYPES))
    dtype = np.dtype(NUMPY_DTYPES[datatype])
    byteorder = draw(st.sampled_from(["<", ">"])) if dtype.itemsize > 1 else "="
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4))
    return datatype, draw(hnp.arrays(dtype.newbyteorder(byteorder), shape))


@given(numeric_arrays())
def test_numeric_round_trip(case: tuple[str, np.ndarray]) -> None:
    datatype, array = case
    raw = codec.encode_raw(array, datatype)
    assert raw == array.astype(array.dtype.newbyteorder("<")).tobytes()  # little-endian whatever the input
    decoded = codec.decode_raw(raw, datatype, list(array.shape), name="x")
    assert isinstance(decoded, np.ndarray)
    assert decoded.dtype.isnative and decoded.dtype == np.dtype(NUMPY_DTYPES[datatype])
    assert decoded.shape == array.shape
    np.testing.assert_array_equal(decoded, array)
    assert decoded.flags.writeable


def test_fp32_little_endian_layout() -> None:
    raw = struct.pack("<3f", 1.0, -2.5, 3.25)
    decoded = codec.decode_raw(raw, "FP32", [1, 3], name="x")
    np.testing.assert_array_equal(decoded, np.array([[1.0, -2.5, 3.25]], dtype=np.float32))


def test_bool_is_any_non_zero_byte() -> None:
    decoded = codec.decode_raw(bytes([0, 1, 2, 255]), "BOOL", [4], name="x")
    assert decoded.tolist() == [False, True, True, True]  # type: ignore[union-attr]


@given(
    st.binary(max_size=48),
    st.sampled_from([*DATATYPES, "BYTES", "BF16", "fp32", ""]),
    st.lists(st.integers(min_value=-2, max_value=6), max_size=4),
)
@settings(max_examples=500)
def test_malformed_raw_is_invalid_input_never_another_error(buffer: bytes, datatype: str, shape: list[int]) -> None:
    try:
        codec.decode_raw(buffer, datatype, shape, name="x")
    except InvalidInput as exc:
        assert "input 'x'" in exc.message


@pytest.mark.parametrize(
    ("buffer", "datatype", "shape", "fragment"),
    [
        (b"\x00" * 5, "FP32", [1, 3], r"5 bytes of raw data, but shape \[1, 3\] of FP32 needs 12"),
        (b"", "FP32", [-1, 3], "must be non-negative integers"),
        (b"\x00\x00", "BF16", [1], "unknown datatype 'BF16'"),
        (b"\x00" * 8, "FP64", [2**62, 2**62], "needs"),
    ],
)
def test_malformed_raw(buffer: bytes, datatype: str, shape: list[int], fragment: str) -> None:
    with pytest.raises(InvalidInput, match=fragment):
        codec.decode_raw(buffer, datatype, shape, name="pixels")


def test_encode_bytes_output_from_object_array() -> None:
    data = np.array([[b"a", b"bc"]], dtype=object)
    assert codec.encode_raw(data, "BYTES") == _prefixed(b"a", b"bc")


def test_encode_unknown_datatype_is_a_server_bug() -> None:
    with pytest.raises(ValueError, match="BF16"):
        codec.encode_raw(np.zeros(2, np.float32), "BF16")


# ---- typed value lists (gRPC contents) ----------------------------------------------------------------


def test_from_values() -> None:
    array = codec.from_values([1.0, 2.0, 3.0, 4.0], "FP32", [2, 2], name="x")
    np.testing.assert_array_equal(array, np.array([[1, 2], [3, 4]], dtype=np.float32))
    assert codec.from_values(["é", b"b"], "BYTES", [2], name="x") == ["é".encode(), b"b"]


@pytest.mark.parametrize(
    ("values", "datatype", "shape", "fragment"),
    [
        ([1.0, 2.0], "FP32", [3], r"2 elements for shape \[3\] \(3\)"),
        ([300], "INT8", [1], "values are not INT8"),
        ([-1], "UINT32", [1], "values are not UINT32"),
        ([1], "BYTES", [1], "bytes or strings"),
    ],
)
def test_from_values_rejects(values: list[object], datatype: str, shape: list[int], fragment: str) -> None:
    with pytest.raises(InvalidInput, match=fragment):
        codec.from_values(values, datatype, shape, name="x")
