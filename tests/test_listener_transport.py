"""The device listener's own transport: sockets it accepts itself, TLS on the socket, the
per-connection output buffer and its cap, the timer wheel, the committer's callbacks. Real TLS
on loopback, real SQLite files, the hub in-process (and once as a subprocess)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import resource
import socket
import time

import pytest

from smartx_device import messages as m
from smartx_device import session as core
from smartx_device.reasons import CLOSE_DEVICE_DISABLED, CLOSE_INTERNAL_ERROR
from smartx_hub import listener as listener_module
from smartx_hub.ingest import IngestCommitter
from smartx_hub.listener import (TIMER_TICK_MS, DeviceConnection, DeviceListener,
                                 listening_sockets)
from smartx_hub.live import LiveSessions
from smartx_hub.server import run_hub_in_thread
from smartx_hub.store import TelemetryBatch

from hubtools import DeviceClient, connect_device, enrol, make_hub, start_serve, wait_until

#: A command argument big enough that a few dozen fill the kernel's buffers (a frame is
#: at most 16 KiB by default).
BIG = "x" * 10000


@pytest.fixture
def start_hub(tmp_path):
    """Start a hub of its own: ``ctx, hub = start_hub(insecure_dev=False, **limits)``."""
    started = []

    def start(insecure_dev=False, **limits):
        ctx = make_hub(tmp_path, "hub%d" % len(started))
        hub = run_hub_in_thread(ctx, limits=limits, api=False, insecure_dev=insecure_dev)
        started.append((ctx, hub))
        return ctx, hub

    yield start
    for ctx, hub in started:
        hub.stop()
        ctx.close()


def connection_of(hub, device_id):
    """The hub's verified connection of ``device_id``."""
    return wait_until(lambda: next((c for c in list(hub.listener.connections)
                                    if c.device_id == device_id and c.verified), None))


def squeeze(connection):
    """A small kernel send buffer on the hub's side, so that the hub's own output buffer takes
    over sooner. (Not a small receive buffer on the device's side: with loopback's large
    segments, TCP then crawls along on window probes.)"""
    connection.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)


def queue_commands(store, device_id, count):
    now = int(time.time() * 1000)
    return [store.add_command(device_id, "fill", [index, BIG], 60_000, now).id
            for index in range(count)]


def is_command(event):
    return isinstance(event, core.MessageReceived) and isinstance(event.message, m.Command)


# -- output the kernel cannot take yet ---------------------------------------------------


@pytest.mark.parametrize("insecure_dev", [False, True], ids=["tls", "plaintext"])
def test_output_the_kernel_cannot_take_waits_and_arrives_whole_and_in_order(start_hub,
                                                                            insecure_dev):
    ctx, hub = start_hub(insecure_dev=insecure_dev, max_write_buffer=1 << 20)
    creds = enrol(ctx.store, "slow-reader", "hs256")
    ca = None if insecure_dev else ctx.ca_cert_pem
    with connect_device(hub.device_port, ca, creds) as device:
        connection = connection_of(hub, creds.device_id)
        squeeze(connection)
        ids = queue_commands(ctx.store, creds.device_id, 60)  # 600 kB
        assert hub.live.wake(creds.device_id)
        # The device reads nothing yet: the hub holds what the kernel would not take.
        wait_until(lambda: connection.out is not None and len(connection.out) > 50_000)
        received = [device.wait_for(is_command, timeout=10).message for _ in ids]
        assert [c.command_id for c in received] == ids
        assert all(c.args == [index, BIG] for index, c in enumerate(received))
        wait_until(lambda: connection.out is None)  # all sent: nothing kept
        device.telemetry(1, [["t", 1, 1.0]])  # and the session goes on
    assert hub.listener.stats.get("dropped_slow_readers", 0) == 0


def test_a_device_that_does_not_read_is_dropped_at_the_write_buffer_cap(start_hub):
    ctx, hub = start_hub(max_write_buffer=65536)
    creds = enrol(ctx.store, "deaf", "hs256")
    bystander = enrol(ctx.store, "bystander", "hs256")
    with connect_device(hub.device_port, ctx.ca_cert_pem, creds) as device:
        connection = connection_of(hub, creds.device_id)
        squeeze(connection)
        queue_commands(ctx.store, creds.device_id, 40)
        assert hub.live.wake(creds.device_id)
        wait_until(lambda: hub.listener.stats.get("dropped_slow_readers", 0) == 1, timeout=10)
        wait_until(lambda: connection not in hub.listener.connections)
        assert connection.sock is None and connection.out is None  # its memory is given back
        assert not hub.live.is_online(creds.device_id)
        assert hub.listener.gate.connections_from("127.0.0.1") == 0
        with connect_device(hub.device_port, ctx.ca_cert_pem, bystander) as other:
            other.telemetry(1, [["t", 1, 1.0]])  # the listener is unharmed


def test_a_close_goes_out_after_what_waits_then_tls_says_goodbye(start_hub):
    ctx, hub = start_hub(max_write_buffer=1 << 20)
    creds = enrol(ctx.store, "kicked-late", "hs256")
    with connect_device(hub.device_port, ctx.ca_cert_pem, creds) as device:
        connection = connection_of(hub, creds.device_id)
        squeeze(connection)
        ids = queue_commands(ctx.store, creds.device_id, 60)
        assert hub.live.wake(creds.device_id)
        wait_until(lambda: connection.out is not None)
        assert hub.live.kick(creds.device_id, CLOSE_DEVICE_DISABLED, "device disabled")
        wait_until(lambda: connection.closing)
        received = [device.wait_for(is_command, timeout=10).message.command_id for _ in ids]
        assert received == ids  # nothing committed to the wire was cut off by the Close
        closed = device.wait_closed(timeout=10)
        assert (closed.reason, closed.by_peer, closed.clean) == (CLOSE_DEVICE_DISABLED, True,
                                                                 True)
        device.sock.settimeout(5)
        assert device.sock.recv(100) == b""  # close_notify: a clean end of the TLS stream
    wait_until(lambda: connection not in hub.listener.connections)
    assert hub.listener.gate.connections_from("127.0.0.1") == 0


def test_a_close_the_device_never_reads_is_dropped_after_the_drain_time(start_hub,
                                                                        monkeypatch):
    monkeypatch.setattr(listener_module, "CLOSE_DRAIN_MS", 1000)
    ctx, hub = start_hub(max_write_buffer=1 << 20)
    creds = enrol(ctx.store, "never-reads", "hs256")
    with connect_device(hub.device_port, ctx.ca_cert_pem, creds) as device:
        connection = connection_of(hub, creds.device_id)
        squeeze(connection)
        queue_commands(ctx.store, creds.device_id, 60)
        assert hub.live.wake(creds.device_id)
        wait_until(lambda: connection.out is not None)
        started = time.monotonic()
        assert hub.live.kick(creds.device_id, CLOSE_DEVICE_DISABLED, "device disabled")
        wait_until(lambda: connection.closing)
        if time.monotonic() - started < 0.8:
            assert connection.sock is not None  # still waiting for the device to read
        wait_until(lambda: connection not in hub.listener.connections, timeout=5)
        assert time.monotonic() - started >= 1.0 - TIMER_TICK_MS / 1000.0
        assert not hub.live.is_online(creds.device_id)
        assert hub.listener.gate.connections_from("127.0.0.1") == 0


# -- a bug costs one connection ----------------------------------------------------------


def test_a_bug_handling_one_message_costs_that_connection_only(start_hub, monkeypatch):
    ctx, hub = start_hub()
    victim = enrol(ctx.store, "victim", "hs256")
    bystander = enrol(ctx.store, "bystander", "hs256")
    original = DeviceConnection._on_message

    def buggy(self, message, now):
        if self.device_id == victim.device_id:
            raise RuntimeError("a bug in the hub")
        return original(self, message, now)

    monkeypatch.setattr(DeviceConnection, "_on_message", buggy)
    with connect_device(hub.device_port, ctx.ca_cert_pem, bystander) as other:
        with connect_device(hub.device_port, ctx.ca_cert_pem, victim) as device:
            device.send(m.Telemetry(msg_id=1, readings=[["t", 1, 1.0]]))
            assert device.wait_closed(timeout=10).reason == CLOSE_INTERNAL_ERROR
        other.telemetry(1, [["t", 1, 1.0]])
    wait_until(lambda: not hub.listener.connections)


# -- accepting ---------------------------------------------------------------------------


def test_listening_sockets_of_a_name_share_one_port():
    sockets = listening_sockets("localhost", 0)
    try:
        assert len({sock.getsockname()[1] for sock in sockets}) == 1
        assert all(not sock.getblocking() for sock in sockets)
        port = sockets[0].getsockname()[1]
        with socket.create_connection(("localhost", port), timeout=5):
            pass
        with pytest.raises(OSError, match=r"cannot listen on 127\.0\.0\.1 port %d" % port):
            listening_sockets("127.0.0.1", port)  # taken (by a listener, not in TIME_WAIT)
    finally:
        for sock in sockets:
            sock.close()


def _fds(pid):
    return len(os.listdir("/proc/%d/fd" % pid))


def _cpu_seconds(pid):
    fields = open("/proc/%d/stat" % pid).read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_out_of_descriptors_the_listener_waits_instead_of_spinning_then_recovers(tmp_path):
    ctx = make_hub(tmp_path)
    creds = enrol(ctx.store, "after-emfile", "hs256")
    data_dir = ctx.data_dir
    ca_pem = ctx.ca_cert_pem
    ctx.close()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        device_port = probe.getsockname()[1]
    process = start_serve(data_dir, device_port)
    held = []
    try:
        limits = resource.prlimit(process.pid, resource.RLIMIT_NOFILE)
        # Room for two more descriptors: the third connection finds none to be accepted with.
        resource.prlimit(process.pid, resource.RLIMIT_NOFILE,
                         (_fds(process.pid) + 2, limits[1]))
        for _ in range(4):
            held.append(socket.create_connection(("127.0.0.1", device_port), timeout=5))
        time.sleep(0.3)
        before = _cpu_seconds(process.pid)
        time.sleep(0.6)  # inside the listener's pause: it must not spin on accept
        assert _cpu_seconds(process.pid) - before < 0.3
        resource.prlimit(process.pid, resource.RLIMIT_NOFILE, limits)
        for sock in held:
            sock.close()
        held = []
        with connect_device(device_port, ca_pem, creds, timeout=10) as device:
            device.telemetry(1, [["t", 1, 1.0]])
        process.terminate()
        assert process.wait(timeout=20) == 0
        assert "cannot accept device connections" in process.stderr.read()
    finally:
        for sock in held:
            sock.close()
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdout.close()
        process.stderr.close()


# -- the timer wheel ---------------------------------------------------------------------


class _Due:
    """Stands in for a connection on the wheel: notes when it was called."""

    def __init__(self, listener):
        self.listener = listener
        self.timer_at = 0
        self.ip = "test"
        self.calls = []

    def _on_timer(self):
        self.calls.append(self.listener.clock())

    def _drop(self):
        raise AssertionError("no timer here fails")


def test_timer_wheel_fires_each_deadline_once_never_early(tmp_path):
    ctx = make_hub(tmp_path)
    listener = DeviceListener(ctx.hub_id, ctx.store, LiveSessions(), None)

    async def scenario():
        listener.loop = asyncio.get_running_loop()
        now = listener.clock()
        soon, later, cancelled, overdue = (_Due(listener) for _ in range(4))
        soon.timer_at = listener.arm(soon, now + 120)
        later.timer_at = listener.arm(later, now + 400)
        cancelled.timer_at = listener.arm(cancelled, now + 200)
        listener.disarm(cancelled, cancelled.timer_at)
        overdue.timer_at = listener.arm(overdue, now - 1000)
        assert overdue.calls == []  # never from inside arm: the caller's state may be midway
        deadline = time.monotonic() + 5
        while not later.calls and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)
        return now, soon, later, cancelled, overdue

    try:
        now, soon, later, cancelled, overdue = asyncio.run(scenario())
    finally:
        listener.verify_executor.shutdown()
        listener.writer_executor.shutdown()
        ctx.close()
    assert len(soon.calls) == 1 and soon.calls[0] >= now + 120
    assert len(later.calls) == 1 and later.calls[0] >= now + 400
    assert soon.calls[0] <= later.calls[0]
    assert len(overdue.calls) == 1 and cancelled.calls == []
    assert listener._wheel == {} and listener._wheel_timer is None  # an idle wheel sleeps


# -- the committer's callbacks -----------------------------------------------------------


def _committer(tmp_path, body, after_commit=None, shut_down=False):
    ctx = make_hub(tmp_path)
    devices = [enrol(ctx.store, "cb-%d" % i, "hs256").device_id for i in range(2)]
    writer = concurrent.futures.ThreadPoolExecutor(1)
    if shut_down:
        writer.shutdown()

    async def scenario():
        committer = IngestCommitter(ctx.store, writer, max_delay_ms=5,
                                    after_commit=after_commit)
        return await body(committer, devices)

    try:
        return asyncio.run(scenario()), ctx
    finally:
        writer.shutdown()


def test_commit_callbacks_run_in_order_then_after_commit_once(tmp_path):
    log = []

    def callback(batch, outcome):
        log.append((batch.device_id, batch.msg_id, outcome))

    async def body(committer, devices):
        now = int(time.time() * 1000)
        batches = [TelemetryBatch(devices[i % 2], i // 2 + 1, [["t", i, i]], now)
                   for i in range(6)]
        batches.append(TelemetryBatch(devices[0], 1, [["t", 0, 0]], now))  # a repeat
        for batch in batches:
            assert committer.submit(batch, callback) is None  # no future with a callback
        await asyncio.wait_for(committer.flush(), 10)
        return batches, committer.commits

    (batches, commits), ctx = _committer(tmp_path, body, lambda: log.append("after"))
    try:
        assert commits == 1
        assert log == [(b.device_id, b.msg_id, True) for b in batches[:-1]] + [
            (batches[-1].device_id, 1, False), "after"]
        assert len(ctx.store.query_telemetry(batches[0].device_id, limit=10)) == 3
    finally:
        ctx.close()


def test_a_failing_callback_does_not_cost_the_others_their_acks(tmp_path):
    seen = []

    def bad(batch, outcome):
        raise RuntimeError("a bug in one session")

    def good(batch, outcome):
        seen.append((batch.msg_id, outcome))

    async def body(committer, devices):
        now = int(time.time() * 1000)
        committer.submit(TelemetryBatch(devices[0], 1, [["t", 1, 1]], now), bad)
        committer.submit(TelemetryBatch(devices[1], 1, [["t", 1, 1]], now), good)
        committer.submit(TelemetryBatch("dev_notenrolled0000", 1, [["t", 1, 1]], now), good)
        await asyncio.wait_for(committer.flush(), 10)

    _, ctx = _committer(tmp_path, body, lambda: seen.append("after"))
    try:
        assert seen[0] == (1, True)
        assert seen[1][0] == 1 and isinstance(seen[1][1], Exception)  # its own verdict
        assert seen[2] == "after"
    finally:
        ctx.close()


def test_a_stopped_writer_fails_the_batches_it_cannot_take(tmp_path):
    outcomes = []

    async def body(committer, devices):
        now = int(time.time() * 1000)
        committer.submit(TelemetryBatch(devices[0], 1, [["t", 1, 1]], now),
                         lambda batch, outcome: outcomes.append(outcome))
        future = committer.submit(TelemetryBatch(devices[1], 1, [["t", 1, 1]], now))
        await asyncio.wait_for(committer.flush(), 10)
        return future

    future, ctx = _committer(tmp_path, body, shut_down=True)
    try:
        assert len(outcomes) == 1 and isinstance(outcomes[0], RuntimeError)
        assert isinstance(future.exception(), RuntimeError)
    finally:
        ctx.close()


def test_plaintext_client_is_served_by_the_same_transport(start_hub):
    ctx, hub = start_hub(insecure_dev=True)
    creds = enrol(ctx.store, "plain-many", "hs256")
    with DeviceClient(hub.device_port, None).connect() as device:
        device.handshake(creds)
        # Many frames in one write: the plaintext reads take them in as they come.
        device.write(b"".join(device.session.send(m.Telemetry(msg_id=i, readings=[["t", i, i]]),
                                                  0) for i in range(1, 201)))
        device.wait_for(lambda e: isinstance(e, core.MessageReceived)
                        and isinstance(e.message, m.Ack) and e.message.msg_id == 200, timeout=10)
    assert len(ctx.store.query_telemetry(creds.device_id, limit=1000)) == 200


# -- TCP_NODELAY off ---------------------------------------------------------------------


def test_handshakes_do_not_wait_for_delayed_acks_without_tcp_nodelay(start_hub, monkeypatch):
    """OpenSSL writes the server's flight record by record; with Nagle's algorithm on (no
    TCP_NODELAY, as the benchmark's "nodelay off" rows run) each handshake would stall about
    40 ms on the device's delayed ACK unless the flight leaves whole."""
    import asyncio.base_events

    from smartx_hub import listener as listener_module

    monkeypatch.setattr(asyncio.base_events, "_set_nodelay", lambda sock: None)
    monkeypatch.setattr(listener_module, "set_nodelay", lambda sock: None)
    ctx, hub = start_hub()
    creds = enrol(ctx.store, "no-nodelay", "hs256")
    times = []
    for _ in range(9):
        started = time.monotonic()
        connect_device(hub.device_port, ctx.ca_cert_pem, creds).close()
        times.append(time.monotonic() - started)
    assert sorted(times)[len(times) // 2] < 0.025, times
