"""A board's console: what its firmware prints, with ``expect`` in the manner of pytest-embedded.

Rules:
- Everything written is kept in order (the oldest text is trimmed past ``max_chars``, so a
  long-running fleet does not grow without bound) and copied to every sink: a log file, the
  serial link when the board has one, an echo callback.
- ``expect(pattern, timeout)`` searches from the end of the previous match, so a test reads the
  console once, in order; the text skipped over is ``before``. A timeout raises
  ``ConsoleTimeout`` carrying what did arrive.
- Input (``send``) feeds the firmware's ``input()`` and ``sys.stdin``.
Thread-safe: the board thread writes, test threads expect.
"""

from __future__ import annotations

import re
import threading
import time
from typing import Callable, List, Optional, Pattern, Union

#: Console text kept in memory per board (the oldest is dropped past it).
DEFAULT_MAX_CHARS = 1_000_000


class ConsoleTimeout(AssertionError):
    """``expect`` saw no match in time; ``text`` is what arrived since the last match."""

    def __init__(self, pattern: str, timeout: float, text: str) -> None:
        tail = text[-2000:]
        super().__init__("no match for %r within %.1f s; console since the last match:\n%s"
                         % (pattern, timeout, tail))
        self.pattern = pattern
        self.text = text


class ConsoleOutput:
    """Console text in order, thread-safe, with ``expect``, ``mark``/``since`` and sinks.

    Shared by the simulator's ``Console`` and the HIL harness's console of a real board: a
    writer thread appends, test threads expect. ``mark``/``since`` positions stay absolute
    when the oldest text is trimmed past ``max_chars``.
    """

    def __init__(self, name: str = "board", max_chars: int = DEFAULT_MAX_CHARS) -> None:
        self.name = name
        self.max_chars = max_chars
        self._cond = threading.Condition()  # an RLock inside: subclasses may nest
        self._text = ""
        self._trimmed = 0  # characters dropped from the front of _text
        self._cursor = 0  # absolute position where the next expect searches from
        self._sinks: List[Callable[[str], None]] = []
        self.before = ""

    def add_sink(self, sink: Callable[[str], None]) -> None:
        """Call ``sink(text)`` with everything written from now on."""
        with self._cond:
            self._sinks.append(sink)

    def remove_sink(self, sink: Callable[[str], None]) -> None:
        """Stop calling ``sink``."""
        with self._cond:
            if sink in self._sinks:
                self._sinks.remove(sink)

    def write(self, text: str) -> None:
        """Append ``text`` and hand it to every sink."""
        if not text:
            return
        with self._cond:
            self._text += text
            excess = len(self._text) - self.max_chars
            if excess > 0:
                self._text = self._text[excess:]
                self._trimmed += excess
                self._cursor = max(self._cursor, self._trimmed)
            self._written(text)
            sinks = list(self._sinks)
            self._cond.notify_all()
        for sink in sinks:
            try:
                sink(text)
            except Exception:  # noqa: BLE001 - a broken sink (closed link, log) must not stop the writer
                pass

    def _written(self, text: str) -> None:
        """Hook run under the lock for each write (the simulator's log file)."""

    @property
    def text(self) -> str:
        """All the output still held (from the start unless trimmed)."""
        with self._cond:
            return self._text

    def lines(self) -> List[str]:
        """The held output as lines."""
        return self.text.splitlines()

    def mark(self) -> int:
        """The current end of output, for ``since``."""
        with self._cond:
            return self._trimmed + len(self._text)

    def since(self, mark: int) -> str:
        """Output written after ``mark`` (what is still held of it)."""
        with self._cond:
            return self._text[max(0, mark - self._trimmed):]

    def expect(self, pattern: Union[str, Pattern[str]], timeout: float = 10.0) -> "re.Match[str]":
        """Wait for ``pattern`` (regex) after the previous match; return the match object and
        leave the text skipped over in ``before``."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                start = max(0, self._cursor - self._trimmed)
                match = regex.search(self._text, start)
                if match is not None:
                    self.before = self._text[start:match.start()]
                    self._cursor = self._trimmed + match.end()
                    return match
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ConsoleTimeout(regex.pattern, timeout, self._text[start:])
                self._cond.wait(remaining)

    def wait_for_text(self, pattern: Union[str, Pattern[str]], since: int,
                      timeout: float = 10.0) -> Optional["re.Match[str]"]:
        """Like ``expect`` from ``since`` without moving the cursor; None on timeout."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                match = regex.search(self._text, max(0, since - self._trimmed))
                if match is not None:
                    return match
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._cond.wait(remaining)

    def skip_to_end(self) -> None:
        """Make the next ``expect`` look only at output written from now on."""
        with self._cond:
            self._cursor = self._trimmed + len(self._text)


class Console(ConsoleOutput):
    """A simulated board's console: output (with an optional log file) and input."""

    def __init__(self, name: str = "board", log_path: Optional[str] = None,
                 max_chars: int = DEFAULT_MAX_CHARS) -> None:
        super().__init__(name, max_chars)
        self._input = ""
        self._log = open(log_path, "a", encoding="utf-8") if log_path else None

    def _written(self, text: str) -> None:
        if self._log is not None:
            self._log.write(text)
            self._log.flush()

    # -- input -----------------------------------------------------------------------------

    def send(self, text: str) -> None:
        """Type ``text`` into the board (read by its ``input()`` / ``sys.stdin``)."""
        with self._cond:
            self._input += text
            self._cond.notify_all()

    def read_input(self, check: Callable[[], None], line: bool = True) -> str:
        """Block until input (a line, or any text) arrives; ``check()`` may raise to abort."""
        with self._cond:
            while True:
                check()
                if line:
                    newline = self._input.find("\n")
                    if newline >= 0:
                        result, self._input = self._input[:newline + 1], self._input[newline + 1:]
                        return result
                elif self._input:
                    result, self._input = self._input, ""
                    return result
                self._cond.wait(0.2)

    def close(self) -> None:
        """Close the log file."""
        if self._log is not None:
            self._log.close()
            self._log = None
