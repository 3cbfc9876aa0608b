"""Tensor bytes on the wire, shared by the gRPC adapter and HTTP's binary tensor extension.

Raw tensor data in the Open Inference Protocol is the tensor's elements in row-major order,
little-endian; a ``BYTES`` element is a 4-byte little-endian length followed by that many bytes.
Every decoding error is an :class:`InvalidInput` naming the input, whatever the bytes are.

    raw = encode_raw(np.ones((1, 3), np.float32), "FP32")
    decode_raw(raw, "FP32", [1, 3], name="x")                  # array([[1., 1., 1.]], dtype=float32)
    deserialize_bytes_tensor(serialize_bytes_tensor([b"a", b""]), name="x")   # [b'a', b'']
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from service.errors import InvalidInput
from service.types import NUMPY_DTYPES

LENGTH_PREFIX = struct.Struct("<I")

TensorData = np.ndarray | list[bytes]


def element_count(shape: Sequence[int], *, name: str) -> int:
    """Number of elements of ``shape``; negative or non-integer dimensions are the client's error."""
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise InvalidInput(f"input '{name}': shape {list(shape)} must be non-negative integers")
    return math.prod(shape)


def check_datatype(datatype: str, *, name: str) -> None:
    """``datatype`` is one of the v2 datatypes (BYTES or a numeric one), whatever the encoding."""
    if datatype != "BYTES" and datatype not in NUMPY_DTYPES:
        raise InvalidInput(f"input '{name}': unknown datatype '{datatype}'")


def check_element_count(found: int, shape: Sequence[int], *, name: str) -> None:
    """``found`` elements fill ``shape`` exactly; the same message over JSON, binary and gRPC."""
    count = element_count(shape, name=name)
    if found > count:
        raise InvalidInput(f"input '{name}': more than the {count} elements its shape {list(shape)} holds")
    if found < count:
        raise InvalidInput(f"input '{name}': {found} elements for shape {list(shape)} ({count})")


def wire_dtype(datatype: str, *, name: str) -> np.dtype[Any]:
    """The little-endian NumPy dtype of a numeric v2 datatype (``FP32`` -> ``<f4``)."""
    check_datatype(datatype, name=name)
    if datatype not in NUMPY_DTYPES:
        raise InvalidInput(f"input '{name}': BYTES is not a numeric datatype")
    dtype: np.dtype[Any] = np.dtype(NUMPY_DTYPES[datatype])
    return dtype.newbyteorder("<")


def serialize_bytes_tensor(items: Iterable[bytes | str]) -> bytes:
    """Length-prefix each element (``str`` as UTF-8) and join them."""
    parts: list[bytes] = []
    for item in items:
        data = item.encode("utf-8") if isinstance(item, str) else bytes(item)
        parts.append(LENGTH_PREFIX.pack(len(data)))
        parts.append(data)
    return b"".join(parts)


def deserialize_bytes_tensor(
    buffer: bytes, *, name: str, count: int | None = None, shape: Sequence[int] | None = None
) -> list[bytes]:
    """Split length-prefixed elements; with ``count``, stop as soon as there are more than that."""
    items: list[bytes] = []
    view = memoryview(buffer)
    offset, size = 0, len(buffer)
    while offset < size:
        if count is not None and len(items) >= count:
            check_element_count(count + 1, list(shape) if shape is not None else [count], name=name)
        if offset + LENGTH_PREFIX.size > size:
            raise InvalidInput(f"input '{name}': truncated BYTES length prefix at byte {offset}")
        (length,) = LENGTH_PREFIX.unpack_from(buffer, offset)
        offset += LENGTH_PREFIX.size
        if length > size - offset:
            raise InvalidInput(
                f"input '{name}': BYTES element {len(items)} declares {length} bytes, {size - offset} remain"
            )
        items.append(bytes(view[offset : offset + length]))
        offset += length
    return items


def decode_raw(buffer: bytes, datatype: str, shape: Sequence[int], *, name: str) -> TensorData:
    """Raw bytes -> ``list[bytes]`` for BYTES, else a new native-endian array of ``shape``."""
    count = element_count(shape, name=name)
    if datatype == "BYTES":
        items = deserialize_bytes_tensor(buffer, name=name, count=count, shape=shape)
        check_element_count(len(items), shape, name=name)
        return items
    dtype = wire_dtype(datatype, name=name)
    expected = count * dtype.itemsize
    if len(buffer) != expected:
        raise InvalidInput(
            f"input '{name}': {len(buffer)} bytes of raw data, but shape {list(shape)} of {datatype} needs {expected}"
        )
    if datatype == "BOOL":  # any non-zero byte is true; a bool view of bytes other than 0/1 is undefined
        flags: np.ndarray = (np.frombuffer(buffer, dtype=np.uint8) != 0).reshape(shape)
        return flags
    return np.frombuffer(buffer, dtype=dtype).astype(dtype.newbyteorder("="), copy=True).reshape(shape)


def encode_raw(data: TensorData, datatype: str) -> bytes:
    """An output's data as raw bytes (BYTES length-prefixed). Data that does not fit is a server bug."""
    if datatype == "BYTES":
        items = data if isinstance(data, list) else np.asarray(data, dtype=object).reshape(-1).tolist()
        return serialize_bytes_tensor(items)
    if datatype not in NUMPY_DTYPES:
        raise ValueError(f"cannot encode datatype {datatype!r}")  # an output's datatype: a server bug
    dtype = wire_dtype(datatype, name="")
    return np.ascontiguousarray(data, dtype=dtype).tobytes()


def from_values(values: Sequence[Any], datatype: str, shape: Sequence[int], *, name: str) -> TensorData:
    """A flat list of element values (gRPC typed contents) -> tensor data, checked against ``shape``."""
    check_element_count(len(values), shape, name=name)
    if datatype == "BYTES":
        if not all(isinstance(v, bytes | str) for v in values):
            raise InvalidInput(f"input '{name}': BYTES elements must be bytes or strings")
        return [v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in values]
    dtype = wire_dtype(datatype, name=name).newbyteorder("=")
    try:
        return np.asarray(values, dtype=dtype).reshape(shape)
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidInput(f"input '{name}': values are not {datatype}: {exc}") from exc
