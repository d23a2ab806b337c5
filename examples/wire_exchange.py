"""Print a SmartX session frame by frame: a device and a hub core talking in memory.

Shows each frame as it crosses the wire, in hex and decoded, for both framings. No sockets,
no hub: only the protocol core that every part of SmartX HUB shares.
Run: python examples/wire_exchange.py [--serial]
"""

from __future__ import annotations

import argparse
import binascii

import cbor2

from smartx_device import messages as m
from smartx_device import reasons
from smartx_device import session as s
from smartx_device.framing import SerialFramer, StreamFramer


def show(direction: str, data: bytes, framer) -> None:
    """Print each frame in ``data`` as hex, then as the message it carries."""
    for item in framer.feed(data):
        if not isinstance(item, (bytes, bytearray)):
            continue
        message = m.decode_message(item)
        wire = framer.encode(item)  # this frame's own bytes (one write may carry several)
        print(f"{direction} {type(message).__name__}  ({len(wire)} bytes on the wire)")
        print(f"    wire {binascii.hexlify(wire).decode()}")
        print(f"    cbor {cbor2.loads(item)!r}")
        print(f"    ==> {message!r}")


def main() -> None:
    """Run one session: handshake, telemetry and ack, a command, a ping, a close."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serial", action="store_true", help="use the serial (COBS+CRC) framing")
    args = parser.parse_args()
    make = SerialFramer if args.serial else StreamFramer
    now = 1_764_430_000_000
    device, hub = s.DeviceSession(now, make()), s.HubSession(now, make(), keepalive_ms=5_000)
    to_hub, to_device = make(), make()  # decoders for the printout only

    def device_says(data: bytes) -> list:
        show("device -> hub", data, to_hub)
        return hub.receive_data(data, now)

    def hub_says(data: bytes) -> list:
        show("hub -> device", data, to_device)
        return device.receive_data(data, now)

    print(f"SmartX wire, {'serial (COBS + CRC-32)' if args.serial else 'stream (length-prefixed)'} framing\n")
    device_says(device.start("dev_0123456789abcdef", now, capabilities=["telemetry", "commands"]))
    hub_says(hub.challenge(bytes(range(16)), "hub_demo", now))
    device_says(device.authenticate("<device JWT signed with the device key>", now))
    hub_says(hub.accept("ses_1", now))
    telemetry = m.Telemetry(msg_id=1, readings=[("temp", now, 21.5)])
    events = device_says(device.send(telemetry, now))
    hub_says(hub.send(m.Ack(msg_id=events[0].message.msg_id), now))
    hub_says(hub.send(m.Command(command_id="cmd_1", name="blink", args={"times": 3}), now))
    device_says(device.send(m.CommandResult(command_id="cmd_1", ok=True, result="blinked 3 times"), now))
    now += 5_000
    device.handle_timer(now)
    device_says(device.data_to_send())
    hub_says(hub.data_to_send())
    hub_says(hub.close(reasons.CLOSE_SHUTTING_DOWN, "demo over", now_ms=now))
    print(f"\nsession closed: device {device.state_name}, hub {hub.state_name}")


if __name__ == "__main__":
    main()
