"""What an idle established session of the protocol core holds (issue #8, memory per session).

A hub keeps one HubSession and one StreamFramer per connected device, most of them idle: they
are slotted, make their buffers only while bytes wait, and keep no message of the handshake.
"""

from __future__ import annotations

import gc
import tracemalloc

import pytest
from hypothesis import given
from hypothesis import strategies as st

from smartx_device import messages as m
from smartx_device import session as s
from smartx_device.framing import DEFAULT_MAX_FRAME_SIZE, SerialFramer, StreamFramer

NOW = 1_700_000_000_000  # a realistic clock: its ints are objects of their own, as on a hub


def established(now=NOW, hub_framer=None, device_max_frame_size=DEFAULT_MAX_FRAME_SIZE):
    """A device and a hub session taken through Hello, challenge, AuthResponse and Accepted."""
    device = s.DeviceSession(now, max_frame_size=device_max_frame_size)
    hub = s.HubSession(now, hub_framer if hub_framer is not None else StreamFramer(),
                       keepalive_ms=30000)
    hub.receive_data(device.start("dev_%d" % now, now + 1, software="sdk/1.0"), now + 1)
    device.receive_data(hub.challenge(b"n" * 16, "hub_1", now + 2), now + 2)
    hub.receive_data(device.authenticate("a.jwt.token" * 20, now + 3), now + 3)
    device.receive_data(hub.accept("ses_%d" % now, now + 4), now + 4)
    assert hub.state == device.state == s.ESTABLISHED
    assert hub.data_to_send() == device.data_to_send() == b""
    return device, hub


def test_an_idle_established_session_holds_no_buffer_no_hello_no_deadline():
    framer = StreamFramer()
    device, hub = established(hub_framer=framer)
    for session in (device, hub):
        assert session._outbox is None
        assert session.handshake_deadline_ms is None
        assert not hasattr(session, "peer_hello")
        assert vars(session) == {}  # the __dict__ slot stays empty without a codec argument
    assert hub.get_timer() == hub.last_received_ms + s.IDLE_INTERVALS * 30000
    assert device.get_timer() == device.last_sent_ms + 30000
    assert framer._buffer is None and framer.buffered == 0
    # Both announced the default limit: the shared constant stays, no decoded int per session.
    assert hub.peer_max_frame_size is DEFAULT_MAX_FRAME_SIZE
    assert device.peer_max_frame_size is DEFAULT_MAX_FRAME_SIZE


def test_a_limit_other_than_the_default_is_still_taken_from_the_hello():
    device, hub = established(device_max_frame_size=512)
    assert hub.peer_max_frame_size == 512
    with pytest.raises(s.LocalProtocolError):
        hub.send(m.Command(cmd_id=1, name="x" * 600), NOW + 5)


def test_the_core_objects_are_slotted():
    for framer in (StreamFramer(), SerialFramer()):
        assert not hasattr(framer, "__dict__")
        with pytest.raises(AttributeError):
            framer.not_an_attribute = 1
    for session in (s.HubSession(0), s.DeviceSession(0)):
        assert vars(session) == {}  # every field in a slot; the dict is for a codec argument
    plugged = s.HubSession(0, decode_message=m.decode_message)
    assert vars(plugged) == {"_decode_message": m.decode_message}


def test_subclasses_that_add_attributes_still_work():
    # The hub's counting framer and the HIL tap framer add attributes of their own.
    class CountingFramer(StreamFramer):
        def __init__(self, max_frame_size):
            super().__init__(max_frame_size)
            self.frames = 0

        def feed(self, data):
            items = super().feed(data)
            self.frames += len(items)
            return items

    framer = CountingFramer(DEFAULT_MAX_FRAME_SIZE)
    device, hub = established(hub_framer=framer)
    frames_in_handshake = framer.frames
    telemetry = m.Telemetry(msg_id=1, readings=[("temp", NOW, 21.5)])
    assert hub.receive_data(device.send(telemetry, NOW + 5), NOW + 5) == [s.MessageReceived(telemetry)]
    assert framer.frames == frames_in_handshake + 1 == 3


def test_data_to_send_collects_several_outputs_then_forgets_them():
    device, hub = established()
    framer = StreamFramer()
    pings = b"".join(framer.encode(m.encode_message(m.Ping(seq=seq))) for seq in (1, 2, 3))
    assert hub.receive_data(pings, NOW + 5) == []
    out = hub.data_to_send()
    assert type(out) is bytes
    assert [m.decode_message(p) for p in framer.feed(out)] == [m.Pong(seq=seq) for seq in (1, 2, 3)]
    assert hub.data_to_send() == b"" and hub._outbox is None
    events = device.receive_data(out, NOW + 6)
    assert events == [s.PongReceived(1), s.PongReceived(2), s.PongReceived(3)]


def test_a_timeout_close_waits_in_data_to_send():
    hub = s.HubSession(NOW, handshake_timeout_ms=100)
    assert hub.data_to_send() == b""
    events = hub.handle_timer(NOW + 100)
    assert [type(e) for e in events] == [s.SessionClosed]
    framer = StreamFramer()
    close = m.decode_message(framer.feed(hub.data_to_send())[0])
    assert close.TYPE == m.CLOSE and close.reason == events[0].reason
    assert hub.data_to_send() == b""


@given(st.lists(st.binary(min_size=1, max_size=300), min_size=1, max_size=8), st.data())
def test_stream_framer_buffer_exists_only_while_a_frame_is_incomplete(payloads, data):
    wire = b"".join(StreamFramer().encode(p) for p in payloads)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=10)))
    framer = StreamFramer()
    frames = []
    position = 0
    for cut in cuts + [len(wire)]:
        frames.extend(framer.feed(wire[position:cut]) if cut > position else [])
        position = max(position, cut)
        done = sum(len(StreamFramer().encode(p)) for p in frames)
        assert framer.buffered == position - done
        assert (framer._buffer is None) == (framer.buffered == 0)
    assert frames == payloads
    assert framer._buffer is None
    assert framer.feed(b"") == []


def _bytes_per_idle_session(count):
    established(NOW - 10)  # warm the codec's and the interpreter's caches first
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        kept = [established(NOW + 10 * index)[1] for index in range(count)]
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert len(kept) == count
    return (after - before) / count


def test_an_idle_established_hub_session_and_framer_stay_small():
    # Measured 307 B on CPython 3.11 (785 B before slots and lazy buffers): session 144,
    # framer 72, two clock ints 64, the list slot. The bound leaves room for other versions.
    assert _bytes_per_idle_session(300) < 400
