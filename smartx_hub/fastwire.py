"""The hub's message codec on cbor2's native decoder: the core's answers, several times faster.

``decode_message(data)`` returns exactly what ``smartx_device.messages.decode_message(data)``
returns (an equal message whose fields hold values of the same types) and, for every input the
core rejects, raises the same error type with the same reason and text, because it then *is*
the core: the core stays the one definition of a valid message (docs/protocol.md, "CBOR
subset", "Messages"). ``encode_message(message)`` returns the core encoder's bytes (an Ack,
the hub's one frequent output, written here in 0.2 us instead of 1.2 us).

How a fast answer is proven to be the core's (any doubt, any exception: ask the core; inputs
under 16 bytes, where the core is faster, or over ``cbor.MAX_ITEMS`` bytes go to it directly):

1. cbor2 decodes ``data`` into ``value`` under a *proof*, one of two strategies:
   - ``"strict"`` (cbor2 >= 6): the decoder refuses indefinite lengths and duplicate keys
     (its own options) and every tag (a semantic-decoder table that claims every tag number
     and refuses it); the stream position after the item (cbor2 seeks back over what it read
     ahead) must be the end of ``data``. What is left is RFC 8949 basic items with definite
     lengths, which both decoders read alike; non-shortest heads decode to the same values.
   - ``"canonical"`` (any native cbor2): ``cbor2.dumps(value, canonical=True) == data``.
     The core's encoder is byte-identical to cbor2's canonical one on the subset, and the
     core decodes its own encoding to the value encoded, so ``cbor.loads(data) == value``.
     Only canonical input (everything a SmartX device sends) takes this path.
   The strategy is picked at import by probing cbor2 with inputs each proof must refuse or
   accept (tags of every kind cbor2 knows, indefinite items, duplicate keys, trailing bytes,
   float and key-order encodings); ``STRATEGY`` says which one runs, ``"core"`` if neither.
2. A type walk confirms ``value`` is made only of the subset: exact ``int`` in
   [-2**64, 2**64-1], ``str``, ``bytes``, non-NaN ``float``, ``bool``, ``None``, ``list``,
   ``dict`` keyed by int/str/bytes/bool/None, no deeper than ``cbor.MAX_DEPTH``; ``data`` is
   at most ``cbor.MAX_ITEMS`` bytes, so it holds no more items than the core allows. NaN goes
   to the core so that every NaN is the core's own object, as the core returns it.
3. The message is built from ``value`` by the core's ``message_from_map`` (whose errors are
   then the core's: same value, same code), except a well-formed Telemetry, which is built
   here after the same checks, made on exact types (hot path: every reading of every device).

Hub-only (CPython 3.11); the device core never imports this module.
"""

from __future__ import annotations

import io
import struct
from typing import Any, Callable, Optional

import cbor2

from smartx_device import cbor as core_cbor
from smartx_device import messages as core_messages
from smartx_device.messages import Ack, Message, Telemetry, message_from_map

__all__ = ["STRATEGIES", "STRATEGY", "decode_message", "encode_message", "make_decoder"]

#: Every strategy ``make_decoder`` knows, fastest first.
STRATEGIES = ("strict", "canonical", "core")

_MAX_DEPTH = core_cbor.MAX_DEPTH
_MAX_ITEMS = core_cbor.MAX_ITEMS
_INT_LIMIT = 1 << 64  # CBOR heads carry integers in [-2**64, 2**64 - 1]
_MAX_UINT = core_messages.MAX_UINT
_MAX_READINGS = core_messages.MAX_READINGS
_MAX_NAME_LENGTH = core_messages.MAX_NAME_LENGTH
_TELEMETRY = core_messages.TELEMETRY
_CANONICAL_NAN = b"\xf9\x7e\x00"
# Below this many bytes the core decodes faster than cbor2 plus the proof (measured: an Ack of
# 9 bytes takes 1.8 us in the core, 2.2 us here; a Telemetry of 31 bytes 3.7 us, 1.9 us here).
_SMALL = 16

_core_decode = core_messages.decode_message
_core_encode = core_messages.encode_message


# ---------------------------------------------------------------------------------------------
# Step 2: the subset walk.


def _is_subset(value: Any, level: int) -> bool:
    """True if ``value`` is made only of the core's subset; a container here sits at nesting
    ``level`` (the top item is level 1), and no container may sit deeper than MAX_DEPTH."""
    kind = type(value)
    if kind is str or kind is bytes or kind is bool or value is None:
        return True
    if kind is int:
        return -_INT_LIMIT <= value < _INT_LIMIT
    if kind is float:
        return value == value  # NaN: the core's own NaN object is what it returns
    if level > _MAX_DEPTH:
        return False
    if kind is list:
        for item in value:
            if not _is_subset(item, level + 1):
                return False
        return True
    if kind is dict:
        for key, item in value.items():
            key_kind = type(key)
            if key_kind is int:
                if not -_INT_LIMIT <= key < _INT_LIMIT:
                    return False
            elif not (key_kind is str or key_kind is bytes or key_kind is bool or key is None):
                return False  # cbor2 gives tuples/frozendicts/floats here; the core refuses them
            if not _is_subset(item, level + 1):
                return False
        return True
    return False  # a tag's object, undefined, a simple value, a break marker...


# ---------------------------------------------------------------------------------------------
# Step 3: the message.

# The Telemetry table this module's builder was written against. If the core's table changes,
# the builder switches itself off and Telemetry goes through message_from_map like the rest.
_TELEMETRY_FIELDS = ((1, "msg_id", core_messages._UINT, True),
                     (2, "readings", core_messages._READINGS, True))
_TELEMETRY_KEYS = frozenset((0, 1, 2))
_FAST_TELEMETRY = Telemetry.FIELDS == _TELEMETRY_FIELDS and Telemetry.TYPE == _TELEMETRY


def _telemetry(mapping: dict) -> Optional[Message]:
    """The Telemetry ``mapping`` carries if it is one the core accepts, checked on exact types
    (so every value is also proven to be of the subset); None for anything else.

    Mirrors ``messages._check_readings`` and the _UINT check: a rule added there must be added
    here (test_fastwire's differential tests compare the two on every kind of reading)."""
    if mapping.keys() != _TELEMETRY_KEYS:
        return None
    for key in mapping:
        if type(key) is not int:  # 0.0 or False equal 0 as keys; the core refuses a float key
            return None
    msg_id = mapping[1]
    readings = mapping[2]
    if (type(msg_id) is not int or not 0 <= msg_id <= _MAX_UINT or type(readings) is not list
            or not 0 < len(readings) <= _MAX_READINGS):
        return None
    for reading in readings:
        if type(reading) is not list or len(reading) != 3:
            return None
        stream, timestamp, value = reading
        if (type(stream) is not str or not 0 < len(stream) <= _MAX_NAME_LENGTH
                or type(timestamp) is not int or not 0 <= timestamp <= _MAX_UINT):
            return None
        kind = type(value)
        if kind is float:
            if value != value:
                return None
        elif kind is int:
            if not -_INT_LIMIT <= value < _INT_LIMIT:
                return None
        elif not (kind is str or kind is bool or value is None or kind is bytes):
            # top map (1) > readings (2) > reading (3): a container value sits at level 4
            if not _is_subset(value, 4):
                return None
    # As message_from_map builds it: no __init__, fields set in table order.
    message = object.__new__(Telemetry)
    message.msg_id = msg_id
    message.readings = readings
    return message


def _message(value: dict, data: bytes) -> Message:
    """The message of a dict proven to be what ``cbor.loads(data)`` returns (but for the walk,
    done here); the core decides whatever the walk cannot vouch for."""
    if _FAST_TELEMETRY:
        message_type = value.get(0)
        if type(message_type) is int and message_type == _TELEMETRY:
            message = _telemetry(value)
            if message is not None:
                return message
    if not _is_subset(value, 1):
        return _core_decode(data)
    # ``value`` equals the core's value, types and key order included: message_from_map
    # returns or raises exactly what it does inside the core's decode_message.
    return message_from_map(value)


# ---------------------------------------------------------------------------------------------
# Step 1: the proofs.


class _TagRefused(ValueError):
    """Raised inside cbor2 for every tag: the subset has none."""


def _refuse_tag(*_: Any) -> Any:
    """The decoder (and tag hook) for every tag: refuse it."""
    raise _TagRefused("tags are not in the subset")


class _EveryTagRefused(dict):
    """A semantic-decoder table that claims every tag number and refuses it.

    cbor2 (>= 6) looks a tag up here before its built-in decoders; a LookupError would send it
    on to them, so the refusal is a decoder that raises (ValueError), not a missing key."""

    def __getitem__(self, tag: Any) -> Callable[..., Any]:
        return _refuse_tag

    def get(self, tag: Any, default: Any = None) -> Callable[..., Any]:
        return _refuse_tag

    def __contains__(self, tag: object) -> bool:
        return True


_STRICT_OPTIONS = {
    "tag_hook": _refuse_tag,
    "semantic_decoders": _EveryTagRefused(),
    "allow_indefinite": False,
    "allow_duplicate_keys": False,
    # Bounds cbor2's work only: the walk enforces the core's MAX_DEPTH exactly.
    "max_depth": _MAX_DEPTH + 1,
}


def _strict_value(data: bytes) -> Any:
    """The item ``data`` holds, decoded by cbor2 with tags, indefinite lengths and duplicate
    keys refused; raises if cbor2 refuses it or bytes follow the item."""
    stream = io.BytesIO(data)
    value = cbor2.CBORDecoder(stream, **_STRICT_OPTIONS).decode()
    if stream.tell() != len(data):
        raise ValueError("bytes after the item")
    return value


def _canonical_value(data: bytes) -> Any:
    """The item ``data`` holds if ``data`` is its canonical encoding; raises otherwise."""
    value = cbor2.loads(data)
    if cbor2.dumps(value, canonical=True) != data:
        raise ValueError("not the canonical encoding")
    if _CANONICAL_NAN in data:
        # Canonical encoding writes every NaN as f97e00 (no other NaN can be here), and the
        # walk would send it to the core anyway: skipping cbor2's object saves the walk.
        raise ValueError("NaN: the core's own object is returned")
    return value


def make_decoder(strategy: str) -> Callable[[Any], Message]:
    """Return a ``decode_message`` that proves its fast answers by ``strategy`` (one of
    ``STRATEGIES``; ``"core"`` returns the core's function itself)."""
    if strategy == "core":
        return _core_decode
    if strategy == "strict":
        prove = _strict_value
    elif strategy == "canonical":
        prove = _canonical_value
    else:
        raise ValueError("unknown strategy %r: one of %s" % (strategy, ", ".join(STRATEGIES)))

    def decode_message(data: Any) -> Message:
        """Return the message encoded in ``data``; RemoteProtocolError (the core's) otherwise."""
        if type(data) is not bytes:
            if not isinstance(data, (bytearray, memoryview)):
                return _core_decode(data)  # not bytes, or a subclass: the core's own handling
            data = bytes(data)  # what the core does with these too
        size = len(data)
        if size < _SMALL or size > _MAX_ITEMS:
            # Small: Acks, Pings, Pongs decode faster in the core than cbor2's fixed costs.
            # Large: the core's item limit would need counting (an item takes >= 1 byte).
            return _core_decode(data)
        try:
            value = prove(data)
        except Exception:  # cbor2's refusals, RecursionError, MemoryError: the core decides
            value = None  # (outside this handler, so its error carries no cbor2 context)
        if type(value) is not dict:
            return _core_decode(data)  # not proven, or not a message: the core words it
        return _message(value, data)

    decode_message.strategy = strategy  # type: ignore[attr-defined]
    return decode_message


# ---------------------------------------------------------------------------------------------
# Encoding: Acks, one per Telemetry, are the hub's hot output.

# {0: ACK, 1: msg_id}: map of two, key 0, the type, key 1; the head of msg_id follows.
_ACK_PREFIX = bytes((0xA2, 0x00, core_messages.ACK, 0x01))
_UINT_HEADS = tuple(bytes((n,)) for n in range(24))


def encode_message(message: Message) -> bytes:
    """Return ``messages.encode_message(message)``: an Ack is written here, head by head;
    everything else (and an Ack the core would refuse) goes to the core's encoder."""
    if type(message) is Ack:
        msg_id = message.msg_id
        if type(msg_id) is int and 0 <= msg_id <= _MAX_UINT:
            # Shortest unsigned-integer head (RFC 8949 4.2.1), as the core writes it.
            if msg_id < 24:
                return _ACK_PREFIX + _UINT_HEADS[msg_id]
            if msg_id < 0x100:
                return _ACK_PREFIX + bytes((0x18, msg_id))
            if msg_id < 0x10000:
                return _ACK_PREFIX + struct.pack(">BH", 0x19, msg_id)
            if msg_id < 0x100000000:
                return _ACK_PREFIX + struct.pack(">BI", 0x1A, msg_id)
            return _ACK_PREFIX + struct.pack(">BQ", 0x1B, msg_id)
    return _core_encode(message)


# ---------------------------------------------------------------------------------------------
# Picking the strategy: probe cbor2 for the behaviour each proof rests on.

# Items every proof must refuse, each one that cbor2 alone decodes: a tag for each of its
# built-in decoders (datetimes, bignums, decimal and big floats, embedded CBOR, string
# references, shared values, rationals, regexps, MIME, UUIDs, IP addresses and networks, dates,
# sets, complex numbers, self-describe) and unknown ones; indefinite lengths; duplicate keys
# (1/1 and 0/false); bytes after the item.
_MUST_REFUSE = (
    "c074323031332d30332d32315432303a30343a30305a", "c11a514b67b0", "c24101", "c34101",
    "c48221196ab3", "c5822003", "d54101", "d81863010203", "d901008263616263d81900",
    "d81c01", "82d81c8101d81d00", "d81e820102", "d82363612e62", "d8246161",
    "d8255001020304050607080910111213141516", "d8344401020304", "d864190400", "d9010281f4",
    "d9010444c0a80001", "d90105a144c0a800001818", "d903ec6a323031332d30332d3231",
    "d9a7f8820102", "d9d9f701", "d9d9f7a10006", "d90fa001", "dbffffffffffffffff01",
    "5f4101ff", "7f6161ff", "9f01ff", "bf0101ff", "5fff", "7fff", "9fff", "bfff", "a1009f01ff",
    "a201010102", "a20001f402", "0101", "a00000", "a1000600",
)
# Subset items (a Telemetry, an Ack, specials, non-shortest heads and floats): a proof either
# gives the core's value or refuses the item (canonical proofs refuse non-shortest forms);
# the strict proof must take them all.
_MUST_ACCEPT = (
    "a3000601190539028183647465" "6d701b0000019ad8e9b48ffb40355eb851eb851f",
    "a20007011a0001e240", "a100f97c00", "a1008363616263f98000fa47c35000",
    "b802000718011b0000000000000001", "a10083fb3ff8000000000000f4f6",
)


def _probe(strategy: str) -> bool:
    """True if ``strategy`` (its proof, then the walk) refuses every item of _MUST_REFUSE, gives
    the core's value or refuses each of _MUST_ACCEPT, and cbor2 encodes like the core."""
    prove = _strict_value if strategy == "strict" else _canonical_value
    try:
        for hex_text in _MUST_REFUSE:
            try:
                value = prove(bytes.fromhex(hex_text))
            except Exception:
                continue
            if _is_subset(value, 1):  # the walk is the proof's last step
                return False
        for hex_text in _MUST_ACCEPT:
            data = bytes.fromhex(hex_text)
            try:
                value = prove(data)
            except Exception:
                if strategy == "strict":
                    return False  # strict proofs take every well-formed subset item
                continue
            if value != core_cbor.loads(data) or not _is_subset(value, 1):
                return False
        for value in _ENCODER_PROBES:
            if cbor2.dumps(value, canonical=True) != core_cbor.dumps(value):
                return False
    except Exception:
        return False
    return True


_ENCODER_PROBES = (
    0, 23, 24, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**64 - 1, -1, -24, -25, -(2**64),
    0.0, -0.0, 1.5, 65504.0, 5.960464477539063e-08, 100000.0, 3.4028234663852886e38, 21.37,
    float("inf"), float("-inf"), float("nan"), "", "temp", "\u00e9\u6f22", b"", b"\x00\xff",
    [], [1, [2, [3]]], {}, {0: 6, 1: 2, 2: [["temp", 1764430000000, 21.37]]},
    {"b": 1, "a": 2, 10: 3, -1: 4, b"k": 5, "aa": 6, True: 7, None: 8},
)


def _pick_strategy() -> str:
    """The fastest strategy whose probe passes on the installed cbor2; "core" if none."""
    # A pure-Python cbor2 is slower than the core: only the native extension is worth it.
    if type(cbor2.loads).__name__ != "builtin_function_or_method":
        return "core"
    for strategy in ("strict", "canonical"):
        if _probe(strategy):
            return strategy
    return "core"


#: The strategy ``decode_message`` runs with on this interpreter and cbor2.
STRATEGY = _pick_strategy()
#: Returns ``messages.decode_message(data)``'s message, or raises its error.
decode_message = make_decoder(STRATEGY)
