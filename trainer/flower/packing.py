"""The wire format of parameters in Flower messages: all tensors of one message in one array.

Flower's `ArrayRecord` stores every entry as its own `.npy` blob (a header of about 128 bytes)
under its key (PEFT names are 50-60 characters), so a LoRA of many small matrices pays a large
per-tensor overhead on the wire. `pack` writes a whole `Params` as one uint8 array under one
short key: a 4-byte little-endian header length, a zlib-compressed JSON index
(`[[key, dtype, shape], ...]`, keys sorted) and the raw little-endian bytes of every array in
index order. `unpack` reverses it exactly (same keys, dtypes, shapes and values) and checks the
sizes; it also reads a plain record of one entry per key, so state saved before this format
still loads. This module knows nothing about methods, rounds or what the tensors mean.
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


def pack_bytes(params: Params) -> np.ndarray:
    """`params` as one uint8 array (index + data); deterministic for equal inputs."""
    index = []
    chunks = []
    for key in sorted(params):
        value = np.asarray(params[key], order="C")
        little = value.astype(value.dtype.newbyteorder("<"), copy=False)
        index.append([key, little.dtype.str, list(value.shape)])
        chunks.append(little.tobytes())
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
        except (TypeError, ValueError, IndexError) as e:
            raise WireFormatError(f"a packed record has a malformed index entry {entry!r}") from e
        size = int(np.prod(shape, dtype=np.int64)) * dtype_str.itemsize
        if offset + size > len(raw):
            raise WireFormatError(f"a packed record ends inside {key!r}")
        value = np.frombuffer(raw, dtype=dtype_str, count=size // dtype_str.itemsize, offset=offset)
        out[key] = value.reshape(shape).astype(dtype_str.newbyteorder("="), copy=True)
        offset += size
    if offset != len(raw):
        raise WireFormatError(f"a packed record has {len(raw) - offset} bytes after its last array")
    return out


def pack(params: Params) -> ArrayRecord:
    """`params` as an `ArrayRecord` of one entry (empty params: an empty record)."""
    if not params:
        return ArrayRecord({})
    return ArrayRecord({PACKED_KEY: Array(pack_bytes(params))})


def unpack(record: ArrayRecord) -> Params:
    """The `Params` of a `pack` record, or of a plain record with one entry per key."""
    keys = list(record.keys())
    if keys == [PACKED_KEY]:
        return unpack_bytes(record[PACKED_KEY].numpy())
    return {k: v.numpy() for k, v in record.items()}
