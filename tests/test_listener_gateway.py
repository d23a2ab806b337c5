"""The device listener's gateway rules (smartx_hub/listener.py, docs/security.md "Gateways"):
real TLS on loopback with gateway client certificates, a real hub and store.

What the hub must refuse: a board the gateway was not given (``not_authorised`` before any
challenge), a forged board answer behind the gateway (``bad_credentials``), the gateway posing
as a board with its own key, a gateway-assigned board coming in directly, and every board of a
disabled gateway; and what it must keep: a board verified end to end through its gateway.
"""

from __future__ import annotations

import os
import ssl
import time

import pytest

from smartx_device import session as core
from smartx_device.reasons import (CLOSE_BAD_CREDENTIALS, CLOSE_NOT_AUTHORISED,
                                   CLOSE_UNKNOWN_DEVICE)
from smartx_hub import gateway_pki, pki
from smartx_hub.listener import DeviceListener
from smartx_hub.live import LiveSessions
from smartx_hub.server import run_hub_in_thread

from hubtools import HubClosed, connect_device, device_token, make_hub, wait_until


@pytest.fixture
def bench(tmp_path):
    """A running hub; two gateways (with certificates on disk); boards assigned to each."""
    ctx = make_hub(tmp_path)
    # Route refusals must not back the address off: keep the default threshold (5) to see it.
    hub = run_hub_in_thread(ctx, api=False, limits={"devices_poll_ms": 100})
    if hub.listener.client_ca_pem is None:  # a server that does not pass the CA yet
        hub.listener.accept_gateways(ctx.ca_cert_pem)
    store = ctx.store
    now = int(time.time() * 1000)

    gateways = {}
    for name in ("gw-a", "gw-b"):
        device = store.add_device(name, "hs256", None, os.urandom(32), now, kind="gateway")
        key, cert = gateway_pki.create_gateway_cert(ctx.load_ca_key(), _ca(ctx), device.id, now)
        cert_path, key_path = tmp_path / (name + ".pem"), tmp_path / (name + ".key")
        cert_path.write_bytes(pki.cert_pem(cert))
        key_path.write_bytes(pki.private_key_pem(key))
        gateways[name] = {"id": device.id, "secret": device.secret,
                          "context": gateway_pki.gateway_client_tls_context(
                              ctx.ca_cert_pem, str(cert_path), str(key_path))}
    boards = {}
    for name, via in (("board-a1", "gw-a"), ("board-a2", "gw-a"), ("board-b1", "gw-b"),
                      ("board-direct", None)):
        secret = os.urandom(32)
        device = store.add_device(name, "hs256", None, secret, now,
                                  gateway_id=gateways[via]["id"] if via else None)
        boards[name] = _Creds(device.id, secret)
    yield {"ctx": ctx, "hub": hub, "store": store, "gateways": gateways, "boards": boards}
    hub.stop()
    ctx.close()


class _Creds:
    """A board's credentials in the form hubtools signs with."""

    def __init__(self, device_id, secret):
        self.device_id = device_id
        self.auth = "hs256"
        self.secret = secret
        self.signing_key = secret


def _ca(ctx):
    from cryptography import x509

    return x509.load_pem_x509_certificate(ctx.ca_cert_pem)


def via(bench, gateway_name):
    """Connect to the device port as gateway ``gateway_name`` (its client certificate)."""
    return connect_device(bench["hub"].device_port, bench["ctx"].ca_cert_pem,
                          tls_context=bench["gateways"][gateway_name]["context"])


def direct(bench):
    """Connect to the device port with no client certificate."""
    return connect_device(bench["hub"].device_port, bench["ctx"].ca_cert_pem)


def test_listener_asks_for_gateway_certificates_only_with_the_ca(tmp_path):
    """Given the hub CA the listener's context requests (not requires) client certificates;
    without TLS there is nothing to request."""
    ctx = make_hub(tmp_path)
    try:
        tls = ctx.device_tls_context()
        assert tls.verify_mode == ssl.CERT_NONE
        listener = DeviceListener(ctx.hub_id, ctx.store, LiveSessions(), tls,
                                  client_ca_pem=ctx.ca_cert_pem)
        assert tls.verify_mode == ssl.CERT_OPTIONAL
        assert listener.client_ca_pem == ctx.ca_cert_pem
        plain = DeviceListener(ctx.hub_id, ctx.store, LiveSessions(), None,
                               client_ca_pem=ctx.ca_cert_pem)
        assert plain.client_ca_pem is None
        plain.accept_gateways(ctx.ca_cert_pem)
        assert plain.client_ca_pem is None
    finally:
        ctx.close()


def test_board_verified_end_to_end_through_its_gateway(bench):
    """A board assigned to gw-a, through gw-a's connection, answering with its own JWT."""
    board = bench["boards"]["board-a1"]
    client = via(bench, "gw-a")
    try:
        accepted = client.handshake(board)
        assert accepted.session_id.startswith("ses_")
        assert bench["hub"].live.is_online(board.device_id)
        assert bench["hub"].listener.stats.get("gateway_connections", 0) >= 1
        client.telemetry(1, [["t", 1_764_430_000_000, 20]])
        stored = bench["store"].query_telemetry(board.device_id)
        assert [r.value for r in stored] == [20]
    finally:
        client.close()


def test_forged_board_answer_behind_the_gateway_is_bad_credentials(bench):
    """The gateway relays for board-a1 but does not hold its secret: a JWT signed with any
    other key is refused like any bad answer."""
    board = bench["boards"]["board-a1"]
    client = via(bench, "gw-a")
    try:
        challenge = client.hello(board.device_id)  # the path is fine: a challenge comes
        client.write(client.session.authenticate(
            device_token(board, challenge, key=os.urandom(32)), int(time.time() * 1000)))
        assert client.wait_closed().reason == CLOSE_BAD_CREDENTIALS
        assert not bench["hub"].live.is_online(board.device_id)
    finally:
        client.close()


@pytest.mark.parametrize("gateway_name, board_name", [
    ("gw-a", "board-b1"),       # another gateway's board
    ("gw-b", "board-a1"),
    ("gw-a", "board-direct"),   # a board that connects by itself
])
def test_board_not_given_to_the_gateway_is_refused_before_any_challenge(bench, gateway_name,
                                                                        board_name):
    """Even with the board's true credentials, the gateway may relay only its own boards; the
    refusal comes at Hello, so no challenge (and no JWT check) is spent on it."""
    board = bench["boards"][board_name]
    client = via(bench, gateway_name)
    try:
        with pytest.raises(HubClosed) as refused:
            client.hello(board.device_id)
        assert refused.value.event.reason == CLOSE_NOT_AUTHORISED
        assert not any(isinstance(e, core.ChallengeReceived) for e in client.events)
    finally:
        client.close()
    assert bench["hub"].listener.stats.get("route_refusals", 0) >= 1


def test_gateway_cannot_authenticate_as_a_board(bench):
    """The gateway signs a board's answer with its own secret: bad credentials. Its
    certificate names it, and the board's key is the board's alone."""
    board = bench["boards"]["board-a1"]
    gateway = bench["gateways"]["gw-a"]
    client = via(bench, "gw-a")
    try:
        challenge = client.hello(board.device_id)
        client.write(client.session.authenticate(
            device_token(board, challenge, key=gateway["secret"]), int(time.time() * 1000)))
        assert client.wait_closed().reason == CLOSE_BAD_CREDENTIALS
    finally:
        client.close()


def test_gateway_holds_its_own_session_as_itself(bench):
    """A gateway is a device too: with its own JWT it is verified, through its certificate."""
    gateway = bench["gateways"]["gw-a"]
    client = via(bench, "gw-a")
    try:
        client.handshake(_Creds(gateway["id"], gateway["secret"]))
        assert bench["hub"].live.is_online(gateway["id"])
    finally:
        client.close()
    other = via(bench, "gw-b")  # ... but not through another gateway
    try:
        with pytest.raises(HubClosed) as refused:
            other.hello(gateway["id"])
        assert refused.value.event.reason == CLOSE_NOT_AUTHORISED
    finally:
        other.close()


def test_assigned_board_coming_in_directly_is_refused(bench):
    """A board assigned to a gateway is accepted only through it: directly, even with its
    true credentials, it is refused after verification with not_authorised."""
    client = direct(bench)
    try:
        with pytest.raises(HubClosed) as refused:
            client.handshake(bench["boards"]["board-a1"])
        assert refused.value.event.reason == CLOSE_NOT_AUTHORISED
    finally:
        client.close()
    free = direct(bench)
    try:
        free.handshake(bench["boards"]["board-direct"])  # an unassigned board is fine
    finally:
        free.close()


def test_unknown_board_behind_a_gateway_is_unknown_device(bench):
    """A device id nobody enrolled gets its challenge and then unknown_device, as directly."""
    client = via(bench, "gw-a")
    try:
        with pytest.raises(HubClosed) as refused:
            client.handshake(_Creds("dev_zzzzzzzzzzzzzzzz", os.urandom(32)))
        assert refused.value.event.reason == CLOSE_UNKNOWN_DEVICE
    finally:
        client.close()


def test_disabling_a_gateway_ends_its_boards_sessions_and_refuses_new_ones(bench):
    board = bench["boards"]["board-a1"]
    client = via(bench, "gw-a")
    try:
        client.handshake(board)
        bench["store"].set_device_enabled(bench["gateways"]["gw-a"]["id"], False)
        closed = client.wait_closed(timeout=3)
        assert closed.reason == CLOSE_NOT_AUTHORISED
    finally:
        client.close()
    again = via(bench, "gw-a")
    try:
        with pytest.raises(HubClosed) as refused:
            again.hello(board.device_id)
        assert refused.value.event.reason == CLOSE_NOT_AUTHORISED
    finally:
        again.close()


def test_moving_a_board_to_another_gateway_ends_the_old_path(bench):
    board = bench["boards"]["board-a2"]
    client = via(bench, "gw-a")
    try:
        client.handshake(board)
        bench["store"].set_device_gateway(board.device_id, bench["gateways"]["gw-b"]["id"])
        assert client.wait_closed(timeout=3).reason == CLOSE_NOT_AUTHORISED
    finally:
        client.close()
    moved = via(bench, "gw-b")
    try:
        moved.handshake(board)
        assert bench["hub"].live.is_online(board.device_id)
    finally:
        moved.close()


def test_route_refusals_do_not_back_the_gateway_address_off(bench):
    """Many refused relays from one address (five would trigger the auth back-off) do not
    lock the gateway's other boards out."""
    for _ in range(8):
        client = via(bench, "gw-a")
        try:
            with pytest.raises(HubClosed):
                client.hello(bench["boards"]["board-b1"].device_id)
        finally:
            client.close()
    assert bench["hub"].listener.stats.get("backoffs", 0) == 0
    client = via(bench, "gw-a")
    try:
        client.handshake(bench["boards"]["board-a1"])
    finally:
        client.close()


def test_certificate_of_another_hub_fails_the_tls_handshake(bench, tmp_path):
    """A gateway certificate another hub's CA issued does not get past TLS."""
    other_key, other_cert = pki.create_ca("hub_bbbbbbbbbbbbbbbb", int(time.time() * 1000))
    key, cert = gateway_pki.create_gateway_cert(other_key, other_cert,
                                                bench["gateways"]["gw-a"]["id"],
                                                int(time.time() * 1000))
    (tmp_path / "o.pem").write_bytes(pki.cert_pem(cert))
    (tmp_path / "o.key").write_bytes(pki.private_key_pem(key))
    context = gateway_pki.gateway_client_tls_context(bench["ctx"].ca_cert_pem,
                                                     str(tmp_path / "o.pem"),
                                                     str(tmp_path / "o.key"))
    with pytest.raises((ssl.SSLError, ConnectionError, OSError, HubClosed)):
        client = connect_device(bench["hub"].device_port, bench["ctx"].ca_cert_pem,
                                tls_context=context)
        try:
            # TLS 1.3 reports the client certificate's rejection on the first read.
            client.hello(bench["boards"]["board-a1"].device_id)
        finally:
            client.close()
    wait_until(lambda: bench["hub"].listener.stats.get("tls_failures", 0) >= 1)
