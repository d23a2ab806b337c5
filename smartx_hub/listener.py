"""The device listener: TLS on asyncio, the protocol core for the wire, one small object a session.

Rules (docs/operations.md, "Device listener"):
- The wire is ``smartx_device.session.HubSession``; this file only moves bytes and acts on the
  events the core reports. It never frames or encodes a message itself.
- No asyncio transport: the listener accepts on its own listening sockets, and each connection
  is a non-blocking socket on which OpenSSL reads and writes itself (``server_tls``): no
  memory-BIO pair, no transport object, no ``ssl.SSLSocket`` wrapper. The sockets are watched
  by one selector of the listener's, which the loop watches (``_poll``): no loop handle per
  connection. That is most of what an idle session cost beyond OpenSSL's own state
  (docs/performance.md, "Memory"); asyncio's SSL transport is worse still (a 256 KiB buffer a
  connection). OpenSSL releases its record buffers when idle. Plaintext is read into one
  buffer shared by every connection: the loop runs one callback at a time.
- Writes go straight to the socket; what the kernel does not take waits in a per-connection
  buffer (created only then) while the selector watches for room, capped by
  ``max_write_buffer``: past it the peer is dropped. A TLS write the socket refused is retried
  with the same bytes first, as OpenSSL requires. A close sends what waits, then the Close and
  close_notify, within CLOSE_DRAIN_MS. The handshake's flight is corked (sent whole).
- Deadlines (TLS handshake, first frame, the core's handshake, keep-alive and idle) live on one
  timer wheel of the listener, one entry a connection, armed lazily: it fires at the earliest
  deadline it was armed for (at most TIMER_TICK_MS late), then re-arms at whatever is due next.
  Traffic never touches it unless a deadline moves earlier.
- Flood limits (smartx_hub/limits.py) are applied at accept (caps, connection rate, back-off),
  from the frame header (size), per frame (device message rate) and per write (a peer that does
  not read is dropped). A limit never blocks the loop: a slow or hostile peer costs only its
  own connection.
- Store calls run on worker threads: verification (device lookup and signature, and in the
  same trip the device's pending commands and desired state) on a small pool, every other
  write on one writer thread so writes stay in order; results come back to the loop, which
  alone touches connection state. The one write the pool may make, expiring stale commands
  while fetching pending ones, is ordered against delivery records by the
  ``deliveries``/``deliveries_unrecorded`` counters (``_verified``).
- Telemetry is acknowledged only after ``IngestCommitter`` reports its commit. The Acks one
  commit releases for one connection go out together, in the loop turn that learns of the
  commit: one TLS record and one ``send`` for all of them, not one each (at one reading a
  message, Acks written one by one took nearly half of the loop's busy time:
  docs/performance.md).
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
import errno
import functools
import heapq
import logging
import os
import secrets
import selectors
import socket
import ssl
import sys
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
from smartx_hub import fastwire
from smartx_hub.gateway_pki import (GatewayCertError, enable_gateway_client_certs,
                                    gateway_id_from_cert, gateway_refusal, relay_refusal)
from smartx_hub.ingest import IngestCommitter
from smartx_hub.limits import ConnectionGate, DeviceRates, ListenerLimits
from smartx_hub.live import LiveSessions
from smartx_hub.store import Device, Store, TelemetryBatch
from smartx_hub.verify import DeviceVerifier, VerificationError

log = logging.getLogger(__name__)

NONCE_SIZE = 32
#: Plaintext read per call (a TLS read returns one record, at most 16 KiB).
READ_CHUNK = 65536
#: Bytes read from one connection per turn of the loop: a device that sends faster than the
#: hub reads must not keep the loop to itself (the socket stays readable; the loop comes back).
READ_BUDGET = 262144
#: Connections accepted per turn of the loop (the rest wait in the backlog for the next turn).
ACCEPT_BATCH = 64
BACKLOG = 1024
#: After the process runs out of descriptors (or memory) to accept with: stop accepting this
#: long, rather than spin on a listening socket that stays readable.
ACCEPT_RETRY_S = 1.0
#: How long a closed connection may take to send what is still queued for it (its Close, the
#: TLS close_notify) before it is dropped.
CLOSE_DRAIN_MS = 5000
#: Connection deadlines live on one timer wheel of the listener, in ticks of this length: a
#: deadline fires at most one tick late, never early. One set entry a connection instead of a
#: timer handle each (docs/performance.md, "Memory").
TIMER_TICK_MS = 50
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


def set_nodelay(sock: socket.socket) -> None:
    """TCP_NODELAY on a device connection, as asyncio sets it on each of its TCP transports:
    Acks and handshake flights are small and must not wait for the peer's delayed ACK."""
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def listening_sockets(host: Optional[str], port: int) -> list:
    """Bound, listening, non-blocking sockets for ``host:port``, made as asyncio's
    ``create_server`` makes them: one for each address ``host`` resolves to (every interface
    for None or ""), SO_REUSEADDR, IPv6 sockets IPv6-only. With port 0 they share the port the
    first one got."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                               flags=socket.AI_PASSIVE)
    sockets: list = []
    seen = set()
    try:
        for family, kind, proto, _, address in infos:
            if (family, address) in seen:
                continue
            seen.add((family, address))
            try:
                sock = socket.socket(family, kind, proto)
            except OSError:
                continue  # an address family this machine lacks (asyncio skips it too)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port == 0 and len(sockets) > 1:
                address = (address[0], sockets[0].getsockname()[1]) + tuple(address[2:])
            try:
                sock.bind(address)
            except OSError as exc:
                raise OSError(exc.errno, "cannot listen on %s port %s: %s"
                              % (address[0], address[1], exc.strerror)) from None
            sock.listen(BACKLOG)
            sock.setblocking(False)
        if not sockets:
            raise OSError(errno.EADDRNOTAVAIL, "no address to listen on for %r" % (host,))
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


EVENT_READ = selectors.EVENT_READ
EVENT_WRITE = selectors.EVENT_WRITE
#: Linux's TCP_CORK (see ``DeviceConnection._tls_handshake``); None where there is none.
TCP_CORK = getattr(socket, "TCP_CORK", None)


def server_tls(context: ssl.SSLContext, sock: socket.socket) -> Any:
    """Server-side TLS on the connected, non-blocking ``sock``: OpenSSL reads and writes it.

    This is the ``_ssl`` object an ``ssl.SSLSocket`` keeps as ``_sslobj``, made as
    ``SSLSocket`` makes it but without that wrapper, which would add a ``socket`` subclass with
    a ``__dict__`` (0.35 kB) to every idle session and three Python calls to every read and
    write. It has what the listener uses: ``do_handshake()``, ``read(n, buffer)``,
    ``write(data)``, ``getpeercert(True)``, ``shutdown()``; its errors are the ``ssl`` module's
    (a TCP close without close_notify raises ``SSLEOFError``). The socket must outlive it."""
    return context._wrap_socket(sock, True, None, owner=None, session=None)


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


class _HubSession(core.HubSession):
    """The core's hub session on the hub's native codec (``fastwire``: the core's exact answers,
    several times faster), set on the class so a session holds no reference of its own."""

    __slots__ = ()
    _decode_message = staticmethod(fastwire.decode_message)
    _encode_message = staticmethod(fastwire.encode_message)


class _CountingFramer(StreamFramer):
    """The core's stream framer, counting the frames it completes (for the message rate).

    Counting here, not by events, also meters Pings, which the core answers on its own."""

    __slots__ = ("frames",)

    def __init__(self, max_frame_size: int) -> None:
        super().__init__(max_frame_size)
        self.frames = 0

    def feed(self, data):
        """``StreamFramer.feed``, counting the frames returned."""
        items = super().feed(data)
        self.frames += len(items)
        return items


class DeviceConnection:
    """One device connection: its socket and TLS, the core session, timers, and its share of
    limits. The listener creates it for a connection it has admitted, then calls ``start``.

    Also the ``SessionHandle`` (smartx_hub/live.py) of a verified session."""

    __slots__ = ("listener", "sock", "tls", "events", "ip", "out", "tls_done", "session",
                 "framer", "device_id",
                 "nonce", "verified", "closing", "timer_at", "tls_deadline",
                 "first_frame_deadline", "inflight", "paused", "last_touch_ms", "desired_sent",
                 "waking", "wake_again", "devices_version", "gateway_id", "gateway_problem",
                 "acks")

    def __init__(self, listener: "DeviceListener", sock: socket.socket, ip: str,
                 tls: Any = None) -> None:
        self.listener = listener
        self.sock: Optional[socket.socket] = sock  # non-blocking; None once closed
        self.tls = tls  # its server_tls() state; None without TLS (--insecure-dev)
        self.events = 0  # what the listener's selector watches the socket for
        self.ip = ip
        self.out: Optional[bytearray] = None  # what the socket has not taken yet (see _write)
        self.tls_done = False  # also True from the start without TLS: nothing to wait for
        self.session: Optional[core.HubSession] = None
        self.framer: Optional[_CountingFramer] = None
        self.device_id: Optional[str] = None
        self.nonce: Optional[bytes] = None
        self.verified = False
        self.closing = False
        self.timer_at = 0  # the tick of the listener's timer wheel it is on, or 0
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

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The loop that alone touches this connection (live.py calls in through it)."""
        return self.listener.loop

    # -- the socket -----------------------------------------------------------------------

    def start(self, now: int) -> None:
        """Watch the socket; start the TLS handshake deadline or, without TLS, the session."""
        self._watch(EVENT_READ)
        if self.tls is not None:
            self.tls_deadline = now + self.listener.limits.tls_handshake_timeout_ms
            self._arm(now)
        else:
            self.tls_done = True
            self._start_session(now)

    def _on_readable(self) -> None:
        """The socket is readable: the TLS handshake, or what the device sent."""
        if self.closing:
            return
        try:
            if not self.tls_done and not self._tls_handshake():
                return
            self._read_plaintext()
        except Exception:  # noqa: BLE001 - a bug must cost one connection, not the listener
            log.exception("device connection from %s failed", self.ip)
            self.close(CLOSE_INTERNAL_ERROR, "internal error")

    def _on_writable(self) -> None:
        """The kernel has room again: send what waited, or go on with the TLS handshake."""
        if self.sock is None:
            return
        try:
            if not self.tls_done:
                self._room_again()
                if self._tls_handshake():
                    self._read_plaintext()
                return
            self._send_out()
        except Exception:  # noqa: BLE001 - a bug must cost one connection, not the listener
            log.exception("device connection from %s failed", self.ip)
            self._drop()

    def pause_reading(self) -> None:
        """Stop reading from the device (back-pressure, shutdown); bytes wait in the kernel."""
        if not self.closing:
            self._watch(self.events & ~EVENT_READ)

    def resume_reading(self) -> None:
        """Read from the device again."""
        if not self.closing and not self.listener.stopping:
            self._watch(self.events | EVENT_READ)

    def _watch(self, events: int) -> None:
        """Have the listener's selector watch the socket for ``events`` (0: not at all)."""
        if events == self.events or self.sock is None:
            return
        selector = self.listener.selector
        fd = self.sock.fileno()
        if not self.events:
            selector.register(fd, events, self)
        elif not events:
            selector.unregister(fd)
        else:
            selector.modify(fd, events, self)
        self.events = events

    def _close_socket(self) -> None:
        """Close the socket now and give back the connection's share of the limits."""
        sock, self.sock = self.sock, None
        self.out = None
        self._cancel_timer()
        if sock is None:
            return
        if self.events:
            self.events = 0
            self.listener.selector.unregister(sock.fileno())
        self.tls = None  # OpenSSL's state goes with it
        try:
            sock.close()
        except OSError:
            pass
        listener = self.listener
        listener.connections.discard(self)
        listener.gate.release(self.ip, self.verified)
        if self.verified:
            listener.live.unregister(self)
            listener.on_session_ended(self)

    # -- TLS ------------------------------------------------------------------------------

    def _tls_handshake(self) -> bool:
        sock = self.sock
        try:
            if TCP_CORK is not None:
                # OpenSSL writes a flight record by record, a send() each: corked, the kernel
                # sends it whole when uncorked below. Without TCP_NODELAY, Nagle's algorithm
                # would otherwise hold its second record until the device's delayed ACK
                # (40 ms: Mosquitto's handshakes stall so with TCP_NODELAY off).
                sock.setsockopt(socket.IPPROTO_TCP, TCP_CORK, 1)
            try:
                self.tls.do_handshake()
            finally:
                if TCP_CORK is not None:
                    sock.setsockopt(socket.IPPROTO_TCP, TCP_CORK, 0)
        except ssl.SSLWantReadError:
            return False
        except ssl.SSLWantWriteError:  # its flight did not fit in the socket: go on when it does
            self._wait_for_room()
            return False
        except (ssl.SSLEOFError, ssl.SSLZeroReturnError):
            self._drop()  # the device left during the handshake: nothing failed
            return False
        except (ssl.SSLError, ValueError) as exc:
            # A TLS 1.1 client, a CBC-only client, or garbage: OpenSSL has sent an alert.
            self.listener.count("tls_failures")
            log.debug("TLS handshake with %s failed: %s", self.ip,
                      getattr(exc, "reason", None) or exc)
            self._drop()
            return False
        except OSError:
            self._drop()  # reset by the device
            return False
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
        der = self.tls.getpeercert(True)
        if not der:
            return  # a direct connection
        try:
            self.gateway_id = gateway_id_from_cert(der, listener.client_ca_pem)
            listener.count("gateway_connections")
        except GatewayCertError as exc:
            self.gateway_problem = str(exc)

    def _read_plaintext(self) -> None:
        """Read what the device sent (TLS: decrypted, a record a call) and feed the session."""
        buffer = self.listener.read_view
        sock = self.sock
        tls = self.tls
        chunks = []
        total = 0
        ended = False
        while total < READ_BUDGET:
            try:
                if tls is not None:
                    count = tls.read(READ_CHUNK, buffer)
                else:
                    count = sock.recv_into(buffer)
            except (ssl.SSLWantReadError, BlockingIOError, InterruptedError):
                break
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                ended = True
                break
            except ssl.SSLWantWriteError:
                # OpenSSL must send before it reads on, and the socket is full: read on when
                # it has room.
                self._wait_for_room()
                break
            except ssl.SSLError as exc:
                log.debug("TLS error from %s: %s", self.ip, getattr(exc, "reason", None) or exc)
                self._drop()
                return
            except OSError:
                self._drop()  # reset by the device: no goodbye to say
                return
            if not count:
                ended = True  # close_notify, or the TCP connection closed without one
                break
            chunks.append(bytes(buffer[:count]))
            total += count
            if tls is None and count < READ_CHUNK:
                break  # the kernel had no more (a TLS read returns one record: no such hint)
        if chunks:
            self._feed(chunks[0] if len(chunks) == 1 else b"".join(chunks))
        if ended and not self.closing:
            self._feed(b"")
            self._finish()  # the session may still be open: the socket must close anyway

    def _write(self, data: bytes) -> None:
        """Send ``data`` (plaintext: TLS encrypts it); what the kernel cannot take yet waits."""
        if not data or self.sock is None:
            return
        out = self.out
        if out is not None:
            out += data  # behind what waits, never around it
            self._check_out(out)
            return
        try:
            sent = self.tls.write(data) if self.tls is not None else self.sock.send(data)
        except (ssl.SSLWantWriteError, BlockingIOError, InterruptedError):
            # For TLS the retry must present the same bytes again (OpenSSL has encrypted some
            # of them already), so all of data waits; more may only be added behind it.
            sent = 0
        except (ssl.SSLError, OSError) as exc:
            log.debug("write to %s failed: %s", self.ip, exc)
            self._drop()
            return
        if sent < len(data):
            self.out = out = bytearray(memoryview(data)[sent:])
            if self._check_out(out):
                self._want_write()

    def _check_out(self, out: bytearray) -> bool:
        """False (and the connection dropped) if ``out`` is over the write-buffer cap."""
        if len(out) <= self.listener.limits.max_write_buffer:
            return True
        # The device does not read what we send: drop it before it costs more memory.
        self.listener.count("dropped_slow_readers")
        log.info("dropped %s (%s): it does not read what the hub sends",
                 self.device_id or "unverified device", self.ip)
        self._drop()
        return False

    def _want_write(self) -> None:
        """Be told when the socket has room for ``out``; reading goes on meanwhile."""
        self._watch(self.events | EVENT_WRITE)

    def _wait_for_room(self) -> None:
        """TLS cannot go on before it writes: stop reading (the socket would stay readable and
        the loop would call in vain) until the socket has room."""
        self._watch(EVENT_WRITE)

    def _room_again(self) -> None:
        """Undo ``_wait_for_room`` / ``_want_write``: watch for reads, not for room."""
        reading = not (self.paused or self.closing or self.listener.stopping)
        self._watch(EVENT_READ if reading else 0)

    def _send_out(self) -> None:
        """Send what waits in ``out``; once all is gone, stop watching for room (and finish a
        close that waited for it)."""
        out = self.out
        sock = self.sock
        if sock is None:
            return
        if out is not None:
            try:
                sent = self.tls.write(out) if self.tls is not None else sock.send(out)
            except (ssl.SSLWantWriteError, BlockingIOError, InterruptedError):
                return
            except (ssl.SSLError, OSError) as exc:
                log.debug("write to %s failed: %s", self.ip, exc)
                self._drop()
                return
            if sent < len(out):
                del out[:sent]  # a plain socket took part of it (TLS writes all or nothing)
                return
            self.out = None
        if self.closing:
            self._goodbye()
        else:
            self._room_again()  # reads may have waited for room too (see _wait_for_room)

    # -- the session ----------------------------------------------------------------------

    def _start_session(self, now: int) -> None:
        limits = self.listener.limits
        self.framer = _CountingFramer(limits.max_frame_size)
        self.session = _HubSession(now, self.framer, keepalive_ms=limits.keepalive_ms,
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
        listener.off_loop(self._route_checked, listener.check_route, self.device_id,
                          self.gateway_id, self.gateway_problem)

    def _route_checked(self, future: concurrent.futures.Future) -> None:
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
        if self.closing or self.sock is None:
            return
        if self.acks:
            self._flush_acks()  # committed before the Close: say so first
        session = self.session
        if session is not None and session.state != core.CLOSED and self.tls_done:
            try:
                self._write(session.close(reason, detail, retry_after_ms, self.listener.clock()))
            except LocalProtocolError:
                pass
        self._finish()

    def _finish(self) -> None:
        """The session is over: say goodbye to TLS, close the socket once its data is out
        (within CLOSE_DRAIN_MS)."""
        if self.closing:
            return
        self.closing = True
        self._cancel_timer()
        if self.verified:
            self.listener.live.unregister(self)
        if self.sock is None:
            return
        if self.out is None:
            self._goodbye()
        else:
            self._watch(EVENT_WRITE)  # nothing more is read
            self.timer_at = self.listener.arm(self, self.listener.clock() + CLOSE_DRAIN_MS)

    def _goodbye(self) -> None:
        """Send TLS close_notify (not waiting for the device's), then close the socket."""
        if self.tls is not None and self.tls_done:
            try:
                self.tls.shutdown()
            except (ssl.SSLError, OSError, ValueError):
                # Sent, and the device's own close_notify not there yet (the usual case); or
                # the socket is full or gone, and the device does without it.
                pass
        self._close_socket()

    def _drop(self) -> None:
        """End the connection at once, without a goodbye (TLS failure, a peer that won't read)."""
        self.closing = True
        self._close_socket()

    # -- verification ---------------------------------------------------------------------

    def _start_verification(self, token: str, now: int) -> None:
        """Verify on the pool, and in the same trip look for the device's pending work (one
        hand-off a session, not two), unless a delivery record is still being written: a look
        taken before it is written could send a command twice."""
        listener = self.listener
        nonce, self.nonce = self.nonce, None
        self.devices_version = listener.devices_version
        fetch = listener.deliveries_unrecorded == 0
        # What _verified compares to know the look is still the whole truth.
        seen = (listener.live.wakes(), listener.deliveries)
        listener.off_loop(functools.partial(self._verified, seen), listener.verify_session,
                          self.device_id, token, nonce, now, self.gateway_id,
                          self.gateway_problem, fetch)

    def _verified(self, seen: tuple, future: concurrent.futures.Future) -> None:
        listener = self.listener
        if future.cancelled():
            self.close(CLOSE_SHUTTING_DOWN, "hub shutting down")
            return
        if self.closing:
            future.exception()  # retrieved, so asyncio does not warn about it
            return
        now = listener.clock()
        try:
            _, pending = future.result()  # the Device record is not needed past verification
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
        # The look at pending work came before this session was registered: a wake meanwhile
        # (a command queued through the API) found no session to tell, and a delivery by an
        # older session of the device may not be recorded in what it read. Then look again, on
        # the writer, in order behind that record.
        if pending is not None and seen == (listener.live.wakes(), listener.deliveries):
            self._send_pending(*pending, now)
        else:
            self.wake()

    # -- steady state ---------------------------------------------------------------------

    def _on_message(self, message: m.Message, now: int) -> None:
        kind = type(message)
        listener = self.listener
        if kind is m.Telemetry:
            listener.ingest.submit(TelemetryBatch(self.device_id, message.msg_id,
                                                  message.readings, now), self._committed)
            self.inflight += 1
            if self.inflight >= listener.limits.max_inflight_batches and not self.paused:
                self.paused = True
                listener.count("backpressure_pauses")
                self.pause_reading()
        elif kind is m.ReportedState:
            future = listener.write(listener.store.set_reported_state, self.device_id,
                                    message.state, now)
            future.add_done_callback(functools.partial(self._state_stored, message.msg_id))
        elif kind is m.CommandResult:
            listener.write(listener.store_command_result, self.device_id, message, now)
        else:  # the core lets no other message through in ESTABLISHED
            log.warning("unexpected %s from %s", kind.__name__, self.device_id)

    def _committed(self, batch: TelemetryBatch, outcome: Any) -> None:
        """The committer's word on one of our batches (True/False: committed; or an error).
        The listener writes the Acks after the commit's last callback (``flush_acks``)."""
        self.inflight -= 1
        if self.paused and self.inflight <= self.listener.limits.max_inflight_batches // 2:
            self.paused = False
            self.resume_reading()
        if isinstance(outcome, BaseException):
            if not self.closing:
                log.error("telemetry of %s not committed: %s", self.device_id, outcome)
                self.close(CLOSE_INTERNAL_ERROR, "telemetry not stored", STORE_RETRY_AFTER_MS)
            return
        self._queue_ack(batch.msg_id, False)

    def _queue_ack(self, msg_id: int, later: bool = True) -> None:
        """Acknowledge ``msg_id`` (already committed) with the others of this loop turn: the
        listener's ``flush_acks`` writes them, after the commit's callbacks or (``later``) in
        the next turn."""
        if self.closing:
            return
        acks = self.acks
        if acks is None:
            self.acks = [msg_id]
            self.listener.ack_later(self, later)
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
        if future.cancelled():
            return
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
        self._send_pending(state, commands, listener.clock())
        if self.wake_again and not self.closing:
            self.wake_again = False
            self.wake()

    def _send_pending(self, state: Any, commands: list, now: int) -> None:
        """Send desired state (if newer than sent) and the commands ``fetch_pending`` found;
        record which went out, and fail those the wire cannot carry."""
        listener = self.listener
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
            listener.record_deliveries(delivered, undeliverable, now)

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
        """Put the connection on the listener's timer wheel for its earliest deadline."""
        if self.closing:
            return  # its deadlines are over (a close waiting for the socket keeps its own)
        deadline = self._deadline()
        if deadline is None:
            self._cancel_timer()
            return
        at = self.timer_at
        if at:
            if at * TIMER_TICK_MS <= deadline:
                return  # fires first and re-arms then
            self.listener.disarm(self, at)
        self.timer_at = self.listener.arm(self, deadline)

    def _cancel_timer(self) -> None:
        if self.timer_at:
            self.listener.disarm(self, self.timer_at)
            self.timer_at = 0

    def _on_timer(self) -> None:
        """The wheel's call: whatever deadline is due (the listener has taken it off)."""
        if self.closing:
            # Only a close that waits for the socket to take its last bytes is on the wheel
            # (see _finish): its time is up.
            self._drop()
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
        self._servers: list[socket.socket] = []  # the listening sockets
        # Watches every connection's socket; the loop watches it (see ``_poll``).
        self.selector: Optional[selectors.BaseSelector] = None
        # Connections with Acks queued (``ack_later``), and whether a flush is scheduled.
        self._ack_queue: list[DeviceConnection] = []
        self._acks_scheduled = False
        # The timer wheel: tick -> connections due then, a heap of those ticks (a tick whose
        # set emptied stays in it until it comes up), and the tick the wheel last turned at.
        self._wheel: dict[int, set] = {}
        self._wheel_ticks: list[int] = []
        self._wheel_timer: Optional[asyncio.TimerHandle] = None
        self._wheel_wake = 0  # the tick that timer is for
        self._wheel_now = 0
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
                                      self.limits.ingest_max_delay_ms,
                                      after_commit=self.flush_acks)
        self.devices_version = await self.loop.run_in_executor(
            self.verify_executor, self.store.get_meta, "devices_version")
        if sock is not None:
            sock.listen(BACKLOG)
            sock.setblocking(False)
            self._servers = [sock]
        else:
            self._servers = listening_sockets(host, port)
        for server in self._servers:
            self.loop.add_reader(server.fileno(), self._accept, server)
        self.selector = selectors.DefaultSelector()
        self.loop.add_reader(self.selector.fileno(), self._poll)
        self.port = self._servers[0].getsockname()[1]
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
        servers, self._servers = self._servers, []
        for server in servers:
            self.loop.remove_reader(server.fileno())
            server.close()
        if self._housekeeping is not None:
            self._housekeeping.cancel()
        for connection in list(self.connections):
            if connection.verified:
                connection.pause_reading()
            else:
                connection.close(CLOSE_SHUTTING_DOWN, "hub shutting down")
        if self.ingest is not None:
            await self.ingest.flush()  # its last commit's Acks are written when it returns
        self._flush_touches()
        # Everything queued on the writer before now is done once this no-op returns.
        await self.loop.run_in_executor(self.writer_executor, lambda: None)
        await asyncio.sleep(0)  # let store callbacks queue their Acks (ReportedState)
        self.flush_acks()
        for connection in list(self.connections):
            connection.close(CLOSE_SHUTTING_DOWN, "hub shutting down")
        deadline = time.monotonic() + STOP_DRAIN_S
        while self.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for connection in list(self.connections):
            connection._drop()
        if self._wheel_timer is not None:
            self._wheel_timer.cancel()
            self._wheel_timer = None
        if self.selector is not None:
            self.loop.remove_reader(self.selector.fileno())
            self.selector.close()
        self._flush_touches()  # last-seen times of the sessions that just ended
        self._executors_closed = True
        # Waits for the writes queued above (the flush of last-seen times is the last one).
        await self.loop.run_in_executor(None, self.writer_executor.shutdown, True)
        self.verify_executor.shutdown(wait=False, cancel_futures=True)

    # -- sockets --------------------------------------------------------------------------

    def _poll(self) -> None:
        """Some connection's socket is ready: serve every one that is, in this turn.

        One selector of the listener's own watches the connections' sockets, and the loop
        watches that selector: a socket costs one entry in it, where ``loop.add_reader`` would
        add a handle, its context, a callback and a key of the loop's (0.3 kB an idle session)."""
        for key, events in self.selector.select(0):
            connection = key.data
            if events & EVENT_WRITE:
                connection._on_writable()
            if events & EVENT_READ:
                connection._on_readable()

    def _accept(self, server: socket.socket) -> None:
        """A listening socket is readable: accept what waits, ``ACCEPT_BATCH`` at most a turn."""
        for _ in range(ACCEPT_BATCH):
            try:
                sock, address = server.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue  # gone before it was accepted
            except OSError as exc:
                self.count("accept_errors")
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.warning("cannot accept device connections for %.0f s: %s",
                                ACCEPT_RETRY_S, exc)
                    self.loop.remove_reader(server.fileno())
                    self.loop.call_later(ACCEPT_RETRY_S, self._resume_accepting, server)
                else:
                    log.warning("accepting a device connection failed: %s", exc)
                return
            try:
                self._admit(sock, address)
            except Exception:  # noqa: BLE001 - a bug must cost one connection, not the listener
                log.exception("admitting a device connection failed")
                sock.close()

    def _resume_accepting(self, server: socket.socket) -> None:
        if server in self._servers:
            self.loop.add_reader(server.fileno(), self._accept, server)

    def _admit(self, sock: socket.socket, address: Any) -> None:
        """Admit (or close at once) one accepted socket; start TLS, or the session."""
        # Interned: the sessions of one address (a gateway's boards, a NAT) share one string.
        ip = sys.intern(address[0]) if isinstance(address, tuple) and address else "unknown"
        now = self.clock()
        refusal = self.gate.admit(ip, now) if not self.stopping else "stopping"
        if refusal is not None:
            self.count("refused_" + refusal)
            log.debug("refused a connection from %s: %s", ip, refusal)
            sock.close()
            return
        self.count("connections")
        connection = None
        try:
            sock.setblocking(False)
            set_nodelay(sock)
            tls = server_tls(self.tls_context, sock) if self.tls_context is not None else None
            connection = DeviceConnection(self, sock, ip, tls)
            self.connections.add(connection)
            connection.start(now)
        except Exception as exc:  # noqa: BLE001 - the device is gone already, or a bug
            if not isinstance(exc, OSError):
                log.exception("starting a device connection from %s failed", ip)
            if connection is not None:
                connection._drop()
            else:
                sock.close()
                self.gate.release(ip, False)

    # -- Acks -----------------------------------------------------------------------------

    def ack_later(self, connection: DeviceConnection, schedule: bool = True) -> None:
        """``connection`` has Acks queued: ``flush_acks`` writes them, run by the committer
        after its callbacks or, with ``schedule``, in the next turn of the loop."""
        self._ack_queue.append(connection)
        if schedule and not self._acks_scheduled:
            self._acks_scheduled = True
            self.loop.call_soon(self._scheduled_flush)

    def _scheduled_flush(self) -> None:
        self._acks_scheduled = False
        self.flush_acks()

    def flush_acks(self) -> None:
        """Write every queued Ack: one record and one ``send`` a connection."""
        queue, self._ack_queue = self._ack_queue, []
        for connection in queue:
            try:
                connection._flush_acks()
            except Exception:  # noqa: BLE001 - a bug must cost one connection, not the others
                log.exception("acknowledging telemetry of %s failed", connection.device_id)
                connection._drop()

    # -- the timer wheel ------------------------------------------------------------------

    def arm(self, connection: DeviceConnection, deadline_ms: int) -> int:
        """Call ``connection._on_timer()`` once ``deadline_ms`` (clock) has passed, within
        TIMER_TICK_MS; return the tick to ``disarm`` it with."""
        tick = -(-deadline_ms // TIMER_TICK_MS)
        if tick <= self._wheel_now:
            tick = self._wheel_now + 1  # due already: the next turn (never within this one)
        bucket = self._wheel.get(tick)
        if bucket is None:
            bucket = self._wheel[tick] = set()
            heapq.heappush(self._wheel_ticks, tick)
        bucket.add(connection)
        if self._wheel_timer is None or tick < self._wheel_wake:
            self._wake_wheel_at(tick)
        return tick

    def disarm(self, connection: DeviceConnection, tick: int) -> None:
        """Take ``connection`` off the wheel at ``tick`` (from ``arm``)."""
        bucket = self._wheel.get(tick)
        if bucket is not None:
            bucket.discard(connection)
            if not bucket:
                del self._wheel[tick]

    def _turn_wheel(self) -> None:
        self._wheel_timer = None
        now = self._wheel_now = self.clock() // TIMER_TICK_MS
        ticks = self._wheel_ticks
        while ticks and ticks[0] <= now:
            for connection in self._wheel.pop(heapq.heappop(ticks), ()):
                connection.timer_at = 0
                try:
                    connection._on_timer()
                except Exception:  # noqa: BLE001 - a bug must cost one connection
                    log.exception("timer of device connection from %s failed", connection.ip)
                    connection._drop()
        if ticks:
            self._wake_wheel_at(ticks[0])

    def _wake_wheel_at(self, tick: int) -> None:
        # One loop timer for the whole wheel, at its earliest tick: an idle hub does not wake.
        if self._wheel_timer is not None:
            self._wheel_timer.cancel()
        self._wheel_wake = tick
        delay_ms = max(0, tick * TIMER_TICK_MS - self.clock())
        self._wheel_timer = self.loop.call_later(delay_ms / 1000.0, self._turn_wheel)

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

    def off_loop(self, callback: Callable, fn: Callable, *args: Any) -> None:
        """Run ``fn(*args)`` on the verify pool; ``callback(future)`` then runs on the loop.

        Lighter than ``run_in_executor`` (no asyncio future chained to the pool's, no second
        loop turn to run its callbacks): a session's one hand-off to a worker thread and back
        is a good part of the hub's CPU for it (docs/performance.md, "Sessions")."""
        future = self.verify_executor.submit(fn, *args)
        future.add_done_callback(functools.partial(_back_to_loop, self.loop, callback))

    def check_route(self, device_id: str, gateway_id: Optional[str],
                    gateway_problem: Optional[str]) -> Optional[str]:
        """Worker thread: why this relayed Hello is refused, or None."""
        return route_refusal(self.store, self.store.get_device(device_id), gateway_id,
                             gateway_problem)

    def verify_session(self, device_id: str, token: str, nonce: Optional[bytes], now: int,
                       gateway_id: Optional[str], gateway_problem: Optional[str],
                       fetch: bool = False) -> tuple:
        """Worker thread: verify the device's JWT, then its path (``RouteRefused``). Returns
        the Device and, with ``fetch``, what waits for it (``fetch_pending``), else None (also
        when that look failed: the device stands verified, and ``wake`` looks again)."""
        device = self.verifier.verify(device_id, token, nonce, now)
        refusal = route_refusal(self.store, device, gateway_id, gateway_problem)
        if refusal is not None:
            raise RouteRefused(refusal)
        pending = None
        if fetch:
            try:
                pending = self.fetch_pending(device_id, now)
            except Exception as exc:  # noqa: BLE001 - a store error: not the device's fault
                log.warning("cannot fetch pending work of %s: %s", device_id, exc)
        return device, pending

    def fetch_pending(self, device_id: str, now: int) -> tuple:
        """Worker thread: the device's state and its queued commands (expiring stale ones)."""
        state = self.store.get_state(device_id)
        return state, self.store.pending_commands(device_id, now)

    #: Command deliveries handed to the writer so far, and how many of those are not written
    #: yet (loop only). A session's look at pending work, taken off the writer while it
    #: verifies, is only trusted if no delivery was unrecorded when it started and none came
    #: after: otherwise it could show a command already sent as still queued.
    deliveries = 0
    deliveries_unrecorded = 0

    def record_deliveries(self, delivered: list, undeliverable: list, now: int) -> None:
        """Loop: record sent (and unsendable) commands on the writer (``mark_delivered``)."""
        self.deliveries += 1
        self.deliveries_unrecorded += 1
        self.write(self.mark_delivered, delivered, undeliverable, now).add_done_callback(
            self._deliveries_recorded)

    def _deliveries_recorded(self, future: asyncio.Future) -> None:
        self.deliveries_unrecorded -= 1

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


def _back_to_loop(loop: asyncio.AbstractEventLoop, callback: Callable,
                  future: concurrent.futures.Future) -> None:
    # Any thread: the worker's, or the one that cancelled the future at shutdown.
    try:
        loop.call_soon_threadsafe(callback, future)
    except RuntimeError:
        pass  # the loop is closed: the hub has stopped, and so has the connection


def _log_failure(future: asyncio.Future) -> None:
    if future.cancelled():
        return
    error = future.exception()
    if error is not None:
        log.warning("store call failed: %s: %s", type(error).__name__, error)
