"""A gateway's identity: the TLS client certificate the hub CA issues it, and what it may relay.

Rules (docs/security.md, "Gateways"):
- A gateway is a device record of kind "gateway". ``smartx-hub device add NAME --gateway``
  issues it a P-256 key and a client certificate signed by the hub CA: ``CA:FALSE``,
  ``keyUsage digitalSignature`` (critical), ``extendedKeyUsage clientAuth`` only, and its
  identity twice: the subject CN and the one SAN, a URI, both ``smartx:gateway:<device id>``.
- The certificate names the gateway; it proves nothing about a board. Every board behind a
  gateway still answers the hub's challenge with its own JWT (verified end to end), so the
  certificate only decides *which* connections may carry a board's session:
  ``relay_refusal`` is that rule, ``gateway_refusal`` the check of the gateway's own record.
- Only clientAuth: a gateway's certificate can never serve TLS to a device as if it were the
  hub (clients check serverAuth), and the hub's server certificate can never pass as a
  gateway (``gateway_id_from_cert`` requires clientAuth and the URI).
- A certificate is a credential only while its record is: a disabled, removed or re-enrolled
  gateway (a new enrolment gets a new id) is refused by ``gateway_refusal``.
"""

from __future__ import annotations

import datetime
import re
import ssl
from typing import Optional, Union

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from smartx_hub.pki import BACKDATE, PKIError, PrivateKey, client_tls_context, generate_key
from smartx_hub.store import Device

#: The scheme and role prefix of a gateway's identity (CN and SAN URI).
GATEWAY_URI_PREFIX = "smartx:gateway:"
#: Like the server certificate: 2 years. Renewing means enrolling the gateway again.
GATEWAY_CERT_LIFETIME = datetime.timedelta(days=730)

#: The device id shape the bundle accepts (smartx_hub/bundle.py).
_DEVICE_ID = re.compile(r"^dev_[a-z0-9]{16}$")

CertificateInput = Union[x509.Certificate, bytes, str]


class GatewayCertError(PKIError):
    """A certificate is not a valid gateway certificate of this hub."""


def gateway_uri(device_id: str) -> str:
    """The identity a gateway's certificate carries: ``smartx:gateway:<device id>``."""
    if not isinstance(device_id, str) or not _DEVICE_ID.match(device_id):
        raise GatewayCertError("%r is not a device id" % (device_id,))
    return GATEWAY_URI_PREFIX + device_id


def _utc(now_ms: int) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(now_ms / 1000, tz=datetime.timezone.utc)


def create_gateway_cert(ca_key: PrivateKey, ca_cert: x509.Certificate, device_id: str,
                        now_ms: int) -> tuple[PrivateKey, x509.Certificate]:
    """Make a gateway's P-256 key and its client certificate signed by the hub CA."""
    identity = gateway_uri(device_id)
    key = generate_key()
    public = key.public_key()
    start = _utc(now_ms) - BACKDATE
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity)]))
        .issuer_name(ca_cert.subject).public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(start + GATEWAY_CERT_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity)]),
                       critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def load_certificate(data: CertificateInput) -> x509.Certificate:
    """A certificate from an object, PEM (bytes or text) or DER bytes; ``GatewayCertError``."""
    if isinstance(data, x509.Certificate):
        return data
    try:
        if isinstance(data, str):
            return x509.load_pem_x509_certificate(data.encode("ascii"))
        if isinstance(data, (bytes, bytearray)):
            raw = bytes(data)
            if raw.lstrip().startswith(b"-----BEGIN"):
                return x509.load_pem_x509_certificate(raw)
            return x509.load_der_x509_certificate(raw)
    except (ValueError, TypeError, UnicodeEncodeError) as exc:
        raise GatewayCertError("not a certificate: %s" % exc) from None
    raise GatewayCertError("not a certificate: %s" % type(data).__name__)


def gateway_id_from_cert(cert: CertificateInput,
                         ca_cert: Optional[CertificateInput] = None) -> str:
    """The gateway device id a client certificate names, after checking it is a gateway
    certificate (clientAuth, not a CA, CN and the single URI SAN agree); with ``ca_cert``,
    also that this CA signed it. Raises ``GatewayCertError``.

    The listener passes the TLS object's ``getpeercert(binary_form=True)``: OpenSSL has already
    checked the chain and validity period; this checks what makes it a *gateway* certificate."""
    cert = load_certificate(cert)
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        raise GatewayCertError("not a gateway certificate: it lacks extendedKeyUsage,"
                               " subjectAltName or basicConstraints") from None
    except ValueError as exc:  # a malformed extension
        raise GatewayCertError("not a gateway certificate: %s" % exc) from None
    if constraints.ca:
        raise GatewayCertError("not a gateway certificate: it is a CA")
    if ExtendedKeyUsageOID.CLIENT_AUTH not in eku:
        raise GatewayCertError("not a gateway certificate: no clientAuth usage")
    uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1 or len(list(sans)) != 1 or not uris[0].startswith(GATEWAY_URI_PREFIX):
        raise GatewayCertError("not a gateway certificate: its only name must be a %s URI"
                               % GATEWAY_URI_PREFIX)
    device_id = uris[0][len(GATEWAY_URI_PREFIX):]
    if not _DEVICE_ID.match(device_id):
        raise GatewayCertError("not a gateway certificate: %r names no device id" % uris[0])
    common_names = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if common_names != [uris[0]]:
        raise GatewayCertError("not a gateway certificate: subject CN differs from its URI")
    if ca_cert is not None:
        ca = load_certificate(ca_cert)
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            raise GatewayCertError("the gateway certificate was not issued by this hub's CA") \
                from None
    return device_id


def gateway_refusal(gateway_id: str, gateway: Optional[Device]) -> Optional[str]:
    """Why a connection presenting ``gateway_id``'s certificate is refused, or None.

    ``gateway`` is the store's record for that id (None if there is none)."""
    if gateway is None:
        return "gateway %s is not enrolled (removed?)" % gateway_id
    if gateway.kind != "gateway":
        return "device %s is not a gateway" % gateway_id
    if not gateway.enabled:
        return "gateway %s is disabled" % gateway_id
    return None


def relay_refusal(device: Device, via_gateway_id: Optional[str]) -> Optional[str]:
    """Why ``device`` may not hold a session on this connection, or None.

    ``via_gateway_id`` is the gateway whose certificate the connection presented (checked
    with ``gateway_refusal``), or None for a connection without one. The rule: a board
    assigned to a gateway is accepted only through that gateway; an unassigned board only
    without one; a gateway only as itself (through its own certificate, or directly)."""
    if device.kind == "gateway":
        if via_gateway_id is None or via_gateway_id == device.id:
            return None
        return "gateway %s cannot be relayed by gateway %s" % (device.id, via_gateway_id)
    if device.gateway_id == via_gateway_id:
        return None
    if via_gateway_id is None:
        return "device %s is assigned to gateway %s and accepted only through it" % (
            device.id, device.gateway_id)
    return "gateway %s was not given device %s" % (via_gateway_id, device.id)


def enable_gateway_client_certs(ctx: ssl.SSLContext, ca_pem: bytes) -> None:
    """Let a server context accept (not require) client certificates from this hub's CA.

    Boards and tools without a certificate still connect; a presented certificate that does
    not chain to the CA, or lacks clientAuth, fails the handshake (OpenSSL's purpose check)."""
    try:
        ctx.load_verify_locations(cadata=ca_pem.decode("ascii"))
    except (ssl.SSLError, UnicodeDecodeError, ValueError) as exc:
        raise PKIError("cannot load CA certificate: %s" % exc) from None
    ctx.verify_mode = ssl.CERT_OPTIONAL


def gateway_client_tls_context(ca_pem: bytes, cert_path: str, key_path: str) -> ssl.SSLContext:
    """A client context for a gateway: trusts only the hub CA, presents its certificate.

    (``ssl`` loads a certificate chain only from files: write the bundle's ``client_cert_pem``
    and ``client_key_pem`` to files of mode 0600 first.)"""
    ctx = client_tls_context(ca_pem)
    try:
        ctx.load_cert_chain(cert_path, key_path)
    except (OSError, ssl.SSLError) as exc:
        raise PKIError("cannot load gateway certificate or key: %s" % exc) from None
    return ctx


def key_matches_cert(key: object, cert: x509.Certificate) -> bool:
    """Whether ``key`` is the P-256 private key of ``cert``."""
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        return False
    public = cert.public_key()
    return isinstance(public, ec.EllipticCurvePublicKey) and \
        public.public_numbers() == key.public_key().public_numbers()
