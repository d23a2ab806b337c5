"""The device client: connect, authenticate, publish with acknowledgement, commands, state.

Two layers (docs/device-sdk.md, "Client"):

- ``ClientCore``: the client's logic with no I/O and no clock (the STYLE.md rule 1 shape, one
  level up from the session): it owns one ``DeviceSession`` per connection, answers the
  challenge, seals batches from the offline queue and sends them (at most ``max_in_flight``
  unacknowledged), records acks, runs command handlers, tracks reported state. Bytes in, bytes
  out, ``now_ms`` passed in. The blocking ``Client`` here and ``aio.AsyncClient`` drive it.
- ``Client``: the blocking loop for CPython and MicroPython: transports, timeouts, reconnect
  with back-off (``backoff.Backoff``), the user's API.

Delivery: at least once, exactly-once in effect. A reading is on flash before ``publish``
returns; a batch keeps its msg_id for ever (queue rules); after a reconnect every sealed,
unacknowledged batch is sent again first, in order; the hub stores a repeated id once.
On a live session, a Telemetry batch or ReportedState with no Ack after ``ack_timeout_ms`` is
sent again with the same msg_id and content (a serial link behind a gateway loses a frame
without a sound); each further wait doubles, up to ``MAX_ACK_TIMEOUT_MS``.

Errors: one ``ClientError`` subclass per case a user can act on, each carrying the hub's close
``reason`` (smartx_device.reasons), its ``detail`` and ``retry_after_ms``.
MicroPython subset: no annotations, no f-strings; CPython-only modules imported lazily.
"""

from smartx_device import backoff as backoff_module
from smartx_device import clock as clock_module
from smartx_device import messages as m
from smartx_device import reasons as r
from smartx_device.auth import CredentialError, Signer
from smartx_device.errors import LocalProtocolError, ProtocolError
from smartx_device.framing import DEFAULT_MAX_FRAME_SIZE
from smartx_device.queue import OfflineQueue, QueueError
from smartx_device.session import (ChallengeReceived, DeviceSession, MessageReceived,
                                   SessionClosed, SessionEstablished)

SOFTWARE = "smartx-device/0.1.0"
DEFAULT_MAX_IN_FLIGHT = 4  # batches sent and not yet acknowledged
DEFAULT_BATCH_READINGS = 256
RECV_SIZE = 4096
# An unacknowledged Telemetry or ReportedState is sent again on the same session after this
# long; the hub acks in milliseconds, so 10 s means the frame or its Ack was lost.
DEFAULT_ACK_TIMEOUT_MS = 10000
# Each resend of the same message waits twice as long as the one before, up to this (or up
# to ack_timeout_ms when that is larger): a slow hub is not buried under repeats.
MAX_ACK_TIMEOUT_MS = 60000


# -- errors ---------------------------------------------------------------------------------


class ClientError(Exception):
    """Base of the client's errors: ``reason`` (close reason or None), ``detail`` (text),
    ``retry_after_ms`` (the hub's, or None)."""

    def __init__(self, message, reason=None, detail="", retry_after_ms=None):
        super().__init__(message)
        self.reason = reason
        self.detail = detail
        self.retry_after_ms = retry_after_ms


class AuthError(ClientError):
    """The hub refused the device's credentials (bad key, unknown or removed device)."""


class DeviceDisabledError(ClientError):
    """The device is disabled on the hub: an operator must enable it."""


class HubUnreachableError(ClientError):
    """No hub answered at the address (refused, timed out, no route, nothing discovered)."""


class CAMismatchError(ClientError):
    """The hub's TLS certificate does not verify against the pinned CA: wrong hub, or wrong CA
    in the bundle."""


class RateLimitedError(ClientError):
    """The hub is limiting this device; retry after ``retry_after_ms``."""


class TokenExpiredError(ClientError):
    """The hub found the device JWT expired or not yet valid (a hub time problem)."""


class VersionUnsupportedError(ClientError):
    """The hub speaks another protocol version: update the device SDK or the hub."""


class ConnectionLostError(ClientError):
    """The session ended (link lost, keep-alive timeout, hub shutting down or replaced us)."""


_ERRORS_BY_REASON = {
    r.CLOSE_BAD_CREDENTIALS: AuthError,
    r.CLOSE_UNKNOWN_DEVICE: AuthError,
    r.CLOSE_REVOKED: AuthError,
    r.CLOSE_NOT_AUTHORISED: AuthError,
    r.CLOSE_DEVICE_DISABLED: DeviceDisabledError,
    r.CLOSE_RATE_LIMITED: RateLimitedError,
    r.CLOSE_TOKEN_EXPIRED: TokenExpiredError,
    r.CLOSE_VERSION_UNSUPPORTED: VersionUnsupportedError,
}

# Errors that waiting will not fix: the run loop raises them instead of retrying.
FATAL_ERRORS = (AuthError, CAMismatchError, VersionUnsupportedError, DeviceDisabledError,
                CredentialError, QueueError)


def error_for_close(event):
    """Return the ClientError for a SessionClosed event."""
    cls = _ERRORS_BY_REASON.get(event.reason, ConnectionLostError)
    who = "the hub" if event.by_peer else "this device"
    text = "session closed by %s: %s" % (who, r.reason_name(event.reason))
    if event.detail:
        text = "%s (%s)" % (text, event.detail)
    return cls(text, event.reason, event.detail, event.retry_after_ms)


# -- the sans-IO client core ----------------------------------------------------------------


class ClientCore:
    """The client's logic for one device, across connections; no I/O, no clock."""

    def __init__(self, device_id, signer, queue, wall_clock=None, software=SOFTWARE,
                 capabilities=None, max_in_flight=DEFAULT_MAX_IN_FLIGHT,
                 batch_readings=DEFAULT_BATCH_READINGS, ack_timeout_ms=DEFAULT_ACK_TIMEOUT_MS):
        self.device_id = device_id
        self.signer = signer
        self.queue = queue
        self.wall = wall_clock if wall_clock is not None else clock_module.WallClock()
        self.software = software
        self.capabilities = capabilities if capabilities is not None else ["telemetry", "commands",
                                                                          "state"]
        self.max_in_flight = max_in_flight
        self.batch_readings = batch_readings
        # None: resend only on a new session (the behaviour before ack timeouts existed).
        if ack_timeout_ms is not None and (type(ack_timeout_ms) is not int
                                           or ack_timeout_ms < 1):
            raise ValueError("ack_timeout_ms must be None or a positive int")
        self.ack_timeout_ms = ack_timeout_ms
        self.handlers = {}
        self.desired_state_handler = None
        self.desired_state = None
        self.session = None
        self.established = False
        self.close_event = None
        self.session_id = None
        self.in_flight = []  # msg_ids sent on this session, oldest first
        self._ack_waits = {}  # msg_id -> [resend deadline ms, resends so far], this session
        self.resends = 0  # messages sent again on the same session after an ack timeout
        self.acked_batches = 0
        self.handler_errors = 0
        self.last_handler_error = None
        self._pending_results = []
        self._state = None  # [msg_id, state, sent_on_this_session]
        self._outbox = bytearray()

    # -- connection lifecycle --------------------------------------------------------------

    def begin(self, framer, now_ms, handshake_timeout_ms=10000):
        """Start a new session on a fresh link; return the bytes of the Hello."""
        self.session = DeviceSession(now_ms, framer, handshake_timeout_ms=handshake_timeout_ms)
        self.established = False
        self.close_event = None
        self.in_flight = []
        self._ack_waits = {}
        if self._state is not None:
            self._state[2] = False
        return self.session.start(self.device_id, now_ms, self.capabilities, self.software)

    def link_lost(self, now_ms):
        """The transport failed or closed: record the session as lost (no bytes to send)."""
        if self.session is not None and self.close_event is None:
            self.receive(b"", now_ms)
        self.established = False

    def close(self, reason=r.CLOSE_NORMAL, detail="", now_ms=None):
        """Return the bytes of our Close (b"" if there is no open session)."""
        if self.session is None:
            return b""
        data = self.session.close(reason, detail, None, now_ms)
        if self.session.close_event is not None and self.close_event is None:
            self.close_event = self.session.close_event
        self.established = False
        return data

    # -- input -----------------------------------------------------------------------------

    def receive(self, data, now_ms):
        """Feed bytes from the hub; returns the session events they completed (already
        handled). Peer garbage closes the session (its Close waits in ``data_to_send``)."""
        try:
            events = self.session.receive_data(data, now_ms)
        except ProtocolError as error:
            events = getattr(error, "events", [])
        for event in events:
            self._handle(event, now_ms)
        return events

    def handle_timer(self, now_ms):
        """Run the due timers: the session's (keep-alive Ping, timeouts) and ack timeouts
        (the resent messages wait in ``data_to_send``)."""
        if self.session is None:
            return []
        events = self.session.handle_timer(now_ms)
        for event in events:
            self._handle(event, now_ms)
        if self.established:
            self._resend_due(now_ms)
        return events

    def next_timer(self):
        """When ``handle_timer`` must next run (ms), or None."""
        if self.session is None:
            return None
        timer = self.session.get_timer()
        if self.established:
            for wait in self._ack_waits.values():
                if timer is None or wait[0] < timer:
                    timer = wait[0]
        return timer

    def _ack_wait_ms(self, resends):
        """How long to wait for an Ack after a message's first send (``resends`` 0) or its
        n-th resend: ``ack_timeout_ms`` doubled n times, capped."""
        cap = max(MAX_ACK_TIMEOUT_MS, self.ack_timeout_ms)
        wait = self.ack_timeout_ms
        while resends > 0 and wait < cap:
            wait *= 2
            resends -= 1
        return min(wait, cap)

    def _await_ack(self, msg_id, now_ms, resends=0):
        if self.ack_timeout_ms is not None:
            self._ack_waits[msg_id] = [now_ms + self._ack_wait_ms(resends), resends]

    def _resend_due(self, now_ms):
        # Same msg_id, same readings: the hub stores a repeated id once and acks it again.
        for msg_id in list(self.in_flight):
            wait = self._ack_waits.get(msg_id)
            if wait is None or wait[0] > now_ms:
                continue
            readings = self.queue.batch(msg_id, self._resolve_time)
            if readings is None:  # the queue bound dropped it while it was in flight
                self.in_flight.remove(msg_id)
                del self._ack_waits[msg_id]
                continue
            self._outbox.extend(self.session.send(m.Telemetry(msg_id=msg_id, readings=readings),
                                                  now_ms))
            self._await_ack(msg_id, now_ms, wait[1] + 1)
            self.resends += 1
        state = self._state
        if state is not None and state[2]:
            wait = self._ack_waits.get(state[0])
            if wait is not None and wait[0] <= now_ms:
                self._outbox.extend(self.session.send(m.ReportedState(msg_id=state[0],
                                                                      state=state[1]), now_ms))
                self._await_ack(state[0], now_ms, wait[1] + 1)
                self.resends += 1

    def _handle(self, event, now_ms):
        if isinstance(event, ChallengeReceived):
            token = self.signer.sign(self.device_id, event.message)
            self._outbox.extend(self.session.authenticate(token, now_ms))
        elif isinstance(event, SessionEstablished):
            self.established = True
            self.session_id = event.message.session_id
            self.wall.sync(event.message.hub_time_ms, now_ms)
        elif isinstance(event, SessionClosed):
            self.established = False
            if self.close_event is None:
                self.close_event = event
        elif isinstance(event, MessageReceived):
            self._handle_message(event.message, now_ms)

    def _handle_message(self, message, now_ms):
        if message.TYPE == m.ACK:
            # A repeated Ack (the original and a resend were both answered) finds nothing
            # left to clear and is ignored.
            self._ack_waits.pop(message.msg_id, None)
            if message.msg_id in self.in_flight:
                self.in_flight.remove(message.msg_id)
                if self.queue.ack(message.msg_id):
                    self.acked_batches += 1
            elif self._state is not None and self._state[0] == message.msg_id:
                self._state = None
        elif message.TYPE == m.COMMAND:
            result = self.dispatch(message, now_ms)
            if result is not None:
                self._pending_results.append(result)
        elif message.TYPE == m.DESIRED_STATE:
            self.desired_state = message.state
            if self.desired_state_handler is not None:
                try:
                    self.desired_state_handler(message.state)
                except Exception as error:  # a firmware bug must not take the link down
                    self._note_handler_error("desired-state handler", error)

    def dispatch(self, command, now_ms):
        """Run the handler for ``command``; return its CommandResult (an error result for an
        unknown name, an expired command or a handler that raised)."""
        handler = self.handlers.get(command.name)
        if handler is None:
            return m.CommandResult(command_id=command.command_id, ok=False,
                                   error=_clip("unknown command: %s" % command.name))
        wall_now = self.wall.from_monotonic(now_ms)
        if command.expires_ms is not None and wall_now is not None and wall_now > command.expires_ms:
            return m.CommandResult(command_id=command.command_id, ok=False,
                                   error="command expired before it reached the device")
        args = command.args if command.args is not None else {}
        try:
            result = handler(args)
        except Exception as error:
            self._note_handler_error("command %s" % command.name, error)
            return m.CommandResult(command_id=command.command_id, ok=False,
                                   error=_clip("%s: %s" % (type(error).__name__, error)))
        return m.CommandResult(command_id=command.command_id, ok=True, result=result)

    def command_done(self, result):
        """Queue a CommandResult made outside ``dispatch`` (an async handler finished)."""
        self._pending_results.append(result)

    def _note_handler_error(self, where, error):
        self.handler_errors += 1
        self.last_handler_error = "%s: %s: %s" % (where, type(error).__name__, error)

    # -- output ----------------------------------------------------------------------------

    def report_state(self, state):
        """Remember ``state`` to report (the latest wins); returns its msg_id."""
        msg_id = self.queue.allocate_msg_id()
        if self._state is not None:
            self._ack_waits.pop(self._state[0], None)  # superseded: never resent
        self._state = [msg_id, state, False]
        return msg_id

    @property
    def state_pending(self):
        """True while a reported state awaits the hub's Ack."""
        return self._state is not None

    def data_to_send(self, now_ms):
        """Return every byte due now: the session's own output, command results, reported
        state, re-sent and new telemetry batches (window permitting)."""
        if self.session is None:
            return b""
        out = self._outbox
        self._outbox = bytearray()
        out.extend(self.session.data_to_send())
        if self.established:
            while self._pending_results:
                result = self._pending_results.pop(0)
                out.extend(self._send_result(result, now_ms))
            if self._state is not None and not self._state[2]:
                out.extend(self.session.send(m.ReportedState(msg_id=self._state[0],
                                                             state=self._state[1]), now_ms))
                self._state[2] = True
                self._await_ack(self._state[0], now_ms)
            self._fill_window(out, now_ms)
        return bytes(out)

    def _send_result(self, result, now_ms):
        try:
            return self.session.send(result, now_ms)
        except LocalProtocolError as error:  # the handler returned what the wire cannot carry
            return self.session.send(m.CommandResult(
                command_id=result.command_id, ok=False,
                error=_clip("result cannot be sent: %s" % error)), now_ms)

    def _fill_window(self, out, now_ms):
        # First the batches sealed before (this session's resends), in order, then new ones.
        for msg_id in self.queue.sealed_ids():
            if len(self.in_flight) >= self.max_in_flight:
                return
            if msg_id in self.in_flight:
                continue
            readings = self.queue.batch(msg_id, self._resolve_time)
            out.extend(self.session.send(m.Telemetry(msg_id=msg_id, readings=readings), now_ms))
            self.in_flight.append(msg_id)
            self._await_ack(msg_id, now_ms)
        budget = self.session.peer_max_frame_size // 2
        while len(self.in_flight) < self.max_in_flight and self.queue.unsealed_count:
            sealed = self.queue.seal(self._resolve_time, self.batch_readings, budget,
                                     self.wall.from_monotonic(now_ms), now_ms)
            if sealed is None:
                return
            msg_id, readings = sealed
            out.extend(self.session.send(m.Telemetry(msg_id=msg_id, readings=readings), now_ms))
            self.in_flight.append(msg_id)
            self._await_ack(msg_id, now_ms)

    def _resolve_time(self, monotonic_ms, this_boot):
        if this_boot:
            return self.wall.from_monotonic(monotonic_ms)
        # Written in an earlier boot before the time was known: stamp it with this boot's
        # start, the latest moment it can have been read (docs/device-sdk.md, "Timestamps").
        return self.wall.from_monotonic(self.queue.opened_monotonic)

    @property
    def idle(self):
        """True when nothing waits: no reading unacknowledged, no state, no command result."""
        return (self.queue.pending_readings == 0 and not self.in_flight
                and self._state is None and not self._pending_results)


def _clip(text):
    return text[:m.MAX_DETAIL_LENGTH]


# -- the blocking client --------------------------------------------------------------------


class Client:
    """The blocking SmartX device client (CPython and MicroPython): see the module docs."""

    def __init__(self, credentials, queue_path="smartx-queue.log", private_key_path=None,
                 host=None, port=None, discover=False, transport_factory=None, queue_options=None,
                 backoff=None, monotonic=None, sleep=None, keepalive_ms=None,
                 handshake_timeout_ms=10000, connect_timeout_ms=10000,
                 max_in_flight=DEFAULT_MAX_IN_FLIGHT, software=SOFTWARE, log=None,
                 discovery_interfaces=None, discovery_timeout_ms=5000,
                 ack_timeout_ms=DEFAULT_ACK_TIMEOUT_MS):
        if isinstance(credentials, str):
            from smartx_device.credentials import load_credentials

            credentials = load_credentials(credentials, private_key_path)
        self.credentials = credentials
        self.device_id = credentials.device_id
        self.host = host or credentials.hub_host
        self.port = port or credentials.hub_port
        self.discover = discover or not self.host
        self.discovery_interfaces = discovery_interfaces
        self.discovery_timeout_ms = discovery_timeout_ms
        self.connect_timeout_ms = connect_timeout_ms
        self.handshake_timeout_ms = handshake_timeout_ms
        self._monotonic = monotonic or clock_module.monotonic_ms
        self._sleep = sleep or clock_module.sleep_ms
        self._log = log
        self._transport_factory = transport_factory
        self.backoff = backoff or backoff_module.Backoff()
        signer = Signer(credentials.auth, credentials.secret, credentials.private_key_pem)
        options = dict(queue_options or {})
        options.setdefault("monotonic_now", self._monotonic())
        self.queue = OfflineQueue(queue_path, **options)
        self.core = ClientCore(self.device_id, signer, self.queue,
                               clock_module.WallClock(self._monotonic), software,
                               max_in_flight=max_in_flight, ack_timeout_ms=ack_timeout_ms)
        self._transport = None
        self._want_connected = False
        self._reconnect_at = None
        self.last_error = None
        self.connections = 0
        self.closed = False

    @classmethod
    def from_bundle(cls, path, queue_path="smartx-queue.log", private_key_path=None, **options):
        """Load the credentials bundle at ``path`` and build a client (see ``__init__``)."""
        from smartx_device.credentials import load_credentials

        return cls(load_credentials(path, private_key_path), queue_path, **options)

    # -- registration ----------------------------------------------------------------------

    def command(self, name):
        """Decorator: ``@client.command("blink")`` registers ``fn(args) -> result``."""
        def register(handler):
            self.core.handlers[name] = handler
            return handler
        return register

    def on_command(self, name, handler):
        """Register ``handler(args) -> result`` for the command ``name``."""
        self.core.handlers[name] = handler

    def on_desired_state(self, handler):
        """Register ``handler(state)`` for the hub's desired-state changes."""
        self.core.desired_state_handler = handler
        return handler

    # -- connecting ------------------------------------------------------------------------

    @property
    def connected(self):
        """True while a verified session is up."""
        return self._transport is not None and self.core.established

    def _say(self, text):
        if self._log is not None:
            self._log(text)

    def _open_transport(self):
        from smartx_device import transport as t

        try:
            if self._transport_factory is not None:
                return self._transport_factory()
            host, port = self.host, self.port
            if self.discover:
                from smartx_device.discovery import discover_hub

                found = discover_hub(self.credentials.hub_id, self.discovery_timeout_ms,
                                     self.discovery_interfaces)
                if found is None:
                    raise HubUnreachableError("no hub with id %s answered on the local network"
                                              % self.credentials.hub_id)
                host, port = found.host, found.port
                self._say("discovered hub %s at %s:%d" % (self.credentials.hub_id, host, port))
            return t.connect_tls(host, port, self.credentials.ca_pem,
                                 self.credentials.server_name or host, self.connect_timeout_ms,
                                 self.credentials.ca_der)
        except t.CertificateError as error:
            raise CAMismatchError(str(error))
        except t.TransportError as error:
            raise HubUnreachableError(str(error))

    def connect(self):
        """Open a verified session now (one attempt); raises a ClientError saying why not.
        After a failure that waiting can fix, ``loop`` retries on its own with back-off."""
        if self.closed:
            raise ConnectionLostError("the client is closed")
        self._drop_transport()
        self._want_connected = True
        try:
            self._transport = self._open_transport()
            self._handshake(self._transport)
        except ClientError as error:
            self._drop_transport()
            self.last_error = error
            if not isinstance(error, FATAL_ERRORS):
                delay = self.backoff.next_delay(error.retry_after_ms)
                self._reconnect_at = self._monotonic() + delay
                self._say("connect failed (%s); retrying in %d ms" % (error, delay))
            raise
        except Exception:
            self._drop_transport()
            raise
        self.connections += 1
        self.backoff.reset()
        self.last_error = None
        self._reconnect_at = None
        self._say("connected")
        self._pump_out()

    def _handshake(self, transport):
        from smartx_device.transport import TransportError

        now = self._monotonic()
        framer = transport.make_framer(DEFAULT_MAX_FRAME_SIZE)
        try:
            transport.send(self.core.begin(framer, now, self.handshake_timeout_ms))
            while not self.core.established:
                if self.core.close_event is not None:
                    self._send_quietly(transport)
                    raise error_for_close(self.core.close_event)
                now = self._monotonic()
                deadline = self.core.next_timer()
                wait = 100 if deadline is None else max(0, min(deadline - now, 1000))
                data = transport.recv(RECV_SIZE, wait)
                now = self._monotonic()
                if data is not None:
                    self.core.receive(data, now)
                self.core.handle_timer(self._monotonic())
                out = self.core.data_to_send(now)
                if out:
                    transport.send(out)
        except TransportError as error:
            close = self.core.close_event
            if close is not None and close.by_peer:
                raise error_for_close(close)
            raise HubUnreachableError("the link failed during the handshake: %s" % error)
        if self.core.close_event is not None:
            raise error_for_close(self.core.close_event)

    def _send_quietly(self, transport):
        try:
            out = self.core.data_to_send(self._monotonic())
            if out:
                transport.send(out)
        except Exception:  # the link is going anyway
            pass

    def _drop_transport(self):
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    def _lost(self, error):
        """The session ended: close the link and schedule a reconnect."""
        self.core.link_lost(self._monotonic())
        self._drop_transport()
        self.last_error = error
        delay = self.backoff.next_delay(getattr(error, "retry_after_ms", None))
        self._reconnect_at = self._monotonic() + delay
        self._say("connection lost (%s); retrying in %d ms" % (error, delay))

    # -- publishing ------------------------------------------------------------------------

    def publish(self, stream, value, ts_ms=None):
        """Store a reading on flash and return its queue sequence number; it is sent (batched)
        as the loop runs. ``ts_ms`` defaults to now (hub-synchronised Unix ms)."""
        now = self._monotonic()
        if ts_ms is None:
            ts_ms = self.core.wall.from_monotonic(now)
        seq = self.queue.append(stream, value, ts_ms, now)
        return seq

    def report_state(self, state):
        """Report the device's state (a dict); the latest report is sent, acknowledged by the
        hub. Returns its msg_id."""
        return self.core.report_state(state)

    # -- the loop --------------------------------------------------------------------------

    def _pump_out(self):
        from smartx_device.transport import TransportError

        if self._transport is None:
            return
        try:
            out = self.core.data_to_send(self._monotonic())
            if out:
                self._transport.send(out)
        except TransportError as error:
            self._lost(ConnectionLostError("send failed: %s" % error))

    def _try_reconnect(self):
        try:
            self.connect()
        except FATAL_ERRORS:
            raise
        except ClientError:
            pass  # connect() scheduled the next attempt

    def loop(self, timeout_ms=0):
        """Pump I/O for up to ``timeout_ms``: send batches, process acks and commands, keep the
        link alive, reconnect with back-off. Raises only errors that retrying cannot fix."""
        from smartx_device.transport import TransportError

        if self.closed:
            raise ConnectionLostError("the client is closed")
        deadline = self._monotonic() + timeout_ms
        first = True
        while first or self._monotonic() < deadline:
            first = False
            now = self._monotonic()
            if self._transport is None:
                if self._want_connected and (self._reconnect_at is None or now >= self._reconnect_at):
                    self._try_reconnect()
                    continue
                wait = deadline - now
                if self._want_connected and self._reconnect_at is not None:
                    wait = min(wait, self._reconnect_at - now)
                self._sleep(max(0, wait))
                continue
            self._pump_out()
            if self._transport is None:
                continue
            timer = self.core.next_timer()
            wait = deadline - now
            if timer is not None:
                wait = min(wait, timer - now)
            try:
                data = self._transport.recv(RECV_SIZE, max(0, wait))
            except TransportError as error:
                self._lost(ConnectionLostError("receive failed: %s" % error))
                continue
            now = self._monotonic()
            if data is not None:
                self.core.receive(data, now)
            self.core.handle_timer(now)
            self._pump_out()
            if self.core.close_event is not None and self._transport is not None:
                self._lost(error_for_close(self.core.close_event))
                if isinstance(self.last_error, FATAL_ERRORS):
                    raise self.last_error

    def flush(self, timeout_ms=10000):
        """Run the loop until every queued reading and the reported state are acknowledged;
        return True if that happened within ``timeout_ms``."""
        deadline = self._monotonic() + timeout_ms
        while not self.core.idle:
            remaining = deadline - self._monotonic()
            if remaining <= 0:
                return False
            self.loop(min(remaining, 50))
        return True

    def run_forever(self):
        """Loop for ever (reconnecting as needed); returns only by raising a fatal error."""
        self._want_connected = True
        while not self.closed:
            self.loop(1000)

    def close(self):
        """Say goodbye to the hub (if connected), close the link and the queue file."""
        if self.closed:
            return
        if self._transport is not None:
            try:
                data = self.core.close(r.CLOSE_NORMAL, "device closing", self._monotonic())
                if data:
                    self._transport.send(data)
            except Exception:  # best effort: the link may already be gone
                pass
        self._drop_transport()
        self._want_connected = False
        self.queue.close()
        self.closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()
        return False
