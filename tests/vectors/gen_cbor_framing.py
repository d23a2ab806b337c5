"""Writes tests/vectors/cbor.json and tests/vectors/framing.json (docs/protocol.md, "Framing").

cbor.json: RFC 8949 Appendix A vectors inside the core's subset, the Appendix A vectors the
subset refuses, and the core's own accept/refuse cases. The "canonical" flag and every value
come from the reference codec (cbor2), not from the core, so the vectors check the core rather
than repeat it. Each vector:
  {"name", "hex", "value": Python literal for eval() (MicroPython too) or null,
   "error": null or "CBORDecodeError", "canonical": true if dumps(value) must give back hex}

framing.json: wire bytes and what a receiver must make of them, fed in one piece and then
ended (feed(b"")); any split must give the same.
  stream: {"name", "payloads": [hex], "wire": hex, "max_frame_size", "error": null or the
           error class raised once the payloads before it are out}
  serial: {"name", "wire": hex, "items": [{"frame": hex} | {"console": hex}], "corrupt": int}
           (max_frame_size is the default, 16384)
The serial wire is built with a hand-written COBS and zlib's CRC-32, not with the core.

Run: python tests/vectors/gen_cbor_framing.py
"""

from __future__ import annotations

import json
import math
import pathlib
import struct
import zlib

import cbor2

HERE = pathlib.Path(__file__).parent
ERROR = "CBORDecodeError"

# (name, hex, value or ERROR). RFC 8949 Appendix A, in its order.
RFC8949 = [
    ("0", "00", 0),
    ("1", "01", 1),
    ("10", "0a", 10),
    ("23", "17", 23),
    ("24", "1818", 24),
    ("25", "1819", 25),
    ("100", "1864", 100),
    ("1000", "1903e8", 1000),
    ("1000000", "1a000f4240", 1000000),
    ("1000000000000", "1b000000e8d4a51000", 1000000000000),
    ("2**64-1", "1bffffffffffffffff", 18446744073709551615),
    ("bignum 2**64 (tag 2)", "c249010000000000000000", ERROR),
    ("-2**64", "3bffffffffffffffff", -18446744073709551616),
    ("bignum -2**64-1 (tag 3)", "c349010000000000000000", ERROR),
    ("-1", "20", -1),
    ("-10", "29", -10),
    ("-100", "3863", -100),
    ("-1000", "3903e7", -1000),
    ("0.0", "f90000", 0.0),
    ("-0.0", "f98000", -0.0),
    ("1.0", "f93c00", 1.0),
    ("1.1", "fb3ff199999999999a", 1.1),
    ("1.5", "f93e00", 1.5),
    ("65504.0", "f97bff", 65504.0),
    ("100000.0", "fa47c35000", 100000.0),
    ("3.4028234663852886e+38", "fa7f7fffff", 3.4028234663852886e38),
    ("1.0e+300", "fb7e37e43c8800759c", 1.0e300),
    ("5.960464477539063e-8", "f90001", 5.960464477539063e-8),
    ("0.00006103515625", "f90400", 0.00006103515625),
    ("-4.0", "f9c400", -4.0),
    ("-4.1", "fbc010666666666666", -4.1),
    ("Infinity (half)", "f97c00", math.inf),
    ("NaN (half)", "f97e00", math.nan),
    ("-Infinity (half)", "f9fc00", -math.inf),
    ("Infinity (single)", "fa7f800000", math.inf),
    ("NaN (single)", "fa7fc00000", math.nan),
    ("-Infinity (single)", "faff800000", -math.inf),
    ("Infinity (double)", "fb7ff0000000000000", math.inf),
    ("NaN (double)", "fb7ff8000000000000", math.nan),
    ("-Infinity (double)", "fbfff0000000000000", -math.inf),
    ("false", "f4", False),
    ("true", "f5", True),
    ("null", "f6", None),
    ("undefined", "f7", ERROR),
    ("simple(16)", "f0", ERROR),
    ("simple(255)", "f8ff", ERROR),
    ("tag 0 date string", "c074323031332d30332d32315432303a30343a30305a", ERROR),
    ("tag 1 epoch int", "c11a514b67b0", ERROR),
    ("tag 1 epoch float", "c1fb41d452d9ec200000", ERROR),
    ("tag 23 base16", "d74401020304", ERROR),
    ("tag 24 embedded", "d818456449455446", ERROR),
    ("tag 32 uri", "d82076687474703a2f2f7777772e6578616d706c652e636f6d", ERROR),
    ("h''", "40", b""),
    ("h'01020304'", "4401020304", b"\x01\x02\x03\x04"),
    ('""', "60", ""),
    ('"a"', "6161", "a"),
    ('"IETF"', "6449455446", "IETF"),
    ('"\\"\\\\"', "62225c", '"\\'),
    ('"\\u00fc"', "62c3bc", "\u00fc"),
    ('"\\u6c34"', "63e6b0b4", "\u6c34"),
    ('"\\ud800\\udd51"', "64f0908591", "\U00010151"),
    ("[]", "80", []),
    ("[1, 2, 3]", "83010203", [1, 2, 3]),
    ("[1, [2, 3], [4, 5]]", "8301820203820405", [1, [2, 3], [4, 5]]),
    ("[1..25]", "98190102030405060708090a0b0c0d0e0f101112131415161718181819", list(range(1, 26))),
    ("{}", "a0", {}),
    ("{1: 2, 3: 4}", "a201020304", {1: 2, 3: 4}),
    ('{"a": 1, "b": [2, 3]}', "a26161016162820203", {"a": 1, "b": [2, 3]}),
    ('["a", {"b": "c"}]', "826161a161626163", ["a", {"b": "c"}]),
    ('{"a": "A", ... "e": "E"}', "a56161614161626142616361436164614461656145",
     {"a": "A", "b": "B", "c": "C", "d": "D", "e": "E"}),
    ("(_ h'0102', h'030405')", "5f42010243030405ff", ERROR),
    ('(_ "strea", "ming")', "7f657374726561646d696e67ff", ERROR),
    ("[_ ]", "9fff", ERROR),
    ("[_ 1, [2, 3], [_ 4, 5]]", "9f018202039f0405ffff", ERROR),
    ("[_ 1, [2, 3], [4, 5]]", "9f01820203820405ff", ERROR),
    ("[1, [2, 3], [_ 4, 5]]", "83018202039f0405ff", ERROR),
    ("[1, [_ 2, 3], [4, 5]]", "83019f0203ff820405", ERROR),
    ("[_ 1..25]", "9f0102030405060708090a0b0c0d0e0f101112131415161718181819ff", ERROR),
    ('{_ "a": 1, "b": [_ 2, 3]}', "bf61610161629f0203ffff", ERROR),
    ('["a", {_ "b": "c"}]', "826161bf61626163ff", ERROR),
    ('{_ "Fun": true, "Amt": -2}', "bf6346756ef563416d7421ff", ERROR),
]


def _nested(depth: int) -> str:
    """Hex of ``depth`` nested one-element arrays around 0."""
    return "81" * depth + "00"


def _nested_value(depth: int) -> list:
    """``depth`` nested one-element lists around 0."""
    value = 0
    for _ in range(depth):
        value = [value]
    return value


# The core's own cases: what it accepts beyond the shortest form, and what it refuses.
SUBSET = [
    # Accepted although not deterministic: the decoder is liberal about heads and key order.
    ("non-shortest uint 0 in one extra byte", "1800", 0),
    ("non-shortest uint 1 in eight bytes", "1b0000000000000001", 1),
    ("non-shortest negative -1 in two bytes", "390000", -1),
    ("non-shortest text length", "780161", "a"),
    ("non-shortest array length", "990001f5", [True]),
    ("float 1.0 as double", "fb3ff0000000000000", 1.0),
    ("float 1.5 as single", "fa3fc00000", 1.5),
    ("NaN with payload", "fb7ff8000000000001", math.nan),
    ("map keys out of order", "a2020101f4", {2: 1, 1: False}),
    ("half subnormal max", "f903ff", 6.097555160522461e-05),
    ("half -subnormal min", "f98001", -5.960464477539063e-08),
    ("single subnormal min", "fa00000001", 1.401298464324817e-45),
    ("double subnormal min", "fb0000000000000001", 5e-324),
    ("double max", "fb7fefffffffffffff", 1.7976931348623157e308),
    ("float16 precision boundary 2049.0 needs single", "fa45001000", 2049.0),
    ("65520.0 rounds out of half: single", "fa477ff000", 65520.0),
    ("map with every key type", None, {None: 0, False: 1, True: 2, 7: 3, "a": 4, b"b": 5}),
    ("length-first key order: -1 before 24", "a22001181802", {-1: 1, 24: 2}),
    ("length-first key order: text before 1000", "a2616101" "1903e802", {"a": 1, 1000: 2}),
    ("telemetry-like message", None, {0: 6, 1: 1, 2: [["temp", 1764430000000, 21.5]]}),
    ("nesting depth 16 (the limit)", _nested(16), _nested_value(16)),
    ("empty byte string as map value", "a1614140", {"A": b""}),
    ("text with NUL", "6100", "\x00"),
    ("text with U+10FFFF", "64f48fbfbf", "\U0010ffff"),
    ("text with U+FFFD and U+E000", "66efbfbdee8080", "\ufffd\ue000"),
    ("deep mixed nesting", None, [{"a": [{"b": [1, [2.5, {b"": None}]]}]}]),
    ("every head size", None, [0, 23, 24, 255, 256, 65535, 65536, 4294967295, 4294967296,
                               -24, -25, -256, -257, -65536, -65537, -4294967296, -4294967297]),
    # Refused: outside the subset or malformed.
    ("nesting depth 17", _nested(17), ERROR),
    ("empty input", "", ERROR),
    ("truncated uint head", "19", ERROR),
    ("truncated uint64 head", "1b00000000000000", ERROR),
    ("truncated byte string", "4401", ERROR),
    ("truncated text string", "62c3", ERROR),
    ("truncated array", "8201", ERROR),
    ("truncated map value", "a101", ERROR),
    ("truncated float16", "f93c", ERROR),
    ("truncated float32", "fa3fc000", ERROR),
    ("truncated float64", "fb3ff00000000000", ERROR),
    ("trailing byte", "0000", ERROR),
    ("two items", "6161f5", ERROR),
    ("reserved additional info 28", "1c", ERROR),
    ("reserved additional info 29 (negative)", "3d", ERROR),
    ("reserved additional info 30 (bytes)", "5e", ERROR),
    ("reserved additional info 28 (simple)", "fc", ERROR),
    ("indefinite uint (not well-formed)", "1f", ERROR),
    ("lone break", "ff", ERROR),
    ("break inside array", "81ff", ERROR),
    ("indefinite byte string", "5f4101ff", ERROR),
    ("simple value 0", "e0", ERROR),
    ("simple value 19", "f3", ERROR),
    ("two-byte simple value 24 (not well-formed)", "f818", ERROR),
    ("two-byte simple value 32", "f820", ERROR),
    ("tag 55799 self-describe", "d9d9f700", ERROR),
    ("duplicate int key", "a201020103", ERROR),
    ("duplicate text key", "a2616101616102", ERROR),
    ("key 1 and key true collide in Python", "a201f4f5f5", ERROR),
    ("key 0 and key false collide in Python", "a200f4f4f5", ERROR),
    ("array as map key", "a1810102", ERROR),
    ("map as map key", "a1a00102", ERROR),
    ("float as map key", "a1f93c0001", ERROR),
    ("byte string length 2**64-1", "5bffffffffffffffff", ERROR),
    ("text string length 2**64-1", "7bffffffffffffffff", ERROR),
    ("array length 2**64-1", "9bffffffffffffffff", ERROR),
    ("map length 2**64-1", "bbffffffffffffffff", ERROR),
    ("array length 2**32-1", "9affffffff00", ERROR),
    ("map length past input", "a30102", ERROR),
    ("utf-8: lone continuation byte", "6180", ERROR),
    ("utf-8: invalid byte ff", "61ff", ERROR),
    ("utf-8: overlong NUL c0 80", "62c080", ERROR),
    ("utf-8: overlong slash e0 80 af", "63e080af", ERROR),
    ("utf-8: surrogate d800", "63eda080", ERROR),
    ("utf-8: surrogate dfff", "63edbfbf", ERROR),
    ("utf-8: above U+10FFFF", "64f4908080", ERROR),
    ("utf-8: 5-byte form", "65f888808080", ERROR),
    ("utf-8: truncated 3-byte sequence", "62e282", ERROR),
    ("utf-8: valid then truncated 4-byte", "6461f09f98", ERROR),
]


def _float_literal(value: float) -> str:
    """A float as a literal that CPython and MicroPython evaluate to the same double."""
    if math.isnan(value):
        return "float('nan')"
    if math.isinf(value):
        return "float('inf')" if value > 0 else "float('-inf')"
    return repr(value)


def literal(value) -> str:
    """``value`` as Python source that eval() on MicroPython gives back (dict order irrelevant)."""
    if isinstance(value, str):
        # Escaped to ASCII: JSON then needs no surrogate pairs, which MicroPython's json
        # module decodes as two lone surrogates.
        return ascii(value)
    if value is None or isinstance(value, (bool, int, bytes)):
        return repr(value)
    if isinstance(value, float):
        return _float_literal(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(literal(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join("%s: %s" % (literal(k), literal(v)) for k, v in value.items()) + "}"
    raise TypeError("no literal for %r" % (value,))


def _same(a, b) -> bool:
    """Equality that tells NaN from NaN-free, -0.0 from 0.0, bool from int, list from dict."""
    if isinstance(a, float) or isinstance(b, float):
        if not (isinstance(a, float) and isinstance(b, float)):
            return False
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)
    if type(a) is not type(b):
        return False
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def cbor_vectors() -> list:
    """Every CBOR vector, RFC ones first. Values are checked against cbor2's decoding."""
    vectors = []
    for prefix, table in (("rfc8949", RFC8949), ("subset", SUBSET)):
        for name, hex_text, value in table:
            full_name = "%s: %s" % (prefix, name)
            if isinstance(value, str) and value == ERROR:
                vectors.append({"name": full_name, "hex": hex_text, "value": None,
                                "error": ERROR, "canonical": False})
                continue
            if hex_text is None:
                hex_text = cbor2.dumps(value, canonical=True).hex()
            raw = bytes.fromhex(hex_text)
            decoded = cbor2.loads(raw)
            if not _same(decoded, value):
                raise SystemExit("vector %r: cbor2 decodes %r" % (full_name, decoded))
            canonical = cbor2.dumps(decoded, canonical=True) == raw
            vectors.append({"name": full_name, "hex": hex_text, "value": literal(value),
                            "error": None, "canonical": canonical})
    return vectors


# ---------------------------------------------------------------------------------------------
# Framing


def leb128(value: int) -> bytes:
    """Minimal unsigned LEB128 (written here independently of the core)."""
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def stream_frame(payload: bytes) -> bytes:
    return leb128(len(payload)) + payload


def cobs(data: bytes) -> bytes:
    """COBS, the paper's form: no empty block after a final 254-byte block."""
    out = bytearray()
    block = bytearray()
    closed_full_block = False
    for byte in data:
        closed_full_block = False
        if byte == 0:
            out += bytes([len(block) + 1]) + block
            block = bytearray()
        else:
            block.append(byte)
            if len(block) == 254:
                out += b"\xff" + block
                block = bytearray()
                closed_full_block = True
    if not closed_full_block:
        out += bytes([len(block) + 1]) + block
    return bytes(out)


def serial_frame(payload: bytes) -> bytes:
    body = payload + struct.pack("<I", zlib.crc32(payload) & 0xFFFFFFFF)
    return b"\x00" + cobs(body) + b"\x00"


MESSAGE = cbor2.dumps({0: 6, 1: 1, 2: [["temp", 1764430000000, 21.5]]}, canonical=True)
TWENTY = bytes(range(0x41, 0x41 + 20))


def stream_vectors() -> list:
    """Stream framing cases: (payloads delivered, wire, max_frame_size, error)."""
    cases = [
        ("one 20-byte payload", [TWENTY], stream_frame(TWENTY), 16384, None),
        ("one message", [MESSAGE], stream_frame(MESSAGE), 16384, None),
        ("three frames", [b"\x01", MESSAGE, b"\x00\x00"],
         stream_frame(b"\x01") + stream_frame(MESSAGE) + stream_frame(b"\x00\x00"), 16384, None),
        ("127 bytes: largest 1-byte header", [b"\xaa" * 127], stream_frame(b"\xaa" * 127), 16384, None),
        ("128 bytes: smallest 2-byte header", [b"\xbb" * 128], stream_frame(b"\xbb" * 128), 16384, None),
        ("300 bytes", [bytes(range(256)) + bytes(44)], stream_frame(bytes(range(256)) + bytes(44)), 16384, None),
        ("payload of exactly max_frame_size", [b"\x07" * 10], stream_frame(b"\x07" * 10), 10, None),
        ("empty stream", [], b"", 16384, None),
        ("header declares max_frame_size + 1 (no body needed to refuse)", [], leb128(11), 10,
         "FrameTooLargeError"),
        ("header declares 16384 > max 16383, 3-byte header", [], leb128(16384), 16383,
         "FrameTooLargeError"),
        ("header declares 2**28-1 (largest 4-byte header)", [], b"\xff\xff\xff\x7f", 1048576,
         "FrameTooLargeError"),
        ("good frame, then an oversize header", [b"ok"], stream_frame(b"ok") + leb128(2000), 1000,
         "FrameTooLargeError"),
        ("zero-length frame", [], b"\x00", 16384, "FramingError"),
        ("good frame, then a zero-length frame", [b"ok"], stream_frame(b"ok") + b"\x00", 16384,
         "FramingError"),
        ("non-minimal header 81 00 (1 in two bytes)", [], b"\x81\x00a", 16384, "FramingError"),
        ("non-minimal header 80 00 (0 in two bytes)", [], b"\x80\x00", 16384, "FramingError"),
        ("non-minimal header ff 80 00", [], b"\xff\x80\x00", 1048576, "FramingError"),
        ("5-byte header", [], b"\x80\x80\x80\x80\x01", 1048576, "FramingError"),
        ("truncated header at end of stream", [], b"\x81", 16384, "FramingError"),
        ("truncated body at end of stream", [], b"\x05abc", 16384, "FramingError"),
        ("good frame, then truncated body", [b"ok"], stream_frame(b"ok") + b"\x03a", 16384,
         "FramingError"),
        ("header of max 1048576 (80 80 40), no body", [], b"\x80\x80\x40", 1048576, "FramingError"),
    ]
    return [
        {"name": name, "payloads": [p.hex() for p in payloads], "wire": wire.hex(),
         "max_frame_size": max_frame_size, "error": error}
        for name, payloads, wire, max_frame_size, error in cases
    ]


def _corrupt_crc(payload: bytes) -> bytes:
    """A frame whose CRC is off by one bit."""
    body = payload + struct.pack("<I", (zlib.crc32(payload) ^ 1) & 0xFFFFFFFF)
    return b"\x00" + cobs(body) + b"\x00"


def serial_vectors() -> list:
    """Serial framing cases: (wire, items, corrupt)."""
    frame_a = serial_frame(MESSAGE)
    frame_b = serial_frame(b"\x01\x02")
    # Past the chunk limit of 16453 bytes: the 16453rd byte starts a 2-byte character, so the
    # first piece stops before it.
    long_console = ("\u00e9" * 9000).encode()
    junk = bytes([1, 2, 3, 0xFF]) * 4200  # 16800 bytes without a 0x00: oversize, dropped
    cases = [
        ("one 20-byte payload", serial_frame(TWENTY), [("frame", TWENTY)], 0),
        ("one message", frame_a, [("frame", MESSAGE)], 0),
        ("payload of zeros", serial_frame(b"\x00" * 5), [("frame", b"\x00" * 5)], 0),
        ("single zero byte payload", serial_frame(b"\x00"), [("frame", b"\x00")], 0),
        ("254 non-zero bytes (one full COBS block + CRC)", serial_frame(b"\x01" * 254),
         [("frame", b"\x01" * 254)], 0),
        ("250 non-zero bytes (CRC completes a 254-byte block)", serial_frame(b"\x11" * 250),
         [("frame", b"\x11" * 250)], 0),
        ("255 non-zero bytes", serial_frame(b"\xfe" * 255), [("frame", b"\xfe" * 255)], 0),
        ("all byte values", serial_frame(bytes(range(256))), [("frame", bytes(range(256)))], 0),
        ("back-to-back frames share no delimiter", frame_a + frame_b,
         [("frame", MESSAGE), ("frame", b"\x01\x02")], 0),
        ("frame without its leading delimiter", frame_b[1:], [("frame", b"\x01\x02")], 0),
        ("runs of empty chunks are ignored", b"\x00\x00\x00" + frame_b + b"\x00\x00",
         [("frame", b"\x01\x02")], 0),
        ("console text around frames", b"boot ok\r\n" + frame_a + b"temp=21.5\n" + frame_b,
         [("console", b"boot ok\r\n"), ("frame", MESSAGE), ("console", b"temp=21.5\n"),
          ("frame", b"\x01\x02")], 0),
        ("console text in UTF-8", "caf\u00e9 \u2713\n".encode() + frame_b,
         [("console", "caf\u00e9 \u2713\n".encode()), ("frame", b"\x01\x02")], 0),
        ("printable bytes that are not UTF-8 are dropped", b"noise \xff\xfe\r\n" + frame_b,
         [("frame", b"\x01\x02")], 1),
        ("control characters are not console text", b"bell\x07\r\n" + frame_b,
         [("frame", b"\x01\x02")], 1),
        ("console text pending at end of stream is flushed", frame_b + b">>> ",
         [("frame", b"\x01\x02"), ("console", b">>> ")], 0),
        ("bad CRC dropped, next frame delivered", _corrupt_crc(MESSAGE) + frame_b,
         [("frame", b"\x01\x02")], 1),
        ("flipped byte dropped, next frame delivered",
         frame_a[:5] + bytes([frame_a[5] ^ 0x40]) + frame_a[6:] + frame_b,
         [("frame", b"\x01\x02")], 1),
        ("deleted byte dropped, next frame delivered", frame_a[:7] + frame_a[8:] + frame_b,
         [("frame", b"\x01\x02")], 1),
        ("inserted zero splits a frame in two bad chunks",
         frame_a[:9] + b"\x00" + frame_a[9:] + frame_b, [("frame", b"\x01\x02")], 2),
        ("COBS code past the chunk end", b"\x00\x09\x01\x02\x03\x00" + frame_b,
         [("frame", b"\x01\x02")], 1),
        ("binary noise dropped", b"\x01\x02\x03\x1b[\x7f\x00" + frame_b,
         [("frame", b"\x01\x02")], 1),
        ("chunk too short to hold a CRC", b"\x00\x03\x01\x02\x00" + frame_b,
         [("frame", b"\x01\x02")], 1),
        ("truncated frame at end of stream", frame_b + frame_a[:-3], [("frame", b"\x01\x02")], 1),
        ("console line longer than the chunk limit comes in pieces cut between characters",
         long_console + b"\x00" + frame_b,
         [("console", long_console[:16452]), ("console", long_console[16452:]),
          ("frame", b"\x01\x02")], 0),
        ("oversize binary chunk dropped, next frame delivered", b"\x00" + junk + frame_b,
         [("frame", b"\x01\x02")], 0),
    ]
    return [
        {"name": name, "wire": wire.hex(),
         "items": [{kind: data.hex()} for kind, data in items], "corrupt": corrupt}
        for name, wire, items, corrupt in cases
    ]


def build_cbor() -> dict:
    """The cbor.json document."""
    return {"vectors": cbor_vectors()}


def build_framing() -> dict:
    """The framing.json document."""
    return {"stream": stream_vectors(), "serial": serial_vectors()}


def render(document: dict) -> str:
    """The JSON text of a vectors file."""
    return json.dumps(document, indent=1) + "\n"


if __name__ == "__main__":
    (HERE / "cbor.json").write_text(render(build_cbor()))
    (HERE / "framing.json").write_text(render(build_framing()))
