"""The device credentials bundle: the file ``smartx-hub device add`` writes for a board.

It is a contract with the device SDK (docs/security.md, "Credentials bundle"). A JSON object,
written with mode 0600 because it holds the device's private key or secret:

    {"version": 1, "device_id": "dev_...", "name": str, "hub_id": "hub_...",
     "auth": "es256" | "eddsa" | "hs256",
     "secret_b64": str            (hs256 only: the shared secret, standard base64),
     "private_key_pem": str       (es256/eddsa when the hub generated the key; absent when the
                                   device made its own key and only its public key was enrolled),
     "client_cert_pem": str,      (gateways only, both or neither: the TLS client certificate
     "client_key_pem": str         the hub CA issued the gateway, and its P-256 PKCS#8 key;
                                   smartx_hub/gateway_pki.py)
     "ca_pem": str, "ca_fingerprint": "sha256:<hex>",
     "hub_host": str, "hub_port": int, "server_name": str}

``hub_host`` may be empty: the device then finds the hub by discovery (and still pins ``ca_pem``).

Rules: no other keys; a new field means a new version, unless it is optional and a reader
that ignores it loses nothing (the gateway fields: a board never needs them, and the device SDK
skips fields it does not use). ``ca_fingerprint`` must be the fingerprint of ``ca_pem``; a
private key must be PKCS#8 PEM of the kind ``auth`` names. A gateway's certificate must be a
gateway certificate (gateway_pki.gateway_id_from_cert) naming the bundle's ``device_id``,
issued by ``ca_pem``, and ``client_key_pem`` must be its key.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from smartx_hub.crypto import fsync_dir
from smartx_hub.gateway_pki import gateway_id_from_cert, key_matches_cert, load_certificate
from smartx_hub.pki import PKIError, ca_fingerprint, load_private_key_pem

BUNDLE_VERSION = 1
MAX_BUNDLE_BYTES = 64 * 1024
REQUIRED = ("version", "device_id", "name", "hub_id", "auth", "ca_pem", "ca_fingerprint",
            "hub_host", "hub_port", "server_name")
OPTIONAL = ("secret_b64", "private_key_pem", "client_cert_pem", "client_key_pem")
GATEWAY_FIELDS = ("client_cert_pem", "client_key_pem")
FIELD_ORDER = ("version", "device_id", "name", "hub_id", "auth", "secret_b64",
               "private_key_pem", "client_cert_pem", "client_key_pem", "ca_pem",
               "ca_fingerprint", "hub_host", "hub_port", "server_name")
MIN_SECRET_BYTES = 16

_DEVICE_ID = re.compile(r"^dev_[a-z0-9]{16}$")
_HUB_ID = re.compile(r"^hub_[a-z0-9]{16}$")


class BundleError(Exception):
    """A bundle is malformed, inconsistent, or cannot be read or written."""


def _text(bundle: dict, key: str) -> str:
    value = bundle[key]
    if not isinstance(value, str) or not value:
        raise BundleError("bundle field %r must be a non-empty string" % key)
    return value


def validate_bundle(bundle: Any) -> dict:
    """Check a bundle against the format; return it unchanged, or raise ``BundleError``."""
    if not isinstance(bundle, dict):
        raise BundleError("a bundle is a JSON object")
    unknown = sorted(set(bundle) - set(REQUIRED) - set(OPTIONAL))
    if unknown:
        raise BundleError("bundle has unknown fields: %s" % ", ".join(map(str, unknown)))
    missing = [key for key in REQUIRED if key not in bundle]
    if missing:
        raise BundleError("bundle lacks fields: %s" % ", ".join(missing))
    if type(bundle["version"]) is not int or bundle["version"] != BUNDLE_VERSION:
        raise BundleError("bundle version %r is not supported (expected %d)"
                          % (bundle["version"], BUNDLE_VERSION))
    for key in ("device_id", "name", "hub_id", "auth", "ca_pem", "ca_fingerprint", "server_name"):
        _text(bundle, key)
    if not isinstance(bundle["hub_host"], str):
        raise BundleError("bundle field 'hub_host' must be a string")
    if not _DEVICE_ID.match(bundle["device_id"]):
        raise BundleError("bundle device_id %r is not a device id" % bundle["device_id"])
    if not _HUB_ID.match(bundle["hub_id"]):
        raise BundleError("bundle hub_id %r is not a hub id" % bundle["hub_id"])
    port = bundle["hub_port"]
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        raise BundleError("bundle hub_port must be an integer in 1..65535")
    try:
        fingerprint = ca_fingerprint(bundle["ca_pem"].encode("ascii"))
    except (PKIError, UnicodeEncodeError):
        raise BundleError("bundle ca_pem is not a PEM certificate") from None
    if fingerprint != bundle["ca_fingerprint"]:
        raise BundleError("bundle ca_fingerprint does not match ca_pem")
    auth = bundle["auth"]
    if auth == "hs256":
        if "private_key_pem" in bundle:
            raise BundleError("an hs256 bundle carries a secret, not a private key")
        if "secret_b64" not in bundle:
            raise BundleError("an hs256 bundle needs secret_b64")
        try:
            secret = base64.b64decode(_text(bundle, "secret_b64"), validate=True)
        except (binascii.Error, ValueError):
            raise BundleError("bundle secret_b64 is not standard base64") from None
        if len(secret) < MIN_SECRET_BYTES:
            raise BundleError("bundle secret is shorter than %d bytes" % MIN_SECRET_BYTES)
    elif auth in ("es256", "eddsa"):
        if "secret_b64" in bundle:
            raise BundleError("an %s bundle carries no shared secret" % auth)
        if "private_key_pem" in bundle:
            try:
                key = load_private_key_pem(_text(bundle, "private_key_pem").encode("ascii"))
            except (PKIError, UnicodeEncodeError):
                raise BundleError("bundle private_key_pem is not a PEM private key") from None
            if auth == "es256" and not (isinstance(key, ec.EllipticCurvePrivateKey)
                                        and isinstance(key.curve, ec.SECP256R1)):
                raise BundleError("an es256 bundle needs a P-256 private key")
            if auth == "eddsa" and not isinstance(key, ed25519.Ed25519PrivateKey):
                raise BundleError("an eddsa bundle needs an Ed25519 private key")
    else:
        raise BundleError("bundle auth %r is not es256, eddsa or hs256" % auth)
    _validate_gateway_fields(bundle)
    return bundle


def is_gateway_bundle(bundle: dict) -> bool:
    """Whether the bundle is a gateway's (it carries a client certificate)."""
    return "client_cert_pem" in bundle


def _validate_gateway_fields(bundle: dict) -> None:
    present = [key for key in GATEWAY_FIELDS if key in bundle]
    if not present:
        return
    if len(present) != len(GATEWAY_FIELDS):
        raise BundleError("a gateway bundle carries both client_cert_pem and client_key_pem")
    try:
        cert = load_certificate(_text(bundle, "client_cert_pem").encode("ascii"))
        gateway_id = gateway_id_from_cert(cert, bundle["ca_pem"])
    except (PKIError, UnicodeEncodeError) as exc:
        raise BundleError("bundle client_cert_pem: %s" % exc) from None
    if gateway_id != bundle["device_id"]:
        raise BundleError("bundle client_cert_pem names gateway %s, not %s"
                          % (gateway_id, bundle["device_id"]))
    try:
        key = load_private_key_pem(_text(bundle, "client_key_pem").encode("ascii"))
    except (PKIError, UnicodeEncodeError):
        raise BundleError("bundle client_key_pem is not a PEM private key") from None
    if not key_matches_cert(key, cert):
        raise BundleError("bundle client_key_pem is not the P-256 key of client_cert_pem")


def encode_bundle(bundle: dict) -> bytes:
    """The bundle's file bytes (validated; fields in the documented order)."""
    validate_bundle(bundle)
    ordered = {key: bundle[key] for key in FIELD_ORDER if key in bundle}
    return (json.dumps(ordered, indent=2) + "\n").encode("utf-8")


def write_bundle(path: str, bundle: dict, overwrite: bool = False) -> None:
    """Write a bundle with mode 0600; refuse an existing file unless ``overwrite``."""
    data = encode_bundle(bundle)
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
    try:
        fd = os.open(path, flags | getattr(os, "O_NOFOLLOW", 0), 0o600)
    except FileExistsError:
        raise BundleError("%s already exists; not overwriting it" % path) from None
    except OSError as exc:
        raise BundleError("cannot write %s: %s" % (path, exc.strerror)) from None
    try:
        os.fchmod(fd, 0o600)  # an overwritten file keeps its old mode otherwise
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except OSError as exc:
        os.close(fd)
        try:
            os.unlink(path)
        except OSError:
            pass
        raise BundleError("cannot write %s: %s" % (path, exc.strerror)) from None
    os.close(fd)
    try:
        fsync_dir(os.path.dirname(os.path.abspath(path)))
    except OSError:
        pass  # some filesystems (a FAT card, say) cannot fsync a directory; the data is synced


def read_bundle(path: str) -> dict:
    """Read and validate a bundle file."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_BUNDLE_BYTES + 1)
    except OSError as exc:
        raise BundleError("cannot read %s: %s" % (path, exc.strerror)) from None
    if len(data) > MAX_BUNDLE_BYTES:
        raise BundleError("%s is larger than a bundle can be" % path)
    try:
        bundle = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise BundleError("%s is not JSON: %s" % (path, exc)) from None
    return validate_bundle(bundle)
