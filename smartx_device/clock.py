"""Monotonic milliseconds on CPython and MicroPython, and the device's idea of wall time.

- ``monotonic_ms()`` never goes back. On MicroPython (or the simulator, which gives ``time`` a
  ``ticks_ms``) it accumulates ``ticks_diff`` steps, so the ticks counter wrapping (every 2**30
  ms on most ports) is invisible, provided it is called at least once per half wrap period
  (about six days); the client calls it on every loop turn. On CPython it is
  ``time.monotonic_ns() // 1_000_000``.
- ``WallClock`` answers "what time is it in Unix ms?" for reading timestamps: the hub's time
  learnt at the last session start (boards need no RTC), else the system clock when it looks
  set (after 2020), else None.
MicroPython subset: ``time`` only; the ticks functions are looked up on each call because the
simulator may install them after this module was imported.
"""

import time

# Unix ms of 2020-01-01: a system clock before this has never been set.
PLAUSIBLE_UNIX_MS = 1577836800000
# MicroPython ports whose epoch is 2000-01-01 count this many seconds less than Unix time.
_EPOCH_2000_OFFSET_S = 946684800

_state = {"last": None, "total": 0}


def monotonic_ms():
    """Return milliseconds from an arbitrary start; never decreases."""
    ticks_ms = getattr(time, "ticks_ms", None)
    if ticks_ms is None:
        return time.monotonic_ns() // 1000000
    now = ticks_ms()
    last = _state["last"]
    if last is not None:
        step = time.ticks_diff(now, last)
        if step > 0:
            _state["total"] += step
    _state["last"] = now
    return _state["total"]


def sleep_ms(ms):
    """Sleep ``ms`` milliseconds (nothing if ``ms`` <= 0)."""
    if ms <= 0:
        return
    sleeper = getattr(time, "sleep_ms", None)
    if sleeper is not None:
        sleeper(int(ms))
    else:
        time.sleep(ms / 1000.0)


def system_unix_ms():
    """Return the system clock in Unix ms, or None if it has clearly never been set."""
    try:
        seconds = time.time()
        if time.gmtime(0)[0] == 2000:
            seconds += _EPOCH_2000_OFFSET_S
    except (AttributeError, OSError):
        return None
    value = int(seconds * 1000)
    if value < PLAUSIBLE_UNIX_MS:
        return None
    return value


class WallClock:
    """Unix time in ms for timestamps: hub-synchronised when possible (``sync``)."""

    def __init__(self, monotonic=monotonic_ms, system=system_unix_ms):
        self._monotonic = monotonic
        self._system = system
        self._anchor = None  # (unix_ms, monotonic_ms) from the hub

    def sync(self, hub_time_ms, monotonic_now):
        """Take the hub's time (from Accepted) as the truth at ``monotonic_now``."""
        self._anchor = (hub_time_ms, monotonic_now)


    def from_monotonic(self, monotonic):
        """Return the Unix ms of a monotonic instant of this boot, or None if unknown."""
        if self._anchor is None:
            system = self._system()
            if system is None:
                return None
            # Anchor once: reading two clocks per call would jitter, and an NTP step would
            # reorder readings; the hub's time replaces this anchor at the next session.
            self._anchor = (system, self._monotonic())
        return self._anchor[0] + (monotonic - self._anchor[1])

    def now_ms(self):
        """Return the Unix time in ms, or None when neither the hub nor the system knows it."""
        return self.from_monotonic(self._monotonic())
