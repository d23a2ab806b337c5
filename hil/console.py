"""A board's console as the test host sees it: text fed by a background reader, with ``expect``.

Rules (docs/hil.md, "The board fixture"):
- Whoever reads the board's port (the serial driver) calls ``feed(text)``; tests call
  ``expect(pattern, timeout)`` from their own thread. Everything is kept in order behind one
  condition variable; past ``max_chars`` the oldest text is dropped (a long session must not
  grow without bound), and ``mark``/``since`` positions stay absolute across that trimming.
- ``expect`` searches from the end of the previous match (or from where ``skip_to_end`` put the
  cursor), so a test reads the console once, in order. It returns an ``Expected``: the match,
  and ``before``, the text between the previous cursor and the match. A timeout raises
  ``ExpectTimeout`` carrying what did arrive, so the failure says what the board printed.
- Board output is text: bytes are decoded by the framer (invalid UTF-8 replaced), line ends
  are normalised (CR LF and lone CR become LF) so a pattern written for ``\n`` matches a board
  that prints ``\r\n``.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Pattern, Union

#: Console text kept per board; the oldest goes first past this.
DEFAULT_MAX_CHARS = 4_000_000
#: How much of the unmatched console an ``ExpectTimeout`` message quotes.
QUOTED_TAIL_CHARS = 3000


class ExpectTimeout(AssertionError):
    """``expect`` saw no match in time; ``text`` is what arrived since the cursor."""

    def __init__(self, name: str, pattern: str, timeout: float, text: str) -> None:
        tail = text[-QUOTED_TAIL_CHARS:]
        super().__init__("%s: no match for %r within %.1f s; console since the last match%s:\n%s"
                         % (name, pattern, timeout,
                            " (its end)" if len(text) > len(tail) else "", tail))
        self.pattern = pattern
        self.text = text


@dataclass
class Expected:
    """What ``expect`` found: ``match`` (an ``re.Match``) and the text ``before`` it."""

    match: "re.Match[str]"
    before: str

    def group(self, *names: Union[int, str]) -> Union[str, tuple]:
        """The match's groups, as ``re.Match.group``."""
        return self.match.group(*names)

    @property
    def text(self) -> str:
        """The matched text."""
        return self.match.group(0)


class ConsoleBuffer:
    """One board's console output, thread-safe, with ``expect`` (see the module rules)."""

    def __init__(self, name: str, max_chars: int = DEFAULT_MAX_CHARS) -> None:
        self.name = name
        self.max_chars = max_chars
        self._cond = threading.Condition()
        self._text = ""
        self._trimmed = 0  # characters dropped from the front of _text
        self._cursor = 0  # absolute position the next expect searches from
        self._pending_cr = False
        self._sinks: List[Callable[[str], None]] = []

    def add_sink(self, sink: Callable[[str], None]) -> None:
        """Call ``sink(text)`` with everything fed from now on (a log file, an echo)."""
        with self._cond:
            self._sinks.append(sink)

    def remove_sink(self, sink: Callable[[str], None]) -> None:
        """Stop calling ``sink``."""
        with self._cond:
            if sink in self._sinks:
                self._sinks.remove(sink)

    def feed(self, text: str) -> None:
        """Append console text (called by the port's reader thread)."""
        if not text:
            return
        with self._cond:
            text = self._normalise(text)
            if not text:
                return
            self._text += text
            excess = len(self._text) - self.max_chars
            if excess > 0:
                self._text = self._text[excess:]
                self._trimmed += excess
                self._cursor = max(self._cursor, self._trimmed)
            sinks = list(self._sinks)
            self._cond.notify_all()
        for sink in sinks:
            try:
                sink(text)
            except Exception:  # noqa: BLE001 - a broken log sink must not stop the reader
                pass

    def _normalise(self, text: str) -> str:
        # A CR at the end of one piece may be the first half of a CR LF split across reads.
        if self._pending_cr:
            text = "\r" + text
            self._pending_cr = False
        if text.endswith("\r"):
            self._pending_cr = True
            text = text[:-1]
        return text.replace("\r\n", "\n").replace("\r", "\n")

    @property
    def text(self) -> str:
        """All the text still held."""
        with self._cond:
            return self._text

    def mark(self) -> int:
        """The current end of the console (an absolute position, for ``since``)."""
        with self._cond:
            return self._trimmed + len(self._text)

    def since(self, mark: int) -> str:
        """Text fed after ``mark`` (what is still held of it)."""
        with self._cond:
            return self._text[max(0, mark - self._trimmed):]

    def skip_to_end(self) -> None:
        """Make the next ``expect`` look only at text fed from now on."""
        with self._cond:
            self._cursor = self._trimmed + len(self._text)

    def expect(self, pattern: Union[str, Pattern[str]], timeout: float = 10.0) -> Expected:
        """Wait up to ``timeout`` s for ``pattern`` (a regex) after the cursor; return it."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                start = max(0, self._cursor - self._trimmed)
                match = regex.search(self._text, start)
                if match is not None:
                    before = self._text[start:match.start()]
                    self._cursor = self._trimmed + match.end()
                    return Expected(match, before)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ExpectTimeout(self.name, regex.pattern, timeout, self._text[start:])
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
