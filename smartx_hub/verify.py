"""Device verification: the JWT a device answers the hub's challenge with (docs/security.md,
"Device verification").

The token (the device SDK signs it): header ``{"alg": ES256|EdDSA|HS256, "typ":
"sx-device+jwt"}``; claims ``sub`` (device id), ``aud`` (hub id), ``iat`` and ``exp`` (seconds,
from the hub's time in the challenge), ``nonce`` (base64url of the challenge nonce, unpadded).

Rules:
- Verified with PyJWT against the key enrolled for the device. The algorithm is fixed by the
  device's enrolment (``es256`` -> ES256, ``eddsa`` -> EdDSA, ``hs256`` -> HS256 with its secret)
  and never read from the header: ``alg: none`` and HS256 signed with an ES256 device's public
  key both fail as a wrong algorithm.
- Required claims sub/aud/iat/exp/nonce; ``typ`` must be ``sx-device+jwt``; leeway 60 s; the
  lifetime ``exp - iat`` at most 3600 s; ``sub`` must be the device id of the Hello; the nonce
  must be this connection's challenge nonce, and a nonce answers once (remembered until the
  token that used it has expired). ``jku``/``x5u``/``jwk``/``kid`` are never read; any ``crit``
  header is refused (RFC 7515 4.1.11: we understand no extension).
- Refusal reasons: an unknown device -> CLOSE_UNKNOWN_DEVICE; an expired token ->
  CLOSE_TOKEN_EXPIRED; a disabled device (checked after the signature, so only a key holder
  learns it) -> CLOSE_DEVICE_DISABLED; everything else -> CLOSE_BAD_CREDENTIALS.
- Times against the injected ``now_ms``, never PyJWT's own clock. Nothing here logs a token,
  and no error message contains one.
"""

from __future__ import annotations

import base64
import hmac
import threading
from typing import Any, Optional

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from smartx_device.messages import MAX_TOKEN_LENGTH
from smartx_device.reasons import (CLOSE_BAD_CREDENTIALS, CLOSE_DEVICE_DISABLED,
                                   CLOSE_TOKEN_EXPIRED, CLOSE_UNKNOWN_DEVICE)
from smartx_hub.store import Device, Store

TOKEN_TYP = "sx-device+jwt"
ALGORITHMS = {"es256": "ES256", "eddsa": "EdDSA", "hs256": "HS256"}
REQUIRED_CLAIMS = ["sub", "aud", "iat", "exp", "nonce"]
LEEWAY_S = 60
MAX_LIFETIME_S = 3600
#: Nonces remembered at once; past it the soonest expiries go first (each was a fresh random
#: nonce bound to one connection, so this is defence in depth, not the replay check itself).
MAX_REMEMBERED_NONCES = 1_000_000

_KEY_TYPES = {"es256": ec.EllipticCurvePublicKey, "eddsa": ed25519.Ed25519PublicKey}


class VerificationError(Exception):
    """A device is refused: ``reason`` is the close reason, ``detail`` what to tell the device,
    ``cause`` what to log (never the token)."""

    def __init__(self, reason: int, detail: str, cause: str = "") -> None:
        super().__init__(cause or detail)
        self.reason = reason
        self.detail = detail
        self.cause = cause or detail


def _bad(cause: str) -> VerificationError:
    # One detail for every bad-credentials cause: the device learns nothing it could probe with.
    return VerificationError(CLOSE_BAD_CREDENTIALS, "credentials not accepted", cause)


def nonce_claim(nonce: bytes) -> str:
    """The ``nonce`` claim for a challenge nonce: base64url without padding."""
    return base64.urlsafe_b64encode(nonce).rstrip(b"=").decode("ascii")


class NonceCache:
    """Nonces that have answered a challenge, each remembered until its token expires.

    Kept in sets by expiry minute: about 70 bytes a nonce (its first 16 bytes: the hub's nonces
    are 32 random bytes, so 128 bits still never collide), and expiry drops whole sets."""

    BUCKET_MS = 60_000
    KEY_BYTES = 16

    def __init__(self, max_entries: int = MAX_REMEMBERED_NONCES) -> None:
        self._max = max_entries
        self._buckets: dict[int, set] = {}
        self._count = 0
        self._lock = threading.Lock()

    def use(self, nonce: bytes, until_ms: int, now_ms: int) -> bool:
        """Mark ``nonce`` used until ``until_ms``; False if it was already used."""
        key = bytes(nonce[:self.KEY_BYTES])
        with self._lock:
            self._expire(now_ms)
            for bucket in self._buckets.values():
                if key in bucket:
                    return False
            # Rounded up: a nonce is forgotten at most one bucket width late, never early.
            index = -(-until_ms // self.BUCKET_MS)
            self._buckets.setdefault(index, set()).add(key)
            self._count += 1
            while self._count > self._max and self._buckets:
                oldest = min(self._buckets)
                self._count -= len(self._buckets.pop(oldest))
            return True

    def _expire(self, now_ms: int) -> None:
        for index in [i for i in self._buckets if i * self.BUCKET_MS <= now_ms]:
            self._count -= len(self._buckets.pop(index))

    def __len__(self) -> int:
        return self._count


class DeviceVerifier:
    """Checks device tokens against the store's registry; safe to call from several threads."""

    def __init__(self, store: Store, hub_id: str, nonces: Optional[NonceCache] = None) -> None:
        self._store = store
        self.hub_id = hub_id
        self.nonces = nonces if nonces is not None else NonceCache()

    def verify(self, device_id: str, token: str, nonce: bytes, now_ms: int) -> Device:
        """Return the device ``token`` proves to be, or raise ``VerificationError``."""
        if not isinstance(token, str) or not 0 < len(token) <= MAX_TOKEN_LENGTH:
            raise _bad("token missing or too long")
        device = self._store.get_device(device_id)
        try:
            claims = self._signed_claims(device, token)
        except VerificationError:
            # The contract checks the header before anything else. A good token's header is
            # checked once, from what PyJWT parsed while verifying it; only a refusal parses it
            # again here, so that a header fault still names itself first (not, say, as an
            # unknown device).
            _check_header(_unverified_header(token))
            raise
        iat, exp = claims.get("iat"), claims.get("exp")
        if not _is_int(iat) or not _is_int(exp):
            raise _bad("iat and exp must be integers")
        if claims.get("sub") != device_id:
            raise _bad("subject is not the device of the Hello")
        presented = claims.get("nonce")
        expected = nonce_claim(nonce)
        if not isinstance(presented, str) or not hmac.compare_digest(
                presented.encode("utf-8", "replace"), expected.encode("ascii")):
            raise _bad("nonce is not this connection's challenge")
        if exp < iat or exp - iat > MAX_LIFETIME_S:
            raise _bad("lifetime over %d s" % MAX_LIFETIME_S)
        now_s = now_ms / 1000.0
        if iat > now_s + LEEWAY_S:
            raise _bad("token issued in the future")
        if exp <= now_s - LEEWAY_S:
            raise VerificationError(CLOSE_TOKEN_EXPIRED, "token expired", "token expired")
        if not self.nonces.use(nonce, (exp + LEEWAY_S) * 1000, now_ms):
            raise _bad("nonce already answered")
        if not device.enabled:
            raise VerificationError(CLOSE_DEVICE_DISABLED, "device disabled", "device disabled")
        return device

    def _signed_claims(self, device: Optional[Device], token: str) -> dict:
        """The claims of ``token``, its signature verified with ``device``'s key and algorithm,
        its header checked; ``VerificationError`` otherwise."""
        if device is None:
            raise VerificationError(CLOSE_UNKNOWN_DEVICE, "unknown device", "unknown device")
        algorithm = ALGORITHMS.get(device.auth)
        if algorithm is None:
            raise _bad("device has unknown auth kind %r" % (device.auth,))
        key = self._key_for(device)
        try:
            # One parse of the token: decode_complete hands back the header it verified.
            decoded = jwt.decode_complete(
                token, key, algorithms=[algorithm], audience=self.hub_id,
                # Times are checked by ``verify`` against the injected clock, not PyJWT's.
                options={"require": REQUIRED_CLAIMS, "verify_exp": False, "verify_iat": False,
                         "verify_nbf": False, "strict_aud": True},
            )
        except jwt.InvalidAlgorithmError:
            raise _bad("algorithm is not the device's") from None
        except jwt.InvalidAudienceError:
            raise _bad("wrong audience") from None
        except jwt.MissingRequiredClaimError as exc:
            raise _bad("missing claim %s" % exc.claim) from None
        except (jwt.PyJWTError, ValueError, TypeError):
            raise _bad("signature or claims not valid") from None
        _check_header(decoded["header"])
        return decoded["payload"]

    def _key_for(self, device: Device) -> Any:
        # Parsed per verification on purpose: parsing takes ~10 us next to ~80 us for the
        # signature, while a cached key object holds ~2 KB per device for as long as it lives.
        if device.auth == "hs256":
            if not device.secret:
                raise _bad("device has no secret")
            return bytes(device.secret)
        try:
            key = load_pem_public_key(device.public_key_pem or b"")
        except (ValueError, TypeError):
            raise _bad("device public key does not load") from None
        if not isinstance(key, _KEY_TYPES[device.auth]):
            raise _bad("device public key is not of its auth kind")
        if isinstance(key, ec.EllipticCurvePublicKey) and not isinstance(key.curve, ec.SECP256R1):
            raise _bad("ES256 needs a P-256 key")
        return key


def _unverified_header(token: str) -> dict:
    try:
        header = jwt.get_unverified_header(token)
    except (jwt.PyJWTError, ValueError, TypeError):
        raise _bad("malformed token") from None
    return header


def _check_header(header: dict) -> None:
    if header.get("typ") != TOKEN_TYP:
        raise _bad("wrong token type")
    if "crit" in header:
        raise _bad("critical header extension")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
