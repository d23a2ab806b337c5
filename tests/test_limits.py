"""Flood limits as pure functions of time: token buckets, connection caps, auth back-off."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from smartx_hub import limits as lim
from smartx_hub.limits import (ConnectionGate, DeviceRates, LimitsConfigError, ListenerLimits,
                               TokenBucket)


def test_bucket_starts_full_then_refills_at_its_rate():
    bucket = TokenBucket(rate=10.0, burst=5, now_ms=0)
    assert [bucket.take(0) for _ in range(5)] == [0] * 5
    wait = bucket.take(0)
    assert wait == 100  # one token every 100 ms at 10/s
    assert bucket.take(99) > 0
    assert bucket.take(100) == 0
    assert bucket.take(100) == 100


def test_bucket_refused_take_spends_nothing_and_waits_for_at_most_a_burst():
    bucket = TokenBucket(rate=2.0, burst=4, now_ms=0)
    assert bucket.take(0, count=3) == 0
    assert bucket.take(0, count=3) == 1000  # 1 left, 2 more at 2/s
    assert bucket.take(0, count=1) == 0  # the refused take spent nothing
    assert bucket.take(0, count=100) == 2000  # never more than refilling a whole burst


@given(rate=st.floats(0.5, 1000), burst=st.integers(1, 50),
       steps=st.lists(st.tuples(st.integers(0, 2000), st.integers(1, 5)), max_size=60))
def test_bucket_never_allows_more_than_burst_plus_rate_times_time(rate, burst, steps):
    bucket = TokenBucket(rate, burst, now_ms=0)
    now, allowed = 0, 0
    for advance, count in steps:
        now += advance
        wait = bucket.take(now, count)
        if wait == 0:
            allowed += count
        else:
            assert wait >= 1
            # Waiting as long as told is enough whenever the request fits in a burst.
            if count <= burst:
                probe = TokenBucket(rate, burst, 0)
                probe.tokens, probe.updated_ms = bucket.tokens, bucket.updated_ms
                assert probe.take(now + wait, count) == 0
    assert allowed <= burst + rate * now / 1000.0 + 1e-6


def make_gate(**settings):
    return ConnectionGate(ListenerLimits.from_mapping(settings))


def test_gate_caps_per_ip_and_in_total():
    gate = make_gate(max_connections=3, max_connections_per_ip=2)
    assert gate.admit("10.0.0.1", 0) is None
    assert gate.admit("10.0.0.1", 0) is None
    assert gate.admit("10.0.0.1", 0) == lim.REFUSED_PER_IP
    assert gate.admit("10.0.0.2", 0) is None
    assert gate.admit("10.0.0.3", 0) == lim.REFUSED_TOTAL
    gate.release("10.0.0.1", was_verified=False)
    assert gate.connections == 2 and gate.connections_from("10.0.0.1") == 1
    assert gate.admit("10.0.0.3", 0) is None


def test_gate_caps_unverified_connections_separately():
    gate = make_gate(max_unverified_per_ip=2, max_unverified=3)
    assert gate.admit("a", 0) is None and gate.admit("a", 0) is None
    assert gate.admit("a", 0) == lim.REFUSED_UNVERIFIED_PER_IP
    gate.verified("a")  # a verified session no longer counts against the handshake cap
    assert gate.admit("a", 0) is None
    assert gate.admit("b", 0) is None
    assert gate.admit("c", 0) == lim.REFUSED_UNVERIFIED  # 3 handshakes in flight in total
    gate.release("a", was_verified=True)
    assert gate.unverified == 3 and gate.connections == 3


def test_gate_limits_the_connection_rate_per_ip():
    gate = make_gate(connection_rate_per_ip=10.0, connection_burst_per_ip=3)
    for _ in range(3):
        assert gate.admit("a", 0) is None
        gate.release("a", False)
    assert gate.admit("a", 0) == lim.REFUSED_RATE
    assert gate.admit("b", 0) is None  # another address has its own bucket
    assert gate.admit("a", 100) is None


def test_auth_backoff_starts_at_the_threshold_and_doubles_to_the_cap():
    gate = make_gate(auth_failures_before_backoff=3, auth_backoff_base_ms=1000,
                     auth_backoff_max_ms=5000)
    assert gate.auth_failed("a", 0) == 0
    assert gate.auth_failed("a", 0) == 0
    assert gate.auth_failed("a", 0) == 1000
    assert gate.admit("a", 999) == lim.REFUSED_BACKOFF
    assert gate.blocked_for("a", 500) == 500
    assert gate.admit("b", 999) is None  # only the failing address is backed off
    assert gate.admit("a", 1000) is None
    assert gate.auth_failed("a", 1000) == 2000
    assert gate.auth_failed("a", 3000) == 4000
    assert gate.auth_failed("a", 7000) == 5000  # capped
    assert gate.auth_failed("a", 12000) == 5000


def test_auth_failures_are_forgotten_after_a_quiet_spell():
    gate = make_gate(auth_failures_before_backoff=2, auth_failure_forget_ms=10_000)
    assert gate.auth_failed("a", 0) == 0
    assert gate.auth_failed("a", 10_000) == 0  # the first one was forgotten
    assert gate.auth_failed("a", 10_001) > 0


def test_prune_forgets_only_idle_addresses():
    gate = make_gate(connection_rate_per_ip=1000.0, auth_failure_forget_ms=1000)
    assert gate.admit("busy", 0) is None
    assert gate.admit("gone", 0) is None
    gate.release("gone", False)
    gate.auth_failed("failed", 0)
    assert gate.prune(10) == 1  # "gone" only: "failed" still remembers its failure
    assert len(gate) == 2
    assert gate.prune(2000) == 1  # now "failed" too; "busy" holds a connection
    assert gate.connections_from("busy") == 1


def test_device_rates_survive_reconnects_and_are_pruned_when_full():
    rates = DeviceRates(ListenerLimits(message_rate=1.0, message_burst=2))
    assert rates.take("dev", 0, 2) == 0
    assert rates.take("dev", 0) == 1000
    assert rates.prune(0, online=set()) == 0  # not full yet: forgetting would reset it
    assert rates.take("dev", 1000) == 0
    assert rates.prune(10_000, online={"dev"}) == 0
    assert rates.prune(10_000, online=set()) == 1 and len(rates) == 0


def test_limits_from_mapping_checks_names_kinds_and_ranges():
    limits = ListenerLimits.from_mapping({"max_connections_per_ip": 5, "message_rate": 2})
    assert limits.max_connections_per_ip == 5 and limits.message_rate == 2.0
    assert ListenerLimits.from_mapping(None) == ListenerLimits()
    for bad in ({"no_such_limit": 1}, {"max_connections": -1}, {"max_connections": 1.5},
                {"max_connections": True}, {"message_rate": 0}, {"message_rate": "fast"},
                {"message_rate": float("nan")}, {"keepalive_ms": 10}, {"max_frame_size": 0},
                {"auth_backoff_base_ms": 10, "auth_backoff_max_ms": 5}):
        with pytest.raises(LimitsConfigError):
            ListenerLimits.from_mapping(bad)
    with pytest.raises(LimitsConfigError):
        ListenerLimits.from_mapping(["max_connections"])


def test_hub_config_then_arguments_override_the_defaults():
    from types import SimpleNamespace

    from smartx_hub.server import limits_for

    ctx = SimpleNamespace(config={"hub_id": "hub_x", "device_limits": {"message_rate": 7,
                                                                       "keepalive_ms": 5000}})
    limits = limits_for(ctx, {"keepalive_ms": 2000})
    assert (limits.message_rate, limits.keepalive_ms) == (7.0, 2000)
    assert limits.max_connections == ListenerLimits().max_connections
    with pytest.raises(LimitsConfigError):
        limits_for(SimpleNamespace(config={"device_limits": {"typo_rate": 1}}))
