"""The HIL suite, part 3: what the hub refuses, seen from the board and through the gateway."""

from __future__ import annotations

import time

from smartx_device.reasons import CLOSE_DEVICE_DISABLED

from hil.relay import wait_until


def test_revoked_device_is_refused(board, hub):
    """Disabling a device (revoking it) ends its live session within a second, with the
    reason; every later attempt of the board is refused at verification; enabling it again
    lets it back in."""
    failures = hub.stats().get("auth_failures", 0)
    started = time.monotonic()
    hub.disable(board.device_id)
    try:
        board.expect(r"device_disabled", timeout=10)
        wait_until(lambda: not hub.is_online(board.device_id), 2, "the session to end")
        assert time.monotonic() - started < 5
        # The board asks again (its own JWT, through the gateway) and is refused again.
        board.expect(r"refused: .*device_disabled", timeout=10)
        wait_until(lambda: hub.stats().get("auth_failures", 0) > failures, 10,
                   "the hub to refuse a new attempt")
        assert not hub.is_online(board.device_id)
        assert CLOSE_DEVICE_DISABLED in board.relay.hub_closes
        assert board.status()["online"] == 0
    finally:
        hub.enable(board.device_id)
    assert hub.wait_online(board.device_id, 15), "enabled again, the board did not come back"
