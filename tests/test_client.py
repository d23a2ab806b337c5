"""The device client against the real hub, over TLS on loopback.

Every hub here is the reference hub (smartx_hub) in a temporary directory, in a thread or as a
killed subprocess; devices are enrolled with the real ``smartx-hub device add`` and connect
with the bundle it writes.
"""

from __future__ import annotations

import base64
import datetime
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

import smartx_device
from smartx_device import backoff, reasons
from smartx_device.client import ClientCore
from smartx_device.queue import OfflineQueue
from smartx_hub import cli
from smartx_hub.server import run_hub_in_thread
from smartx_hub.state import init_hub

FAST_BACKOFF = dict(base_ms=20, cap_ms=200)


# -- fixtures -------------------------------------------------------------------------------


def make_hub_dir(tmp_path):
    data = str(tmp_path / "hub")
    init_hub(data).close()
    return data


def add_device(data, tmp_path, name, auth="es256", public_key=None):
    out = str(tmp_path / ("%s.smartx.json" % name))
    argv = ["device", "add", name, "--data", data, "--auth", auth, "--out", out]
    if public_key:
        argv += ["--public-key", public_key]
    assert cli.main(argv) == 0
    return out


@pytest.fixture
def hub(tmp_path):
    data = make_hub_dir(tmp_path)
    handle = run_hub_in_thread(data, api=False)
    handle.data = data
    yield handle
    handle.stop()


def new_client(bundle, hub_port, tmp_path, queue="queue.log", **options):
    options.setdefault("backoff", backoff.Backoff(**FAST_BACKOFF))
    return smartx_device.Client.from_bundle(bundle, queue_path=str(tmp_path / queue),
                                            port=hub_port, **options)


def stored(store, device_id):
    """Every stored reading of the device, oldest first."""
    readings, before = [], None
    while True:
        page = store.query_telemetry(device_id, limit=10_000, before_seq=before)
        if not page:
            return list(reversed(readings))
        readings.extend(page)
        before = page[-1].seq


def device_id_of(bundle):
    return json.load(open(bundle))["device_id"]


# -- publish, ack, state, commands ----------------------------------------------------------


@pytest.mark.parametrize("auth", ["es256", "eddsa", "hs256"])
def test_publish_and_ack(hub, tmp_path, auth):
    bundle = add_device(hub.data, tmp_path, "node-" + auth, auth)
    client = new_client(bundle, hub.device_port, tmp_path)
    client.connect()
    assert client.connected
    seqs = [client.publish("temp", 20 + i / 10) for i in range(10)]
    assert seqs == list(range(1, 11))
    assert client.flush(5000)
    assert client.queue.pending_readings == 0
    rows = stored(hub.ctx.store, client.device_id)
    assert [row.value for row in rows] == [20 + i / 10 for i in range(10)]
    # Timestamps come from the hub's clock (the board needs none): close to now.
    assert abs(rows[0].ts_ms - time.time() * 1000) < 60_000
    client.close()


def test_device_made_key_with_private_key_path(hub, tmp_path):
    key = ec.generate_private_key(ec.SECP256R1())
    key_file, public_file = tmp_path / "device.key", tmp_path / "device.pub"
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    public_file.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    bundle = add_device(hub.data, tmp_path, "own-key", "es256", str(public_file))
    assert "private_key_pem" not in json.load(open(bundle))
    with pytest.raises(smartx_device.CredentialError):
        new_client(bundle, hub.device_port, tmp_path)
    client = new_client(bundle, hub.device_port, tmp_path, private_key_path=str(key_file))
    client.connect()
    client.publish("temp", 1)
    assert client.flush(5000)
    client.close()


def test_commands_results_and_state(hub, tmp_path):
    bundle = add_device(hub.data, tmp_path, "cmd-node", "hs256")
    client = new_client(bundle, hub.device_port, tmp_path)
    blinks = []

    @client.command("blink")
    def blink(args):
        blinks.append(args.get("times", 1))
        return {"blinked": args.get("times", 1)}

    @client.command("explode")
    def explode(args):
        raise RuntimeError("sensor on fire")

    desired = []
    client.on_desired_state(lambda state: (desired.append(state),
                                           client.report_state({"led": state.get("led")})))
    client.connect()
    store = hub.ctx.store
    now = int(time.time() * 1000)
    ids = [store.add_command(client.device_id, name, args, 60_000, now).id
           for name, args in (("blink", {"times": 3}), ("explode", {}), ("no_such", {}))]
    store.set_desired_state(client.device_id, {"led": "on"}, now)
    hub.live.wake(client.device_id)

    def done():
        client.loop(20)
        return all(store.get_command(i).status in ("succeeded", "failed") for i in ids) \
            and store.get_state(client.device_id).reported == {"led": "on"}

    deadline = time.monotonic() + 5
    while not done():
        assert time.monotonic() < deadline, [store.get_command(i) for i in ids]
    blink_cmd, explode_cmd, unknown_cmd = (store.get_command(i) for i in ids)
    assert blinks == [3] and blink_cmd.status == "succeeded"
    assert blink_cmd.result == {"blinked": 3}
    assert explode_cmd.status == "failed" and "sensor on fire" in explode_cmd.error
    assert unknown_cmd.status == "failed" and "unknown command" in unknown_cmd.error
    assert desired == [{"led": "on"}]
    assert client.core.handler_errors == 1 and client.connected  # no crash, link still up
    assert client.flush(2000)  # the reported state was acknowledged
    client.close()


# -- failures a user acts on ----------------------------------------------------------------


def other_ca_bundle(bundle, tmp_path):
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Some Other CA")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    data = json.load(open(bundle))
    data["ca_pem"] = cert.public_bytes(serialization.Encoding.PEM).decode()
    data["ca_fingerprint"] = "sha256:" + cert.fingerprint(hashes.SHA256()).hex()
    path = tmp_path / "wrong-ca.smartx.json"
    path.write_text(json.dumps(data))
    return str(path)


def test_wrong_ca_is_refused_with_ca_mismatch(hub, tmp_path):
    bundle = other_ca_bundle(add_device(hub.data, tmp_path, "wrong-ca"), tmp_path)
    client = new_client(bundle, hub.device_port, tmp_path)
    with pytest.raises(smartx_device.CAMismatchError) as caught:
        client.connect()
    assert "verify" in str(caught.value)
    assert not client.connected
    # A fatal error: the run loop raises it instead of retrying for ever.
    with pytest.raises(smartx_device.CAMismatchError):
        client.run_forever()


def test_edited_fingerprint_is_a_credential_error(hub, tmp_path):
    bundle = add_device(hub.data, tmp_path, "edited")
    data = json.load(open(bundle))
    data["ca_fingerprint"] = "sha256:" + "00" * 32
    (tmp_path / "edited.json").write_text(json.dumps(data))
    with pytest.raises(smartx_device.CredentialError):
        smartx_device.load_credentials(str(tmp_path / "edited.json"))


def test_wrong_server_name_is_a_ca_mismatch(hub, tmp_path):
    bundle = add_device(hub.data, tmp_path, "wrong-name")
    data = json.load(open(bundle))
    data["server_name"] = "not-the-hub.example"
    (tmp_path / "named.json").write_text(json.dumps(data))
    client = new_client(str(tmp_path / "named.json"), hub.device_port, tmp_path)
    with pytest.raises(smartx_device.CAMismatchError):
        client.connect()


def test_disabled_device_is_refused_and_a_live_one_is_cut(hub, tmp_path):
    bundle = add_device(hub.data, tmp_path, "to-disable")
    client = new_client(bundle, hub.device_port, tmp_path)
    client.connect()
    hub.ctx.store.set_device_enabled(client.device_id, False)
    with pytest.raises(smartx_device.DeviceDisabledError) as caught:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            client.loop(50)
    assert caught.value.reason == reasons.CLOSE_DEVICE_DISABLED
    with pytest.raises(smartx_device.DeviceDisabledError) as caught:
        client.connect()
    assert caught.value.reason == reasons.CLOSE_DEVICE_DISABLED
    assert caught.value.detail


def test_wrong_secret_is_an_auth_error(hub, tmp_path):
    bundle = add_device(hub.data, tmp_path, "forged", "hs256")
    data = json.load(open(bundle))
    data["secret_b64"] = base64.b64encode(os.urandom(32)).decode()
    (tmp_path / "forged.json").write_text(json.dumps(data))
    client = new_client(str(tmp_path / "forged.json"), hub.device_port, tmp_path)
    with pytest.raises(smartx_device.AuthError) as caught:
        client.connect()
    assert caught.value.reason == reasons.CLOSE_BAD_CREDENTIALS


def test_nobody_listening_is_hub_unreachable(tmp_path):
    data = make_hub_dir(tmp_path)
    bundle = add_device(data, tmp_path, "lonely")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: connections are refused
        client = new_client(bundle, port, tmp_path)
        with pytest.raises(smartx_device.HubUnreachableError) as caught:
            client.connect()
    assert caught.value.reason is None


def test_rate_limited_session_reconnects_after_retry_after(tmp_path):
    data = make_hub_dir(tmp_path)
    bundle = add_device(data, tmp_path, "chatty")
    handle = run_hub_in_thread(data, api=False, limits={"message_rate": 5.0, "message_burst": 5})
    try:
        client = new_client(bundle, handle.device_port, tmp_path, max_in_flight=1)
        client.core.batch_readings = 1  # one reading per message: many frames, fast
        client.connect()
        for i in range(40):
            client.publish("temp", i)
        deadline = time.monotonic() + 10
        while not isinstance(client.last_error, smartx_device.RateLimitedError):
            assert time.monotonic() < deadline
            client.loop(20)
        error = client.last_error
        assert error.reason == reasons.CLOSE_RATE_LIMITED and error.retry_after_ms > 0
        assert client._reconnect_at - time.monotonic_ns() // 1_000_000 >= error.retry_after_ms - 100
    finally:
        handle.stop()


# -- durability: hub restarts, reboots, the bound ---------------------------------------------


def test_hub_stopped_and_restarted_mid_stream_loses_and_duplicates_nothing(tmp_path):
    data = make_hub_dir(tmp_path)
    bundle = add_device(data, tmp_path, "steady")
    handle = run_hub_in_thread(data, api=False)
    port = handle.device_port
    client = new_client(bundle, port, tmp_path)
    client.connect()
    for i in range(300):
        client.publish("temp", i)
        if i % 25 == 0:
            client.loop(1)
    handle.stop()  # batches are in flight: some acked, some not
    for i in range(300, 400):
        client.publish("temp", i)
        client.loop(1)
    assert not client.connected
    handle = run_hub_in_thread(data, device_port=port, api=False)
    try:
        assert client.flush(15_000)
        rows = stored(handle.ctx.store, client.device_id)
        assert sorted(row.value for row in rows) == list(range(400))
        assert client.connections >= 2
    finally:
        client.close()
        handle.stop()


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _serve(data, port):
    process = subprocess.Popen(
        [sys.executable, "-m", "smartx_hub", "serve", "--data", data, "--host", "127.0.0.1",
         "--device-port", str(port), "--api-port", str(_free_port())],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return process
        except OSError:
            assert process.poll() is None, process.stdout.read()
            assert time.monotonic() < deadline
            time.sleep(0.05)


def test_hub_killed_mid_stream_then_restarted(tmp_path):
    data = make_hub_dir(tmp_path)
    bundle = add_device(data, tmp_path, "survivor")
    port = _free_port()
    process = _serve(data, port)
    client = new_client(bundle, port, tmp_path)
    try:
        client.connect()
        for i in range(500):
            client.publish("temp", i)
            if i % 20 == 0:
                client.loop(1)
        process.send_signal(signal.SIGKILL)  # no goodbye, commits cut wherever they are
        process.wait(10)
        for i in range(500, 600):
            client.publish("temp", i)
        client.loop(50)
        process = _serve(data, port)
        assert client.flush(20_000)
    finally:
        client.close()
        process.send_signal(signal.SIGTERM)
        process.wait(10)
    from smartx_hub.state import load_hub

    with load_hub(data) as ctx:
        rows = stored(ctx.store, client.device_id)
    values = [row.value for row in rows]
    assert sorted(values) == list(range(600))  # each exactly once


def test_reboot_with_queued_readings_delivers_them(hub, tmp_path):
    bundle = add_device(hub.data, tmp_path, "rebooter")
    first = new_client(bundle, hub.device_port, tmp_path)
    first.connect()
    for i in range(50):
        first.publish("temp", i)
    first.loop(0)  # batches go out; their acks may or may not be back
    for i in range(50, 60):
        first.publish("temp", i)  # these never leave before the power cut
    sealed_before = first.queue.sealed_ids()
    pending_before = first.queue.pending_readings
    assert pending_before > 0
    del first  # power cut: no close, no goodbye
    # The queue was written before publish returned; a new client on the same file resumes.
    second = new_client(bundle, hub.device_port, tmp_path)
    assert second.queue.pending_readings == pending_before
    assert second.queue.sealed_ids() == sealed_before
    for i in range(60, 70):
        second.publish("temp", i)
    second.connect()
    assert second.flush(5000)
    rows = stored(hub.ctx.store, second.device_id)
    assert sorted(row.value for row in rows) == list(range(70))
    assert all(msg_id < second.queue.allocate_msg_id() for msg_id in sealed_before)
    second.close()


def test_offline_readings_published_before_the_first_connect_arrive(hub, tmp_path):
    bundle = add_device(hub.data, tmp_path, "offline-first")
    client = new_client(bundle, hub.device_port, tmp_path)
    for i in range(30):
        client.publish("temp", i)
    client.close()
    client = new_client(bundle, hub.device_port, tmp_path)
    assert client.queue.pending_readings == 30
    client.connect()
    assert client.flush(5000)
    assert [row.value for row in stored(hub.ctx.store, client.device_id)] == list(range(30))


def test_queue_bound_drops_the_oldest_and_counts(hub, tmp_path):
    bundle = add_device(hub.data, tmp_path, "bounded")
    client = new_client(bundle, hub.device_port, tmp_path, queue_options={"max_bytes": 4096})
    for i in range(1000):
        client.publish("temp", i)
        assert client.queue.file_bytes <= 4096
    dropped = client.queue.dropped
    assert dropped > 0
    client.connect()
    assert client.flush(5000)
    values = [row.value for row in stored(hub.ctx.store, client.device_id)]
    assert values == list(range(dropped, 1000))


# -- reconnect timing with an injected clock and random source ----------------------------------


class FakeTime:
    """A clock that only moves when the client sleeps (or a transport waits)."""

    def __init__(self):
        self.now = 10_000
        self.sleeps = []

    def monotonic(self):
        return self.now

    def sleep(self, ms):
        self.sleeps.append(ms)
        self.now += ms


def test_reconnect_delays_follow_backoff_with_injected_clock_and_random(tmp_path):
    data = make_hub_dir(tmp_path)
    bundle = add_device(data, tmp_path, "patient")
    fake = FakeTime()
    attempts = []

    def refuse():
        attempts.append(fake.now)
        from smartx_device.transport import TransportError
        raise TransportError("connection refused")

    draws = iter([0.5, 0.25, 1.0, 0.75, 0.5, 0.5, 0.5])
    policy = backoff.Backoff(base_ms=1000, cap_ms=8000, random=lambda: next(draws))
    client = smartx_device.Client.from_bundle(
        bundle, queue_path=str(tmp_path / "q.log"), transport_factory=refuse, backoff=policy,
        monotonic=fake.monotonic, sleep=fake.sleep)
    with pytest.raises(smartx_device.HubUnreachableError):
        client.connect()  # the first attempt; loop() then retries on the back-off schedule
    client.loop(20_000)
    gaps = [b - a for a, b in zip(attempts, attempts[1:])]
    # Full jitter: draw * min(cap, base * 2**n) for n = 0, 1, 2, ...
    assert gaps[:5] == [500, 500, 4000, 6000, 4000]
    assert isinstance(client.last_error, smartx_device.HubUnreachableError)


def test_first_retry_after_a_hub_restart_is_spread(tmp_path):
    """A fleet that loses its hub at once does not come back at once."""
    delays = [backoff.Backoff(base_ms=1000, cap_ms=60_000).next_delay() for _ in range(200)]
    assert min(delays) >= 0 and max(delays) < 1000
    assert len(set(delays)) > 100


# -- throughput (reported, and checked against a floor) -----------------------------------------


def test_readings_per_second_from_one_client(hub, tmp_path, capsys):
    bundle = add_device(hub.data, tmp_path, "fast")
    client = new_client(bundle, hub.device_port, tmp_path)
    client.connect()
    count = 3000
    start = time.perf_counter()
    for i in range(count):
        client.publish("temp", float(i))
        if i % 200 == 199:
            client.loop(0)
    assert client.flush(30_000)
    elapsed = time.perf_counter() - start
    rate = count / elapsed
    per_reading = os.path.getsize(str(tmp_path / "queue.log"))
    with capsys.disabled():
        print("\n[sdk] %d readings acked in %.2f s: %.0f readings/s (fsync per reading)"
              % (count, elapsed, rate))
    assert len(stored(hub.ctx.store, client.device_id)) == count
    assert rate > 50
    assert per_reading > 0
    client.close()


@pytest.mark.parametrize("reason, error", [
    (reasons.CLOSE_BAD_CREDENTIALS, smartx_device.AuthError),
    (reasons.CLOSE_UNKNOWN_DEVICE, smartx_device.AuthError),
    (reasons.CLOSE_DEVICE_DISABLED, smartx_device.DeviceDisabledError),
    (reasons.CLOSE_RATE_LIMITED, smartx_device.RateLimitedError),
    (reasons.CLOSE_TOKEN_EXPIRED, smartx_device.TokenExpiredError),
    (reasons.CLOSE_VERSION_UNSUPPORTED, smartx_device.VersionUnsupportedError),
    (reasons.CLOSE_SHUTTING_DOWN, smartx_device.ConnectionLostError),
    (reasons.CLOSE_KEEPALIVE_TIMEOUT, smartx_device.ConnectionLostError),
    (99, smartx_device.ConnectionLostError),
])
def test_each_close_reason_maps_to_its_error(reason, error):
    from smartx_device.client import error_for_close
    from smartx_device.session import SessionClosed

    raised = error_for_close(SessionClosed(reason, "why", 1500, True, True))
    assert type(raised) is error
    assert (raised.reason, raised.detail, raised.retry_after_ms) == (reason, "why", 1500)
    assert reasons.reason_name(reason) in str(raised)


def test_client_core_error_result_for_unencodable_handler_result(tmp_path):
    """A handler returning what CBOR cannot carry gets an error result, not a crash."""
    from smartx_device import messages as m
    from smartx_device.auth import Signer
    from smartx_device.session import HubSession

    core = ClientCore("dev_1", Signer("hs256", secret=b"k" * 32),
                      OfflineQueue(str(tmp_path / "q.log")))
    core.handlers["weird"] = lambda args: {1, 2}
    hub = HubSession(0)
    hub.receive_data(core.begin(None, 0), 0)
    core.receive(hub.challenge(bytes(16), "hub_1", 0), 0)
    hub.receive_data(core.data_to_send(0), 0)
    core.receive(hub.accept("ses_1", 0), 0)
    core.receive(hub.send(m.Command(command_id="c1", name="weird", args={}), 0), 0)
    events = hub.receive_data(core.data_to_send(0), 0)
    result = events[0].message
    assert result.ok is False and "cannot be sent" in result.error


# -- the asyncio flavour --------------------------------------------------------------------


def test_async_client_publishes_flushes_and_runs_async_handlers(hub, tmp_path):
    import asyncio

    from smartx_device.aio import AsyncClient

    bundle = add_device(hub.data, tmp_path, "async-node", "eddsa")
    store = hub.ctx.store

    async def main():
        client = AsyncClient.from_bundle(bundle, queue_path=str(tmp_path / "aq.log"),
                                         port=hub.device_port,
                                         backoff=backoff.Backoff(**FAST_BACKOFF))

        @client.command("slow_echo")
        async def slow_echo(args):
            await asyncio.sleep(0.01)
            return args

        async with client:
            for i in range(100):
                await client.publish("temp", i)
            assert await client.flush(5000)
            command = store.add_command(client.device_id, "slow_echo", {"x": 1}, 60_000,
                                        int(time.time() * 1000))
            hub.live.wake(client.device_id)
            for _ in range(200):
                if store.get_command(command.id).status == "succeeded":
                    break
                await asyncio.sleep(0.01)
            assert store.get_command(command.id).result == {"x": 1}
            # The hub goes away and comes back: the background task reconnects.
            hub.live.kick(client.device_id, reasons.CLOSE_SHUTTING_DOWN, "restart")
            for i in range(100, 120):
                await client.publish("temp", i)
            assert await client.flush(5000)
            assert client.connections >= 2
        return client.device_id

    device_id = asyncio.run(main())
    assert [row.value for row in stored(store, device_id)] == list(range(120))


def test_async_client_wrong_ca(hub, tmp_path):
    import asyncio

    from smartx_device.aio import AsyncClient

    bundle = other_ca_bundle(add_device(hub.data, tmp_path, "async-wrong"), tmp_path)

    async def main():
        client = AsyncClient.from_bundle(bundle, queue_path=str(tmp_path / "aq.log"),
                                         port=hub.device_port)
        with pytest.raises(smartx_device.CAMismatchError):
            await client.connect()
        await client.close()

    asyncio.run(main())


# -- the serial transport (what a board behind a gateway uses) ----------------------------------


def test_client_over_a_serial_link_with_cobs_framing(tmp_path):
    """The blocking client over pyserial on a pseudo-terminal; the far end is a gateway-like
    HubSession with serial framing (the gateway itself is another part)."""
    import threading
    import tty

    from smartx_device import messages as m
    from smartx_device import session as s
    from smartx_device.framing import SerialFramer
    from smartx_device.jwt import device_token
    from smartx_device.transport import SerialTransport

    data = make_hub_dir(tmp_path)
    bundle = add_device(data, tmp_path, "serial-node", "hs256")
    creds = smartx_device.load_credentials(bundle)
    master, slave = os.openpty()
    tty.setraw(master)
    tty.setraw(slave)
    stored_readings, tokens = [], []
    stop = threading.Event()

    def far_end():
        hub = s.HubSession(0, SerialFramer())
        while not stop.is_set():
            import select
            if not select.select([master], [], [], 0.05)[0]:
                continue
            chunk = os.read(master, 4096)
            for event in hub.receive_data(chunk, 0):
                if isinstance(event, s.HelloReceived):
                    os.write(master, hub.challenge(bytes(16), creds.hub_id, 1_764_430_000_000))
                elif isinstance(event, s.AuthResponseReceived):
                    tokens.append(event.message.token)
                    os.write(master, hub.accept("ses_serial", 1_764_430_000_000))
                elif isinstance(event, s.MessageReceived) and event.message.TYPE == m.TELEMETRY:
                    stored_readings.extend(event.message.readings)
                    os.write(master, hub.send(m.Ack(msg_id=event.message.msg_id), 0))
            pending = hub.data_to_send()
            if pending:
                os.write(master, pending)

    thread = threading.Thread(target=far_end, daemon=True)
    thread.start()
    client = smartx_device.Client(creds, queue_path=str(tmp_path / "sq.log"),
                                  transport_factory=lambda: SerialTransport(os.ttyname(slave)))
    try:
        client.connect()
        assert tokens == [device_token(creds.secret, creds.device_id, creds.hub_id,
                                       1_764_430_000_000, bytes(16))]
        for i in range(20):
            client.publish("temp", i)
        assert client.flush(5000)
        assert [reading[2] for reading in stored_readings] == list(range(20))
    finally:
        client.close()
        stop.set()
        thread.join(2)
        os.close(master)
        os.close(slave)


def test_tls_transport_polls_with_a_zero_timeout(hub, tmp_path):
    from smartx_device.transport import connect_tls

    bundle = smartx_device.load_credentials(add_device(hub.data, tmp_path, "poller"))
    link = connect_tls("127.0.0.1", hub.device_port, bundle.ca_pem, bundle.server_name)
    try:
        assert link.recv(4096, 0) is None  # nothing sent yet: a poll, not an error
        assert link.recv(4096, 50) is None
        assert link.make_framer(1024).max_frame_size == 1024
    finally:
        link.close()
        link.close()  # idempotent
    assert link.recv(4096, 0) == b""


# -- examples/sensor_node.py on the board simulator ----------------------------------------------

SENSOR_NODE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "examples", "sensor_node.py")


def run_sensor_node(hub, tmp_path, name, files):
    from firmware_sim.board import Board

    bundle = add_device(hub.data, tmp_path, name, "hs256")
    board = Board(name, SENSOR_NODE, directory=str(tmp_path / name), bundle=bundle,
                  hub=("127.0.0.1", hub.device_port), files=files, console_log=False)
    return board, device_id_of(bundle)


def test_sensor_node_takes_interval_and_pins_from_config_json(hub, tmp_path):
    config = {"interval_s": 2, "adc_pin": 34, "led_pin": 2}
    board, device_id = run_sensor_node(hub, tmp_path, "configured",
                                       {"config.json": json.dumps(config)})
    board.sensor.script(34, [1111, 2222, 3333])  # only the configured pin reads these
    store = hub.ctx.store
    with board:
        board.console.expect(r"SmartX sensor node %s booting" % device_id, 20)
        board.console.expect(r"config: interval 2 s, ADC pin 34, LED pin 2", 5)
        board.console.expect(r"connected", 10)
        deadline = time.monotonic() + 10
        while len(stored(store, device_id)) < 3:
            assert time.monotonic() < deadline, stored(store, device_id)
            board.clock.advance(1000)  # half an interval of board time per step
            time.sleep(0.05)
        store.set_desired_state(device_id, {"led": True}, int(time.time() * 1000))
        hub.live.wake(device_id)
        board.wait_for(lambda: board.pin(2).value == 1, 10, "the configured LED pin lit")
        board.wait_for(lambda: (store.get_state(device_id).reported or {}).get("led") is True,
                       10, "the LED state reported")
        assert store.get_state(device_id).reported["interval_s"] == 2
    assert [row.value for row in stored(store, device_id)][:3] == [1111, 2222, 3333]
    assert board.pin(25).mode == -1 and not board.pin(25).history  # the default LED: untouched


def test_sensor_node_keeps_the_defaults_for_a_broken_or_odd_config(hub, tmp_path):
    board, _ = run_sensor_node(hub, tmp_path, "broken", {"config.json": "{interval_s: 5"})
    with board:
        board.console.expect(r"config.json is not JSON", 20)
        board.console.expect(r"config: interval 10 s, ADC pin 26, LED pin 25", 5)
        board.console.expect(r"connected", 10)
    odd = {"interval_s": 0, "adc_pin": "GP27", "led_pin": [1]}
    board, _ = run_sensor_node(hub, tmp_path, "odd", {"config.json": json.dumps(odd)})
    with board:
        board.console.expect(r"interval_s=0 ignored, keeping 10", 20)
        board.console.expect(r"led_pin=\[1\] ignored, keeping 25", 5)
        board.console.expect(r"config: interval 10 s, ADC pin GP27, LED pin 25", 5)
        board.console.expect(r"connected", 10)
