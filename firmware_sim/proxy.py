"""The TCP path's fault injector: a loopback proxy between a board and the hub.

Rules (docs/simulator.md, "Fault injection"):
- The board connects to the proxy (its bundle names the proxy's port); the proxy connects on to
  the hub and relays bytes both ways. It never decrypts: the units faults act on are TLS records
  (5-byte header + payload), or stream frames (varint length + payload) on a plaintext
  ``--insecure-dev`` hub. Tampering with a TLS record is detected by TLS and ends that
  connection; the SDK must reconnect and resend what was not acknowledged.
- Once a destructive fault (drop, corrupt, truncate, duplicate) hits a connection, what that
  connection carries afterwards is not counted as intact: recovery is counted when a later
  connection carries traffic.
- ``disconnect`` (fault or method) closes the connection(s); with ``duration_ms`` new
  connections are refused (accepted and closed at once) for that long: a network outage.
- One thread per proxy, non-blocking sockets, order kept per direction, bounded buffers.
"""

from __future__ import annotations

import collections
import selectors
import socket
import threading
import time
from typing import Any, Deque, Dict, List, Optional, Tuple

from firmware_sim.faults import FaultPlan, LinkCounters, link_fault, mutate

_READ_SIZE = 65536
_IDLE_WAIT_S = 0.2
#: Bytes a direction may hold unsent before the proxy stops reading the other side.
_MAX_BUFFERED = 1 << 20
_TLS_CONTENT_TYPES = (20, 21, 22, 23, 24)
_DESTRUCTIVE = ("drop", "corrupt", "truncate", "duplicate")


class _UnitParser:
    """Cuts one direction's byte stream into TLS records (or stream frames, or raw chunks)."""

    def __init__(self) -> None:
        self.mode: Optional[str] = None
        self.buffer = bytearray()

    def feed(self, data: bytes) -> List[Tuple[bytes, int, int]]:
        """Return complete units as (bytes, body start, body end)."""
        self.buffer.extend(data)
        if self.mode is None and self.buffer:
            first = self.buffer[0]
            if first in _TLS_CONTENT_TYPES and (len(self.buffer) < 2 or self.buffer[1] == 3):
                self.mode = "tls"
            else:
                self.mode = "stream"
        units: List[Tuple[bytes, int, int]] = []
        while self.buffer:
            if self.mode == "tls":
                if len(self.buffer) < 5:
                    break
                size = 5 + int.from_bytes(self.buffer[3:5], "big")
                if len(self.buffer) < size:
                    break
                units.append((bytes(self.buffer[:size]), 5, size))
                del self.buffer[:size]
            elif self.mode == "stream":
                length = 0
                shift = 0
                index = 0
                complete = False
                while index < len(self.buffer) and index < 4:
                    byte = self.buffer[index]
                    length |= (byte & 0x7F) << shift
                    index += 1
                    if byte < 0x80:
                        complete = True
                        break
                    shift += 7
                if not complete:
                    if index >= 4:  # not this framing: carry the rest as it comes
                        self.mode = "raw"
                        continue
                    break
                size = index + length
                if len(self.buffer) < size:
                    break
                units.append((bytes(self.buffer[:size]), index, size))
                del self.buffer[:size]
            else:
                units.append((bytes(self.buffer), 0, len(self.buffer)))
                self.buffer = bytearray()
        return units


class _Connection:
    """One board connection relayed to the hub."""

    def __init__(self, number: int, board: socket.socket, hub: socket.socket) -> None:
        self.number = number
        self.sockets = {"up": hub, "down": board}  # where each direction's bytes go
        self.sources = {"up": board, "down": hub}
        self.parsers = {"up": _UnitParser(), "down": _UnitParser()}
        self.out: Dict[str, bytearray] = {"up": bytearray(), "down": bytearray()}
        self.delayed: Dict[str, Deque[Tuple[float, bytes, bool]]] = {
            "up": collections.deque(), "down": collections.deque()}
        self.registered = {"up": True, "down": True}  # source socket in the selector
        self.tainted = False
        self.closed = False
        self.eof = {"up": False, "down": False}


class FaultProxy:
    """A loopback TCP proxy to ``target`` that applies a ``FaultPlan`` (see the module rules)."""

    def __init__(self, target: Tuple[str, int], faults: Optional[FaultPlan] = None,
                 host: str = "127.0.0.1", port: int = 0, name: str = "proxy",
                 connect_timeout: float = 5.0) -> None:
        self.target = (target[0], int(target[1]))
        self.faults = faults
        self.host = host
        self.port = port
        self.name = name
        self.connect_timeout = connect_timeout
        self.counters = LinkCounters()
        self.accepted = 0
        self.refused = 0
        self._listener: Optional[socket.socket] = None
        self._selector = selectors.DefaultSelector()
        self._connections: Dict[int, _Connection] = {}
        self._lock = threading.RLock()
        self._refuse_until = 0.0
        self._cut_requested = False
        self._stopping = False
        self._thread: Optional[threading.Thread] = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)

    @property
    def address(self) -> Tuple[str, int]:
        """(host, port) boards connect to."""
        return (self.host, self.port)

    @property
    def connections(self) -> int:
        """Connections open now."""
        with self._lock:
            return len(self._connections)

    def start(self) -> "FaultProxy":
        """Bind and start relaying; returns self."""
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, self.port))
        listener.listen(128)
        listener.setblocking(False)
        self._listener = listener
        self.port = listener.getsockname()[1]
        self._selector.register(listener, selectors.EVENT_READ, ("listen", None))
        self._selector.register(self._wake_r, selectors.EVENT_READ, ("wake", None))
        self._thread = threading.Thread(target=self._run, name="fault-proxy-%s" % self.name,
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Close every connection and the listener."""
        self._stopping = True
        self._poke()
        if self._thread is not None:
            self._thread.join(5.0)
        for sock in (self._wake_r, self._wake_w):
            sock.close()

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    def disconnect(self, duration_ms: float = 0) -> None:
        """Cut every connection now; refuse new ones for ``duration_ms``."""
        with self._lock:
            self._refuse_until = max(self._refuse_until, time.monotonic() + duration_ms / 1000.0)
            self._cut_requested = True
        self._poke()

    def _poke(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    # -- the thread ------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stopping:
                timeout = self._next_timeout()
                for key, events in self._selector.select(timeout):
                    kind, connection = key.data
                    if kind == "listen":
                        self._accept()
                    elif kind == "wake":
                        try:
                            self._wake_r.recv(4096)
                        except OSError:
                            pass
                    elif not connection.closed:
                        direction = kind
                        if events & selectors.EVENT_READ:
                            self._read(connection, direction)
                        if not connection.closed and events & selectors.EVENT_WRITE:
                            self._flush(connection, "up" if direction == "down" else "down")
                with self._lock:
                    if self._cut_requested:
                        self._cut_requested = False
                        for connection in list(self._connections.values()):
                            self._close(connection)
                self._release_delayed()
        finally:
            for connection in list(self._connections.values()):
                self._close(connection)
            if self._listener is not None:
                try:
                    self._selector.unregister(self._listener)
                except (KeyError, ValueError):
                    pass
                self._listener.close()
            self._selector.close()

    def _next_timeout(self) -> float:
        wait = _IDLE_WAIT_S
        now = time.monotonic()
        for connection in self._connections.values():
            for queue in connection.delayed.values():
                if queue:
                    wait = min(wait, max(0.0, queue[0][0] - now))
        return wait

    def _accept(self) -> None:
        assert self._listener is not None
        try:
            board, _address = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        if time.monotonic() < self._refuse_until:
            self.refused += 1
            board.close()
            return
        try:
            hub = socket.create_connection(self.target, timeout=self.connect_timeout)
        except OSError:
            board.close()
            self.refused += 1
            return
        for sock in (board, hub):
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.accepted += 1
        connection = _Connection(self.accepted, board, hub)
        with self._lock:
            self._connections[connection.number] = connection
        # The key's direction is the one whose *source* the socket is.
        self._selector.register(board, selectors.EVENT_READ, ("up", connection))
        self._selector.register(hub, selectors.EVENT_READ, ("down", connection))

    def _read(self, connection: _Connection, direction: str) -> None:
        source = connection.sources[direction]
        try:
            data = source.recv(_READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            # One side closed: pass what is pending on, then close both (a half-close is
            # not something the SmartX protocol uses).
            self._flush(connection, direction)
            self._close(connection)
            return
        for unit, start, end in connection.parsers[direction].feed(data):
            self._unit(connection, direction, unit, start, end)
            if connection.closed:
                return
        self._flush(connection, direction)

    def _unit(self, connection: _Connection, direction: str, unit: bytes, start: int,
              end: int) -> None:
        number = self.counters.frame(direction)
        link_event = (link_fault(self.faults, direction, number, self.counters)
                      if self.faults is not None else None)
        if link_event is None:
            self._queue(connection, direction, unit, not connection.tainted, 0.0)
            return
        self.counters.fault(link_event)
        if link_event.kind == "disconnect":
            with self._lock:
                self._refuse_until = max(self._refuse_until, time.monotonic()
                                         + link_event.param("duration_ms") / 1000.0)
            self._close(connection)
            return
        if link_event.kind in _DESTRUCTIVE:
            connection.tainted = True
        chunks, delay_ms = mutate(link_event, unit, start, end)
        for chunk in chunks:
            self._queue(connection, direction, chunk, False, delay_ms)

    def _queue(self, connection: _Connection, direction: str, data: bytes, intact: bool,
               delay_ms: float) -> None:
        queue = connection.delayed[direction]
        if not data:
            return
        if delay_ms <= 0 and not queue:
            self._emit(connection, direction, data, intact)
            return
        release = time.monotonic() + delay_ms / 1000.0
        if queue:
            release = max(release, queue[-1][0])
        queue.append((release, data, intact))

    def _emit(self, connection: _Connection, direction: str, data: bytes, intact: bool) -> None:
        self.counters.delivered(direction, intact)
        connection.out[direction].extend(data)

    def _release_delayed(self) -> None:
        now = time.monotonic()
        for connection in list(self._connections.values()):
            for direction, queue in connection.delayed.items():
                moved = False
                while queue and queue[0][0] <= now:
                    _release, data, intact = queue.popleft()
                    self._emit(connection, direction, data, intact)
                    moved = True
                if moved and not connection.closed:
                    self._flush(connection, direction)

    def _flush(self, connection: _Connection, direction: str) -> None:
        """Send what ``direction`` holds; watch for writability if the socket is full."""
        if connection.closed:
            return
        buffer = connection.out[direction]
        sink = connection.sockets[direction]
        while buffer:
            try:
                sent = sink.send(buffer)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._close(connection)
                return
            del buffer[:sent]
        self._update_interest(connection)

    def _update_interest(self, connection: _Connection) -> None:
        if connection.closed:
            return
        for direction in ("up", "down"):
            source = connection.sources[direction]
            # This socket is the sink of the other direction.
            other = "down" if direction == "up" else "up"
            events = 0
            if len(connection.out[direction]) < _MAX_BUFFERED:
                events |= selectors.EVENT_READ
            if connection.out[other]:
                events |= selectors.EVENT_WRITE
            registered = connection.registered[direction]
            try:
                if events and registered:
                    self._selector.modify(source, events, (direction, connection))
                elif events:
                    self._selector.register(source, events, (direction, connection))
                elif registered:
                    # Its bytes cannot go anywhere yet: stop reading it (back-pressure).
                    self._selector.unregister(source)
            except (KeyError, ValueError, OSError):
                pass
            connection.registered[direction] = bool(events)

    def _close(self, connection: _Connection) -> None:
        if connection.closed:
            return
        connection.closed = True
        with self._lock:
            self._connections.pop(connection.number, None)
        for direction, sock in connection.sources.items():
            try:
                if connection.registered[direction]:
                    self._selector.unregister(sock)
            except (KeyError, ValueError):
                pass
            try:
                sock.close()
            except OSError:
                pass
