# Runs under MicroPython (and CPython): a device and a hub session against each other in
# memory, over both framings. Raises on any disagreement; prints one summary line.
from smartx_device import messages as m
from smartx_device import reasons
from smartx_device import session as s
from smartx_device.errors import RemoteProtocolError
from smartx_device.framing import SerialFramer


def exchange(serial):
    now = 1000
    device = s.DeviceSession(now, SerialFramer() if serial else None)
    hub = s.HubSession(now, SerialFramer() if serial else None, keepalive_ms=5000)
    events = hub.receive_data(device.start("dev_1", now), now)
    if type(events[0]) is not s.HelloReceived:
        raise AssertionError("hub did not see Hello")
    events = device.receive_data(hub.challenge(b"0123456789abcdef", "hub_1", now), now)
    if type(events[1]) is not s.ChallengeReceived or events[1].message.hub_time_ms != now:
        raise AssertionError("device did not see the challenge")
    events = hub.receive_data(device.authenticate("h.p.s", now), now)
    if events[0].message.token != "h.p.s":
        raise AssertionError("hub did not see the token")
    events = device.receive_data(hub.accept("ses_1", now), now)
    if device.state != s.ESTABLISHED or hub.state != s.ESTABLISHED:
        raise AssertionError("not established")
    wire = device.send(m.Telemetry(msg_id=1, readings=[("temp", now, 21.5)]), now)
    # Byte by byte: any split gives the same events.
    got = []
    for i in range(len(wire)):
        got += hub.receive_data(wire[i:i + 1], now)
    if got[0].message.readings != [["temp", now, 21.5]]:
        raise AssertionError("telemetry lost")
    events = device.receive_data(hub.send(m.Ack(msg_id=1), now), now)
    if events[0].message.msg_id != 1:
        raise AssertionError("ack lost")
    command = m.Command(command_id="cmd_1", name="blink", args={"times": 2})
    events = device.receive_data(hub.send(command, now), now)
    if events[0].message != command:
        raise AssertionError("command lost")
    hub.receive_data(device.send(m.CommandResult(command_id="cmd_1", ok=True, result=2), now), now)
    now += 5000
    device.handle_timer(now)
    hub.receive_data(device.data_to_send(), now)
    events = device.receive_data(hub.data_to_send(), now)
    if type(events[0]) is not s.PongReceived:
        raise AssertionError("no pong")
    events = device.receive_data(hub.close(reasons.CLOSE_SHUTTING_DOWN, "bye", None, now), now)
    if events[0].reason != reasons.CLOSE_SHUTTING_DOWN or device.state != s.CLOSED:
        raise AssertionError("close lost")
    bad = s.HubSession(now)
    try:
        bad.receive_data(b"\x02\xff\xff", now)
    except RemoteProtocolError:
        pass
    else:
        raise AssertionError("garbage accepted")
    return len(wire)


stream_bytes = exchange(False)
serial_bytes = exchange(True)
print("session: exchange ok (telemetry frame %d bytes stream, %d bytes serial)" % (stream_bytes, serial_bytes))
