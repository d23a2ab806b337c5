#!/usr/bin/env python3
"""SmartX gateway for a Raspberry Pi: boards on serial ports, bridged to the hub over TLS.

    python3 pi_gateway.py --bundle gateway.smartx.json [--hub HOST:PORT] [PORT ...]

Set-up and operation: docs/gateway.md. The rules it keeps (docs/security.md, "Gateways"):

- **Identity.** The bundle comes from ``smartx-hub device add NAME --gateway``: it pins the hub
  CA and carries the gateway's TLS client certificate. Every hub connection presents it, so
  the hub knows which gateway carries a board, and relays only for boards assigned to it
  (``device add BOARD --via NAME``).
- **End to end.** For each board, one TLS connection per board session: a ``Hello`` from the
  board opens a new connection (closing the board's previous one). Frames are relayed unchanged
  both ways: serial framing (COBS + CRC, console text between frames) on the board side, stream
  framing on the hub side. The board answers the hub's challenge with its own JWT; the gateway
  holds no board key and never answers for one.
- **The one message it makes.** When it has no hub connection to give a board session (the hub
  is unreachable, or the connection ended without the hub's ``Close``), the gateway sends the
  board a ``Close`` itself: reason ``internal_error``, detail starting ``gateway:``, and while it
  backs off from an unreachable hub, ``retry_after_ms``. The board's SDK then reconnects with
  its back-off instead of waiting for a handshake or keep-alive timeout. It also drops a board's
  ``AuthResponse`` that answers another connection's challenge (a stale challenge reaching a
  board that reset mid-handshake), so the hub does not count it as a failed login.
- **Ports.** The serial ports named on the command line (paths or pyserial URLs), or, with none
  named, every ``/dev/ttyACM*`` and ``/dev/ttyUSB*`` (``--glob`` to change), rescanned every few
  seconds. A port that fails (a board unplugged) is closed, its hub connection with it, and
  reopened with back-off while its path exists again; a new path gets a new bridge.
- **The hub.** ``--hub HOST:PORT``, or found with zeroconf by the hub id in the bundle (never
  trusted: TLS still verifies the pinned CA). When connecting fails, the gateway backs off with
  full jitter (500 ms doubling to 30 s) before it tries again, and rediscovers a discovered hub.
- **Console.** Text between frames is logged per board, a line at a time.
- One thread runs every port and connection (a selector); TLS connects run on a small pool.
  SIGINT/SIGTERM stop it: boards are told ``shutting_down``, connections closed.

Imports only the device SDK (and pyserial, zeroconf through it): copy this file and the
``smartx_device`` package to the Pi.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import glob
import json
import logging
import os
import selectors
import signal
import socket
import ssl
import sys
import tempfile
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

from smartx_device import messages as m
from smartx_device.backoff import Backoff
from smartx_device.errors import ProtocolError
from smartx_device.framing import ConsoleText, SerialFramer, StreamFramer
from smartx_device.reasons import CLOSE_INTERNAL_ERROR, CLOSE_SHUTTING_DOWN, reason_name

log = logging.getLogger("smartx.gateway")

DEFAULT_GLOBS = ("/dev/ttyACM*", "/dev/ttyUSB*")
RESCAN_S = 2.0
CONNECT_TIMEOUT_S = 5.0
DISCOVERY_TIMEOUT_MS = 3000
#: A quiet line releases a finished console line after this long (SerialFramer.flush_console).
CONSOLE_FLUSH_S = 0.1
#: The least time between two "no session" Closes to one board.
TELL_INTERVAL_S = 1.0
#: Serial bytes queued for a board that does not take them: past this the board is reset
#: (its port closed and reopened), as a gateway cannot hold unbounded data for it.
MAX_SERIAL_BACKLOG = 65536
MAX_HUB_BACKLOG = 262144
READ_SIZE = 65536


class GatewayError(Exception):
    """The gateway cannot start: a bad bundle, a bad option."""


# -- configuration -----------------------------------------------------------------------------


class Identity:
    """The gateway's bundle: hub id, CA, client certificate (written to files for ``ssl``)."""

    def __init__(self, path: str, runtime_dir: Optional[str] = None) -> None:
        try:
            with open(path, "r", encoding="utf-8") as handle:
                bundle = json.load(handle)
        except (OSError, ValueError) as exc:
            raise GatewayError("cannot read the gateway bundle %s: %s" % (path, exc)) from None
        missing = [key for key in ("device_id", "hub_id", "ca_pem", "client_cert_pem",
                                   "client_key_pem") if not isinstance(bundle.get(key), str)]
        if missing:
            raise GatewayError("%s is not a gateway bundle (missing %s): enrol the gateway with "
                               "smartx-hub device add NAME --gateway" % (path, ", ".join(missing)))
        self.device_id: str = bundle["device_id"]
        self.hub_id: str = bundle["hub_id"]
        self.hub_host: Optional[str] = bundle.get("hub_host") or None
        self.hub_port: Optional[int] = bundle.get("hub_port") or None
        self.server_name: str = bundle.get("server_name") or self.hub_host or "localhost"
        # ssl loads a certificate chain only from files: a private directory, removed at exit.
        self.directory = tempfile.mkdtemp(prefix="smartx-gateway-", dir=runtime_dir)
        os.chmod(self.directory, 0o700)
        cert_path = os.path.join(self.directory, "client.pem")
        key_path = os.path.join(self.directory, "client.key")
        for target, text in ((cert_path, bundle["client_cert_pem"]),
                             (key_path, bundle["client_key_pem"])):
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w", encoding="ascii") as handle:
                handle.write(text)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_verify_locations(cadata=bundle["ca_pem"])
            context.load_cert_chain(cert_path, key_path)
        except (ssl.SSLError, ValueError) as exc:
            self.remove_files()
            raise GatewayError("the gateway bundle's certificates do not load: %s" % exc) from None
        self.context = context

    def remove_files(self) -> None:
        """Delete the certificate files (the bundle stays where it is)."""
        for name in ("client.pem", "client.key"):
            try:
                os.unlink(os.path.join(self.directory, name))
            except FileNotFoundError:
                pass
        try:
            os.rmdir(self.directory)
        except OSError:
            pass


def parse_hub(text: str) -> Tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) as a pair."""
    host, _, port = text.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError("expected HOST:PORT, got %r" % text)
    return host, int(port)


# -- helpers -----------------------------------------------------------------------------------


def decode(payload: bytes) -> Optional[m.Message]:
    """The message in a payload (None if it is none: the hub decides what to do with it)."""
    try:
        return m.decode_message(payload)
    except ProtocolError:
        return None


def token_nonce(token: str) -> Optional[str]:
    """The ``nonce`` claim of a device JWT, read (not verified); None if unreadable."""
    try:
        claims = token.split(".")[1]
        claims += "=" * (-len(claims) % 4)
        nonce = json.loads(base64.urlsafe_b64decode(claims.encode("ascii")))["nonce"]
    except (IndexError, ValueError, KeyError, TypeError, UnicodeError):
        return None
    return nonce if isinstance(nonce, str) else None


def b64url(data: bytes) -> str:
    """base64url without padding, as the JWT carries the nonce."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


class HubLink:
    """One TLS connection to the hub carrying one board session (non-blocking once open)."""

    def __init__(self, sock: ssl.SSLSocket, number: int) -> None:
        self.sock = sock
        self.number = number
        self.framer = StreamFramer()
        self.out = bytearray()
        self.challenge_nonce: Optional[str] = None
        self.close_reason: Optional[int] = None

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class Bridge:
    """One board: its port, framer, pending connect and hub connection."""

    def __init__(self, url: str, baudrate: int) -> None:
        self.url = url
        # /dev/ttyACM0 is "ttyACM0" in the log; any other path or URL is given whole.
        self.name = url[5:] if url.startswith("/dev/") else url
        self.baudrate = baudrate
        self.serial: Any = None
        self.fd: Optional[int] = None
        self.framer = SerialFramer()
        self.serial_out = bytearray()
        self.link: Optional[HubLink] = None
        self.connecting: Optional[concurrent.futures.Future] = None
        self.pending_up: List[bytes] = []  # board frames waiting for the connection opening
        self.reopen = Backoff(base_ms=200, cap_ms=5000)
        self.reopen_at = 0.0
        self.last_byte_at = 0.0
        self.told_at = 0.0
        self.lost_port = False
        self.console = ""
        self.stats = {"frames_up": 0, "frames_down": 0, "bytes_up": 0, "bytes_down": 0,
                      "sessions": 0, "port_opens": 0, "port_losses": 0, "relay_closes": 0,
                      "dropped_up": 0, "stale_answers": 0}


# -- the gateway -------------------------------------------------------------------------------


class Gateway:
    """Bridges every board port to the hub (see the module rules)."""

    def __init__(self, identity: Identity, ports: List[str], globs: List[str],
                 hub: Optional[Tuple[str, int]] = None, discover: bool = False,
                 discover_interfaces: Optional[List[str]] = None, baudrate: int = 115200,
                 hub_backoff: Optional[Backoff] = None) -> None:
        self.identity = identity
        self.fixed_ports = list(ports)
        self.globs = list(globs) if not ports else []
        self.baudrate = baudrate
        self.hub_address: Optional[Tuple[str, int]] = hub
        if self.hub_address is None and not discover and identity.hub_host and identity.hub_port:
            self.hub_address = (identity.hub_host, int(identity.hub_port))
        self.discover = self.hub_address is None
        self.discover_interfaces = discover_interfaces
        self.hub_backoff = hub_backoff or Backoff(base_ms=500, cap_ms=30000)
        self.hub_down_until = 0.0
        self.bridges: Dict[str, Bridge] = {}
        self.selector = selectors.DefaultSelector()
        self.pool = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="gw-connect")
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)  # a full pipe means a wake-up is pending already
        self.selector.register(self._wake_r, selectors.EVENT_READ, ("wake", None))
        self._done: List[Tuple[Bridge, concurrent.futures.Future]] = []
        self._done_lock = threading.Lock()
        self._stopping = threading.Event()
        self._next_scan = 0.0
        self._sessions = 0
        self.hub_failures = 0

    # -- running -------------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the loop to end (thread- and signal-safe)."""
        self._stopping.set()
        self._wake()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:  # BlockingIOError: the loop has a wake-up waiting; or closed
            pass

    def run(self) -> None:
        """Run until ``stop``."""
        log.info("gateway %s for hub %s: %s", self.identity.device_id, self.identity.hub_id,
                 "hub at %s:%d" % self.hub_address if self.hub_address else "finding the hub"
                 " with zeroconf")
        try:
            while not self._stopping.is_set():
                now = time.monotonic()
                if now >= self._next_scan:
                    self._scan()
                    self._next_scan = now + RESCAN_S
                timeout = self._open_ports(now)
                for key, events in self.selector.select(timeout):
                    self._ready(key.data, events)
                self._finish_connects()
                self._flush_consoles(time.monotonic())
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        for bridge in self.bridges.values():
            if bridge.link is not None or bridge.connecting is not None:
                self._tell(bridge, "gateway: shutting down", CLOSE_SHUTTING_DOWN, force=True)
            self._drop_link(bridge)
            self._flush_serial(bridge)
            self._close_port(bridge, "gateway stopping")
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.selector.close()
        self._wake_r.close()
        self._wake_w.close()
        log.info("gateway stopped")

    # -- ports ---------------------------------------------------------------------------------

    def _scan(self) -> None:
        urls = list(self.fixed_ports)
        for pattern in self.globs:
            urls.extend(sorted(glob.glob(pattern)))
        for url in urls:
            if url not in self.bridges:
                self.bridges[url] = Bridge(url, self.baudrate)
                log.info("[%s] new board port %s", self.bridges[url].name, url)

    def _open_ports(self, now: float) -> float:
        """Open the ports that are due; return how long the selector may sleep."""
        timeout = RESCAN_S
        for bridge in self.bridges.values():
            if bridge.serial is None:
                if now >= bridge.reopen_at:
                    self._open_port(bridge, now)
                if bridge.serial is None:
                    timeout = min(timeout, max(0.0, bridge.reopen_at - now))
            if bridge.serial is not None and bridge.fd is None:
                timeout = min(timeout, 0.02)  # a port without a descriptor (rfc2217) is polled
                self._read_port(bridge)
            if bridge.framer.buffered:
                timeout = min(timeout, CONSOLE_FLUSH_S)
        return timeout

    def _open_port(self, bridge: Bridge, now: float) -> None:
        import serial

        local = not ("://" in bridge.url)
        if local and not os.path.exists(bridge.url):
            bridge.reopen_at = now + bridge.reopen.next_delay() / 1000.0
            return
        try:
            # DTR and RTS stay asserted (pyserial's and mpremote's default): MicroPython's native
            # USB (RP2040, ESP32-S3) sends nothing to a host that has not set DTR, and the ESP32
            # auto-reset circuit keeps the chip running while both are set.
            port = serial.serial_for_url(bridge.url, baudrate=bridge.baudrate, timeout=0,
                                         write_timeout=0, do_not_open=True)
            port.exclusive = True
            port.open()
        except Exception as exc:  # noqa: BLE001 - SerialException, OSError, ValueError
            delay = bridge.reopen.next_delay()
            bridge.reopen_at = now + delay / 1000.0
            log.debug("[%s] cannot open %s (%s); again in %d ms", bridge.name, bridge.url, exc,
                      delay)
            return
        bridge.serial = port
        bridge.framer = SerialFramer()
        bridge.serial_out = bytearray()
        bridge.reopen.reset()
        bridge.stats["port_opens"] += 1
        try:
            bridge.fd = port.fileno()
            self.selector.register(bridge.fd, selectors.EVENT_READ, ("serial", bridge))
        except (AttributeError, OSError, ValueError, KeyError):
            bridge.fd = None
        log.info("[%s] port open", bridge.name)
        if bridge.lost_port:
            # The board may still believe in a session that ended with the link.
            self._tell(bridge, "gateway: the link to the board was down", force=True)

    def _close_port(self, bridge: Bridge, why: str) -> None:
        if bridge.serial is None:
            return
        if bridge.fd is not None:
            try:
                self.selector.unregister(bridge.fd)
            except (KeyError, ValueError):
                pass
        try:
            bridge.serial.close()
        except Exception:  # noqa: BLE001 - already gone
            pass
        bridge.serial = None
        bridge.fd = None
        for item in bridge.framer.feed(b""):
            if isinstance(item, ConsoleText):
                self._console(bridge, item.text)
        bridge.reopen_at = time.monotonic() + bridge.reopen.next_delay() / 1000.0

    def _port_lost(self, bridge: Bridge, why: str) -> None:
        log.warning("[%s] port lost (%s): closing its hub connection, reopening with back-off",
                    bridge.name, why)
        bridge.stats["port_losses"] += 1
        bridge.lost_port = True
        self._close_port(bridge, why)
        self._drop_link(bridge)

    def _read_port(self, bridge: Bridge) -> None:
        if bridge.fd is not None:
            # The selector said readable. Read the descriptor directly: pyserial's read runs
            # select() on it, which fails for descriptors past 1023 (many boards).
            try:
                data = os.read(bridge.fd, READ_SIZE)
            except BlockingIOError:
                return
            except OSError as exc:  # EIO: the adapter was pulled out
                self._port_lost(bridge, str(exc))
                return
            if not data:
                self._port_lost(bridge, "the port reported data but gave none (unplugged?)")
                return
        else:
            try:
                data = bridge.serial.read(max(1, bridge.serial.in_waiting))
            except Exception as exc:  # noqa: BLE001 - SerialException, OSError on unplug
                self._port_lost(bridge, str(exc) or type(exc).__name__)
                return
            if not data:
                return
        bridge.last_byte_at = time.monotonic()
        for item in bridge.framer.feed(data):
            if isinstance(item, ConsoleText):
                self._console(bridge, item.text)
            else:
                self._up(bridge, item)

    def _console(self, bridge: Bridge, text: str) -> None:
        bridge.console += text
        *lines, bridge.console = bridge.console.replace("\r\n", "\n").split("\n")
        for line in lines:
            if line.strip():
                log.info("[%s] %s", bridge.name, line.rstrip())
        if len(bridge.console) > 4096:  # a line without end: log it in pieces
            log.info("[%s] %s", bridge.name, bridge.console)
            bridge.console = ""

    def _flush_consoles(self, now: float) -> None:
        for bridge in self.bridges.values():
            if bridge.framer.buffered and now - bridge.last_byte_at >= CONSOLE_FLUSH_S:
                for item in bridge.framer.flush_console():
                    self._console(bridge, item.text)

    def _send_board(self, bridge: Bridge, payload: bytes) -> None:
        if bridge.serial is None:
            return
        if len(bridge.serial_out) > MAX_SERIAL_BACKLOG:
            self._port_lost(bridge, "the board does not take what is sent to it")
            return
        bridge.serial_out.extend(bridge.framer.encode(payload))
        bridge.stats["frames_down"] += 1
        bridge.stats["bytes_down"] += len(payload)
        self._flush_serial(bridge)

    def _flush_serial(self, bridge: Bridge) -> None:
        if bridge.serial is None or not bridge.serial_out:
            return
        try:
            if bridge.fd is not None:
                written = os.write(bridge.fd, bytes(bridge.serial_out))
            else:
                written = bridge.serial.write(bytes(bridge.serial_out))
        except BlockingIOError:
            written = 0
        except Exception as exc:  # noqa: BLE001 - SerialTimeoutException, OSError
            if "timeout" in type(exc).__name__.lower():
                written = 0
            else:
                self._port_lost(bridge, str(exc))
                return
        del bridge.serial_out[:written or 0]
        if bridge.fd is not None:
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if bridge.serial_out else 0)
            try:
                self.selector.modify(bridge.fd, events, ("serial", bridge))
            except (KeyError, ValueError):
                pass

    # -- board -> hub --------------------------------------------------------------------------

    def _up(self, bridge: Bridge, payload: bytes) -> None:
        message = decode(payload)
        kind = None if message is None else message.TYPE
        if kind == m.HELLO:
            self._drop_link(bridge)
            self._connect(bridge)
        if bridge.connecting is not None:
            bridge.pending_up.append(payload)
            return
        link = bridge.link
        if link is None:
            bridge.stats["dropped_up"] += 1
            if kind not in (m.HELLO, m.CLOSE, None):
                self._tell(bridge, "gateway: no hub session for this board")
            return
        self._relay(bridge, link, payload, message)

    def _relay(self, bridge: Bridge, link: HubLink, payload: bytes,
               message: Optional[m.Message]) -> None:
        if message is not None and message.TYPE == m.AUTH_RESPONSE \
                and token_nonce(message.token) != link.challenge_nonce:
            bridge.stats["stale_answers"] += 1
            log.info("[%s] dropped an answer to an earlier session's challenge", bridge.name)
            return
        self._send_hub(bridge, link, payload)

    def _send_hub(self, bridge: Bridge, link: HubLink, payload: bytes) -> None:
        if len(link.out) > MAX_HUB_BACKLOG:
            log.warning("[%s] the hub does not take what the board sends: dropping the session",
                        bridge.name)
            self._end_link(bridge, "gateway: the hub connection is stuck")
            return
        link.out.extend(link.framer.encode(payload))
        bridge.stats["frames_up"] += 1
        bridge.stats["bytes_up"] += len(payload)
        self._flush_hub(bridge, link)

    def _flush_hub(self, bridge: Bridge, link: HubLink) -> None:
        while link.out:
            try:
                sent = link.sock.send(link.out)
            except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
                break
            except OSError as exc:
                log.info("[%s] hub connection %d failed: %s", bridge.name, link.number, exc)
                self._end_link(bridge, "gateway: the hub connection failed")
                return
            del link.out[:sent]
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if link.out else 0)
        try:
            self.selector.modify(link.sock, events, ("hub", bridge))
        except (KeyError, ValueError):
            pass

    # -- connecting ----------------------------------------------------------------------------

    def _connect(self, bridge: Bridge) -> None:
        now = time.monotonic()
        if now < self.hub_down_until:
            wait_ms = int((self.hub_down_until - now) * 1000)
            self._tell(bridge, "gateway: the hub is unreachable", retry_after_ms=wait_ms,
                       force=True)
            return
        bridge.pending_up = []
        future = self.pool.submit(self._open_tls)
        bridge.connecting = future

        def done(result: concurrent.futures.Future, bridge: Bridge = bridge) -> None:
            with self._done_lock:
                self._done.append((bridge, result))
            self._wake()

        future.add_done_callback(done)

    def _open_tls(self) -> Tuple[ssl.SSLSocket, Tuple[str, int]]:
        """Pool thread: find the hub (if needed) and open a verified TLS connection."""
        address = self.hub_address
        if address is None:
            from smartx_device.discovery import discover_hub

            found = discover_hub(self.identity.hub_id, DISCOVERY_TIMEOUT_MS,
                                 self.discover_interfaces)
            if found is None:
                raise OSError("no hub %s answered on the local network" % self.identity.hub_id)
            address = (found.host, found.port)
            log.info("found hub %s at %s:%d", self.identity.hub_id, found.host, found.port)
        raw = socket.create_connection(address, timeout=CONNECT_TIMEOUT_S)
        try:
            sock = self.identity.context.wrap_socket(raw, server_hostname=self.identity.server_name)
        except BaseException:
            raw.close()
            raise
        sock.setblocking(False)
        return sock, address

    def _finish_connects(self) -> None:
        with self._done_lock:
            done, self._done = self._done, []
        for bridge, future in done:
            if bridge.connecting is not future:
                if not future.cancelled() and future.exception() is None:
                    future.result()[0].close()  # superseded by a newer Hello
                continue
            bridge.connecting = None
            pending, bridge.pending_up = bridge.pending_up, []
            try:
                sock, address = future.result()
            except Exception as exc:  # noqa: BLE001 - OSError, ssl errors, discovery
                self.hub_failures += 1
                delay = self.hub_backoff.next_delay()
                self.hub_down_until = time.monotonic() + delay / 1000.0
                if self.discover:
                    self.hub_address = None
                log.warning("cannot reach the hub (%s); trying again in %d ms", exc, delay)
                self._tell(bridge, "gateway: the hub is unreachable", retry_after_ms=delay,
                           force=True)
                continue
            if self.discover and self.hub_address is None:
                self.hub_address = address
            self.hub_backoff.reset()
            self.hub_down_until = 0.0
            self._sessions += 1
            link = HubLink(sock, self._sessions)
            bridge.link = link
            bridge.stats["sessions"] += 1
            self.selector.register(sock, selectors.EVENT_READ, ("hub", bridge))
            log.info("[%s] hub connection %d opened", bridge.name, link.number)
            for payload in pending:  # the Hello, and anything the board sent meanwhile
                if bridge.link is link:
                    self._relay(bridge, link, payload, decode(payload))

    # -- hub -> board --------------------------------------------------------------------------

    def _read_hub(self, bridge: Bridge) -> None:
        link = bridge.link
        if link is None:
            return
        while True:
            try:
                data = link.sock.recv(READ_SIZE)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
                return
            except OSError as exc:
                log.info("[%s] hub connection %d failed: %s", bridge.name, link.number, exc)
                data = b""
            try:
                payloads = link.framer.feed(data)
            except ProtocolError as exc:
                log.warning("[%s] the hub sent bad framing: %s", bridge.name, exc)
                payloads, data = [], b""
            for payload in payloads:
                message = decode(payload)
                if message is not None and message.TYPE == m.AUTH_CHALLENGE:
                    link.challenge_nonce = b64url(message.nonce)
                elif message is not None and message.TYPE == m.CLOSE:
                    link.close_reason = message.reason
                    log.info("[%s] the hub closed the board's session: %s", bridge.name,
                             reason_name(message.reason))
                self._send_board(bridge, payload)
            if not data:
                self._end_link(bridge, "gateway: the hub connection ended")
                return
            if bridge.link is not link or not link.sock.pending():
                return

    def _end_link(self, bridge: Bridge, detail: str) -> None:
        link = bridge.link
        if link is None:
            return
        told = link.close_reason is not None
        self._drop_link(bridge)
        if not told:
            self._tell(bridge, detail, force=True)

    def _drop_link(self, bridge: Bridge) -> None:
        link, bridge.link = bridge.link, None
        bridge.connecting = None  # a connect in flight is closed when it lands
        if link is None:
            return
        try:
            self.selector.unregister(link.sock)
        except (KeyError, ValueError):
            pass
        link.close()
        log.debug("[%s] hub connection %d closed", bridge.name, link.number)

    def _tell(self, bridge: Bridge, detail: str, reason: int = CLOSE_INTERNAL_ERROR,
              retry_after_ms: Optional[int] = None, force: bool = False) -> None:
        """Send the board a Close of the gateway's own (see the module rules)."""
        now = time.monotonic()
        if not force and now - bridge.told_at < TELL_INTERVAL_S:
            return
        bridge.told_at = now
        fields = {"reason": reason, "detail": detail[:m.MAX_DETAIL_LENGTH]}
        if retry_after_ms is not None:
            fields["retry_after_ms"] = max(0, int(retry_after_ms))
        close = m.Close(**fields)
        bridge.stats["relay_closes"] += 1
        log.info("[%s] told the board: %s", bridge.name, detail)
        self._send_board(bridge, m.encode_message(close))

    # -- dispatch ------------------------------------------------------------------------------

    def _ready(self, data: Tuple[str, Any], events: int) -> None:
        kind, bridge = data
        if kind == "wake":
            try:
                while self._wake_r.recv(4096):
                    pass
            except (BlockingIOError, OSError):
                pass
            return
        if kind == "serial":
            if events & selectors.EVENT_WRITE:
                self._flush_serial(bridge)
            if events & selectors.EVENT_READ and bridge.serial is not None:
                self._read_port(bridge)
        elif kind == "hub":
            link = bridge.link
            if link is None:
                return
            if events & selectors.EVENT_WRITE:
                self._flush_hub(bridge, link)
            if events & selectors.EVENT_READ and bridge.link is link:
                self._read_hub(bridge)

    def summary(self) -> str:
        """One line: ports open, live hub connections, frames relayed."""
        open_ports = sum(1 for b in self.bridges.values() if b.serial is not None)
        links = sum(1 for b in self.bridges.values() if b.link is not None)
        up = sum(b.stats["frames_up"] for b in self.bridges.values())
        down = sum(b.stats["frames_down"] for b in self.bridges.values())
        return "ports %d/%d open | hub connections %d | frames up %d down %d" % (
            open_ports, len(self.bridges), links, up, down)


# -- command line -------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The gateway's options."""
    parser = argparse.ArgumentParser(
        description="Bridge MicroPython boards on serial ports to a SmartX hub over TLS.")
    parser.add_argument("ports", nargs="*", metavar="PORT",
                        help="serial ports or pyserial URLs (default: every port matching --glob)")
    parser.add_argument("--bundle", required=True, metavar="FILE",
                        help="the gateway's credentials (smartx-hub device add NAME --gateway)")
    parser.add_argument("--hub", type=parse_hub, metavar="HOST:PORT",
                        help="the hub's device port (default: the bundle's address, or zeroconf)")
    parser.add_argument("--discover", action="store_true",
                        help="find the hub with zeroconf even if the bundle names an address")
    parser.add_argument("--discover-interface", action="append", default=None, metavar="ADDR",
                        help="send discovery queries only from this local address (repeatable)")
    parser.add_argument("--glob", action="append", default=None, metavar="PATTERN",
                        help="ports to watch when none is named (default: %s)"
                             % " ".join(DEFAULT_GLOBS))
    parser.add_argument("--baud", type=int, default=115200, help="line rate (default 115200)")
    parser.add_argument("--runtime-dir", default=os.environ.get("RUNTIME_DIRECTORY"),
                        metavar="DIR", help="where the client certificate files live while it"
                        " runs (default: $RUNTIME_DIRECTORY or the system's temp dir)")
    parser.add_argument("--status-interval", type=float, default=60.0, metavar="S",
                        help="log a one-line summary this often (0: never)")
    parser.add_argument("--log-level", default="INFO",
                        choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    return parser


def raise_file_limit() -> int:
    """Raise the soft limit of open files to the hard limit (a board takes about four:
    its port, pyserial's two wake-up pipes, its TLS connection); return it."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


def main(argv: Optional[List[str]] = None) -> int:
    """Run the gateway until SIGINT or SIGTERM."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stdout,
                        format="%(asctime)s %(levelname)s %(message)s")
    raise_file_limit()
    try:
        identity = Identity(args.bundle, args.runtime_dir)
    except (GatewayError, OSError) as exc:
        print("error: %s" % exc, file=sys.stderr)
        return 1
    gateway = Gateway(identity, args.ports, args.glob or list(DEFAULT_GLOBS), hub=args.hub,
                      discover=args.discover, discover_interfaces=args.discover_interface,
                      baudrate=args.baud)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: gateway.stop())
    reporter = None
    if args.status_interval > 0:
        def report() -> None:
            while not gateway._stopping.wait(args.status_interval):
                log.info("status: %s", gateway.summary())

        reporter = threading.Thread(target=report, name="gw-status", daemon=True)
        reporter.start()
    try:
        gateway.run()
    finally:
        identity.remove_files()
    return 0


if __name__ == "__main__":
    sys.exit(main())
