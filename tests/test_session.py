"""Device and hub sessions driven against each other in memory, with no sockets or clocks."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from smartx_device import messages as m
from smartx_device import reasons
from smartx_device import session as s
from smartx_device.errors import LocalProtocolError, RemoteProtocolError
from smartx_device.framing import SerialFramer

NONCE = bytes(range(16))


class Pair:
    """A device and a hub session wired back to back: whatever one writes, the other reads."""

    def __init__(self, serial=False, keepalive_ms=30000):
        self.now = 1_000
        framer = (lambda: SerialFramer()) if serial else (lambda: None)
        self.device = s.DeviceSession(self.now, framer())
        self.hub = s.HubSession(self.now, framer(), keepalive_ms=keepalive_ms)

    def to_hub(self, data):
        return self.hub.receive_data(data, self.now)

    def to_device(self, data):
        return self.device.receive_data(data, self.now)

    def handshake(self):
        events = self.to_hub(self.device.start("dev_1", self.now))
        assert [type(e) for e in events] == [s.HelloReceived]
        assert events[0].message.device_id == "dev_1"
        assert events[0].message.version == m.PROTOCOL_VERSION
        events = self.to_device(self.hub.challenge(NONCE, "hub_1", self.now))
        assert [type(e) for e in events] == [s.HelloReceived, s.ChallengeReceived]
        assert events[1].message.nonce == NONCE
        assert events[1].message.hub_time_ms == self.now
        events = self.to_hub(self.device.authenticate("a.jwt.token", self.now))
        assert events == [s.AuthResponseReceived(m.AuthResponse(token="a.jwt.token"))]
        assert self.hub.state == s.VERIFYING
        events = self.to_device(self.hub.accept("ses_1", self.now))
        assert [type(e) for e in events] == [s.SessionEstablished]
        assert self.device.state == self.hub.state == s.ESTABLISHED


@pytest.mark.parametrize("serial", [False, True])
def test_handshake_telemetry_and_ack(serial):
    pair = Pair(serial=serial)
    pair.handshake()
    telemetry = m.Telemetry(msg_id=1, readings=[("temp", 5, 21.5), ("hum", 5, 40)])
    events = pair.to_hub(pair.device.send(telemetry, pair.now))
    assert events == [s.MessageReceived(telemetry)]
    events = pair.to_device(pair.hub.send(m.Ack(msg_id=1), pair.now))
    assert events == [s.MessageReceived(m.Ack(msg_id=1))]


def test_command_and_result_and_state():
    pair = Pair()
    pair.handshake()
    command = m.Command(command_id="cmd_1", name="blink", args={"times": 3})
    assert pair.to_device(pair.hub.send(command)) == [s.MessageReceived(command)]
    result = m.CommandResult(command_id="cmd_1", ok=True, result="done")
    assert pair.to_hub(pair.device.send(result)) == [s.MessageReceived(result)]
    desired = m.DesiredState(version=2, state={"led": "on"})
    assert pair.to_device(pair.hub.send(desired)) == [s.MessageReceived(desired)]
    reported = m.ReportedState(msg_id=9, state={"led": "on"})
    assert pair.to_hub(pair.device.send(reported)) == [s.MessageReceived(reported)]


def test_ping_is_answered_automatically():
    pair = Pair()
    pair.handshake()
    assert pair.to_hub(pair.device.send(m.Ping(seq=4))) == []
    assert pair.to_device(pair.hub.data_to_send()) == [s.PongReceived(4)]


def test_keepalive_ping_and_idle_timeout():
    pair = Pair(keepalive_ms=5_000)
    pair.handshake()
    assert pair.device.keepalive_ms == 5_000
    assert pair.device.get_timer() == pair.now + 5_000
    pair.now += 5_000
    assert pair.device.handle_timer(pair.now) == []
    ping = pair.device.data_to_send()
    assert pair.to_hub(ping) == []
    assert pair.to_device(pair.hub.data_to_send()) == [s.PongReceived(1)]
    # The hub hears nothing for two intervals: it declares the device gone.
    pair.now += 10_000
    assert pair.hub.get_timer() == pair.now
    events = pair.hub.handle_timer(pair.now)
    assert events[0].reason == reasons.CLOSE_KEEPALIVE_TIMEOUT and not events[0].by_peer
    assert pair.hub.state == s.CLOSED
    closed = pair.to_device(pair.hub.data_to_send())
    assert closed[0].reason == reasons.CLOSE_KEEPALIVE_TIMEOUT and closed[0].by_peer


def test_ping_timeout_on_the_device():
    pair = Pair(keepalive_ms=5_000)
    pair.handshake()
    pair.now += 5_000
    assert pair.device.handle_timer(pair.now) == []  # a ping goes out; no pong comes back
    assert pair.device.data_to_send()
    pair.now += 5_000
    events = pair.device.handle_timer(pair.now)
    assert events and events[0].reason == reasons.CLOSE_KEEPALIVE_TIMEOUT
    assert pair.device.state == s.CLOSED


def test_handshake_timeout():
    pair = Pair()
    pair.to_hub(pair.device.start("dev_1", pair.now))
    assert pair.hub.get_timer() == pair.now + s.DEFAULT_HANDSHAKE_TIMEOUT_MS
    assert pair.hub.handle_timer(pair.now + 1) == []
    events = pair.hub.handle_timer(pair.now + s.DEFAULT_HANDSHAKE_TIMEOUT_MS)
    assert events[0].reason == reasons.CLOSE_HANDSHAKE_TIMEOUT
    assert pair.to_device(pair.hub.data_to_send())[-1].reason == reasons.CLOSE_HANDSHAKE_TIMEOUT


@pytest.mark.parametrize("reason", sorted(reasons.REASON_NAMES))
def test_close_with_each_reason(reason):
    pair = Pair()
    pair.handshake()
    data = pair.hub.close(reason, "because", retry_after_ms=250 if reason == reasons.CLOSE_RATE_LIMITED else None)
    events = pair.to_device(data)
    assert events == [s.SessionClosed(reason, "because", 250 if reason == reasons.CLOSE_RATE_LIMITED else None, True, True)]
    assert pair.device.state == pair.hub.state == s.CLOSED
    assert pair.hub.close(reason) == b""
    assert reasons.reason_name(reason) == reasons.REASON_NAMES[reason]


def test_close_during_handshake_with_bad_credentials():
    pair = Pair()
    pair.to_hub(pair.device.start("dev_1", pair.now))
    pair.to_device(pair.hub.challenge(NONCE, "hub_1", pair.now))
    pair.to_hub(pair.device.authenticate("forged", pair.now))
    events = pair.to_device(pair.hub.close(reasons.CLOSE_BAD_CREDENTIALS, "signature"))
    assert events[0].reason == reasons.CLOSE_BAD_CREDENTIALS


def test_illegal_local_sends_raise_local_protocol_error():
    pair = Pair()
    with pytest.raises(LocalProtocolError):
        pair.device.send(m.Telemetry(msg_id=1, readings=[("t", 1, 1)]))
    with pytest.raises(LocalProtocolError):
        pair.hub.accept("ses", pair.now)
    pair.handshake()
    with pytest.raises(LocalProtocolError):
        pair.device.send(m.Ack(msg_id=1))  # an Ack is the hub's to send
    with pytest.raises(LocalProtocolError):
        s.Session("gateway", 0)


def test_message_out_of_turn_is_a_remote_error_and_closes():
    pair = Pair()
    rogue = s.DeviceSession(0)
    rogue.state = s.ESTABLISHED  # a peer that skips the handshake
    with pytest.raises(RemoteProtocolError) as caught:
        pair.to_hub(rogue.send(m.Telemetry(msg_id=1, readings=[("t", 1, 1)])))
    assert caught.value.reason == reasons.CLOSE_PROTOCOL_VIOLATION
    assert pair.hub.state == s.CLOSED
    closed = pair.to_device(pair.hub.data_to_send())
    assert closed[0].reason == reasons.CLOSE_PROTOCOL_VIOLATION and closed[0].by_peer
    assert pair.hub.receive_data(b"more", pair.now) == []


def test_version_mismatch_closes_with_version_unsupported():
    pair = Pair()
    hello = m.Hello(version=99, device_id="dev_1")
    rogue = s.DeviceSession(0)
    events = pair.to_hub(rogue.send(hello))
    assert events[-1].reason == reasons.CLOSE_VERSION_UNSUPPORTED
    assert pair.hub.state == s.CLOSED


def test_hub_refuses_a_hello_without_device_id():
    pair = Pair()
    rogue = s.DeviceSession(0)
    with pytest.raises(RemoteProtocolError):
        pair.to_hub(rogue.send(m.Hello(version=1)))


def test_garbage_raises_remote_error_with_events_before_it():
    pair = Pair()
    pair.handshake()
    good = pair.device.send(m.Telemetry(msg_id=1, readings=[("t", 1, 1)]))
    with pytest.raises(RemoteProtocolError) as caught:
        pair.to_hub(good + b"\x01\xff")
    assert caught.value.events[0] == s.MessageReceived(m.Telemetry(msg_id=1, readings=[("t", 1, 1)]))
    assert caught.value.events[-1].reason == reasons.CLOSE_MALFORMED


def test_end_of_stream_closes_uncleanly():
    pair = Pair()
    pair.handshake()
    events = pair.to_hub(b"")
    assert events == [s.SessionClosed(reasons.CLOSE_NORMAL, "connection lost", None, True, False)]


def test_sending_more_than_the_peer_accepts_is_a_local_error():
    pair = Pair()
    pair.device.max_frame_size = 64
    pair.to_hub(pair.device.start("dev_1", pair.now))
    pair.to_device(pair.hub.challenge(NONCE, "hub_1", pair.now))
    pair.to_hub(pair.device.authenticate("t", pair.now))
    pair.to_device(pair.hub.accept("ses_1", pair.now))
    with pytest.raises(LocalProtocolError):
        pair.hub.send(m.Command(command_id="c", name="x", args="y" * 100))


@given(st.lists(st.integers(1, 40), min_size=1, max_size=30), st.booleans())
def test_any_split_of_the_stream_gives_the_same_events(cuts, serial):
    sender = Pair(serial=serial)
    sender.handshake()
    wire = b"".join(sender.device.send(m.Telemetry(msg_id=i, readings=[("t", i, i * 1.5)]))
                    for i in range(1, 6))
    expected = Pair(serial=serial)
    expected.handshake()
    whole = expected.to_hub(wire)
    split = Pair(serial=serial)
    split.handshake()
    events, position = [], 0
    for cut in cuts:
        chunk = wire[position:position + cut]
        if chunk:  # b"" would mean end of stream
            events += split.to_hub(chunk)
        position += cut
    if wire[position:]:
        events += split.to_hub(wire[position:])
    assert events == whole
    assert len(whole) == 5


@given(st.binary(max_size=200))
def test_random_bytes_into_a_hub_raise_only_remote_protocol_error(data):
    hub = s.HubSession(0)
    try:
        hub.receive_data(data, 0)
    except RemoteProtocolError:
        assert hub.state == s.CLOSED


def test_transition_table_is_closed_under_its_states():
    for role, table in s.TRANSITIONS.items():
        for state, row in table.items():
            assert state in s.STATE_NAMES
            for next_state in row.values():
                assert next_state in table, (role, state, next_state)
