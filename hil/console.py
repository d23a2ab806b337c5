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
from dataclasses import dataclass
from typing import Pattern, Union

from firmware_sim.console import ConsoleOutput, ConsoleTimeout

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


class ConsoleBuffer(ConsoleOutput):
    """One board's console output, thread-safe, with ``expect`` (see the module rules).

    The buffer, trimming, marks and matching are the simulator's ``ConsoleOutput``; this adds
    line-end normalisation and the harness's ``Expected``/``ExpectTimeout``.
    """

    def __init__(self, name: str, max_chars: int = DEFAULT_MAX_CHARS) -> None:
        super().__init__(name, max_chars)
        self._pending_cr = False

    def feed(self, text: str) -> None:
        """Append console text (called by the port's reader thread)."""
        if not text:
            return
        with self._cond:  # reentrant: write() takes it again
            self.write(self._normalise(text))

    def _normalise(self, text: str) -> str:
        # A CR at the end of one piece may be the first half of a CR LF split across reads.
        if self._pending_cr:
            text = "\r" + text
            self._pending_cr = False
        if text.endswith("\r"):
            self._pending_cr = True
            text = text[:-1]
        return text.replace("\r\n", "\n").replace("\r", "\n")

    def expect(self, pattern: Union[str, Pattern[str]], timeout: float = 10.0) -> Expected:
        """Wait up to ``timeout`` s for ``pattern`` (a regex) after the cursor; return it."""
        with self._cond:  # so ``before`` belongs to this match
            try:
                match = super().expect(pattern, timeout)
            except ConsoleTimeout as timed_out:
                raise ExpectTimeout(self.name, timed_out.pattern, timeout, timed_out.text) from None
            return Expected(match, self.before)
