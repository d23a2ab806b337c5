"""The SmartX wire messages: what each one carries, and how it maps to CBOR.

Rules (docs/protocol.md, "Messages"):
- A message is one CBOR map with small integer keys. Key 0 is the message type; the other
  keys are listed in each class's ``FIELDS`` table as (key, attribute, kind, required).
- ``encode_message`` checks a message against its table and raises ``LocalProtocolError``;
  ``decode_message`` checks the same table and raises ``RemoteProtocolError`` (reason
  ``CLOSE_MALFORMED``) and nothing else. One table serves both, so they cannot drift apart.
- Unknown keys in a known message are ignored (a newer minor version may add optional keys);
  an unknown message type is refused.
- Every size limit below is a named constant, checked before the value is used.
Runs on MicroPython: plain classes, no annotations, no f-strings.
"""

from smartx_device import cbor
from smartx_device._compat import const
from smartx_device.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from smartx_device.reasons import CLOSE_MALFORMED

PROTOCOL_VERSION = const(1)

MAX_READINGS = const(256)  # readings in one Telemetry batch
MAX_NAME_LENGTH = const(64)  # stream names, command names, state keys (characters)
MAX_ID_LENGTH = const(64)  # device, hub, session and command ids
MAX_TOKEN_LENGTH = const(2048)  # the device JWT in AuthResponse
MAX_DETAIL_LENGTH = const(256)  # Close detail text
MAX_CAPABILITIES = const(16)
MIN_NONCE_SIZE = const(16)
MAX_NONCE_SIZE = const(64)
MAX_UINT = 18446744073709551615  # 2**64 - 1: message ids and times are CBOR unsigned ints

# Message types (key 0). Never renumber: they are the wire.
HELLO = const(1)
AUTH_CHALLENGE = const(2)
AUTH_RESPONSE = const(3)
ACCEPTED = const(4)
CLOSE = const(5)
TELEMETRY = const(6)
ACK = const(7)
COMMAND = const(8)
COMMAND_RESULT = const(9)
PING = const(10)
PONG = const(11)
DESIRED_STATE = const(12)
REPORTED_STATE = const(13)

# Field kinds of the FIELDS tables.
_UINT = const(1)
_TEXT = const(2)  # text of at most MAX_NAME_LENGTH characters
_ID = const(3)  # text of at most MAX_ID_LENGTH characters
_BYTES_NONCE = const(4)
_BOOL = const(5)
_ANY = const(6)
_CAPABILITIES = const(7)
_READINGS = const(8)
_STATE = const(9)
_TOKEN = const(10)
_DETAIL = const(11)
_ANY_TEXT = const(12)  # error text in a CommandResult, at most MAX_DETAIL_LENGTH


class Message:
    """Base of every wire message: fields from ``FIELDS``, equality by type and fields."""

    TYPE = 0
    FIELDS = ()

    def __init__(self, **values):
        for key, attr, kind, required in self.FIELDS:
            value = values.pop(attr, None)
            if kind == _READINGS and isinstance(value, (list, tuple)):
                # Readings compare equal whether built from tuples or decoded as arrays.
                value = [list(item) if isinstance(item, tuple) else item for item in value]
            setattr(self, attr, value)
        if values:
            raise LocalProtocolError("%s has no field %s" % (type(self).__name__, sorted(values)[0]))

    def __eq__(self, other):
        if type(self) is not type(other):
            return False
        for field in self.FIELDS:
            if getattr(self, field[1]) != getattr(other, field[1]):
                return False
        return True

    def __ne__(self, other):
        return not self.__eq__(other)

    def __repr__(self):
        parts = []
        for field in self.FIELDS:
            value = getattr(self, field[1])
            if value is not None:
                parts.append("%s=%r" % (field[1], value))
        return "%s(%s)" % (type(self).__name__, ", ".join(parts))


class Hello(Message):
    """First message of each side: protocol version, who it is, what it can do, its limits."""

    TYPE = HELLO
    FIELDS = (
        (1, "version", _UINT, True),
        (2, "device_id", _ID, False),  # device -> hub only
        (3, "capabilities", _CAPABILITIES, False),
        (4, "max_frame_size", _UINT, False),
        (5, "software", _TEXT, False),
    )


class AuthChallenge(Message):
    """Hub -> device: a fresh nonce to sign, the hub's time (boards may have no clock), its id."""

    TYPE = AUTH_CHALLENGE
    FIELDS = (
        (1, "nonce", _BYTES_NONCE, True),
        (2, "hub_time_ms", _UINT, True),
        (3, "hub_id", _ID, True),
    )


class AuthResponse(Message):
    """Device -> hub: a short-lived JWT, signed by the device's key, bound to the nonce."""

    TYPE = AUTH_RESPONSE
    FIELDS = ((1, "token", _TOKEN, True),)


class Accepted(Message):
    """Hub -> device: the device is verified; the session is established."""

    TYPE = ACCEPTED
    FIELDS = (
        (1, "session_id", _ID, True),
        (2, "keepalive_ms", _UINT, True),
        (3, "hub_time_ms", _UINT, True),
        (4, "max_frame_size", _UINT, False),
    )


class Close(Message):
    """Either side: the session ends, with a machine-readable reason (smartx_device.reasons)."""

    TYPE = CLOSE
    FIELDS = (
        (1, "reason", _UINT, True),
        (2, "detail", _DETAIL, False),
        (3, "retry_after_ms", _UINT, False),
    )


class Telemetry(Message):
    """Device -> hub: a batch of readings ``[stream, ts_ms, value]`` under one message id."""

    TYPE = TELEMETRY
    FIELDS = (
        (1, "msg_id", _UINT, True),
        (2, "readings", _READINGS, True),
    )


class Ack(Message):
    """Hub -> device: the message with this id (Telemetry or ReportedState) is committed."""

    TYPE = ACK
    FIELDS = ((1, "msg_id", _UINT, True),)


class Command(Message):
    """Hub -> device: run the named handler with ``args``; answer with a CommandResult."""

    TYPE = COMMAND
    FIELDS = (
        (1, "command_id", _ID, True),
        (2, "name", _TEXT, True),
        (3, "args", _ANY, False),
        (4, "expires_ms", _UINT, False),
    )


class CommandResult(Message):
    """Device -> hub: what a command did: ``ok`` with a ``result``, or not ok with an ``error``."""

    TYPE = COMMAND_RESULT
    FIELDS = (
        (1, "command_id", _ID, True),
        (2, "ok", _BOOL, True),
        (3, "result", _ANY, False),
        (4, "error", _ANY_TEXT, False),
    )


class Ping(Message):
    """Either side: are you there? Answered by a Pong with the same ``seq``."""

    TYPE = PING
    FIELDS = ((1, "seq", _UINT, True),)


class Pong(Message):
    """The answer to a Ping."""

    TYPE = PONG
    FIELDS = ((1, "seq", _UINT, True),)


class DesiredState(Message):
    """Hub -> device: the state users want the device in, with its version."""

    TYPE = DESIRED_STATE
    FIELDS = (
        (1, "version", _UINT, True),
        (2, "state", _STATE, True),
    )


class ReportedState(Message):
    """Device -> hub: the state the device is in; acknowledged by an Ack of ``msg_id``."""

    TYPE = REPORTED_STATE
    FIELDS = (
        (1, "msg_id", _UINT, True),
        (2, "state", _STATE, True),
    )


MESSAGE_CLASSES = {}
for _cls in (Hello, AuthChallenge, AuthResponse, Accepted, Close, Telemetry, Ack, Command,
             CommandResult, Ping, Pong, DesiredState, ReportedState):
    MESSAGE_CLASSES[_cls.TYPE] = _cls


def _is_int(value):
    # bool is an int subclass on CPython; on the wire true/false are not integers.
    return isinstance(value, int) and not isinstance(value, bool)


def _text_ok(value, limit):
    return isinstance(value, str) and len(value) <= limit


def _check_kind(kind, value):
    """Return None if ``value`` fits ``kind``, else a short reason."""
    if kind == _UINT:
        if not _is_int(value) or value < 0 or value > MAX_UINT:
            return "must be an unsigned integer"
    elif kind == _TEXT:
        if not _text_ok(value, MAX_NAME_LENGTH) or not value:
            return "must be text of 1 to %d characters" % MAX_NAME_LENGTH
    elif kind == _ID:
        if not _text_ok(value, MAX_ID_LENGTH) or not value:
            return "must be an id of 1 to %d characters" % MAX_ID_LENGTH
    elif kind == _BYTES_NONCE:
        if not isinstance(value, bytes) or not MIN_NONCE_SIZE <= len(value) <= MAX_NONCE_SIZE:
            return "must be %d to %d bytes" % (MIN_NONCE_SIZE, MAX_NONCE_SIZE)
    elif kind == _BOOL:
        if value is not True and value is not False:
            return "must be a boolean"
    elif kind == _TOKEN:
        if not _text_ok(value, MAX_TOKEN_LENGTH) or not value:
            return "must be a token of at most %d characters" % MAX_TOKEN_LENGTH
    elif kind == _DETAIL or kind == _ANY_TEXT:
        if not _text_ok(value, MAX_DETAIL_LENGTH):
            return "must be text of at most %d characters" % MAX_DETAIL_LENGTH
    elif kind == _CAPABILITIES:
        if not isinstance(value, list) or len(value) > MAX_CAPABILITIES:
            return "must be a list of at most %d names" % MAX_CAPABILITIES
        for item in value:
            if not _text_ok(item, MAX_NAME_LENGTH) or not item:
                return "must hold names of 1 to %d characters" % MAX_NAME_LENGTH
    elif kind == _READINGS:
        return _check_readings(value)
    elif kind == _STATE:
        if not isinstance(value, dict):
            return "must be a map"
        for key in value:
            if not _text_ok(key, MAX_NAME_LENGTH) or not key:
                return "must have keys of 1 to %d characters" % MAX_NAME_LENGTH
    return None


def _check_readings(value):
    if not isinstance(value, list) or not value or len(value) > MAX_READINGS:
        return "must be a list of 1 to %d readings" % MAX_READINGS
    for reading in value:
        if not isinstance(reading, (list, tuple)) or len(reading) != 3:
            return "must hold [stream, ts_ms, value] readings"
        if not _text_ok(reading[0], MAX_NAME_LENGTH) or not reading[0]:
            return "must name each stream in 1 to %d characters" % MAX_NAME_LENGTH
        ts = reading[1]
        if not _is_int(ts) or ts < 0 or ts > MAX_UINT:
            return "must time each reading in unsigned milliseconds"
    return None


def _fail(error_class, message, text):
    if error_class is RemoteProtocolError:
        return RemoteProtocolError(text, CLOSE_MALFORMED)
    return LocalProtocolError(text)


def _validate(message, error_class):
    for key, attr, kind, required in message.FIELDS:
        value = getattr(message, attr)
        if value is None:
            if required:
                raise _fail(error_class, message, "%s.%s is required" % (type(message).__name__, attr))
            continue
        problem = _check_kind(kind, value)
        if problem is not None:
            raise _fail(error_class, message, "%s.%s %s" % (type(message).__name__, attr, problem))


def message_to_map(message):
    """Return the CBOR map (dict with integer keys) that carries ``message``; checks it first."""
    if not isinstance(message, Message) or message.TYPE not in MESSAGE_CLASSES:
        raise LocalProtocolError("not a SmartX message: %r" % (message,))
    _validate(message, LocalProtocolError)
    mapping = {0: message.TYPE}
    for key, attr, kind, required in message.FIELDS:
        value = getattr(message, attr)
        if value is not None:
            mapping[key] = value
    return mapping


def message_from_map(mapping):
    """Build the message a decoded CBOR map carries; ``RemoteProtocolError`` if it carries none."""
    if not isinstance(mapping, dict):
        raise RemoteProtocolError("a message must be a CBOR map", CLOSE_MALFORMED)
    message_type = mapping.get(0)
    if not _is_int(message_type) or message_type not in MESSAGE_CLASSES:
        raise RemoteProtocolError("unknown message type %r" % (message_type,), CLOSE_MALFORMED)
    cls = MESSAGE_CLASSES[message_type]
    message = object.__new__(cls)  # MicroPython classes have no __new__ attribute
    for key, attr, kind, required in cls.FIELDS:
        setattr(message, attr, mapping.get(key))
    _validate(message, RemoteProtocolError)
    return message


def encode_message(message):
    """Return the CBOR bytes of ``message`` (deterministic encoding)."""
    try:
        return cbor.dumps(message_to_map(message))
    except ProtocolError:
        raise
    except Exception as error:  # a value the codec refuses surfaces as the caller's mistake
        raise LocalProtocolError("cannot encode %s: %s" % (type(message).__name__, error))


def decode_message(data):
    """Return the message encoded in ``data``; ``RemoteProtocolError`` on anything else."""
    return message_from_map(cbor.loads(data))
