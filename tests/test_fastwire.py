"""smartx_hub.fastwire: the hub's native-codec decoder must be the core decoder, only faster.

Every test compares against the core (smartx_device.messages) itself: equal messages with
values of the same types (floats to the bit), or the same error type, reason and text. Each
runs every proof strategy, not only the one this cbor2 picked, and the picked decoder too.
"""

from __future__ import annotations

import contextlib
import io
import json
import pathlib
import struct

import cbor2
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from smartx_device import cbor as core_cbor
from smartx_device import messages as m
from smartx_device import session as s
from smartx_device.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from smartx_device.reasons import CLOSE_MALFORMED
from smartx_hub import fastwire

VECTORS = pathlib.Path(__file__).parent / "vectors"
STRICT = fastwire.make_decoder("strict")
CANONICAL = fastwire.make_decoder("canonical")
DECODERS = {"strict": STRICT, "canonical": CANONICAL, "picked": fastwire.decode_message}


# ------------------------------------------------------------------------------------------
# Comparing outcomes


def same_value(a, b) -> bool:
    """Exact structural equality: same types, floats bit for bit (NaN, -0.0), dict key order."""
    if type(a) is not type(b):
        return False
    if type(a) is float:
        return struct.pack(">d", a) == struct.pack(">d", b)
    if type(a) is list:
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
    if type(a) is dict:
        return (list(a) == list(b) and all(type(x) is type(y) for x, y in zip(a, b))
                and all(same_value(a[k], b[k]) for k in a))
    return a == b


def outcome(decode, data):
    """("ok", message) or ("error", type, reason, text) of one decode."""
    try:
        return ("ok", decode(data))
    except ProtocolError as error:
        return ("error", type(error), error.reason, str(error))


def same_outcome(a, b) -> bool:
    if a[0] != b[0]:
        return False
    if a[0] == "error":
        return a == b
    x, y = a[1], b[1]
    return type(x) is type(y) and list(vars(x)) == list(vars(y)) and all(
        same_value(vars(x)[name], vars(y)[name]) for name in vars(x))


def assert_like_core(data):
    """Every decoder gives the core's outcome for ``data``; returns that outcome."""
    expected = outcome(m.decode_message, data)
    for name, decode in DECODERS.items():
        got = outcome(decode, data)
        assert same_outcome(got, expected), (name, data.hex() if isinstance(data, bytes) else data,
                                             got, expected)
    return expected


@contextlib.contextmanager
def core_calls():
    """Count the calls the fast decoders make to the core decoder while inside."""
    calls = []
    original = fastwire._core_decode

    def counting(data):
        calls.append(data)
        return original(data)

    fastwire._core_decode = counting
    try:
        yield calls
    finally:
        fastwire._core_decode = original


def contains_nan(value) -> bool:
    if type(value) is float:
        return value != value
    if type(value) in (list, tuple):
        return any(contains_nan(item) for item in value)
    if type(value) is dict:
        return any(contains_nan(item) for item in value.values())
    return False


# ------------------------------------------------------------------------------------------
# Strategies: valid messages, arbitrary CBOR, raw heads

uints = st.integers(0, 2**64 - 1) | st.integers(0, 70000)
names = st.text(min_size=1, max_size=m.MAX_NAME_LENGTH)
ids = st.text(min_size=1, max_size=m.MAX_ID_LENGTH)
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**64), 2**64 - 1), st.integers(-30, 30),
    st.floats(allow_nan=True), st.floats(width=16), st.floats(width=32),
    st.text(max_size=12), st.binary(max_size=12),
)
subset_keys = st.one_of(st.integers(-(2**64), 2**64 - 1), st.text(max_size=6),
                        st.binary(max_size=6), st.booleans(), st.none())
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(subset_keys, inner, max_size=4)), max_leaves=12)
readings = st.lists(st.tuples(names, uints, scalars | values), min_size=1, max_size=20)
states = st.dictionaries(names, values, max_size=4)

any_message = st.one_of(
    st.builds(m.Hello, version=uints, device_id=st.none() | ids,
              capabilities=st.none() | st.lists(names, max_size=m.MAX_CAPABILITIES),
              max_frame_size=st.none() | uints, software=st.none() | names),
    st.builds(m.AuthChallenge, nonce=st.binary(min_size=16, max_size=64), hub_time_ms=uints, hub_id=ids),
    st.builds(m.AuthResponse, token=st.text(min_size=1, max_size=300)),
    st.builds(m.Accepted, session_id=ids, keepalive_ms=uints, hub_time_ms=uints,
              max_frame_size=st.none() | uints),
    st.builds(m.Close, reason=uints, detail=st.none() | st.text(max_size=60),
              retry_after_ms=st.none() | uints),
    st.builds(m.Telemetry, msg_id=uints, readings=readings),
    st.builds(m.Telemetry, msg_id=uints, readings=readings),  # twice: the hot path
    st.builds(m.Ack, msg_id=uints),
    st.builds(m.Command, command_id=ids, name=names, args=values, expires_ms=st.none() | uints),
    st.builds(m.CommandResult, command_id=ids, ok=st.booleans(), result=values,
              error=st.none() | st.text(max_size=60)),
    st.builds(m.Ping, seq=uints),
    st.builds(m.Pong, seq=uints),
    st.builds(m.DesiredState, version=uints, state=states),
    st.builds(m.ReportedState, msg_id=uints, state=states),
)

# Everything cbor2 can write, including what the subset leaves out.
TAG_NUMBERS = [0, 1, 2, 3, 4, 5, 21, 24, 25, 28, 29, 30, 35, 37, 256, 258, 1000, 55799, 2**32]
loose_scalars = st.one_of(
    scalars, st.integers(-(2**70), 2**70), st.floats(),
    st.sampled_from([cbor2.undefined, cbor2.CBORSimpleValue(0), cbor2.CBORSimpleValue(255)]),
)
loose_keys = st.one_of(subset_keys, st.floats(allow_nan=False), st.integers(2**64, 2**70),
                       st.tuples(st.integers(0, 3), st.integers(0, 3)))


def _loose(inner):
    return st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(loose_keys, inner, max_size=4),
        st.builds(cbor2.CBORTag, st.sampled_from(TAG_NUMBERS), inner),
    )


loose_values = st.recursive(loose_scalars, _loose, max_leaves=12)
# Message-shaped maps: a real type in key 0 so that message_from_map runs on odd values.
message_like = st.builds(
    lambda message_type, fields, extra: {0: message_type, **fields, **extra},
    st.sampled_from(sorted(m.MESSAGE_CLASSES)) | st.integers(-2, 20),
    st.dictionaries(st.integers(1, 5), loose_values, max_size=4),
    st.dictionaries(loose_keys, loose_values, max_size=2),
)


def _head(major: int, argument: int, width: int) -> bytes:
    """A head with ``argument`` in ``width`` extra bytes (0: in the initial byte), if it fits."""
    if width == 0:
        return bytes([(major << 5) | min(argument, 23)])
    info = {1: 24, 2: 25, 4: 26, 8: 27}[width]
    return bytes([(major << 5) | info]) + (argument % (1 << (8 * width))).to_bytes(width, "big")


@st.composite
def raw_items(draw, depth=0):
    """Raw CBOR bytes from the full grammar: any head width, indefinite items, tags, breaks,
    reserved additional information, simple values; sometimes not well-formed at all."""
    kind = draw(st.integers(0, 12 if depth < 4 else 6))
    width = draw(st.sampled_from([0, 0, 0, 1, 2, 4, 8]))
    if kind <= 1:  # integers
        return _head(kind, draw(st.integers(0, 2**64 - 1) | st.integers(0, 30)), width)
    if kind in (2, 3):  # byte and text strings (text sometimes invalid UTF-8)
        body = draw(st.binary(max_size=8) | st.text(max_size=6).map(lambda t: t.encode()))
        return _head(kind, len(body), width if len(body) >= 24 or width else 0) + body
    if kind == 4:  # simple values, floats, break, reserved
        return draw(st.sampled_from([b"\xf4", b"\xf5", b"\xf6", b"\xf7", b"\xff", b"\xfc", b"\xe0",
                                     b"\xf8\x20", b"\xf8\x10"])
                    | st.binary(min_size=2, max_size=2).map(lambda x: b"\xf9" + x)
                    | st.binary(min_size=4, max_size=4).map(lambda x: b"\xfa" + x)
                    | st.binary(min_size=8, max_size=8).map(lambda x: b"\xfb" + x))
    if kind == 5:
        return draw(st.binary(min_size=1, max_size=6))  # noise
    if kind == 6:  # indefinite strings, chunks of any major
        chunks = draw(st.lists(st.binary(max_size=4), max_size=3))
        major = draw(st.sampled_from([2, 3]))
        return bytes([(major << 5) | 31]) + b"".join(
            _head(draw(st.sampled_from([major, major, 2, 3])), len(c), 0) + c for c in chunks) + b"\xff"
    children = draw(st.lists(raw_items(depth + 1), max_size=4))
    if kind in (7, 8):  # definite arrays and maps (maps: pairs, sometimes an odd count)
        major = 4 if kind == 7 else 5
        count = len(children) if major == 4 else len(children) // 2 + draw(st.integers(0, 1))
        return _head(major, count, width if count >= 24 or width else 0) + b"".join(children)
    if kind in (9, 10):  # indefinite arrays and maps
        return bytes([0x9F if kind == 9 else 0xBF]) + b"".join(children) + b"\xff"
    if kind == 11:  # a tag on one item
        number = draw(st.sampled_from(TAG_NUMBERS) | st.integers(0, 2**64 - 1))
        inner = children[0] if children else b"\x00"
        return _head(6, number, width if number >= 24 or width else 0) + inner
    # A message-shaped map: a real type under key 0, the odd items under keys 1, 2...
    message_type = draw(st.sampled_from([b"\x06", b"\x07", b"\x08", b"\x0c"]))
    return _head(5, 1 + len(children), 0) + b"\x00" + message_type + b"".join(
        _head(0, index + 1, 0) + child for index, child in enumerate(children))


# ------------------------------------------------------------------------------------------
# (a) valid messages of every type, as the core encodes them


@given(any_message)
def test_valid_messages_decode_as_in_the_core(message):
    data = m.encode_message(message)
    expected = assert_like_core(data)
    assert expected[0] == "ok" and expected[1] == message or contains_nan(vars(message))


@given(any_message)
def test_valid_messages_take_the_fast_path(message):
    """Proves the equality above is the fast path's, not the core's answer passed through."""
    data = m.encode_message(message)
    for name in ("strict", "canonical"):
        with core_calls() as calls:
            DECODERS[name](data)
        spurious_nan = name == "canonical" and fastwire._CANONICAL_NAN in data
        if len(data) >= fastwire._SMALL and not contains_nan(vars(message)) and not spurious_nan:
            assert calls == [], name
        else:
            assert calls == [data], name


def test_the_fast_path_is_on_with_this_cbor2():
    # A native cbor2 is installed with the hub: its decoder must be in use.
    assert type(cbor2.loads).__name__ == "builtin_function_or_method"
    assert fastwire.STRATEGY in ("strict", "canonical")
    assert fastwire.decode_message.strategy == fastwire.STRATEGY
    if hasattr(cbor2.CBORDecoder(io.BytesIO(b"")), "allow_indefinite"):  # cbor2 >= 6
        assert fastwire.STRATEGY == "strict"


# ------------------------------------------------------------------------------------------
# (b) arbitrary CBOR: whatever cbor2 writes (tags, bignums, floats, indefinite lengths) and
# the raw grammar


@given(loose_values | message_like, st.booleans(), st.booleans())
@example({0: 6, 1: 2, 2: [["t", 1, cbor2.CBORTag(2, b"\x01")]]}, True, False)
@example({0: 6, 1: cbor2.CBORTag(55799, 5), 2: [["temp", 1, 1.0]]}, True, False)
@example({0: 6, 1: 2, 2: [["temp", 1, 1.5]] * 2}, False, True)
def test_any_cbor2_output_decodes_as_in_the_core(value, canonical, indefinite):
    try:
        data = cbor2.dumps(value, canonical=canonical, indefinite_containers=indefinite)
    except (cbor2.CBOREncodeError, TypeError, ValueError):
        return  # a value cbor2 itself cannot write (a tag on a bad inner value)
    assert_like_core(data)


@given(raw_items())
def test_raw_cbor_decodes_as_in_the_core(data):
    assert_like_core(data)


@given(raw_items(), raw_items())
def test_raw_cbor_inside_a_telemetry_decodes_as_in_the_core(value, msg_id):
    # The hot path's builder sees the odd item in every place of a Telemetry.
    reading = b"\x83\x64temp\x1b\x00\x00\x01\x9a\xd8\xe9\xb4\x8f"
    for data in (b"\xa3\x00\x06\x01\x01\x02\x82" + reading + value + reading[:-9] + value,
                 b"\xa3\x00\x06\x01" + msg_id + b"\x02\x81" + reading + b"\xf9\x3c\x00",
                 b"\xa3\x00\x06\x01\x01\x02" + value,
                 b"\xa3\x00\x06\x01\x01" + value + b"\x81" + reading + b"\x01"):
        assert_like_core(data)


# ------------------------------------------------------------------------------------------
# (c) valid messages with random damage


@given(any_message, st.lists(st.tuples(st.sampled_from(["set", "insert", "delete", "cut", "append"]),
                                       st.integers(0, 10**6), st.integers(0, 255)),
                             min_size=1, max_size=3))
def test_mutated_messages_decode_as_in_the_core(message, mutations):
    data = bytearray(m.encode_message(message))
    for action, position, byte in mutations:
        position %= len(data) + 1
        if action == "set" and position < len(data):
            data[position] = byte
        elif action == "insert":
            data.insert(position, byte)
        elif action == "delete" and position < len(data):
            del data[position]
        elif action == "cut":
            del data[position:]
        elif action == "append":
            data.append(byte)
    assert_like_core(bytes(data))


# ------------------------------------------------------------------------------------------
# Targeted cases

READING = ["temp", 1764430000000, 21.37]


def telemetry_bytes(replace=None) -> bytes:
    """A Telemetry map (cbor2 canonical) with fields replaced or added: {key: raw CBOR item}."""
    # A 9-byte msg_id: every case stays past fastwire._SMALL, so it meets the fast path.
    fields = {0: b"\x06", 1: b"\x1b" + (2**40 + 7).to_bytes(8, "big"),
              2: cbor2.dumps([READING, READING], canonical=True)}
    fields.update(replace or {})
    return bytes([0xA0 | len(fields)]) + b"".join(
        cbor2.dumps(key) + raw for key, raw in fields.items())


TARGETED = {
    "canonical telemetry": telemetry_bytes(),
    "duplicate key 1": b"\xa4\x00\x06\x01\x01\x01\x02\x02" + cbor2.dumps([READING]),
    "duplicate key 0 and false": b"\xa4\x00\x06\xf4\x06\x01\x01\x02" + cbor2.dumps([READING]),
    "key false for the type": b"\xa3\xf4\x06\x01\x01\x02" + cbor2.dumps([READING]),
    "float key 0.0 for the type": b"\xa3\xf9\x00\x00\x06\x01\x01\x02" + cbor2.dumps([READING]),
    "indefinite readings array": telemetry_bytes({2: b"\x9f" + cbor2.dumps(READING) + b"\xff"}),
    "indefinite reading": telemetry_bytes({2: b"\x81\x9f\x64temp\x01\x01\xff"}),
    "indefinite stream name": telemetry_bytes({2: b"\x81\x83\x7f\x62te\x62mp\xff\x01\x01"}),
    "indefinite top map": b"\xbf\x00\x06\x01\x01\x02" + cbor2.dumps([READING]) + b"\xff",
    "tag 2 bignum msg_id": telemetry_bytes({1: b"\xc2\x41\x2a"}),
    "tag 2 bignum 2**64 value": telemetry_bytes({2: b"\x81\x83\x61t\x01\xc2\x49\x01" + bytes(8)}),
    "tag 3 bignum value": telemetry_bytes({2: b"\x81\x83\x61t\x01\xc3\x41\x00"}),
    "tag 55799 on the message": b"\xd9\xd9\xf7" + telemetry_bytes(),
    "shared readings": b"\xa3\x00\x06\x01\x01\x02\x82\xd8\x1c" + cbor2.dumps(READING) + b"\xd8\x1d\x00",
    "string reference": b"\xd9\x01\x00" + telemetry_bytes(
        {2: b"\x82\x83\x64temp\x01\x01\x83\xd8\x19\x00\x02\x02"}),
    "half floats": telemetry_bytes({2: b"\x83\x83\x61a\x01\xf9\x3c\x00\x83\x61b\x02\xf9\x80\x00"
                                       b"\x83\x61c\x03\xf9\x7c\x00"}),
    "half subnormal and max": telemetry_bytes(
        {2: b"\x82\x83\x61a\x01\xf9\x00\x01\x83\x61b\x02\xf9\x7b\xff"}),
    "single float": telemetry_bytes({2: b"\x81\x83\x61a\x01\xfa\x47\xc3\x50\x00"}),
    "non-shortest double": telemetry_bytes({2: b"\x81\x83\x61a\x01\xfb\x3f\xf8" + bytes(6)}),
    "NaN canonical": telemetry_bytes({2: b"\x81\x83\x61a\x01\xf9\x7e\x00"}),
    "NaN negative": telemetry_bytes({2: b"\x81\x83\x61a\x01\xf9\xfe\x00"}),
    "NaN payload half": telemetry_bytes({2: b"\x81\x83\x61a\x01\xf9\x7e\x01"}),
    "NaN single": telemetry_bytes({2: b"\x81\x83\x61a\x01\xfa\x7f\xc0\x00\x00"}),
    "NaN double": telemetry_bytes({2: b"\x81\x83\x61a\x01\xfb\x7f\xf8" + bytes(6)}),
    "NaN in command args": cbor2.dumps({0: 8, 1: "c1", 2: "set", 3: [float("nan")]}),
    "invalid UTF-8 stream": telemetry_bytes({2: b"\x81\x83\x64te\xffp\x01\x01"}),
    "surrogate in UTF-8": telemetry_bytes({2: b"\x81\x83\x63\xed\xa0\x80\x01\x01"}),
    "overlong UTF-8": telemetry_bytes({2: b"\x81\x83\x62\xc0\x80\x01\x01"}),
    "trailing byte": telemetry_bytes() + b"\x00",
    "trailing item": telemetry_bytes() + telemetry_bytes(),
    "truncated": telemetry_bytes()[:-1],
    "non-shortest heads": b"\xb8\x03\x18\x00\x06\x19\x00\x01\x1a\x00\x00\x00\x2a\x02\x98\x01"
                          + cbor2.dumps(READING),
    "keys out of order": b"\xa3\x02" + cbor2.dumps([READING]) + b"\x01\x01\x00\x06",
    "unknown key": telemetry_bytes({99: b"\x63new"}),
    "unknown key holding a tag": telemetry_bytes({99: b"\xc1\x00"}),
    "unknown key holding undefined": telemetry_bytes({99: b"\xf7"}),
    "simple value as msg_id": telemetry_bytes({1: b"\xe0"}),
    "bool as msg_id": telemetry_bytes({1: b"\xf5"}),
    "msg_id 2**64-1": telemetry_bytes({1: b"\x1b" + b"\xff" * 8}),
    "negative timestamp": telemetry_bytes({2: b"\x81\x83\x61a\x20\x01"}),
    "empty stream name": telemetry_bytes({2: b"\x81\x83\x60\x01\x01"}),
    "stream name of 65": telemetry_bytes({2: b"\x81\x83\x78\x41" + b"s" * 65 + b"\x01\x01"}),
    "reading of two": telemetry_bytes({2: b"\x81\x82\x61a\x01"}),
    "257 readings": telemetry_bytes({2: b"\x99\x01\x01" + b"\x83\x61a\x01\x01" * 257}),
    "256 readings": telemetry_bytes({2: b"\x99\x01\x00" + b"\x83\x61a\x01\x01" * 256}),
    "reading value a map": telemetry_bytes({2: b"\x81\x83\x61a\x01\xa2\x61x\x01\x61y\x82\xf5\xf6"}),
    "map key an array": telemetry_bytes({2: b"\x81\x83\x61a\x01\xa1\x82\x01\x02\x01"}),
    "map key a map": telemetry_bytes({2: b"\x81\x83\x61a\x01\xa1\xa0\x01"}),
    "map key a float": telemetry_bytes({2: b"\x81\x83\x61a\x01\xa1\xf9\x3c\x00\x01"}),
    "map key a bool and null": cbor2.dumps({0: 12, 1: 1, 2: {"key": {True: 1, None: 2, b"b": 3}}}),
    "not a map": cbor2.dumps([6, 1, [READING]]),
    "a map without a type": cbor2.dumps({1: 1, 2: [READING], 3: 4}),
    "unknown type": cbor2.dumps({0: 99, 1: 1, 2: "three", 3: "four"}),
    "reserved additional info": telemetry_bytes({1: b"\x1c"}),
    "break as msg_id": telemetry_bytes({1: b"\xff"}),
    "big declared length": telemetry_bytes({2: b"\x9b" + b"\xff" * 8}),
    "big declared text": telemetry_bytes({99: b"\x7b\x7f" + b"\xff" * 7}),
}


def _nested(depth: int) -> bytes:
    """A Command whose args nest to ``depth`` containers counting the message map itself."""
    args = 0
    for _ in range(depth - 1):
        args = [args]
    return cbor2.dumps({0: 8, 1: "c1", 2: "deep", 3: args}, canonical=True)


TARGETED["nesting at MAX_DEPTH"] = _nested(core_cbor.MAX_DEPTH)
TARGETED["nesting beyond MAX_DEPTH"] = _nested(core_cbor.MAX_DEPTH + 1)
TARGETED["nesting far beyond"] = b"\xa4\x00\x08\x01\x62c1\x02\x64deep\x03" + b"\x81" * 3000 + b"\x00"
TARGETED["readings value at MAX_DEPTH"] = telemetry_bytes(
    {2: b"\x81\x83\x61a\x01" + b"\x81" * (core_cbor.MAX_DEPTH - 3) + b"\x00"})
TARGETED["readings value beyond MAX_DEPTH"] = telemetry_bytes(
    {2: b"\x81\x83\x61a\x01" + b"\x81" * (core_cbor.MAX_DEPTH - 2) + b"\x00"})


@pytest.mark.parametrize("name", sorted(TARGETED))
def test_targeted_case_decodes_as_in_the_core(name):
    assert_like_core(TARGETED[name])


def test_targeted_cases_cover_both_outcomes():
    assert all(len(data) >= fastwire._SMALL for data in TARGETED.values())
    outcomes = {name: outcome(m.decode_message, data)[0] for name, data in TARGETED.items()}
    assert outcomes["canonical telemetry"] == outcomes["nesting at MAX_DEPTH"] == "ok"
    assert outcomes["nesting beyond MAX_DEPTH"] == outcomes["duplicate key 1"] == "error"
    assert outcomes["tag 2 bignum msg_id"] == outcomes["invalid UTF-8 stream"] == "error"
    assert outcomes["half floats"] == outcomes["non-shortest heads"] == "ok"
    assert 15 < list(outcomes.values()).count("error") < len(outcomes) - 10


def test_nan_is_the_core_own_object():
    # The core returns one NaN object for f97e00; the fast path defers to it, so messages
    # decoded either way compare equal (list equality checks identity first).
    data = TARGETED["NaN canonical"]
    for decode in DECODERS.values():
        assert decode(data) == m.decode_message(data)


def test_errors_carry_the_malformed_reason():
    for name in ("duplicate key 1", "tag 2 bignum msg_id", "invalid UTF-8 stream", "trailing byte"):
        for decode in DECODERS.values():
            with pytest.raises(RemoteProtocolError) as caught:
                decode(TARGETED[name])
            assert caught.value.reason == CLOSE_MALFORMED


@pytest.mark.parametrize("kind", ["bytearray", "memoryview", "str", "int", "none", "list"])
def test_input_types_are_handled_as_in_the_core(kind):
    data = TARGETED["canonical telemetry"]
    value = {"bytearray": bytearray(data), "memoryview": memoryview(data), "str": data.hex(),
             "int": 5, "none": None, "list": list(data)}[kind]
    assert_like_core(value)


def test_a_bytes_subclass_goes_to_the_core():
    class Odd(bytes):
        pass

    data = Odd(TARGETED["canonical telemetry"])
    with core_calls() as calls:
        message = STRICT(data)
    assert calls == [data] and message == m.decode_message(data)


def test_inputs_past_the_item_limit_go_to_the_core():
    # A valid Command whose args pad it past MAX_ITEMS bytes: the count needs the core.
    data = cbor2.dumps({0: 8, 1: "c1", 2: "big", 3: "x" * core_cbor.MAX_ITEMS}, canonical=True)
    assert len(data) > core_cbor.MAX_ITEMS
    with core_calls() as calls:
        assert_like_core(data)
    assert len(calls) == len(DECODERS)
    many = b"\xa4\x00\x08\x01\x62c1\x02\x63big\x03\x9a\x00\x01\x00\x00" + b"\x00" * 65536
    assert outcome(m.decode_message, many)[0] == "error"  # 65541 items: past the limit
    assert_like_core(many)


@given(st.binary(min_size=16, max_size=200))
def test_random_bytes_decode_as_in_the_core(data):
    assert_like_core(data)


@pytest.mark.parametrize("section", ["messages", "invalid"])
def test_protocol_vectors_decode_as_in_the_core(section):
    vectors = json.loads((VECTORS / "messages.json").read_text())[section]
    assert vectors
    for vector in vectors:
        assert_like_core(bytes.fromhex(vector["hex"]))


def test_cbor_vectors_as_message_fields_decode_as_in_the_core():
    vectors = json.loads((VECTORS / "cbor.json").read_text())["vectors"]
    assert len(vectors) > 100
    for vector in vectors:
        raw = bytes.fromhex(vector["hex"])
        assert_like_core(telemetry_bytes({2: b"\x81\x83\x64temp\x01" + raw}))
        assert_like_core(telemetry_bytes({99: raw}))


# ------------------------------------------------------------------------------------------
# The probe that picks the strategy


@pytest.mark.parametrize("strategy", ["strict", "canonical"])
def test_probe_passes_for_this_cbor2(strategy):
    assert fastwire._probe(strategy)


def test_probe_refuses_a_lenient_proof(monkeypatch):
    # A proof that trusts cbor2.loads as it is (bignums, self-describe, trailing bytes...)
    # must not survive the probe.
    monkeypatch.setattr(fastwire, "_strict_value", cbor2.loads)
    assert not fastwire._probe("strict")
    monkeypatch.setattr(fastwire, "_canonical_value",
                        lambda data: cbor2.loads(data, allow_indefinite=False))
    assert not fastwire._probe("canonical")


def test_probe_refuses_an_encoder_that_differs(monkeypatch):
    real_dumps = cbor2.dumps
    monkeypatch.setattr(cbor2, "dumps", lambda value, canonical=False: real_dumps(value))
    assert not fastwire._probe("canonical")


def test_pick_falls_back_to_the_core_without_a_native_cbor2(monkeypatch):
    monkeypatch.setattr(cbor2, "loads", lambda data, **options: None)
    assert fastwire._pick_strategy() == "core"
    assert fastwire.make_decoder("core") is m.decode_message
    with pytest.raises(ValueError):
        fastwire.make_decoder("fastest")


# ------------------------------------------------------------------------------------------
# The Ack encoder


def encode_outcome(encode, message):
    try:
        return ("ok", encode(message))
    except ProtocolError as error:
        return ("error", type(error), error.reason, str(error))


@given(st.integers(0, 2**64 - 1) | st.integers(0, 300) | st.integers(-(2**65), 2**65)
       | st.sampled_from([True, False, None, 1.0, "1", b"\x01", [1]]))
@example(23)
@example(24)
@example(255)
@example(256)
@example(65535)
@example(65536)
@example(2**32 - 1)
@example(2**32)
@example(2**64 - 1)
@example(2**64)
@example(-1)
def test_ack_encoding_is_the_core_encoding(msg_id):
    message = m.Ack(msg_id=msg_id)
    expected = encode_outcome(m.encode_message, message)
    assert encode_outcome(fastwire.encode_message, message) == expected
    if expected[0] == "ok":
        assert expected[1] == cbor2.dumps({0: m.ACK, 1: msg_id}, canonical=True)


@given(any_message)
def test_other_messages_encode_as_in_the_core(message):
    assert fastwire.encode_message(message) == m.encode_message(message)


def test_ack_subclasses_and_non_messages_go_to_the_core():
    class LoudAck(m.Ack):
        pass

    assert fastwire.encode_message(LoudAck(msg_id=5)) == m.encode_message(LoudAck(msg_id=5))
    for bad in (None, {0: 7, 1: 5}, m.Ack()):
        with pytest.raises(LocalProtocolError) as caught:
            fastwire.encode_message(bad)
        assert str(caught.value) == str(pytest.raises(LocalProtocolError, m.encode_message, bad).value)


# ------------------------------------------------------------------------------------------
# In a session: the hub's decoder and encoder plugged into the core state machine


def run_pair(hub_options, device_payloads):
    """Handshake a device and a hub session, then feed the hub raw payloads (framed);
    return the hub's events, what it sent back, and the device's events."""
    device = s.DeviceSession(0)
    hub = s.HubSession(0, **hub_options)
    hub_events = list(hub.receive_data(device.start("dev-1", 1), 1))
    device.receive_data(hub.challenge(b"n" * 16, "hub-1", 2), 2)
    hub_events += hub.receive_data(device.authenticate("token", 3), 3)
    device_events = list(device.receive_data(hub.accept("ses-1", 4), 4))
    framer = s.StreamFramer()
    for payload in device_payloads:
        try:
            hub_events += hub.receive_data(framer.encode(payload), 5)
        except RemoteProtocolError as error:
            hub_events += error.events
            hub_events.append(("error", type(error), error.reason, str(error)))
        sent = hub.data_to_send()
        if hub.state == s.ESTABLISHED and hub_events and isinstance(hub_events[-1], s.MessageReceived):
            message = hub_events[-1].message
            if message.TYPE == m.TELEMETRY:
                sent += hub.send(m.Ack(msg_id=message.msg_id), 6)
        device_events += device.receive_data(sent, 7) if sent else []
    return hub_events, device_events, hub.state


@pytest.mark.parametrize("payloads", [
    [m.encode_message(m.Telemetry(msg_id=i, readings=[READING] * (i + 1))) for i in range(4)],
    [m.encode_message(m.Ping(seq=3)), TARGETED["half floats"], TARGETED["duplicate key 1"]],
    [TARGETED["trailing byte"]],
    [m.encode_message(m.ReportedState(msg_id=9, state={"led": [1, 2.5, None]}))],
], ids=["telemetry", "ping-then-bad", "trailing", "state"])
def test_a_hub_session_with_fastwire_behaves_as_with_the_core(payloads):
    core = run_pair({}, payloads)
    fast = run_pair({"decode_message": fastwire.decode_message,
                     "encode_message": fastwire.encode_message}, payloads)
    assert fast == core
    assert any(isinstance(event, s.MessageReceived) or isinstance(event, tuple) for event in core[0])


def test_session_codec_defaults_and_replacements():
    session = s.HubSession(0)
    assert session._decode_message is m.decode_message
    assert session._encode_message is m.encode_message
    assert "_decode_message" not in vars(session)  # no per-session memory for the default
    plugged = s.HubSession(0, decode_message=STRICT, encode_message=fastwire.encode_message)
    assert plugged._decode_message is STRICT
    assert plugged._encode_message is fastwire.encode_message

    class FastHubSession(s.HubSession):
        _decode_message = staticmethod(fastwire.decode_message)
        _encode_message = staticmethod(fastwire.encode_message)

    fast = FastHubSession(0)
    assert "_decode_message" not in vars(fast)
    assert fast._decode_message is fastwire.decode_message
    data = m.encode_message(m.Hello(version=1, device_id="dev_0123456789", software="sdk/1.0"))
    with core_calls() as calls:
        events = fast.receive_data(s.StreamFramer().encode(data), 1)
    assert calls == [] and events[0] == s.HelloReceived(m.decode_message(data))


def test_errors_after_a_cbor2_refusal_carry_no_cbor2_context():
    # The core's error is raised outside the handler of cbor2's: logs show the core's alone.
    for decode in (STRICT, CANONICAL):
        with pytest.raises(RemoteProtocolError) as caught:
            decode(TARGETED["indefinite top map"])
        assert caught.value.__context__ is None and caught.value.__cause__ is None
