"""The wire format of parameters in Flower messages: all tensors of one message in one array.

Flower's `ArrayRecord` stores every entry as its own `.npy` blob (a header of about 128 bytes)
under its key (PEFT names are 50-60 characters), so a LoRA of many small matrices pays a large
per-tensor overhead on the wire. `pack` writes a whole `Params` as one uint8 array under one
short key: a 4-byte little-endian header length, a zlib-compressed JSON index
(`[[key, dtype, shape], ...]`, keys sorted) and the raw little-endian bytes of every array in
index order. `unpack` reverses it exactly (same keys, dtypes, shapes and values) and checks the
sizes; it also reads a plain record of one entry per key, so state saved before this format
still loads. This module knows nothing about methods, rounds or what the tensors mean.

A compact wire dtype (`wire_dtype="bfloat16"` or `"float16"`) ships every floating-point array
in 2 bytes per value: the index entry then names the stored dtype as a fourth field
(`[key, dtype, shape, "bfloat16"]`) and `unpack` widens the values back to `dtype`, so whoever
reads them (e.g. an aggregation) computes in the original precision; only the shipped values
are rounded (bfloat16: round to nearest even, float32's range; float16: numpy's cast, refused
if a finite value would overflow). Integer and bool arrays are always shipped as they are.
"""

from __future__ import annotations

import json
import zlib

import numpy as np
from fedpersona.trainer.errors import WireFormatError
from flwr.app import Array, ArrayRecord

Params = dict[str, np.ndarray]

PACKED_KEY = "p"
_LENGTH = 4
WIRE_DTYPES = ("float32", "bfloat16", "float16")  # float32: every array as it is


def check_wire_dtype(wire_dtype: str) -> str:
    """`wire_dtype` if it is one of `WIRE_DTYPES`, else `WireFormatError`."""
    if wire_dtype not in WIRE_DTYPES:
        raise WireFormatError(f"unknown wire dtype {wire_dtype!r}; known: {', '.join(WIRE_DTYPES)}")
    return wire_dtype


def _to_bfloat16(value: np.ndarray) -> np.ndarray:
    """float -> bfloat16 bit patterns (uint16), round to nearest even; NaN stays NaN."""
    bits = np.ascontiguousarray(value, dtype=np.float32).view(np.uint32)
    rounded = (bits + (np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1)))) >> 16
    nan = np.isnan(value)
    out = rounded.astype(np.uint16)
    out[nan] = np.uint16(0x7FC0)
    return out


def _from_bfloat16(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _encode(value: np.ndarray, wire_dtype: str) -> tuple[bytes, str | None]:
    """(the shipped bytes of `value`, its stored dtype name if not its own)."""
    if wire_dtype == "float32" or value.dtype.kind != "f" or value.dtype.itemsize <= 2:
        return value.tobytes(), None
    if wire_dtype == "bfloat16":
        return _to_bfloat16(value).astype("<u2").tobytes(), "bfloat16"
    finite = value[np.isfinite(value)]
    if finite.size and float(np.abs(finite).max()) > float(np.finfo(np.float16).max):
        raise WireFormatError("a value exceeds float16's range; ship it as bfloat16 or float32")
    return value.astype("<f2").tobytes(), "float16"


def _decode(raw: bytes, offset: int, count: int, dtype: np.dtype, stored: str | None) -> np.ndarray:
    if stored is None:
        return np.frombuffer(raw, dtype=dtype, count=count, offset=offset)
    wire = np.frombuffer(
        raw, dtype="<u2" if stored == "bfloat16" else "<f2", count=count, offset=offset
    )
    wide = _from_bfloat16(wire) if stored == "bfloat16" else wire.astype(np.float32)
    return wide.astype(dtype)


def pack_bytes(params: Params, *, wire_dtype: str = "float32") -> np.ndarray:
    """`params` as one uint8 array (index + data); deterministic for equal inputs. Floating
    arrays are shipped in `wire_dtype` (one of `WIRE_DTYPES`)."""
    check_wire_dtype(wire_dtype)
    index: list[list[object]] = []
    chunks = []
    for key in sorted(params):
        value = np.asarray(params[key], order="C")
        little = value.astype(value.dtype.newbyteorder("<"), copy=False)
        data, stored = _encode(little, wire_dtype)
        entry: list[object] = [key, little.dtype.str, list(value.shape)]
        index.append(entry if stored is None else [*entry, stored])
        chunks.append(data)
    header = zlib.compress(json.dumps(index, separators=(",", ":")).encode("utf-8"), 9)
    blob = len(header).to_bytes(_LENGTH, "little") + header + b"".join(chunks)
    return np.frombuffer(blob, dtype=np.uint8).copy()


def unpack_bytes(blob: np.ndarray) -> Params:
    """The `Params` a `pack_bytes` array holds; `WireFormatError` if it is malformed."""
    data = np.asarray(blob)
    if data.dtype != np.uint8 or data.ndim != 1:
        raise WireFormatError(f"a packed record is a 1-D uint8 array, got {data.dtype}{data.shape}")
    raw = data.tobytes()
    if len(raw) < _LENGTH:
        raise WireFormatError("a packed record is too short to hold its index")
    length = int.from_bytes(raw[:_LENGTH], "little")
    try:
        index = json.loads(zlib.decompress(raw[_LENGTH : _LENGTH + length]))
    except (zlib.error, ValueError) as e:
        raise WireFormatError(f"the index of a packed record is unreadable: {e}") from e
    out: Params = {}
    offset = _LENGTH + length
    for entry in index:
        try:
            key, dtype_str, shape = (
                str(entry[0]),
                np.dtype(entry[1]),
                tuple(int(s) for s in entry[2]),
            )
            stored = str(entry[3]) if len(entry) > 3 else None
        except (TypeError, ValueError, IndexError) as e:
            raise WireFormatError(f"a packed record has a malformed index entry {entry!r}") from e
        if stored is not None and (stored not in WIRE_DTYPES[1:] or dtype_str.kind != "f"):
            raise WireFormatError(f"a packed record stores {key!r} ({dtype_str}) as {stored!r}")
        count = int(np.prod(shape, dtype=np.int64))
        size = count * (2 if stored is not None else dtype_str.itemsize)
        if offset + size > len(raw):
            raise WireFormatError(f"a packed record ends inside {key!r}")
        value = _decode(raw, offset, count, dtype_str, stored)
        out[key] = value.reshape(shape).astype(dtype_str.newbyteorder("="), copy=True)
        offset += size
    if offset != len(raw):
        raise WireFormatError(f"a packed record has {len(raw) - offset} bytes after its last array")
    return out


def pack(params: Params, *, wire_dtype: str = "float32") -> ArrayRecord:
    """`params` as an `ArrayRecord` of one entry (empty params: an empty record), floating
    arrays shipped in `wire_dtype`."""
    if not params:
        return ArrayRecord({})
    return ArrayRecord({PACKED_KEY: Array(pack_bytes(params, wire_dtype=wire_dtype))})


def unpack(record: ArrayRecord) -> Params:
    """The `Params` of a `pack` record, or of a plain record with one entry per key."""
    keys = list(record.keys())
    if keys == [PACKED_KEY]:
        return unpack_bytes(record[PACKED_KEY].numpy())
    return {k: v.numpy() for k, v in record.items()}
