"""Fault plans: seeded and repeatable, parsed from specs, applied to units, counted."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from firmware_sim import FAULT_KINDS, FaultPlan, FaultPlanError, LinkCounters
from firmware_sim.faults import FaultEvent, mutate


def busy_plan(seed):
    return (FaultPlan(seed)
            .add("drop", rate=0.1)
            .add("corrupt", rate=0.1, direction="up")
            .add("delay", rate=0.05, ms=50)
            .add("duplicate", at=[3, 9])
            .add("power_cycle", rate=0.02, limit=2))


def run(plan, frames=300):
    for frame in range(frames):
        for direction in ("up", "down"):
            plan.decide(direction, frame)
    return [(e.direction, e.frame, e.kind, e.fraction, e.bit) for e in plan.sequence()]


def test_the_same_seed_gives_the_same_fault_sequence():
    first = run(busy_plan(42))
    assert first == run(busy_plan(42))
    assert first != run(busy_plan(43))
    kinds = {kind for _d, _f, kind, _fr, _b in first}
    assert {"drop", "corrupt", "delay", "duplicate", "power_cycle"} <= kinds


@given(st.permutations(list(range(60))))
def test_the_sequence_does_not_depend_on_the_order_frames_of_two_directions_interleave(order):
    reference = busy_plan(5)
    for frame in range(60):
        reference.decide("up", frame)
        reference.decide("down", frame)
    shuffled = busy_plan(5)
    # Each direction still sees its own frames in order; only the interleaving differs.
    downs = iter(range(60))
    for up_frame in range(60):
        shuffled.decide("up", up_frame)
        if order[up_frame] % 2:
            frame = next(downs, None)
            if frame is not None:
                shuffled.decide("down", frame)
    for frame in downs:
        shuffled.decide("down", frame)
    assert shuffled.sequence() == reference.sequence()


def test_rules_fire_where_they_say():
    plan = FaultPlan(1).add("truncate", at=[2, 5], direction="down")
    assert [e.frame for e in plan.preview("down", 10)] == [2, 5]
    assert plan.preview("up", 10) == []
    plan = FaultPlan(1).add("drop", rate=1.0, start=3, stop=6)
    assert [e.frame for e in plan.preview("up", 10)] == [3, 4, 5]
    plan = FaultPlan(1).add("drop", rate=1.0, limit=2)
    assert [e.frame for e in plan.preview("up", 10)] == [0, 1]
    assert [e.frame for e in plan.preview("down", 10)] == [0, 1]  # the limit is per direction


def test_one_link_fault_per_frame_but_board_faults_add_up():
    plan = (FaultPlan(0).add("drop", rate=1.0).add("corrupt", rate=1.0)
            .add("clock_skew", rate=1.0, ppm=100))
    events = plan.decide("up", 0)
    assert [e.kind for e in events] == ["drop", "clock_skew"]
    assert events[1].param("ppm") == 100 and events[1].param("offset_ms") == 0


def test_paused_plans_decide_nothing_and_fork_derives_per_board_seeds():
    plan = FaultPlan(9).add("drop", rate=1.0)
    with plan.paused():
        assert plan.decide("up", 0) == []
    assert len(plan.decide("up", 1)) == 1
    a, b = plan.fork("sim-000"), plan.fork("sim-001")
    assert a.seed != b.seed and a.rules == plan.rules
    assert plan.fork("sim-000").seed == a.seed


def test_specs_parse_and_bad_ones_say_why():
    plan = FaultPlan.from_spec("drop=0.02,delay=0.05:ms=300,power_cycle@40+80:off_ms=500,"
                               "corrupt=0.01/up", seed=3)
    assert [(r.kind, r.direction) for r in plan.rules] == [
        ("drop", "both"), ("delay", "both"), ("power_cycle", "up"), ("corrupt", "up")]
    assert plan.rules[1].params == {"ms": 300}
    assert plan.rules[2].at == frozenset({40, 80})
    for bad in ("melt=0.1", "drop=2", "drop", "delay=0.1:ms=x", "drop=0.1:ms=3",
                "delay=0.1:ms=-1", "drop=0.1/sideways"):
        with pytest.raises(FaultPlanError):
            FaultPlan.from_spec(bad)
    with pytest.raises(FaultPlanError):
        FaultPlan().add("drop")  # neither rate nor at
    assert set(FAULT_KINDS) == {"drop", "corrupt", "truncate", "duplicate", "delay",
                                "disconnect", "power_cycle", "clock_skew"}


def event(kind, fraction=0.5, bit=3, **params):
    return FaultEvent("up", 0, kind, 0, tuple(sorted(params.items())), fraction, bit)


@given(st.binary(min_size=3, max_size=200), st.floats(0, 0.999), st.integers(0, 7))
def test_mutations_damage_only_the_body(unit, fraction, bit):
    start, end = 1, len(unit) - 1
    (corrupted,), _ = mutate(event("corrupt", fraction, bit), unit, start, end)
    differing = [i for i in range(len(unit)) if corrupted[i] != unit[i]]
    assert len(differing) == 1 and start <= differing[0] < end
    assert bin(corrupted[differing[0]] ^ unit[differing[0]]).count("1") == 1
    (truncated,), _ = mutate(event("truncate", fraction, bit), unit, start, end)
    assert start <= len(truncated) < end and unit.startswith(truncated)
    assert mutate(event("drop"), unit, start, end) == ([], 0.0)
    assert mutate(event("duplicate", copies=3), unit, start, end) == ([unit] * 3, 0.0)
    assert mutate(event("delay", ms=250), unit, start, end) == ([unit], 250.0)


def test_counters_count_faults_and_recovery():
    counters = LinkCounters()
    assert counters.frame("up") == 0 and counters.frame("up") == 1
    counters.fault(event("drop"))
    counters.fault(event("corrupt"))
    counters.delivered("up", intact=False)
    assert counters.recovered == 0
    counters.delivered("up", intact=True)
    assert counters.recovered == 2 and counters.dropped == 1 and counters.corrupted == 1
    counters.fault(event("delay"))  # a delay is not something to recover from
    counters.delivered("up", intact=True)
    assert counters.recovered == 2
    totals = counters.as_dict()["total"]
    assert totals["frames"] == counters.frames_sent == 2
    assert totals["delivered"] == 3
