"""The test host's gateway: each board's frames relayed to the hub over TLS, one connection per
board session, with the gateway's client certificate.

Rules (docs/hil.md, "The gateway fixture"; docs/gateway.md for the production gateway, which
follows the same rules in examples/pi_gateway.py):
- A ``Hello`` from the board starts a board session: the relay closes that board's previous
  hub connection, if any, and opens a new TLS connection for it. Frames are relayed unchanged
  both ways (serial framing on the board side, stream framing on the hub side). The relay
  never answers a challenge: the board's own JWT goes to the hub, so the hub verifies the board
  end to end; the certificate only tells the hub which gateway carries the session.
- When the relay has no hub connection to give a board session (the hub is unreachable, or it
  dropped the connection without a ``Close``) it sends the board a ``Close`` itself, reason
  ``internal_error`` with a detail starting "gateway:", so the board's SDK reconnects with its
  back-off at once instead of waiting for its handshake or keep-alive timeout. That is the only
  message the relay ever makes.
- Frames from the board with no hub connection open are dropped (counted): that session is
  gone, and the board will say Hello again.
- A serial line has no session ids: after a board resets mid-handshake, a challenge meant for
  its previous session can still reach it, and it answers that one. The relay reads the
  ``nonce`` claim of each ``AuthResponse`` (a JWT's claims are readable, only not forgeable)
  and drops an answer to any challenge but the current connection's: the board's session then
  fails and restarts on its own, instead of costing the gateway's address an auth failure.
- The board's port failing (unplugged) closes its hub connection: the hub sees the board leave.
  When the port is back, and whenever the board sends a frame (not a Hello) while it has no hub
  connection, the relay tells the board its session is gone (the ``Close`` above, at most once
  a second), so a board that missed the end of its session reconnects at once.
- Everything the relay does goes to ``log`` (one line each): hub sessions opened and closed
  with the hub's reason, relay-made Closes, errors. Payloads are never logged.
"""

from __future__ import annotations

import base64
import json
import socket
import ssl
import threading
import time
from typing import Any, Callable, List, Optional, Tuple

from smartx_device import messages as m
from smartx_device.errors import ProtocolError
from smartx_device.framing import StreamFramer
from smartx_device.reasons import CLOSE_INTERNAL_ERROR, reason_name

from hil.link import BoardPort

CONNECT_TIMEOUT_S = 5.0
#: The least time between two "no session" Closes to one board.
TELL_INTERVAL_S = 1.0
RECV_SIZE = 65536


def decode(payload: bytes) -> Optional[m.Message]:
    """The message in a frame's payload (None if it is no valid message)."""
    try:
        return m.decode_message(payload)
    except ProtocolError:
        return None


def message_type(payload: bytes) -> Optional[int]:
    """The message type of a frame's payload (None if it is no valid message)."""
    message = decode(payload)
    return None if message is None else message.TYPE


def b64url(data: bytes) -> str:
    """base64url without padding (how the device JWT carries the nonce)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def token_nonce(token: str) -> Optional[str]:
    """The ``nonce`` claim of a device JWT, read without verifying it (None if unreadable)."""
    try:
        claims = token.split(".")[1]
        claims += "=" * (-len(claims) % 4)
        nonce = json.loads(base64.urlsafe_b64decode(claims.encode("ascii")))["nonce"]
    except (IndexError, ValueError, KeyError, TypeError, UnicodeError):
        return None
    return nonce if isinstance(nonce, str) else None


def close_payload(detail: str, reason: int = CLOSE_INTERNAL_ERROR) -> bytes:
    """The encoded ``Close`` the relay sends a board when it has no hub connection for it."""
    return m.encode_message(m.Close(reason=reason, detail=detail[:m.MAX_DETAIL_LENGTH]))


class _HubConnection:
    """One TLS connection to the hub carrying one board session."""

    def __init__(self, sock: ssl.SSLSocket, number: int) -> None:
        self.sock = sock
        self.number = number
        self.framer = StreamFramer()
        self.closed = False
        self.close_reason: Optional[int] = None  # the hub's Close, if it sent one
        self.challenge_nonce: Optional[str] = None  # base64url of this connection's challenge
        self.send_lock = threading.Lock()

    def shutdown(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes our reader thread
        except OSError:
            pass
        try:
            self.sock.close()
        except OSError:
            pass


class BoardRelay:
    """Relays one board (its ``BoardPort``) to the hub (see the module rules)."""

    def __init__(self, port: BoardPort, hub: Tuple[str, int], context: ssl.SSLContext,
                 server_name: str, log: Optional[Callable[[str], None]] = None) -> None:
        self.port = port
        self.hub = (hub[0], int(hub[1]))
        self.context = context
        self.server_name = server_name
        self._log = log
        self.sessions = 0  # hub connections opened
        self.frames_up = 0
        self.frames_down = 0
        self.bytes_up = 0  # payload bytes relayed board -> hub
        self.bytes_down = 0
        self.dropped_up = 0  # board frames with no hub connection to carry them
        self.relay_closes = 0  # Closes the relay made itself
        self.stale_answers = 0  # AuthResponses to an earlier session's challenge, dropped
        self.hub_closes: List[int] = []  # reasons of the Closes the hub sent
        self.errors: List[str] = []
        self._lock = threading.Lock()
        self._connection: Optional[_HubConnection] = None
        self._stopped = False
        self._told_at = 0.0
        port.on_frame = self._up
        port.on_lost = self._port_lost
        port.on_opened = self._port_opened

    def _say(self, text: str) -> None:
        if self._log is not None:
            self._log("%s: %s" % (self.port.name, text))

    @property
    def connected(self) -> bool:
        """True while a hub connection is open for the board."""
        connection = self._connection
        return connection is not None and not connection.closed

    def retarget(self, hub: Tuple[str, int]) -> None:
        """Relay later sessions to another hub address (a hub restarted elsewhere)."""
        self.hub = (hub[0], int(hub[1]))

    def stop(self) -> None:
        """Close the hub connection; relay nothing more."""
        self._stopped = True
        self.port.on_frame = None
        self.port.on_lost = None
        self.port.on_opened = None
        with self._lock:
            connection, self._connection = self._connection, None
        if connection is not None:
            connection.shutdown()

    def drop_hub_connection(self) -> None:
        """Cut the board's hub connection now, as a failing uplink would (the board is told)."""
        with self._lock:
            connection, self._connection = self._connection, None
        if connection is not None:
            connection.shutdown()
            self._tell_board("gateway: uplink to the hub lost")

    # -- board -> hub ----------------------------------------------------------------------

    def _up(self, payload: bytes) -> None:
        if self._stopped:
            return
        message = decode(payload)
        kind = None if message is None else message.TYPE
        if kind == m.HELLO:
            self._new_session()
        connection = self._connection
        if connection is None or connection.closed:
            self.dropped_up += 1
            if kind not in (m.HELLO, m.CLOSE, None) \
                    and time.monotonic() - self._told_at >= TELL_INTERVAL_S:
                self._tell_board("gateway: no hub session for this board")
            return
        if kind == m.AUTH_RESPONSE and token_nonce(message.token) != connection.challenge_nonce:
            self.stale_answers += 1
            self._say("dropped the board's answer to an earlier session's challenge")
            return
        try:
            with connection.send_lock:
                connection.sock.sendall(connection.framer.encode(payload))
        except (OSError, ProtocolError) as exc:
            self.errors.append("hub send: %s" % exc)
            self._say("hub connection %d failed on send: %s" % (connection.number, exc))
            self._end(connection, "gateway: the hub connection failed")
            return
        self.frames_up += 1
        self.bytes_up += len(payload)

    def _new_session(self) -> None:
        with self._lock:
            old, self._connection = self._connection, None
        if old is not None:
            old.shutdown()
            self._say("board said Hello again: hub connection %d closed" % old.number)
        try:
            raw = socket.create_connection(self.hub, timeout=CONNECT_TIMEOUT_S)
        except OSError as exc:
            self.errors.append("hub connect: %s" % exc)
            self._say("cannot reach the hub at %s:%d: %s" % (self.hub[0], self.hub[1], exc))
            self._tell_board("gateway: the hub is unreachable")
            return
        try:
            sock = self.context.wrap_socket(raw, server_hostname=self.server_name)
        except (OSError, ssl.SSLError) as exc:
            raw.close()
            self.errors.append("hub TLS: %s" % exc)
            self._say("TLS with the hub failed: %s" % exc)
            self._tell_board("gateway: TLS with the hub failed")
            return
        sock.settimeout(None)
        self.sessions += 1
        connection = _HubConnection(sock, self.sessions)
        with self._lock:
            if self._stopped:
                connection.shutdown()
                return
            self._connection = connection
        self._say("hub connection %d opened for a new board session" % connection.number)
        threading.Thread(target=self._down, args=(connection,), daemon=True,
                         name="hil-relay-%s-%d" % (self.port.name, connection.number)).start()

    def _port_lost(self, why: str) -> None:
        with self._lock:
            connection, self._connection = self._connection, None
        if connection is not None:
            connection.shutdown()
            self._say("board link lost (%s): hub connection %d closed" % (why, connection.number))

    def _port_opened(self) -> None:
        if self.port.losses:
            # The board may still believe in a session that ended with the link.
            self._tell_board("gateway: the link to the board was down")

    # -- hub -> board ----------------------------------------------------------------------

    def _down(self, connection: _HubConnection) -> None:
        while not connection.closed:
            try:
                data = connection.sock.recv(RECV_SIZE)
            except (OSError, ssl.SSLError) as exc:
                if not connection.closed:
                    self.errors.append("hub receive: %s" % exc)
                data = b""
            try:
                payloads = connection.framer.feed(data)
            except ProtocolError as exc:
                self.errors.append("hub framing: %s" % exc)
                payloads, data = [], b""
            for payload in payloads:
                message = decode(payload)
                kind = None if message is None else message.TYPE
                if kind == m.AUTH_CHALLENGE:
                    connection.challenge_nonce = b64url(message.nonce)
                elif kind == m.CLOSE:
                    connection.close_reason = message.reason
                    self.hub_closes.append(connection.close_reason)
                    self._say("hub closed the board session: %s"
                              % reason_name(connection.close_reason))
                if self._connection is connection:  # never into a newer board session
                    self.port.send_frame(payload)
                    self.frames_down += 1
                    self.bytes_down += len(payload)
            if not data:
                break
        current = self._connection is connection
        self._end(connection, "gateway: the hub connection ended" if current else None)

    def _end(self, connection: _HubConnection, tell: Optional[str]) -> None:
        with self._lock:
            current = self._connection is connection
            if current:
                self._connection = None
        connection.shutdown()
        if current:
            self._say("hub connection %d ended" % connection.number)
            if tell and connection.close_reason is None:
                self._tell_board(tell)

    def _tell_board(self, detail: str) -> None:
        if self._stopped:
            return
        self._told_at = time.monotonic()
        if self.port.send_frame(close_payload(detail)):
            self.relay_closes += 1
            self._say("told the board: %s" % detail)


def wait_until(predicate: Callable[[], Any], timeout: float, what: str,
               interval: float = 0.02) -> Any:
    """Poll ``predicate`` until truthy (returned); ``TimeoutError`` naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError("timed out after %.1f s waiting for %s" % (timeout, what))
        time.sleep(interval)
