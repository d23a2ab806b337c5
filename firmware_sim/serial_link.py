"""A board's serial link on a Linux pseudo-terminal: pyserial opens ``path`` as a USB adapter.

Rules (docs/simulator.md, "Serial links"):
- The board holds the pty's master end (through its UART and console); the host opens the
  slave end, or the stable symlink ``path`` to it, with ``serial.Serial(path)``. The slave is
  put in raw mode before anyone opens it: no echo, no newline translation.
- Bytes carry the serial framing of smartx_device.framing (``0x00 COBS(payload+CRC32) 0x00``)
  with the board's console text between frames. The link splits each direction at the 0x00
  delimiters: a frame is the unit faults act on; console text passes through untouched.
- Order is kept per direction. With ``baudrate`` set, the link paces each direction at that
  line rate (10 bits per byte), as a UART does; ``baudrate=None`` carries bytes at once.
- Nobody reading the host end: the board's bytes fill the pty buffer and the rest is dropped
  (counted in ``overflow_bytes``), as a UART with nobody listening; the board never blocks.
- ``unplug()`` closes the pty (the host's open port fails with an I/O error, as a USB adapter
  pulled out) and removes the symlink; ``replug()`` makes a new pty behind the same ``path``.
  A ``disconnect`` fault unplugs for its ``duration_ms``.
"""

from __future__ import annotations

import collections
import errno
import os
import select
import threading
import time
import tty
from typing import Any, Deque, List, Optional, Tuple

from firmware_sim.faults import FaultPlan, LinkCounters, link_fault, mutate

#: A frame longer than this (bytes between delimiters) is passed on unsplit: no serial frame of
#: the protocol is this long, so it is noise.
MAX_UNIT_BYTES = 1 << 17
_READ_SIZE = 4096
_IDLE_WAIT_S = 0.2


class _Splitter:
    """Splits a byte stream into ("text", bytes) runs and ("frame", 0x00+body+0x00) units."""

    def __init__(self) -> None:
        self.in_frame = False
        self.body = bytearray()

    def feed(self, data: bytes) -> List[Tuple[str, bytes]]:
        """The text runs and complete frames that ``data`` finishes, in order."""
        out: List[Tuple[str, bytes]] = []
        index = 0
        size = len(data)
        while index < size:
            zero = data.find(b"\x00", index)
            if not self.in_frame:
                if zero < 0:
                    out.append(("text", data[index:]))
                    break
                if zero > index:
                    out.append(("text", data[index:zero]))
                self.in_frame = True
                self.body = bytearray()
                index = zero + 1
                continue
            if zero < 0:
                self.body.extend(data[index:])
                if len(self.body) > MAX_UNIT_BYTES:
                    out.append(("text", b"\x00" + bytes(self.body)))
                    self.in_frame = False
                    self.body = bytearray()
                break
            self.body.extend(data[index:zero])
            index = zero + 1
            if self.body:
                out.append(("frame", b"\x00" + bytes(self.body) + b"\x00"))
                self.in_frame = False
                self.body = bytearray()
            # an empty chunk (0x00 0x00): still at a frame start
        return out

    def reset(self) -> None:
        """Forget a frame in progress (the line was cut)."""
        self.in_frame = False
        self.body = bytearray()


class SerialLink:
    """The wire between a board's UART and a pty (see the module rules)."""

    def __init__(self, name: str = "sim", faults: Optional[FaultPlan] = None,
                 baudrate: Optional[int] = 115200, link_path: Optional[str] = None) -> None:
        self.name = name
        self.faults = faults
        self.baudrate = baudrate
        self.link_path = os.path.abspath(link_path) if link_path else None
        self.counters = LinkCounters()
        self.overflow_bytes = 0
        self.console_bytes = 0  # console text the board sent up the link
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._channel: Any = None
        self._master = -1
        self._slave = -1
        self.pts_path = ""
        self.plugged = False
        self._replug_at: Optional[float] = None
        self._closed = False
        self._splitters = {"up": _Splitter(), "down": _Splitter()}
        self._queues: dict = {"up": collections.deque(), "down": collections.deque()}
        self._wire_free_at = {"up": 0.0, "down": 0.0}
        self._open_pty()
        self._thread = threading.Thread(target=self._run, name="serial-link-%s" % name,
                                        daemon=True)
        self._thread.start()

    @property
    def path(self) -> str:
        """What to give pyserial: the stable symlink if there is one, else the pts path."""
        return self.link_path or self.pts_path

    def __repr__(self) -> str:
        return "<SerialLink %s %s %s>" % (self.name, self.path,
                                          "plugged" if self.plugged else "unplugged")

    # -- the pty ---------------------------------------------------------------------------

    def _open_pty(self) -> None:
        master, slave = os.openpty()
        tty.setraw(slave)  # before the host opens it: no echo, no CR/LF games
        os.set_blocking(master, False)
        self._master, self._slave = master, slave
        self.pts_path = os.ttyname(slave)
        if self.link_path:
            temporary = self.link_path + ".new"
            try:
                os.remove(temporary)
            except FileNotFoundError:
                pass
            os.symlink(self.pts_path, temporary)
            os.replace(temporary, self.link_path)  # atomic: the path never dangles half-made
        self.plugged = True

    def _close_pty(self) -> None:
        for fd in (self._master, self._slave):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._master = self._slave = -1
        if self.link_path:
            try:
                os.remove(self.link_path)
            except FileNotFoundError:
                pass
        self.plugged = False

    def unplug(self, duration_ms: Optional[float] = None) -> None:
        """Pull the cable: the host's port fails; bytes in flight are lost. With
        ``duration_ms`` it is plugged back in after that long."""
        with self._lock:
            if not self.plugged:
                return
            self._close_pty()
            for direction in ("up", "down"):
                self._queues[direction].clear()
                self._splitters[direction].reset()
            if duration_ms is not None:
                self._replug_at = time.monotonic() + max(0.0, duration_ms) / 1000.0
            self._wake.notify_all()

    def replug(self) -> None:
        """Plug the cable back in: a new pty behind the same ``path``."""
        with self._lock:
            self._replug_at = None
            if self.plugged or self._closed:
                return
            self._open_pty()
            self._wake.notify_all()

    def close(self) -> None:
        """Remove the link for good."""
        with self._lock:
            self._closed = True
            self._close_pty()
            self._wake.notify_all()
        self._thread.join(2.0)

    # -- the board's end -------------------------------------------------------------------

    def attach(self, channel: Any) -> None:
        """Wire a board's UART channel: its writes go up the link, the host's bytes come down."""
        self._channel = channel
        channel.sink = self.board_write

    def board_write(self, data: bytes) -> None:
        """Bytes from the board (UART writes, raw console bytes)."""
        with self._lock:
            if not self.plugged:
                return
            for kind, unit in self._splitters["up"].feed(bytes(data)):
                if kind == "text":
                    self.console_bytes += len(unit)
                    self._send("up", unit, intact=None)
                else:
                    self._unit("up", unit)

    def board_console(self, text: str) -> None:
        """Console text from the board (its ``print``)."""
        self.board_write(text.encode("utf-8", "replace"))

    # -- units and faults ------------------------------------------------------------------

    def _unit(self, direction: str, unit: bytes) -> None:
        number = self.counters.frame(direction)
        link_event = (link_fault(self.faults, direction, number, self.counters)
                      if self.faults is not None else None)
        if link_event is None:
            self._send(direction, unit, intact=True)
            return
        self.counters.fault(link_event)
        if link_event.kind == "disconnect":
            self.unplug(link_event.param("duration_ms"))
            return
        chunks, delay_ms = mutate(link_event, unit, 1, len(unit) - 1)
        for chunk in chunks:
            self._send(direction, chunk, intact=False, delay_ms=delay_ms)
        if not chunks:
            return

    def _send(self, direction: str, data: bytes, intact: Optional[bool],
              delay_ms: float = 0.0) -> None:
        """Queue ``data`` on the wire in ``direction`` (in order; paced; maybe delayed)."""
        if not data:
            return
        now = time.monotonic()
        queue: Deque = self._queues[direction]
        release = max(now + delay_ms / 1000.0, self._wire_free_at[direction])
        if queue:
            release = max(release, queue[-1][0])
        duration = len(data) * 10.0 / self.baudrate if self.baudrate else 0.0
        self._wire_free_at[direction] = release + duration
        if not queue and release <= now:
            self._deliver(direction, data, intact)
        else:
            queue.append((release, data, intact))
            self._wake.notify_all()

    def _deliver(self, direction: str, data: bytes, intact: Optional[bool]) -> None:
        if intact is not None:
            self.counters.delivered(direction, intact)
        if direction == "down":
            if self._channel is not None:
                self._channel.feed(data)
            return
        if self._master < 0:
            return
        try:
            written = os.write(self._master, data)
        except BlockingIOError:
            written = 0
        except OSError as exc:
            if exc.errno not in (errno.EIO, errno.EBADF):
                raise
            written = 0
        if written < len(data):
            self.overflow_bytes += len(data) - written

    # -- the link's thread -----------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._lock:
                if self._closed:
                    return
                now = time.monotonic()
                if self._replug_at is not None and now >= self._replug_at:
                    self._replug_at = None
                    self._open_pty()
                for direction in ("up", "down"):
                    queue = self._queues[direction]
                    while queue and queue[0][0] <= now:
                        _release, data, intact = queue.popleft()
                        self._deliver(direction, data, intact)
                wait = _IDLE_WAIT_S
                for queue in self._queues.values():
                    if queue:
                        wait = min(wait, max(0.0, queue[0][0] - now))
                if self._replug_at is not None:
                    wait = min(wait, max(0.0, self._replug_at - now))
                master = self._master
            if master < 0:
                with self._lock:
                    if not self._closed:
                        self._wake.wait(wait)
                continue
            try:
                readable, _, _ = select.select([master], [], [], wait)
            except (OSError, ValueError):  # closed under us by unplug/close
                continue
            if not readable:
                continue
            with self._lock:
                if master != self._master:
                    continue
                try:
                    data = os.read(master, _READ_SIZE)
                except BlockingIOError:
                    continue
                except OSError:
                    continue
                if not data:
                    continue
                for kind, unit in self._splitters["down"].feed(data):
                    if kind == "text":
                        self._send("down", unit, intact=None)
                    else:
                        self._unit("down", unit)
