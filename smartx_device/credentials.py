"""The credentials bundle a board carries: who it is, its key or secret, the hub CA it pins.

The file ``smartx-hub device add`` writes (docs/device-sdk.md, "Credentials bundle"): a JSON
object ``{"version": 1, "device_id", "name", "hub_id", "auth": "es256"|"eddsa"|"hs256",
"secret_b64" (hs256), "private_key_pem" (es256/eddsa, absent when the device keeps its own key
file), "ca_pem", "ca_fingerprint": "sha256:<hex>", "hub_host", "hub_port", "server_name"}``.
``load_credentials`` checks what the client relies on and raises ``CredentialError`` (one line,
the field at fault) for anything else; ``ca_fingerprint`` must match ``ca_pem``, so a bundle
edited by hand cannot pin a CA other than the one it names. ``hub_host`` may be empty or
absent: the client then discovers the hub (CPython). MicroPython subset.
"""

import binascii
import hashlib

from smartx_device.auth import CredentialError

BUNDLE_VERSION = 1
MAX_BUNDLE_BYTES = 65536
_PEM_BEGIN = "-----BEGIN CERTIFICATE-----"
_PEM_END = "-----END CERTIFICATE-----"


def pem_to_der(pem):
    """Return the DER bytes of the first certificate in ``pem`` text."""
    start = pem.find(_PEM_BEGIN)
    end = pem.find(_PEM_END, start + 1)
    if start < 0 or end < 0:
        raise CredentialError("ca_pem holds no PEM certificate")
    body = "".join(pem[start + len(_PEM_BEGIN):end].split())
    try:
        return binascii.a2b_base64(body)
    except (ValueError, binascii.Error):
        raise CredentialError("ca_pem is not valid base64")


def fingerprint_of(pem):
    """Return ``"sha256:<hex>"`` of the DER of the first certificate in ``pem``."""
    return "sha256:" + binascii.hexlify(hashlib.sha256(pem_to_der(pem)).digest()).decode()


class Credentials:
    """A checked bundle: the fields as attributes, ``secret`` as bytes, ``ca_der`` as bytes."""

    def __init__(self, bundle, private_key_pem=None):
        if not isinstance(bundle, dict):
            raise CredentialError("a credentials bundle is a JSON object")
        if bundle.get("version") != BUNDLE_VERSION:
            raise CredentialError("bundle version %r is not supported (expected %d)"
                                  % (bundle.get("version"), BUNDLE_VERSION))
        for key in ("device_id", "hub_id", "auth", "ca_pem"):
            if not isinstance(bundle.get(key), str) or not bundle[key]:
                raise CredentialError("bundle field %s must be non-empty text" % key)
        self.device_id = bundle["device_id"]
        self.name = bundle.get("name") or self.device_id
        self.hub_id = bundle["hub_id"]
        self.auth = bundle["auth"]
        self.ca_pem = bundle["ca_pem"]
        self.ca_der = pem_to_der(self.ca_pem)
        self.ca_fingerprint = bundle.get("ca_fingerprint")
        if self.ca_fingerprint is not None and self.ca_fingerprint != fingerprint_of(self.ca_pem):
            raise CredentialError("bundle ca_fingerprint does not match ca_pem")
        self.hub_host = bundle.get("hub_host") or None
        self.hub_port = bundle.get("hub_port")
        if self.hub_port is not None and (not isinstance(self.hub_port, int)
                                          or not 0 < self.hub_port < 65536):
            raise CredentialError("bundle hub_port must be an integer in 1..65535")
        self.server_name = bundle.get("server_name") or self.hub_host
        self.secret = None
        self.private_key_pem = private_key_pem or bundle.get("private_key_pem")
        if self.auth == "hs256":
            secret_b64 = bundle.get("secret_b64")
            if not isinstance(secret_b64, str) or not secret_b64:
                raise CredentialError("an hs256 bundle needs secret_b64")
            try:
                self.secret = binascii.a2b_base64(secret_b64)
            except (ValueError, binascii.Error):
                raise CredentialError("bundle secret_b64 is not base64")
        elif self.auth in ("es256", "eddsa"):
            if not self.private_key_pem:
                raise CredentialError("an %s bundle without private_key_pem needs the device's "
                                      "key file (private_key_path=)" % self.auth)
        else:
            raise CredentialError("bundle auth %r is not es256, eddsa or hs256" % (self.auth,))

    def __repr__(self):  # never print the key or the secret
        return "Credentials(device_id=%r, hub_id=%r, auth=%r)" % (self.device_id, self.hub_id,
                                                                  self.auth)


def _read_text(path, what):
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_BUNDLE_BYTES + 1)
    except OSError as error:
        raise CredentialError("cannot read the %s %s: %s" % (what, path, error))
    if len(data) > MAX_BUNDLE_BYTES:
        raise CredentialError("the %s %s is larger than %d bytes" % (what, path, MAX_BUNDLE_BYTES))
    try:
        return data.decode("utf-8")
    except UnicodeError:
        raise CredentialError("the %s %s is not UTF-8 text" % (what, path))


def load_credentials(path, private_key_path=None):
    """Read and check the bundle at ``path``; ``private_key_path`` names the device's own key
    file when only its public key was enrolled. Raises ``CredentialError``."""
    import json

    text = _read_text(path, "credentials bundle")
    try:
        bundle = json.loads(text)
    except ValueError:
        raise CredentialError("the credentials bundle %s is not JSON" % path)
    key_pem = None
    if private_key_path is not None:
        key_pem = _read_text(private_key_path, "private key file")
    return Credentials(bundle, key_pem)
