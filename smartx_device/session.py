"""The SmartX session state machine, sans-IO: bytes in, events out; messages in, bytes out.

Rule 1: every state and every transition of both roles lives in ``TRANSITIONS`` below and
nowhere else. A message that a state does not list is refused: sending it raises
``LocalProtocolError``; receiving it raises ``RemoteProtocolError`` (reason
``CLOSE_PROTOCOL_VIOLATION``) after queueing a ``Close`` for the peer.

Rule 2: the core never reads a clock. Every call that may start or check a timer takes
``now_ms``; ``get_timer()`` says when the session next wants ``handle_timer(now_ms)``.

Rule 3: output the session makes on its own (a Pong, a keep-alive Ping, the Close that ends a
session on a timeout or on bad input) waits in ``data_to_send()``; ``send()`` returns the bytes
of the message it was given. The caller writes both, in the order it gets them.

``receive_data(b"", now_ms)`` means the peer closed the byte stream.
docs/protocol.md, "Session", is the specification this file implements.
"""

from smartx_device import messages as m
from smartx_device._compat import const
from smartx_device.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from smartx_device.framing import DEFAULT_MAX_FRAME_SIZE, StreamFramer
from smartx_device.reasons import (CLOSE_HANDSHAKE_TIMEOUT, CLOSE_KEEPALIVE_TIMEOUT,
                                   CLOSE_MALFORMED, CLOSE_NORMAL, CLOSE_PROTOCOL_VIOLATION,
                                   CLOSE_VERSION_UNSUPPORTED)

DEVICE = "device"
HUB = "hub"

# States. A device walks IDLE -> AWAIT_HELLO -> AWAIT_CHALLENGE -> CHALLENGED -> AWAIT_ACCEPT
# -> ESTABLISHED; a hub walks IDLE -> HELLO_RECEIVED -> HELLO_ANSWERED -> AWAIT_RESPONSE
# -> VERIFYING -> ESTABLISHED. Either ends in CLOSED.
IDLE = const(0)
AWAIT_HELLO = const(1)
AWAIT_CHALLENGE = const(2)
CHALLENGED = const(3)
AWAIT_ACCEPT = const(4)
HELLO_RECEIVED = const(5)
HELLO_ANSWERED = const(6)
AWAIT_RESPONSE = const(7)
VERIFYING = const(8)
ESTABLISHED = const(9)
CLOSED = const(10)

STATE_NAMES = {
    IDLE: "IDLE", AWAIT_HELLO: "AWAIT_HELLO", AWAIT_CHALLENGE: "AWAIT_CHALLENGE",
    CHALLENGED: "CHALLENGED", AWAIT_ACCEPT: "AWAIT_ACCEPT", HELLO_RECEIVED: "HELLO_RECEIVED",
    HELLO_ANSWERED: "HELLO_ANSWERED", AWAIT_RESPONSE: "AWAIT_RESPONSE", VERIFYING: "VERIFYING",
    ESTABLISHED: "ESTABLISHED", CLOSED: "CLOSED",
}

_SEND = const(0)
_RECEIVE = const(256)


def _send(message_type):
    return _SEND + message_type


def _receive(message_type):
    return _RECEIVE + message_type


# The steady-state traffic, per direction, once a session is ESTABLISHED.
_DEVICE_SENDS = (m.TELEMETRY, m.COMMAND_RESULT, m.REPORTED_STATE, m.PING, m.PONG)
_HUB_SENDS = (m.ACK, m.COMMAND, m.DESIRED_STATE, m.PING, m.PONG)


def _established(sends, receives):
    row = {}
    for message_type in sends:
        row[_send(message_type)] = ESTABLISHED
    for message_type in receives:
        row[_receive(message_type)] = ESTABLISHED
    return row


TRANSITIONS = {
    DEVICE: {
        IDLE: {_send(m.HELLO): AWAIT_HELLO},
        AWAIT_HELLO: {_receive(m.HELLO): AWAIT_CHALLENGE},
        AWAIT_CHALLENGE: {_receive(m.AUTH_CHALLENGE): CHALLENGED},
        CHALLENGED: {_send(m.AUTH_RESPONSE): AWAIT_ACCEPT},
        AWAIT_ACCEPT: {_receive(m.ACCEPTED): ESTABLISHED},
        ESTABLISHED: _established(_DEVICE_SENDS, _HUB_SENDS),
        CLOSED: {},
    },
    HUB: {
        IDLE: {_receive(m.HELLO): HELLO_RECEIVED},
        HELLO_RECEIVED: {_send(m.HELLO): HELLO_ANSWERED},
        HELLO_ANSWERED: {_send(m.AUTH_CHALLENGE): AWAIT_RESPONSE},
        AWAIT_RESPONSE: {_receive(m.AUTH_RESPONSE): VERIFYING},
        VERIFYING: {_send(m.ACCEPTED): ESTABLISHED},
        ESTABLISHED: _established(_HUB_SENDS, _DEVICE_SENDS),
        CLOSED: {},
    },
}
# Close may be sent or received in every state but CLOSED, and always leads to CLOSED.
for _table in TRANSITIONS.values():
    for _state, _row in _table.items():
        if _state != CLOSED:
            _row[_send(m.CLOSE)] = CLOSED
            _row[_receive(m.CLOSE)] = CLOSED

DEFAULT_KEEPALIVE_MS = const(30000)
DEFAULT_HANDSHAKE_TIMEOUT_MS = const(10000)
MIN_KEEPALIVE_MS = const(1000)  # a hub cannot make a device ping in a busy loop
# The peer is declared gone after this many keep-alive intervals with nothing received.
IDLE_INTERVALS = const(2)


# -- events -------------------------------------------------------------------------------


class Event:
    """Base of the facts a session reports; equality by type and attributes."""

    def __eq__(self, other):
        return type(self) is type(other) and self.__dict__ == other.__dict__

    def __ne__(self, other):
        return not self.__eq__(other)

    def __repr__(self):
        return "%s(%r)" % (type(self).__name__, self.__dict__)


class HelloReceived(Event):
    """The peer's Hello arrived (``message``)."""

    def __init__(self, message):
        self.message = message


class ChallengeReceived(Event):
    """Device: the hub's AuthChallenge arrived; answer it with an AuthResponse."""

    def __init__(self, message):
        self.message = message


class AuthResponseReceived(Event):
    """Hub: the device answered the challenge; verify ``message.token``, then accept or close."""

    def __init__(self, message):
        self.message = message


class SessionEstablished(Event):
    """The session is verified and carries traffic (``message`` is the Accepted)."""

    def __init__(self, message):
        self.message = message


class MessageReceived(Event):
    """A steady-state message arrived (Telemetry, Ack, Command, CommandResult, state)."""

    def __init__(self, message):
        self.message = message


class PongReceived(Event):
    """The answer to one of our Pings arrived: the link is alive."""

    def __init__(self, seq):
        self.seq = seq


class ConsoleOutput(Event):
    """Console text the board printed between frames (serial links only)."""

    def __init__(self, data):
        self.data = data


class SessionClosed(Event):
    """The session ended. ``by_peer``: the peer closed it; ``clean``: a Close was exchanged."""

    def __init__(self, reason, detail, retry_after_ms, by_peer, clean):
        self.reason = reason
        self.detail = detail
        self.retry_after_ms = retry_after_ms
        self.by_peer = by_peer
        self.clean = clean


# -- the session --------------------------------------------------------------------------


class Session:
    """One side of one SmartX session. ``role`` is DEVICE or HUB; ``framer`` a framing object
    (StreamFramer by default; SerialFramer for UART links). ``decode_message`` and
    ``encode_message`` replace ``messages.decode_message``/``encode_message``: only with
    functions that give exactly their results and errors (the hub's native-codec ones).
    ``handshake_deadline_ms`` becomes None when the handshake ends (the hub's ``accept``,
    the device's receipt of Accepted): an established session keeps no deadline of its own."""

    # A hub holds one session per connected device, mostly idle: slots keep each one small
    # (a plain instance's attribute table costs more than the values). The ``__dict__`` slot
    # is for the rare codec passed to the constructor (see below): a session made without one
    # never creates its dictionary. MicroPython ignores ``__slots__``: nothing here needs it.
    __slots__ = ("role", "state", "_table", "_framer", "max_frame_size", "peer_max_frame_size",
                 "keepalive_ms", "handshake_deadline_ms", "last_received_ms", "last_sent_ms",
                 "close_event", "_outbox", "_ping_seq", "__dict__")

    # The message codec, as class attributes so that a session holds no reference of its own
    # unless given one (the constructor's arguments, or a subclass's class attributes).
    _decode_message = staticmethod(m.decode_message)
    _encode_message = staticmethod(m.encode_message)

    def __init__(self, role, now_ms, framer=None, keepalive_ms=DEFAULT_KEEPALIVE_MS,
                 handshake_timeout_ms=DEFAULT_HANDSHAKE_TIMEOUT_MS,
                 max_frame_size=DEFAULT_MAX_FRAME_SIZE, decode_message=None, encode_message=None):
        if role not in TRANSITIONS:
            raise LocalProtocolError("role must be DEVICE or HUB, not %r" % (role,))
        self.role = role
        if decode_message is not None:
            self._decode_message = decode_message
        if encode_message is not None:
            self._encode_message = encode_message
        self.state = IDLE
        self._table = TRANSITIONS[role]
        self._framer = framer if framer is not None else StreamFramer(max_frame_size)
        self.max_frame_size = max_frame_size
        self.peer_max_frame_size = DEFAULT_MAX_FRAME_SIZE
        self.keepalive_ms = keepalive_ms
        self.handshake_deadline_ms = now_ms + handshake_timeout_ms
        self.last_received_ms = now_ms
        self.last_sent_ms = now_ms
        self.close_event = None
        self._outbox = None  # bytes the session made on its own; None while there are none
        self._ping_seq = 0

    @property
    def state_name(self):
        """The current state as its UPPER_SNAKE name."""
        return STATE_NAMES[self.state]

    # -- sending --------------------------------------------------------------------------

    def send(self, message, now_ms=None):
        """Return the bytes that carry ``message``; ``LocalProtocolError`` if the state forbids it."""
        next_state = self._table[self.state].get(_send(message.TYPE))
        if next_state is None:
            raise LocalProtocolError("cannot send %s in state %s as %s" % (
                type(message).__name__, self.state_name, self.role))
        payload = self._encode_message(message)
        if len(payload) > self.peer_max_frame_size:
            raise LocalProtocolError("%s is %d bytes, the peer accepts at most %d" % (
                type(message).__name__, len(payload), self.peer_max_frame_size))
        data = self._framer.encode(payload)
        self.state = next_state
        if now_ms is not None:
            self.last_sent_ms = now_ms
        if message.TYPE == m.CLOSE:
            self.close_event = SessionClosed(message.reason, message.detail or "",
                                             message.retry_after_ms, False, True)
        return data

    def close(self, reason=CLOSE_NORMAL, detail="", retry_after_ms=None, now_ms=None):
        """Return the bytes of a Close with ``reason``; b"" if the session is already closed."""
        if self.state == CLOSED:
            return b""
        return self.send(m.Close(reason=reason, detail=detail[:m.MAX_DETAIL_LENGTH],
                                 retry_after_ms=retry_after_ms), now_ms)

    def data_to_send(self):
        """Return (and forget) the bytes the session made on its own since the last call."""
        outbox = self._outbox
        if outbox is None:
            return b""
        self._outbox = None
        return bytes(outbox)

    def _queue(self, data):
        """Keep ``data`` for ``data_to_send``; the buffer exists only while it holds bytes."""
        if self._outbox is None:
            self._outbox = bytearray(data)
        else:
            self._outbox.extend(data)

    # -- receiving ------------------------------------------------------------------------

    def receive_data(self, data, now_ms):
        """Feed bytes from the peer; return the list of events they complete.

        Bad peer input raises ``RemoteProtocolError`` (its ``events`` attribute holds the
        events completed before the bad frame); a Close for the peer then waits in
        ``data_to_send()`` and the session is CLOSED.
        """
        events = []
        if self.state == CLOSED:
            return events
        self.last_received_ms = now_ms
        try:
            for item in self._framer.feed(data):
                if isinstance(item, (bytes, bytearray)):
                    self._receive_frame(item, now_ms, events)
                    if self.state == CLOSED:
                        return events
                else:
                    events.append(ConsoleOutput(item.data))
        except RemoteProtocolError as error:
            self._fail(error, now_ms, events)
        if not data and self.state != CLOSED:
            self.state = CLOSED
            self.close_event = SessionClosed(CLOSE_NORMAL, "connection lost", None, True, False)
            events.append(self.close_event)
        return events

    def _receive_frame(self, payload, now_ms, events):
        message = self._decode_message(payload)
        next_state = self._table[self.state].get(_receive(message.TYPE))
        if next_state is None:
            raise RemoteProtocolError("%s may not send %s in state %s" % (
                "hub" if self.role == DEVICE else "device", type(message).__name__,
                self.state_name), CLOSE_PROTOCOL_VIOLATION)
        self.state = next_state
        message_type = message.TYPE
        if message_type == m.CLOSE:
            self.close_event = SessionClosed(message.reason, message.detail or "",
                                             message.retry_after_ms, True, True)
            events.append(self.close_event)
        elif message_type == m.HELLO:
            if self.role == HUB and message.device_id is None:
                raise RemoteProtocolError("a device's Hello must name the device", CLOSE_MALFORMED)
            # The Hello itself is not kept: it goes out in HelloReceived, and of its fields the
            # session needs only the frame limit later (an idle session should hold no more).
            self._set_peer_max_frame_size(message.max_frame_size)
            events.append(HelloReceived(message))
            self._check_version(message, now_ms, events)
        elif message_type == m.AUTH_CHALLENGE:
            events.append(ChallengeReceived(message))
        elif message_type == m.AUTH_RESPONSE:
            events.append(AuthResponseReceived(message))
        elif message_type == m.ACCEPTED:
            self.keepalive_ms = max(message.keepalive_ms, MIN_KEEPALIVE_MS)
            self._set_peer_max_frame_size(message.max_frame_size)
            self.handshake_deadline_ms = None  # ESTABLISHED: the handshake deadline is over
            events.append(SessionEstablished(message))
        elif message_type == m.PING:
            self._queue(self.send(m.Pong(seq=message.seq), now_ms))
        elif message_type == m.PONG:
            events.append(PongReceived(message.seq))
        else:
            events.append(MessageReceived(message))

    def _set_peer_max_frame_size(self, size):
        # A peer that announces the limit already held (the default, most often) leaves the
        # shared constant in place rather than a decoded int of its own per session.
        if size is not None and size != self.peer_max_frame_size:
            self.peer_max_frame_size = size

    def _check_version(self, hello, now_ms, events):
        if hello.version != m.PROTOCOL_VERSION:
            self._queue(self.close(
                CLOSE_VERSION_UNSUPPORTED, "this side speaks version %d" % m.PROTOCOL_VERSION,
                None, now_ms))
            events.append(self.close_event)

    def _fail(self, error, now_ms, events):
        error.events = events
        if self.state != CLOSED:
            reason = error.reason or CLOSE_PROTOCOL_VIOLATION
            self._queue(self.close(reason, str(error), None, now_ms))
            events.append(self.close_event)
        raise error

    # -- timers ---------------------------------------------------------------------------

    def get_timer(self):
        """Return the time (ms) at which ``handle_timer`` must next run, or None."""
        if self.state == CLOSED:
            return None
        if self.state != ESTABLISHED:
            return self.handshake_deadline_ms
        idle_deadline = self.last_received_ms + IDLE_INTERVALS * self.keepalive_ms
        if self.role == DEVICE:
            return min(idle_deadline, self.last_sent_ms + self.keepalive_ms)
        return idle_deadline

    def handle_timer(self, now_ms):
        """Run what is due at ``now_ms``: handshake timeout, keep-alive Ping, idle timeout.
        Returns the events this causes (a SessionClosed on a timeout)."""
        events = []
        if self.state == CLOSED:
            return events
        if self.state != ESTABLISHED:
            if now_ms >= self.handshake_deadline_ms:
                self._queue(self.close(CLOSE_HANDSHAKE_TIMEOUT, "handshake took too long",
                                       None, now_ms))
                events.append(self.close_event)
            return events
        if now_ms - self.last_received_ms >= IDLE_INTERVALS * self.keepalive_ms:
            self._queue(self.close(CLOSE_KEEPALIVE_TIMEOUT, "nothing heard from the peer",
                                   None, now_ms))
            events.append(self.close_event)
        elif self.role == DEVICE and now_ms - self.last_sent_ms >= self.keepalive_ms:
            self._ping_seq += 1
            self._queue(self.send(m.Ping(seq=self._ping_seq), now_ms))
        return events


class DeviceSession(Session):
    """The device side: ``start(hello)`` first, answer ChallengeReceived with ``authenticate``."""

    __slots__ = ()

    def __init__(self, now_ms, framer=None, **options):
        super().__init__(DEVICE, now_ms, framer, **options)

    def start(self, device_id, now_ms, capabilities=None, software=None):
        """Return the bytes of the opening Hello."""
        return self.send(m.Hello(version=m.PROTOCOL_VERSION, device_id=device_id,
                                 capabilities=capabilities, max_frame_size=self.max_frame_size,
                                 software=software), now_ms)

    def authenticate(self, token, now_ms):
        """Return the bytes of the AuthResponse carrying the device JWT ``token``."""
        return self.send(m.AuthResponse(token=token), now_ms)


class HubSession(Session):
    """The hub side: on HelloReceived send ``challenge``; on AuthResponseReceived ``accept``
    or ``close``."""

    __slots__ = ()

    def __init__(self, now_ms, framer=None, **options):
        super().__init__(HUB, now_ms, framer, **options)

    def challenge(self, nonce, hub_id, now_ms, capabilities=None):
        """Return the bytes of the hub's Hello and AuthChallenge (hub time = ``now_ms``)."""
        hello = m.Hello(version=m.PROTOCOL_VERSION, capabilities=capabilities,
                        max_frame_size=self.max_frame_size)
        data = self.send(hello, now_ms)
        return data + self.send(m.AuthChallenge(nonce=nonce, hub_time_ms=now_ms, hub_id=hub_id),
                                now_ms)

    def accept(self, session_id, now_ms):
        """Return the bytes of Accepted; the session is ESTABLISHED."""
        data = self.send(m.Accepted(session_id=session_id, keepalive_ms=self.keepalive_ms,
                                    hub_time_ms=now_ms, max_frame_size=self.max_frame_size),
                         now_ms)
        self.handshake_deadline_ms = None  # ESTABLISHED: the handshake deadline is over
        return data
