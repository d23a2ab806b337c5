"""The serial figure: payload goodput of a board at 115200 baud against the framing limit.

Rules:
- The board is the SDK's blocking ``Client`` over ``SerialTransport`` (pyserial) in its own
  process, opening the slave end of a Linux pseudo-terminal as it would open a USB adapter.
  It keeps its default window of batches in flight (``max_in_flight``).
- A pty moves bytes as fast as they are written, so the line worker emulates the UART: it
  reads the board's bytes from the master end at no more than the line rate (115200 baud,
  10 bits a byte: 11520 bytes/s, from a token bucket on the monotonic clock) and writes the
  hub's bytes back at the same rate. In between it is the smallest gateway: serial frames
  (COBS + CRC) in, each payload to the hub over TLS with stream framing, and back.
- The hub is the real one (its commits, its Acks). The measured window runs from the first
  byte of the first Telemetry frame on the line to the last byte of the last one.
  goodput = Telemetry payload bytes / window; the framing-limited maximum is
  line rate x payload bytes / frame bytes of those same frames; their ratio is the share of
  the line's time spent carrying Telemetry frames. Gaps with nothing on the line while a
  frame was due (stop-and-wait stalls) are counted and the longest reported.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import json
import os
import pty
import select
import socket
import ssl
import sys
import threading
import time
import tty

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import Worker, worker_io  # noqa: E402

THIS = os.path.abspath(__file__)
BAUD = 115200
LINE_RATE = BAUD / 10.0  # bytes per second: start bit, 8 data bits, stop bit
#: Credit the pacer may bank while the reader thread is descheduled (the machine is shared):
#: the average rate is the line's, and a late tick catches up instead of losing line time.
BURST_S = 0.05
TICK_S = 0.001
#: An idle gap this long inside the window (the board had nothing queued) is a stall: a
#: board waiting for an Ack before it sends again.
STALL_S = 0.001


class Line:
    """The paced UART between the board's pty and a one-board gateway to the hub."""

    def __init__(self, hub_port: int, ca_pem: bytes) -> None:
        from smartx_device.framing import SerialFramer, StreamFramer
        from smartx_hub.pki import client_tls_context

        self.master, self.slave = pty.openpty()
        tty.setraw(self.slave)
        flags = fcntl.fcntl(self.master, fcntl.F_GETFL)
        fcntl.fcntl(self.master, fcntl.F_SETFL, flags | os.O_NONBLOCK)
        self.path = os.ttyname(self.slave)
        self.hub_port = hub_port
        self.context = client_tls_context(ca_pem)
        self.serial_in = SerialFramer()
        self.serial_out = SerialFramer()
        self.stream_factory = StreamFramer
        self.stream_in = None
        self.tls = None
        self.down = bytearray()
        self.lock = threading.Lock()
        self.running = True
        self.up_offset = 0  # bytes of the board's stream read so far
        self.chunks = []  # (line time, start offset, end offset) of each read, while recording
        self.frames = []  # (type, payload bytes, frame bytes, start offset, end offset)
        self.recording = False
        self.frame_start = 0
        self.errors = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _connect(self) -> None:
        if self.tls is not None:
            self.tls.close()
        raw = socket.create_connection(("127.0.0.1", self.hub_port))
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.tls = self.context.wrap_socket(raw, server_hostname="localhost")
        self.tls.setblocking(False)
        self.stream_in = self.stream_factory()

    def _up(self, data: bytes, now: float) -> None:
        """Bytes that left the board's UART, the first at line time ``now``."""
        from smartx_device import messages as m
        from smartx_device.framing import ConsoleText

        base = self.up_offset
        self.up_offset += len(data)
        if self.recording:
            self.chunks.append((now, base, self.up_offset))
        # Fed up to each 0x00 at a time, so a frame the framer completes ends exactly there.
        pos = 0
        while pos < len(data):
            zero = data.find(b"\x00", pos)
            stop = len(data) if zero < 0 else zero + 1
            for item in self.serial_in.feed(data[pos:stop]):
                if isinstance(item, ConsoleText):
                    continue
                message = m.decode_message(item)
                if isinstance(message, m.Hello):
                    self._connect()
                wire = len(self.serial_out.encode(item))
                if self.recording:
                    self.frames.append((type(message).__name__, len(item), wire,
                                        base + stop - wire, base + stop))
                if self.tls is not None:
                    self.tls.setblocking(True)
                    self.tls.sendall(self.stream_in.encode(item))
                    self.tls.setblocking(False)
            pos = stop

    def _read_hub(self) -> None:
        while self.tls is not None:
            try:
                data = self.tls.recv(65536)
            except (ssl.SSLWantReadError, BlockingIOError):
                return
            if not data:
                self.tls.close()
                self.tls = None
                return
            for payload in self.stream_in.feed(data):
                self.down += self.serial_out.encode(payload)

    def _run(self) -> None:
        # Upstream is a model UART: ``clock`` is when the line finishes sending what it has
        # been given. Bytes the board has written wait in the pty and leave one every
        # 1/LINE_RATE s; if the pty ran dry the line sat idle until the next byte came, and if
        # this thread was merely late (bytes were waiting), the line's clock runs behind and
        # catches up (at most BURST_S): the machine is shared, the UART would not have waited.
        clock = time.monotonic()
        drained = True
        down_credit = 0.0
        last = clock
        try:
            while self.running:
                time.sleep(TICK_S)
                now = time.monotonic()
                if drained and clock < now:
                    clock = now
                clock = max(clock, now - BURST_S)
                due = int((now - clock) * LINE_RATE) + 1
                try:
                    data = os.read(self.master, due)
                except OSError as error:
                    if error.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EIO):
                        raise
                    data = b""
                drained = len(data) < due
                if data:
                    with self.lock:
                        self._up(data, clock)
                    clock += len(data) / LINE_RATE
                if self.tls is not None:
                    readable, _, _ = select.select([self.tls], [], [], 0)
                    if readable or self.tls.pending():
                        self._read_hub()
                down_credit = min(LINE_RATE * BURST_S, down_credit + LINE_RATE * (now - last))
                last = now
                if self.down and down_credit >= 1:
                    count = min(int(down_credit), len(self.down))
                    written = os.write(self.master, bytes(self.down[:count]))
                    del self.down[:written]
                    down_credit -= written
        except Exception as error:  # noqa: BLE001 - reported to the orchestrator
            self.errors.append("%s: %s" % (type(error).__name__, error))

    def start_recording(self) -> None:
        """Start a measurement window."""
        with self.lock:
            self.chunks = []
            self.frames = []
            self.recording = True

    def report(self) -> dict:
        """End the window; goodput, the framing limit and idle line time."""
        with self.lock:
            self.recording = False
            chunks, frames = self.chunks, self.frames
        telemetry = [f for f in frames if f[0] == "Telemetry"]
        if self.errors:
            return {"error": self.errors[0]}
        if not telemetry:
            return {"error": "no Telemetry frame crossed the line"}
        first_offset, last_offset = telemetry[0][3], telemetry[-1][4]

        def line_time(offset: int) -> float:
            # When byte ``offset`` started on the line: its chunk's start plus one byte time
            # for each byte before it in that chunk.
            for started_at, start, end in chunks:
                if start <= offset < end:
                    return started_at + (offset - start) / LINE_RATE
            raise RuntimeError("byte %d was not recorded" % offset)

        started = line_time(first_offset)
        ended = line_time(last_offset - 1) + 1 / LINE_RATE
        window = ended - started
        payload = sum(f[1] for f in telemetry)
        wire = sum(f[2] for f in telemetry)
        other = sum(f[2] for f in frames if f[0] != "Telemetry"
                    and f[3] >= first_offset and f[4] <= last_offset)
        # Idle line time inside the window: a chunk that starts after the previous one ended.
        idle, longest, stalls = 0.0, 0.0, 0
        previous_end = None
        for started_at, start, end in chunks:
            if end <= first_offset or start >= last_offset:
                continue
            if previous_end is not None and started_at > previous_end + 1e-9:
                gap = started_at - previous_end
                idle += gap
                longest = max(longest, gap)
                if gap >= STALL_S:
                    stalls += 1
            previous_end = started_at + (end - start) / LINE_RATE
        return {"frames": len(telemetry), "payload_bytes": payload, "frame_bytes": wire,
                "other_frame_bytes": other, "seconds": window,
                "goodput": payload / window, "max_goodput": LINE_RATE * payload / wire,
                "line_rate": LINE_RATE, "idle_ms": idle * 1000, "stalls": stalls,
                "longest_gap_ms": longest * 1000}

    def close(self) -> None:
        """Stop pacing and close the pty and the hub connection."""
        self.running = False
        self.thread.join(timeout=5)
        for fd in (self.master, self.slave):
            try:
                os.close(fd)
            except OSError:
                pass
        if self.tls is not None:
            self.tls.close()


def line_worker(args: argparse.Namespace) -> None:
    """Worker: the paced line and gateway; ``start`` and ``report`` commands."""
    emit, next_command = worker_io()
    with open(args.ca, "rb") as handle:
        line = Line(args.port, handle.read())
    emit({"ready": line.path})
    while True:
        command = next_command()
        if command == "quit":
            break
        if command == "start":
            line.start_recording()
            emit({"recording": True})
        else:
            emit(line.report())
    line.close()


def device_worker(args: argparse.Namespace) -> None:
    """Worker: the board; each ``run`` publishes and flushes its readings."""
    from smartx_device.client import Client
    from smartx_device.credentials import Credentials
    from smartx_device.transport import SerialTransport

    emit, next_command = worker_io()
    with open(args.bundle) as handle:
        credentials = Credentials(json.load(handle))
    queue_path = args.bundle + ".queue"  # one queue per board worker
    options = {"max_in_flight": args.max_in_flight} if args.max_in_flight else {}
    client = Client(credentials, queue_path,
                    transport_factory=lambda: SerialTransport(args.tty, BAUD),
                    queue_options={"max_bytes": 8 * 1024 * 1024, "durable": False}, **options)
    emit({"ready": True, "max_in_flight": client.core.max_in_flight})
    while True:
        command = next_command()
        if command == "quit":
            break
        now = int(time.time() * 1000)
        for index in range(args.readings):
            client.publish("temp", 21.37 + index % 50, now + index)
        started = time.monotonic()
        if not client.connected:
            client.connect()
        done = client.flush(timeout_ms=120000)
        emit({"flushed": done, "readings": args.readings, "seconds": time.monotonic() - started,
              "acked_batches": client.core.acked_batches})
    client.close()


class SerialBench:
    """The line worker and the board worker for one hub."""

    def __init__(self, workdir: str, hub_port: int, ca_path: str, bundle: dict,
                 readings: int, max_in_flight: int = 0) -> None:
        path = os.path.join(workdir, "serial-board-%d.json" % max_in_flight)
        with open(path, "w") as handle:
            json.dump(bundle, handle)
        self.line = Worker([THIS, "--line", "--port", str(hub_port), "--ca", ca_path])
        tty_path = self.line.read("while opening the pty")["ready"]
        self.board = Worker([THIS, "--device", "--tty", tty_path, "--bundle", path,
                             "--readings", str(readings), "--max-in-flight", str(max_in_flight)])
        self.max_in_flight = self.board.read("while starting the board")["max_in_flight"]

    def run(self) -> dict:
        """One measured transfer: the board's readings, queued, sent and acked."""
        self.line.ask("start")
        board = self.board.ask("run")
        if not board["flushed"]:
            raise RuntimeError("the board did not get its readings acknowledged")
        result = self.line.ask("report")
        if "error" in result:
            raise RuntimeError("serial line: %s" % result["error"])
        result["board"] = board
        return result

    def close(self) -> None:
        """Stop both workers."""
        self.board.close()
        self.line.close()


def main() -> None:
    """Entry point of the serial workers (internal)."""
    parser = argparse.ArgumentParser(description="serial benchmark workers (internal)")
    parser.add_argument("--line", action="store_true")
    parser.add_argument("--device", action="store_true")
    parser.add_argument("--port", type=int)
    parser.add_argument("--ca")
    parser.add_argument("--tty")
    parser.add_argument("--bundle")
    parser.add_argument("--readings", type=int, default=3000)
    parser.add_argument("--max-in-flight", type=int, default=0, help="0: the SDK's default")
    args = parser.parse_args()
    if args.line:
        line_worker(args)
    else:
        device_worker(args)


if __name__ == "__main__":
    main()
