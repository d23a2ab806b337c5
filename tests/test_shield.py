"""The API shield (smartx_hub/shield.py) in front of the real app, with an injected clock.

Requests go through ``httpx`` over the ASGI transport (a chosen client address each), or
straight into the ASGI app where the test needs bytes a client library would normalise away
(raw paths, a body that never ends).
"""

from __future__ import annotations

import asyncio

import httpx
import pytest
from hypothesis import given, strategies as st

from smartx_hub import passwords
from smartx_hub.api import create_app
from smartx_hub.live import LiveSessions
from smartx_hub.shield import (
    Escalation,
    EscalatingBlocks,
    Rate,
    ShieldConfigError,
    TokenBuckets,
    load_rules,
)
from smartx_hub.state import init_hub
from smartx_hub.tokens import SCOPES, TokenKeys, issue_token

NOW = 1_800_000_000_000
ROOMY = {"rates": {"ip": {"rate": 1000.0, "burst": 1000}, "token": {"rate": 1000.0, "burst": 1000},
                   "account": {"rate": 1000.0, "burst": 1000}}}


class Clock:
    """A clock the test moves by hand (milliseconds)."""

    def __init__(self, now: int = NOW) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now

    def advance(self, ms: int) -> None:
        self.now += ms


def merge(*dicts):
    out: dict = {}
    for d in dicts:
        for key, value in d.items():
            if isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = merge(out[key], value)
            else:
                out[key] = value
    return out


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    ctx = init_hub(str(tmp_path_factory.mktemp("shield") / "hub"), now_ms=NOW)
    ctx.test_user = ctx.store.add_user("alice", passwords.hash_password("correct horse battery"), NOW)
    ctx.test_device = ctx.store.add_device("sensor", "hs256", None, b"s" * 32, NOW)
    yield ctx
    ctx.close()


def token_for(hub, user=None, scopes=SCOPES):
    token, _ = issue_token(TokenKeys.from_context(hub), hub.store, user or hub.test_user, scopes,
                           None, None, "", NOW)
    return token


def app_with(hub, clock, **override):
    return create_app(hub, LiveSessions(), clock, rules=load_rules(override=merge(ROOMY, override)))


def client(app, ip="10.0.0.1"):
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=(ip, 40000)),
                             base_url="https://testserver")


def run(coro):
    return asyncio.run(coro)


def bearer(token):
    return {"Authorization": "Bearer " + token}


async def asgi(app, method="GET", path="/healthz", raw_path=None, query=b"", headers=(),
               ip="10.0.0.9", body=b"", endless_body=False, extensions=None):
    """Call the ASGI app directly; return (status, headers dict, body, receive calls)."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
             "scheme": "https", "path": path, "raw_path": raw_path or path.encode("latin-1"),
             "query_string": query, "root_path": "", "client": (ip, 5555),
             "server": ("testserver", 443),
             "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers]}
    if extensions is not None:
        scope["extensions"] = extensions
    calls = 0
    sent: list = []

    async def receive():
        nonlocal calls
        calls += 1
        if endless_body:
            if calls > 10_000:
                raise AssertionError("the shield let the body stream on")
            return {"type": "http.request", "body": b"x" * 1024, "more_body": True}
        if calls == 1:
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.sleep(3600)

    async def send(message):
        sent.append(message)

    await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    content = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, content, calls


# -- rate limits ------------------------------------------------------------------------------

def test_ip_bucket_429_with_retry_after_and_refill(hub):
    clock = Clock()
    app = app_with(hub, clock, rates={"ip": {"rate": 1.0, "burst": 3}})

    async def go():
        async with client(app, "10.1.0.1") as c, client(app, "10.1.0.2") as other:
            assert [(await c.get("/healthz")).status_code for _ in range(3)] == [200] * 3
            refused = await c.get("/healthz")
            assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
            assert refused.json()["error"] == "rate_limited"
            assert (await other.get("/healthz")).status_code == 200  # another IP is unaffected
            clock.advance(999)
            assert (await c.get("/healthz")).status_code == 429
            clock.advance(1)
            assert (await c.get("/healthz")).status_code == 200
    run(go())


def test_token_bucket_follows_the_token_across_addresses(hub):
    clock = Clock()
    app = app_with(hub, clock, rates={"token": {"rate": 0.5, "burst": 2}})
    token, other_token = token_for(hub), token_for(hub)

    async def go():
        async with client(app, "10.2.0.1") as a, client(app, "10.2.0.2") as b:
            assert (await a.get("/api/v1/devices", headers=bearer(token))).status_code == 200
            assert (await b.get("/api/v1/devices", headers=bearer(token))).status_code == 200
            refused = await b.get("/api/v1/devices", headers=bearer(token))
            assert refused.status_code == 429 and refused.headers["retry-after"] == "2"
            assert (await b.get("/api/v1/devices", headers=bearer(other_token))).status_code == 200
            # Someone without the token cannot drain its bucket: a garbage token has its own.
            for _ in range(3):
                await b.get("/api/v1/devices", headers=bearer("sxh_garbage"))
            clock.advance(2000)
            assert (await a.get("/api/v1/devices", headers=bearer(token))).status_code == 200
    run(go())


def test_account_bucket_spans_tokens_of_one_user(hub):
    clock = Clock()
    app = app_with(hub, clock, rates={"account": {"rate": 1.0, "burst": 3}})
    first, second = token_for(hub), token_for(hub)
    bob = hub.store.add_user("bob-account", passwords.hash_password("correct horse battery"), NOW)
    bobs = token_for(hub, bob)

    async def go():
        async with client(app, "10.3.0.1") as a, client(app, "10.3.0.2") as b:
            assert (await a.get("/api/v1/devices", headers=bearer(first))).status_code == 200
            assert (await b.get("/api/v1/devices", headers=bearer(second))).status_code == 200
            assert (await b.get("/api/v1/devices", headers=bearer(first))).status_code == 200
            refused = await a.get("/api/v1/devices", headers=bearer(second))
            assert refused.status_code == 429 and "account" in refused.json()["detail"]
            assert "retry-after" in refused.headers
            assert (await a.get("/api/v1/devices", headers=bearer(bobs))).status_code == 200
    run(go())


@given(st.lists(st.integers(0, 3000), min_size=1, max_size=60), st.floats(0.5, 20),
       st.integers(1, 10))
def test_token_bucket_never_exceeds_rate_plus_burst(gaps, rate, burst):
    buckets = TokenBuckets(Rate(rate, burst), 10)
    now, allowed = 0, 0
    for gap in gaps:
        now += gap
        wait = buckets.take("k", now)
        if wait == 0:
            allowed += 1
        else:
            assert wait >= 1
    assert allowed <= burst + rate * now / 1000.0 + 1e-9


def test_token_bucket_memory_is_bounded():
    buckets = TokenBuckets(Rate(1.0, 1), 5)
    for i in range(50):
        buckets.take("key%d" % i, 0)
    assert len(buckets._buckets) == 5


# -- auth failures and error rate -------------------------------------------------------------

def test_auth_failures_block_only_the_failing_address(hub):
    clock = Clock()
    app = app_with(hub, clock, auth_failures={"threshold": 3, "window_s": 60, "block_s": 300,
                                              "max_block_s": 3600})
    token = token_for(hub)

    async def go():
        async with client(app, "10.4.0.66") as attacker, client(app, "10.4.0.7") as victim:
            for _ in range(3):
                r = await attacker.get("/api/v1/devices", headers=bearer("sxh_forged.x.y"))
                assert r.status_code == 401
            blocked = await attacker.get("/api/v1/devices", headers=bearer(token))
            assert blocked.status_code == 429 and blocked.json()["error"] == "blocked"
            assert blocked.headers["retry-after"] == "300"
            # The victim's own valid token, from its own address, is untouched.
            assert (await victim.get("/api/v1/devices", headers=bearer(token))).status_code == 200
            clock.advance(300_000)
            assert (await attacker.get("/api/v1/devices", headers=bearer(token))).status_code == 200
            for _ in range(3):
                await attacker.get("/api/v1/devices")  # no credentials: 401 too
            clock.advance(300_000)
            second = await attacker.get("/healthz")
            assert second.status_code == 429  # a repeat offence doubles the block to 600 s
            clock.advance(300_001)
            assert (await attacker.get("/healthz")).status_code == 200
    run(go())


def test_error_rate_escalation(hub):
    clock = Clock()
    app = app_with(hub, clock, error_rate={"threshold": 5, "window_s": 10, "block_s": 60,
                                           "max_block_s": 3600})

    async def go():
        async with client(app, "10.5.0.1") as c:
            for _ in range(4):
                assert (await c.get("/nothing-here")).status_code == 404
            clock.advance(11_000)  # the window slid past them: no block yet
            for _ in range(4):
                assert (await c.get("/nothing-here")).status_code == 404
            assert (await c.get("/healthz")).status_code == 200
            assert (await c.get("/still-nothing")).status_code == 404  # the fifth in the window
            blocked = await c.get("/healthz")
            assert blocked.status_code == 429 and blocked.headers["retry-after"] == "60"
    run(go())


def test_escalating_blocks_double_and_cap():
    blocks = EscalatingBlocks(Escalation(2, 1000, 100, 350), 100)
    now, lengths = 0, []
    for _ in range(4):
        assert blocks.record("ip", now) == 0
        lengths.append(blocks.record("ip", now + 1))
        now = now + 1 + lengths[-1]
        assert blocks.blocked_for("ip", now) == 0
    assert lengths == [100, 200, 350, 350]


# -- caps -------------------------------------------------------------------------------------

def test_header_caps_431(hub):
    app = app_with(hub, Clock(), limits={"max_header_bytes": 2048, "max_headers": 20})

    async def go():
        async with client(app) as c:
            big = await c.get("/healthz", headers={"X-Big": "a" * 3000})
            assert big.status_code == 431 and big.json()["error"] == "headers_too_large"
            many = await c.get("/healthz", headers={"X-H%d" % i: "1" for i in range(25)})
            assert many.status_code == 431
            assert (await c.get("/healthz", headers={"X-Ok": "a" * 500})).status_code == 200
    run(go())


def test_token_length_cap_401(hub):
    app = app_with(hub, Clock(), limits={"max_token_chars": 512})

    async def go():
        async with client(app) as c:
            r = await c.get("/api/v1/devices", headers=bearer("sxh_" + "a" * 600))
            assert r.status_code == 401 and r.json() == {"error": "invalid_token",
                                                          "detail": "token too long"}
    run(go())


def test_body_cap_from_content_length_413(hub):
    app = app_with(hub, Clock(), limits={"max_body_bytes": 1024})
    token = token_for(hub)

    async def go():
        async with client(app) as c:
            r = await c.post("/api/v1/tokens", headers=bearer(token),
                             content=b'{"scopes": ["devices:read"], "name": "' + b"x" * 2000 + b'"}',
                             )
            assert r.status_code == 413 and r.json()["error"] == "payload_too_large"
            ok = await c.post("/api/v1/tokens", headers=bearer(token),
                              json={"scopes": ["devices:read"]})
            assert ok.status_code == 201
    run(go())


def test_body_cap_enforced_while_streaming(hub):
    """A chunked body with no Content-Length is cut off as it passes the cap, not read to the end."""
    app = app_with(hub, Clock(), limits={"max_body_bytes": 8192})
    token = token_for(hub)
    status, headers, body, calls = run(asgi(
        app, "POST", "/api/v1/tokens", endless_body=True,
        headers=[("authorization", "Bearer " + token), ("content-type", "application/json"),
                 ("transfer-encoding", "chunked")]))
    assert status == 413 and b"payload_too_large" in body
    assert calls <= 8192 // 1024 + 1


# -- scanning rules ---------------------------------------------------------------------------

@pytest.mark.parametrize("method, raw_path, query, agent, expected", [
    ("TRACE", b"/healthz", b"", "curl/8", 405),
    ("PATCH", b"/api/v1/devices", b"", "curl/8", 405),
    ("GET", b"/api/v1/../../etc/passwd", b"", "curl/8", 400),
    ("GET", b"/api/v1/%2e%2e/secret", b"", "curl/8", 400),
    ("GET", b"/api/v1/devices%00", b"", "curl/8", 400),
    ("GET", b"/index.php", b"", "curl/8", 400),
    ("GET", b"/WP-ADMIN/setup", b"", "curl/8", 400),
    ("GET", b"/.git/config", b"", "curl/8", 400),
    ("GET", b"/healthz", b"q=%3Cscript%3Ealert(1)", "curl/8", 400),
    ("GET", b"/healthz", b"id=1+UNION+SELECT+password", "curl/8", 400),
    ("GET", b"/healthz", b"x=${jndi:ldap://x}", "curl/8", 400),
    ("GET", b"/healthz", b"", "sqlmap/1.7.2#stable", 403),
    ("GET", b"/healthz", b"", "Mozilla/5.0 (Nikto/2.5)", 403),
    ("GET", b"/healthz", b"", "curl/8", 200),
    ("GET", b"/healthz", b"since=100&until=200", "python-httpx/0.28", 200),
])
def test_scanning_rules(hub, method, raw_path, query, agent, expected):
    app = app_with(hub, Clock())
    path = raw_path.decode("latin-1").replace("%2e", ".").replace("%00", "\x00")
    status, headers, body, _ = run(asgi(app, method, path, raw_path=raw_path, query=query,
                                        headers=[("user-agent", agent)]))
    assert status == expected
    if expected != 200:
        assert body.startswith(b'{"error": ')


@pytest.mark.parametrize("version, expected", [(0x0301, 403), (0x0302, 403), (0x0303, 200),
                                               (0x0304, 200)])
def test_minimum_tls_version_from_asgi_extension(hub, version, expected):
    app = app_with(hub, Clock())
    status, _, body, _ = run(asgi(app, extensions={"tls": {"tls_version": version}}))
    assert status == expected


def test_min_tls_13_by_override(hub):
    app = app_with(hub, Clock(), scan={"min_tls_version": "1.3"})
    assert run(asgi(app, extensions={"tls": {"tls_version": 0x0303}}))[0] == 403


def test_rules_override_file_in_data_dir(tmp_path):
    data = tmp_path / "hub"
    with init_hub(str(data), now_ms=NOW) as ctx:
        (data / "shield_rules.toml").write_text(
            '[scan]\nblocked_user_agents = ["curl"]\n[rates]\nip = { rate = 1.0, burst = 2 }\n')
        app = create_app(ctx, LiveSessions(), Clock())
        assert run(asgi(app, headers=[("user-agent", "curl/8.1")]))[0] == 403
        assert run(asgi(app, headers=[("user-agent", "sqlmap")], ip="10.9.9.9"))[0] == 200
        assert run(asgi(app, ip="10.9.9.9"))[0] == 200
        assert run(asgi(app, ip="10.9.9.9"))[0] == 429
        (data / "shield_rules.toml").write_text('[rates]\nip = { rate = -1, burst = 2 }\n')
        with pytest.raises(ShieldConfigError):
            create_app(ctx, LiveSessions(), Clock())
        (data / "shield_rules.toml").write_text('[rates\n')
        with pytest.raises(ShieldConfigError):
            create_app(ctx, LiveSessions(), Clock())


def test_default_rules_are_sane():
    rules = load_rules()
    assert rules.allowed_methods == {"GET", "HEAD", "POST", "PUT", "DELETE"}
    assert rules.max_header_bytes > rules.max_token_chars
    assert ".." in rules.blocked_path_substrings and "sqlmap" in rules.blocked_user_agents
    assert rules.min_tls_version == 0x0303


def test_websocket_is_closed(hub):
    app = app_with(hub, Clock())
    sent = []

    async def go():
        async def receive():
            return {"type": "websocket.connect"}

        async def send(message):
            sent.append(message)

        await app({"type": "websocket", "path": "/", "headers": [], "client": ("1.2.3.4", 1)},
                  receive, send)
    run(go())
    assert sent == [{"type": "websocket.close", "code": 1008}]


# -- caching ----------------------------------------------------------------------------------

def test_etag_304_and_identity_in_the_cache_key(hub):
    app = app_with(hub, Clock())
    first, second = token_for(hub), token_for(hub)

    async def go():
        async with client(app) as c:
            r1 = await c.get("/api/v1/devices", headers=bearer(first))
            etag = r1.headers["etag"]
            assert r1.status_code == 200 and r1.headers["cache-control"] == "private, no-cache"
            assert "Authorization" in r1.headers["vary"]
            again = await c.get("/api/v1/devices", headers=dict(bearer(first),
                                                                **{"If-None-Match": etag}))
            assert again.status_code == 304 and again.content == b""
            assert again.headers["etag"] == etag
            # Same body, another caller: another ETag, and the first's ETag gets no 304.
            r2 = await c.get("/api/v1/devices", headers=dict(bearer(second),
                                                             **{"If-None-Match": etag}))
            assert r2.status_code == 200 and r2.headers["etag"] != etag
            assert r2.json() == r1.json()
            # A change to the resource changes the ETag.
            await c.post("/api/v1/devices/%s/disable" % hub.test_device.id, headers=bearer(first))
            changed = await c.get("/api/v1/devices", headers=dict(bearer(first),
                                                                  **{"If-None-Match": etag}))
            assert changed.status_code == 200 and changed.headers["etag"] != etag
            await c.post("/api/v1/devices/%s/enable" % hub.test_device.id, headers=bearer(first))
            post = await c.post("/api/v1/tokens", headers=bearer(first),
                                json={"scopes": ["devices:read"]})
            assert post.headers["cache-control"] == "no-store" and "etag" not in post.headers
            refused = await c.get("/api/v1/devices")
            assert refused.status_code == 401 and refused.headers["cache-control"] == "no-store"
            assert "etag" not in refused.headers
    run(go())


def test_hardening_headers_on_every_answer(hub):
    app = app_with(hub, Clock())

    async def go():
        async with client(app) as c:
            for path in ("/healthz", "/login", "/api/v1/devices", "/nope", "/index.php"):
                r = await c.get(path)
                assert r.headers["x-content-type-options"] == "nosniff", path
                assert r.headers["x-frame-options"] == "DENY", path
                assert "frame-ancestors 'none'" in r.headers["content-security-policy"], path
                assert "'unsafe-inline'" not in r.headers["content-security-policy"]
    run(go())
