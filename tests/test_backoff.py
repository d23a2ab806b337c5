"""Reconnect back-off: full jitter, cap, retry-after floor, reset; and the monotonic clock."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from smartx_device import backoff, clock


def sequence(values):
    items = iter(values)
    return lambda: next(items)


def test_full_jitter_delays_with_an_injected_random_source():
    policy = backoff.Backoff(base_ms=100, cap_ms=1000, random=sequence([0.5] * 8))
    assert [policy.next_delay() for _ in range(8)] == [50, 100, 200, 400, 500, 500, 500, 500]


def test_retry_after_is_a_floor_plus_jitter():
    policy = backoff.Backoff(base_ms=100, cap_ms=1000, random=sequence([0.0, 0.99]))
    assert policy.next_delay(retry_after_ms=5000) == 5000
    assert policy.next_delay(retry_after_ms=5000) == 5099


def test_reset_starts_over():
    policy = backoff.Backoff(base_ms=100, cap_ms=1000, random=sequence([1.0] * 5))
    policy.next_delay()
    policy.next_delay()
    assert policy.window_ms() == 400
    policy.reset()
    assert policy.next_delay() == 100


def test_bad_parameters_are_refused():
    with pytest.raises(ValueError):
        backoff.Backoff(base_ms=0)
    with pytest.raises(ValueError):
        backoff.Backoff(base_ms=100, cap_ms=50)


@given(st.lists(st.floats(0, 0.999999), min_size=1, max_size=40), st.integers(1, 5000),
       st.integers(1, 20), st.one_of(st.none(), st.integers(1, 10**6)))
def test_delays_stay_inside_the_window(draws, base, factor, retry_after):
    cap = base * factor
    policy = backoff.Backoff(base_ms=base, cap_ms=cap, random=sequence(draws))
    for attempt in range(len(draws)):
        window = min(cap, base * 2 ** attempt)
        assert policy.window_ms() == window
        delay = policy.next_delay(retry_after)
        if retry_after is None:
            assert 0 <= delay <= window
        else:
            assert retry_after <= delay < retry_after + base


def test_default_random_source_spreads_a_fleet():
    delays = {backoff.Backoff(base_ms=10_000).next_delay() for _ in range(100)}
    assert len(delays) > 90 and all(0 <= d < 10_000 for d in delays)


class Ticks:
    """MicroPython's time.ticks_* with a 2**30 ms wrap, driven by hand."""

    PERIOD = 2 ** 30

    def __init__(self, start):
        self.raw = start

    def ticks_ms(self):
        return self.raw % self.PERIOD

    def ticks_diff(self, a, b):
        half = self.PERIOD // 2
        return ((a - b + half) % self.PERIOD) - half


@given(st.integers(0, 2 ** 30 - 1), st.lists(st.integers(0, 2 ** 28), max_size=30))
def test_monotonic_ms_accumulates_across_ticks_wraps(start, steps):
    ticks = Ticks(start)
    saved_ticks = getattr(clock.time, "ticks_ms", None)
    saved_diff = getattr(clock.time, "ticks_diff", None)
    clock.time.ticks_ms, clock.time.ticks_diff = ticks.ticks_ms, ticks.ticks_diff
    clock._state.update(last=None, total=0)
    try:
        base = clock.monotonic_ms()
        for step in steps:
            ticks.raw += step
            assert clock.monotonic_ms() - base == ticks.raw - start
    finally:
        for name, saved in (("ticks_ms", saved_ticks), ("ticks_diff", saved_diff)):
            if saved is None:
                delattr(clock.time, name)
            else:
                setattr(clock.time, name, saved)
        clock._state.update(last=None, total=0)


def test_wall_clock_prefers_the_hub_and_refuses_an_unset_system_clock():
    now = [5_000]
    wall = clock.WallClock(monotonic=lambda: now[0], system=lambda: None)
    assert wall.now_ms() is None  # no RTC, no hub yet: time unknown
    wall.sync(1_764_430_000_000, 5_000)
    now[0] = 6_500
    assert wall.now_ms() == 1_764_430_001_500
    assert wall.from_monotonic(5_500) == 1_764_430_000_500
    system = clock.WallClock(monotonic=lambda: 100, system=lambda: 1_700_000_000_000)
    assert system.from_monotonic(40) == 1_700_000_000_000 - 60
