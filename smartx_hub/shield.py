"""The API shield: an ASGI middleware in front of every HTTP route, before any signature check.

Rules (docs/api.md, "The shield"):
- Order per request, cheapest first: client block (auth failures, error rate) -> IP token
  bucket -> header caps (431) -> scanning rules (method 405, path/query 400, user agent and TLS
  version 403) -> token length (401) -> token bucket keyed by the SHA-256 of the presented
  credential (never by an unverified claim, so nobody can drain another's bucket by forging its
  ``sub``) -> body cap (413 from Content-Length at once, else while the body streams in).
- Per-account buckets are charged by the API after a token or session is verified
  (``Shield.charge_account``): before that the account is unknown.
- Blocks are per client IP: a flood of bad tokens from one address never blocks the victim's own
  valid token used from another.
- Read-only API answers (GET, 200) get an ``ETag`` over the caller's identity and the body,
  ``Cache-Control: private, no-cache`` and ``Vary``; a matching ``If-None-Match`` gets 304. Every
  other API answer gets ``Cache-Control: no-store``. Every answer gets the hardening headers.
- Every clock is the injected one (milliseconds). State is in memory, bounded per table;
  a method may be called from the event loop or a worker thread.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
import tomllib
import urllib.parse
from collections import OrderedDict, deque
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Optional

Clock = Callable[[], int]

SCOPE_KEY = "smartx.shield"  # where the per-request state lives in the ASGI scope
SESSION_COOKIE = "sx_session"
_TLS_VERSIONS = {"1.0": 0x0301, "1.1": 0x0302, "1.2": 0x0303, "1.3": 0x0304}
_SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"strict-transport-security", b"max-age=31536000"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
    (b"content-security-policy",
     b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
     b"connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"),
]


class ShieldConfigError(ValueError):
    """A shield rules file is malformed."""


@dataclass(frozen=True)
class Rate:
    """A token bucket's shape: refill per second and size."""

    rate: float
    burst: float


@dataclass(frozen=True)
class Escalation:
    """Failures per key within a window that start a block, doubling on repeat."""

    threshold: int
    window_ms: int
    block_ms: int
    max_block_ms: int


@dataclass(frozen=True)
class ShieldRules:
    """Every limit and pattern of the shield (shield_rules.toml)."""

    max_header_bytes: int
    max_headers: int
    max_body_bytes: int
    max_token_chars: int
    max_tracked_clients: int
    ip_rate: Rate
    token_rate: Rate
    account_rate: Rate
    auth_failures: Escalation
    error_rate: Escalation
    login_ip: Escalation
    login_user: Escalation
    allowed_methods: frozenset
    blocked_path_substrings: tuple
    blocked_query_substrings: tuple
    blocked_user_agents: tuple
    min_tls_version: int


def _merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _positive(table: dict, key: str, kind=int) -> Any:
    value = table.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ShieldConfigError("%s must be a positive number" % key)
    return kind(value)


def _strings(table: dict, key: str) -> tuple:
    value = table.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ShieldConfigError("%s must be a list of non-empty strings" % key)
    return tuple(v.lower() for v in value)


def _escalation(table: dict, prefix: str = "") -> Escalation:
    return Escalation(
        threshold=_positive(table, prefix + "threshold"),
        window_ms=int(_positive(table, "window_s", float) * 1000),
        block_ms=int(_positive(table, "block_s", float) * 1000),
        max_block_ms=int(_positive(table, "max_block_s", float) * 1000),
    )


def rules_from_dict(data: dict) -> ShieldRules:
    """Build rules from a parsed rules document (the defaults merged with any override)."""
    try:
        limits, rates, scan = data["limits"], data["rates"], data["scan"]

        def rate(name: str) -> Rate:
            return Rate(rate=_positive(rates[name], "rate", float),
                        burst=_positive(rates[name], "burst", float))

        tls = scan.get("min_tls_version", "1.2")
        if tls not in _TLS_VERSIONS:
            raise ShieldConfigError("min_tls_version must be one of %s" % sorted(_TLS_VERSIONS))
        methods = scan.get("allowed_methods")
        if not isinstance(methods, list) or not all(isinstance(m, str) for m in methods):
            raise ShieldConfigError("allowed_methods must be a list of strings")
        return ShieldRules(
            max_header_bytes=_positive(limits, "max_header_bytes"),
            max_headers=_positive(limits, "max_headers"),
            max_body_bytes=_positive(limits, "max_body_bytes"),
            max_token_chars=_positive(limits, "max_token_chars"),
            max_tracked_clients=_positive(limits, "max_tracked_clients"),
            ip_rate=rate("ip"),
            token_rate=rate("token"),
            account_rate=rate("account"),
            auth_failures=_escalation(data["auth_failures"]),
            error_rate=_escalation(data["error_rate"]),
            login_ip=_escalation(data["login"], "ip_"),
            login_user=_escalation(data["login"], "user_"),
            allowed_methods=frozenset(m.upper() for m in methods),
            blocked_path_substrings=_strings(scan, "blocked_path_substrings"),
            blocked_query_substrings=_strings(scan, "blocked_query_substrings"),
            blocked_user_agents=_strings(scan, "blocked_user_agents"),
            min_tls_version=_TLS_VERSIONS[tls],
        )
    except (KeyError, TypeError, AttributeError) as exc:
        raise ShieldConfigError("shield rules incomplete: %s" % exc) from None


def default_rules_document() -> dict:
    """The packaged default rules, parsed."""
    text = resources.files("smartx_hub").joinpath("shield_rules.toml").read_text("utf-8")
    return tomllib.loads(text)


def load_rules(override_path: Optional[Path] = None, override: Optional[dict] = None) -> ShieldRules:
    """The default rules, overridden key by key by a TOML file and/or a dict."""
    data = default_rules_document()
    if override_path is not None and Path(override_path).is_file():
        try:
            data = _merge(data, tomllib.loads(Path(override_path).read_text("utf-8")))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ShieldConfigError("%s: %s" % (override_path, exc)) from None
    if override:
        data = _merge(data, override)
    return rules_from_dict(data)


class TokenBuckets:
    """Token buckets by key, at most ``max_keys`` remembered (the least recently used go)."""

    def __init__(self, rate: Rate, max_keys: int) -> None:
        self._rate = rate
        self._max_keys = max_keys
        self._buckets: OrderedDict[str, tuple[float, int]] = OrderedDict()
        self._lock = threading.Lock()

    def take(self, key: str, now_ms: int) -> int:
        """Spend one token: 0 if allowed, else the milliseconds until one is available."""
        rate = self._rate
        with self._lock:
            tokens, last = self._buckets.pop(key, (rate.burst, now_ms))
            tokens = min(rate.burst, tokens + max(0, now_ms - last) * rate.rate / 1000.0)
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, now_ms)
                wait = 0
            else:
                self._buckets[key] = (tokens, now_ms)
                wait = max(1, math.ceil((1.0 - tokens) * 1000.0 / rate.rate))
            while len(self._buckets) > self._max_keys:
                self._buckets.popitem(last=False)
        return wait


class EscalatingBlocks:
    """Counts failures per key; ``threshold`` within the window blocks the key, each repeat
    offence doubling the block up to the maximum. Bounded like ``TokenBuckets``."""

    def __init__(self, rule: Escalation, max_keys: int) -> None:
        self._rule = rule
        self._max_keys = max_keys
        self._entries: OrderedDict[str, list] = OrderedDict()  # [failures deque, until, offences]
        self._lock = threading.Lock()

    def blocked_for(self, key: str, now_ms: int) -> int:
        """Milliseconds the key stays blocked (0: not blocked)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return 0
            return max(0, entry[1] - now_ms)

    def record(self, key: str, now_ms: int) -> int:
        """Count one failure; return the block it starts in milliseconds (0: none)."""
        rule = self._rule
        with self._lock:
            entry = self._entries.pop(key, None)
            if entry is None:
                entry = [deque(), 0, 0]
            failures, until, offences = entry
            if offences and now_ms - until > rule.max_block_ms:
                offences = 0  # a long good spell forgives earlier offences
            while failures and now_ms - failures[0] >= rule.window_ms:
                failures.popleft()
            failures.append(now_ms)
            block = 0
            if len(failures) >= rule.threshold and now_ms >= until:
                offences += 1
                block = min(rule.max_block_ms, rule.block_ms * (2 ** min(offences - 1, 20)))
                until = now_ms + block
                failures.clear()
            self._entries[key] = [failures, until, offences]
            while len(self._entries) > self._max_keys:
                self._entries.popitem(last=False)
        return block

    def clear(self, key: str) -> None:
        """Forget the key's failures (a success) but not a block in force."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                entry[0].clear()


class RequestState:
    """What the shield and the API share about one request (``scope[SCOPE_KEY]``)."""

    __slots__ = ("client_ip", "identity")

    def __init__(self, client_ip: str) -> None:
        self.client_ip = client_ip
        self.identity: Optional[str] = None  # set by the API once the caller is verified


class Shield:
    """The shield's rules, clock and counters; one per app."""

    def __init__(self, rules: ShieldRules, clock: Clock) -> None:
        self.rules = rules
        self.clock = clock
        cap = rules.max_tracked_clients
        self.ip_buckets = TokenBuckets(rules.ip_rate, cap)
        self.token_buckets = TokenBuckets(rules.token_rate, cap)
        self.account_buckets = TokenBuckets(rules.account_rate, cap)
        self.auth_failures = EscalatingBlocks(rules.auth_failures, cap)
        self.errors = EscalatingBlocks(rules.error_rate, cap)
        self.login_ips = EscalatingBlocks(rules.login_ip, cap)
        self.login_users = EscalatingBlocks(rules.login_user, cap)

    def charge_account(self, account_id: str) -> int:
        """Spend one request from the account's bucket: 0, or milliseconds to wait."""
        return self.account_buckets.take(account_id, self.clock())

    def client_blocked_for(self, ip: str, now_ms: int) -> int:
        """Milliseconds the client IP stays blocked (auth failures or error rate)."""
        return max(self.auth_failures.blocked_for(ip, now_ms), self.errors.blocked_for(ip, now_ms))

    def note_status(self, ip: str, status: int, now_ms: int) -> None:
        """Feed an answer's status into the per-IP escalation counters."""
        if status == 401:
            self.auth_failures.record(ip, now_ms)
        elif 400 <= status < 500 and status != 429:
            self.errors.record(ip, now_ms)


def retry_after_seconds(wait_ms: int) -> str:
    """A ``Retry-After`` value (whole seconds, at least 1) for a wait in milliseconds."""
    return str(max(1, math.ceil(wait_ms / 1000.0)))


def error_body(code: str, detail: str) -> bytes:
    """The API's error document as bytes."""
    return json.dumps({"error": code, "detail": detail}).encode("utf-8")


async def _reject(send, status: int, code: str, detail: str,
                  extra: Optional[list] = None) -> None:
    body = error_body(code, detail)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"cache-control", b"no-store"), (b"connection", b"close")]
    headers.extend(extra or [])
    headers.extend(_SECURITY_HEADERS)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _client_ip(scope: dict) -> str:
    client = scope.get("client")
    if client and isinstance(client[0], str):
        return client[0]
    return "unknown"


def _cookie_value(cookie_header: str, name: str) -> Optional[str]:
    for part in cookie_header.split(";"):
        key, sep, value = part.strip().partition("=")
        if sep and key == name:
            return value
    return None


def _etag_matches(if_none_match: str, etag: str) -> bool:
    for candidate in if_none_match.split(","):
        candidate = candidate.strip()
        if candidate == "*":
            return True
        if candidate.startswith("W/"):
            candidate = candidate[2:]
        if candidate == etag:
            return True
    return False


class _BodyTooLarge(Exception):
    """Raised from ``receive`` when the streamed body passes the cap."""


class ShieldMiddleware:
    """ASGI middleware applying a ``Shield`` to every HTTP request."""

    def __init__(self, app, shield: Shield) -> None:
        self.app = app
        self.shield = shield

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})  # no websocket route exists
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await self._http(scope, receive, send)

    async def _http(self, scope, receive, send) -> None:
        shield = self.shield
        rules = shield.rules
        now = shield.clock()
        ip = _client_ip(scope)

        async def reject(status: int, code: str, detail: str, extra: Optional[list] = None) -> None:
            shield.note_status(ip, status, now)
            await _reject(send, status, code, detail, extra)

        blocked = shield.client_blocked_for(ip, now)
        if blocked:
            await _reject(send, 429, "blocked", "too many failed or bad requests from this address",
                          [(b"retry-after", retry_after_seconds(blocked).encode())])
            return
        wait = shield.ip_buckets.take(ip, now)
        if wait:
            await _reject(send, 429, "rate_limited", "too many requests from this address",
                          [(b"retry-after", retry_after_seconds(wait).encode())])
            return

        raw_headers = scope.get("headers") or []
        size = sum(len(name) + len(value) + 4 for name, value in raw_headers)
        if len(raw_headers) > rules.max_headers or size > rules.max_header_bytes:
            await reject(431, "headers_too_large", "request headers are too large")
            return
        headers: dict[bytes, bytes] = {}
        for name, value in raw_headers:
            name = name.lower()
            if name in headers and name in (b"authorization", b"content-length", b"cookie"):
                await reject(400, "bad_request", "repeated %s header" % name.decode("latin-1"))
                return
            headers[name] = value

        verdict = self._scan(scope, headers)
        if verdict is not None:
            await reject(*verdict)
            return

        credential_key = None
        authorization = headers.get(b"authorization")
        if authorization is not None:
            scheme, _, credential = authorization.partition(b" ")
            credential = credential.strip()
            if scheme.lower() == b"bearer" and len(credential) > rules.max_token_chars:
                await reject(401, "invalid_token", "token too long",
                             [(b"www-authenticate", b'Bearer error="invalid_token"')])
                return
            credential_key = "t:" + hashlib.sha256(credential).hexdigest()
        else:
            session = _cookie_value(headers.get(b"cookie", b"").decode("latin-1"), SESSION_COOKIE)
            if session:
                credential_key = "s:" + hashlib.sha256(session.encode("latin-1")).hexdigest()
        if credential_key is not None:
            wait = shield.token_buckets.take(credential_key, now)
            if wait:
                await _reject(send, 429, "rate_limited", "too many requests with this credential",
                              [(b"retry-after", retry_after_seconds(wait).encode())])
                return

        length = headers.get(b"content-length")
        if length is not None:
            if not length.isdigit() or len(length) > 18:
                await reject(400, "bad_request", "malformed Content-Length")
                return
            if int(length) > rules.max_body_bytes:
                await reject(413, "payload_too_large",
                             "request body is larger than %d bytes" % rules.max_body_bytes)
                return

        state = RequestState(ip)
        scope[SCOPE_KEY] = state
        await self._forward(scope, receive, send, headers, state, now)

    def _scan(self, scope: dict, headers: dict) -> Optional[tuple]:
        rules = self.shield.rules
        method = scope.get("method", "")
        if method not in rules.allowed_methods:
            return (405, "method_not_allowed", "method not allowed")
        raw_path = (scope.get("raw_path") or scope.get("path", "").encode("utf-8"))
        raw_path_text = raw_path.decode("latin-1").lower()
        path_text = scope.get("path", "").lower()
        if any(ord(c) < 32 or ord(c) == 127 for c in path_text):
            return (400, "request_blocked", "control characters in the path")
        for pattern in rules.blocked_path_substrings:
            if pattern in raw_path_text or pattern in path_text:
                return (400, "request_blocked", "the path matches a blocked pattern")
        query = scope.get("query_string", b"").decode("latin-1").lower()
        if query:
            decoded = urllib.parse.unquote_plus(query, encoding="latin-1")
            for pattern in rules.blocked_query_substrings:
                if pattern in query or pattern in decoded:
                    return (400, "request_blocked", "the query matches a blocked pattern")
        agent = headers.get(b"user-agent", b"").decode("latin-1").lower()
        if agent and any(pattern in agent for pattern in rules.blocked_user_agents):
            return (403, "request_blocked", "user agent not allowed")
        tls = (scope.get("extensions") or {}).get("tls")
        if isinstance(tls, dict):
            version = tls.get("tls_version")
            if isinstance(version, int) and version < rules.min_tls_version:
                return (403, "tls_version", "TLS version too old")
        return None

    async def _forward(self, scope, receive, send, headers: dict, state: RequestState,
                       now: int) -> None:
        shield = self.shield
        cap = shield.rules.max_body_bytes
        received = 0
        too_large = False
        started = False
        replaced = False
        status_seen = 0
        is_api = scope.get("path", "").startswith("/api/")
        cacheable = scope.get("method") == "GET" and is_api
        held_start: Optional[dict] = None
        held_body: list[bytes] = []

        async def guarded_receive():
            nonlocal received, too_large
            message = await receive()
            if message.get("type") == "http.request":
                received += len(message.get("body", b""))
                if received > cap:
                    too_large = True
                    raise _BodyTooLarge()
            return message

        async def send_413() -> None:
            nonlocal started, replaced, status_seen
            started = replaced = True
            status_seen = 413
            await _reject(send, 413, "payload_too_large",
                          "request body is larger than %d bytes" % cap)

        async def guarded_send(message):
            nonlocal started, status_seen, held_start
            kind = message["type"]
            if kind == "http.response.start":
                if too_large:
                    # The app turned our receive error into its own answer: say what happened.
                    await send_413()
                    return
                started = True
                status_seen = message["status"]
                out = [(n, v) for n, v in message.get("headers", [])]
                out.extend(_SECURITY_HEADERS)
                has_cache = any(n.lower() == b"cache-control" for n, _ in out)
                if cacheable and status_seen == 200:
                    held_start = dict(message, headers=out)
                    return
                if not has_cache and (is_api or not scope.get("path", "").startswith("/static/")):
                    out.append((b"cache-control", b"no-store"))
                await send(dict(message, headers=out))
                return
            if kind == "http.response.body":
                if replaced:
                    return
                if held_start is not None:
                    held_body.append(message.get("body", b""))
                    if not message.get("more_body", False):
                        await self._send_cached(send, held_start, b"".join(held_body), headers, state)
                    return
            await send(message)

        try:
            await self.app(scope, guarded_receive, guarded_send)
        except _BodyTooLarge:
            if not started:
                await send_413()
        except Exception:
            if too_large and not started:
                await send_413()
            else:
                raise
        finally:
            if status_seen:
                shield.note_status(state.client_ip, status_seen, now)

    async def _send_cached(self, send, start: dict, body: bytes, request_headers: dict,
                           state: RequestState) -> None:
        headers = [(n, v) for n, v in start["headers"]
                   if n.lower() not in (b"etag", b"cache-control", b"vary")]
        if state.identity is None:
            headers.append((b"cache-control", b"no-store"))
            await send(dict(start, headers=headers))
            await send({"type": "http.response.body", "body": body, "more_body": False})
            return
        # The identity is in the hash: two callers never share an ETag for the same body.
        digest = hashlib.sha256(state.identity.encode("utf-8") + b"\0" + body).hexdigest()
        etag = '"%s"' % digest[:40]
        headers.append((b"etag", etag.encode("ascii")))
        headers.append((b"cache-control", b"private, no-cache"))
        headers.append((b"vary", b"Authorization, Cookie"))
        if_none_match = request_headers.get(b"if-none-match")
        if if_none_match is not None and _etag_matches(if_none_match.decode("latin-1"), etag):
            headers = [(n, v) for n, v in headers
                       if n.lower() not in (b"content-length", b"content-type")]
            await send({"type": "http.response.start", "status": 304, "headers": headers})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        await send(dict(start, headers=headers))
        await send({"type": "http.response.body", "body": body, "more_body": False})
