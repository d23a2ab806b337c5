"""API tokens: issue them, seal their scope, verify them on every request.

Rules (docs/api.md, "Tokens"; docs/security.md, "API tokens and accounts"):
- A token is ``"sxh_" + <JWS compact>``: ES256, header ``typ: sx-api+jwt`` and ``kid``; claims
  ``iss`` (hub id), ``aud`` (``smartx-api:<hub id>``), ``sub`` (user id), ``jti``, ``iat``,
  ``exp`` and ``scp``. The prefix lets secret scanners find a leaked token.
- ``scp`` is the scope sealed with AES-256-GCM under the hub's scope key, additional data = the
  jti: a holder can neither read it nor move it to another token.
- The hub keeps only the SHA-256 of the whole token string and its last four characters (the
  hint). Verification requires the hash to match the stored record, so a token whose record is
  gone, or a re-encoded token (ECDSA signatures are malleable), fails even with a valid signature.
- Verification order, each failure a ``TokenError`` (HTTP 401): length, prefix, header (``typ``,
  ``alg`` in the fixed allowlist, no ``crit``, known ``kid``; ``jku``/``x5u``/``jwk`` are never
  read), signature and required claims (PyJWT), times against the injected clock (leeway 60 s),
  the sealed scope, then the store: hash, owner, revoked, expired, the owner's "revoke all" mark.
- A token never grants more than the one that creates it (``check_grant``): scopes, devices and
  lifetime can only shrink.
- Nothing here logs a token, and no exception message contains one.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import re
import secrets
import threading
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import jwt
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from smartx_hub.store import Store, TokenRecord, User

SCOPES = (
    "devices:read",
    "devices:write",
    "telemetry:read",
    "commands:read",
    "commands:write",
    "state:read",
    "state:write",
    "tokens:read",
    "tokens:write",
    "audit:read",
)
ALL_SCOPES = frozenset(SCOPES)

TOKEN_PREFIX = "sxh_"
TOKEN_TYP = "sx-api+jwt"
ALGORITHMS = ["ES256"]  # fixed: never taken from the token's header
REQUIRED_CLAIMS = ["iss", "aud", "sub", "jti", "iat", "exp", "scp"]
LEEWAY_S = 60
MAX_TOKEN_CHARS = 4096
HINT_CHARS = 4
MAX_TOKEN_DEVICES = 32
MAX_DEVICE_ID_CHARS = 64
MAX_TOKEN_NAME_CHARS = 64
MIN_EXPIRY_MS = 60_000
DEFAULT_EXPIRY_MS = 90 * 86_400_000
MAX_EXPIRY_MS = 365 * 86_400_000
TOUCH_INTERVAL_MS = 60_000  # last-used time is written at most once a minute per token
_SCOPE_NONCE_BYTES = 12
_MAX_SEALED_CHARS = 3072
_DURATION_RE = re.compile(r"^([1-9][0-9]{0,6})([smhd])$")
_DURATION_UNIT_MS = {"s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


class TokenError(Exception):
    """A presented token is not accepted (HTTP 401). ``code`` is the API error code."""

    def __init__(self, detail: str, code: str = "invalid_token") -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


class GrantError(Exception):
    """A token may not be created with what was asked: more than the creator holds (HTTP 403)."""


class TokenRequestError(ValueError):
    """A token request is malformed: unknown scope, bad lifetime, too many devices (HTTP 422)."""


class UnknownDeviceError(TokenRequestError):
    """A token request names a device the hub does not have (HTTP 404)."""


@dataclass(frozen=True)
class Principal:
    """Who is calling, and what they may do: a verified token or a dashboard session."""

    user_id: str
    username: str
    scopes: frozenset
    devices: Optional[frozenset]  # None: every device
    token_id: Optional[str] = None  # None for a dashboard session
    expires_ms: Optional[int] = None  # the token's expiry; None for a session

    @property
    def identity(self) -> str:
        """A stable key for the caller, used in rate limits and cache keys."""
        if self.token_id is not None:
            return "token:" + self.token_id
        return "user:" + self.user_id

    @property
    def actor(self) -> str:
        """How the audit log names the caller."""
        if self.token_id is not None:
            return "user:%s/token:%s" % (self.username, self.token_id)
        return "user:" + self.username

    def has_scope(self, scope: str) -> bool:
        """Whether the caller holds ``scope``."""
        return scope in self.scopes

    def may_access_device(self, device_id: str) -> bool:
        """Whether the caller's device limit (if any) includes ``device_id``."""
        return self.devices is None or device_id in self.devices


def session_principal(user: User) -> Principal:
    """The principal of a logged-in dashboard user: every scope, every device."""
    return Principal(user_id=user.id, username=user.username, scopes=ALL_SCOPES, devices=None)


@dataclass(frozen=True)
class TokenKeys:
    """The hub's key material for API tokens."""

    hub_id: str
    signing_key: Any  # cryptography EllipticCurvePrivateKey (P-256)
    key_id: str
    public_keys: dict  # kid -> public key; more than one while a signing key is rotated
    scope_key: bytes  # 32 bytes, AES-256-GCM

    @property
    def audience(self) -> str:
        """The ``aud`` every token of this hub carries."""
        return "smartx-api:" + self.hub_id

    @classmethod
    def from_context(cls, ctx: Any) -> "TokenKeys":
        """Take the keys from a ``HubContext`` (smartx_hub/state.py)."""
        public_keys = dict(getattr(ctx, "token_public_keys", None) or {})
        public_keys.setdefault(ctx.token_key_id, ctx.token_public_key)
        return cls(hub_id=ctx.hub_id, signing_key=ctx.token_signing_key, key_id=ctx.token_key_id,
                   public_keys=public_keys, scope_key=bytes(ctx.scope_key))


def token_hash(token: str) -> str:
    """The hex SHA-256 of the whole token string: what the store keeps instead of the token."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def token_hint(token: str) -> str:
    """The last characters of the token, shown in lists so a user can recognise it."""
    return token[-HINT_CHARS:]


def parse_duration(text: str) -> int:
    """Parse ``30d``, ``12h``, ``90m`` or ``3600s`` into milliseconds (``TokenRequestError``)."""
    match = _DURATION_RE.match(text.strip()) if isinstance(text, str) else None
    if match is None:
        raise TokenRequestError("duration must look like 30d, 12h, 90m or 3600s")
    return int(match.group(1)) * _DURATION_UNIT_MS[match.group(2)]


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64url(text: str) -> bytes:
    if not isinstance(text, str) or not re.fullmatch(r"[A-Za-z0-9_-]*", text):
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def seal_scope(scope_key: bytes, token_id: str, scopes: Iterable[str],
               devices: Optional[Iterable[str]]) -> str:
    """Seal scopes and device limit for the token ``token_id`` (AES-256-GCM, AAD = jti)."""
    body = {"s": sorted(set(scopes)), "d": None if devices is None else sorted(set(devices))}
    plain = json.dumps(body, separators=(",", ":"), sort_keys=True).encode("utf-8")
    nonce = os.urandom(_SCOPE_NONCE_BYTES)
    sealed = AESGCM(scope_key).encrypt(nonce, plain, token_id.encode("utf-8"))
    return _b64url(nonce + sealed)


def open_scope(scope_key: bytes, token_id: str, sealed: str) -> tuple[frozenset, Optional[frozenset]]:
    """Open a sealed scope; ``TokenError`` if it was altered or belongs to another token."""
    if not isinstance(sealed, str) or len(sealed) > _MAX_SEALED_CHARS:
        raise TokenError("malformed scope claim")
    try:
        raw = _unb64url(sealed)
        if len(raw) < _SCOPE_NONCE_BYTES + 16:
            raise ValueError("short")
        plain = AESGCM(scope_key).decrypt(raw[:_SCOPE_NONCE_BYTES], raw[_SCOPE_NONCE_BYTES:],
                                          token_id.encode("utf-8"))
        body = json.loads(plain)
    except Exception:  # InvalidTag, ValueError, binascii.Error: all the same to the caller
        raise TokenError("scope claim does not open") from None
    scopes = body.get("s") if isinstance(body, dict) else None
    devices = body.get("d") if isinstance(body, dict) else None
    if not isinstance(scopes, list) or not all(s in ALL_SCOPES for s in scopes):
        raise TokenError("scope claim is malformed")
    if devices is not None and (not isinstance(devices, list)
                                or not all(isinstance(d, str) for d in devices)):
        raise TokenError("scope claim is malformed")
    return frozenset(scopes), (None if devices is None else frozenset(devices))


def normalise_request(scopes: Iterable[str], devices: Optional[Iterable[str]],
                      expires_in_ms: Optional[int], name: str) -> tuple[list, Optional[list], int, str]:
    """Check a token request's shape; return sorted scopes, sorted devices, lifetime, name."""
    scope_list = sorted(set(scopes))
    if not scope_list:
        raise TokenRequestError("a token needs at least one scope")
    unknown = [s for s in scope_list if s not in ALL_SCOPES]
    if unknown:
        raise TokenRequestError("unknown scope: %s" % ", ".join(repr(s)[:40] for s in unknown[:3]))
    device_list = None
    if devices is not None:
        device_list = sorted(set(devices))
        if not device_list:
            raise TokenRequestError("a device limit must name at least one device")
        if len(device_list) > MAX_TOKEN_DEVICES:
            raise TokenRequestError("a token may name at most %d devices" % MAX_TOKEN_DEVICES)
        if any(not isinstance(d, str) or not d or len(d) > MAX_DEVICE_ID_CHARS for d in device_list):
            raise TokenRequestError("device ids are 1 to %d characters" % MAX_DEVICE_ID_CHARS)
    lifetime = DEFAULT_EXPIRY_MS if expires_in_ms is None else int(expires_in_ms)
    if lifetime < MIN_EXPIRY_MS or lifetime > MAX_EXPIRY_MS:
        raise TokenRequestError("a token lives between 1 minute and 365 days")
    name = (name or "").strip()
    if len(name) > MAX_TOKEN_NAME_CHARS or any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise TokenRequestError("a token name is at most %d printable characters"
                                % MAX_TOKEN_NAME_CHARS)
    return scope_list, device_list, lifetime, name


def check_grant(creator: Principal, scopes: Iterable[str], devices: Optional[Iterable[str]],
                expires_ms: int) -> None:
    """Raise ``GrantError`` unless ``creator`` holds everything the new token would."""
    extra = set(scopes) - set(creator.scopes)
    if extra:
        raise GrantError("cannot grant scopes the caller does not hold: %s"
                         % ", ".join(sorted(extra)))
    if creator.devices is not None:
        if devices is None:
            raise GrantError("a device-limited caller must limit the new token to its devices")
        outside = set(devices) - set(creator.devices)
        if outside:
            raise GrantError("cannot grant devices the caller may not access")
    if creator.expires_ms is not None and expires_ms > creator.expires_ms:
        raise GrantError("a new token cannot outlive the token that creates it")


def issue_token(keys: TokenKeys, store: Store, user: User, scopes: Iterable[str],
                devices: Optional[Iterable[str]], expires_in_ms: Optional[int], name: str,
                now_ms: int, creator: Optional[Principal] = None) -> tuple[str, TokenRecord]:
    """Create, record and return a new token (shown once) and its stored record.

    ``creator`` is the principal asking (None for the command line, which acts as the user);
    without an explicit lifetime a token-created token lives at most as long as its creator.
    Unknown devices raise ``TokenRequestError``, escalation ``GrantError``.
    """
    if expires_in_ms is None and creator is not None and creator.expires_ms is not None:
        # The default lifetime is clamped to the creator's remaining one; an explicit longer
        # lifetime is refused by check_grant below.
        expires_in_ms = min(DEFAULT_EXPIRY_MS, creator.expires_ms - now_ms)
        if expires_in_ms < MIN_EXPIRY_MS:
            raise GrantError("the creating token expires within a minute")
    scope_list, device_list, lifetime, name = normalise_request(scopes, devices, expires_in_ms, name)
    if device_list is not None:
        missing = [d for d in device_list if store.get_device(d) is None]
        if missing:
            raise UnknownDeviceError("unknown device: %s" % missing[0][:MAX_DEVICE_ID_CHARS])
    iat = now_ms // 1000
    exp = (now_ms + lifetime) // 1000
    if creator is not None:
        if creator.user_id != user.id:
            raise GrantError("a caller creates tokens only for its own account")
        check_grant(creator, scope_list, device_list, exp * 1000)
    token_id = secrets.token_urlsafe(18)
    claims = {
        "iss": keys.hub_id,
        "aud": keys.audience,
        "sub": user.id,
        "jti": token_id,
        "iat": iat,
        "exp": exp,
        "scp": seal_scope(keys.scope_key, token_id, scope_list, device_list),
    }
    jws = jwt.encode(claims, keys.signing_key, algorithm="ES256",
                     headers={"typ": TOKEN_TYP, "kid": keys.key_id})
    token = TOKEN_PREFIX + jws
    record = TokenRecord(id=token_id, user_id=user.id, name=name, token_hash=token_hash(token),
                         hint=token_hint(token), scopes=scope_list, devices=device_list,
                         created_ms=now_ms, expires_ms=exp * 1000)
    store.add_token(record)
    return token, record


def _int_claim(claims: dict, name: str) -> int:
    value = claims.get(name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TokenError("claim %s must be an integer" % name)
    return value


class TokenVerifier:
    """Verifies presented tokens against the hub's keys and store; safe across threads."""

    def __init__(self, keys: TokenKeys, store: Store) -> None:
        self._keys = keys
        self._store = store
        self._touch_lock = threading.Lock()
        self._touched: dict[str, int] = {}

    def verify(self, token: str, now_ms: int) -> Principal:
        """Return the caller a token names, or raise ``TokenError``."""
        keys = self._keys
        if not isinstance(token, str) or len(token) > MAX_TOKEN_CHARS:
            raise TokenError("token too long")
        if not token.startswith(TOKEN_PREFIX):
            raise TokenError("not a SmartX API token")
        jws = token[len(TOKEN_PREFIX):]
        try:
            header = jwt.get_unverified_header(jws)
        except (jwt.PyJWTError, ValueError, TypeError, binascii.Error):
            raise TokenError("malformed token") from None
        if header.get("typ") != TOKEN_TYP:
            raise TokenError("wrong token type")
        if header.get("alg") not in ALGORITHMS:
            raise TokenError("algorithm not allowed")
        if "crit" in header:
            # We define no critical extension: RFC 7515 4.1.11 says refuse what we don't know.
            raise TokenError("critical header extensions are not accepted")
        kid = header.get("kid")
        public_key = keys.public_keys.get(kid) if isinstance(kid, str) else None
        if public_key is None:
            raise TokenError("unknown key id")
        try:
            claims = jwt.decode(
                jws, public_key, algorithms=ALGORITHMS, audience=keys.audience,
                issuer=keys.hub_id,
                # Times are checked below against the injected clock, not PyJWT's.
                options={"require": REQUIRED_CLAIMS, "verify_exp": False, "verify_iat": False,
                         "verify_nbf": False, "strict_aud": True},
            )
        except (jwt.PyJWTError, ValueError, TypeError):
            raise TokenError("signature or claims not valid") from None
        iat = _int_claim(claims, "iat")
        exp = _int_claim(claims, "exp")
        subject, token_id = claims.get("sub"), claims.get("jti")
        if not isinstance(subject, str) or not isinstance(token_id, str):
            raise TokenError("claims sub and jti must be strings")
        now_s = now_ms / 1000.0
        if iat > now_s + LEEWAY_S:
            raise TokenError("token issued in the future")
        if exp <= now_s - LEEWAY_S:
            raise TokenError("token expired", "token_expired")
        scopes, devices = open_scope(keys.scope_key, token_id, claims.get("scp"))

        record = self._store.get_token(token_id)
        if record is None or not hmac.compare_digest(record.token_hash, token_hash(token)):
            raise TokenError("unknown token")
        if record.user_id != subject:
            raise TokenError("unknown token")
        if record.revoked_ms is not None:
            raise TokenError("token revoked", "token_revoked")
        if record.expires_ms <= now_ms:
            raise TokenError("token expired", "token_expired")
        user = self._store.get_user(subject)
        if user is None:
            raise TokenError("unknown token")
        if record.created_ms < user.tokens_valid_after_ms:
            raise TokenError("token revoked", "token_revoked")
        stored_devices = None if record.devices is None else frozenset(record.devices)
        if frozenset(record.scopes) != scopes or stored_devices != devices:
            raise TokenError("token does not match its record")
        self._touch(record, now_ms)
        return Principal(user_id=user.id, username=user.username, scopes=scopes, devices=devices,
                         token_id=token_id, expires_ms=record.expires_ms)

    def _touch(self, record: TokenRecord, now_ms: int) -> None:
        # Throttled: a busy script must not turn every read into a database write.
        with self._touch_lock:
            last = self._touched.get(record.id, record.last_used_ms)
            if last is not None and now_ms - last < TOUCH_INTERVAL_MS:
                return
            self._touched[record.id] = now_ms
            if len(self._touched) > 100_000:
                self._touched.clear()
        self._store.touch_token(record.id, now_ms)
