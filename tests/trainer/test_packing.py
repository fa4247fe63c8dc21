"""The wire format of parameters: one packed array per message, exact round trip, and a PFTT
upload at most half of FedAvg's on the wire."""

from __future__ import annotations

import numpy as np
import pytest
from fedpersona.trainer.errors import WireFormatError
from fedpersona.trainer.flower.packing import PACKED_KEY, pack, pack_bytes, unpack, unpack_bytes
from fedpersona.trainer.flower.strategy import from_record, to_record
from flwr.app import Array, ArrayRecord
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

_KEY = st.text(alphabet="abcdefghijklmnopqrstuvwxyz._0123456789", min_size=1, max_size=60)
_ARRAY = st.one_of(
    hnp.arrays(np.float32, hnp.array_shapes(min_dims=0, max_dims=3, max_side=5)),
    hnp.arrays(np.uint8, hnp.array_shapes(min_dims=1, max_dims=1, max_side=9)),
    hnp.arrays(np.int64, hnp.array_shapes(min_dims=1, max_dims=2, max_side=4)),
)


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(_KEY, _ARRAY, max_size=6))
def test_round_trip_is_exact(params: dict[str, np.ndarray]) -> None:
    back = unpack(pack(params))
    assert set(back) == set(params)
    for key, value in params.items():
        assert back[key].dtype == value.dtype and back[key].shape == value.shape
        np.testing.assert_array_equal(back[key], value)  # NaNs compare equal here too


def test_one_entry_per_message_and_empty_is_empty() -> None:
    params = {f"layer{i}.lora_A.weight": np.ones((4, 8), np.float32) for i in range(5)}
    record = to_record(params)
    assert list(record.keys()) == [PACKED_KEY]
    assert set(from_record(record)) == set(params)
    assert pack({}).count_bytes() == 0 and unpack(ArrayRecord({})) == {}


def test_plain_records_still_read() -> None:
    record = ArrayRecord({"a": Array(np.arange(3, dtype=np.float32))})
    np.testing.assert_array_equal(unpack(record)["a"], np.arange(3, dtype=np.float32))


def test_malformed_blobs_are_refused() -> None:
    blob = pack_bytes({"a": np.arange(10, dtype=np.float32)})
    with pytest.raises(WireFormatError, match="ends inside"):
        unpack_bytes(blob[:-4])
    with pytest.raises(WireFormatError, match="after its last array"):
        unpack_bytes(np.concatenate([blob, np.zeros(3, np.uint8)]))
    with pytest.raises(WireFormatError, match="unreadable"):
        unpack_bytes(np.concatenate([blob[:4], np.full(20, 7, np.uint8)]))
    with pytest.raises(WireFormatError, match="uint8"):
        unpack_bytes(np.zeros(8, np.float32))


def _lora(rank: int, modules: int = 8, width: int = 128) -> dict[str, np.ndarray]:
    out = {}
    for m in range(modules):
        name = f"base_model.model.model.layers.{m // 4}.self_attn.proj{m % 4}"
        out[f"{name}.lora_A.weight"] = np.ones((rank, width), np.float32)
        out[f"{name}.lora_B.weight"] = np.ones((width, rank), np.float32)
    return out


def test_packing_removes_the_per_tensor_overhead() -> None:
    params = _lora(8)
    data = sum(v.nbytes for v in params.values())
    plain = ArrayRecord({k: Array(v) for k, v in params.items()}).count_bytes()
    packed = pack(params).count_bytes()
    assert packed < plain
    assert packed - data < 0.15 * (plain - data)  # what is left of the overhead
