"""The device listener end to end: real TLS on loopback, real SQLite files, the hub in-process
(``run_hub_in_thread``) and as a subprocess (``python -m smartx_hub serve``)."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import warnings

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from smartx_device import messages as m
from smartx_device import session as core
from smartx_device.reasons import (CLOSE_BAD_CREDENTIALS, CLOSE_DEVICE_DISABLED,
                                   CLOSE_FRAME_TOO_LARGE, CLOSE_HANDSHAKE_TIMEOUT,
                                   CLOSE_KEEPALIVE_TIMEOUT, CLOSE_MALFORMED,
                                   CLOSE_PROTOCOL_VIOLATION, CLOSE_RATE_LIMITED, CLOSE_REPLACED,
                                   CLOSE_SHUTTING_DOWN, CLOSE_TOKEN_EXPIRED, CLOSE_UNKNOWN_DEVICE)
from smartx_hub.server import run_hub_in_thread
from smartx_hub.state import load_hub

from hubtools import (DeviceClient, HubClosed, b64url, connect_device, device_token, enrol,
                      make_hub, start_serve, unsigned_token, wait_until)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One hub for the tests that need no special limits (auth back-off effectively off)."""
    ctx = make_hub(tmp_path_factory.mktemp("listener"))
    hub = run_hub_in_thread(ctx, limits={"auth_failures_before_backoff": 10_000})
    yield ctx, hub
    hub.stop()
    ctx.close()


@pytest.fixture
def start_hub(tmp_path):
    """Start a hub of its own with the given limits: ``ctx, hub = start_hub(**limits)``."""
    started = []

    def start(api=False, **limits):
        ctx = make_hub(tmp_path, "hub%d" % len(started))
        hub = run_hub_in_thread(ctx, limits=limits, api=api)
        started.append((ctx, hub))
        return ctx, hub

    yield start
    for ctx, hub in started:
        hub.stop()
        ctx.close()


def client(ctx, hub, **options):
    return DeviceClient(hub.device_port, ctx.ca_cert_pem, **options).connect()


def acked(event, msg_id):
    return isinstance(event, core.MessageReceived) and isinstance(event.message, m.Ack) \
        and event.message.msg_id == msg_id


# -- verified sessions -------------------------------------------------------------------


@pytest.mark.parametrize("auth", ["es256", "eddsa", "hs256"])
def test_verified_session_acks_only_committed_telemetry(shared, auth):
    ctx, hub = shared
    creds = enrol(ctx.store, "ok-" + auth, auth)
    other = load_hub(ctx.data_dir)  # a second connection to the file, as another process has
    try:
        with client(ctx, hub) as device:
            accepted = device.handshake(creds)
            assert accepted.keepalive_ms == 30000 and accepted.session_id.startswith("ses_")
            assert abs(accepted.hub_time_ms - time.time() * 1000) < 5000
            assert hub.live.is_online(creds.device_id)
            for msg_id in (1, 2, 3):
                device.telemetry(msg_id, [["temp", 1000 + msg_id, 20.5 + msg_id],
                                          ["hum", 1000 + msg_id, {"raw": [1, 2]}]])
                # Acked means committed: another connection sees it at once.
                readings = other.store.query_telemetry(creds.device_id, limit=100)
                assert {(r.msg_id, r.stream) for r in readings} >= {(msg_id, "temp"),
                                                                   (msg_id, "hum")}
        stored = other.store.query_telemetry(creds.device_id, stream="hum")
        assert [r.value for r in stored] == [{"raw": [1, 2]}] * 3
        wait_until(lambda: not hub.live.is_online(creds.device_id))
        wait_until(lambda: other.store.get_device(creds.device_id).last_seen_ms is not None)
    finally:
        other.close()


def test_duplicate_batch_is_stored_once_and_acked_twice(shared):
    ctx, hub = shared
    creds = enrol(ctx.store, "dup", "hs256")
    with connect_device(hub.device_port, ctx.ca_cert_pem, creds) as device:
        batch = [["temp", 5, 1.5], ["temp", 6, 2.5]]
        device.telemetry(7, batch)
        device.telemetry(7, batch)
        # Both copies in one read, before either is committed: still one stored copy.
        device.send(m.Telemetry(msg_id=8, readings=batch))
        device.send(m.Telemetry(msg_id=8, readings=batch))
        device.wait_for(lambda e: acked(e, 8))
        device.wait_for(lambda e: acked(e, 8))
    readings = ctx.store.query_telemetry(creds.device_id, limit=100)
    assert sorted((r.msg_id, r.ts_ms) for r in readings) == [(7, 5), (7, 6), (8, 5), (8, 6)]


def test_reported_state_commands_and_desired_state(shared):
    ctx, hub = shared
    creds = enrol(ctx.store, "cmd", "es256")
    now = int(time.time() * 1000)
    queued = ctx.store.add_command(creds.device_id, "blink", {"times": 3}, 60_000, now)
    ctx.store.set_desired_state(creds.device_id, {"led": "on"}, now)
    with connect_device(hub.device_port, ctx.ca_cert_pem, creds) as device:
        desired = device.wait_for(lambda e: isinstance(e, core.MessageReceived)
                                  and isinstance(e.message, m.DesiredState)).message
        assert desired.version == 1 and desired.state == {"led": "on"}
        command = device.wait_for(lambda e: isinstance(e, core.MessageReceived)
                                  and isinstance(e.message, m.Command)).message
        assert (command.command_id, command.name, command.args) == (queued.id, "blink",
                                                                    {"times": 3})
        device.send(m.CommandResult(command_id=queued.id, ok=True, result="blinked"))
        # A command queued while online arrives on wake().
        later = ctx.store.add_command(creds.device_id, "reboot", None, 60_000, now)
        assert hub.live.wake(creds.device_id)
        command = device.wait_for(lambda e: isinstance(e, core.MessageReceived)
                                  and isinstance(e.message, m.Command)).message
        assert command.command_id == later.id
        device.send(m.ReportedState(msg_id=42, state={"led": "on", "uptime": 5}))
        device.wait_for(lambda e: acked(e, 42))
        assert ctx.store.get_state(creds.device_id).reported == {"led": "on", "uptime": 5}
        # Another device cannot answer this device's command.
        intruder = enrol(ctx.store, "intruder", "hs256")
        with connect_device(hub.device_port, ctx.ca_cert_pem, intruder) as other:
            other.send(m.CommandResult(command_id=later.id, ok=False, error="hijacked"))
            other.send(m.ReportedState(msg_id=1, state={}))
            other.wait_for(lambda e: acked(e, 1))  # the writer is in order: result handled
    result = wait_until(lambda: ctx.store.get_command(queued.id).status == "succeeded"
                        and ctx.store.get_command(queued.id))
    assert result.result == "blinked"
    assert ctx.store.get_command(later.id).status == "delivered"


# -- refusals ----------------------------------------------------------------------------


REFUSALS = {
    "wrong_key": CLOSE_BAD_CREDENTIALS, "wrong_aud": CLOSE_BAD_CREDENTIALS,
    "expired": CLOSE_TOKEN_EXPIRED, "alg_none": CLOSE_BAD_CREDENTIALS,
    "hs256_with_public_key": CLOSE_BAD_CREDENTIALS, "unknown_device": CLOSE_UNKNOWN_DEVICE,
    "disabled_device": CLOSE_DEVICE_DISABLED,
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refusals_carry_their_reason(shared, case):
    import hashlib
    import hmac
    import json

    ctx, hub = shared
    creds = enrol(ctx.store, "refuse-" + case, "es256")
    device_id = creds.device_id
    if case == "disabled_device":
        ctx.store.set_device_enabled(device_id, False)
    if case == "unknown_device":
        device_id = "dev_nosuchdevice000"
    with client(ctx, hub) as device:
        chal = device.hello(device_id)
        iat = chal.hub_time_ms // 1000
        claims = {"sub": device_id, "aud": chal.hub_id, "iat": iat, "exp": iat + 300,
                  "nonce": b64url(chal.nonce)}
        if case == "wrong_key":
            token = device_token(creds, chal, key=ec.generate_private_key(ec.SECP256R1()))
        elif case == "wrong_aud":
            token = device_token(creds, chal, aud="hub_notthishub00000")
        elif case == "expired":
            token = device_token(creds, chal, iat=iat - 900, exp=iat - 600)
        elif case == "alg_none":
            token = unsigned_token(claims, {"alg": "none", "typ": "sx-device+jwt"})
        elif case == "hs256_with_public_key":
            header = b64url(json.dumps({"alg": "HS256", "typ": "sx-device+jwt"}).encode())
            body = b64url(json.dumps(claims).encode())
            mac = hmac.new(creds.public_key_pem, ("%s.%s" % (header, body)).encode(),
                           hashlib.sha256).digest()
            token = "%s.%s.%s" % (header, body, b64url(mac))
        else:
            token = device_token(creds, chal, sub=device_id)
        with pytest.raises(HubClosed) as info:
            device.authenticate(token)
    assert info.value.event.reason == REFUSALS[case]
    assert info.value.event.by_peer and info.value.event.clean
    assert not hub.live.is_online(device_id)


def test_replayed_nonce_and_token_are_refused(shared):
    ctx, hub = shared
    creds = enrol(ctx.store, "replay", "eddsa")
    with client(ctx, hub) as first:
        chal = first.hello(creds.device_id)
        token = device_token(creds, chal)
        first.authenticate(token)
    # A recorded session's messages, replayed on a new connection: the hub's new nonce differs.
    with client(ctx, hub) as second:
        new_chal = second.hello(creds.device_id)
        assert new_chal.nonce != chal.nonce
        with pytest.raises(HubClosed) as info:
            second.authenticate(token)
    assert info.value.event.reason == CLOSE_BAD_CREDENTIALS


def test_newer_session_replaces_older(shared):
    ctx, hub = shared
    creds = enrol(ctx.store, "twice", "hs256")
    with connect_device(hub.device_port, ctx.ca_cert_pem, creds) as old:
        with connect_device(hub.device_port, ctx.ca_cert_pem, creds) as new:
            assert old.wait_closed().reason == CLOSE_REPLACED
            new.telemetry(1, [["x", 1, 1]])
            assert hub.live.is_online(creds.device_id)
        wait_until(lambda: not hub.live.is_online(creds.device_id))


def test_disabling_from_another_process_kicks_within_a_second(shared):
    ctx, hub = shared
    victim = enrol(ctx.store, "kick-cli", "es256")
    removed = enrol(ctx.store, "kick-removed", "hs256")
    bystander = enrol(ctx.store, "kick-bystander", "hs256")
    devices = [connect_device(hub.device_port, ctx.ca_cert_pem, creds)
               for creds in (victim, removed, bystander)]
    try:
        cli = subprocess.run([sys.executable, "-m", "smartx_hub", "device", "disable",
                              victim.device_id, "--data", ctx.data_dir],
                             capture_output=True, text=True, timeout=30, cwd=ROOT)
        assert cli.returncode == 0, cli.stderr
        started = time.monotonic()
        assert devices[0].wait_closed(timeout=3).reason == CLOSE_DEVICE_DISABLED
        assert time.monotonic() - started < 1.5
        other = load_hub(ctx.data_dir)
        try:
            other.store.remove_device(removed.device_id)
        finally:
            other.close()
        started = time.monotonic()
        assert devices[1].wait_closed(timeout=3).reason == CLOSE_UNKNOWN_DEVICE
        assert time.monotonic() - started < 1.5
        devices[2].telemetry(1, [["still", 1, "here"]])
    finally:
        for device in devices:
            device.close()


# -- bad input ---------------------------------------------------------------------------


def test_oversized_frame_is_refused_from_its_header(shared):
    ctx, hub = shared
    with client(ctx, hub) as device:
        device.write(bytes([0x80, 0x80, 0x40]))  # varint header: a 1 MiB frame, no body sent
        assert device.wait_closed().reason == CLOSE_FRAME_TOO_LARGE


@pytest.mark.parametrize("garbage, reason", [
    (bytes([5]) + b"\xff\xff\xff\xff\xff", CLOSE_MALFORMED),  # a frame that is not CBOR
    (bytes([3]) + b"\xa1\x00\x63", CLOSE_MALFORMED),  # truncated CBOR inside a whole frame
    (bytes([0x00]), CLOSE_MALFORMED),  # a zero-length frame
])
def test_garbage_frames_are_closed_malformed(shared, garbage, reason):
    ctx, hub = shared
    with client(ctx, hub) as device:
        device.write(garbage)
        assert device.wait_closed().reason == reason
    with client(ctx, hub) as device:  # the listener is unharmed
        creds = enrol(ctx.store, "after-garbage-%d" % garbage[0], "hs256")
        device.handshake(creds)


def test_messages_out_of_turn_are_protocol_violations(shared):
    ctx, hub = shared
    creds = enrol(ctx.store, "out-of-turn", "hs256")
    framer = core.StreamFramer()
    with client(ctx, hub) as device:  # Telemetry before Hello
        device.write(framer.encode(m.encode_message(m.Telemetry(msg_id=1, readings=[["a", 1, 1]]))))
        assert device.wait_closed().reason == CLOSE_PROTOCOL_VIOLATION
    with client(ctx, hub) as device:  # a second AuthResponse while being verified
        chal = device.hello(creds.device_id)
        token = device_token(creds, chal)
        frame = framer.encode(m.encode_message(m.AuthResponse(token=token)))
        device.write(frame + frame)
        assert device.wait_closed().reason == CLOSE_PROTOCOL_VIOLATION
    assert not hub.live.is_online(creds.device_id)


def test_plain_tcp_and_tls_garbage_do_not_hurt_the_listener(shared):
    ctx, hub = shared
    before = hub.listener.stats.get("tls_failures", 0)
    for payload in (b"GET / HTTP/1.1\r\n\r\n", os.urandom(300), b"\x16\x03\x01\x00\x05hello"):
        with socket.create_connection(("127.0.0.1", hub.device_port), timeout=5) as raw:
            raw.sendall(payload)
            raw.settimeout(5)
            try:
                while raw.recv(4096):
                    pass
            except ConnectionResetError:
                pass
    assert hub.listener.stats.get("tls_failures", 0) >= before + 3
    creds = enrol(ctx.store, "after-tls-garbage", "es256")
    connect_device(hub.device_port, ctx.ca_cert_pem, creds).close()


# -- TLS profile -------------------------------------------------------------------------


def legacy_context(ca_pem, maximum, ciphers):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cadata=ca_pem.decode())
    # Let this client offer what the hub must refuse (OpenSSL 3 hides it at level 1).
    context.set_ciphers(ciphers + ":@SECLEVEL=0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # deprecated is the point
        context.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
        context.maximum_version = maximum
    return context


@pytest.mark.parametrize("name, maximum, ciphers", [
    ("tls1.1", ssl.TLSVersion.TLSv1_1, "ALL"),
    ("tls1.2-cbc-only", ssl.TLSVersion.TLSv1_2,
     "ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA:ECDHE-ECDSA-AES128-SHA256:"
     "ECDHE-ECDSA-AES256-SHA384:AES128-SHA:AES256-SHA:AES128-SHA256"),
])
def test_legacy_tls_clients_are_refused(shared, name, maximum, ciphers):
    ctx, hub = shared
    before = hub.listener.stats.get("tls_failures", 0)
    context = legacy_context(ctx.ca_cert_pem, maximum, ciphers)
    with pytest.raises(ssl.SSLError) as info:
        with socket.create_connection(("127.0.0.1", hub.device_port), timeout=5) as raw:
            context.wrap_socket(raw, server_hostname="localhost")
    # The hub refused it (an alert from the server), not the client's own configuration.
    assert "ALERT" in str(info.value).upper()
    wait_until(lambda: hub.listener.stats.get("tls_failures", 0) > before)


def test_modern_tls_versions_are_served(shared):
    ctx, hub = shared
    creds = enrol(ctx.store, "tls12", "hs256")
    for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        context = ctx.client_tls_context()
        context.maximum_version = version
        with DeviceClient(hub.device_port, None, tls_context=context).connect() as device:
            assert device.sock.version() == {"TLSv1_2": "TLSv1.2", "TLSv1_3": "TLSv1.3"}[version.name]
            device.handshake(creds)


# -- flood limits ------------------------------------------------------------------------


def test_idle_and_slow_clients_are_cut_off(start_hub):
    ctx, hub = start_hub(tls_handshake_timeout_ms=300, first_frame_timeout_ms=300,
                         auth_timeout_ms=600)
    creds = enrol(ctx.store, "punctual", "hs256")
    started = time.monotonic()
    # A TCP connection that never starts TLS.
    idle_tcp = socket.create_connection(("127.0.0.1", hub.device_port), timeout=3)
    # A TLS connection that never says Hello.
    silent = client(ctx, hub)
    # A client that sends its Hello one byte every 100 ms.
    slow = client(ctx, hub)
    hello = slow.session.start(creds.device_id, 0)
    stop = threading.Event()

    def trickle():
        for byte in hello:
            if stop.wait(0.1):
                return
            try:
                slow.sock.sendall(bytes([byte]))
            except OSError:
                return

    feeder = threading.Thread(target=trickle)
    feeder.start()
    try:
        # Meanwhile a normal device is served at once.
        with connect_device(hub.device_port, ctx.ca_cert_pem, creds) as device:
            device.telemetry(1, [["t", 1, 1]])
        # ... before any of the slow ones has even been cut off.
        assert hub.listener.stats.get("first_frame_timeouts", 0) == 0
        assert hub.listener.stats.get("tls_timeouts", 0) == 0
        assert peer_closed(idle_tcp)  # dropped after the TLS handshake timeout
        assert silent.wait_closed(timeout=3).reason == CLOSE_HANDSHAKE_TIMEOUT
        assert slow.wait_closed(timeout=3).reason == CLOSE_HANDSHAKE_TIMEOUT
        assert time.monotonic() - started < 1.5
    finally:
        stop.set()
        feeder.join()
        idle_tcp.close()
        silent.close()
        slow.close()


def peer_closed(sock):
    sock.settimeout(3)
    try:
        return sock.recv(100) == b""
    except ConnectionResetError:
        return True


def test_verified_but_silent_device_is_cut_at_the_idle_timeout(start_hub):
    ctx, hub = start_hub(keepalive_ms=1000)
    creds = enrol(ctx.store, "sleepy", "hs256")
    with connect_device(hub.device_port, ctx.ca_cert_pem, creds) as device:
        assert device.accepted.keepalive_ms == 1000
        started = time.monotonic()
        closed = device.wait_for(lambda e: isinstance(e, core.SessionClosed), timeout=4)
        assert closed.reason == CLOSE_KEEPALIVE_TIMEOUT
        # Not before two keep-alive intervals (less scheduling slack); wait_for's timeout
        # bounds it from above, loosely, since the machine may be loaded.
        assert time.monotonic() - started > 1.5


def test_per_ip_connection_cap(start_hub):
    ctx, hub = start_hub(max_connections_per_ip=3)
    creds = enrol(ctx.store, "capped", "hs256")
    held = [client(ctx, hub, source_ip="127.0.0.2") for _ in range(3)]
    try:
        wait_until(lambda: hub.listener.gate.connections_from("127.0.0.2") == 3)
        with pytest.raises((ssl.SSLError, OSError)):
            client(ctx, hub, source_ip="127.0.0.2").close()
        assert hub.listener.stats.get("refused_max_connections_per_ip", 0) >= 1
        # Another address is unaffected.
        connect_device(hub.device_port, ctx.ca_cert_pem, creds, source_ip="127.0.0.3").close()
        held.pop().close()
        wait_until(lambda: hub.listener.gate.connections_from("127.0.0.2") == 2)
        connect_device(hub.device_port, ctx.ca_cert_pem, creds, source_ip="127.0.0.2").close()
    finally:
        for device in held:
            device.close()


def test_message_rate_is_limited_with_retry_after(start_hub):
    ctx, hub = start_hub(message_rate=5.0, message_burst=5)
    creds = enrol(ctx.store, "chatty", "hs256")
    with connect_device(hub.device_port, ctx.ca_cert_pem, creds) as device:
        # One write: writing on after the hub has closed would draw a reset that can
        # discard its Close before the test reads it.
        device.write(b"".join(device.session.send(m.Ping(seq=seq), 0) for seq in range(20)))
        closed = device.wait_closed()
    assert closed.reason == CLOSE_RATE_LIMITED
    assert closed.retry_after_ms is not None and closed.retry_after_ms >= 1000


def test_auth_failures_back_off_the_address(start_hub):
    ctx, hub = start_hub(auth_failures_before_backoff=2, auth_backoff_base_ms=400)
    creds = enrol(ctx.store, "target", "es256")
    wrong = ec.generate_private_key(ec.SECP256R1())
    for _ in range(2):
        with client(ctx, hub, source_ip="127.0.0.4") as device:
            with pytest.raises(HubClosed):
                device.handshake(creds, key=wrong)
    # Backed off: the next connection from that address is dropped before TLS.
    with pytest.raises((ssl.SSLError, OSError)):
        client(ctx, hub, source_ip="127.0.0.4").close()
    connect_device(hub.device_port, ctx.ca_cert_pem, creds, source_ip="127.0.0.5").close()
    time.sleep(0.45)
    connect_device(hub.device_port, ctx.ca_cert_pem, creds, source_ip="127.0.0.4").close()
    audit = wait_until(lambda: [a for a in ctx.store.list_audit()
                                if a.action == "device.auth_backoff"])
    assert audit[0].source == "127.0.0.4" and audit[0].detail["backoff_ms"] == 400


# -- API, plaintext development mode -----------------------------------------------------


def test_api_is_served_over_https_in_the_same_hub(start_hub):
    ctx, hub = start_hub(api=True)
    context = ctx.client_tls_context()
    response = httpx.get("https://localhost:%d/openapi.json" % hub.api_port, verify=context,
                         timeout=10)
    assert response.status_code == 200 and "paths" in response.json()
    old = legacy_context(ctx.ca_cert_pem, ssl.TLSVersion.TLSv1_1, "ALL")
    with pytest.raises((ssl.SSLError, httpx.ConnectError)):
        httpx.get("https://localhost:%d/openapi.json" % hub.api_port, verify=old, timeout=10)


def test_insecure_dev_mode_speaks_plaintext(tmp_path):
    ctx = make_hub(tmp_path)
    creds = enrol(ctx.store, "plain", "hs256")
    hub = run_hub_in_thread(ctx, insecure_dev=True, api=False)
    try:
        with connect_device(hub.device_port, None, creds) as device:
            device.telemetry(1, [["t", 1, 1.0]])
    finally:
        hub.stop()
        ctx.close()


# -- the subprocess hub ------------------------------------------------------------------


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_sigterm_closes_sessions_after_committing_what_was_acked(tmp_path):
    ctx = make_hub(tmp_path)
    devices = [enrol(ctx.store, "sub-%d" % i, auth) for i, auth in enumerate(("es256", "hs256"))]
    data_dir = ctx.data_dir
    ctx.close()
    device_port, api_port = free_port(), free_port()
    process = start_serve(data_dir, device_port, api_port)
    try:
        with open(os.path.join(data_dir, "ca.pem"), "rb") as handle:
            ca_pem = handle.read()
        clients = [connect_device(device_port, ca_pem, creds) for creds in devices]
        acked_ids = []
        for device in clients:
            for msg_id in range(1, 6):
                device.telemetry(msg_id, [["t", msg_id, msg_id * 1.5]])
            acked_ids.append(list(range(1, 6)))
            # Sent, not waited for: committed and acked during shutdown, or never acked.
            device.send(m.Telemetry(msg_id=6, readings=[["t", 6, 9.0]]))
        process.send_signal(signal.SIGTERM)
        for device, ids in zip(clients, acked_ids):
            closed = device.wait_closed(timeout=10)
            assert closed.reason == CLOSE_SHUTTING_DOWN
            ids.extend(e.message.msg_id for e in device.events if acked(e, 6))
            device.close()
        assert process.wait(timeout=20) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdout.close()
        process.stderr.close()
    ctx = load_hub(data_dir)
    try:
        for creds, ids in zip(devices, acked_ids):
            stored = {r.msg_id for r in ctx.store.query_telemetry(creds.device_id, limit=100)}
            assert set(ids) <= stored
    finally:
        ctx.close()


# -- the ingest committer ----------------------------------------------------------------


def test_ingest_commits_in_groups_and_isolates_a_failing_batch(tmp_path):
    import asyncio
    import concurrent.futures

    from smartx_hub.ingest import IngestCommitter
    from smartx_hub.store import TelemetryBatch

    ctx = make_hub(tmp_path)
    devices = [enrol(ctx.store, "ingest-%d" % i, "hs256").device_id for i in range(4)]
    writer = concurrent.futures.ThreadPoolExecutor(1)

    async def scenario():
        committer = IngestCommitter(ctx.store, writer, max_batches=50, max_delay_ms=5)
        now = int(time.time() * 1000)
        futures = [committer.submit(TelemetryBatch(device, msg_id, [["t", msg_id, msg_id]], now))
                   for msg_id in range(1, 31) for device in devices]
        futures.append(committer.submit(TelemetryBatch(devices[0], 1, [["t", 1, 1]], now)))
        futures.append(committer.submit(TelemetryBatch("dev_notenrolled0000", 1, [["t", 1, 1]],
                                                       now)))
        results = await asyncio.gather(*futures, return_exceptions=True)
        first_commits = committer.commits
        # flush() commits what waits at once, without the idle delay.
        late = committer.submit(TelemetryBatch(devices[1], 99, [["t", 99, 99]], now))
        committer.max_delay_s = 60
        await asyncio.wait_for(committer.flush(), 5)
        return results, first_commits, late.result(), committer

    try:
        results, commits, late, committer = asyncio.run(scenario())
    finally:
        writer.shutdown()
    assert results[:120] == [True] * 120
    assert results[120] is False  # a repeat: acknowledged, not stored again
    assert isinstance(results[121], Exception)  # only the bad batch failed
    assert commits <= 6  # 122 batches in groups of at most 50 (+ one retry pass), not 122
    assert late is True and committer.pending == 0
    for device in devices:
        assert len(ctx.store.query_telemetry(device, limit=1000)) == 30 + (device == devices[1])
    ctx.close()


def test_a_device_that_floods_batches_is_paused_not_dropped(start_hub):
    ctx, hub = start_hub(max_inflight_batches=4, ingest_max_delay_ms=20)
    creds = enrol(ctx.store, "firehose", "hs256")
    with connect_device(hub.device_port, ctx.ca_cert_pem, creds) as device:
        for msg_id in range(1, 101):
            device.send(m.Telemetry(msg_id=msg_id, readings=[["t", msg_id, msg_id]]))
        for msg_id in range(1, 101):
            device.wait_for(lambda e, i=msg_id: acked(e, i), timeout=10)
    assert len(ctx.store.query_telemetry(creds.device_id, limit=1000)) == 100
    assert hub.listener.stats.get("backpressure_pauses", 0) >= 1


class _CountingTLS:
    """Wraps a connection's TLS object to count ``write`` calls (everything else passes)."""

    def __init__(self, tls):
        self._tls = tls
        self.writes = 0

    def write(self, data):
        self.writes += 1
        return self._tls.write(data)

    def __getattr__(self, name):
        return getattr(self._tls, name)


def test_acks_of_one_commit_go_out_in_one_write(start_hub):
    """Ten batches committed together: their ten Acks leave in one TLS write, in order, and
    each only after the commit (the store holds all ten when the first Ack is read)."""
    ctx, hub = start_hub(ingest_max_delay_ms=500)
    creds = enrol(ctx.store, "coalesce", "hs256")
    other = load_hub(ctx.data_dir)
    try:
        with connect_device(hub.device_port, ctx.ca_cert_pem, creds) as device:
            connection = wait_until(lambda: next(
                (c for c in list(hub.listener.connections) if c.device_id == creds.device_id
                 and c.verified), None))
            counting = _CountingTLS(connection.tls)
            connection.tls = counting  # the loop is idle: the session is quiet
            commits = hub.listener.ingest.commits
            device.write(b"".join(device.session.send(m.Telemetry(msg_id=i, readings=[["t", i, i]]))
                                  for i in range(1, 11)))
            ack_ids = [device.wait_for(lambda e: acked(e, 1), timeout=10).message.msg_id]
            assert len(other.store.query_telemetry(creds.device_id, limit=100)) == 10
            device.wait_for(lambda e: acked(e, 10), timeout=10)
            ack_ids += [e.message.msg_id for e in device.events
                        if isinstance(e, core.MessageReceived) and isinstance(e.message, m.Ack)]
            ack_ids.append(10)
            assert ack_ids == list(range(1, 11))
            assert hub.listener.ingest.commits == commits + 1
            assert counting.writes == 1
            connection.tls = counting._tls
    finally:
        other.close()


def _committer_scenario(tmp_path, max_delay_ms, body):
    import asyncio
    import concurrent.futures

    from smartx_hub.ingest import IngestCommitter

    ctx = make_hub(tmp_path)
    device = enrol(ctx.store, "timing", "hs256").device_id
    writer = concurrent.futures.ThreadPoolExecutor(1)

    async def scenario():
        committer = IngestCommitter(ctx.store, writer, max_delay_ms=max_delay_ms)
        return await body(committer, device)

    try:
        return asyncio.run(scenario())
    finally:
        writer.shutdown()
        ctx.close()


def test_ingest_submit_right_after_a_commit_starts_within_one_loop_turn(tmp_path):
    """A device answering its Ack is busy: its next batch must not wait the (here 60 s) delay."""
    import asyncio

    from smartx_hub.store import TelemetryBatch

    async def body(committer, device):
        now = int(time.time() * 1000)
        first = committer.submit(TelemetryBatch(device, 1, [["t", 1, 1]], now))
        await asyncio.sleep(0)
        assert committer.pending == 1  # idle committer: waits for company
        await asyncio.wait_for(committer.flush(), 10)
        assert first.result() is True
        started = asyncio.get_running_loop().time()
        second = committer.submit(TelemetryBatch(device, 2, [["t", 2, 2]], now))
        third = committer.submit(TelemetryBatch(device, 3, [["t", 3, 3]], now))  # same turn
        assert committer.pending == 2
        await asyncio.sleep(0)  # one loop turn
        assert committer.pending == 0  # the commit has started, with both batches
        results = await asyncio.wait_for(asyncio.gather(second, third), 10)
        return results, asyncio.get_running_loop().time() - started, committer.commits

    results, elapsed, commits = _committer_scenario(tmp_path, 60_000, body)
    assert results == [True, True] and commits == 2
    assert elapsed < 10  # not the 60 s delay


def test_ingest_submit_after_a_quiet_spell_waits_the_full_delay(tmp_path):
    import asyncio

    from smartx_hub.store import TelemetryBatch

    delay_s = 0.25

    async def body(committer, device):
        now = int(time.time() * 1000)
        await asyncio.wait_for(committer.submit(TelemetryBatch(device, 1, [["t", 1, 1]], now)), 10)
        await asyncio.sleep(delay_s * 1.5)  # quiet for longer than the delay
        loop = asyncio.get_running_loop()
        started = loop.time()
        late = committer.submit(TelemetryBatch(device, 2, [["t", 2, 2]], now))
        await asyncio.sleep(delay_s / 2)
        waiting = committer.pending  # still waiting for company half-way through
        await asyncio.wait_for(late, 10)
        return waiting, loop.time() - started

    waiting, elapsed = _committer_scenario(tmp_path, int(delay_s * 1000), body)
    assert waiting == 1
    assert elapsed >= delay_s - 0.01  # asyncio may fire a timer up to its clock resolution early
