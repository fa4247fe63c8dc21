"""The wire format of parameters: one packed array per message, exact round trip, and a PFTT
upload at most half of FedAvg's on the wire (PFTT ships its shared half in bfloat16)."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
from fedpersona.trainer.errors import MethodError, WireFormatError
from fedpersona.trainer.flower.packing import (
    PACKED_KEY,
    WIRE_DTYPES,
    pack,
    pack_bytes,
    unpack,
    unpack_bytes,
)
from fedpersona.trainer.flower.strategy import from_record, to_record
from fedpersona.trainer.methods.pftt import WIRE_DTYPES as PFTT_WIRE_DTYPES
from fedpersona.trainer.methods.pftt import Pftt
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


@settings(max_examples=40, deadline=None)
@given(
    st.dictionaries(_KEY, _ARRAY, max_size=6),
    st.sampled_from(["bfloat16", "float16"]),
)
def test_compact_wire_dtypes_round_trip_within_their_precision(
    params: dict[str, np.ndarray], wire_dtype: str
) -> None:
    finite = {
        k: np.nan_to_num(v, posinf=1.0, neginf=-1.0).clip(-6e4, 6e4) if v.dtype.kind == "f" else v
        for k, v in params.items()
    }
    back = unpack(pack(finite, wire_dtype=wire_dtype))
    assert set(back) == set(finite)
    rel = 2.0**-8 if wire_dtype == "bfloat16" else 2.0**-10
    for key, value in finite.items():
        assert back[key].dtype == value.dtype and back[key].shape == value.shape
        if value.dtype.kind == "f":  # widened back; rounded by at most half a unit
            tiny = np.finfo(np.float16).tiny if wire_dtype == "float16" else 1e-40  # subnormals
            assert np.all(np.abs(back[key] - value) <= rel * np.abs(value) + tiny)
        else:
            np.testing.assert_array_equal(back[key], value)  # never narrowed


def test_bfloat16_keeps_specials_and_rounds_to_nearest_even() -> None:
    values = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-30, 3e38, 1.0 + 2.0**-8], np.float32)
    back = unpack(pack({"a": values}, wire_dtype="bfloat16"))["a"]
    assert np.isnan(back[0]) and back[1] == np.inf and back[2] == -np.inf
    assert back[3] == 0.0 and np.signbit(back[4])
    np.testing.assert_allclose(back[5:7], values[5:7], rtol=2.0**-8)
    assert back[7] == 1.0  # a tie rounds to the even mantissa


def test_compact_wire_dtypes_halve_the_data_and_are_checked() -> None:
    params = _lora(8)
    data = sum(v.nbytes for v in params.values())
    full = pack(params).count_bytes()
    for wire_dtype in ("bfloat16", "float16"):
        overhead = pack(params, wire_dtype=wire_dtype).count_bytes() - data // 2
        assert full - data <= overhead <= full - data + 32  # the index names the stored dtype
    with pytest.raises(WireFormatError, match="unknown wire dtype"):
        pack(params, wire_dtype="int8")
    with pytest.raises(WireFormatError, match="float16's range"):
        pack({"a": np.array([7e4], np.float32)}, wire_dtype="float16")
    bad = pack_bytes({"a": np.arange(4, dtype=np.float32)}, wire_dtype="bfloat16").tobytes()
    length = int.from_bytes(bad[:4], "little")
    index = zlib.compress(b'[["a","<i4",[4],"bfloat16"]]', 9)
    forged = len(index).to_bytes(4, "little") + index + bad[4 + length :]
    with pytest.raises(WireFormatError, match="stores 'a'"):
        unpack_bytes(np.frombuffer(forged, np.uint8))


def test_pftt_ships_its_shared_half_in_bfloat16_under_half_of_fedavg() -> None:
    """PFTT's shipped upload (rank 4 of FedAvg's 8, bfloat16) is at most half of FedAvg's
    float32 one; in the same dtype it is half the data plus the same fixed overhead."""
    pftt = Pftt()
    assert pftt.wire_dtype == "bfloat16" and PFTT_WIRE_DTYPES == WIRE_DTYPES
    with pytest.raises(MethodError, match="wire_dtype"):
        Pftt(wire_dtype="int8")
    fedavg = pack(_lora(8)).count_bytes()
    shipped = pack(_lora(4), wire_dtype=pftt.wire_dtype).count_bytes()
    assert shipped <= 0.5 * fedavg
    same = pack(_lora(8), wire_dtype="bfloat16").count_bytes()
    assert 0.5 * same < shipped < 0.51 * same
