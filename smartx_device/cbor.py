"""CBOR codec of the SmartX wire: the subset every message is made of.

Implements docs/protocol.md, "CBOR subset" (RFC 8949 items, deterministic encoding).

The subset: unsigned and negative integers in [-2**64, 2**64 - 1], byte strings, text strings,
arrays, maps, false, true, null, and floats (half, single, double).

Invariants:
- ``dumps`` is deterministic and byte-identical to ``cbor2.dumps(value, canonical=True)``:
  shortest heads, definite lengths, floats in the shortest of float16/32/64 that keeps the
  value exactly (every NaN as f97e00), map keys sorted length-first, then bytewise
  (RFC 8949 section 4.2.3, the ordering cbor2 uses; see the docs for why not 4.2.1).
- ``loads`` accepts exactly one well-formed item of the subset covering the whole input and
  raises only ``CBORDecodeError`` (reason ``CLOSE_MALFORMED``) for anything else. It is liberal
  about non-shortest heads and key order, strict about everything the subset leaves out:
  indefinite lengths, tags, simple values other than false/true/null, duplicate keys,
  map keys outside int/str/bytes/bool/null, invalid UTF-8.
- Every limit (``MAX_DEPTH``, ``MAX_ITEMS``) is checked before memory is spent; every declared
  length is checked against the bytes that remain before anything is allocated.
- Pure MicroPython subset: only ``struct`` is imported; float16 is converted by hand.
"""

import struct

from smartx_device import _utf8
from smartx_device._compat import const
from smartx_device.errors import CBORDecodeError, CBOREncodeError, LocalProtocolError
from smartx_device.reasons import CLOSE_MALFORMED

__all__ = ["DEPTH_CEILING", "MAX_DEPTH", "MAX_ITEMS", "dumps", "loads"]

# Deepest nesting of arrays/maps: [[1]] has depth 2. Bounds the decoder's recursion.
MAX_DEPTH = const(16)
# Most data items (every head counts: a map entry is two) that one ``loads`` builds.
# A frame of N bytes holds at most N items anyway; this caps large frames.
MAX_ITEMS = const(65536)
# Highest ``max_depth`` a caller may ask ``loads`` for: keeps recursion far from any stack limit.
DEPTH_CEILING = const(32)

_UINT_LIMIT = 0x10000000000000000  # 2**64: the first integer CBOR heads cannot carry

_NONE_TYPE = type(None)
_KEY_TYPES = (int, str, bytes, bool, _NONE_TYPE)

_F9_NAN = b"\xf9\x7e\x00"
_F9_POS_INF = b"\xf9\x7c\x00"
_F9_NEG_INF = b"\xf9\xfc\x00"
_INF = float("inf")
_NAN = float("nan")
# 2**-24, the float16 subnormal step, built from bits so no decimal parsing is involved.
_F16_SUBNORMAL_STEP = struct.unpack(">f", b"\x33\x80\x00\x00")[0]


# CPython's decoder is strict; MicroPython's only checks the lead/continuation structure,
# so there every non-ASCII text string is checked by ``_utf8.is_valid`` as well.
_STRICT_UTF8 = _utf8.STRICT_DECODER


# ---------------------------------------------------------------------------------------------
# Encoding


# Every one-byte head, built once: most heads in a message are one byte.
_ONE_BYTE = [bytes((initial,)) for initial in range(256)]


def _head(major, n):
    """Return the shortest head for major type ``major`` and argument ``n`` (0 <= n < 2**64)."""
    mt = major << 5
    if n < 24:
        return _ONE_BYTE[mt | n]
    if n < 0x100:
        return bytes((mt | 24, n))
    if n < 0x10000:
        return struct.pack(">BH", mt | 25, n)
    if n < 0x100000000:
        return struct.pack(">BI", mt | 26, n)
    return struct.pack(">BQ", mt | 27, n)


def _float_to_half_bits(f32_bits):
    """Return the float16 bits equal to a float32 (given as bits), or -1 if none is exact."""
    sign = (f32_bits >> 16) & 0x8000
    exponent = (f32_bits >> 23) & 0xFF
    mantissa = f32_bits & 0x7FFFFF
    if exponent == 0:
        # Zero stays zero; float32 subnormals (< 2**-126) are far below float16's range.
        return sign if mantissa == 0 else -1
    unbiased = exponent - 127
    if -14 <= unbiased <= 15:
        if mantissa & 0x1FFF:
            return -1
        return sign | ((unbiased + 15) << 10) | (mantissa >> 13)
    if -24 <= unbiased < -14:
        # float16 subnormal: value = k * 2**-24 with k < 1024.
        significand = 0x800000 | mantissa
        shift = -(unbiased + 1)
        if significand & ((1 << shift) - 1):
            return -1
        return sign | (significand >> shift)
    return -1


def _encode_float(value):
    """Return the shortest exact float encoding (cbor2 canonical) of a finite or special float."""
    if value != value:
        return _F9_NAN
    if value == _INF:
        return _F9_POS_INF
    if value == -_INF:
        return _F9_NEG_INF
    double = struct.pack(">Bd", 0xFB, value)
    # Any of the low 29 of the 52 mantissa bits set: more precision than a float32 (23 bits)
    # holds, so float64 it is, without trying the shorter forms. Most sensor values (21.37)
    # end here, having cost one allocation.
    if double[6] or double[7] or double[8] or double[5] & 0x1F:
        return double
    try:
        single = struct.pack(">f", value)
    except OverflowError:  # CPython refuses out-of-range floats; MicroPython returns inf
        single = None
    if single is not None and struct.unpack(">f", single)[0] == value:
        half = _float_to_half_bits(struct.unpack(">I", single)[0])
        if half >= 0:
            return struct.pack(">BH", 0xF9, half)
        return b"\xfa" + single
    return double


def _encode_key(key):
    """Return the encoding of a map key, refusing key types outside the subset."""
    if key is None or type(key) is bool or isinstance(key, (int, str, bytes)):
        out = []
        _encode(key, out, 0)
        return b"".join(out)
    raise CBOREncodeError("map key of type %s is not in the CBOR subset" % type(key).__name__)


def _encode(value, out, depth):
    """Append the encoding of ``value`` to the list ``out``; ``depth`` counts enclosing containers.

    Exact built-in types are tested first, the most frequent in messages first (this runs for
    every item of every message); subclasses, and values outside the subset, go to
    ``_encode_other``. On CPython ``bool`` is an int subclass, but ``type(True) is int`` is
    false, so booleans never take the int branch."""
    kind = type(value)
    if kind is int:
        if 0 <= value < 24:
            out.append(_ONE_BYTE[value])
        elif 0 <= value < _UINT_LIMIT:
            out.append(_head(0, value))
        elif -_UINT_LIMIT <= value < 0:
            out.append(_head(1, -1 - value))
        else:
            raise CBOREncodeError("integer %d is outside [-2**64, 2**64-1]" % value)
    elif kind is str:
        try:
            raw = value.encode("utf-8")
        except UnicodeError:  # CPython: lone surrogates have no UTF-8 form
            raise CBOREncodeError("text string is not encodable as UTF-8")
        size = len(raw)
        out.append(_ONE_BYTE[0x60 | size] if size < 24 else _head(3, size))
        out.append(raw)
    elif kind is float:
        out.append(_encode_float(value))
    elif kind is list or kind is tuple:
        if depth >= MAX_DEPTH:
            raise CBOREncodeError("nesting deeper than %d" % MAX_DEPTH)
        size = len(value)
        out.append(_ONE_BYTE[0x80 | size] if size < 24 else _head(4, size))
        depth += 1
        for element in value:
            _encode(element, out, depth)
    elif kind is dict:
        _encode_map(value, out, depth)
    elif kind is bool:
        out.append(b"\xf5" if value else b"\xf4")
    elif value is None:
        out.append(b"\xf6")
    elif kind is bytes or kind is bytearray:
        out.append(_head(2, len(value)))
        out.append(bytes(value))
    else:
        _encode_other(value, out, depth)


def _encode_other(value, out, depth):
    """Encode a subclass of a subset type as its base; refuse everything else."""
    if isinstance(value, int):
        _encode(int(value), out, depth)
    elif isinstance(value, str):
        # Not str(value): a str subclass may override __str__ (an enum's name), not its text.
        try:
            raw = value.encode("utf-8")
        except UnicodeError:
            raise CBOREncodeError("text string is not encodable as UTF-8")
        out.append(_head(3, len(raw)))
        out.append(raw)
    elif isinstance(value, (bytes, bytearray)):
        out.append(_head(2, len(value)))
        out.append(bytes(value))
    elif isinstance(value, float):
        out.append(_encode_float(value))
    elif isinstance(value, (list, tuple)):
        _encode(list(value), out, depth)
    elif isinstance(value, dict):
        _encode_map(value, out, depth)
    else:
        raise CBOREncodeError("type %s is not in the CBOR subset" % type(value).__name__)


def _encode_map(value, out, depth):
    """Append a map with its keys in canonical order (length-first, then bytewise)."""
    if depth >= MAX_DEPTH:
        raise CBOREncodeError("nesting deeper than %d" % MAX_DEPTH)
    depth += 1
    size = len(value)
    # Every message is a map whose keys are small unsigned ints: their encodings are one
    # byte each (0x00-0x17), so canonical order is numeric order and needs no encoded keys.
    small = True
    for key in value:
        if type(key) is not int or not 0 <= key < 24:
            small = False
            break
    if small:
        out.append(_ONE_BYTE[0xA0 | size] if size < 24 else _head(5, size))
        for key in sorted(value):
            out.append(_ONE_BYTE[key])
            _encode(value[key], out, depth)
        return
    entries = []
    for key, element in value.items():
        encoded_key = _encode_key(key)
        entries.append((len(encoded_key), encoded_key, element))
    # Length-first, then bytewise (RFC 8949 4.2.3, cbor2 canonical). Encoded keys are
    # distinct, so the sort never compares the values in the third slot.
    entries.sort(key=_entry_order)
    out.append(_head(5, len(entries)))
    for entry in entries:
        out.append(entry[1])
        _encode(entry[2], out, depth)


def _entry_order(entry):
    """Sort key of a map entry: (encoded key length, encoded key)."""
    return (entry[0], entry[1])


def dumps(value):
    """Return the deterministic CBOR encoding of ``value``; raise CBOREncodeError outside the subset."""
    out = []
    _encode(value, out, 0)
    return b"".join(out)


# ---------------------------------------------------------------------------------------------
# Decoding


def _malformed(message):
    """Return the one error every decoding failure raises."""
    return CBORDecodeError(message, CLOSE_MALFORMED)


def _half_to_float(half):
    """Return the float value of float16 bits (exact: every float16 is a float32)."""
    exponent = (half >> 10) & 0x1F
    mantissa = half & 0x3FF
    if exponent == 0:
        value = mantissa * _F16_SUBNORMAL_STEP
    elif exponent == 0x1F:
        value = _NAN if mantissa else _INF
    else:
        single = ((exponent + 112) << 23) | (mantissa << 13)
        value = struct.unpack(">f", struct.pack(">I", single))[0]
    if half & 0x8000:
        return -value
    return value


def _decode(data, pos, end, depth, limits):
    """Decode one item at ``pos``; return (value, next position).

    ``limits`` is [max_depth, items left]; the item budget is shared by the whole call.
    """
    if pos >= end:
        raise _malformed("truncated item")
    limits[1] -= 1
    if limits[1] < 0:
        raise _malformed("more than the allowed number of items")
    initial = data[pos]
    pos += 1
    major = initial >> 5
    info = initial & 0x1F

    if major == 7:
        if info == 20:
            return False, pos
        if info == 21:
            return True, pos
        if info == 22:
            return None, pos
        if info == 25:
            if end - pos < 2:
                raise _malformed("truncated float16")
            return _half_to_float((data[pos] << 8) | data[pos + 1]), pos + 2
        if info == 26:
            if end - pos < 4:
                raise _malformed("truncated float32")
            return struct.unpack_from(">f", data, pos)[0], pos + 4
        if info == 27:
            if end - pos < 8:
                raise _malformed("truncated float64")
            return struct.unpack_from(">d", data, pos)[0], pos + 8
        if info == 23:
            raise _malformed("undefined is not in the subset")
        if info == 31:
            raise _malformed("unexpected break")
        if 28 <= info <= 30:
            raise _malformed("reserved additional information %d" % info)
        raise _malformed("simple value is not in the subset")

    # Argument of the head (major types 0-6).
    if info < 24:
        argument = info
    elif info == 24:
        if end - pos < 1:
            raise _malformed("truncated head")
        argument = data[pos]
        pos += 1
    elif info == 25:
        if end - pos < 2:
            raise _malformed("truncated head")
        argument = (data[pos] << 8) | data[pos + 1]
        pos += 2
    elif info == 26:
        if end - pos < 4:
            raise _malformed("truncated head")
        argument = struct.unpack_from(">I", data, pos)[0]
        pos += 4
    elif info == 27:
        if end - pos < 8:
            raise _malformed("truncated head")
        argument = struct.unpack_from(">Q", data, pos)[0]
        pos += 8
    elif info == 31:
        raise _malformed("indefinite length is not in the subset")
    else:
        raise _malformed("reserved additional information %d" % info)

    if major == 0:
        return argument, pos
    if major == 3:
        if argument > end - pos:
            raise _malformed("text string longer than the input")
        stop = pos + argument
        raw = data[pos:stop]
        try:
            text = raw.decode("utf-8")
        except UnicodeError:
            raise _malformed("invalid UTF-8 in text string")
        if not _STRICT_UTF8 and len(text) != argument and not _utf8.is_valid(raw, 0, argument):
            raise _malformed("invalid UTF-8 in text string")
        return text, stop
    if major == 5:
        # Every entry needs at least two bytes: reject impossible counts before looping.
        if argument > (end - pos) >> 1:
            raise _malformed("map longer than the input")
        if depth >= limits[0]:
            raise _malformed("nesting deeper than %d" % limits[0])
        result = {}
        depth += 1
        for _ in range(argument):
            key, pos = _decode(data, pos, end, depth, limits)
            if type(key) not in _KEY_TYPES:
                raise _malformed("map key type is not in the subset")
            if key in result:
                raise _malformed("duplicate map key")
            result[key], pos = _decode(data, pos, end, depth, limits)
        return result, pos
    if major == 4:
        if argument > end - pos:
            raise _malformed("array longer than the input")
        if depth >= limits[0]:
            raise _malformed("nesting deeper than %d" % limits[0])
        result = []
        depth += 1
        for _ in range(argument):
            element, pos = _decode(data, pos, end, depth, limits)
            result.append(element)
        return result, pos
    if major == 2:
        if argument > end - pos:
            raise _malformed("byte string longer than the input")
        return data[pos : pos + argument], pos + argument
    if major == 1:
        return -1 - argument, pos
    raise _malformed("tags are not in the subset")


def loads(data, max_depth=MAX_DEPTH, max_items=MAX_ITEMS):
    """Decode the single CBOR item that is all of ``data``; raise only CBORDecodeError.

    ``max_depth`` (at most DEPTH_CEILING) and ``max_items`` can only tighten the wire's
    defaults in practice; a bad argument is this side's bug (LocalProtocolError).
    """
    if not 0 <= max_depth <= DEPTH_CEILING or max_items < 0:
        raise LocalProtocolError("max_depth must be in [0, %d], max_items >= 0" % DEPTH_CEILING)
    if type(data) is not bytes:
        if isinstance(data, (bytearray, memoryview)):
            data = bytes(data)
        elif not isinstance(data, bytes):
            raise _malformed("CBOR input must be bytes, not %s" % type(data).__name__)
    end = len(data)
    try:
        value, pos = _decode(data, 0, end, 0, [max_depth, max_items])
    except MemoryError:
        # Limits keep well-formed input small; a board short of heap still fails typed.
        raise _malformed("out of memory while decoding")
    except RuntimeError:
        # MicroPython raises RuntimeError("pystack exhausted") (CPython RecursionError, a
        # RuntimeError) when a board's stack is shallower than max_depth levels of nesting.
        raise _malformed("nesting too deep for this interpreter's stack")
    if pos != end:
        raise _malformed("%d trailing bytes after the item" % (end - pos))
    return value
