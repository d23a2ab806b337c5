"""Files onto a real MicroPython board over its serial port: the raw REPL, as mpremote does it.

Rules (docs/hil.md, "Real boards"):
- The protocol is MicroPython's raw REPL (the one ``pyboard.py`` and ``mpremote`` speak):
  Ctrl-C stops a running program, Ctrl-A enters raw mode (the board answers
  ``raw REPL; CTRL-B to exit`` and ``>``), code is sent and ended with Ctrl-D, the board answers
  ``OK``, then the program's output, 0x04, its error output, 0x04 and ``>``. Ctrl-B leaves raw
  mode; Ctrl-D at the normal REPL soft-resets, which runs ``main.py`` again.
- The HIL firmware turns Ctrl-C off (a frame may contain 0x03), so ``enter`` first types the
  console command ``hil:repl``, which makes it give the REPL back.
- Everything waits with a deadline and fails with ``RawReplError`` quoting what the board said.
- Untested here: the simulator has no REPL (docs/hil.md says so); a real board proves it.
"""

from __future__ import annotations

import queue
import time
from typing import Optional

from hil.link import BoardPort

RAW_PROMPT = b"raw REPL; CTRL-B to exit\r\n>"
CHUNK = 256  # bytes per write: the board's USB/UART input buffer is small


class RawReplError(Exception):
    """The board did not answer the raw REPL as expected (or the code raised)."""


class RawRepl:
    """A raw-REPL session on a ``BoardPort`` (use inside ``port.raw()``)."""

    def __init__(self, port: BoardPort, received: "queue.Queue[bytes]") -> None:
        self.port = port
        self.received = received
        self.buffer = bytearray()

    def _read_until(self, ending: bytes, timeout: float) -> bytes:
        deadline = time.monotonic() + timeout
        while ending not in self.buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RawReplError("%s: no %r from the board within %.1f s; it said: %r" % (
                    self.port.name, ending, timeout, bytes(self.buffer[-400:])))
            try:
                self.buffer.extend(self.received.get(timeout=min(remaining, 0.1)))
            except queue.Empty:
                continue
        index = self.buffer.index(ending) + len(ending)
        data = bytes(self.buffer[:index])
        del self.buffer[:index]
        return data

    def _drain(self, quiet_s: float = 0.2) -> None:
        while True:
            try:
                self.received.get(timeout=quiet_s)
            except queue.Empty:
                break
        self.buffer.clear()

    def enter(self, timeout: float = 10.0) -> None:
        """Stop the firmware and enter raw mode."""
        try:
            self.port.send_line("hil:repl")
        except Exception:  # noqa: BLE001 - the port may not be open yet; Ctrl-C may do
            pass
        time.sleep(0.3)
        self.port.write(b"\r\x03\x03")
        self._drain()
        self.port.write(b"\r\x01")
        self._read_until(RAW_PROMPT, timeout)

    def run(self, code: str, timeout: float = 10.0) -> bytes:
        """Run ``code`` on the board; return its output; ``RawReplError`` if it raised."""
        data = code.encode("utf-8")
        for start in range(0, len(data), CHUNK):
            self.port.write(data[start:start + CHUNK])
            time.sleep(0.01)
        self.port.write(b"\x04")
        self._read_until(b"OK", timeout)
        output = self._read_until(b"\x04", timeout)[:-1]
        error = self._read_until(b"\x04", timeout)[:-1]
        self._read_until(b">", timeout)
        if error:
            raise RawReplError("%s: the board raised: %s" % (
                self.port.name, error.decode("utf-8", "replace").strip()))
        return output

    def put_file(self, path: str, data: bytes, timeout: float = 30.0) -> None:
        """Write ``data`` to ``path`` on the board's filesystem."""
        lines = ["f=open(%r,'wb')" % path, "w=f.write"]
        for start in range(0, len(data), 128):
            lines.append("w(%r)" % data[start:start + 128])
        lines.append("f.close()")
        self.run("\n".join(lines) + "\n", timeout)

    def soft_reset(self) -> None:
        """Leave raw mode and soft-reset: the board boots into its ``main.py``."""
        self.port.write(b"\x02")  # Ctrl-B: back to the friendly REPL
        time.sleep(0.1)
        self.port.write(b"\x04")  # Ctrl-D: soft reset


def install_files(port: BoardPort, files: dict, reset: bool = True,
                  timeout: Optional[float] = None) -> None:
    """Write ``files`` (board path -> bytes) onto the board behind ``port``, then soft-reset."""
    with port.raw() as received:
        repl = RawRepl(port, received)
        repl.enter()
        for path, data in files.items():
            repl.put_file(path, data, timeout or 30.0)
        if reset:
            repl.soft_reset()
