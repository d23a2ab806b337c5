"""UTF-8 well-formedness (RFC 3629) for the protocol core, the same on CPython and MicroPython.

CPython's decoder already refuses overlong forms, surrogates and code points above U+10FFFF;
MicroPython's only checks the lead/continuation structure and ignores ``errors="replace"``.
The CBOR codec (text strings) and the serial framing (console text) both need the strict rule,
so it lives here once. Pure functions: no I/O, no state.
"""

from smartx_device._compat import const

_REPLACEMENT = "\ufffd"


def _decoder_is_strict():
    for bad in (b"\xc0\x80", b"\xed\xa0\x80", b"\xf4\x90\x80\x80"):
        try:
            bad.decode("utf-8")
        except UnicodeError:
            continue
        return False
    return True


# True where the interpreter's own decoder enforces RFC 3629 (CPython), False on MicroPython.
STRICT_DECODER = _decoder_is_strict()
_ASCII_LIMIT = const(0x80)


def sequence_length(data, index, size):
    """At a non-ASCII byte: return (length, True) of the valid UTF-8 sequence there, or
    (length of its maximal invalid prefix, False), as Unicode's U+FFFD substitution counts."""
    lead = data[index]
    low = 0x80
    high = 0xBF
    if 0xC2 <= lead <= 0xDF:
        need = 1
    elif lead == 0xE0:
        need = 2
        low = 0xA0
    elif lead == 0xED:
        need = 2
        high = 0x9F
    elif 0xE1 <= lead <= 0xEF:
        need = 2
    elif lead == 0xF0:
        need = 3
        low = 0x90
    elif 0xF1 <= lead <= 0xF3:
        need = 3
    elif lead == 0xF4:
        need = 3
        high = 0x8F
    else:
        return 1, False
    position = index + 1
    if position >= size or not low <= data[position] <= high:
        return 1, False
    position += 1
    while position <= index + need:
        if position >= size or data[position] & 0xC0 != 0x80:
            return position - index, False
        position += 1
    return need + 1, True


def is_valid(data, start=0, end=None):
    """True if data[start:end] is well-formed UTF-8 (checked by hand, on either interpreter)."""
    if end is None:
        end = len(data)
    index = start
    while index < end:
        if data[index] < _ASCII_LIMIT:
            index += 1
            continue
        length, valid = sequence_length(data, index, end)
        if not valid:
            return False
        index += length
    return True


def decode_replacing(data):
    """Decode UTF-8, each maximal invalid subpart becoming U+FFFD (CPython's "replace")."""
    parts = []
    size = len(data)
    run_start = 0
    index = 0
    while index < size:
        if data[index] < _ASCII_LIMIT:
            index += 1
            continue
        length, valid = sequence_length(data, index, size)
        if not valid:
            parts.append(data[run_start:index].decode("utf-8"))
            parts.append(_REPLACEMENT)
            run_start = index + length
        index += length
    parts.append(data[run_start:size].decode("utf-8"))
    return "".join(parts)
