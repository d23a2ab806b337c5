"""The smallest gateway: one board's serial port relayed to the hub over TLS, frame by frame.

Rules (docs/simulator.md, "Serial boards and the bridge"):
- The bridge opens the port as any host program does (pyserial, ``path`` or URL), decodes the
  serial framing, and sends each frame's payload to the hub on a TLS connection with stream
  framing; the hub's frames come back the same way. It never answers for the board: the board's
  own Hello, JWT and messages pass through unchanged (docs/protocol.md, section 6).
- A ``Hello`` from the board starts a new session, so the bridge opens a fresh TLS connection
  for it (closing any older one). Frames that arrive with no connection open are dropped: the
  board's session is gone, and its SDK will say Hello again.
- Console text between frames is collected (``console``) and handed to ``on_console``.
- The port vanishing (unplugged) closes the board's TLS connection; the bridge reopens the
  same path until it is back. One thread; ``stop()`` ends it.
For several boards and discovery, see the gateway in examples/ (issue 7); this class is what
the simulator's tests and ``smartx-sim --serial`` use.
"""

from __future__ import annotations

import select
import socket
import ssl
import threading
import time
from typing import Any, Callable, List, Optional, Tuple

from smartx_device import messages
from smartx_device.errors import ProtocolError
from smartx_device.framing import ConsoleText, SerialFramer, StreamFramer

_POLL_S = 0.1
_REOPEN_S = 0.2


class SerialBridge:
    """Relay one serial board to the hub (see the module rules)."""

    def __init__(self, port: str, hub: Tuple[str, int], ca_pem: str, server_name: str,
                 baudrate: int = 115200, on_console: Optional[Callable[[str], None]] = None,
                 connect_timeout: float = 5.0) -> None:
        self.port = port
        self.hub = (hub[0], int(hub[1]))
        self.server_name = server_name
        self.baudrate = baudrate
        self.on_console = on_console
        self.connect_timeout = connect_timeout
        self.console = ""
        self.frames_up = 0
        self.frames_down = 0
        self.dropped_up = 0  # board frames with no hub connection to take them
        self.sessions = 0  # TLS connections opened
        self.port_opens = 0
        self.errors: List[str] = []
        self._context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self._context.minimum_version = ssl.TLSVersion.TLSv1_2
        self._context.load_verify_locations(cadata=ca_pem)
        self._serial: Any = None
        self._serial_framer = SerialFramer()
        self._tls: Optional[ssl.SSLSocket] = None
        self._stream_framer: Optional[StreamFramer] = None
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="serial-bridge", daemon=True)

    def start(self) -> "SerialBridge":
        """Start relaying in a background thread."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop relaying; close the port and the hub connection."""
        self._stopping = True
        self._thread.join(5.0)
        self._close_tls()
        self._close_serial()

    def __enter__(self) -> "SerialBridge":
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    @property
    def connected(self) -> bool:
        """True while a TLS connection to the hub is open for the board."""
        return self._tls is not None

    # -- the loop --------------------------------------------------------------------------

    def _run(self) -> None:
        import serial

        while not self._stopping:
            if self._serial is None:
                try:
                    self._serial = serial.serial_for_url(self.port, baudrate=self.baudrate,
                                                         timeout=0)
                    self._serial_framer = SerialFramer()
                    self.port_opens += 1
                except (serial.SerialException, OSError, ValueError):
                    time.sleep(_REOPEN_S)
                    continue
            watched = [self._serial.fileno()]
            if self._tls is not None:
                watched.append(self._tls.fileno())
            try:
                readable, _, _ = select.select(watched, [], [], _POLL_S)
            except (OSError, ValueError):
                readable = watched
            if self._serial.fileno() in readable:
                self._pump_serial()
            else:
                # A quiet line: a finished console line need not wait for the next frame.
                for item in self._serial_framer.flush_console():
                    self._console(item.text)
            if self._tls is not None and (self._tls.fileno() in readable or self._tls.pending()):
                self._pump_tls()

    def _pump_serial(self) -> None:
        import serial

        try:
            data = self._serial.read(max(1, self._serial.in_waiting))
        except (serial.SerialException, OSError) as exc:
            self.errors.append("port: %s" % exc)
            self._close_serial()
            self._close_tls()  # the board is gone: so is its session
            return
        if not data:
            return
        for item in self._serial_framer.feed(data):
            if isinstance(item, ConsoleText):
                self._console(item.text)
            else:
                self._up(item)

    def _console(self, text: str) -> None:
        self.console += text
        if self.on_console is not None:
            self.on_console(text)

    def _up(self, payload: bytes) -> None:
        self.frames_up += 1
        if _is_hello(payload):
            self._close_tls()
            self._open_tls()
        if self._tls is None or self._stream_framer is None:
            self.dropped_up += 1
            return
        try:
            self._tls.settimeout(self.connect_timeout)  # a blocking send, bounded
            self._tls.sendall(self._stream_framer.encode(payload))
            self._tls.setblocking(False)
        except (OSError, ProtocolError) as exc:
            self.errors.append("hub send: %s" % exc)
            self._close_tls()

    def _pump_tls(self) -> None:
        assert self._tls is not None and self._stream_framer is not None
        while self._tls is not None:
            try:
                data = self._tls.recv(65536)
            except (ssl.SSLWantReadError, socket.timeout, BlockingIOError):
                return
            except OSError as exc:
                self.errors.append("hub receive: %s" % exc)
                data = b""
            if not data:
                self._close_tls()
                return
            try:
                payloads = self._stream_framer.feed(data)
            except ProtocolError as exc:
                self.errors.append("hub framing: %s" % exc)
                self._close_tls()
                return
            for payload in payloads:
                self.frames_down += 1
                try:
                    self._serial.write(self._serial_framer.encode(payload))
                except Exception as exc:  # the port went away mid-write
                    self.errors.append("port write: %s" % exc)
                    self._close_serial()
                    self._close_tls()
                    return
            if not self._tls.pending():
                return

    # -- connections -----------------------------------------------------------------------

    def _open_tls(self) -> None:
        try:
            raw = socket.create_connection(self.hub, timeout=self.connect_timeout)
            tls = self._context.wrap_socket(raw, server_hostname=self.server_name)
        except OSError as exc:
            self.errors.append("hub connect: %s" % exc)
            return
        tls.setblocking(False)
        self._tls = tls
        self._stream_framer = StreamFramer()
        self.sessions += 1

    def _close_tls(self) -> None:
        if self._tls is not None:
            try:
                self._tls.close()
            except OSError:
                pass
        self._tls = None
        self._stream_framer = None

    def _close_serial(self) -> None:
        if self._serial is not None:
            try:
                self._serial.close()
            except Exception:  # already gone
                pass
        self._serial = None


def _is_hello(payload: bytes) -> bool:
    try:
        return messages.decode_message(payload).TYPE == messages.HELLO
    except ProtocolError:
        return False
