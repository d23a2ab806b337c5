"""The HIL suite, part 1: the board boots, is verified by the hub, and talks.

Every test here runs unchanged on a simulated board (``--board sim``) and on a real one
(``--board /dev/ttyUSB0``): the board is reached only through its serial port and the hub.
"""

from __future__ import annotations

import time

from hil.boards import BANNER


def test_boot_banner_after_reset(board):
    """A reset prints the banner naming the board's own device id, with a new boot number."""
    before = board.status()["boot"]
    board.reset()
    found = board.expect(BANNER, timeout=15)
    assert found.group(1) == board.device_id
    assert int(found.group(2)) == before + 1
    # The board says nothing between the reset and its banner but boot chatter: no traceback.
    assert "Traceback" not in found.before


def test_verified_connection(board, hub, gateway):
    """After a reset the board connects again: the hub verifies it (its own HS256 JWT) on a
    session the gateway carries, and lists it online."""
    sessions = hub.stats().get("sessions", 0)
    relay_sessions = board.relay.sessions
    board.reset()
    board.expect(BANNER, timeout=15)
    board.expect(r"(?m)^connected$", timeout=15)  # not "not connected yet"
    assert hub.wait_online(board.device_id, 10)
    assert hub.stats()["sessions"] > sessions  # a new verified session, not the old one
    assert board.relay.sessions > relay_sessions  # ... carried by a new hub connection
    assert hub.device(board.device_id).gateway_id == gateway.device_id


def test_console_input_reaches_the_firmware(board):
    """A line typed to the console (between frames) reaches the firmware and is answered,
    while the session keeps running."""
    board.send_line("hil:ping")
    found = board.expect(r"hil:pong boot=(\d+)", timeout=10)
    assert int(found.group(1)) >= 1
    assert board.status()["online"] == 1


def test_telemetry_arrives_at_the_hub(board, hub):
    """Readings published by the board are stored by the hub, in order, each once."""
    boot = board.status()["boot"]
    deadline = time.monotonic() + 15
    while True:
        values = [r.value for r in hub.readings(board.device_id, "seq") if r.value[0] == boot]
        if len(values) >= 5 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert len(values) >= 5, "only %d readings of boot %d reached the hub" % (len(values), boot)
    numbers = [value[1] for value in values]
    assert numbers == list(range(len(numbers)))


def test_command_round_trip(board, hub):
    """A command queued at the hub reaches the board through the gateway and its result comes
    back and is stored."""
    command = hub.send_command(board.device_id, "echo", {"token": "round-trip", "n": 7})
    done = hub.wait_command(command.id, timeout=10)
    assert done.status == "succeeded", done.error
    assert done.result["echo"] == {"token": "round-trip", "n": 7}
    assert done.result["boot"] == board.status()["boot"]


def test_failing_command_is_answered_not_fatal(board, hub):
    """A command the firmware rejects comes back as a failure; the session stays up."""
    command = hub.send_command(board.device_id, "set_interval", {"ms": 1})
    done = hub.wait_command(command.id, timeout=10)
    assert done.status == "failed"
    assert "ms must be" in done.error
    assert hub.is_online(board.device_id)


CRASHING_FIRMWARE = '''\
print("tiny firmware up")
raise ValueError("tiny firmware gives up")
'''


def test_load_firmware_runs_the_new_script_and_its_traceback_is_seen(board, hub):
    """Another script loaded as main.py runs at the next boot; when it crashes, its traceback
    reaches the console (a quiet line still hands finished lines on). The HIL node is put
    back afterwards and comes online again."""
    sessions = board.relay.sessions
    try:
        board.load_firmware(CRASHING_FIRMWARE)
        assert board.expect(r"tiny firmware up", timeout=15)
        crash = board.expect(r"ValueError: tiny firmware gives up", timeout=10)
        assert "Traceback" in crash.before
        assert board.relay.sessions == sessions  # it never said Hello
    finally:
        board.provision()
    board.expect(BANNER, timeout=15)
    board.expect(r"(?m)^connected$", timeout=15)  # not "not connected yet"
    assert board.relay.sessions > sessions
    assert hub.wait_online(board.device_id, 5)
