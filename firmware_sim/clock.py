"""Board time: a simulated board's ticks, sleeps and RTC, on a clock tests can advance and skew.

Rules (docs/simulator.md, "Board time"):
- Board time is real (monotonic) time scaled by the board's crystal error (``ppm``), plus the
  jumps tests make with ``advance(ms)``. It never goes back.
- ``ticks_ms()`` restarts at ``start_ms`` on every boot (as on a real board) and wraps at
  ``TICKS_PERIOD`` (2**30, MicroPython's ``ticks`` period), so firmware that mixes up
  ``ticks_diff`` and ``-`` fails here as it would on a board. Start near the wrap to test it.
- ``sleep_ms`` sleeps in board time: ``advance`` wakes a sleeper whose deadline it passes,
  and an interrupt check (the board's reset request) is run on every wake-up.
- The RTC (``time.time()``, ``machine.RTC``) counts seconds from 2000-01-01, as MicroPython's
  bare-metal ports do. A cold boot leaves it at 2000-01-01 (no battery) unless the board keeps
  it (``rtc="host"``: set from the host clock, as an NTP-synced Pi); ``skew(offset_ms=...)``
  shifts it. The SDK learns the real time from the hub, so a wrong RTC must not matter.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Optional

#: MicroPython's ticks period: ``ticks_ms`` values lie in [0, TICKS_PERIOD).
TICKS_PERIOD = 1 << 30
TICKS_MAX = TICKS_PERIOD - 1
TICKS_HALF = TICKS_PERIOD // 2
#: Unix ms of 2000-01-01T00:00:00Z, the epoch of MicroPython's bare-metal ``time``.
EPOCH_2000_UNIX_MS = 946684800000
#: Longest single real wait inside ``sleep_ms``: a bound, so a lost wake-up costs at most this.
_MAX_WAIT_S = 0.5


def ticks_add(ticks: int, delta: int) -> int:
    """MicroPython's ``ticks_add``: ``ticks + delta`` modulo the ticks period."""
    return (ticks + delta) & TICKS_MAX


def ticks_diff(end: int, start: int) -> int:
    """MicroPython's ``ticks_diff``: the signed distance ``end - start`` across one wrap."""
    return ((end - start + TICKS_HALF) & TICKS_MAX) - TICKS_HALF


class BoardClock:
    """One board's time: uptime ticks, interruptible sleeps, an RTC; advance and skew it.

    ``source`` is the real monotonic clock in seconds (``time.monotonic``); tests may pass
    another. ``ppm`` is the crystal error (+50 ppm runs 50 µs per second fast).
    """

    def __init__(self, start_ms: int = 0, ppm: float = 0.0, rtc: Optional[str] = None,
                 source: Callable[[], float] = time.monotonic,
                 host_time: Callable[[], float] = time.time) -> None:
        if not 0 <= start_ms < TICKS_PERIOD:
            raise ValueError("start_ms must be in [0, 2**30)")
        if rtc not in (None, "host"):
            raise ValueError("rtc must be None (unset after a cold boot) or 'host'")
        self.start_ms = start_ms
        self.rtc_mode = rtc
        self._source = source
        self._host_time = host_time
        self._cond = threading.Condition()
        self._ppm = float(ppm)
        self._base_real = source()
        self._base_elapsed = 0.0  # board ms elapsed since the clock was made, at _base_real
        self._boot_elapsed = 0.0  # elapsed ms when the current boot began
        self._rtc_anchor = (0, 0.0)  # (Unix ms, elapsed ms) the RTC was last set at
        self._rtc_set = False
        #: Longest real wait of one sleep slice (None: the default); the board shortens it
        #: while ``machine.Timer`` callbacks are armed, so they fire on time.
        self.max_wait_s: Optional[float] = None
        self.boot(cold=True)

    # -- the continuous board time ---------------------------------------------------------

    @property
    def ppm(self) -> float:
        """The crystal error in parts per million."""
        return self._ppm

    def elapsed_ms(self) -> float:
        """Board milliseconds since this clock was made (across boots; skewed, advanced)."""
        with self._cond:
            return self._elapsed_locked()

    def _elapsed_locked(self) -> float:
        real = self._source()
        return self._base_elapsed + (real - self._base_real) * 1000.0 * (1.0 + self._ppm / 1e6)

    def _rebase_locked(self) -> None:
        now_real = self._source()
        self._base_elapsed += (now_real - self._base_real) * 1000.0 * (1.0 + self._ppm / 1e6)
        self._base_real = now_real

    def advance(self, ms: float) -> None:
        """Jump board time forward by ``ms`` (>= 0); wakes sleepers whose deadline passes."""
        if ms < 0:
            raise ValueError("board time never goes back: advance(ms) needs ms >= 0")
        with self._cond:
            self._rebase_locked()
            self._base_elapsed += ms
            self._cond.notify_all()

    def skew(self, ppm: Optional[float] = None, offset_ms: Optional[float] = None) -> None:
        """Change the crystal error to ``ppm`` and/or shift the RTC by ``offset_ms``."""
        with self._cond:
            if ppm is not None:
                self._rebase_locked()
                self._ppm = float(ppm)
            if offset_ms is not None:
                unix, at = self._rtc_anchor
                self._rtc_anchor = (unix + int(offset_ms), at)
            self._cond.notify_all()

    def wake(self) -> None:
        """Wake every sleeper now so it runs its interrupt check (used on reset)."""
        with self._cond:
            self._cond.notify_all()

    # -- boots -----------------------------------------------------------------------------

    def boot(self, cold: bool = False) -> None:
        """Restart the uptime ticks (every reset); a cold boot also clears an unbacked RTC."""
        with self._cond:
            self._boot_elapsed = self._elapsed_locked()
            if cold or not self._rtc_set:
                if self.rtc_mode == "host":
                    self._rtc_anchor = (int(self._host_time() * 1000), self._boot_elapsed)
                    self._rtc_set = True
                else:
                    self._rtc_anchor = (EPOCH_2000_UNIX_MS, self._boot_elapsed)
                    self._rtc_set = False

    def uptime_ms(self) -> float:
        """Board milliseconds since the current boot began, plus ``start_ms``."""
        with self._cond:
            return self._elapsed_locked() - self._boot_elapsed + self.start_ms

    def ticks_ms(self) -> int:
        """MicroPython ``time.ticks_ms()``: uptime ms, wrapping at 2**30."""
        return int(self.uptime_ms()) & TICKS_MAX

    def ticks_us(self) -> int:
        """MicroPython ``time.ticks_us()``: uptime µs, wrapping at 2**30."""
        return int(self.uptime_ms() * 1000.0) & TICKS_MAX

    # -- sleeping --------------------------------------------------------------------------

    def sleep_ms(self, ms: float, check: Optional[Callable[[], None]] = None) -> None:
        """Sleep ``ms`` of board time; ``check()`` runs on every wake-up and may raise."""
        with self._cond:
            deadline = self._elapsed_locked() + max(0.0, float(ms))
            while True:
                if check is not None:
                    check()
                remaining = deadline - self._elapsed_locked()
                if remaining <= 0:
                    return
                rate = 1.0 + self._ppm / 1e6
                self._cond.wait(min(remaining / 1000.0 / rate, self.max_wait_s or _MAX_WAIT_S))

    # -- the RTC ---------------------------------------------------------------------------

    @property
    def rtc_is_set(self) -> bool:
        """True once the RTC holds a real time (set by firmware, or kept from the host)."""
        return self._rtc_set

    def rtc_unix_ms(self) -> int:
        """What the board's RTC says, in Unix ms (2000-01-01 plus uptime when never set)."""
        with self._cond:
            unix, at = self._rtc_anchor
            return unix + int(self._elapsed_locked() - at)

    def set_rtc_unix_ms(self, unix_ms: int) -> None:
        """Set the RTC (``machine.RTC().datetime(...)`` does this)."""
        with self._cond:
            self._rtc_anchor = (int(unix_ms), self._elapsed_locked())
            self._rtc_set = True

    def rtc_seconds(self) -> int:
        """MicroPython ``time.time()``: whole seconds since 2000-01-01 by the RTC."""
        return (self.rtc_unix_ms() - EPOCH_2000_UNIX_MS) // 1000
