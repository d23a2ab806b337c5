"""The one error tree of the SmartX protocol core.

Rules (docs/protocol.md, "Errors"):
- ``LocalProtocolError``: this side misused the core (sent a message its state forbids,
  tried to encode a value the wire cannot carry). A bug in the caller.
- ``RemoteProtocolError``: the peer sent bytes the protocol forbids (garbage, a frame past a
  limit, a message out of turn). Every decoder and the session raise only this for peer input;
  a ``KeyError``/``IndexError``/``UnicodeError``/``RecursionError`` escaping the core is a bug.
- Each error carries ``reason``, a close reason code from ``smartx_device.messages`` (or 0),
  so that a session can tell the peer why it is being closed.
Plain single-base classes only: MicroPython runs this file.
"""


class ProtocolError(Exception):
    """Base of every error the protocol core raises."""

    def __init__(self, message, reason=0):
        super().__init__(message)
        self.reason = reason


class LocalProtocolError(ProtocolError):
    """This side used the core wrongly; the peer did nothing wrong."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol forbids."""


class CBOREncodeError(LocalProtocolError):
    """A value cannot be encoded in the core's CBOR subset."""


class CBORDecodeError(RemoteProtocolError):
    """Bytes are not a well-formed item of the core's CBOR subset, or exceed a limit."""


class FramingError(RemoteProtocolError):
    """A byte stream or serial link does not carry valid frames."""


class FrameTooLargeError(FramingError):
    """A frame's declared or accumulated length exceeds the agreed maximum."""
