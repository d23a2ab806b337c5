"""Close reasons: why a session ended, as the integer carried by a ``Close`` message.

The numbers are part of the wire (docs/protocol.md, "Close reasons"): never renumber one.
Any side may send any reason; a receiver that does not know a number treats it as
``CLOSE_PROTOCOL_VIOLATION`` for display but keeps the number.
"""

from smartx_device._compat import const

CLOSE_NORMAL = const(0)
CLOSE_BAD_CREDENTIALS = const(1)
CLOSE_DEVICE_DISABLED = const(2)
CLOSE_TOKEN_EXPIRED = const(3)
CLOSE_REVOKED = const(4)
CLOSE_RATE_LIMITED = const(5)
CLOSE_FRAME_TOO_LARGE = const(6)
CLOSE_MALFORMED = const(7)
CLOSE_VERSION_UNSUPPORTED = const(8)
CLOSE_SHUTTING_DOWN = const(9)
CLOSE_HANDSHAKE_TIMEOUT = const(10)
CLOSE_KEEPALIVE_TIMEOUT = const(11)
CLOSE_REPLACED = const(12)
CLOSE_PROTOCOL_VIOLATION = const(13)
CLOSE_UNKNOWN_DEVICE = const(14)
CLOSE_INTERNAL_ERROR = const(15)
CLOSE_NOT_AUTHORISED = const(16)

REASON_NAMES = {
    CLOSE_NORMAL: "normal",
    CLOSE_BAD_CREDENTIALS: "bad_credentials",
    CLOSE_DEVICE_DISABLED: "device_disabled",
    CLOSE_TOKEN_EXPIRED: "token_expired",
    CLOSE_REVOKED: "revoked",
    CLOSE_RATE_LIMITED: "rate_limited",
    CLOSE_FRAME_TOO_LARGE: "frame_too_large",
    CLOSE_MALFORMED: "malformed",
    CLOSE_VERSION_UNSUPPORTED: "version_unsupported",
    CLOSE_SHUTTING_DOWN: "shutting_down",
    CLOSE_HANDSHAKE_TIMEOUT: "handshake_timeout",
    CLOSE_KEEPALIVE_TIMEOUT: "keepalive_timeout",
    CLOSE_REPLACED: "replaced",
    CLOSE_PROTOCOL_VIOLATION: "protocol_violation",
    CLOSE_UNKNOWN_DEVICE: "unknown_device",
    CLOSE_INTERNAL_ERROR: "internal_error",
    CLOSE_NOT_AUTHORISED: "not_authorised",
}


def reason_name(reason):
    """Return the stable text name of a close reason number ("unknown_N" if unassigned)."""
    name = REASON_NAMES.get(reason)
    if name is None:
        return "unknown_%d" % reason
    return name
