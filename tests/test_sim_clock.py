"""Board time: MicroPython's ticks arithmetic, a clock tests advance and skew, the RTC."""

import threading
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from firmware_sim.clock import (EPOCH_2000_UNIX_MS, TICKS_HALF, TICKS_MAX, TICKS_PERIOD,
                                BoardClock, ticks_add, ticks_diff)


class FakeSource:
    """A monotonic source in seconds that a test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


ticks = st.integers(min_value=0, max_value=TICKS_MAX)
deltas = st.integers(min_value=-TICKS_HALF, max_value=TICKS_HALF - 1)


@given(ticks, deltas)
def test_ticks_diff_inverts_ticks_add_across_the_wrap(start, delta):
    later = ticks_add(start, delta)
    assert 0 <= later < TICKS_PERIOD
    assert ticks_diff(later, start) == delta


@given(ticks, ticks)
def test_ticks_diff_is_antisymmetric_except_at_half_period(a, b):
    d = ticks_diff(a, b)
    assert -TICKS_HALF <= d < TICKS_HALF
    if d != -TICKS_HALF:
        assert ticks_diff(b, a) == -d


def test_uptime_follows_the_source_and_restarts_at_boot():
    source = FakeSource()
    clock = BoardClock(source=source)
    assert clock.ticks_ms() == 0
    source.now += 1.5
    assert clock.ticks_ms() == 1500
    assert clock.ticks_us() == 1_500_000
    clock.boot()
    assert clock.ticks_ms() == 0
    source.now += 0.25
    assert clock.ticks_ms() == 250
    assert clock.elapsed_ms() == pytest.approx(1750)


def test_ticks_wrap_when_the_board_starts_near_the_end_of_the_period():
    source = FakeSource()
    clock = BoardClock(start_ms=TICKS_PERIOD - 100, source=source)
    before = clock.ticks_ms()
    source.now += 0.3
    after = clock.ticks_ms()
    assert after < before  # wrapped
    assert ticks_diff(after, before) == 300


def test_advance_jumps_forward_and_refuses_to_go_back():
    source = FakeSource()
    clock = BoardClock(source=source)
    clock.advance(60_000)
    assert clock.ticks_ms() == 60_000
    with pytest.raises(ValueError):
        clock.advance(-1)


def test_skew_ppm_changes_the_rate_from_now_on():
    source = FakeSource()
    clock = BoardClock(source=source)
    source.now += 1.0
    clock.skew(ppm=100_000)  # 10 % fast
    source.now += 10.0
    assert clock.ticks_ms() == pytest.approx(1000 + 11_000, abs=1)
    assert clock.ppm == 100_000


def test_advance_wakes_a_sleeper_long_before_its_real_deadline():
    clock = BoardClock()
    done = threading.Event()

    def sleeper():
        clock.sleep_ms(60_000)
        done.set()

    thread = threading.Thread(target=sleeper, daemon=True)
    thread.start()
    time.sleep(0.05)
    assert not done.is_set()
    began = time.monotonic()
    clock.advance(60_000)
    assert done.wait(2.0)
    assert time.monotonic() - began < 1.0


def test_sleep_runs_the_check_which_can_abort_it():
    clock = BoardClock()
    flag = {"stop": False}

    class Stop(BaseException):
        pass

    def check():
        if flag["stop"]:
            raise Stop()

    errors = []

    def sleeper():
        try:
            clock.sleep_ms(30_000, check)
        except Stop:
            errors.append("stopped")

    thread = threading.Thread(target=sleeper, daemon=True)
    thread.start()
    time.sleep(0.05)
    flag["stop"] = True
    clock.wake()
    thread.join(2.0)
    assert errors == ["stopped"]


def test_rtc_is_unset_after_a_cold_boot_and_kept_over_a_warm_one():
    source = FakeSource()
    clock = BoardClock(source=source, host_time=lambda: 1_700_000_000.0)
    assert not clock.rtc_is_set
    assert clock.rtc_seconds() == 0  # 2000-01-01
    source.now += 5
    assert clock.rtc_unix_ms() == EPOCH_2000_UNIX_MS + 5000
    clock.set_rtc_unix_ms(1_700_000_000_000)
    clock.boot(cold=False)
    source.now += 2
    assert clock.rtc_unix_ms() == 1_700_000_002_000
    clock.boot(cold=True)
    assert clock.rtc_unix_ms() == EPOCH_2000_UNIX_MS


def test_rtc_from_the_host_and_an_offset_skew():
    source = FakeSource()
    clock = BoardClock(source=source, rtc="host", host_time=lambda: 1_700_000_000.0)
    assert clock.rtc_is_set
    assert clock.rtc_unix_ms() == 1_700_000_000_000
    clock.skew(offset_ms=-3_600_000)
    assert clock.rtc_unix_ms() == 1_700_000_000_000 - 3_600_000


def test_bad_clock_settings_are_refused():
    with pytest.raises(ValueError):
        BoardClock(start_ms=TICKS_PERIOD)
    with pytest.raises(ValueError):
        BoardClock(rtc="gps")
