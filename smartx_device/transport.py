"""Transports: they move bytes between the client and a hub (or a gateway), nothing more.

The transport contract (docs/device-sdk.md, "Transports"), kept by every class here and by any
object a gateway plugs in:

- ``send(data)``: write all of ``data`` or raise ``TransportError``.
- ``recv(max_bytes, timeout_ms)``: bytes that arrived (at most ``max_bytes``), ``None`` if none
  came within ``timeout_ms``, ``b""`` when the peer closed the stream. Errors raise
  ``TransportError``.
- ``make_framer(max_frame_size)``: the framing this link needs (stream or serial COBS+CRC).
- ``close()``: idempotent.

``connect_tls`` verifies the hub against the pinned CA and checks the server name; a
verification failure raises ``CertificateError``, so the client can tell "wrong hub or wrong
CA" from "no hub there". CPython uses ``ssl.SSLContext(PROTOCOL_TLS_CLIENT)`` with TLS 1.2 as
the floor; MicroPython uses ``ssl``/``tls`` with ``CERT_REQUIRED`` and the CA as DER ``cadata``.
MicroPython subset; ``ssl``, ``socket``, ``select``, ``serial`` and ``machine`` are imported
inside the functions that need them.
"""

import sys

from smartx_device.framing import SerialFramer, StreamFramer

IS_MICROPYTHON = sys.implementation.name == "micropython"
DEFAULT_CONNECT_TIMEOUT_MS = 10000
SEND_TIMEOUT_MS = 10000


class TransportError(Exception):
    """The link failed: refused, reset, timed out, or closed under us."""


class CertificateError(TransportError):
    """The hub's certificate does not verify against the pinned CA (or the name is wrong)."""


class TLSTransport:
    """A TLS socket to the hub, on CPython or MicroPython (use ``connect_tls``)."""

    def __init__(self, sock, raw=None):
        self._sock = sock
        self._raw = raw
        self._poller = None
        self.closed = False

    def make_framer(self, max_frame_size):
        """Stream framing: TLS already delivers bytes in order, complete and unaltered."""
        return StreamFramer(max_frame_size)

    def send(self, data):
        """Write all of ``data``."""
        if self.closed:
            raise TransportError("the connection is closed")
        try:
            if IS_MICROPYTHON:
                view = memoryview(data)
                while len(view):
                    written = self._sock.write(view)
                    if written:
                        view = view[written:]
            else:
                self._sock.settimeout(SEND_TIMEOUT_MS / 1000.0)
                self._sock.sendall(data)
        except OSError as error:
            raise TransportError("send failed: %s" % (error,))

    def recv(self, max_bytes, timeout_ms):
        """Bytes that arrived within ``timeout_ms`` (None: nothing yet; b"": closed)."""
        if self.closed:
            return b""
        if IS_MICROPYTHON:
            return self._recv_micropython(max_bytes, timeout_ms)
        import socket
        import ssl

        self._sock.settimeout(max(timeout_ms, 0) / 1000.0)
        try:
            return self._sock.recv(max_bytes)
        except (socket.timeout, ssl.SSLWantReadError, BlockingIOError):
            return None  # a zero timeout polls: nothing there is not an error
        except OSError as error:
            raise TransportError("receive failed: %s" % (error,))

    def _recv_micropython(self, max_bytes, timeout_ms):
        import select

        if self._poller is None:
            self._poller = select.poll()
            self._poller.register(self._sock, select.POLLIN)
        try:
            if not self._poller.poll(max(int(timeout_ms), 0)):
                return None
            data = self._sock.read(max_bytes)
        except OSError as error:
            raise TransportError("receive failed: %s" % (error,))
        if data is None:
            return None  # a TLS record is incomplete: nothing for the caller yet
        return data

    def close(self):
        """Close the socket (idempotent)."""
        if self.closed:
            return
        self.closed = True
        for sock in (self._sock, self._raw):
            if sock is not None:
                try:
                    sock.close()
                except OSError:
                    pass


def client_ssl_context(ca_pem):
    """CPython: the device's TLS context: TLS 1.2 or newer, the hub CA pinned as the only
    trust anchor, the server name checked."""
    import ssl

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    try:
        context.load_verify_locations(cadata=ca_pem)
    except (ssl.SSLError, ValueError) as error:
        raise CertificateError("the pinned CA cannot be loaded: %s" % (error,))
    return context


def connect_tls(host, port, ca_pem, server_name, timeout_ms=DEFAULT_CONNECT_TIMEOUT_MS,
                ca_der=None):
    """Open a verified TLS connection to ``host:port``; the hub must present a certificate
    that chains to ``ca_pem`` and names ``server_name``."""
    if IS_MICROPYTHON:
        return _connect_tls_micropython(host, port, ca_der, server_name, timeout_ms)
    import socket
    import ssl

    context = client_ssl_context(ca_pem)
    try:
        raw = socket.create_connection((host, port), timeout=timeout_ms / 1000.0)
    except OSError as error:
        raise TransportError("cannot reach %s:%s: %s" % (host, port, error))
    try:
        sock = context.wrap_socket(raw, server_hostname=server_name)
    except ssl.SSLCertVerificationError as error:
        raw.close()
        raise CertificateError("the hub's certificate does not verify against the pinned CA: %s"
                               % (error.verify_message or error,))
    except (OSError, ssl.SSLError) as error:
        raw.close()
        raise TransportError("TLS handshake with %s:%s failed: %s" % (host, port, error))
    return TLSTransport(sock)


def _connect_tls_micropython(host, port, ca_der, server_name, timeout_ms):
    import socket

    try:
        import tls as ssl_module  # MicroPython 1.23+
    except ImportError:
        import ssl as ssl_module
    try:
        address = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)[0]
        raw = socket.socket(address[0], socket.SOCK_STREAM)
        raw.settimeout(timeout_ms / 1000.0)
        raw.connect(address[-1])
    except OSError as error:
        raise TransportError("cannot reach %s:%s: %s" % (host, port, error))
    try:
        context = ssl_module.SSLContext(ssl_module.PROTOCOL_TLS_CLIENT)
        context.verify_mode = ssl_module.CERT_REQUIRED
        context.load_verify_locations(cadata=ca_der)
        sock = context.wrap_socket(raw, server_hostname=server_name)
        sock.setblocking(False)
    except (OSError, ValueError) as error:
        raw.close()
        text = str(error)
        # mbedTLS reports verification failures as MBEDTLS_ERR_X509_CERT_VERIFY_FAILED.
        if "VERIFY" in text.upper() or "CERT" in text.upper():
            raise CertificateError("the hub's certificate does not verify against the pinned "
                                   "CA: %s" % text)
        raise TransportError("TLS handshake with %s:%s failed: %s" % (host, port, text))
    return TLSTransport(sock, raw)


class SerialTransport:
    """A serial link with the serial framing (COBS + CRC), for boards behind a gateway.

    ``port`` is one of: an int, a UART id (``machine.UART(port, baudrate)``; on a board
    ``machine`` is the firmware's, and under the simulator it is the simulated board's); a
    str, a port name or pyserial URL (``serial.serial_for_url``, CPython); or an object, an
    already open port: used through pyserial's API (``in_waiting``, ``timeout``, ``read``,
    ``write``, ``flush``, ``close``) if it has ``in_waiting`` or lacks ``any``, else through
    ``machine.UART``'s (``any``, ``read``, ``write``)."""

    def __init__(self, port, baudrate=115200):
        self.closed = False
        self._serial = None  # driven through pyserial's API
        self._uart = None  # driven through machine.UART's API
        if isinstance(port, bool):
            raise TransportError("a serial port is a UART id, a port name or an open port")
        if isinstance(port, int):
            self._uart = _open_uart(port, baudrate)
        elif isinstance(port, str):
            self._serial = _open_serial(port, baudrate)
        elif hasattr(type(port), "in_waiting") or not hasattr(port, "any"):
            self._serial = port
        else:
            self._uart = port

    def make_framer(self, max_frame_size):
        """COBS+CRC framing: a UART drops and flips bytes and mixes in console text."""
        return SerialFramer(max_frame_size)

    def send(self, data):
        """Write all of ``data`` to the line."""
        if self.closed:
            raise TransportError("the serial port is closed")
        try:
            if self._serial is not None:
                self._serial.write(data)
                self._serial.flush()
            else:
                self._write_uart(data)
        except (OSError, ValueError) as error:
            raise TransportError("serial write failed: %s" % (error,))

    def _write_uart(self, data):
        # machine.UART.write may take part of the data (a full TX buffer) or, after its own
        # timeout, none (None): keep going until the deadline.
        from smartx_device.clock import monotonic_ms, sleep_ms

        view = memoryview(data)
        deadline = monotonic_ms() + SEND_TIMEOUT_MS
        while len(view):
            written = self._uart.write(view)
            if written:
                view = view[written:]
            elif monotonic_ms() >= deadline:
                raise TransportError("serial write timed out with %d bytes unsent" % len(view))
            else:
                sleep_ms(1)

    def recv(self, max_bytes, timeout_ms):
        """Bytes within ``timeout_ms``, or None; a serial line never reports end of stream."""
        if self.closed:
            return b""
        try:
            if self._serial is not None:
                return self._recv_serial(max_bytes, timeout_ms)
            return self._recv_uart(max_bytes, timeout_ms)
        except (OSError, ValueError) as error:
            raise TransportError("serial read failed: %s" % (error,))

    def _recv_serial(self, max_bytes, timeout_ms):
        self._serial.timeout = max(timeout_ms, 0) / 1000.0
        waiting = self._serial.in_waiting
        data = self._serial.read(min(max(waiting, 1), max_bytes))
        if waiting == 0 and data:
            more = self._serial.in_waiting
            if more:
                data += self._serial.read(min(more, max_bytes - len(data)))
        return data or None

    def _recv_uart(self, max_bytes, timeout_ms):
        from smartx_device.clock import monotonic_ms, sleep_ms

        deadline = monotonic_ms() + timeout_ms
        while not self._uart.any():
            if monotonic_ms() >= deadline:
                return None
            sleep_ms(min(5, max(1, deadline - monotonic_ms())))
        return self._uart.read(min(self._uart.any(), max_bytes)) or None

    def close(self):
        """Close the port (idempotent; a ``machine.UART`` stays configured for the next
        session)."""
        if self.closed:
            return
        self.closed = True
        if self._serial is not None:
            try:
                self._serial.close()
            except (OSError, ValueError):
                pass


def _open_uart(port, baudrate):
    """``machine.UART(port, baudrate)`` on whichever interpreter provides ``machine``."""
    try:
        import machine
    except ImportError:
        raise TransportError("UART %d needs a board's machine module; on a computer pass the "
                             "port's name (e.g. /dev/ttyUSB0) or a pyserial URL" % port)
    try:
        return machine.UART(port, baudrate)
    except (OSError, ValueError) as error:
        raise TransportError("cannot open UART %d: %s" % (port, error))


def _open_serial(name, baudrate):
    """A pyserial port from a name or URL (CPython)."""
    if IS_MICROPYTHON:
        raise TransportError("a port name needs pyserial; on a board pass the UART id")
    import serial

    try:
        return serial.serial_for_url(name, baudrate=baudrate, timeout=0)
    except (serial.SerialException, ValueError) as error:
        raise TransportError("cannot open %s: %s" % (name, error))
