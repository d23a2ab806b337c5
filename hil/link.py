"""The test host's end of a board's serial link: one pyserial port, one reader thread.

Rules (docs/hil.md, "How a board is wired"):
- ``BoardPort`` opens a pyserial URL (``/dev/ttyUSB0``, ``rfc2217://host:port``,
  ``socket://host:port``, or a simulated board's pseudo-terminal) and reads it in one background
  thread. The bytes go through the core's ``SerialFramer``: console text to the board's
  ``ConsoleBuffer`` (for ``expect``), frames to ``on_frame`` (the gateway relay). Writes (frames
  down to the board, console input, raw REPL bytes) are serialised by one lock.
- A port that fails (a USB adapter pulled out, a pty closed) is closed, ``on_lost`` is told,
  and the same URL is reopened with a growing back-off until it is back: a board unplugged and
  plugged in again needs nothing from the test.
- Console text is handed on when its chunk ends (at the next 0x00, docs/protocol.md 3). A board
  that prints a line and then sends nothing (a traceback, an idle board) would leave it waiting:
  when the line has been quiet for ``IDLE_FLUSH_S`` and the unfinished chunk is whole lines of
  text, the port hands it on (``SerialFramer.flush_console``).
- ``raw()`` diverts received bytes to a queue instead of the framer, for the MicroPython raw
  REPL (provisioning a real board); nothing else reads the port meanwhile.
- Faults on the gateway's side of the link (``install_faults``): a seeded ``FaultPlan`` from
  firmware_sim acts on each frame as it passes here. Down (to the board) the frame's bytes are
  damaged, dropped, repeated or held back on the wire, so the board's framer sees real damage;
  up (to the hub), a frame the plan damages is discarded as the framer would have discarded it
  (its CRC fails), counted as corrupt. Board faults in a plan (power_cycle) go to ``on_board_fault``.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from typing import Any, Callable, Iterator, Optional

from firmware_sim.faults import BOARD_FAULTS, FaultPlan, LinkCounters, mutate
from smartx_device.framing import ConsoleText, SerialFramer

from hil.console import ConsoleBuffer

#: Seconds one ``read`` waits for data: how quickly ``stop`` and ``raw`` take effect.
READ_TIMEOUT_S = 0.05
#: Reopening a lost port: first wait, and the most any wait grows to.
REOPEN_FIRST_S = 0.05
REOPEN_MAX_S = 1.0
DEFAULT_BAUDRATE = 115200
#: Quiet time after which whole console lines still waiting for a 0x00 are handed on.
IDLE_FLUSH_S = 0.1


class PortError(Exception):
    """The port cannot be used now (not open, or it failed under us)."""


class RelativePlan:
    """A ``FaultPlan`` seen through frame numbers counted from when it was installed, so a
    test's ``at=`` numbers mean "the n-th frame of this test". Board faults go to a callback."""

    def __init__(self, plan: FaultPlan, offsets: dict,
                 on_board_fault: Optional[Callable[[Any], bool]] = None) -> None:
        self.plan = plan
        self.offsets = dict(offsets)
        self.on_board_fault = on_board_fault

    def decide(self, direction: str, number: int) -> list:
        """The plan's events for the link's frame ``number`` in ``direction``."""
        relative = number - self.offsets.get(direction, 0)
        if relative < 0:
            return []
        return self.plan.decide(direction, relative)

    def apply_board_fault(self, event: Any) -> bool:
        """Carry out a board fault through the callback (False: nobody can)."""
        if self.on_board_fault is not None:
            return bool(self.on_board_fault(event))
        return self.plan.apply_board_fault(event)


class BoardPort:
    """A board's serial port on the test host (see the module rules)."""

    def __init__(self, url: str, name: str, console: ConsoleBuffer,
                 baudrate: int = DEFAULT_BAUDRATE, log: Optional[Callable[[str], None]] = None,
                 exclusive: bool = True) -> None:
        self.url = url
        self.name = name
        self.console = console
        self.baudrate = baudrate
        self.exclusive = exclusive
        self.on_frame: Optional[Callable[[bytes], None]] = None
        self.on_lost: Optional[Callable[[str], None]] = None
        self.on_opened: Optional[Callable[[], None]] = None
        self._log = log
        self.framer = SerialFramer()
        self.counters = LinkCounters()  # the gateway side's own count of frames and faults
        self.bytes_in = 0
        self.bytes_out = 0
        self.frames_in = 0
        self.frames_out = 0
        self.opens = 0
        self.losses = 0
        self.last_error: Optional[str] = None
        self._faults: Optional[RelativePlan] = None
        self._port: Any = None
        self._write_lock = threading.Lock()
        self._raw: Optional["queue.Queue[bytes]"] = None
        self._stopping = threading.Event()
        self._opened = threading.Event()
        self._suspended_until = 0.0
        self._last_byte_at = 0.0
        self._thread = threading.Thread(target=self._run, name="hil-port-%s" % name, daemon=True)

    def __repr__(self) -> str:
        return "<BoardPort %s %s %s>" % (self.name, self.url,
                                          "open" if self.is_open else "closed")

    # -- life cycle ------------------------------------------------------------------------

    def start(self) -> "BoardPort":
        """Start reading (the port is opened, and reopened, by the reader thread)."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop reading and close the port."""
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(5.0)
        self._close("stopped")

    @property
    def is_open(self) -> bool:
        """True while the port is open."""
        return self._port is not None

    def wait_open(self, timeout: float) -> bool:
        """Wait until the port is open; False if it is not within ``timeout`` s."""
        return self._opened.wait(timeout)

    def suspend(self, seconds: float) -> None:
        """Close the port and leave it closed for ``seconds`` (a cable pulled on the gateway's
        side, or a ``disconnect`` fault)."""
        self._suspended_until = time.monotonic() + seconds
        self._lost("disconnected by the test host for %.1f s" % seconds)

    # -- writing ---------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        """Write raw bytes to the board (console input, REPL control); ``PortError`` if the
        port is not open or the write fails."""
        with self._write_lock:
            port = self._port
            if port is None:
                raise PortError("%s: the port %s is not open" % (self.name, self.url))
            try:
                port.write(data)
                port.flush()
            except Exception as exc:  # noqa: BLE001 - pyserial raises several kinds
                raise PortError("%s: write failed: %s" % (self.name, exc)) from None
            self.bytes_out += len(data)

    def send_line(self, text: str) -> None:
        """Type one console line to the board's firmware.

        The line is sent between two 0x00 bytes: the board's serial framer then hands it to
        the firmware whole, as console text, and frames before and after it are untouched."""
        self.write(b"\x00" + text.rstrip("\n").encode("utf-8") + b"\n\x00")

    def send_frame(self, payload: bytes) -> bool:
        """Send one message to the board in the serial framing; False if the port is closed
        (the frame is lost, as it would be on a pulled cable)."""
        unit = self.framer.encode(payload)
        number = self.counters.frame("down")
        events = self._decide("down", number)
        chunks, delay_ms = [unit], 0.0
        for event in events:
            if event.kind == "disconnect":
                self.counters.fault(event)
                self.suspend(event.param("duration_ms") / 1000.0)
                return False
            self.counters.fault(event)
            chunks, delay_ms = mutate(event, unit, 1, len(unit) - 1)
        if delay_ms:
            time.sleep(delay_ms / 1000.0)  # later frames wait behind it, as on a real wire
        try:
            for chunk in chunks:
                self.write(chunk)
        except PortError:
            return False
        self.counters.delivered("down", intact=not events, count=len(chunks))
        self.frames_out += 1
        return True

    # -- faults ----------------------------------------------------------------------------

    def install_faults(self, plan: Optional[FaultPlan],
                       on_board_fault: Optional[Callable[[Any], bool]] = None) -> None:
        """Apply ``plan`` to frames passing here from now on (None removes it)."""
        if plan is None:
            self._faults = None
            return
        offsets = {d: self.counters.by_direction[d]["frames"] for d in ("up", "down")}
        self._faults = RelativePlan(plan, offsets, on_board_fault)

    def _decide(self, direction: str, number: int) -> list:
        plan = self._faults
        if plan is None:
            return []
        events = []
        for event in plan.decide(direction, number):
            if event.kind in BOARD_FAULTS:
                if plan.apply_board_fault(event):
                    self.counters.fault(event)
            else:
                events.append(event)
        return events

    # -- raw access (the MicroPython REPL) -------------------------------------------------

    @contextlib.contextmanager
    def raw(self) -> Iterator["queue.Queue[bytes]"]:
        """Inside the block received bytes go to the yielded queue, not to the framer."""
        raw: "queue.Queue[bytes]" = queue.Queue()
        self._raw = raw
        try:
            yield raw
        finally:
            self._raw = None
            self.framer.feed(b"")  # start clean: REPL bytes are no frame

    # -- the reader thread -----------------------------------------------------------------

    def _say(self, text: str) -> None:
        if self._log is not None:
            self._log(text)

    def _open(self) -> bool:
        import serial

        try:
            # DTR and RTS stay asserted, as pyserial and mpremote open a port: MicroPython's
            # native USB (RP2040, ESP32-S3) sends nothing to a host that has not set DTR, and
            # the ESP32 auto-reset circuit holds the chip running while both are set.
            port = serial.serial_for_url(self.url, baudrate=self.baudrate,
                                         timeout=READ_TIMEOUT_S, do_not_open=True)
            if self.exclusive and hasattr(port, "exclusive"):
                port.exclusive = True  # two test runs on one board would garble both
            port.open()
        except Exception as exc:  # noqa: BLE001 - SerialException, OSError, ValueError
            self.last_error = "cannot open %s: %s" % (self.url, exc)
            return False
        self.framer = SerialFramer()
        with self._write_lock:
            self._port = port
        self.opens += 1
        self._opened.set()
        self._say("port %s open" % self.url)
        if self.on_opened is not None:
            self.on_opened()
        return True

    def _close(self, why: str) -> bool:
        with self._write_lock:
            port, self._port = self._port, None
        self._opened.clear()
        if port is None:
            return False
        try:
            port.close()
        except Exception:  # noqa: BLE001 - it is gone already
            pass
        for item in self.framer.feed(b""):  # a console line cut short still counts
            if isinstance(item, ConsoleText):
                self.console.feed(item.text)
        return True

    def _lost(self, why: str) -> None:
        if self._close(why):
            self.losses += 1
            self.last_error = why
            self._say("port %s lost: %s" % (self.url, why))
            if self.on_lost is not None:
                self.on_lost(why)

    def _run(self) -> None:
        wait = REOPEN_FIRST_S
        while not self._stopping.is_set():
            port = self._port
            if port is None:
                if time.monotonic() < self._suspended_until or not self._open():
                    self._stopping.wait(wait)
                    wait = min(wait * 2, REOPEN_MAX_S)
                    continue
                wait = REOPEN_FIRST_S
                port = self._port
            try:
                data = port.read(max(1, port.in_waiting))
            except Exception as exc:  # noqa: BLE001 - SerialException, OSError, TypeError
                if self._port is port:
                    self._lost(str(exc) or type(exc).__name__)
                continue
            if data:
                self._received(data)
            elif self.framer.buffered and time.monotonic() - self._last_byte_at >= IDLE_FLUSH_S:
                for item in self.framer.flush_console():
                    self.console.feed(item.text)

    def _received(self, data: bytes) -> None:
        self.bytes_in += len(data)
        self._last_byte_at = time.monotonic()
        raw = self._raw
        if raw is not None:
            raw.put(data)
            return
        for item in self.framer.feed(data):
            if isinstance(item, ConsoleText):
                self.console.feed(item.text)
                continue
            number = self.counters.frame("up")
            events = self._decide("up", number)
            copies = 1
            if events:
                event = events[0]
                self.counters.fault(event)
                if event.kind == "disconnect":
                    self.suspend(event.param("duration_ms") / 1000.0)
                    return
                if event.kind in ("drop", "corrupt", "truncate"):
                    continue  # what the framer does with a frame whose CRC fails
                if event.kind == "duplicate":
                    copies = max(1, int(event.param("copies")))
                elif event.kind == "delay":
                    time.sleep(event.param("ms") / 1000.0)
            self.counters.delivered("up", intact=not events, count=copies)
            self.frames_in += 1
            handler = self.on_frame
            for _ in range(copies):
                if handler is not None:
                    handler(item)
