"""Every fault kind, on each path (serial link + bridge, TCP proxy), against a real hub: the
board recovers, and every reading it published is stored exactly once (nothing acknowledged
is lost). And a live link applies exactly the faults its seeded plan dictates."""

import pytest

from firmware_sim import FAULT_KINDS, Board, FaultPlan, SerialBridge
from sim_support import (bundle_of, enrol, firmware, make_hub, start_hub, stored_readings,
                         wait_until)

#: Parameters that keep each fault short enough for a test.
PARAMS = {"delay": {"ms": 300}, "disconnect": {"duration_ms": 500},
          "power_cycle": {"off_ms": 200}, "clock_skew": {"ppm": 50000, "offset_ms": 3600000}}
#: Frames the faults hit: after the handshake, while readings flow (TLS records on TCP,
#: protocol frames on serial).
FRAMES = {"tcp": (12, 30), "serial": (6, 15)}
#: Counter that must have moved for each kind.
COUNTER = {"drop": "dropped", "corrupt": "corrupted", "truncate": "truncated",
           "duplicate": "duplicated", "delay": "delayed", "disconnect": "disconnects",
           "power_cycle": "power_cycles", "clock_skew": "clock_skews"}
DESTRUCTIVE = ("drop", "corrupt", "truncate", "duplicate", "disconnect")


class Case:
    """One board under one kind of fault."""

    def __init__(self, tmp_path, data, hub, kind, path):
        self.kind = kind
        bundle_path = enrol(data, "%s-%s" % (path, kind))
        bundle = bundle_of(bundle_path)
        self.device_id = bundle["device_id"]
        direction = "up" if kind in ("power_cycle", "clock_skew") else "both"
        self.plan = FaultPlan(seed=len(kind)).add(kind, at=FRAMES[path], direction=direction,
                                                  **PARAMS.get(kind, {}))
        self.expected_events = len(FRAMES[path]) * (1 if direction == "up" else 2)
        serial = path == "serial"
        self.board = Board(kind, firmware(tmp_path, 100, serial, "fw_%s.py" % path),
                           directory=str(tmp_path / path / kind), bundle=bundle_path,
                           hub=("127.0.0.1", hub.device_port), serial=serial, faults=self.plan)
        self.board.sensor.script(26, range(1, 100000))  # each reading its own value
        self.bridge = None
        if serial:
            self.bridge = SerialBridge(self.board.serial_path, ("127.0.0.1", hub.device_port),
                                       bundle["ca_pem"], bundle["server_name"]).start()
        self.link = None

    def start(self):
        self.board.start()
        self.link = self.board.serial if self.board.serial is not None else self.board.proxy

    def close(self):
        if self.bridge is not None:
            self.bridge.stop()
        self.board.close()


@pytest.mark.parametrize("path", ["tcp", "serial"])
def test_every_fault_kind_is_recovered_from_with_nothing_acknowledged_lost(tmp_path, path):
    data = make_hub(tmp_path)
    hub = start_hub(data)
    cases = []
    try:
        cases = [Case(tmp_path, data, hub, kind, path) for kind in FAULT_KINDS]
        for case in cases:
            case.start()
        wait_until(lambda: all(len(c.plan.log) >= c.expected_events for c in cases), 30,
                   "every planned fault to happen")
        marks = {case.kind: case.board.published for case in cases}

        def recovered(case):
            stored = {r.value for r in stored_readings(data, case.device_id)}
            return stored >= set(range(1, marks[case.kind] + 1))

        wait_until(lambda: all(recovered(c) for c in cases), 30,
                   "every reading made before the last fault to be stored")
        for case in cases:
            case.board.stop()
        problems = {}
        for case in cases:
            stats = case.board.stats()
            values = sorted(r.value for r in stored_readings(data, case.device_id))
            missing = sorted(set(range(1, marks[case.kind] + 1)) - set(values))
            twice = sorted({v for v in values if values.count(v) > 1})
            # Everything made before the last fault is stored, nothing twice, and what is not
            # stored yet is still on the board's flash. (A reading can be both: stored, with
            # its Ack lost to the fault and its resend still due.)
            if missing or twice or len(values) < stats.published - stats.queue_depth \
                    or values[-1:] > [stats.published]:
                problems[case.kind] = "stored %d of %d published (%d on flash); missing %s," \
                    " twice %s" % (len(values), stats.published, stats.queue_depth,
                                   missing[:5], twice[:5])
        assert not problems, problems
        for case in cases:
            counters = case.link.counters
            assert counters.total(COUNTER[case.kind]) >= 1, case.kind
            if case.kind in DESTRUCTIVE:
                assert counters.recovered >= 1, case.kind
        by_kind = {case.kind: case for case in cases}
        assert by_kind["power_cycle"].board.boots >= 2
        assert by_kind["clock_skew"].board.clock.ppm == 50000
    finally:
        for case in cases:
            case.close()
        hub.stop()


def test_a_live_link_applies_exactly_the_faults_its_seed_dictates(tmp_path):
    data = make_hub(tmp_path)
    bundle_path = enrol(data, "seeded")
    hub = start_hub(data)
    plan = (FaultPlan(seed=2024).add("delay", rate=0.2, ms=20)
            .add("clock_skew", rate=0.05, ppm=10))
    board = Board("seeded", firmware(tmp_path, 50), directory=str(tmp_path / "board"),
                  bundle=bundle_path, hub=("127.0.0.1", hub.device_port), faults=plan)
    try:
        board.start()
        wait_until(lambda: min(board.proxy.counters.by_direction[d]["frames"]
                               for d in ("up", "down")) >= 40, 20, "40 records each way")
        board.stop()
        seen = {d: board.proxy.counters.by_direction[d]["frames"] for d in ("up", "down")}
    finally:
        board.close()
        hub.stop()
    replay = FaultPlan(seed=2024, rules=plan.rules)
    other = FaultPlan(seed=2025, rules=plan.rules)
    for direction in ("up", "down"):
        live = plan.sequence(direction)
        assert live == replay.preview(direction, seen[direction])
        assert live != other.preview(direction, seen[direction])
        assert any(e.kind == "delay" for e in live)
