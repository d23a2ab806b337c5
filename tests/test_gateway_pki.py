"""Gateway client certificates (smartx_hub/gateway_pki.py): what they say, real TLS handshakes on
loopback with and without them, and the relay rule the listener enforces."""

from __future__ import annotations

import datetime
import socket
import ssl
import threading

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from smartx_hub import gateway_pki, pki
from smartx_hub.gateway_pki import GatewayCertError, gateway_id_from_cert
from smartx_hub.store import Device

NOW_MS = 1_750_000_000_000
GATEWAY_ID = "dev_abcdefghijklmnop"


@pytest.fixture(scope="module")
def hub_pki(tmp_path_factory):
    """A hub CA, its server certificate on disk, and one gateway certificate on disk."""
    folder = tmp_path_factory.mktemp("gwpki")
    ca_key, ca_cert = pki.create_ca("hub_aaaaaaaaaaaaaaaa", NOW_MS)
    server_key, server_cert = pki.create_server_cert(ca_key, ca_cert, ["localhost", "127.0.0.1"],
                                                     NOW_MS)
    gw_key, gw_cert = gateway_pki.create_gateway_cert(ca_key, ca_cert, GATEWAY_ID, NOW_MS)
    paths = {}
    for name, data in (("server.pem", pki.cert_pem(server_cert)),
                       ("server.key", pki.private_key_pem(server_key)),
                       ("gw.pem", pki.cert_pem(gw_cert)), ("gw.key", pki.private_key_pem(gw_key))):
        (folder / name).write_bytes(data)
        paths[name] = str(folder / name)
    return dict(folder=folder, ca_key=ca_key, ca_cert=ca_cert, ca_pem=pki.cert_pem(ca_cert),
                server_cert=server_cert, gw_key=gw_key, gw_cert=gw_cert, paths=paths)


def other_ca(folder, device_id=GATEWAY_ID):
    """Another hub's CA and a gateway certificate it issued, on disk."""
    ca_key, ca_cert = pki.create_ca("hub_bbbbbbbbbbbbbbbb", NOW_MS)
    key, cert = gateway_pki.create_gateway_cert(ca_key, ca_cert, device_id, NOW_MS)
    (folder / "other.pem").write_bytes(pki.cert_pem(cert))
    (folder / "other.key").write_bytes(pki.private_key_pem(key))
    return ca_cert, str(folder / "other.pem"), str(folder / "other.key")


# -- the certificate ---------------------------------------------------------------------


def test_gateway_certificate_contents(hub_pki):
    cert = hub_pki["gw_cert"]
    identity = "smartx:gateway:" + GATEWAY_ID
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == identity
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == [identity]
    assert len(list(sans)) == 1
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    assert list(eku.value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca is False
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature and not usage.value.key_cert_sign
    public = cert.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey) and isinstance(public.curve, ec.SECP256R1)
    assert cert.issuer == hub_pki["ca_cert"].subject
    cert.verify_directly_issued_by(hub_pki["ca_cert"])  # raises if the CA did not sign it
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert lifetime == gateway_pki.GATEWAY_CERT_LIFETIME
    start = datetime.datetime.fromtimestamp(NOW_MS / 1000, tz=datetime.timezone.utc)
    assert cert.not_valid_before_utc <= start < cert.not_valid_after_utc
    assert gateway_pki.key_matches_cert(hub_pki["gw_key"], cert)
    assert not gateway_pki.key_matches_cert(pki.generate_key(), cert)


def test_gateway_id_from_cert_in_every_form(hub_pki):
    cert = hub_pki["gw_cert"]
    pem = pki.cert_pem(cert)
    der = cert.public_bytes(serialization.Encoding.DER)
    for form in (cert, pem, pem.decode("ascii"), der):
        assert gateway_id_from_cert(form) == GATEWAY_ID
        assert gateway_id_from_cert(form, hub_pki["ca_pem"]) == GATEWAY_ID


def forge(ca_key, ca_cert, *, cn="smartx:gateway:" + GATEWAY_ID, sans=None, eku=None, ca=False):
    """A CA-signed certificate with chosen names, usages and constraints."""
    key = pki.generate_key()
    sans = ["smartx:gateway:" + GATEWAY_ID] if sans is None else sans
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
               .issuer_name(ca_cert.subject).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(ca_cert.not_valid_before_utc)
               .not_valid_after(ca_cert.not_valid_after_utc)
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage(
                   [ExtendedKeyUsageOID.CLIENT_AUTH] if eku is None else eku), critical=False))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.UniformResourceIdentifier(s) if ":" in s else x509.DNSName(s) for s in sans]),
            critical=False)
    return builder.sign(ca_key, hashes.SHA256())


def test_what_is_not_a_gateway_certificate(hub_pki, tmp_path):
    ca_key, ca_cert = hub_pki["ca_key"], hub_pki["ca_cert"]
    refused = {
        "the hub's server certificate": hub_pki["server_cert"],
        "the CA itself": ca_cert,
        "serverAuth only": forge(ca_key, ca_cert, eku=[ExtendedKeyUsageOID.SERVER_AUTH]),
        "a CA certificate": forge(ca_key, ca_cert, ca=True),
        "CN of another gateway": forge(ca_key, ca_cert, cn="smartx:gateway:dev_qqqqqqqqqqqqqqqq"),
        "two names": forge(ca_key, ca_cert, sans=["smartx:gateway:" + GATEWAY_ID, "hub.lan"]),
        "no SAN": forge(ca_key, ca_cert, sans=[]),
        "another scheme": forge(ca_key, ca_cert, cn="smartx:device:" + GATEWAY_ID,
                                sans=["smartx:device:" + GATEWAY_ID]),
        "not a device id": forge(ca_key, ca_cert, cn="smartx:gateway:dev_X",
                                 sans=["smartx:gateway:dev_X"]),
        "garbage DER": b"\x30\x03\x02\x01\x00",
        "garbage PEM": b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        "a key": pki.private_key_pem(hub_pki["gw_key"]),
        "not bytes": 42,
    }
    for reason, cert in refused.items():
        with pytest.raises(GatewayCertError):
            gateway_id_from_cert(cert)
            pytest.fail("accepted %s" % reason)
    # A well-formed gateway certificate from another hub's CA names an id, but not for this hub.
    foreign_ca, foreign_pem, _ = other_ca(tmp_path)
    with open(foreign_pem, "rb") as handle:
        foreign = handle.read()
    assert gateway_id_from_cert(foreign) == GATEWAY_ID
    assert gateway_id_from_cert(foreign, foreign_ca) == GATEWAY_ID
    with pytest.raises(GatewayCertError, match="not issued by this hub"):
        gateway_id_from_cert(foreign, hub_pki["ca_pem"])
    for bad_id in ("dev_short", "hub_abcdefghijklmnop", "", None):
        with pytest.raises(GatewayCertError):
            gateway_pki.gateway_uri(bad_id)


# -- real TLS on loopback ----------------------------------------------------------------


def handshake(server_ctx, client_ctx, server_hostname="127.0.0.1"):
    """One TLS connection over loopback TCP; returns (server outcome, client outcome).

    The server outcome is the peer certificate's DER (None when none was presented) or the
    exception; the client outcome is "ok" after reading the server's reply, or the exception."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(5)
    port = listener.getsockname()[1]
    result = {}

    def serve():
        try:
            conn, _ = listener.accept()
        except OSError as exc:
            result["server"] = exc
            return
        conn.settimeout(5)
        try:
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                result["server"] = tls.getpeercert(binary_form=True)
                tls.sendall(b"hi")
        except (OSError, ssl.SSLError) as exc:
            result["server"] = exc

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            # TLS 1.3 finishes the client's handshake before the server has judged its
            # certificate: reading the server's reply is what shows the verdict.
            with client_ctx.wrap_socket(raw, server_hostname=server_hostname) as tls:
                result["client"] = "ok" if tls.recv(2) == b"hi" else "closed"
    except (OSError, ssl.SSLError) as exc:
        result["client"] = exc
    thread.join(10)
    listener.close()
    assert not thread.is_alive()
    return result["server"], result["client"]


def hub_server_ctx(hub_pki, client_certs=True):
    ctx = pki.server_tls_context(hub_pki["paths"]["server.pem"], hub_pki["paths"]["server.key"])
    if client_certs:
        gateway_pki.enable_gateway_client_certs(ctx, hub_pki["ca_pem"])
    return ctx


def test_gateway_identified_over_tls(hub_pki):
    client = gateway_pki.gateway_client_tls_context(
        hub_pki["ca_pem"], hub_pki["paths"]["gw.pem"], hub_pki["paths"]["gw.key"])
    server_side, client_side = handshake(hub_server_ctx(hub_pki), client)
    assert client_side == "ok"
    assert isinstance(server_side, bytes)
    assert gateway_id_from_cert(server_side, hub_pki["ca_pem"]) == GATEWAY_ID


def test_boards_without_a_certificate_still_connect(hub_pki):
    server_side, client_side = handshake(hub_server_ctx(hub_pki),
                                         pki.client_tls_context(hub_pki["ca_pem"]))
    assert client_side == "ok" and server_side is None


def test_certificates_the_hub_did_not_issue_for_a_gateway_are_refused(hub_pki, tmp_path):
    _, foreign_cert, foreign_key = other_ca(tmp_path)
    foreign = gateway_pki.gateway_client_tls_context(hub_pki["ca_pem"], foreign_cert,
                                                     foreign_key)
    # The hub's own server certificate presented as a client certificate: right CA, wrong usage.
    posing = gateway_pki.gateway_client_tls_context(
        hub_pki["ca_pem"], hub_pki["paths"]["server.pem"], hub_pki["paths"]["server.key"])
    for client, cause in ((foreign, "issuer"), (posing, "purpose")):
        server_side, client_side = handshake(hub_server_ctx(hub_pki), client)
        assert isinstance(server_side, ssl.SSLCertVerificationError), server_side
        assert cause in str(server_side).lower()
        assert client_side != "ok"


def test_a_gateway_certificate_cannot_pose_as_the_hub(hub_pki):
    """The CA now signs client certificates too: one must never serve TLS to a device."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(hub_pki["paths"]["gw.pem"], hub_pki["paths"]["gw.key"])
    device = pki.client_tls_context(hub_pki["ca_pem"])
    device.check_hostname = False  # even a device that skips the name check refuses it
    server_side, client_side = handshake(ctx, device)
    assert isinstance(client_side, ssl.SSLCertVerificationError), client_side
    assert "purpose" in str(client_side).lower()
    # Control: the same client accepts the hub's real server certificate.
    assert handshake(hub_server_ctx(hub_pki, client_certs=False), device)[1] == "ok"


# -- the relay rule ----------------------------------------------------------------------


def dev(device_id, kind="device", gateway_id=None, enabled=True):
    return Device(device_id, device_id, "es256", b"pem", None, enabled, 1, None, kind, gateway_id)


def test_gateway_refusal():
    gateway = dev("dev_gw", "gateway")
    assert gateway_pki.gateway_refusal("dev_gw", gateway) is None
    assert "not enrolled" in gateway_pki.gateway_refusal("dev_gw", None)
    assert "not a gateway" in gateway_pki.gateway_refusal("dev_b", dev("dev_b"))
    assert "disabled" in gateway_pki.gateway_refusal("dev_gw", dev("dev_gw", "gateway",
                                                                   enabled=False))


@pytest.mark.parametrize("device, via, allowed", [
    (dev("dev_b", gateway_id="dev_gw"), "dev_gw", True),    # its gateway relays it
    (dev("dev_b", gateway_id="dev_gw"), "dev_gw2", False),  # another gateway may not
    (dev("dev_b", gateway_id="dev_gw"), None, False),       # nor may it bypass its gateway
    (dev("dev_b"), None, True),                             # an unassigned board, directly
    (dev("dev_b"), "dev_gw", False),                        # no gateway was given it
    (dev("dev_gw", "gateway"), None, True),                 # a gateway's own session
    (dev("dev_gw", "gateway"), "dev_gw", True),             # ... over its certificate
    (dev("dev_gw", "gateway"), "dev_gw2", False),           # no gateway behind a gateway
])
def test_relay_refusal(device, via, allowed):
    reason = gateway_pki.relay_refusal(device, via)
    assert (reason is None) == allowed, reason
    if not allowed:
        assert device.id in reason
