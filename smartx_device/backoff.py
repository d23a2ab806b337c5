"""Reconnect delays: exponential back-off with full jitter, a cap, and the hub's retry-after.

Rules (docs/device-sdk.md, "Reconnecting"):
- Attempt n (n = 0 after a session that was established) waits a delay drawn uniformly from
  [0, min(cap, base * 2**n)] ("full jitter", as AWS's architecture blog describes it): a fleet
  whose hub restarts spreads its reconnects over the window instead of arriving at once.
- The first retry after a lost session is drawn the same way, so it is delayed by a random
  fraction of ``base`` and never zero for a whole fleet at once.
- A hub's ``retry_after_ms`` (rate limited, shutting down) is a floor: the delay is
  retry_after plus a jitter of up to ``base``, never less than what the hub asked.
- ``reset()`` after a session is established; the exponent stops growing at the cap.
The random source and nothing else is injected (``random`` returns a float in [0, 1)), so tests
check exact delays. MicroPython subset.
"""

DEFAULT_BASE_MS = 1000
DEFAULT_CAP_MS = 60000


def _default_random():
    try:
        import random

        return random.random()
    except (ImportError, AttributeError):  # a port without random.random: use os.urandom
        import os

        return int.from_bytes(os.urandom(4), "big") / 4294967296.0


class Backoff:
    """Yields reconnect delays in ms: ``next_delay(retry_after_ms=None)``; ``reset()``."""

    def __init__(self, base_ms=DEFAULT_BASE_MS, cap_ms=DEFAULT_CAP_MS, random=None):
        if base_ms <= 0 or cap_ms < base_ms:
            raise ValueError("need 0 < base_ms <= cap_ms")
        self.base_ms = base_ms
        self.cap_ms = cap_ms
        self._random = random if random is not None else _default_random
        self.attempt = 0

    def window_ms(self):
        """The upper bound of the next delay (before any retry-after)."""
        window = self.base_ms
        for _ in range(self.attempt):
            window *= 2
            if window >= self.cap_ms:
                return self.cap_ms
        return window

    def next_delay(self, retry_after_ms=None):
        """Return the delay before the next attempt and count the attempt."""
        fraction = self._random()
        if retry_after_ms is not None and retry_after_ms > 0:
            delay = retry_after_ms + int(fraction * self.base_ms)
        else:
            delay = int(fraction * self.window_ms())
        if self.window_ms() < self.cap_ms:
            self.attempt += 1
        return delay

    def reset(self):
        """Start over (a session was established)."""
        self.attempt = 0
