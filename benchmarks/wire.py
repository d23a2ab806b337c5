"""The wire figure: bytes per reading, our protocol against MQTT 3.1.1 with JSON.

Rules:
- Ours: the bytes the protocol core writes, inside TLS: the device's Telemetry frame (stream
  header + CBOR message) and the hub's Ack frame, as ``DeviceSession.send`` and
  ``HubSession.send`` make them.
- MQTT: the bytes paho-mqtt writes for a QoS 1 PUBLISH of the same readings as JSON (the same
  ``[stream, ts_ms, value]`` arrays, compact separators) on the topic
  ``smartx/<device id>/telemetry``, captured from a plain TCP socket that plays the broker,
  plus the broker's 4-byte PUBACK.
- The same readings as the ingest benchmark (a two-decimal sensor value: a CBOR float64,
  five characters of JSON), a current timestamp, and a message id from the middle of a
  device's life (msg_id 100000: a 5-byte CBOR integer; MQTT's packet id is always 2 bytes).
- TLS adds the same on both sides and is left out: with TLS 1.3 and AES-GCM, 22 bytes per
  record (5 header, 16 tag, 1 content type), one record per message when each is written
  alone, fewer when several share a record.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402,F401  (puts the repository on sys.path)
from hub_bench import sample_readings  # noqa: E402

MSG_ID = 100000
TOPIC = "smartx/dev_0123456789abcdef/telemetry"


def ours(count: int, ts_ms: int) -> dict:
    """Telemetry frame and Ack frame of our protocol, from the cores themselves."""
    from smartx_device import messages as m
    from smartx_device import session as core

    hub = core.HubSession(0)
    device = core.DeviceSession(0)
    hub.receive_data(device.start("dev_0123456789abcdef", 0), 0)
    device.receive_data(hub.challenge(os.urandom(32), "hub_0123456789abcdef", ts_ms), 0)
    hub.receive_data(device.authenticate("x.y.z", 0), 0)
    device.receive_data(hub.accept("ses_0123456789abcdef", ts_ms), 0)
    upstream = device.send(m.Telemetry(msg_id=MSG_ID, readings=sample_readings(count, ts_ms)), 0)
    events = hub.receive_data(upstream, 0)
    if len(events[0].message.readings) != count:
        raise RuntimeError("the hub core did not read the Telemetry back")
    ack = hub.send(m.Ack(msg_id=MSG_ID), 0)
    return {"up": len(upstream), "ack": len(ack)}


def _read_packet(conn: socket.socket) -> bytes:
    """One MQTT control packet (fixed header, remaining length, body)."""
    def exactly(size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = conn.recv(size - len(data))
            if not chunk:
                raise ConnectionError("paho closed the connection")
            data += chunk
        return data

    head = exactly(1)
    length, shift, raw = 0, 0, b""
    while True:
        byte = exactly(1)
        raw += byte
        length |= (byte[0] & 0x7F) << shift
        shift += 7
        if not byte[0] & 0x80:
            break
    return head + raw + exactly(length)


def mqtt(count: int, ts_ms: int) -> dict:
    """PUBLISH (QoS 1) as paho-mqtt writes it, and the PUBACK, in bytes."""
    import json

    import paho.mqtt.client as paho

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    captured = {}

    def broker() -> None:
        conn, _ = server.accept()
        with conn:
            _read_packet(conn)  # CONNECT
            conn.sendall(b"\x20\x02\x00\x00")  # CONNACK, accepted
            publish = _read_packet(conn)
            captured["publish"] = publish
            packet_id = publish[-2 - len(captured["payload"]):-len(captured["payload"])]
            puback = b"\x40\x02" + packet_id
            captured["puback"] = puback
            conn.sendall(puback)
            time.sleep(0.2)

    payload = json.dumps(sample_readings(count, ts_ms), separators=(",", ":")).encode()
    captured["payload"] = payload
    thread = threading.Thread(target=broker, daemon=True)
    thread.start()
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="wire",
                         protocol=paho.MQTTv311)
    acked = threading.Event()
    client.on_publish = lambda *args: acked.set()
    client.connect("127.0.0.1", server.getsockname()[1], keepalive=60)
    client.loop_start()
    try:
        deadline = time.monotonic() + 10
        while not client.is_connected():
            if time.monotonic() > deadline:
                raise TimeoutError("paho did not connect to the capture socket")
            time.sleep(0.01)
        client.publish(TOPIC, payload, qos=1)
        if not acked.wait(10):
            raise TimeoutError("paho saw no PUBACK")
    finally:
        client.disconnect()
        client.loop_stop()
        server.close()
    thread.join(5)
    return {"up": len(captured["publish"]), "ack": len(captured["puback"]),
            "payload": len(payload)}


def measure() -> list:
    """Rows for 1 reading and a batch of 16: bytes per reading, up and up + ack."""
    ts_ms = int(time.time() * 1000)
    rows = []
    for count in (1, 16):
        a, b = ours(count, ts_ms), mqtt(count, ts_ms)
        rows.append({"readings": count, "ours_up": a["up"], "ours_ack": a["ack"],
                     "mqtt_up": b["up"], "mqtt_ack": b["ack"], "json_payload": b["payload"],
                     "ours_per_reading": (a["up"] + a["ack"]) / count,
                     "mqtt_per_reading": (b["up"] + b["ack"]) / count})
    return rows


if __name__ == "__main__":
    for row in measure():
        print(row)
