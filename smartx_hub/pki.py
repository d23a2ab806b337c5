"""The hub's own PKI: a CA that devices pin, the server certificate it signs, and TLS contexts.

Rules (docs/security.md, "PKI" and "TLS profile"):
- Everything X.509 comes from ``cryptography``; every key is ECDSA P-256.
- The CA: 10 years, ``basicConstraints CA:TRUE, pathlen:0`` (critical), ``keyUsage keyCertSign,
  cRLSign`` (critical). It signs only this hub's server certificates. Its private key is stored
  encrypted (``BestAvailableEncryption``) under a password derived by HKDF from the hub's "pki"
  data key, itself wrapped by the master key; the file is mode 0600.
- The server certificate: 2 years (under the 825 days Apple clients accept), SANs from the
  hub's host names (IP literals become IP SANs), EKU serverAuth, ``CA:FALSE``.
- A CA fingerprint is ``sha256:<hex of SHA-256 of the DER certificate>``: the value a device
  or a person compares, the same in the bundle, the CLI and the zeroconf TXT record.
- Server TLS follows Mozilla's "intermediate" profile: TLS 1.2 (ECDHE + AEAD suites only) and
  TLS 1.3; no compression, no renegotiation, the client's cipher order honoured.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import re
import ssl
from typing import Union

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_LIFETIME = datetime.timedelta(days=3650)
SERVER_LIFETIME = datetime.timedelta(days=730)
#: Certificates start this far in the past so a peer whose clock lags a little still accepts them.
BACKDATE = datetime.timedelta(hours=1)
DEFAULT_HOSTS = ("localhost", "127.0.0.1")

#: Mozilla "intermediate" TLS 1.2 suites, restricted to ECDHE (no DHE): AES-GCM and ChaCha20.
TLS12_CIPHERS = ":".join([
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
])

_DNS_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")

PrivateKey = ec.EllipticCurvePrivateKey


class PKIError(Exception):
    """A host name, certificate or key file is unusable."""


def _utc(now_ms: int) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(now_ms / 1000, tz=datetime.timezone.utc)


def parse_host(host: str) -> Union[x509.DNSName, x509.IPAddress]:
    """The SAN entry for a host: an IP SAN for an IPv4/IPv6 literal, else a DNS name."""
    if not isinstance(host, str) or not host:
        raise PKIError("a host name must not be empty")
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    name = host[:-1] if host.endswith(".") else host
    if len(name) > 253 or not all(_DNS_LABEL.match(label) for label in name.split(".")):
        raise PKIError("%r is neither an IP address nor a valid DNS name" % host)
    return x509.DNSName(name.lower())


def generate_key() -> PrivateKey:
    """A new ECDSA P-256 private key."""
    return ec.generate_private_key(ec.SECP256R1())


def create_ca(hub_id: str, now_ms: int) -> tuple[PrivateKey, x509.Certificate]:
    """Make the hub's CA key and self-signed certificate."""
    key = generate_key()
    name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SmartX HUB"),
        x509.NameAttribute(NameOID.COMMON_NAME, "SmartX HUB CA %s" % hub_id),
    ])
    start = _utc(now_ms) - BACKDATE
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(start + CA_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def create_server_cert(ca_key: PrivateKey, ca_cert: x509.Certificate, hosts: list[str],
                       now_ms: int) -> tuple[PrivateKey, x509.Certificate]:
    """Make a server key and a certificate for ``hosts`` signed by the CA."""
    if not hosts:
        raise PKIError("a server certificate needs at least one host name")
    sans = []
    for host in hosts:
        entry = parse_host(host)
        if entry not in sans:
            sans.append(entry)
    key = generate_key()
    public = key.public_key()
    start = _utc(now_ms) - BACKDATE
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0][:64])]))
        .issuer_name(ca_cert.subject).public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(start + SERVER_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def cert_pem(cert: x509.Certificate) -> bytes:
    """The certificate as PEM."""
    return cert.public_bytes(serialization.Encoding.PEM)


def ca_fingerprint(cert_pem_bytes: bytes) -> str:
    """``sha256:<hex>`` of the certificate's DER encoding."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem_bytes)
    except (ValueError, TypeError) as exc:
        raise PKIError("not a PEM certificate: %s" % exc) from None
    der = cert.public_bytes(serialization.Encoding.DER)
    return "sha256:" + hashlib.sha256(der).hexdigest()


def private_key_pem(key, password: bytes | None = None) -> bytes:
    """PKCS#8 PEM of a private key, encrypted with ``password`` when one is given."""
    encryption = (serialization.NoEncryption() if password is None
                  else serialization.BestAvailableEncryption(password))
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             encryption)


def load_private_key_pem(data: bytes, password: bytes | None = None):
    """Load a PEM private key; ``PKIError`` if it is malformed or the password is wrong."""
    try:
        return serialization.load_pem_private_key(data, password=password)
    except (ValueError, TypeError) as exc:
        raise PKIError("cannot load private key: %s" % exc) from None


def public_key_pem(key) -> bytes:
    """SubjectPublicKeyInfo PEM of a private or public key."""
    public = key.public_key() if hasattr(key, "public_key") else key
    return public.public_bytes(serialization.Encoding.PEM,
                               serialization.PublicFormat.SubjectPublicKeyInfo)


def server_tls_context(cert_path: str, key_path: str) -> ssl.SSLContext:
    """A server context on Mozilla's "intermediate" profile (see the module rules)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.maximum_version = ssl.TLSVersion.MAXIMUM_SUPPORTED  # TLS 1.3 on
    ctx.set_ciphers(TLS12_CIPHERS)  # TLS 1.3 suites are separate and all AEAD already
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    # Intermediate leaves the choice to the client (it knows whether it has AES hardware);
    # CPython's server contexts set this option by default, so clear it.
    ctx.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.verify_mode = ssl.CERT_NONE  # devices prove themselves by JWT, not client certificates
    try:
        ctx.load_cert_chain(cert_path, key_path)
    except (OSError, ssl.SSLError) as exc:
        raise PKIError("cannot load server certificate or key: %s" % exc) from None
    return ctx


def client_tls_context(ca_pem_bytes: bytes) -> ssl.SSLContext:
    """A client context that trusts only this hub's CA (what devices and tools should use)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(TLS12_CIPHERS)
    try:
        ctx.load_verify_locations(cadata=ca_pem_bytes.decode("ascii"))
    except (ssl.SSLError, UnicodeDecodeError, ValueError) as exc:
        raise PKIError("cannot load CA certificate: %s" % exc) from None
    return ctx
