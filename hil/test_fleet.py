"""The HIL suite, part 4: every configured board at once (one with ``--board sim``, as many as
``--board`` is given)."""

from __future__ import annotations

import time


def test_every_board_has_its_own_verified_session(boards, hub, gateway):
    """Each board is online under its own device id, on its own hub connection, assigned to
    the gateway that carries it, and its readings are stored under its own id only."""
    ids = [b.device_id for b in boards]
    assert len(set(ids)) == len(ids)
    for board in boards:
        assert hub.is_online(board.device_id)
        assert board.relay.connected
        assert hub.device(board.device_id).gateway_id == gateway.device_id
        assert board.relay in gateway.relays
    deadline = time.monotonic() + 10
    for board in boards:
        boot = board.status()["boot"]
        while len(board.seq_values(boot)) < 2:
            assert time.monotonic() < deadline, "%s: no readings stored" % board.name
            time.sleep(0.1)
    stored_ids = {r.device_id for b in boards for r in hub.readings(b.device_id)}
    assert stored_ids == set(ids)
