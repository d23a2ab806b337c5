"""Frame codecs of the SmartX wire: where one message ends and the next begins.

Implements docs/protocol.md, "Framing": stream framing for TLS sockets and COBS+CRC framing
for serial links. A frame carries one payload (one CBOR message); payloads are never empty.

The Framer contract, kept by ``StreamFramer`` and ``SerialFramer`` alike, so that a session
holds either without knowing which:

- ``encode(payload) -> bytes``: the bytes to write for one payload (bytes-like, 1 to
  ``max_frame_size`` bytes). A payload outside that raises ``LocalProtocolError``.
- ``feed(data) -> list``: hand over bytes as they arrive, in pieces of any size; returns the
  items completed by them, in order. Any split of the same byte stream yields the same items.
- ``feed(b"")``: the end of the stream; returns what the end completes.
- ``max_frame_size``: the largest payload accepted, 1 to ``MAX_FRAME_SIZE_LIMIT``.

The two differ where the links differ:

- A TLS stream is reliable, so a bad frame means a broken or hostile peer: ``StreamFramer``
  raises ``FramingError``/``FrameTooLargeError`` and is dead from then on.
- A UART drops, flips and mixes in console text: ``SerialFramer`` never raises on input; it
  drops what fails COBS or CRC, counts it, passes readable text through as ``ConsoleText``
  and resynchronises at the next 0x00.

Invariants: limits are checked before a frame's body is held (the stream header is checked as
soon as it is complete; a serial chunk is cut off at its largest valid size); buffering is
amortised O(n). MicroPython subset: only ``struct`` and ``binascii`` are imported.
"""

import binascii
import struct

from smartx_device import _utf8
from smartx_device._compat import const
from smartx_device.errors import FramingError, FrameTooLargeError, LocalProtocolError
from smartx_device.reasons import CLOSE_FRAME_TOO_LARGE, CLOSE_MALFORMED

__all__ = [
    "DEFAULT_MAX_FRAME_SIZE",
    "MAX_FRAME_SIZE_LIMIT",
    "STREAM_HEADER_MAX_BYTES",
    "SERIAL_CRC_BYTES",
    "ConsoleText",
    "SerialFramer",
    "StreamFramer",
    "cobs_decode",
    "cobs_encode",
    "serial_chunk_limit",
]

# Largest payload a framer accepts unless told otherwise (both framings).
DEFAULT_MAX_FRAME_SIZE = const(16384)
# Largest ``max_frame_size`` any framer may be configured with.
MAX_FRAME_SIZE_LIMIT = const(1048576)
# A stream header is an unsigned LEB128 varint of at most 4 bytes: lengths up to 2**28 - 1.
STREAM_HEADER_MAX_BYTES = const(4)
# Serial frames end with the payload's CRC-32, little-endian.
SERIAL_CRC_BYTES = const(4)
# A consumed prefix of at least this many bytes is dropped from the stream buffer once it is
# also more than half of it: each byte is then copied O(1) times.
_COMPACT_MIN = const(4096)
# COBS: a block holds at most 254 data bytes (code byte 0xFF).
_COBS_MAX_RUN = const(254)


def _check_max_frame_size(max_frame_size):
    """Refuse a frame limit outside [1, MAX_FRAME_SIZE_LIMIT] (a bug of the caller)."""
    if type(max_frame_size) is not int or not 1 <= max_frame_size <= MAX_FRAME_SIZE_LIMIT:
        raise LocalProtocolError(
            "max_frame_size must be an int in [1, %d]" % MAX_FRAME_SIZE_LIMIT
        )


def _check_payload(payload, max_frame_size):
    """Return ``payload`` as bytes if it can be framed, else raise LocalProtocolError."""
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise LocalProtocolError("payload must be bytes, not %s" % type(payload).__name__)
    size = len(payload)
    if size == 0:
        raise LocalProtocolError("an empty payload cannot be framed")
    if size > max_frame_size:
        raise LocalProtocolError(
            "payload of %d bytes exceeds max_frame_size %d" % (size, max_frame_size)
        )
    return bytes(payload)


def _as_bytes(data):
    """Return ``data`` (bytes, bytearray or memoryview) as something with ``find`` and slicing."""
    if isinstance(data, memoryview):
        return bytes(data)
    if isinstance(data, (bytes, bytearray)):
        return data
    raise LocalProtocolError("feed() takes bytes, not %s" % type(data).__name__)


# ---------------------------------------------------------------------------------------------
# Stream framing


def _encode_varint(value):
    """Return the minimal unsigned LEB128 encoding of ``value`` (>= 0)."""
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


class StreamFramer:
    """Length-prefixed frames on a reliable byte stream (TLS): varint header, then payload.

    The header is the payload length as unsigned LEB128, minimal, 1 to 4 bytes. A peer that
    sends a zero length, a non-minimal or over-long header raises ``FramingError``; a length
    above ``max_frame_size`` raises ``FrameTooLargeError`` as soon as the header is complete,
    before any of the body is held. Errors are fatal: every later ``feed`` raises again.
    If bytes of one ``feed`` complete frames and then turn bad, those frames are returned
    and the error is raised by the next ``feed`` (``feed(b"")`` included), so any split of
    a stream yields the same frames before the same error.
    """

    # A hub holds one framer per connection, mostly idle: slots keep each one small.
    # MicroPython ignores ``__slots__``: nothing here depends on it.
    __slots__ = ("max_frame_size", "_buffer", "_start", "_error", "_ended")

    def __init__(self, max_frame_size=DEFAULT_MAX_FRAME_SIZE):
        _check_max_frame_size(max_frame_size)
        self.max_frame_size = max_frame_size
        # Received bytes not yet parsed: None while there are none (an idle connection, and
        # the common case of whole frames per read), so an idle framer holds no buffer.
        self._buffer = None
        self._start = 0
        self._error = None
        self._ended = False

    @property
    def buffered(self):
        """Number of received bytes held that do not yet make a complete frame."""
        buffer = self._buffer
        return 0 if buffer is None else len(buffer) - self._start

    def encode(self, payload):
        """Return header + payload for one payload of 1..max_frame_size bytes."""
        payload = _check_payload(payload, self.max_frame_size)
        return _encode_varint(len(payload)) + payload

    def feed(self, data):
        """Take received bytes; return the payloads they complete. ``b""`` is end of stream."""
        if self._error is not None:
            raise self._repeat_error()
        if not data:
            self._ended = True
            if self._buffer is not None:
                self._fail(FramingError("truncated: stream ended inside a frame", CLOSE_MALFORMED))
                raise self._error
            return []
        if self._ended:
            raise LocalProtocolError("feed() after end of stream")
        data = _as_bytes(data)
        frames = []
        buffer = self._buffer
        if buffer is None:
            # Nothing held: parse straight from ``data`` and keep only its unfinished tail.
            consumed, error = self._parse(data, 0, frames)
            if error is None and consumed < len(data):
                self._buffer = bytearray(data[consumed:])
        else:
            buffer.extend(data)
            self._start, error = self._parse(buffer, self._start, frames)
            self._compact()
        if error is not None:
            self._fail(error)
            if not frames:
                raise error
        return frames

    def _parse(self, buf, pos, frames):
        """Append the complete frames in buf[pos:] to ``frames``; return (new pos, error or None)."""
        end = len(buf)
        max_frame_size = self.max_frame_size
        while pos < end:
            length = 0
            shift = 0
            index = pos
            while True:
                if index >= end:
                    return pos, None  # header not complete yet
                byte = buf[index]
                index += 1
                length |= (byte & 0x7F) << shift
                if byte < 0x80:
                    if byte == 0 and index - pos > 1:
                        return pos, FramingError("non-minimal frame header", CLOSE_MALFORMED)
                    break
                if index - pos >= STREAM_HEADER_MAX_BYTES:
                    return pos, FramingError("frame header longer than 4 bytes", CLOSE_MALFORMED)
                shift += 7
            if length == 0:
                return pos, FramingError("empty frame", CLOSE_MALFORMED)
            if length > max_frame_size:
                return pos, FrameTooLargeError(
                    "frame of %d bytes exceeds max_frame_size %d" % (length, max_frame_size),
                    CLOSE_FRAME_TOO_LARGE,
                )
            if end - index < length:
                return pos, None  # body not complete yet
            frames.append(bytes(buf[index : index + length]))
            pos = index + length
        return pos, None

    def _compact(self):
        """Drop the consumed prefix of the buffer when that keeps copying amortised O(1)."""
        start = self._start
        if start == len(self._buffer):
            self._buffer = None
            self._start = 0
        elif start >= _COMPACT_MIN and start > (len(self._buffer) >> 1):
            self._buffer = self._buffer[start:]
            self._start = 0

    def _fail(self, error):
        """Kill the framer with ``error`` and free what it held."""
        self._error = error
        self._buffer = None
        self._start = 0

    def _repeat_error(self):
        """Return a fresh error of the same kind, message and reason as the fatal one."""
        error = self._error
        return type(error)(error.args[0] if error.args else "framer failed", error.reason)


# ---------------------------------------------------------------------------------------------
# Serial framing: COBS + CRC-32


def cobs_encode(data):
    """Return the COBS encoding of ``data`` (no 0x00 in the result; no trailing delimiter).

    A final block of 254 bytes is not followed by an empty block (the form of the COBS paper
    and its usual test vectors); ``cobs_decode`` accepts both forms.
    """
    data = bytes(data)
    out = bytearray()
    size = len(data)
    index = 0
    while True:
        zero = data.find(b"\x00", index, index + _COBS_MAX_RUN)
        if zero < 0:
            stop = index + _COBS_MAX_RUN
            if stop > size:
                stop = size
            out.append(stop - index + 1)
            out.extend(data[index:stop])
            index = stop
            if index == size:
                break
        else:
            out.append(zero - index + 1)
            out.extend(data[index:zero])
            index = zero + 1
    return bytes(out)


def cobs_decode(chunk):
    """Return the data a COBS block sequence encodes, or None if it is not valid COBS."""
    out = bytearray()
    size = len(chunk)
    index = 0
    while index < size:
        code = chunk[index]
        stop = index + code
        if code == 0 or stop > size:
            return None
        out.extend(chunk[index + 1 : stop])
        index = stop
        if code != 0xFF and index < size:
            out.append(0)
    return bytes(out)


def serial_chunk_limit(max_frame_size):
    """Return the largest COBS chunk a frame of ``max_frame_size`` payload bytes can need."""
    data_size = max_frame_size + SERIAL_CRC_BYTES
    return data_size + data_size // _COBS_MAX_RUN + 1


def _crc32(data):
    """CRC-32 (IEEE, as zlib) of ``data`` as an unsigned int."""
    return binascii.crc32(data) & 0xFFFFFFFF


# Bytes a console line is made of: tab, LF, CR, printable ASCII, and bytes >= 0x80, which
# ``_is_text`` further requires to form well-formed UTF-8 (random binary rarely does).
_PRINTABLE = bytes(
    [1 if (b in (0x09, 0x0A, 0x0D) or 0x20 <= b <= 0x7E or b >= 0x80) else 0 for b in range(256)]
)
_PRINTABLE_SET = bytes([b for b in range(256) if _PRINTABLE[b]])
_HAS_TRANSLATE = hasattr(b"", "translate")


def _all_printable(data):
    """True if every byte of ``data`` can appear in console text."""
    if _HAS_TRANSLATE:
        # CPython: delete the printable bytes in C; anything left is not text.
        return not data.translate(None, _PRINTABLE_SET)
    table = _PRINTABLE
    for byte in data:
        if not table[byte]:
            return False
    return True


def _utf8_valid(data):
    """True if ``data`` (bytes) is well-formed UTF-8 (RFC 3629), on either interpreter."""
    try:
        text = data.decode("utf-8")
    except UnicodeError:
        return False
    # MicroPython accepts overlongs, surrogates and > U+10FFFF: check those by hand.
    return _STRICT_UTF8 or len(text) == len(data) or _utf8.is_valid(data)


def _is_text(data):
    """True if ``data`` (bytes) reads as console text: printable bytes, well-formed UTF-8."""
    return _all_printable(data) and _utf8_valid(data)


def _text_boundary(data):
    """Return len(data), or less to leave out a UTF-8 sequence that the end cuts short."""
    end = len(data)
    index = end - 1
    lowest = end - 3 if end > 3 else 0
    while index >= lowest:
        byte = data[index]
        if byte < 0x80:
            return end
        if byte >= 0xC0:  # a lead byte: how long its sequence should be
            need = 1 if byte < 0xE0 else (2 if byte < 0xF0 else 3)
            return index if end - index <= need else end
        index -= 1
    return end


_STRICT_UTF8 = _utf8.STRICT_DECODER


def _replace_supported():
    """True if bytes.decode honours errors='replace' (CPython; MicroPython ignores it)."""
    try:
        return b"\xff".decode("utf-8", "replace") == "\ufffd"
    except UnicodeError:
        return False


_HAS_REPLACE = _replace_supported()


def _text_of(data):
    """Return ``data`` decoded as UTF-8 with invalid bytes replaced by U+FFFD."""
    if _HAS_REPLACE:
        return data.decode("utf-8", "replace")
    return _utf8.decode_replacing(data)


class ConsoleText:
    """Readable bytes that arrived between serial frames: a board's console output.

    ``data`` holds the bytes as received (no 0x00 in them); ``text`` the same decoded as
    UTF-8 with invalid sequences replaced by U+FFFD.
    """

    def __init__(self, data):
        self.data = bytes(data)
        self.text = _text_of(self.data)

    def __eq__(self, other):
        return isinstance(other, ConsoleText) and other.data == self.data

    def __ne__(self, other):
        return not self.__eq__(other)

    def __hash__(self):
        return hash(self.data)

    def __repr__(self):
        return "ConsoleText(%r)" % (self.data,)


class SerialFramer:
    """COBS + CRC-32 frames on a lossy serial link, with console text passed through.

    Wire form of one frame: ``0x00, COBS(payload + CRC-32(payload) little-endian), 0x00``.
    A chunk is the bytes between two 0x00; empty chunks are ignored. A chunk that decodes and
    whose CRC matches is a frame (its payload is returned as bytes); otherwise, a chunk of
    text (tab, CR, LF, 0x20-0x7e, and well-formed UTF-8 for the rest) is returned as
    ``ConsoleText``; anything else is dropped and counted as corrupt. A chunk that grows past
    ``chunk_limit`` without a 0x00 is passed on as ``ConsoleText`` pieces of at most
    ``chunk_limit`` bytes, cut between characters, if it is text (console lines may be long),
    else discarded up to the next 0x00 and counted as oversize.
    ``feed`` never raises on what it receives. ``feed(b"")`` (port closed) flushes a pending
    printable chunk as text, drops any other (a truncated frame) and leaves the framer ready
    for a reopened port.

    Counters: ``frames`` delivered, ``corrupt`` chunks dropped, ``oversize`` chunks cut off
    (or frames with a good CRC but a payload over ``max_frame_size``), ``console_chunks``
    returned, ``bytes_dropped`` in dropped chunks.
    """

    __slots__ = ("max_frame_size", "chunk_limit", "frames", "corrupt", "oversize",
                 "console_chunks", "bytes_dropped", "_pending", "_discarding")

    def __init__(self, max_frame_size=DEFAULT_MAX_FRAME_SIZE):
        _check_max_frame_size(max_frame_size)
        self.max_frame_size = max_frame_size
        self.chunk_limit = serial_chunk_limit(max_frame_size)
        self.frames = 0
        self.corrupt = 0
        self.oversize = 0
        self.console_chunks = 0
        self.bytes_dropped = 0
        self._pending = bytearray()
        self._discarding = False

    @property
    def buffered(self):
        """Number of received bytes held in the chunk not yet ended by a 0x00."""
        return len(self._pending)

    def encode(self, payload):
        """Return 0x00 + COBS(payload + CRC-32 LE) + 0x00 for one payload of 1..max_frame_size bytes."""
        payload = _check_payload(payload, self.max_frame_size)
        body = cobs_encode(payload + struct.pack("<I", _crc32(payload)))
        return b"\x00" + body + b"\x00"

    def feed(self, data):
        """Take received bytes; return the frames (bytes) and ConsoleText they complete, in order."""
        items = []
        if not data:
            self._end_of_stream(items)
            return items
        data = _as_bytes(data)
        size = len(data)
        index = 0
        while index < size:
            zero = data.find(b"\x00", index)
            if zero < 0:
                self._accumulate(data[index:] if index else data, items)
                break
            if zero > index or self._pending or self._discarding:
                self._end_chunk(data[index:zero], items)
            index = zero + 1
        return items

    def flush_console(self):
        """Return pending console text now, without waiting for the next 0x00.

        Console text is otherwise delivered when the delimiter of the next frame arrives,
        which on a quiet link may be a keep-alive interval later (or never, after a crash).
        Call this when the line has been quiet for a while (the gateway uses 100 ms): only a
        pending chunk that is text and ends with a newline is released, so a frame cut short
        mid-transmission, which is neither, stays buffered.
        """
        items = []
        pending = self._pending
        if not self._discarding and pending and pending[-1] == 0x0A:
            chunk = bytes(pending)
            if _is_text(chunk):
                self._pending = bytearray()
                self._emit_console(chunk, items)
        return items

    def _accumulate(self, segment, items):
        """Add bytes (no 0x00) to the pending chunk, cutting it off at ``chunk_limit``."""
        if self._discarding:
            self.bytes_dropped += len(segment)
            return
        pending = self._pending
        limit = self.chunk_limit
        while True:
            room = limit - len(pending)
            if len(segment) <= room:
                pending.extend(segment)
                return
            head = segment[:room]
            segment = segment[room:]
            candidate = bytes(pending) + bytes(head)
            cut = _text_boundary(candidate)
            piece = candidate[:cut]
            if cut and _is_text(piece):
                # A console line longer than any frame: pass it on in pieces, each cut
                # between two characters (the cut-short one starts the next piece).
                self._emit_console(piece, items)
                pending = self._pending = bytearray(candidate[cut:])
            else:
                self.oversize += 1
                self.bytes_dropped += len(candidate) + len(segment)
                self._pending = bytearray()
                self._discarding = True
                return

    def _end_chunk(self, segment, items):
        """A 0x00 arrived after ``segment``: classify the whole chunk and reset."""
        if self._discarding:
            self.bytes_dropped += len(segment)
            self._discarding = False
            return
        if not self._pending and len(segment) <= self.chunk_limit:
            chunk = segment  # the common case: a whole chunk inside one feed, no copy
        else:
            self._accumulate(segment, items)
            if self._discarding:
                self._discarding = False
                return
            chunk = bytes(self._pending)
            self._pending = bytearray()
        if chunk:
            self._classify(chunk, items)

    def _classify(self, chunk, items):
        """Turn one complete chunk into a frame, console text, or a counted drop."""
        data = cobs_decode(chunk)
        if data is not None and len(data) > SERIAL_CRC_BYTES:
            payload = data[:-SERIAL_CRC_BYTES]
            if struct.unpack("<I", data[-SERIAL_CRC_BYTES:])[0] == _crc32(payload):
                if len(payload) > self.max_frame_size:
                    self.oversize += 1
                    self.bytes_dropped += len(chunk)
                    return
                self.frames += 1
                items.append(payload)
                return
        if _is_text(bytes(chunk)):
            self._emit_console(chunk, items)
            return
        self.corrupt += 1
        self.bytes_dropped += len(chunk)

    def _emit_console(self, data, items):
        """Return ``data`` to the caller as console text."""
        self.console_chunks += 1
        items.append(ConsoleText(data))

    def _end_of_stream(self, items):
        """Flush a pending printable chunk as text; drop (and count) any other."""
        if self._discarding:
            self._discarding = False
        elif self._pending:
            chunk = bytes(self._pending)
            if _is_text(chunk):
                self._emit_console(chunk, items)
            else:
                self.corrupt += 1
                self.bytes_dropped += len(chunk)
        self._pending = bytearray()
