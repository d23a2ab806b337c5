"""Answering the hub's challenge: the device JWT, signed with the device's own key.

Contract (docs/device-sdk.md, "Device JWT"): header ``{"alg", "typ": "sx-device+jwt"}``;
claims in this order ``{"sub": device_id, "aud": hub_id, "iat": hub_time_s, "exp": iat + 300,
"nonce": base64url(nonce)}``, where ``hub_time_s`` is the challenge's hub time in seconds, so
a board with no clock still makes a token the hub accepts.

On CPython every algorithm goes through PyJWT (ES256, EdDSA, HS256). Where PyJWT cannot be
imported (MicroPython) only HS256 is possible, through ``smartx_device.jwt``, whose output is
byte-identical to PyJWT's. MicroPython subset; PyJWT and cryptography are imported lazily.
"""

import sys

from smartx_device import jwt as small_jwt

ALGORITHMS = {"es256": "ES256", "eddsa": "EdDSA", "hs256": "HS256"}


class CredentialError(Exception):
    """The device's key or secret is missing, malformed, or of the wrong kind for its auth."""


def claims_for(device_id, hub_id, hub_time_ms, nonce):
    """Return the device JWT claims for a challenge, in the contract's order."""
    iat = hub_time_ms // 1000
    return {"sub": device_id, "aud": hub_id, "iat": iat, "exp": iat + small_jwt.TOKEN_LIFETIME_S,
            "nonce": small_jwt.b64url(nonce)}


class Signer:
    """Makes the device JWT for a challenge: ``sign(device_id, challenge)`` -> token text."""

    def __init__(self, auth, secret=None, private_key_pem=None):
        if auth not in ALGORITHMS:
            raise CredentialError("auth must be es256, eddsa or hs256, not %r" % (auth,))
        self.auth = auth
        self.algorithm = ALGORITHMS[auth]
        self._secret = None
        self._key = None
        pyjwt = None
        if sys.implementation.name != "micropython":
            # micropython-lib ships another module named jwt: only CPython gets PyJWT.
            try:
                import jwt as pyjwt
            except ImportError:
                pyjwt = None
        self._pyjwt = pyjwt
        if auth == "hs256":
            if not isinstance(secret, (bytes, bytearray)) or not secret:
                raise CredentialError("an hs256 device needs its secret")
            self._secret = bytes(secret)
        else:
            if pyjwt is None:
                raise CredentialError("%s needs PyJWT; small boards use hs256" % auth)
            if not private_key_pem:
                raise CredentialError("an %s device needs its private key (bundle or key file)"
                                      % auth)
            self._key = _load_private_key(auth, private_key_pem)

    def sign(self, device_id, challenge):
        """Return the JWT answering ``challenge`` (an AuthChallenge message)."""
        if self._pyjwt is None:
            return small_jwt.device_token(self._secret, device_id, challenge.hub_id,
                                          challenge.hub_time_ms, challenge.nonce)
        claims = claims_for(device_id, challenge.hub_id, challenge.hub_time_ms, challenge.nonce)
        if self._key is not None:
            return self._pyjwt.encode(claims, self._key, algorithm=self.algorithm,
                                      headers={"typ": small_jwt.TOKEN_TYPE})
        import warnings

        with warnings.catch_warnings():
            # PyJWT warns below 32-byte HMAC keys; the hub chose this secret's length, and a
            # warning on every handshake would teach users to ignore warnings.
            warnings.simplefilter("ignore")
            return self._pyjwt.encode(claims, self._secret, algorithm=self.algorithm,
                                      headers={"typ": small_jwt.TOKEN_TYPE})


def _load_private_key(auth, private_key_pem):
    """Load a PEM private key with cryptography and check it is the kind ``auth`` names."""
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    if isinstance(private_key_pem, str):
        private_key_pem = private_key_pem.encode("ascii")
    try:
        key = load_pem_private_key(private_key_pem, password=None)
    except (ValueError, TypeError) as error:
        raise CredentialError("the private key is not an unencrypted PEM key: %s" % error)
    if auth == "es256" and not (isinstance(key, ec.EllipticCurvePrivateKey)
                                and isinstance(key.curve, ec.SECP256R1)):
        raise CredentialError("an es256 device needs a P-256 private key")
    if auth == "eddsa" and not isinstance(key, ed25519.Ed25519PrivateKey):
        raise CredentialError("an eddsa device needs an Ed25519 private key")
    return key
