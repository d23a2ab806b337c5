"""Ack timeouts: an unacknowledged Telemetry batch or ReportedState is sent again on the SAME
session (docs/device-sdk.md, "Lost frames on a live session").

First the client core against the hub's session core with an injected clock (exact timing, no
sockets); then the blocking client against the real hub over TLS on loopback, through a link
that loses frames; then over a serial line: a UART opened by id (``machine.UART``, here a
stand-in ``machine`` module on a pseudo-terminal) relayed by the simulator's serial bridge to
the real hub, with a frame damaged on the wire.
"""

from __future__ import annotations

import fcntl
import os
import struct
import shutil
import subprocess
import sys
import termios
import time
import tty
import types
from pathlib import Path

import pytest

import smartx_device
from smartx_device import backoff, reasons
from smartx_device import messages as m
from smartx_device.auth import Signer
from smartx_device.client import DEFAULT_ACK_TIMEOUT_MS, MAX_ACK_TIMEOUT_MS, ClientCore
from smartx_device.framing import SerialFramer, StreamFramer
from smartx_device.queue import OfflineQueue
from smartx_device.session import HubSession
from smartx_device.transport import SerialTransport, TransportError, connect_tls
from smartx_hub import cli
from smartx_hub.server import run_hub_in_thread
from smartx_hub.state import init_hub

ROOT = Path(__file__).resolve().parent.parent
HUB_TIME_MS = 1_764_430_000_000
TS = 1_764_430_000_000  # a reading's Unix ms stamp


# -- the client core with an injected clock ---------------------------------------------------


def established(tmp_path, ack_timeout_ms=1000, max_bytes=65536):
    """A ClientCore in a verified session with a HubSession (no I/O); keep-alive far away."""
    core = ClientCore("dev_1", Signer("hs256", secret=b"k" * 32),
                      OfflineQueue(str(tmp_path / "q.log"), max_bytes=max_bytes),
                      ack_timeout_ms=ack_timeout_ms)
    hub = HubSession(0, keepalive_ms=3_600_000)
    hub.receive_data(core.begin(None, 0), 0)
    core.receive(hub.challenge(bytes(16), "hub_1", HUB_TIME_MS), 0)
    hub.receive_data(core.data_to_send(0), 0)
    core.receive(hub.accept("ses_1", HUB_TIME_MS), 0)
    assert core.established
    return core, hub


def sent(hub, data, now_ms):
    """The messages the core's bytes carry (decoded by the hub's session)."""
    return [event.message for event in hub.receive_data(data, now_ms)]


def test_lost_batch_is_resent_with_the_same_id_and_readings_after_the_timeout(tmp_path):
    core, hub = established(tmp_path, ack_timeout_ms=1000)
    for value in (1, 2, 3):
        core.queue.append("temp", value, TS + value, 10)
    (first,) = sent(hub, core.data_to_send(10), 10)  # "lost": the hub never answers it
    assert first.TYPE == m.TELEMETRY and [r[2] for r in first.readings] == [1, 2, 3]
    assert core.next_timer() == 10 + 1000  # the ack deadline, before any keep-alive
    core.handle_timer(1009)
    assert core.data_to_send(1009) == b"" and core.resends == 0
    core.handle_timer(1010)
    (again,) = sent(hub, core.data_to_send(1010), 1010)
    assert (again.msg_id, again.readings) == (first.msg_id, first.readings)
    assert core.resends == 1 and core.in_flight == [first.msg_id]
    # The next wait doubles: a slow hub is not buried under repeats.
    assert core.next_timer() == 1010 + 2000
    core.handle_timer(3009)
    assert core.data_to_send(3009) == b""
    core.handle_timer(3010)
    (third,) = sent(hub, core.data_to_send(3010), 3010)
    assert third.msg_id == first.msg_id and core.resends == 2
    assert core.next_timer() == 3010 + 4000
    # The Ack ends it; the same Ack again (original and resend both answered) changes nothing.
    ack = hub.send(m.Ack(msg_id=first.msg_id), 3020)
    core.receive(ack, 3020)
    assert core.idle and core.acked_batches == 1 and core.queue.pending_readings == 0
    assert core.next_timer() == core.session.get_timer()  # only the keep-alive is left
    core.receive(ack, 3030)
    core.receive(hub.send(m.Ack(msg_id=first.msg_id + 1000), 3040), 3040)  # never sent
    assert core.idle and core.acked_batches == 1 and core.established
    core.handle_timer(100_000)
    assert core.data_to_send(100_000) == b"" and core.resends == 2
    core.queue.close()


def test_only_the_unacknowledged_batch_of_a_window_is_resent(tmp_path):
    core, hub = established(tmp_path, ack_timeout_ms=500)
    core.batch_readings = 1  # one reading per batch: three batches in flight
    for value in range(3):
        core.queue.append("temp", value, TS, 0)
    batches = sent(hub, core.data_to_send(0), 0)
    assert len(batches) == 3
    core.receive(hub.send(m.Ack(msg_id=batches[0].msg_id), 5), 5)
    core.receive(hub.send(m.Ack(msg_id=batches[2].msg_id), 5), 5)
    core.handle_timer(500)
    (again,) = sent(hub, core.data_to_send(500), 500)
    assert again.msg_id == batches[1].msg_id and again.readings == batches[1].readings
    core.receive(hub.send(m.Ack(msg_id=again.msg_id), 510), 510)
    assert core.idle and core.acked_batches == 3
    core.queue.close()


def test_lost_reported_state_is_resent_and_a_newer_one_supersedes_it(tmp_path):
    core, hub = established(tmp_path, ack_timeout_ms=300)
    old_id = core.report_state({"led": 1})
    (first,) = sent(hub, core.data_to_send(0), 0)
    assert first.TYPE == m.REPORTED_STATE and first.msg_id == old_id
    core.handle_timer(300)
    (again,) = sent(hub, core.data_to_send(300), 300)
    assert (again.msg_id, again.state) == (old_id, {"led": 1}) and core.resends == 1
    new_id = core.report_state({"led": 0})
    (newer,) = sent(hub, core.data_to_send(310), 310)
    assert (newer.msg_id, newer.state) == (new_id, {"led": 0})
    core.receive(hub.send(m.Ack(msg_id=old_id), 320), 320)  # late: the old one is gone
    assert core.state_pending
    core.handle_timer(610)  # only the newest state is ever resent
    (resent,) = sent(hub, core.data_to_send(610), 610)
    assert resent.msg_id == new_id and core.resends == 2
    core.receive(hub.send(m.Ack(msg_id=new_id), 620), 620)
    assert not core.state_pending and core.idle
    core.queue.close()


def test_waits_double_up_to_the_cap(tmp_path):
    core, hub = established(tmp_path, ack_timeout_ms=20_000)
    core.queue.append("temp", 1, TS, 0)
    sent(hub, core.data_to_send(0), 0)
    now, waits = 0, []
    for _ in range(5):
        deadline = core.next_timer()
        waits.append(deadline - now)
        now = deadline
        core.handle_timer(now)
        assert len(sent(hub, core.data_to_send(now), now)) == 1
    assert waits == [20_000, 40_000, 60_000, 60_000, 60_000]
    assert MAX_ACK_TIMEOUT_MS == 60_000 and DEFAULT_ACK_TIMEOUT_MS == 10_000
    core.queue.close()


def test_an_ack_timeout_longer_than_the_cap_is_kept(tmp_path):
    core, hub = established(tmp_path, ack_timeout_ms=90_000)
    core.queue.append("temp", 1, TS, 0)
    sent(hub, core.data_to_send(0), 0)
    assert core.next_timer() == 90_000
    core.handle_timer(90_000)
    sent(hub, core.data_to_send(90_000), 90_000)
    assert core.next_timer() == 180_000
    core.queue.close()


def test_no_ack_timeout_means_resend_only_on_a_new_session(tmp_path):
    core, hub = established(tmp_path, ack_timeout_ms=None)
    core.queue.append("temp", 1, TS, 0)
    core.report_state({"led": 1})
    assert len(sent(hub, core.data_to_send(0), 0)) == 2
    assert core.next_timer() == core.session.get_timer()
    core.handle_timer(1_000_000)
    assert core.resends == 0
    core.queue.close()


def test_a_batch_the_queue_bound_dropped_in_flight_is_not_resent(tmp_path):
    core, hub = established(tmp_path, ack_timeout_ms=100, max_bytes=2048)
    core.queue.append("temp", 0, TS, 0)
    (lost,) = sent(hub, core.data_to_send(0), 0)
    assert core.queue.sealed_ids() == [lost.msg_id]
    value = 1
    while lost.msg_id in core.queue.sealed_ids():  # the bound drops the oldest: our batch
        core.queue.append("temp", value, TS, 1)
        value += 1
        assert value < 1000
    core.handle_timer(100)
    resent = [message for message in sent(hub, core.data_to_send(100), 100)
              if message.msg_id == lost.msg_id]
    assert resent == [] and lost.msg_id not in core.in_flight
    assert core.established  # nothing broke; the newer readings still go out
    core.queue.close()


def test_resends_also_work_under_micropython(tmp_path):
    """The same timer path on the real MicroPython interpreter the board runs."""
    node = shutil.which("node")
    runner = ROOT / "tests" / "micropython" / "run.mjs"
    package = ROOT / "node_modules" / "@micropython" / "micropython-webassembly-pyscript"
    assert node and runner.is_file() and package.is_dir(), "node and `npm install` are needed"
    script = tmp_path / "resend.py"
    script.write_text(MICROPYTHON_RESEND)
    modules = ["_compat", "_utf8", "errors", "reasons", "cbor", "framing", "messages", "session", "jwt",
               "queue", "__init__", "auth", "backoff", "client", "clock", "credentials",
               "transport"]
    command = [node, str(runner), "--module-dir", str(ROOT), "--script", str(script),
               "--modules", ",".join("smartx_device/%s.py" % name for name in modules)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().splitlines()[-1] == "resend ok 1 2", result.stdout


MICROPYTHON_RESEND = """
from smartx_device import messages as m
from smartx_device.auth import Signer
from smartx_device.client import ClientCore
from smartx_device.queue import OfflineQueue
from smartx_device.session import HubSession

core = ClientCore("dev_1", Signer("hs256", b"k" * 32), OfflineQueue("q.log"), ack_timeout_ms=50)
hub = HubSession(0, keepalive_ms=3600000)
hub.receive_data(core.begin(None, 0), 0)
core.receive(hub.challenge(bytes(16), "hub_1", 1764430000000), 0)
hub.receive_data(core.data_to_send(0), 0)
core.receive(hub.accept("ses_1", 1764430000000), 0)
core.queue.append("temp", 7, 1764430000001, 0)
first = hub.receive_data(core.data_to_send(0), 0)[0].message
if core.next_timer() != 50:
    raise AssertionError("deadline %r" % core.next_timer())
core.handle_timer(50)
again = hub.receive_data(core.data_to_send(50), 50)[0].message
if again.msg_id != first.msg_id or again.readings != first.readings:
    raise AssertionError("resent something else")
if core.next_timer() != 150:
    raise AssertionError("no doubling: %r" % core.next_timer())
ack = hub.send(m.Ack(msg_id=first.msg_id), 60)
core.receive(ack, 60)
core.receive(ack, 61)
if not core.idle:
    raise AssertionError("not idle after the ack")
print("resend ok %d %d" % (core.resends, core.acked_batches + 1))
"""


# -- the real hub over TLS, through a link that loses frames ---------------------------------


def make_hub_dir(tmp_path):
    data = str(tmp_path / "hub")
    init_hub(data).close()
    return data


def add_device(data, tmp_path, name, auth="hs256"):
    out = str(tmp_path / ("%s.smartx.json" % name))
    assert cli.main(["device", "add", name, "--data", data, "--auth", auth, "--out", out]) == 0
    return out


@pytest.fixture
def hub(tmp_path):
    data = make_hub_dir(tmp_path)
    handle = run_hub_in_thread(data, api=False)
    handle.data = data
    yield handle
    handle.stop()


def stored_values(store, device_id):
    """Every stored reading's value, oldest first (the device publishes few here)."""
    return [row.value for row in reversed(store.query_telemetry(device_id, limit=10_000))]


class LossyLink:
    """A transport wrapper that loses chosen frames, as a gateway's serial hop can.

    ``drop_up(message) -> bool`` chooses device->hub frames to lose, ``drop_down`` hub->device
    frames; ``duplicate_down`` delivers a chosen hub frame twice. Everything else passes
    whole and in order. ``up`` and ``down`` record every message that passed or was lost."""

    def __init__(self, inner, losses, drop_up=None, drop_down=None, duplicate_down=None):
        self.inner = inner
        self.losses = losses  # shared across reconnects: what was lost already
        self.drop_up = drop_up or (lambda message: False)
        self.drop_down = drop_down or (lambda message: False)
        self.duplicate_down = duplicate_down or (lambda message: False)
        self.up_framer = StreamFramer()
        self.down_framer = StreamFramer()

    def make_framer(self, max_frame_size):
        return self.inner.make_framer(max_frame_size)

    def send(self, data):
        out = bytearray()
        for payload in self.up_framer.feed(data):
            message = m.decode_message(payload)
            self.losses.setdefault("up", []).append(message)
            if self.drop_up(message):
                self.losses.setdefault("lost_up", []).append(message)
                continue
            out += self.up_framer.encode(payload)
        if out:
            self.inner.send(bytes(out))

    def recv(self, max_bytes, timeout_ms):
        data = self.inner.recv(max_bytes, timeout_ms)
        if not data:
            return data
        out = bytearray()
        for payload in self.down_framer.feed(data):
            message = m.decode_message(payload)
            if self.drop_down(message):
                self.losses.setdefault("lost_down", []).append(message)
                continue
            out += self.down_framer.encode(payload)
            if self.duplicate_down(message):
                self.losses.setdefault("duplicated_down", []).append(message)
                out += self.down_framer.encode(payload)
        return bytes(out) or None

    def close(self):
        self.inner.close()


def first_of(kind, losses, key):
    """A predicate true for the first message of ``kind`` only (recorded under ``key``)."""
    def choose(message):
        if message.TYPE != kind or key in losses:
            return False
        losses[key] = message
        return True
    return choose


def lossy_client(bundle, port, tmp_path, losses, **link_options):
    creds = smartx_device.load_credentials(bundle)

    def open_link():
        tls = connect_tls("127.0.0.1", port, creds.ca_pem, creds.server_name)
        return LossyLink(tls, losses, **link_options)

    return smartx_device.Client(creds, queue_path=str(tmp_path / "queue.log"),
                                transport_factory=open_link, ack_timeout_ms=300,
                                backoff=backoff.Backoff(base_ms=20, cap_ms=200))


def test_a_lost_telemetry_frame_and_state_are_resent_on_the_same_session(hub, tmp_path):
    bundle = add_device(hub.data, tmp_path, "lossy-up")
    losses = {}
    lose_first_telemetry = first_of(m.TELEMETRY, losses, "telemetry")
    lose_first_state = first_of(m.REPORTED_STATE, losses, "state")
    client = lossy_client(bundle, hub.device_port, tmp_path, losses,
                          drop_up=lambda msg: lose_first_telemetry(msg) or lose_first_state(msg))
    client.connect()
    for value in range(5):
        client.publish("temp", value)
    client.report_state({"led": True})
    start = time.monotonic()
    assert client.flush(5000)
    assert time.monotonic() - start >= 0.25  # the resend waited for its ack timeout
    assert [v for v in stored_values(hub.ctx.store, client.device_id)] == list(range(5))
    assert hub.ctx.store.get_state(client.device_id).reported == {"led": True}
    lost = losses["telemetry"]
    resent = [msg for msg in losses["up"] if msg.TYPE == m.TELEMETRY and msg.msg_id == lost.msg_id]
    assert len(resent) >= 2 and resent[1].readings == lost.readings
    # The batch and the state, once each (more only if the hub took longer than the timeout
    # to commit on a loaded machine: harmless repeats, and still stored once).
    assert client.core.resends >= 2
    assert client.connections == 1 and client.connected  # the same session throughout
    client.close()


def test_a_lost_ack_gets_a_repeat_stored_once_and_double_acks_do_no_harm(hub, tmp_path):
    bundle = add_device(hub.data, tmp_path, "lossy-down")
    losses = {}
    client = lossy_client(bundle, hub.device_port, tmp_path, losses,
                          drop_down=first_of(m.ACK, losses, "ack"),
                          duplicate_down=lambda message: message.TYPE == m.ACK)
    client.core.batch_readings = 4
    client.connect()
    for value in range(12):
        client.publish("temp", value)
    assert client.flush(5000)
    # The hub got the batch whose Ack was lost twice: it stored it once and acked it again.
    assert stored_values(hub.ctx.store, client.device_id) == list(range(12))
    batch_ids = {msg.msg_id for msg in losses["up"] if msg.TYPE == m.TELEMETRY}
    assert len(batch_ids) == 3 and losses["ack"].msg_id in batch_ids
    assert client.core.resends >= 1 and client.core.acked_batches == 3
    assert len(losses["duplicated_down"]) >= 3  # every later Ack arrived twice
    assert client.queue.pending_readings == 0 and client.queue.sealed_ids() == []
    assert client.connections == 1 and client.connected
    # More traffic after all the repeats: nothing is confused.
    client.publish("temp", 12)
    assert client.flush(5000)
    assert stored_values(hub.ctx.store, client.device_id) == list(range(13))
    client.close()


def test_async_client_resends_a_lost_batch_on_the_same_session(hub, tmp_path):
    import asyncio

    from smartx_device.aio import AsyncClient

    bundle = add_device(hub.data, tmp_path, "async-lossy", "eddsa")
    losses = {}
    lose = first_of(m.TELEMETRY, losses, "telemetry")

    async def main():
        client = AsyncClient.from_bundle(bundle, queue_path=str(tmp_path / "aq.log"),
                                         port=hub.device_port, ack_timeout_ms=300)
        framer = StreamFramer()
        write = client._write

        async def lossy_write(data):
            # The plaintext frames on their way into TLS: lose the first Telemetry.
            if not data:  # the client writes b"" when the core has nothing to say
                return
            kept = bytearray()
            for payload in framer.feed(data):
                if not lose(m.decode_message(payload)):
                    kept += framer.encode(payload)
            await write(bytes(kept))

        client._write = lossy_write
        async with client:
            for value in range(6):
                await client.publish("temp", value)
            assert await client.flush(5000)
            assert client.core.resends >= 1 and client.connections == 1
        return client.device_id

    device_id = asyncio.run(main())
    assert "telemetry" in losses
    assert stored_values(hub.ctx.store, device_id) == list(range(6))


# -- a UART by id: machine.UART, a serial line, the bridge, the real hub -----------------------


class PtyUART:
    """A ``machine.UART`` stand-in (MicroPython's API only: ``any``, ``read``, ``write``)
    whose wire is the master end of a pseudo-terminal. With ``damage`` set it flips one byte
    inside the first Telemetry frame the board writes, as line noise would."""

    opened = []

    def __init__(self, uart_id, baudrate=115200):
        self.id, self.baudrate = uart_id, baudrate
        self.fd = self.wire
        self.damaged = []
        PtyUART.opened.append(self)

    def any(self):
        return struct.unpack("i", fcntl.ioctl(self.fd, termios.FIONREAD, b"\0\0\0\0"))[0]

    def read(self, count=None):
        waiting = self.any()
        if not waiting:
            return None
        return os.read(self.fd, waiting if count is None else min(count, waiting))

    def write(self, data):
        data = bytes(data)
        if self.damage and not self.damaged:
            framer = SerialFramer()  # the client writes whole frames in one call
            for payload in framer.feed(data):
                if isinstance(payload, bytes) and m.decode_message(payload).TYPE == m.TELEMETRY:
                    frame = framer.encode(payload)
                    at = data.find(frame) + len(frame) // 2
                    data = data[:at] + bytes([(data[at] ^ 0x5A) or 0x01]) + data[at + 1:]
                    self.damaged.append(payload)
                    break
        view = memoryview(data)
        while len(view):
            view = view[os.write(self.fd, view):]
        return len(data)


@pytest.fixture
def uart_line(monkeypatch):
    """A ``machine`` module in sys.modules whose UART is a pseudo-terminal; yields the path of
    the line's far end (what the gateway opens with pyserial)."""
    master, slave = os.openpty()
    tty.setraw(master)
    tty.setraw(slave)
    machine = types.ModuleType("machine")
    PtyUART.wire = master
    PtyUART.damage = False
    PtyUART.opened = []
    machine.UART = PtyUART
    monkeypatch.setitem(sys.modules, "machine", machine)
    yield os.ttyname(slave)
    os.close(master)
    os.close(slave)


def test_uart_by_id_through_the_bridge_with_a_damaged_frame_resent(hub, tmp_path, uart_line):
    from firmware_sim.bridge import SerialBridge

    bundle = add_device(hub.data, tmp_path, "uart-node")
    creds = smartx_device.load_credentials(bundle)
    PtyUART.damage = True
    bridge = SerialBridge(uart_line, ("127.0.0.1", hub.device_port), creds.ca_pem,
                          creds.server_name).start()
    client = smartx_device.Client(creds, queue_path=str(tmp_path / "uart.log"),
                                  transport_factory=lambda: SerialTransport(1, 57600),
                                  ack_timeout_ms=400,
                                  backoff=backoff.Backoff(base_ms=20, cap_ms=200))
    try:
        client.connect()
        (uart,) = PtyUART.opened
        assert (uart.id, uart.baudrate) == (1, 57600)
        # The board's console shares the wire: a log line between frames reaches the gateway
        # when the next frame's leading 0x00 ends it.
        uart.write(b"board: sensor warmed up\n")
        for value in range(10):
            client.publish("adc", value)
        assert client.flush(8000)
        assert len(uart.damaged) == 1  # one frame was damaged on the wire and never arrived
        assert stored_values(hub.ctx.store, client.device_id) == list(range(10))
        assert client.core.resends >= 1 and client.connections == 1
        assert "board: sensor warmed up\n" in bridge.console
    finally:
        client.close()
        bridge.stop()


def test_uart_id_without_a_machine_module_is_a_transport_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "machine", None)  # import machine raises ImportError
    with pytest.raises(TransportError, match="machine"):
        SerialTransport(0)


def test_a_uart_that_cannot_open_is_a_transport_error(monkeypatch):
    machine = types.ModuleType("machine")

    def refuse(uart_id, baudrate):
        raise ValueError("UART(%d) doesn't exist" % uart_id)

    machine.UART = refuse
    monkeypatch.setitem(sys.modules, "machine", machine)
    with pytest.raises(TransportError, match="UART 7"):
        SerialTransport(7)


def test_a_bad_port_name_is_a_transport_error(tmp_path):
    with pytest.raises(TransportError):
        SerialTransport(str(tmp_path / "no-such-tty"))


class PyserialLike:
    """An already open port with pyserial's API and no ``any``: used through that API."""

    def __init__(self):
        self.written = bytearray()
        self.incoming = bytearray(b"\x00hello\x00")
        self.timeout = None
        self.closed = 0

    @property
    def in_waiting(self):
        return len(self.incoming)

    def read(self, count):
        data = bytes(self.incoming[:count])
        del self.incoming[:count]
        return data

    def write(self, data):
        self.written += data
        return len(data)

    def flush(self):
        pass

    def close(self):
        self.closed += 1


def test_an_open_port_object_is_driven_through_pyserials_api():
    port = PyserialLike()
    link = SerialTransport(port)
    link.send(b"\x00abc\x00")
    assert bytes(port.written) == b"\x00abc\x00"
    assert link.recv(4, 50) == b"\x00hel" and port.timeout == 0.05
    assert link.recv(4096, 0) == b"lo\x00"
    assert link.recv(4096, 0) is None
    link.close()
    link.close()
    assert port.closed == 1
    with pytest.raises(TransportError):
        link.send(b"x")
    assert link.recv(10, 0) == b""


SERIAL_FIRMWARE = """
import smartx_device
from smartx_device.transport import SerialTransport

client = smartx_device.Client.from_bundle(
    "device.smartx.json", queue_path="queue.log", transport_factory=lambda: SerialTransport(0),
    ack_timeout_ms=500, log=print)
print("serial node booting")
client.connect()
for value in range(5):
    client.publish("adc", value)
ok = client.flush(10000)
print("flushed %s, resends %d, sessions %d" % (ok, client.core.resends, client.connections))
while True:
    client.loop(100)
"""


def test_simulated_board_uart_by_id_with_a_corrupted_frame_on_its_serial_link(hub, tmp_path):
    """Firmware on the board simulator says ``SerialTransport(0)``: the board's own
    ``machine.UART``, its serial link (a pty) with one Telemetry frame corrupted on the wire,
    the bridge, the real hub."""
    from firmware_sim.board import Board
    from firmware_sim.bridge import SerialBridge
    from firmware_sim.faults import FaultPlan

    bundle = add_device(hub.data, tmp_path, "sim-serial")
    creds = smartx_device.load_credentials(bundle)
    firmware = tmp_path / "serial_node.py"
    firmware.write_text(SERIAL_FIRMWARE)
    # Up frames: 0 Hello, 1 AuthResponse, 2 the first Telemetry.
    faults = FaultPlan(seed=1).add("corrupt", at=2, direction="up")
    board = Board("sim-serial", str(firmware), directory=str(tmp_path / "board"), bundle=bundle,
                  serial=True, faults=faults, console_log=False)
    bridge = SerialBridge(board.serial_path, ("127.0.0.1", hub.device_port), creds.ca_pem,
                          creds.server_name)
    # The gateway is listening before the board boots, as when a board is plugged into a
    # running gateway: console text written while no host has the port open is lost.
    with bridge, board:
        match = board.console.expect(r"flushed True, resends (\d+), sessions 1", 15)
        assert int(match.group(1)) >= 1
        assert stored_values(hub.ctx.store, creds.device_id) == list(range(5))
        assert [event.kind for event in faults.log] == ["corrupt"]
        # The console shares the wire; the banner reached the gateway at the next frame.
        assert "serial node booting\n" in bridge.console


class StingyUART:
    """A UART-like object (``any``, no ``in_waiting``) that takes at most 3 bytes per write and
    sometimes none (``None``: its write timed out), as a board's full TX buffer does."""

    def __init__(self, refuse_all=False):
        self.written = bytearray()
        self.calls = 0
        self.refuse_all = refuse_all

    def any(self):
        return 0

    def read(self, count):
        return None

    def write(self, data):
        self.calls += 1
        if self.refuse_all or self.calls % 3 == 0:
            return None
        self.written += bytes(data[:3])
        return min(3, len(data))


def test_a_uart_object_gets_all_bytes_through_short_writes():
    uart = StingyUART()
    link = SerialTransport(uart)
    frame = SerialFramer().encode(b"x" * 40)
    link.send(frame)
    assert bytes(uart.written) == frame and uart.calls > len(frame) // 3
    started = time.monotonic()
    assert link.recv(100, 30) is None and time.monotonic() - started >= 0.025


def test_a_uart_that_never_takes_bytes_times_out_with_a_transport_error(monkeypatch):
    from smartx_device import transport

    monkeypatch.setattr(transport, "SEND_TIMEOUT_MS", 50)
    with pytest.raises(TransportError, match="timed out"):
        SerialTransport(StingyUART(refuse_all=True)).send(b"\x00abc\x00")


def test_a_uart_by_id_is_opened_again_for_the_next_session(hub, tmp_path, uart_line):
    """A session lost on a UART link: the next one opens ``machine.UART`` again and resumes."""
    from firmware_sim.bridge import SerialBridge

    bundle = add_device(hub.data, tmp_path, "uart-again")
    creds = smartx_device.load_credentials(bundle)
    bridge = SerialBridge(uart_line, ("127.0.0.1", hub.device_port), creds.ca_pem,
                          creds.server_name).start()
    client = smartx_device.Client(creds, queue_path=str(tmp_path / "again.log"),
                                  transport_factory=lambda: SerialTransport(2),
                                  backoff=backoff.Backoff(base_ms=20, cap_ms=200))
    try:
        client.connect()
        client.publish("adc", 1)
        assert client.flush(5000)
        hub.live.kick(client.device_id, reasons.CLOSE_SHUTTING_DOWN, "restart")
        client.publish("adc", 2)
        assert client.flush(8000)
        assert client.connections == 2 and len(PtyUART.opened) == 2
        assert all(uart.id == 2 and uart.baudrate == 115200 for uart in PtyUART.opened)
        assert stored_values(hub.ctx.store, client.device_id) == [1, 2]
    finally:
        client.close()
        bridge.stop()




@pytest.mark.parametrize("bad", [0, -5, 1.5, "10"])
def test_a_nonsense_ack_timeout_is_refused(tmp_path, bad):
    queue = OfflineQueue(str(tmp_path / "q.log"))
    with pytest.raises(ValueError):
        ClientCore("dev_1", Signer("hs256", secret=b"k" * 32), queue, ack_timeout_ms=bad)
    queue.close()
