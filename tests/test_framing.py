"""Tests of smartx_device.framing: stream (varint) and serial (COBS + CRC-32) framers."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import struct
import zlib

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from smartx_device import _utf8
from smartx_device import framing
from smartx_device.errors import (
    FramingError,
    FrameTooLargeError,
    LocalProtocolError,
    RemoteProtocolError,
)
from smartx_device.framing import (
    DEFAULT_MAX_FRAME_SIZE,
    MAX_FRAME_SIZE_LIMIT,
    ConsoleText,
    SerialFramer,
    StreamFramer,
    cobs_decode,
    cobs_encode,
    serial_chunk_limit,
)
from smartx_device.reasons import CLOSE_FRAME_TOO_LARGE, CLOSE_MALFORMED

VECTORS = pathlib.Path(__file__).parent / "vectors"


def _load_generator():
    spec = importlib.util.spec_from_file_location("gen_cbor_framing", VECTORS / "gen_cbor_framing.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GEN = _load_generator()


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` cut at the given offsets (taken modulo its length, deduplicated)."""
    if not data:
        return []
    points = sorted({cut % (len(data) + 1) for cut in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:]) if b > a]


cut_lists = st.lists(st.integers(min_value=0, max_value=10**6), max_size=12)
payloads = st.binary(min_size=1, max_size=600)


def feed_all(framer, pieces, end=True):
    out = []
    for piece in pieces:
        out.extend(framer.feed(piece))
    if end:
        out.extend(framer.feed(b""))
    return out


# ------------------------------------------------------------------------------------------
# Shared contract


@pytest.mark.parametrize("cls", [StreamFramer, SerialFramer])
def test_framers_share_the_interface(cls):
    framer = cls()
    assert framer.max_frame_size == DEFAULT_MAX_FRAME_SIZE == 16384
    assert MAX_FRAME_SIZE_LIMIT == 1048576
    assert framer.buffered == 0
    wire = framer.encode(b"hello")
    assert feed_all(cls(), [wire]) == [b"hello"]
    for payload in (memoryview(b"hello"), bytearray(b"hello")):
        assert framer.encode(payload) == wire


@pytest.mark.parametrize("cls", [StreamFramer, SerialFramer])
def test_encode_refuses_what_cannot_be_framed(cls):
    framer = cls(max_frame_size=10)
    assert feed_all(cls(max_frame_size=10), [framer.encode(b"x" * 10)]) == [b"x" * 10]
    for bad in (b"", b"x" * 11, "text", 5, None):
        with pytest.raises(LocalProtocolError):
            framer.encode(bad)


@pytest.mark.parametrize("cls", [StreamFramer, SerialFramer])
@pytest.mark.parametrize("size", [0, -1, MAX_FRAME_SIZE_LIMIT + 1, 1.5, "16"])
def test_bad_max_frame_size_is_a_local_error(cls, size):
    with pytest.raises(LocalProtocolError):
        cls(max_frame_size=size)


@pytest.mark.parametrize("cls", [StreamFramer, SerialFramer])
def test_feed_refuses_text(cls):
    with pytest.raises(LocalProtocolError):
        cls().feed("text")


def test_overhead_for_a_20_byte_payload():
    payload = bytes(range(1, 21))
    assert len(StreamFramer().encode(payload)) - 20 == 1
    assert len(SerialFramer().encode(payload)) - 20 == 7  # 2 delimiters + 4 CRC + 1 COBS
    assert len(SerialFramer().encode(bytes(20))) - 20 == 7  # zeros cost nothing more


# ------------------------------------------------------------------------------------------
# Stream framing


@given(st.lists(payloads, max_size=8), cut_lists)
def test_stream_any_split_gives_the_same_frames(frames, cuts):
    framer = StreamFramer()
    wire = b"".join(framer.encode(p) for p in frames)
    receiver = StreamFramer()
    assert feed_all(receiver, split(wire, cuts)) == frames
    assert receiver.buffered == 0


@given(st.lists(payloads, min_size=1, max_size=4), cut_lists)
def test_stream_byte_at_a_time_and_all_at_once_agree(frames, cuts):
    wire = b"".join(StreamFramer().encode(p) for p in frames)
    one_by_one = StreamFramer()
    got = []
    for index in range(len(wire)):
        got.extend(one_by_one.feed(wire[index : index + 1]))
        assert one_by_one.buffered <= len(wire)
    assert got == frames
    assert StreamFramer().feed(wire) == frames


def reference_leb128(value: int) -> bytes:
    """Minimal unsigned LEB128, written from the definition."""
    out = bytearray()
    while True:
        out.append((value & 0x7F) | (0x80 if value >> 7 else 0))
        value >>= 7
        if not value:
            return bytes(out)


@pytest.mark.parametrize(
    "length, header",
    [(1, "01"), (127, "7f"), (128, "8001"), (300, "ac02"), (16383, "ff7f"), (16384, "808001"),
     (1048576, "808040")],
)
def test_stream_header_bytes(length, header):
    framer = StreamFramer(max_frame_size=MAX_FRAME_SIZE_LIMIT)
    wire = framer.encode(b"\x01" * length)
    assert wire[: len(header) // 2].hex() == header
    assert len(wire) == length + len(header) // 2
    assert StreamFramer(max_frame_size=MAX_FRAME_SIZE_LIMIT).feed(wire) == [b"\x01" * length]


@given(st.integers(min_value=1, max_value=MAX_FRAME_SIZE_LIMIT))
def test_stream_header_is_minimal_leb128(length):
    header = framing._encode_varint(length)
    assert header == reference_leb128(length)
    framer = StreamFramer(max_frame_size=MAX_FRAME_SIZE_LIMIT)
    assert framer.feed(header) == []
    assert framer.buffered == len(header)  # waiting for the body, nothing refused


@given(st.integers(min_value=0, max_value=2**21 - 1), st.integers(min_value=1, max_value=3))
def test_stream_non_minimal_header_is_refused(length, padding):
    minimal = reference_leb128(length)
    if len(minimal) + padding > 4:
        padding = 4 - len(minimal)
    if padding < 1:
        return
    # Same value with ``padding`` extra zero groups: continuation bits set, then 0x00.
    padded = bytes(b | 0x80 for b in minimal) + b"\x80" * (padding - 1) + b"\x00"
    with pytest.raises(FramingError) as info:
        StreamFramer(max_frame_size=MAX_FRAME_SIZE_LIMIT).feed(padded + b"x" * 4)
    assert info.value.reason == CLOSE_MALFORMED
    assert not isinstance(info.value, FrameTooLargeError)


def test_stream_five_byte_header_is_refused():
    with pytest.raises(FramingError):
        StreamFramer(max_frame_size=MAX_FRAME_SIZE_LIMIT).feed(b"\x81\x80\x80\x80\x01")
    with pytest.raises(FramingError):
        StreamFramer().feed(b"\xff\xff\xff\xff")  # the 4th byte may not continue


def test_stream_zero_length_frame_is_refused():
    with pytest.raises(FramingError) as info:
        StreamFramer().feed(b"\x00")
    assert info.value.reason == CLOSE_MALFORMED


@pytest.mark.parametrize("max_frame_size", [1, 10, 127, 128, 16383, 16384, MAX_FRAME_SIZE_LIMIT])
def test_stream_oversize_header_refused_before_the_body(max_frame_size):
    framer = StreamFramer(max_frame_size=max_frame_size)
    header = reference_leb128(max_frame_size + 1)
    with pytest.raises(FrameTooLargeError) as info:
        framer.feed(header)  # no body sent at all: the header alone is enough
    assert info.value.reason == CLOSE_FRAME_TOO_LARGE
    assert framer.buffered == 0
    # A header exactly at the limit is fine.
    ok = StreamFramer(max_frame_size=max_frame_size)
    assert ok.feed(reference_leb128(max_frame_size)) == []


def test_stream_oversize_header_split_byte_by_byte():
    framer = StreamFramer(max_frame_size=1000)
    assert framer.feed(b"\xe9") == []  # 1001 = e9 07: incomplete header, held
    with pytest.raises(FrameTooLargeError):
        framer.feed(b"\x07")


def test_stream_truncated_at_end_of_stream():
    for wire in (b"\x81", b"\x05abc", StreamFramer().encode(b"ok") + b"\x03a"):
        framer = StreamFramer()
        with pytest.raises(FramingError) as info:
            feed_all(framer, [wire])
        assert info.value.reason == CLOSE_MALFORMED
        assert "truncated" in str(info.value)


def test_stream_clean_end_of_stream():
    framer = StreamFramer()
    assert framer.feed(framer.encode(b"abc")) == [b"abc"]
    assert framer.feed(b"") == []
    assert framer.feed(b"") == []
    with pytest.raises(LocalProtocolError):
        framer.feed(b"\x01a")


def test_stream_is_dead_after_an_error():
    framer = StreamFramer(max_frame_size=10)
    with pytest.raises(FrameTooLargeError):
        framer.feed(b"\x0b")
    for more in (b"\x01a", b""):
        with pytest.raises(FrameTooLargeError) as info:
            framer.feed(more)
        assert info.value.reason == CLOSE_FRAME_TOO_LARGE
    framer = StreamFramer()
    with pytest.raises(FramingError):
        framer.feed(b"\x00")
    with pytest.raises(FramingError):
        framer.feed(StreamFramer().encode(b"good"))


def test_stream_frames_before_an_error_are_returned_then_the_error_raised():
    good = StreamFramer().encode(b"first") + StreamFramer().encode(b"second")
    framer = StreamFramer()
    assert framer.feed(good + b"\x00") == [b"first", b"second"]
    with pytest.raises(FramingError):
        framer.feed(b"")


bad_tails = st.sampled_from([b"\x00", b"\x80\x00", b"\x81\x80\x80\x80\x01", b"\xc1\x01", b"\x05ab"])


@given(st.lists(payloads, max_size=4), bad_tails, cut_lists)
def test_stream_any_split_gives_the_same_frames_before_the_same_error(frames, tail, cuts):
    wire = b"".join(StreamFramer().encode(p) for p in frames) + tail
    framer = StreamFramer(max_frame_size=1000)  # c1 01 declares 193: fine; 05ab is truncated
    got = []
    with pytest.raises(FramingError) as info:
        for piece in split(wire, cuts) + [b""]:
            got.extend(framer.feed(piece))
    assert got == frames
    expected = type(_error_of(frames, tail))
    assert type(info.value) is expected


def _error_of(frames, tail):
    framer = StreamFramer(max_frame_size=1000)
    try:
        framer.feed(b"".join(StreamFramer().encode(p) for p in frames) + tail)
        framer.feed(b"")
        framer.feed(b"")
    except FramingError as error:
        return error
    raise AssertionError("no error")


def test_stream_buffer_stays_bounded_with_tiny_reads():
    # A consumed prefix is dropped as the stream advances: memory tracks the frame, not the stream.
    payload = bytes(range(256)) * 20  # 5120 bytes
    wire = StreamFramer().encode(payload) * 12
    framer = StreamFramer()
    frames = []
    largest = 0
    for index in range(0, len(wire), 7):
        frames.extend(framer.feed(wire[index : index + 7]))
        largest = max(largest, len(framer._buffer or b""))
    assert frames == [payload] * 12
    assert largest <= 2 * len(payload) + framing._COMPACT_MIN


def test_stream_big_single_feed():
    frames = [bytes([i % 251]) * (1 + i % 700) for i in range(3000)]
    wire = b"".join(StreamFramer().encode(p) for p in frames)
    framer = StreamFramer()
    assert framer.feed(wire) == frames
    assert framer.buffered == 0


# ------------------------------------------------------------------------------------------
# COBS

COBS_VECTORS = [  # (data, encoding) from the COBS paper's worked examples, as usually tabulated
    ("", "01"),
    ("00", "0101"),
    ("0000", "010101"),
    ("00110000", "0102110101"),
    ("11220033", "0311220233"),
    ("11223344", "0511223344"),
    ("11000000", "0211010101"),
    (bytes(range(1, 255)).hex(), "ff" + bytes(range(1, 255)).hex()),
    ("00" + bytes(range(1, 255)).hex(), "01ff" + bytes(range(1, 255)).hex()),
    (bytes(range(1, 256)).hex(), "ff" + bytes(range(1, 255)).hex() + "02ff"),
    (bytes(range(2, 256)).hex() + "00", "ff" + bytes(range(2, 256)).hex() + "0101"),
    (bytes(range(3, 256)).hex() + "0001", "fe" + bytes(range(3, 256)).hex() + "0201"),
]


@pytest.mark.parametrize("data, encoded", COBS_VECTORS)
def test_cobs_vectors(data, encoded):
    assert cobs_encode(bytes.fromhex(data)).hex() == encoded
    assert cobs_decode(bytes.fromhex(encoded)) == bytes.fromhex(data)
    assert GEN.cobs(bytes.fromhex(data)).hex() == encoded  # the vector generator's COBS too


@given(st.binary(max_size=2000))
@example(b"\x00" * 600)
@example(b"\x01" * 254)
@example(b"\x01" * 255)
@example(b"\x01" * 508)
@example(b"\x01" * 253 + b"\x00")
def test_cobs_round_trip(data):
    encoded = cobs_encode(data)
    assert b"\x00" not in encoded
    assert len(encoded) <= len(data) + len(data) // 254 + 1
    assert cobs_decode(encoded) == data
    assert encoded == GEN.cobs(data)


def test_cobs_decode_accepts_the_empty_block_after_a_full_one():
    data = b"\x01" * 254
    assert cobs_decode(b"\xff" + data + b"\x01") == data


@pytest.mark.parametrize("chunk", ["02", "05112233", "ff" + "01" * 253, "0311", "00"])
def test_cobs_decode_refuses_overrunning_blocks(chunk):
    assert cobs_decode(bytes.fromhex(chunk)) is None


# ------------------------------------------------------------------------------------------
# Serial framing

console_text = st.text(
    alphabet=st.characters(blacklist_categories=("Cc", "Cs")) | st.sampled_from("\t\r\n"),
    min_size=1,
    max_size=60,
).map(lambda text: text.encode("utf-8"))
serial_items = st.lists(
    st.one_of(payloads.map(lambda p: ("frame", p)), console_text.map(lambda t: ("console", t))),
    max_size=8,
)


def serial_wire(items) -> tuple[bytes, list]:
    """Wire bytes for (kind, data) items and the items a receiver must produce from them."""
    sender = SerialFramer()
    wire = b""
    expected: list = []
    for kind, data in items:
        if kind == "frame":
            wire += sender.encode(data)
            expected.append(data)
        else:
            wire += data
            # Console text next to console text is one chunk: no delimiter between them.
            if expected and isinstance(expected[-1], ConsoleText) and not wire[: -len(data)].endswith(b"\x00"):
                expected[-1] = ConsoleText(expected[-1].data + data)
            else:
                expected.append(ConsoleText(data))
    return wire, expected


@given(serial_items, cut_lists)
def test_serial_any_split_gives_the_same_items(items, cuts):
    wire, expected = serial_wire(items)
    receiver = SerialFramer()
    got = feed_all(receiver, split(wire, cuts))
    assert got == expected
    assert receiver.corrupt == 0 and receiver.oversize == 0 and receiver.bytes_dropped == 0
    assert receiver.frames == sum(1 for kind, _ in items if kind == "frame")
    assert receiver.console_chunks == sum(1 for item in expected if isinstance(item, ConsoleText))
    assert receiver.buffered == 0


@given(payloads, payloads, st.data(), cut_lists)
def test_serial_corruption_never_raises_and_the_next_frame_arrives(victim, survivor, data, cuts):
    sender = SerialFramer()
    bad = bytearray(sender.encode(victim))
    for _ in range(data.draw(st.integers(min_value=1, max_value=3))):
        body = len(bad) - 2  # bytes between the two delimiters, as the mutations left them
        index = 1 + data.draw(st.integers(min_value=0, max_value=max(body, 1) - 1))
        kind = data.draw(st.sampled_from(["flip", "set", "insert", "delete"]))
        if kind == "flip":
            bad[index] ^= data.draw(st.integers(min_value=1, max_value=255))
        elif kind == "set":
            bad[index] = data.draw(st.integers(min_value=0, max_value=255))
        elif kind == "insert":
            bad[index:index] = data.draw(st.binary(min_size=1, max_size=3))
        elif len(bad) > 3:
            del bad[index]
    # The victim survives only if its whole body still stands between two delimiters (a
    # mutation that only added a 0x00 next to a delimiter, or undid itself).
    intact = sender.encode(victim) in b"\x00" + bytes(bad) + b"\x00"
    receiver = SerialFramer()
    got = feed_all(receiver, split(bytes(bad) + sender.encode(survivor), cuts))
    assert got[-1] == survivor
    frames = [item for item in got if not isinstance(item, ConsoleText)]
    assert frames == ([victim, survivor] if intact else [survivor])
    assert receiver.frames == len(frames)
    if not intact:  # whatever became of the victim was accounted for
        assert receiver.corrupt + receiver.console_chunks + receiver.oversize >= 1


@given(st.binary(max_size=300), payloads, cut_lists)
def test_serial_random_noise_then_a_frame(noise, payload, cuts):
    receiver = SerialFramer()
    got = feed_all(receiver, split(noise + SerialFramer().encode(payload), cuts))
    assert got[-1] == payload


def test_serial_console_text_passthrough():
    framer = SerialFramer()
    wire = b"MicroPython v1.27\r\n>>> " + framer.encode(b"\x01") + "temp \u00b0C\n".encode()
    got = framer.feed(wire)
    assert got == [ConsoleText(b"MicroPython v1.27\r\n>>> "), b"\x01"]
    assert framer.buffered == len("temp \u00b0C\n".encode())
    tail = framer.feed(b"")
    assert tail == [ConsoleText("temp \u00b0C\n".encode())]
    assert tail[0].text == "temp \u00b0C\n"
    assert framer.console_chunks == 2 and framer.frames == 1 and framer.corrupt == 0


def test_console_text_replaces_invalid_utf8():
    item = ConsoleText(b"ok \xff \xe2\x82 done")
    assert item.text == "ok \ufffd \ufffd done"
    assert item.data == b"ok \xff \xe2\x82 done"
    assert item == ConsoleText(b"ok \xff \xe2\x82 done") and item != ConsoleText(b"other")
    assert item != b"ok \xff \xe2\x82 done"
    assert "ConsoleText" in repr(item)


@given(st.binary(max_size=40))
@example(b"\xf0\x9f\x98")
@example(b"\xed\xa0\x80a")
@example(b"\xe0\x80\xaf")
@example(b"\xf4\x90\x80\x80")
def test_hand_utf8_replacement_matches_cpython(raw):
    # MicroPython ignores errors="replace"; the hand decoder must give CPython's answer.
    assert _utf8.decode_replacing(raw) == raw.decode("utf-8", "replace")


@pytest.mark.parametrize("chunk", [b"caf\xe9\n", b"\xff\xfe", b"ok\xed\xa0\x80", b"a\xc0\x80",
                                   b"bell\x07", b"\x1b[31mred", b"\x7f"])
def test_serial_chunk_that_is_not_text_is_corrupt(chunk):
    framer = SerialFramer()
    assert framer.feed(chunk + framer.encode(b"ok")) == [b"ok"]
    assert framer.corrupt == 1 and framer.console_chunks == 0
    assert framer.bytes_dropped == len(chunk)


@pytest.fixture(params=["strict", "lax"])
def utf8_path(request, monkeypatch):
    """Run a test on CPython's path and on the hand validator MicroPython needs."""
    monkeypatch.setattr(framing, "_STRICT_UTF8", request.param == "strict")
    return request.param


@given(st.binary(max_size=16))
@example(b"\xf4\x90\x80\x80")
@example(b"\xed\xa0\x80")
@example(b"\xc0\x80")
def test_utf8_validator_matches_cpython_on_both_paths(raw):
    try:
        raw.decode("utf-8")
        valid = True
    except UnicodeDecodeError:
        valid = False
    for strict in (True, False):
        original = framing._STRICT_UTF8
        framing._STRICT_UTF8 = strict
        try:
            assert framing._utf8_valid(raw) is valid
        finally:
            framing._STRICT_UTF8 = original


def test_long_utf8_line_is_cut_between_characters(utf8_path):
    framer = SerialFramer(max_frame_size=100)
    limit = framer.chunk_limit  # 105: odd, so a cut at the limit would split a 2-byte char
    for line in ("\u00e9" * 300).encode(), ("\u20ac" * 200).encode(), ("\U0001f600" * 100).encode():
        got = framer.feed(line) + framer.feed(b"\x00")
        assert all(isinstance(item, ConsoleText) for item in got)
        assert b"".join(item.data for item in got) == line
        assert all(len(item.data) <= limit for item in got)
        assert "".join(item.text for item in got) == line.decode()
    assert framer.corrupt == 0 and framer.oversize == 0


def test_serial_non_printable_chunk_is_dropped_and_counted():
    framer = SerialFramer()
    got = framer.feed(b"\x00\x01\x02\x03\x00" + framer.encode(b"ok"))
    assert got == [b"ok"]
    assert framer.corrupt == 1 and framer.bytes_dropped == 3


def test_serial_bad_crc_is_dropped():
    payload = b"payload"
    body = payload + struct.pack("<I", zlib.crc32(payload) ^ 0x80000000)
    framer = SerialFramer()
    assert framer.feed(b"\x00" + cobs_encode(body) + b"\x00") == []
    assert framer.corrupt == 1


def test_serial_crc_is_zlib_crc32_little_endian():
    payload = b"\x00\x01\xfe\xff" * 5
    wire = SerialFramer().encode(payload)
    assert wire[0] == 0 and wire[-1] == 0
    body = cobs_decode(wire[1:-1])
    assert body[:-4] == payload
    assert body[-4:] == struct.pack("<I", zlib.crc32(payload))


@pytest.mark.parametrize("payload", [b"\x00" * 300, b"\x01" * 250, b"\x01" * 254, b"\x01" * 255,
                                     b"\xff" * 1000, bytes(range(256)) * 4])
def test_serial_cobs_edge_payloads(payload):
    framer = SerialFramer()
    wire = framer.encode(payload)
    assert b"\x00" not in wire[1:-1]
    assert framer.feed(wire) == [payload]


def test_serial_long_console_line_comes_in_pieces():
    framer = SerialFramer(max_frame_size=100)
    limit = framer.chunk_limit
    assert limit == serial_chunk_limit(100) == 104 + 104 // 254 + 1
    line = (b"0123456789" * 100)[: 3 * limit + 5]
    got = framer.feed(line)
    assert got == [ConsoleText(line[:limit]), ConsoleText(line[limit : 2 * limit]),
                   ConsoleText(line[2 * limit : 3 * limit])]
    assert framer.buffered == 5
    assert framer.feed(b"\x00") == [ConsoleText(line[3 * limit :])]
    assert framer.oversize == 0 and framer.corrupt == 0


def test_serial_oversize_binary_is_discarded_up_to_the_next_delimiter():
    framer = SerialFramer(max_frame_size=100)
    junk = bytes([1, 2, 3, 0xFF]) * 100  # 400 bytes, no delimiter, not text
    got = []
    for index in range(0, len(junk), 33):
        got.extend(framer.feed(junk[index : index + 33]))
        assert framer.buffered <= framer.chunk_limit
    got.extend(framer.feed(framer.encode(b"next")))
    assert got == [b"next"]
    assert framer.oversize == 1 and framer.corrupt == 0
    assert framer.bytes_dropped == len(junk)


def test_serial_oversize_text_then_binary_is_discarded():
    framer = SerialFramer(max_frame_size=100)
    got = framer.feed(b"a" * 100 + b"\x01" * 100 + b"\x00" + framer.encode(b"z"))
    assert got == [b"z"]
    assert framer.oversize == 1


def test_serial_frame_with_good_crc_but_over_the_limit_is_dropped():
    # The chunk limit leaves COBS room for one code byte per 254 bytes; a payload with zeros
    # spends none of it, so a few bytes over max_frame_size still fit in a chunk.
    payload = (b"\x05" * 99 + b"\x00") * 10 + b"\x05\x05"  # 1002 bytes
    big = SerialFramer(max_frame_size=2000).encode(payload)
    framer = SerialFramer(max_frame_size=1000)
    assert len(big) - 2 <= framer.chunk_limit  # fits the chunk limit, fails the payload limit
    assert framer.feed(big + framer.encode(b"ok")) == [b"ok"]
    assert framer.oversize == 1 and framer.frames == 1


def test_serial_end_of_stream():
    framer = SerialFramer()
    assert framer.feed(b"partial console") == []
    assert framer.feed(b"") == [ConsoleText(b"partial console")]
    truncated = framer.encode(b"frame")[:-1]
    assert framer.feed(truncated) == []
    assert framer.feed(b"") == []
    assert framer.corrupt == 1
    # The framer works on after a reopened port.
    assert framer.feed(framer.encode(b"again")) == [b"again"]


def test_serial_end_of_stream_while_discarding():
    framer = SerialFramer(max_frame_size=10)
    framer.feed(b"\x01" * 200)
    assert framer.oversize == 1
    assert framer.feed(b"") == []
    assert framer.feed(framer.encode(b"ok")) == [b"ok"]


def test_serial_never_raises_on_feed_of_any_bytes_type():
    framer = SerialFramer()
    for data in (memoryview(b"\x00\x01\x00"), bytearray(b"abc\x00")):
        framer.feed(data)
    assert framer.corrupt == 1 and framer.console_chunks == 1


def test_framing_errors_are_remote_errors():
    assert issubclass(FramingError, RemoteProtocolError)
    assert issubclass(FrameTooLargeError, FramingError)


# ------------------------------------------------------------------------------------------
# The committed vector file


def test_framing_json_is_what_the_generator_writes():
    assert (VECTORS / "framing.json").read_text() == GEN.render(GEN.build_framing())


FRAMING = json.loads((VECTORS / "framing.json").read_text())
ERRORS = {"FramingError": FramingError, "FrameTooLargeError": FrameTooLargeError}


@pytest.mark.parametrize("vector", FRAMING["stream"], ids=[v["name"] for v in FRAMING["stream"]])
@pytest.mark.parametrize("piece", [0, 1, 3])
def test_stream_vector(vector, piece):
    assert set(vector) == {"name", "payloads", "wire", "max_frame_size", "error"}
    wire = bytes.fromhex(vector["wire"])
    pieces = [wire] if piece == 0 else [wire[i : i + piece] for i in range(0, len(wire), piece)]
    framer = StreamFramer(max_frame_size=vector["max_frame_size"])
    got = []
    if vector["error"] is None:
        got = feed_all(framer, pieces)
    else:
        with pytest.raises(ERRORS[vector["error"]]) as info:
            for data in pieces + [b""]:
                got.extend(framer.feed(data))
        assert type(info.value) is ERRORS[vector["error"]]
    assert [p.hex() for p in got] == vector["payloads"]
    for payload in got:  # payloads in the file re-encode to the wire's frames
        assert StreamFramer(max_frame_size=vector["max_frame_size"]).encode(payload).hex() in vector["wire"]


@pytest.mark.parametrize("vector", FRAMING["serial"], ids=[v["name"] for v in FRAMING["serial"]])
@pytest.mark.parametrize("piece", [0, 1, 5])
def test_serial_vector(vector, piece):
    assert set(vector) == {"name", "wire", "items", "corrupt"}
    wire = bytes.fromhex(vector["wire"])
    if piece == 1 and len(wire) > 2000:
        piece = 97  # keep the big vectors fast
    pieces = [wire] if piece == 0 else [wire[i : i + piece] for i in range(0, len(wire), piece)]
    framer = SerialFramer()
    got = feed_all(framer, pieces)
    as_json = [{"console": item.data.hex()} if isinstance(item, ConsoleText) else {"frame": item.hex()}
               for item in got]
    assert as_json == vector["items"]
    assert framer.corrupt == vector["corrupt"]


def test_flush_console_releases_a_finished_line_but_not_a_partial_frame():
    from smartx_device.framing import ConsoleText, SerialFramer

    framer = SerialFramer()
    frame = framer.encode(b"\x01\x02payload")
    assert framer.feed(frame + b"booting\n") == [b"\x01\x02payload"]
    flushed = framer.flush_console()
    assert [type(item) for item in flushed] == [ConsoleText]
    assert flushed[0].data == b"booting\n"
    assert framer.flush_console() == []
    # Half a frame is kept until its delimiter arrives, and then decodes whole.
    assert framer.feed(frame[:6]) == []
    assert framer.flush_console() == []
    assert framer.feed(frame[6:]) == [b"\x01\x02payload"]
    # Text without its newline yet stays pending too.
    framer.feed(b"\x00partial line")
    assert framer.flush_console() == []
    assert framer.feed(b" done\n\x00")[0].data == b"partial line done\n"
