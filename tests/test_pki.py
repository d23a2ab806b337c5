"""The hub PKI (smartx_hub/pki.py) and the server TLS profile, with real handshakes on loopback."""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import re
import socket
import ssl
import stat
import threading
import warnings

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from smartx_hub import pki
from smartx_hub.state import init_hub, wall_clock_ms

# Certificates must be valid for the real handshakes below, so the hub is made "now".
NOW_MS = wall_clock_ms()


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    ctx = init_hub(str(tmp_path_factory.mktemp("pki") / "data"), now_ms=NOW_MS)
    yield ctx
    ctx.close()


def load_cert(path) -> x509.Certificate:
    with open(path, "rb") as handle:
        return x509.load_pem_x509_certificate(handle.read())


def when(ms):
    return datetime.datetime.fromtimestamp(ms / 1000, tz=datetime.timezone.utc)


# -- certificates ------------------------------------------------------------------------


def test_ca_certificate(hub):
    ca = load_cert(hub.ca_cert_path)
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)
    assert isinstance(ca.public_key().curve, ec.SECP256R1)
    bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca is True and bc.value.path_length == 0
    ku = ca.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and not ku.value.digital_signature
    lifetime = ca.not_valid_after_utc - ca.not_valid_before_utc
    assert lifetime == datetime.timedelta(days=3650)
    assert ca.not_valid_before_utc <= when(NOW_MS) < ca.not_valid_after_utc
    assert hub.hub_id in ca.subject.rfc4514_string()
    ca.verify_directly_issued_by(ca)  # self-signed


def test_server_certificate(hub):
    ca = load_cert(hub.ca_cert_path)
    server = load_cert(hub.server_cert_path)
    server.verify_directly_issued_by(ca)
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert server.not_valid_after_utc - server.not_valid_before_utc == datetime.timedelta(days=730)
    assert isinstance(server.public_key().curve, ec.SECP256R1)


def test_server_certificate_for_custom_hosts():
    ca_key, ca = pki.create_ca("hub_test", NOW_MS)
    _, cert = pki.create_server_cert(ca_key, ca, ["hub.example.lan", "10.0.0.5", "::1",
                                                  "HUB.example.lan"], NOW_MS)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["hub.example.lan"]  # case-folded, once
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.5"),
                                                        ipaddress.ip_address("::1")]


@pytest.mark.parametrize("bad", ["", "bad host", "-x.lan", "a..b", "x" * 64 + ".lan", "ü.lan",
                                 "a/b"])
def test_bad_host_names_are_refused(bad):
    with pytest.raises(pki.PKIError):
        pki.parse_host(bad)


def test_ca_fingerprint(hub):
    der = load_cert(hub.ca_cert_path).public_bytes(serialization.Encoding.DER)
    assert hub.ca_fingerprint == "sha256:" + hashlib.sha256(der).hexdigest()
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", pki.ca_fingerprint(hub.ca_cert_pem))
    with pytest.raises(pki.PKIError):
        pki.ca_fingerprint(b"not a certificate")


def test_key_files_modes_and_encryption(hub):
    db = hub.store.path
    for path in (hub.ca_key_path, hub.server_key_path, hub.master_key_path, db, db + "-wal",
                 db + "-shm"):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path
    assert stat.S_IMODE(os.stat(hub.data_dir).st_mode) == 0o700
    with open(hub.ca_key_path, "rb") as handle:
        encrypted = handle.read()
    assert b"ENCRYPTED PRIVATE KEY" in encrypted
    with pytest.raises(pki.PKIError):
        pki.load_private_key_pem(encrypted)  # no password: refused
    with pytest.raises(pki.PKIError):
        pki.load_private_key_pem(encrypted, b"wrong password")
    ca_key = hub.load_ca_key()
    assert pki.public_key_pem(ca_key) == pki.public_key_pem(load_cert(hub.ca_cert_path).public_key())
    with open(hub.server_key_path, "rb") as handle:
        assert pki.load_private_key_pem(handle.read()) is not None  # the ssl module must load it


# -- TLS profile -------------------------------------------------------------------------


def handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext,
              server_name: str = "localhost"):
    """One real handshake on loopback; returns (client result, server result), each the
    negotiated (version, cipher) or the exception raised."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(5)
    server_result = {}

    def serve():
        try:
            conn, _ = listener.accept()
        except OSError as exc:  # pragma: no cover - the client never came
            server_result["r"] = exc
            return
        conn.settimeout(5)
        try:
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                server_result["r"] = (tls.version(), tls.cipher()[0])
                tls.recv(1)
        except (ssl.SSLError, OSError) as exc:
            server_result["r"] = exc
            conn.close()

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        raw = socket.create_connection(listener.getsockname(), timeout=5)
        try:
            with client_ctx.wrap_socket(raw, server_hostname=server_name) as tls:
                client_result = (tls.version(), tls.cipher()[0])
        except (ssl.SSLError, OSError) as exc:
            client_result = exc
            raw.close()
    finally:
        thread.join(10)
        listener.close()
    return client_result, server_result.get("r")


def lenient_client(maximum=None, ciphers=None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        if maximum is not None:
            ctx.minimum_version = ssl.TLSVersion.TLSv1
            ctx.maximum_version = maximum
    if ciphers:
        ctx.set_ciphers(ciphers)
    return ctx


def lenient_server(hub) -> ssl.SSLContext:
    """A server that accepts old protocols: the control proving the old clients can connect."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ssl.TLSVersion.TLSv1
    ctx.set_ciphers("ALL:@SECLEVEL=0")
    ctx.load_cert_chain(hub.server_cert_path, hub.server_key_path)
    return ctx


@pytest.mark.parametrize("server_name", ["localhost", "127.0.0.1"])
def test_pinned_client_completes_tls13(hub, server_name):
    client, server = handshake(hub.device_tls_context(), hub.client_tls_context(), server_name)
    assert client[0] == "TLSv1.3", client
    assert server[0] == "TLSv1.3"


def test_tls12_aead_client_is_accepted(hub):
    client_ctx = hub.client_tls_context()
    client_ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    client_ctx.set_ciphers("ECDHE-ECDSA-CHACHA20-POLY1305")
    client, _ = handshake(hub.api_tls_context(), client_ctx)
    assert client == ("TLSv1.2", "ECDHE-ECDSA-CHACHA20-POLY1305")


def test_client_cipher_preference_is_honoured(hub):
    client_ctx = hub.client_tls_context()
    client_ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    for first in ("ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-ECDSA-CHACHA20-POLY1305"):
        others = [c for c in pki.TLS12_CIPHERS.split(":") if c != first]
        client_ctx.set_ciphers(":".join([first] + others))
        client, _ = handshake(hub.device_tls_context(), client_ctx)
        assert client == ("TLSv1.2", first)


def test_tls11_client_is_refused(hub):
    old = lenient_client(maximum=ssl.TLSVersion.TLSv1_1, ciphers="ALL:@SECLEVEL=0")
    control, _ = handshake(lenient_server(hub), old)
    assert control[0] == "TLSv1.1", control  # the client really can speak TLS 1.1
    client, server = handshake(hub.device_tls_context(), old)
    assert isinstance(client, ssl.SSLError), client
    assert isinstance(server, ssl.SSLError) and "protocol" in str(server).lower(), server


def test_tls12_cbc_only_client_is_refused(hub):
    cbc = lenient_client(maximum=ssl.TLSVersion.TLSv1_2, ciphers="ECDHE-ECDSA-AES128-SHA")
    control, _ = handshake(lenient_server(hub), cbc)
    assert control == ("TLSv1.2", "ECDHE-ECDSA-AES128-SHA"), control
    client, server = handshake(hub.device_tls_context(), cbc)
    assert isinstance(client, ssl.SSLError), client
    assert isinstance(server, ssl.SSLError) and "cipher" in str(server).lower(), server


def test_other_hubs_ca_is_not_trusted(hub, tmp_path):
    other = init_hub(str(tmp_path / "other"), now_ms=NOW_MS)
    try:
        client, _ = handshake(hub.device_tls_context(), other.client_tls_context())
    finally:
        other.close()
    assert isinstance(client, ssl.SSLCertVerificationError), client


def test_profile_options(hub):
    ctx = hub.device_tls_context()
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.options & ssl.OP_NO_COMPRESSION
    assert ctx.options & ssl.OP_NO_RENEGOTIATION
    assert not ctx.options & ssl.OP_CIPHER_SERVER_PREFERENCE
    tls12 = [c for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.2"]
    assert tls12 and all(c["kea"] == "kx-ecdhe" and c["aead"] for c in tls12)
    assert {c["name"] for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.3"}
