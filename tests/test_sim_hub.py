"""Simulated boards against a real hub (loopback TLS, real SQLite): telemetry arrives, and a
power cut with readings queued on the board's flash loses none of them."""

import os

from firmware_sim import Board, FaultPlan
from sim_support import (bundle_of, enrol, firmware, make_hub, start_hub, stored_readings,
                         wait_until)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SENSOR_NODE = os.path.join(ROOT, "examples", "sensor_node.py")


def test_sensor_node_runs_unchanged_and_its_readings_reach_the_hub(tmp_path):
    data = make_hub(tmp_path)
    bundle_path = enrol(data, "sim-000")
    device_id = bundle_of(bundle_path)["device_id"]
    # The hub's usual 30 s keep-alive: jumping board time 10 s must not look like a dead link.
    hub = start_hub(data, keepalive_ms=30000)
    board = Board("sim-000", SENSOR_NODE, directory=str(tmp_path / "board"), bundle=bundle_path,
                  hub=("127.0.0.1", hub.device_port))
    board.sensor.script(26, [1111, 2222, 3333])
    try:
        board.start()
        board.console.expect("SmartX sensor node %s booting" % device_id, 10)
        board.console.expect("connected", 10)
        wait_until(lambda: board.stats().acknowledged >= 1, 10, "the first reading's ack")
        # The firmware publishes every 10 s of board time: move its clock instead of waiting.
        for count in (2, 3):
            board.clock.advance(10_000)
            wait_until(lambda c=count: board.stats().acknowledged >= c, 10, "reading %d" % count)
        rows = stored_readings(data, device_id)
        assert sorted(r.value for r in rows) == [1111, 2222, 3333]
        assert {r.stream for r in rows} == {"adc"}
        assert hub.live is not None
        stats = board.stats()
        assert stats.online and stats.queue_depth == 0 and stats.connections == 1
    finally:
        board.close()
        hub.stop()


def test_a_power_cycle_with_readings_queued_on_flash_loses_none(tmp_path):
    data = make_hub(tmp_path)
    bundle_path = enrol(data, "cycler")
    device_id = bundle_of(bundle_path)["device_id"]
    hub = start_hub(data)
    # An empty plan: the board talks through the fault proxy, whose outage we switch on.
    board = Board("cycler", firmware(tmp_path, period_ms=50), directory=str(tmp_path / "board"),
                  bundle=bundle_path, hub=("127.0.0.1", hub.device_port), faults=FaultPlan())
    board.sensor.script(26, range(1, 100000))  # every reading has its own value
    try:
        board.start()
        wait_until(lambda: board.stats().acknowledged >= 5, 10, "readings acknowledged")
        board.proxy.disconnect(duration_ms=2500)  # the network goes away for 2.5 s
        wait_until(lambda: board.stats().queue_depth >= 10, 10, "readings queued on flash")
        queued = board.stats().queue_depth
        assert os.path.getsize(board.flash.host_path("queue.log")) > 0
        board.power_cycle(off_ms=100)
        assert board.boots == 2
        board.console.expect("fast node .* booting", 10)  # the second boot
        wait_until(lambda: board.stats().acknowledged >= board.published - 2 >= queued, 15,
                   "the queue replayed after the reboot")
        board.stop()
        stats = board.stats()
        on_flash = stats.queue_depth  # published after the last ack: still on the flash
        values = sorted(r.value for r in stored_readings(data, device_id))
        # None lost, none twice: every acknowledged reading is stored; a reading still on the
        # flash may be stored too (committed, its Ack not yet back when the board stopped).
        assert values == list(range(1, len(values) + 1))
        assert stats.published - on_flash <= len(values) <= stats.published
        assert stats.acknowledged <= len(values)
    finally:
        board.close()
        hub.stop()
