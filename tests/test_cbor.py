"""Tests of smartx_device.cbor: RFC 8949 vectors, differential against cbor2, fuzzing, limits."""

from __future__ import annotations

import importlib.util
import json
import math
import pathlib
import struct
import tracemalloc

import cbor2
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from smartx_device import _utf8
from smartx_device import cbor
from smartx_device.cbor import DEPTH_CEILING, MAX_DEPTH, MAX_ITEMS, dumps, loads
from smartx_device.errors import (
    CBORDecodeError,
    CBOREncodeError,
    LocalProtocolError,
    RemoteProtocolError,
)
from smartx_device.reasons import CLOSE_MALFORMED

VECTORS = pathlib.Path(__file__).parent / "vectors"


def _load_generator():
    spec = importlib.util.spec_from_file_location("gen_cbor_framing", VECTORS / "gen_cbor_framing.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GEN = _load_generator()
ERROR = GEN.ERROR


def same(a, b) -> bool:
    """Structural equality: NaN equals NaN, -0.0 differs from 0.0, bool differs from int,
    tuples count as lists and bytearrays as bytes (as CBOR sees them)."""
    if isinstance(a, tuple):
        a = list(a)
    if isinstance(b, tuple):
        b = list(b)
    if isinstance(a, bytearray):
        a = bytes(a)
    if isinstance(b, bytearray):
        b = bytes(b)
    if isinstance(a, float) or isinstance(b, float):
        if not (isinstance(a, float) and isinstance(b, float)):
            return False
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)
    if type(a) is not type(b):
        return False
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b


# ------------------------------------------------------------------------------------------
# RFC 8949 Appendix A: the hex table lives in the vectors generator (one source for both).

RFC_OK = [(name, hx, value) for name, hx, value in GEN.RFC8949 if not (isinstance(value, str) and value == ERROR)]
RFC_ERR = [(name, hx) for name, hx, value in GEN.RFC8949 if isinstance(value, str) and value == ERROR]


@pytest.mark.parametrize("name, hex_text, value", RFC_OK, ids=[v[0] for v in RFC_OK])
def test_rfc8949_decode(name, hex_text, value):
    assert same(loads(bytes.fromhex(hex_text)), value)


@pytest.mark.parametrize("name, hex_text, value", RFC_OK, ids=[v[0] for v in RFC_OK])
def test_rfc8949_encode_is_cbor2_canonical(name, hex_text, value):
    encoded = dumps(value)
    assert encoded == cbor2.dumps(value, canonical=True)
    # Appendix A lists the shortest forms first; the single/double infinities and NaNs
    # are the alternatives that the deterministic encoder must not produce.
    if not (isinstance(value, float) and (math.isnan(value) or math.isinf(value)) and hex_text[:2] != "f9"):
        assert encoded.hex() == hex_text


@pytest.mark.parametrize("name, hex_text", RFC_ERR, ids=[v[0] for v in RFC_ERR])
def test_rfc8949_outside_subset_refused(name, hex_text):
    with pytest.raises(CBORDecodeError) as info:
        loads(bytes.fromhex(hex_text))
    assert info.value.reason == CLOSE_MALFORMED
    # cbor2 accepts every one of them: they are well-formed CBOR, just not our subset.
    cbor2.loads(bytes.fromhex(hex_text))


# ------------------------------------------------------------------------------------------
# The committed vector file


def test_cbor_json_is_what_the_generator_writes():
    assert (VECTORS / "cbor.json").read_text() == GEN.render(GEN.build_cbor())


CBOR_VECTORS = json.loads((VECTORS / "cbor.json").read_text())["vectors"]


@pytest.mark.parametrize("vector", CBOR_VECTORS, ids=[v["name"] for v in CBOR_VECTORS])
def test_cbor_vector(vector):
    raw = bytes.fromhex(vector["hex"])
    assert set(vector) == {"name", "hex", "value", "error", "canonical"}
    if vector["error"] is not None:
        assert vector["error"] == "CBORDecodeError" and vector["value"] is None
        with pytest.raises(CBORDecodeError):
            loads(raw)
        return
    expected = eval(vector["value"], {"__builtins__": {}, "float": float})  # noqa: S307 - our own file
    decoded = loads(raw)
    assert same(decoded, expected)
    assert same(cbor2.loads(raw), expected)  # the reference agrees with the file
    assert dumps(decoded) == cbor2.dumps(expected, canonical=True)
    assert vector["canonical"] == (dumps(decoded) == raw)


def test_cbor_vectors_cover_both_outcomes():
    assert sum(v["error"] is None for v in CBOR_VECTORS) >= 60
    assert sum(v["error"] is not None for v in CBOR_VECTORS) >= 60
    assert any(v["canonical"] is False and v["error"] is None for v in CBOR_VECTORS)


# ------------------------------------------------------------------------------------------
# Differential property tests against cbor2

keys = st.one_of(
    st.integers(min_value=-(2**64), max_value=2**64 - 1),
    st.text(max_size=30),
    st.binary(max_size=30),
    st.booleans(),
    st.none(),
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**64), max_value=2**64 - 1),
    st.integers(min_value=-300, max_value=300),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(width=16) | st.floats(width=32),
    st.binary(max_size=40),
    st.text(max_size=40),
)
values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=6),
        st.tuples(children, children),
        st.dictionaries(keys, children, max_size=6),
    ),
    max_leaves=25,
)


@given(values)
@example(float("nan"))
@example({-1: 1, 24: 2, "a": 3, 1000: 4, b"": 5, None: 6})
@example([2**64 - 1, -(2**64), 65504.0, 65520.0, 5e-324, -0.0])
def test_dumps_is_byte_identical_to_cbor2_canonical(value):
    assert dumps(value) == cbor2.dumps(value, canonical=True)


@given(values)
def test_loads_reads_what_cbor2_writes(value):
    assert same(loads(cbor2.dumps(value)), value)
    assert same(loads(cbor2.dumps(value, canonical=True)), value)


@given(values)
def test_cbor2_reads_what_dumps_writes(value):
    encoded = dumps(value)
    assert same(cbor2.loads(encoded), value)
    assert same(loads(encoded), value)


@given(st.integers(min_value=0, max_value=0xFFFF))
def test_every_float16_bit_pattern(bits):
    raw = b"\xf9" + struct.pack(">H", bits)
    value = loads(raw)
    assert same(value, struct.unpack(">e", struct.pack(">H", bits))[0])
    assert dumps(value) == cbor2.dumps(value, canonical=True)
    if not math.isnan(value):
        assert dumps(value) == raw  # every float16 value is its own shortest form


def test_all_float16_patterns_exhaustively():
    for bits in range(0x10000):
        value = struct.unpack(">e", struct.pack(">H", bits))[0]
        assert same(loads(b"\xf9" + struct.pack(">H", bits)), value)
        assert dumps(value) == cbor2.dumps(value, canonical=True)


@given(st.integers(min_value=0, max_value=0xFFFFFFFF))
def test_float32_bit_patterns(bits):
    value = struct.unpack(">f", struct.pack(">I", bits))[0]
    assert same(loads(b"\xfa" + struct.pack(">I", bits)), value)
    assert dumps(value) == cbor2.dumps(value, canonical=True)


@given(st.integers(min_value=0, max_value=2**64 - 1))
def test_float64_bit_patterns(bits):
    value = struct.unpack(">d", struct.pack(">Q", bits))[0]
    assert same(loads(b"\xfb" + struct.pack(">Q", bits)), value)
    assert dumps(value) == cbor2.dumps(value, canonical=True)


def test_map_order_is_length_first_like_cbor2():
    # RFC 8949 4.2.3 (length-first); 4.2.1 (bytewise) would put 24 (0x1818) before -1 (0x20).
    assert dumps({24: "x", -1: "y"}).hex() == "a220617918186178"
    assert dumps({1000: 0, "a": 0}).hex() == "a2616100" "1903e800"
    assert dumps({"b": 1, "aa": 2}).hex() == "a2616201626161" "02"


def test_equal_keys_of_one_major_type_sort_bytewise():
    mapping = {key: key for key in [300, 23, 24, 0, 255, 256, 65536, 2**40]}
    encoded = dumps(mapping)
    assert list(loads(encoded)) == sorted(mapping)
    assert encoded == cbor2.dumps(mapping, canonical=True)


# ------------------------------------------------------------------------------------------
# Fuzzing: loads raises only CBORDecodeError, and what it accepts cbor2 reads the same way


def check_decode_contract(data: bytes) -> None:
    try:
        value = loads(data)
    except CBORDecodeError as error:
        assert error.reason == CLOSE_MALFORMED
        return
    # Accepted input is well-formed CBOR that the reference reads identically ...
    assert same(cbor2.loads(data), value)
    # ... and a value of the subset, which re-encodes and round-trips.
    encoded = dumps(value)
    assert same(loads(encoded), value)


@given(st.binary(max_size=64))
@example(b"")
@example(b"\x9f")
@example(b"\xbf\xff")
def test_fuzz_random_bytes(data):
    check_decode_contract(data)


@given(st.data(), values)
def test_fuzz_mutated_encodings(data, value):
    encoded = bytearray(dumps(value))
    mutation = data.draw(st.sampled_from(["flip", "set", "truncate", "extend", "insert", "delete"]))
    if mutation == "flip" and encoded:
        index = data.draw(st.integers(0, len(encoded) - 1))
        encoded[index] ^= 1 << data.draw(st.integers(0, 7))
    elif mutation == "set" and encoded:
        index = data.draw(st.integers(0, len(encoded) - 1))
        encoded[index] = data.draw(st.integers(0, 255))
    elif mutation == "truncate":
        del encoded[data.draw(st.integers(0, len(encoded))) :]
    elif mutation == "extend":
        encoded += data.draw(st.binary(min_size=1, max_size=8))
    elif mutation == "insert":
        index = data.draw(st.integers(0, len(encoded)))
        encoded[index:index] = data.draw(st.binary(min_size=1, max_size=4))
    elif mutation == "delete" and encoded:
        index = data.draw(st.integers(0, len(encoded) - 1))
        del encoded[index]
    check_decode_contract(bytes(encoded))


def test_every_truncation_is_refused():
    encoded = dumps({"a": [1, 2.5, b"xyz", {"b": None}], 7: "text \u00fc", -3: [True, False]})
    for cut in range(len(encoded)):
        with pytest.raises(CBORDecodeError):
            loads(encoded[:cut])


# ------------------------------------------------------------------------------------------
# Limits


def nested_arrays(depth: int):
    value = 0
    for _ in range(depth):
        value = [value]
    return value


def test_depth_limit_on_decode():
    assert MAX_DEPTH == 16
    assert same(loads(b"\x81" * 16 + b"\x00"), nested_arrays(16))
    with pytest.raises(CBORDecodeError):
        loads(b"\x81" * 17 + b"\x00")
    with pytest.raises(CBORDecodeError):
        loads(b"\xa1\x00" * 17 + b"\x00")  # maps count too
    assert loads(b"\x81\x81\x00", max_depth=2) == [[0]]
    with pytest.raises(CBORDecodeError):
        loads(b"\x81\x81\x00", max_depth=1)
    with pytest.raises(CBORDecodeError):
        loads(b"\x80", max_depth=0)
    assert loads(b"\x00", max_depth=0) == 0


def test_very_deep_input_is_a_decode_error_not_a_recursion_error():
    with pytest.raises(CBORDecodeError):
        loads(b"\x81" * 100_000 + b"\x00")
    with pytest.raises(CBORDecodeError):
        loads(b"\x81" * 100, max_depth=DEPTH_CEILING)


def test_depth_limit_on_encode():
    assert dumps(nested_arrays(16)) == b"\x81" * 16 + b"\x00"
    with pytest.raises(CBOREncodeError):
        dumps(nested_arrays(17))
    nested_map = 0
    for _ in range(17):
        nested_map = {"k": nested_map}
    with pytest.raises(CBOREncodeError):
        dumps(nested_map)


def test_cyclic_value_is_an_encode_error():
    cycle: list = []
    cycle.append(cycle)
    with pytest.raises(CBOREncodeError):
        dumps(cycle)


def test_bad_limit_arguments_are_local_errors():
    for kwargs in ({"max_depth": -1}, {"max_depth": DEPTH_CEILING + 1}, {"max_items": -1}):
        with pytest.raises(LocalProtocolError):
            loads(b"\x00", **kwargs)


def test_item_limit():
    assert MAX_ITEMS == 65536
    data = dumps(list(range(10)))  # 11 items: the array and its elements
    assert loads(data, max_items=11) == list(range(10))
    with pytest.raises(CBORDecodeError):
        loads(data, max_items=10)
    with pytest.raises(CBORDecodeError):
        loads(dumps([[]] * 40000 + [[]] * 40000))  # 80001 items > MAX_ITEMS


@pytest.mark.parametrize("head", ["5b", "7b", "9b", "bb"])
def test_huge_declared_length_is_refused_without_allocating(head):
    data = bytes.fromhex(head + "ffffffffffffffff") + b"\x00" * 16
    tracemalloc.start()
    try:
        with pytest.raises(CBORDecodeError):
            loads(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024


@pytest.mark.parametrize("count", [2**16, 2**31, 2**32 - 1])
def test_large_declared_counts_are_refused_before_looping(count):
    for major in (0x9A, 0xBA, 0x5A, 0x7A):
        with pytest.raises(CBORDecodeError):
            loads(bytes([major]) + struct.pack(">I", count) + b"\x00" * 8)


# ------------------------------------------------------------------------------------------
# Text strings and UTF-8, on both code paths (CPython's strict decoder, MicroPython's lax one)

INVALID_UTF8 = [
    b"\x80",
    b"\xbf",
    b"\xc0\x80",
    b"\xc1\xbf",
    b"\xe0\x80\xaf",
    b"\xe0\x9f\xbf",
    b"\xed\xa0\x80",
    b"\xed\xbf\xbf",
    b"\xf0\x8f\xbf\xbf",
    b"\xf4\x90\x80\x80",
    b"\xf5\x80\x80\x80",
    b"\xf8\x88\x80\x80\x80",
    b"\xfe",
    b"\xff",
    b"\xc3",
    b"\xe2\x82",
    b"a\xf0\x9f\x98",
    b"\xc3(",
    b"\xe2(\xa1",
]


@pytest.fixture(params=["strict", "lax"])
def utf8_path(request, monkeypatch):
    """Run a test on CPython's path and on the hand validator MicroPython needs."""
    monkeypatch.setattr(cbor, "_STRICT_UTF8", request.param == "strict")
    return request.param


@pytest.mark.parametrize("raw", INVALID_UTF8)
def test_invalid_utf8_is_refused(raw, utf8_path):
    with pytest.raises(CBORDecodeError):
        loads(bytes([0x60 + len(raw)]) + raw)


@given(st.binary(max_size=12))
def test_hand_utf8_validator_matches_cpython(raw):
    try:
        raw.decode("utf-8")
        valid = True
    except UnicodeDecodeError:
        valid = False
    assert _utf8.is_valid(raw, 0, len(raw)) is valid


@given(st.text(max_size=30))
def test_valid_text_decodes_on_both_paths(text):
    encoded = dumps(text)
    for strict in (True, False):
        original = cbor._STRICT_UTF8
        cbor._STRICT_UTF8 = strict
        try:
            assert loads(encoded) == text
        finally:
            cbor._STRICT_UTF8 = original


def test_lone_surrogate_text_is_an_encode_error():
    with pytest.raises(CBOREncodeError):
        dumps("\ud800")


# ------------------------------------------------------------------------------------------
# Encode refusals and accepted input types


OUTSIDE_SUBSET = {
    "2**64": 2**64,
    "-2**64-1": -(2**64) - 1,
    "set": {1, 2},
    "frozenset": frozenset(),
    "object": object(),
    "complex": 1j,
    "float key": {1.5: "float key"},
    "tuple key": {(1, 2): "tuple key"},
    "nested float key": {"ok": {2.0: "nested float key"}},
    "set inside a list": [b"fine", {3}],
}


@pytest.mark.parametrize("value", list(OUTSIDE_SUBSET.values()), ids=list(OUTSIDE_SUBSET))
def test_values_outside_the_subset_are_encode_errors(value):
    with pytest.raises(CBOREncodeError) as info:
        dumps(value)
    assert isinstance(info.value, LocalProtocolError)


def test_subclasses_encode_as_their_base():
    class Code(int):
        pass

    class Name(str):
        pass

    assert dumps(Code(5)) == dumps(5)
    assert dumps(Name("x")) == dumps("x")
    assert dumps(bytearray(b"ab")) == dumps(b"ab")
    assert dumps((1, (2,))) == dumps([1, [2]])


def test_decode_accepts_bytes_like_inputs():
    encoded = dumps({"a": [1, b"\x00"]})
    for data in (encoded, bytearray(encoded), memoryview(encoded)):
        assert loads(data) == {"a": [1, b"\x00"]}
    assert type(loads(memoryview(dumps(b"xy")))) is bytes


def test_decode_refuses_non_bytes_with_the_decode_error():
    with pytest.raises(CBORDecodeError):
        loads("00")


def test_decode_error_is_a_remote_error():
    with pytest.raises(RemoteProtocolError):
        loads(b"\xff")


def test_duplicate_keys_refused_even_when_python_would_merge():
    assert loads(bytes.fromhex("a201f402f5")) == {1: False, 2: True}
    for hex_text in ("a201020103", "a201f4f5f5", "a200f4f4f5", "a2616101616102", "a2410001410002"):
        with pytest.raises(CBORDecodeError):
            loads(bytes.fromhex(hex_text))
