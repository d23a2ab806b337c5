"""Writes tests/vectors/messages.json: one vector per wire message, hex plus decoded value.

The hex is produced by the reference codec (cbor2, canonical) from the CBOR map, not by the
core, so the vectors check the core rather than repeat it. Run: python tests/vectors/gen_messages.py
"""

from __future__ import annotations

import json
import pathlib

import cbor2

HERE = pathlib.Path(__file__).parent
NONCE = bytes(range(16))

# (name, message class name, CBOR map). Integer keys per docs/protocol.md, "Messages".
MESSAGES = [
    ("hello from a device", "Hello",
     {0: 1, 1: 1, 2: "dev_0123456789abcdef", 3: ["telemetry", "commands"], 4: 4096, 5: "smartx-device/0.1"}),
    ("hello from the hub", "Hello", {0: 1, 1: 1, 4: 65536}),
    ("auth challenge", "AuthChallenge", {0: 2, 1: NONCE, 2: 1764430000000, 3: "hub_a1b2c3"}),
    ("auth response", "AuthResponse", {0: 3, 1: "eyJhbGciOiJIUzI1NiJ9.e30.c2ln"}),
    ("accepted", "Accepted", {0: 4, 1: "ses_01", 2: 30000, 3: 1764430000123, 4: 65536}),
    ("close: bad credentials", "Close", {0: 5, 1: 1, 2: "signature does not verify"}),
    ("close: rate limited with retry-after", "Close", {0: 5, 1: 5, 2: "slow down", 3: 1500}),
    ("close: shutting down", "Close", {0: 5, 1: 9}),
    ("telemetry: one reading", "Telemetry", {0: 6, 1: 1, 2: [["temp", 1764430000000, 21.5]]}),
    ("telemetry: three readings of mixed values", "Telemetry",
     {0: 6, 1: 4294967296, 2: [["temp", 1764430000000, -3], ["door", 1764430000001, True],
                               ["gps", 1764430000002, {"lat": 52.5, "lon": 13.25}]]}),
    ("ack", "Ack", {0: 7, 1: 1}),
    ("command", "Command", {0: 8, 1: "cmd_01", 2: "set_interval", 3: {"seconds": 5}, 4: 1764430060000}),
    ("command without args", "Command", {0: 8, 1: "cmd_02", 2: "blink"}),
    ("command result ok", "CommandResult", {0: 9, 1: "cmd_01", 2: True, 3: {"interval": 5}}),
    ("command result error", "CommandResult", {0: 9, 1: "cmd_03", 2: False, 4: "unknown command"}),
    ("ping", "Ping", {0: 10, 1: 7}),
    ("pong", "Pong", {0: 11, 1: 7}),
    ("desired state", "DesiredState", {0: 12, 1: 3, 2: {"led": "on", "interval": 10}}),
    ("reported state", "ReportedState", {0: 13, 1: 2, 2: {"led": "off", "fw": "1.0.0"}}),
]

# Bytes that are well-formed CBOR but no valid message; decode_message must refuse them.
INVALID = [
    ("not a map", [1, 2]),
    ("no type key", {1: 1}),
    ("unknown type", {0: 99}),
    ("type is text", {0: "hello"}),
    ("missing required field", {0: 7}),
    ("msg_id negative", {0: 7, 1: -1}),
    ("msg_id is a bool", {0: 7, 1: True}),
    ("nonce too short", {0: 2, 1: b"\x00" * 8, 2: 1, 3: "hub"}),
    ("empty readings", {0: 6, 1: 1, 2: []}),
    ("reading without value", {0: 6, 1: 1, 2: [["temp", 1]]}),
    ("reading with negative time", {0: 6, 1: 1, 2: [["temp", -1, 1]]}),
    ("stream name too long", {0: 6, 1: 1, 2: [["x" * 65, 1, 1]]}),
    ("state key not text", {0: 12, 1: 1, 2: {1: "on"}}),
    ("ok is an int", {0: 9, 1: "c", 2: 1}),
]


def build() -> dict:
    """Return the vectors document."""
    return {
        "messages": [
            {"name": name, "type": type_name, "hex": cbor2.dumps(mapping, canonical=True).hex(),
             "value": repr(mapping)}
            for name, type_name, mapping in MESSAGES
        ],
        "invalid": [
            {"name": name, "hex": cbor2.dumps(mapping, canonical=True).hex(),
             "error": "RemoteProtocolError"}
            for name, mapping in INVALID
        ],
    }


def render() -> str:
    """The JSON text of the vectors file."""
    return json.dumps(build(), indent=1) + "\n"


if __name__ == "__main__":
    (HERE / "messages.json").write_text(render())
