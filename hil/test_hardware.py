"""The HIL suite, part 5: what only a real board can show (skipped, saying why, on simulated
boards)."""

from __future__ import annotations

import json

import pytest

from hil.boards import BANNER, FIRMWARE
from hil.rawrepl import RawRepl


@pytest.mark.hardware_only
def test_provisioning_over_the_raw_repl_left_the_right_files(board):
    """What the plugin wrote over the raw REPL is on the board's filesystem, byte for byte,
    and the board boots back into the HIL node afterwards."""
    with board.port.raw() as received:
        repl = RawRepl(board.port, received)
        repl.enter()
        listing = repl.run("import os\nprint(sorted(os.listdir()))\n").decode()
        bundle = json.loads(repl.run(
            "print(open('device.smartx.json').read())\n").decode().strip())
        size = int(repl.run("import os\nprint(os.stat('main.py')[6])\n").decode().strip())
        repl.soft_reset()
    for name in ("main.py", "device.smartx.json", "hil.json"):
        assert name in listing
    assert bundle["device_id"] == board.device_id
    with open(FIRMWARE, "rb") as handle:
        assert size == len(handle.read())
    board.expect(BANNER, timeout=20)
