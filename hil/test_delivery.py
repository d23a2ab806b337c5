"""The HIL suite, part 2: nothing the board publishes is lost, whatever happens to the path.

"Nothing lost" is checked the same way everywhere: the firmware publishes [boot, n] with n
counting from 0; with publishing paused at ``published``, the hub must hold exactly
0 .. published-1 of that boot, each once (the store keeps a repeated message id once).
"""

from __future__ import annotations

import time

import pytest

from hil.boards import BANNER
from hil.relay import wait_until


def assert_complete(values, published):
    """The hub holds readings 0 .. published-1, each exactly once."""
    missing = sorted(set(range(published)) - set(values))
    assert not missing, "readings never stored: %s" % missing[:20]
    assert len(values) == len(set(values)), "readings stored twice: %s" % sorted(
        n for n in set(values) if values.count(n) > 1)[:20]
    assert sorted(values) == list(range(published))


def test_offline_then_reconnect_loses_nothing(board, hub):
    """The hub goes away (a restart); the board keeps its readings on flash, reconnects when
    the hub is back, and every reading arrives once."""
    hub.stop()
    board.expect(r"connection lost .*shutting_down", timeout=10)
    time.sleep(2.0)  # about four readings pile up in the board's queue
    offline = board.status()
    assert offline["online"] == 0
    assert offline["pending"] >= 2, offline
    hub.start()
    board.expect(r"(?m)^connected$", timeout=15)  # not "not connected yet"
    with board.paused() as mark:
        values = board.wait_all_stored(mark["boot"], mark["published"])
    assert_complete(values, mark["published"])


def test_corrupted_serial_link_recovered(board, hub, fault_plan):
    """Frames damaged on the serial line, both ways, are dropped by the CRC check; the session
    survives (lost frames are sent again after the ack timeout) and nothing is lost or doubled."""
    fault_plan.add("corrupt", at=[2, 4, 5], direction="up")  # Telemetry frames
    fault_plan.add("corrupt", at=[1], direction="down")  # an Ack
    sessions = board.relay.sessions
    deadline = time.monotonic() + 15
    while len(fault_plan.sequence()) < 4 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [(e.direction, e.frame, e.kind) for e in fault_plan.sequence()] == [
        ("down", 1, "corrupt"), ("up", 2, "corrupt"), ("up", 4, "corrupt"), ("up", 5, "corrupt")]
    with board.paused() as mark:
        values = board.wait_all_stored(mark["boot"], mark["published"])
    assert_complete(values, mark["published"])
    counters = board.link_counters
    assert counters.corrupted >= 4
    assert counters.recovered >= 4  # intact frames went through after every damaged one
    assert board.relay.sessions == sessions  # recovered on the same session: no reconnect
    assert hub.is_online(board.device_id)


def test_reset_with_readings_queued_loses_none(board, hub):
    """Readings queued on flash while the hub is away survive a power cut (or a reset, on a
    board the host cannot power off) and are delivered after the reboot."""
    hub.stop()
    time.sleep(1.5)
    before = board.status()
    assert before["pending"] >= 1, before
    if board.can_power_cycle:
        board.power_cycle(off_ms=300)
    else:
        board.reset()
    rebooted = board.expect(BANNER, timeout=15)
    assert int(rebooted.group(2)) == before["boot"] + 1
    hub.start()
    board.expect(r"(?m)^connected$", timeout=15)  # not "not connected yet"
    # Readings published after the status query but before the cut count too: at least
    # before["published"], and a gap-free prefix of that boot, each once.
    deadline = time.monotonic() + 15
    while True:
        values = board.seq_values(before["boot"])
        if len(set(values)) >= before["published"] or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert len(values) >= before["published"]
    assert_complete(values, len(values))


@pytest.mark.sim_only
def test_board_unplugged_and_plugged_back(board, hub):
    """The board's USB cable is pulled (its port vanishes) and plugged back: the gateway
    reopens the port, the board's next session is verified, and nothing is lost."""
    losses, opens = board.port.losses, board.port.opens
    board.backend.unplug(duration_s=1.5)
    wait_until(lambda: board.port.losses > losses, 5, "the gateway to see the port vanish")
    wait_until(lambda: not hub.is_online(board.device_id), 5, "the hub to see the board leave")
    wait_until(lambda: board.port.opens > opens and hub.is_online(board.device_id), 15,
               "the board to be back online through the reopened port")
    with board.paused() as mark:
        values = board.wait_all_stored(mark["boot"], mark["published"])
    assert_complete(values, mark["published"])
