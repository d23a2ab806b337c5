"""The device listener: TLS on asyncio, the protocol core for the wire, one small object a session.

Rules (docs/operations.md, "Device listener"):
- The wire is ``smartx_device.session.HubSession``; this file only moves bytes and acts on the
  events the core reports. It never frames or encodes a message itself.
- TLS without asyncio's SSL transport: that transport keeps a 256 KiB buffer per connection
  (about 281 KB an idle session). Each connection here is a plain ``asyncio.Protocol`` holding an
  ``ssl.SSLObject`` over two ``ssl.MemoryBIO`` (OpenSSL releases its record buffers when idle),
  and the listener pumps handshake, reads and writes itself. Plaintext is read into one buffer
  shared by every connection: the loop runs one callback at a time.
- One timer a connection, armed lazily: it fires at the earliest deadline it was armed for, then
  re-arms at whatever is due next (TLS handshake, first frame, the core's handshake, keep-alive
  and idle deadlines). Traffic never touches the timer heap.
- Flood limits (smartx_hub/limits.py) are applied at accept (caps, connection rate, back-off),
  from the frame header (size), per frame (device message rate) and per write (a peer that does
  not read is dropped). A limit never blocks the loop: a slow or hostile peer costs only its
  own connection.
- Store calls run on worker threads: verification (device lookup and signature) on a small
  pool, every write on one writer thread so writes stay in order; results come back to the
  loop, which alone touches connection state.
- Telemetry is acknowledged only after ``IngestCommitter`` reports its commit. The Acks one
  commit releases for one connection go out together, one turn of the loop later: one TLS record
  and one ``transport.write`` for all of them, not one each (at one reading a message, Acks
  written one by one took nearly half of the loop's busy time: docs/performance.md).
- Gateways (docs/security.md, "Gateways"; helpers in smartx_hub/gateway_pki.py): given the hub
  CA (``client_ca_pem``), the port asks for, but does not require, a client certificate. A
  connection that presents a gateway certificate relays for boards: each board's Hello is
  accepted only if the gateway's record is enabled and the board is assigned to it
  (``gateway_refusal``, ``relay_refusal``), else Close ``not_authorised`` before any challenge;
  the board then answers the challenge with its own JWT, checked as for any device, and the
  path is checked again with the record verification returns. A direct connection (no
  certificate) may not carry a board assigned to a gateway. Route refusals do not count as
  auth failures of the address (a gateway's boards share it; the certificate names the
  culprit). The registry poll re-checks the path of every relayed session (a gateway disabled
  or a board moved ends it with ``not_authorised``).
- Nothing here logs a token, a secret or a payload.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import os
import secrets
import ssl
import time
from typing import Any, Callable, Optional

from smartx_device import messages as m
from smartx_device import session as core
from smartx_device.errors import LocalProtocolError, RemoteProtocolError
from smartx_device.framing import StreamFramer
from smartx_device.reasons import (CLOSE_DEVICE_DISABLED, CLOSE_HANDSHAKE_TIMEOUT,
                                   CLOSE_INTERNAL_ERROR, CLOSE_NORMAL, CLOSE_NOT_AUTHORISED,
                                   CLOSE_RATE_LIMITED, CLOSE_REPLACED, CLOSE_SHUTTING_DOWN,
                                   CLOSE_UNKNOWN_DEVICE, reason_name)
from smartx_hub.gateway_pki import (GatewayCertError, enable_gateway_client_certs,
                                    gateway_id_from_cert, gateway_refusal, relay_refusal)
from smartx_hub.ingest import IngestCommitter
from smartx_hub.limits import ConnectionGate, DeviceRates, ListenerLimits
from smartx_hub.live import LiveSessions
from smartx_hub.store import Device, Store, TelemetryBatch
from smartx_hub.verify import DeviceVerifier, VerificationError

log = logging.getLogger(__name__)

NONCE_SIZE = 32
#: Plaintext read per ``SSLObject.read`` call (the largest TLS record is 16 KiB).
READ_CHUNK = 65536
#: The shortest retry-after the hub sends with CLOSE_RATE_LIMITED: a reconnect costs a full
#: TLS and device handshake, so telling a device to come back in 3 ms helps nobody.
MIN_RETRY_AFTER_MS = 1000
#: Retry-after sent when the store failed to commit (CLOSE_INTERNAL_ERROR).
STORE_RETRY_AFTER_MS = 5000
#: How long ``stop`` waits for sessions to take their Close before dropping them.
STOP_DRAIN_S = 2.0
HOUSEKEEPING_S = 0.5
#: What a device refused for its path is told (the log says which rule).
NOT_AUTHORISED_DETAIL = "not authorised on this path"


def wall_clock_ms() -> int:
    """Milliseconds since the Unix epoch: the hub's time, sent to devices in the challenge."""
    return time.time_ns() // 1_000_000


class RouteRefused(VerificationError):
    """The board may not hold a session on this connection (its gateway, or the lack of one):
    not an authentication failure, so the address is not backed off for it."""

    def __init__(self, cause: str) -> None:
        super().__init__(CLOSE_NOT_AUTHORISED, NOT_AUTHORISED_DETAIL, cause)


def route_refusal(store: Store, device: Optional[Device], via_gateway_id: Optional[str],
                  gateway_problem: Optional[str] = None) -> Optional[str]:
    """Why ``device`` may not hold a session on a connection through ``via_gateway_id`` (None:
    a direct connection), or None. Looks the gateway's record up (store work: a worker thread)."""
    if gateway_problem is not None:
        return gateway_problem
    if via_gateway_id is not None:
        refusal = gateway_refusal(via_gateway_id, store.get_device(via_gateway_id))
        if refusal is not None:
            return refusal
    if device is None:
        return None  # an unknown device is refused as such by verification
    return relay_refusal(device, via_gateway_id)


class _CountingFramer(StreamFramer):
    """The core's stream framer, counting the frames it completes (for the message rate).

    Counting here, not by events, also meters Pings, which the core answers on its own."""

    def __init__(self, max_frame_size: int) -> None:
        super().__init__(max_frame_size)
        self.frames = 0

    def feed(self, data):
        """``StreamFramer.feed``, counting the frames returned."""
        items = super().feed(data)
        self.frames += len(items)
        return items


class DeviceConnection(asyncio.Protocol):
    """One device connection: TLS pump, the core session, timers, and its share of limits.

    Also the ``SessionHandle`` (smartx_hub/live.py) of a verified session."""

    __slots__ = ("listener", "loop", "transport", "ip", "admitted", "ssl", "bio_in", "bio_out",
                 "tls_done", "session", "framer", "device_id", "nonce", "verified", "closing",
                 "timer", "timer_at", "tls_deadline", "first_frame_deadline", "inflight",
                 "paused", "last_touch_ms", "desired_sent", "waking", "wake_again",
                 "devices_version", "gateway_id", "gateway_problem", "acks")

    def __init__(self, listener: "DeviceListener") -> None:
        self.listener = listener
        self.loop = listener.loop
        self.transport: Optional[asyncio.Transport] = None
        self.ip = ""
        self.admitted = False
        self.ssl: Optional[ssl.SSLObject] = None
        self.bio_in: Optional[ssl.MemoryBIO] = None
        self.bio_out: Optional[ssl.MemoryBIO] = None
        self.tls_done = False
        self.session: Optional[core.HubSession] = None
        self.framer: Optional[_CountingFramer] = None
        self.device_id: Optional[str] = None
        self.nonce: Optional[bytes] = None
        self.verified = False
        self.closing = False
        self.timer: Optional[asyncio.TimerHandle] = None
        self.timer_at = 0
        self.tls_deadline = 0
        self.first_frame_deadline = 0
        self.inflight = 0
        self.paused = False
        self.last_touch_ms = 0
        self.desired_sent = 0
        self.waking = False
        self.wake_again = False
        self.devices_version = None
        self.gateway_id: Optional[str] = None  # the gateway whose certificate this connection shows
        self.gateway_problem: Optional[str] = None  # a certificate that names no valid gateway
        self.acks: Optional[list] = None  # msg ids committed and not yet acknowledged

    # -- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Admit (or drop) the connection; start TLS or, in plaintext mode, the session."""
        listener = self.listener
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.ip = peer[0] if isinstance(peer, tuple) and peer else "unknown"
        now = listener.clock()
        refusal = listener.gate.admit(self.ip, now) if not listener.stopping else "stopping"
        if refusal is not None:
            listener.count("refused_" + refusal)
            log.debug("refused a connection from %s: %s", self.ip, refusal)
            self.closing = True
            transport.abort()
            return
        self.admitted = True
        listener.connections.add(self)
        listener.count("connections")
        if listener.tls_context is not None:
            self.bio_in = ssl.MemoryBIO()
            self.bio_out = ssl.MemoryBIO()
            self.ssl = listener.tls_context.wrap_bio(self.bio_in, self.bio_out, server_side=True)
            self.tls_deadline = now + listener.limits.tls_handshake_timeout_ms
            self._arm(now)
        else:
            self._start_session(now)

    def data_received(self, data: bytes) -> None:
        """Pump received bytes through TLS into the session."""
        if self.closing:
            return
        try:
            if self.ssl is None:
                self._feed(data)
                return
            self.bio_in.write(data)
            if not self.tls_done and not self._tls_handshake():
                return
            self._read_plaintext()
        except Exception:  # noqa: BLE001 - a bug must cost one connection, not the listener
            log.exception("device connection from %s failed", self.ip)
            self.close(CLOSE_INTERNAL_ERROR, "internal error")

    def eof_received(self) -> bool:
        """The device closed its side: end the session; the transport then closes."""
        if not self.closing and self.session is not None:
            try:
                self._feed(b"")
            except Exception:  # noqa: BLE001
                log.exception("device connection from %s failed at end of stream", self.ip)
        return False  # close the transport

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        """Give back the connection's share of the limits and its live-session entry."""
        listener = self.listener
        self.closing = True
        self._cancel_timer()
        if not self.admitted:
            return
        self.admitted = False
        listener.connections.discard(self)
        listener.gate.release(self.ip, self.verified)
        if self.verified:
            listener.live.unregister(self)
            listener.on_session_ended(self)
        self.ssl = self.bio_in = self.bio_out = None
        self.transport = None

    def pause_writing(self) -> None:
        """Nothing to pause: the write-buffer limit is enforced on every write instead."""

    def resume_writing(self) -> None:
        """See ``pause_writing``."""

    # -- TLS pump -------------------------------------------------------------------------

    def _tls_handshake(self) -> bool:
        try:
            self.ssl.do_handshake()
        except ssl.SSLWantReadError:
            self._flush_tls()
            return False
        except (ssl.SSLError, ValueError) as exc:
            # A TLS 1.1 client, a CBC-only client, or garbage: OpenSSL has queued an alert.
            self.listener.count("tls_failures")
            log.debug("TLS handshake with %s failed: %s", self.ip,
                      getattr(exc, "reason", None) or exc)
            self._flush_tls()
            self._drop()
            return False
        self._flush_tls()
        self.tls_done = True
        self.tls_deadline = 0
        self.listener.count("tls_handshakes")
        self._read_client_certificate()
        self._start_session(self.listener.clock())
        return True

    def _read_client_certificate(self) -> None:
        """A gateway's connection: note which gateway (OpenSSL has verified the chain)."""
        listener = self.listener
        if listener.client_ca_pem is None:
            return
        der = self.ssl.getpeercert(binary_form=True)
        if not der:
            return  # a direct connection
        try:
            self.gateway_id = gateway_id_from_cert(der, listener.client_ca_pem)
            listener.count("gateway_connections")
        except GatewayCertError as exc:
            self.gateway_problem = str(exc)

    def _read_plaintext(self) -> None:
        buffer = self.listener.read_view
        chunks = []
        ended = False
        sslobj = self.ssl
        while True:
            try:
                count = sslobj.read(READ_CHUNK, buffer)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                ended = True  # the device sent close_notify
                break
            except ssl.SSLError as exc:
                log.debug("TLS error from %s: %s", self.ip, getattr(exc, "reason", None) or exc)
                self._flush_tls()
                self._drop()
                return
            if not count:
                ended = True
                break
            chunks.append(bytes(buffer[:count]))
        self._flush_tls()  # OpenSSL may answer on its own (TLS 1.3 key update)
        if chunks:
            self._feed(chunks[0] if len(chunks) == 1 else b"".join(chunks))
        if ended and not self.closing:
            self._feed(b"")

    def _flush_tls(self) -> None:
        bio_out = self.bio_out
        if bio_out is not None and bio_out.pending:
            self._transport_write(bio_out.read())

    def _transport_write(self, data: bytes) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        transport.write(data)
        if transport.get_write_buffer_size() > self.listener.limits.max_write_buffer:
            # The device does not read what we send: drop it before it costs more memory.
            self.listener.count("dropped_slow_readers")
            log.info("dropped %s (%s): it does not read what the hub sends",
                     self.device_id or "unverified device", self.ip)
            self._drop()

    def _write(self, data: bytes) -> None:
        if not data or self.transport is None:
            return
        if self.ssl is None:
            self._transport_write(data)
            return
        try:
            self.ssl.write(data)
        except ssl.SSLError as exc:
            log.debug("TLS write to %s failed: %s", self.ip, exc)
            self._drop()
            return
        self._flush_tls()

    # -- the session ----------------------------------------------------------------------

    def _start_session(self, now: int) -> None:
        limits = self.listener.limits
        self.framer = _CountingFramer(limits.max_frame_size)
        self.session = core.HubSession(now, self.framer, keepalive_ms=limits.keepalive_ms,
                                       handshake_timeout_ms=limits.auth_timeout_ms,
                                       max_frame_size=limits.max_frame_size)
        self.first_frame_deadline = now + limits.first_frame_timeout_ms
        self._arm(now)

    def _feed(self, data: bytes) -> None:
        session = self.session
        if session is None or self.closing:
            return
        now = self.listener.clock()
        failed = False
        try:
            events = session.receive_data(data, now)
        except RemoteProtocolError as exc:
            events = getattr(exc, "events", [])
            failed = True
            self.listener.count("protocol_errors")
            log.info("closing %s (%s): %s", self.device_id or "unverified device", self.ip, exc)
        framer = self.framer
        frames, framer.frames = framer.frames, 0
        if self.verified and frames and not failed:
            wait = self.listener.rates.take(self.device_id, now, frames)
            if wait:
                self.listener.count("rate_limited")
                log.info("device %s (%s) over its message rate", self.device_id, self.ip)
                self._write(session.data_to_send())
                self.close(CLOSE_RATE_LIMITED, "message rate exceeded",
                           retry_after_ms=max(wait, MIN_RETRY_AFTER_MS))
                return
        self._write(session.data_to_send())
        for event in events:
            if self.closing:
                break
            self._on_event(event, now)
        if session.state == core.CLOSED:
            self._finish()
        else:
            self._arm(now)  # a new phase may bring its deadline forward

    def _on_event(self, event: Any, now: int) -> None:
        kind = type(event)
        if kind is core.MessageReceived:
            if self.session.state == core.ESTABLISHED:
                self._on_message(event.message, now)
        elif kind is core.HelloReceived:
            self.first_frame_deadline = 0
            if self.session.state != core.HELLO_RECEIVED:
                return  # the core refused the version and queued a Close
            self.device_id = event.message.device_id
            if self.gateway_id is not None or self.gateway_problem is not None:
                self._check_route_then_challenge()
            else:
                self._challenge(now)
        elif kind is core.AuthResponseReceived:
            self._start_verification(event.message.token, now)
        elif kind is core.SessionClosed:
            if event.by_peer:
                log.debug("%s (%s) closed its session: %s", self.device_id or "unverified device",
                          self.ip, reason_name(event.reason))
            elif event.reason != CLOSE_NORMAL:
                log.info("closed %s (%s): %s", self.device_id or "unverified device", self.ip,
                         reason_name(event.reason))
        # PongReceived needs nothing: hearing from the device already moved its idle deadline.

    def _challenge(self, now: int) -> None:
        self.nonce = os.urandom(NONCE_SIZE)
        self._write(self.session.challenge(self.nonce, self.listener.hub_id, now))

    def _check_route_then_challenge(self) -> None:
        """A relayed Hello: may this gateway carry this board? Checked before any challenge."""
        listener = self.listener
        future = self.loop.run_in_executor(listener.verify_executor, listener.check_route,
                                           self.device_id, self.gateway_id, self.gateway_problem)
        future.add_done_callback(self._route_checked)

    def _route_checked(self, future: asyncio.Future) -> None:
        if future.cancelled():
            self.close(CLOSE_SHUTTING_DOWN, "hub shutting down")
            return
        if self.closing or self.session is None or self.session.state != core.HELLO_RECEIVED:
            future.exception()  # retrieved, so asyncio does not warn about it
            return
        try:
            refusal = future.result()
        except Exception:  # noqa: BLE001 - store failure
            log.exception("checking the path of device %s failed", self.device_id)
            self.close(CLOSE_INTERNAL_ERROR, "verification failed", STORE_RETRY_AFTER_MS)
            return
        if refusal is not None:
            self._refuse_route(refusal)
            return
        now = self.listener.clock()
        self._challenge(now)
        self._arm(now)

    def _refuse_route(self, cause: str) -> None:
        self.listener.count("route_refusals")
        log.info("refused device %s from %s%s: %s", self.device_id, self.ip,
                 " via gateway %s" % self.gateway_id if self.gateway_id else "", cause)
        self.close(CLOSE_NOT_AUTHORISED, NOT_AUTHORISED_DETAIL)

    def _send(self, message: m.Message) -> bool:
        session = self.session
        if self.closing or session is None or session.state != core.ESTABLISHED:
            return False
        try:
            data = session.send(message, self.listener.clock())
        except LocalProtocolError as exc:
            log.warning("cannot send %s to %s: %s", type(message).__name__, self.device_id, exc)
            return False
        self._write(data)
        return not self.closing

    def close(self, reason: int, detail: str = "", retry_after_ms: Optional[int] = None) -> None:
        """Send Close with ``reason`` (if the session can still carry one) and end the
        connection. Safe to call at any time, any number of times."""
        if self.closing or self.transport is None:
            return
        if self.acks:
            self._flush_acks()  # committed before the Close: say so first
        session = self.session
        if session is not None and session.state != core.CLOSED and (self.ssl is None
                                                                     or self.tls_done):
            try:
                self._write(session.close(reason, detail, retry_after_ms, self.listener.clock()))
            except LocalProtocolError:
                pass
        self._finish()

    def _finish(self) -> None:
        """The session is over: say goodbye to TLS, close the socket once its data is out."""
        if self.closing:
            return
        self.closing = True
        self._cancel_timer()
        if self.verified:
            self.listener.live.unregister(self)
        if self.ssl is not None and self.tls_done:
            try:
                self.ssl.unwrap()  # queue close_notify; we do not wait for the device's
            except (ssl.SSLError, ValueError):
                pass
            self._flush_tls()
        if self.transport is not None:
            self.transport.close()

    def _drop(self) -> None:
        """End the connection at once, without a goodbye (TLS failure, a peer that won't read)."""
        self.closing = True
        self._cancel_timer()
        if self.verified:
            self.listener.live.unregister(self)
        if self.transport is not None:
            self.transport.abort()

    # -- verification ---------------------------------------------------------------------

    def _start_verification(self, token: str, now: int) -> None:
        listener = self.listener
        nonce, self.nonce = self.nonce, None
        self.devices_version = listener.devices_version
        future = self.loop.run_in_executor(listener.verify_executor, listener.verify_session,
                                           self.device_id, token, nonce, now, self.gateway_id,
                                           self.gateway_problem)
        future.add_done_callback(self._verified)

    def _verified(self, future: asyncio.Future) -> None:
        listener = self.listener
        if future.cancelled():
            self.close(CLOSE_SHUTTING_DOWN, "hub shutting down")
            return
        if self.closing:
            future.exception()  # retrieved, so asyncio does not warn about it
            return
        now = listener.clock()
        try:
            future.result()  # the Device record: nothing more is needed from it
        except RouteRefused as exc:
            self._refuse_route(exc.cause)
            return
        except VerificationError as exc:
            listener.count("auth_failures")
            log.info("refused device %s from %s: %s", self.device_id, self.ip, exc.cause)
            backoff = listener.gate.auth_failed(self.ip, now)
            if backoff:
                listener.on_backoff(self.ip, backoff, self.device_id, now)
            self.close(exc.reason, exc.detail)
            return
        except Exception:  # noqa: BLE001 - store or library failure
            log.exception("verifying device %s failed", self.device_id)
            self.close(CLOSE_INTERNAL_ERROR, "verification failed", STORE_RETRY_AFTER_MS)
            return
        if listener.stopping:
            self.close(CLOSE_SHUTTING_DOWN, "hub shutting down")
            return
        self.verified = True
        listener.gate.verified(self.ip)
        older = listener.live.register(self)
        if older is not None and older is not self:
            log.info("device %s reconnected from %s: replacing its older session",
                     self.device_id, self.ip)
            _call_on_loop(older.loop, older.close, CLOSE_REPLACED, "replaced by a newer session")
        session_id = "ses_" + secrets.token_hex(8)
        self._write(self.session.accept(session_id, now))
        self._arm(now)  # the idle deadline replaces the handshake deadline
        listener.count("sessions")
        log.debug("device %s verified from %s (%s)", self.device_id, self.ip, session_id)
        self.last_touch_ms = now
        listener.touch(self.device_id, now)
        if self.devices_version != listener.devices_version:
            # The registry changed while we verified: the poller may have looked before this
            # session was registered, so look once more.
            listener.recheck(self)
        self.wake()

    # -- steady state ---------------------------------------------------------------------

    def _on_message(self, message: m.Message, now: int) -> None:
        kind = type(message)
        listener = self.listener
        if kind is m.Telemetry:
            batch = TelemetryBatch(self.device_id, message.msg_id, message.readings, now)
            future = listener.ingest.submit(batch)
            self.inflight += 1
            if self.inflight >= listener.limits.max_inflight_batches and not self.paused:
                self.paused = True
                listener.count("backpressure_pauses")
                self.transport.pause_reading()
            future.add_done_callback(functools.partial(self._committed, message.msg_id))
        elif kind is m.ReportedState:
            future = listener.write(listener.store.set_reported_state, self.device_id,
                                    message.state, now)
            future.add_done_callback(functools.partial(self._state_stored, message.msg_id))
        elif kind is m.CommandResult:
            listener.write(listener.store_command_result, self.device_id, message, now)
        else:  # the core lets no other message through in ESTABLISHED
            log.warning("unexpected %s from %s", kind.__name__, self.device_id)

    def _committed(self, msg_id: int, future: asyncio.Future) -> None:
        self.inflight -= 1
        if self.paused and self.inflight <= self.listener.limits.max_inflight_batches // 2:
            self.paused = False
            if self.transport is not None and not self.closing:
                self.transport.resume_reading()
        if future.cancelled():
            return
        error = future.exception()
        if error is not None:
            if not self.closing:
                log.error("telemetry of %s not committed: %s", self.device_id, error)
                self.close(CLOSE_INTERNAL_ERROR, "telemetry not stored", STORE_RETRY_AFTER_MS)
            return
        self._queue_ack(msg_id)

    def _queue_ack(self, msg_id: int) -> None:
        """Acknowledge ``msg_id`` (already committed) with the others of this loop turn."""
        if self.closing:
            return
        acks = self.acks
        if acks is None:
            # A commit resolves all its futures in one loop turn, so by the time this runs
            # every Ack that commit released for this connection is in the list.
            self.acks = [msg_id]
            self.loop.call_soon(self._flush_acks)
        else:
            acks.append(msg_id)

    def _flush_acks(self) -> None:
        """Send the queued Acks: encoded one by one by the core, written as one TLS record."""
        acks, self.acks = self.acks, None
        session = self.session
        if not acks or self.closing or session is None or session.state != core.ESTABLISHED:
            return
        now = self.listener.clock()
        out = []
        try:
            for msg_id in acks:
                out.append(session.send(m.Ack(msg_id=msg_id), now))
        except LocalProtocolError as exc:
            log.warning("cannot send Ack to %s: %s", self.device_id, exc)
        if out:
            self._write(out[0] if len(out) == 1 else b"".join(out))

    def _state_stored(self, msg_id: int, future: asyncio.Future) -> None:
        error = future.exception()
        if error is not None:
            if not self.closing:
                log.error("reported state of %s not stored: %s", self.device_id, error)
                self.close(CLOSE_INTERNAL_ERROR, "state not stored", STORE_RETRY_AFTER_MS)
            return
        self._queue_ack(msg_id)

    def wake(self) -> None:
        """Send what waits for the device: desired state and queued commands."""
        if not self.verified or self.closing:
            return
        if self.waking:
            self.wake_again = True
            return
        self.waking = True
        listener = self.listener
        future = listener.write(listener.fetch_pending, self.device_id, listener.clock())
        future.add_done_callback(self._deliver)

    def _deliver(self, future: asyncio.Future) -> None:
        self.waking = False
        if self.closing:
            if not future.cancelled():
                future.exception()
            return
        listener = self.listener
        try:
            state, commands = future.result()
        except Exception as exc:  # noqa: BLE001 - a removed device, a store error
            log.warning("cannot fetch pending work of %s: %s", self.device_id, exc)
            return
        now = listener.clock()
        if state is not None and state.desired_version > self.desired_sent:
            if self._send(m.DesiredState(version=state.desired_version, state=state.desired)):
                self.desired_sent = state.desired_version
        delivered, undeliverable = [], []
        for command in commands:
            message = m.Command(command_id=command.id, name=command.name, args=command.args,
                                expires_ms=command.expires_ms)
            try:
                data = self.session.send(message, now)
            except LocalProtocolError as exc:
                if self.session.state != core.ESTABLISHED:
                    break
                undeliverable.append((command.id, str(exc)))
                continue
            self._write(data)
            if self.closing:
                break
            delivered.append(command.id)
        if delivered or undeliverable:
            listener.write(listener.mark_delivered, delivered, undeliverable, now)
        if self.wake_again and not self.closing:
            self.wake_again = False
            self.wake()

    # -- timers ---------------------------------------------------------------------------

    def _deadline(self) -> Optional[int]:
        deadline = None
        if self.tls_deadline:
            deadline = self.tls_deadline
        if self.first_frame_deadline and (deadline is None or self.first_frame_deadline < deadline):
            deadline = self.first_frame_deadline
        if self.session is not None:
            due = self.session.get_timer()
            if due is not None and (deadline is None or due < deadline):
                deadline = due
        return deadline

    def _arm(self, now: int) -> None:
        deadline = self._deadline()
        if deadline is None or self.closing:
            self._cancel_timer()
            return
        if self.timer is not None:
            if self.timer_at <= deadline:
                return  # fires first and re-arms then
            self.timer.cancel()
        self.timer_at = deadline
        self.timer = self.loop.call_later(max(0, deadline - now) / 1000.0, self._on_timer)

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _on_timer(self) -> None:
        self.timer = None
        if self.closing:
            return
        listener = self.listener
        now = listener.clock()
        try:
            if self.tls_deadline and now >= self.tls_deadline:
                listener.count("tls_timeouts")
                log.debug("TLS handshake from %s took too long", self.ip)
                self._drop()
                return
            if self.first_frame_deadline and now >= self.first_frame_deadline:
                listener.count("first_frame_timeouts")
                log.debug("no Hello from %s in time", self.ip)
                self.close(CLOSE_HANDSHAKE_TIMEOUT, "no Hello in time")
                return
            session = self.session
            if session is not None:
                due = session.get_timer()
                if due is not None and now >= due:
                    events = session.handle_timer(now)
                    self._write(session.data_to_send())
                    for event in events:
                        self._on_event(event, now)
                    if session.state == core.CLOSED:
                        listener.count("timeouts")
                        self._finish()
                        return
            self._arm(now)
        except Exception:  # noqa: BLE001
            log.exception("timer of device connection from %s failed", self.ip)
            self._drop()


def _call_on_loop(loop: asyncio.AbstractEventLoop, fn: Callable, *args: Any) -> None:
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        fn(*args)
    else:
        loop.call_soon_threadsafe(fn, *args)


class DeviceListener:
    """Accepts device connections on one port and runs their sessions (see the module rules).

    ``tls_context`` None means plaintext, for ``--insecure-dev`` only."""

    def __init__(self, hub_id: str, store: Store, live: LiveSessions,
                 tls_context: Optional[ssl.SSLContext], limits: Optional[ListenerLimits] = None,
                 clock: Callable[[], int] = wall_clock_ms,
                 client_ca_pem: Optional[bytes] = None) -> None:
        self.hub_id = hub_id
        self.store = store
        self.live = live
        self.tls_context = tls_context
        self.client_ca_pem: Optional[bytes] = None
        if client_ca_pem is not None:
            self.accept_gateways(client_ca_pem)
        self.limits = limits or ListenerLimits()
        self.clock = clock
        self.gate = ConnectionGate(self.limits)
        self.rates = DeviceRates(self.limits)
        self.verifier = DeviceVerifier(store, hub_id)
        self.connections: set[DeviceConnection] = set()
        self.stats: dict[str, int] = {}
        # One plaintext buffer for every connection: the loop runs one callback at a time, and
        # each read is copied out before anything else can run.
        self.read_buffer = bytearray(READ_CHUNK)
        self.read_view = memoryview(self.read_buffer)
        self.stopping = False
        self.devices_version: Optional[str] = None
        self.port: Optional[int] = None
        self.loop: Optional[asyncio.AbstractEventLoop] = None
        self.verify_executor = concurrent.futures.ThreadPoolExecutor(
            2, thread_name_prefix="smartx-verify")
        self.writer_executor = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="smartx-writer")
        self.ingest: Optional[IngestCommitter] = None
        self._server: Optional[asyncio.AbstractServer] = None
        self._housekeeping: Optional[asyncio.Task] = None
        self._last_touch_sweep = 0
        self._touches: dict[str, int] = {}
        self._executors_closed = False

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self, host: str, port: int, sock: Any = None) -> int:
        """Listen on ``host:port`` (or the bound socket ``sock``); return the port bound."""
        self.loop = asyncio.get_running_loop()
        self.ingest = IngestCommitter(self.store, self.writer_executor,
                                      self.limits.ingest_max_batches,
                                      self.limits.ingest_max_delay_ms)
        self.devices_version = await self.loop.run_in_executor(
            self.verify_executor, self.store.get_meta, "devices_version")
        factory = functools.partial(DeviceConnection, self)
        if sock is not None:
            self._server = await self.loop.create_server(factory, sock=sock, backlog=1024)
        else:
            self._server = await self.loop.create_server(factory, host, port, backlog=1024,
                                                         reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]
        self._last_touch_sweep = self.clock()
        self._housekeeping = self.loop.create_task(self._housekeep())
        return self.port

    async def stop(self) -> None:
        """Stop accepting, commit and acknowledge what arrived, close every session with
        CLOSE_SHUTTING_DOWN, and wait (briefly) for them to go."""
        if self.stopping:
            return
        self.stopping = True
        if self.loop is None:  # never started
            self.verify_executor.shutdown(wait=False)
            self.writer_executor.shutdown(wait=False)
            return
        if self._server is not None:
            self._server.close()
        if self._housekeeping is not None:
            self._housekeeping.cancel()
        for connection in list(self.connections):
            if connection.verified and connection.transport is not None:
                connection.transport.pause_reading()
            else:
                connection.close(CLOSE_SHUTTING_DOWN, "hub shutting down")
        if self.ingest is not None:
            await self.ingest.flush()
        self._flush_touches()
        # Everything queued on the writer before now is done once this no-op returns.
        await self.loop.run_in_executor(self.writer_executor, lambda: None)
        await asyncio.sleep(0)  # let the commit callbacks send their Acks
        for connection in list(self.connections):
            connection.close(CLOSE_SHUTTING_DOWN, "hub shutting down")
        deadline = time.monotonic() + STOP_DRAIN_S
        while self.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for connection in list(self.connections):
            connection._drop()
        await asyncio.sleep(0)  # their connection_lost callbacks run now
        self._flush_touches()  # last-seen times of the sessions that just ended
        if self._server is not None:
            await self._server.wait_closed()
        self._executors_closed = True
        # Waits for the writes queued above (the flush of last-seen times is the last one).
        await self.loop.run_in_executor(None, self.writer_executor.shutdown, True)
        self.verify_executor.shutdown(wait=False, cancel_futures=True)

    def accept_gateways(self, ca_pem: bytes) -> None:
        """Ask for gateway client certificates from the hub CA ``ca_pem`` (from now on: call it
        before devices connect). Without TLS there are no certificates, and no gateways."""
        if self.tls_context is None:
            return
        enable_gateway_client_certs(self.tls_context, ca_pem)
        self.client_ca_pem = ca_pem

    def count(self, name: str) -> None:
        """Add one to the counter ``name`` (see ``stats``)."""
        self.stats[name] = self.stats.get(name, 0) + 1

    # -- store work (worker threads) ------------------------------------------------------

    def write(self, fn: Callable, *args: Any) -> asyncio.Future:
        """Run a store call on the writer thread; the future resolves on the loop."""
        if self._executors_closed:
            future = self.loop.create_future()
            future.set_exception(RuntimeError("the device listener has stopped"))
            future.exception()
            return future
        future = self.loop.run_in_executor(self.writer_executor, fn, *args)
        future.add_done_callback(_log_failure)
        return future

    def check_route(self, device_id: str, gateway_id: Optional[str],
                    gateway_problem: Optional[str]) -> Optional[str]:
        """Worker thread: why this relayed Hello is refused, or None."""
        return route_refusal(self.store, self.store.get_device(device_id), gateway_id,
                             gateway_problem)

    def verify_session(self, device_id: str, token: str, nonce: Optional[bytes], now: int,
                       gateway_id: Optional[str], gateway_problem: Optional[str]) -> Device:
        """Worker thread: verify the device's JWT, then its path (``RouteRefused``)."""
        device = self.verifier.verify(device_id, token, nonce, now)
        refusal = route_refusal(self.store, device, gateway_id, gateway_problem)
        if refusal is not None:
            raise RouteRefused(refusal)
        return device

    def fetch_pending(self, device_id: str, now: int) -> tuple:
        """Writer thread: the device's state and its queued commands (expiring stale ones)."""
        state = self.store.get_state(device_id)
        return state, self.store.pending_commands(device_id, now)

    def mark_delivered(self, delivered: list, undeliverable: list, now: int) -> None:
        """Writer thread: record sent commands, and fail those the wire cannot carry."""
        for command_id in delivered:
            self.store.mark_command_delivered(command_id, now)
        for command_id, why in undeliverable:
            self.store.set_command_result(command_id, False, None,
                                          ("cannot be sent to the device: %s" % why)[:200], now)

    def store_command_result(self, device_id: str, message: m.CommandResult, now: int) -> None:
        """Writer thread: store a device's command result, if the command is that device's."""
        command = self.store.get_command(message.command_id)
        if command is None or command.device_id != device_id:
            log.warning("device %s answered command %s, which is not its own", device_id,
                        message.command_id)
            return
        self.store.set_command_result(message.command_id, message.ok, message.result,
                                      message.error, now)

    # -- events from connections ----------------------------------------------------------

    def on_backoff(self, ip: str, backoff_ms: int, device_id: Optional[str], now: int) -> None:
        """An address failed auth too often: log it and put it in the audit log."""
        self.count("backoffs")
        log.warning("%s backed off for %d ms after repeated device auth failures", ip, backoff_ms)
        self.write(self.store.add_audit, "device.auth_backoff", "ip:" + ip, ip,
                   {"backoff_ms": backoff_ms, "device_id": device_id}, now)

    def on_session_ended(self, connection: DeviceConnection) -> None:
        """A verified session ended: record when the device was last heard from."""
        session = connection.session
        if session is not None:
            self.touch(connection.device_id, max(session.last_received_ms,
                                                 connection.last_touch_ms))

    def recheck(self, connection: DeviceConnection) -> None:
        """Look up one session's device (and gateway) again: disabled, removed or moved?"""
        future = self.loop.run_in_executor(self.verify_executor, self._records_of, connection)
        future.add_done_callback(functools.partial(self._rechecked, connection))

    def _records_of(self, connection: DeviceConnection) -> tuple:
        """Worker thread: the device's record and its connection's gateway's."""
        gateway = (self.store.get_device(connection.gateway_id)
                   if connection.gateway_id is not None else None)
        return self.store.get_device(connection.device_id), gateway

    def _rechecked(self, connection: DeviceConnection, future: asyncio.Future) -> None:
        if future.cancelled():
            return
        if future.exception() is not None:
            log.warning("rechecking device %s failed: %s", connection.device_id,
                        future.exception())
            return
        self._kick_if_gone(connection, *future.result())

    def _kick_if_gone(self, connection: DeviceConnection, device: Any,
                      gateway: Any = None) -> None:
        if connection.closing:
            return
        if device is None:
            log.info("device %s was removed: closing its session", connection.device_id)
            connection.close(CLOSE_UNKNOWN_DEVICE, "device removed")
        elif not device.enabled:
            log.info("device %s was disabled: closing its session", connection.device_id)
            connection.close(CLOSE_DEVICE_DISABLED, "device disabled")
        else:
            refusal = None
            if connection.gateway_id is not None:
                refusal = gateway_refusal(connection.gateway_id, gateway)
            refusal = refusal or relay_refusal(device, connection.gateway_id)
            if refusal is not None:
                log.info("device %s may no longer use its path (%s): closing its session",
                         connection.device_id, refusal)
                connection.close(CLOSE_NOT_AUTHORISED, NOT_AUTHORISED_DETAIL)

    # -- housekeeping ---------------------------------------------------------------------

    async def _housekeep(self) -> None:
        interval = min(HOUSEKEEPING_S, self.limits.devices_poll_ms / 1000.0)
        while True:
            await asyncio.sleep(interval)
            try:
                await self._poll_devices()
                now = self.clock()
                self.gate.prune(now)
                self.rates.prune(now, self.live.online_ids())
                if now - self._last_touch_sweep >= self.limits.touch_interval_ms:
                    self._last_touch_sweep = now
                    self._touch_sweep()
                self._flush_touches()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - keep housekeeping alive
                log.exception("device listener housekeeping failed")

    async def _poll_devices(self) -> None:
        version = await self.loop.run_in_executor(self.verify_executor, self.store.get_meta,
                                                  "devices_version")
        if version == self.devices_version:
            return
        # Set before listing: a session registered after this point either sees the new
        # version (and rechecks itself) or is in the list below.
        self.devices_version = version
        devices = await self.loop.run_in_executor(self.verify_executor, self.store.list_devices)
        by_id = {device.id: device for device in devices}
        for connection in list(self.connections):
            if connection.verified:
                self._kick_if_gone(connection, by_id.get(connection.device_id),
                                   by_id.get(connection.gateway_id)
                                   if connection.gateway_id is not None else None)

    def touch(self, device_id: str, last_seen_ms: int) -> None:
        """Note when a device was last seen; written with the next flush (at most every
        housekeeping tick): one fsync a tick, not two per handshake."""
        if self._touches.get(device_id, 0) < last_seen_ms:
            self._touches[device_id] = last_seen_ms

    def _flush_touches(self) -> None:
        if self._touches:
            touches, self._touches = self._touches, {}
            self.write(self._write_touches, touches)

    def _touch_sweep(self) -> None:
        for connection in self.connections:
            session = connection.session
            if connection.verified and session is not None \
                    and session.last_received_ms > connection.last_touch_ms:
                connection.last_touch_ms = session.last_received_ms
                self.touch(connection.device_id, session.last_received_ms)

    def _write_touches(self, touches: dict) -> None:
        """Writer thread: store last-seen times (in one transaction if the store can)."""
        touch_many = getattr(self.store, "touch_devices", None)
        if touch_many is not None:
            touch_many(touches)
            return
        for device_id, last_seen in touches.items():
            try:
                self.store.touch_device(device_id, last_seen)
            except Exception:  # noqa: BLE001 - a device removed meanwhile
                pass


def _log_failure(future: asyncio.Future) -> None:
    if future.cancelled():
        return
    error = future.exception()
    if error is not None:
        log.warning("store call failed: %s: %s", type(error).__name__, error)
