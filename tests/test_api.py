"""The remote API (smartx_hub/api.py) and dashboard sessions (smartx_hub/dashboard.py).

Real parts: a hub from ``init_hub`` in tmp_path with its SQLite store, real tokens, the real
app behind its shield; ``httpx`` over the ASGI transport for most tests, and a real uvicorn
HTTPS server on 127.0.0.1 (ephemeral port, the hub's certificate) for the secrecy test.
The listener's sessions are stand-ins that record what the API asked of them.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import os
import re
import time

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization

from smartx_device.jwt import device_token
from smartx_device.reasons import CLOSE_DEVICE_DISABLED, CLOSE_REVOKED
from smartx_hub import passwords
from hypothesis import given, strategies as st

from smartx_hub.api import ApiError, create_app, decode_cursor, encode_cursor
from smartx_hub.live import LiveSessions
from smartx_hub.shield import load_rules
from smartx_hub.state import init_hub
from smartx_hub.store import TelemetryBatch
from smartx_hub.tokens import SCOPES, TokenKeys, issue_token, seal_scope

from hubtools import https_server

NOW = 1_800_000_000_000
PASSWORD = "correct horse battery staple"
ROOMY = {"rates": {"ip": {"rate": 10000.0, "burst": 10000},
                   "token": {"rate": 10000.0, "burst": 10000},
                   "account": {"rate": 10000.0, "burst": 10000}},
         "auth_failures": {"threshold": 10000}, "error_rate": {"threshold": 10000}}


class Clock:
    """A clock the test moves by hand (milliseconds)."""

    def __init__(self, now: int = NOW) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


class RecordingSession:
    """A live-session handle that records what the API asks of it (the listener's part)."""

    def __init__(self, device_id: str, loop) -> None:
        self.device_id = device_id
        self.loop = loop
        self.closed: list = []
        self.wakes = 0

    def close(self, reason: int, detail: str) -> None:
        self.closed.append((reason, detail))

    def wake(self) -> None:
        self.wakes += 1


@pytest.fixture(scope="module")
def password_hash():
    return passwords.hash_password(PASSWORD)


def make_hub(path, password_hash):
    ctx = init_hub(str(path), now_ms=NOW)
    ctx.test_user = ctx.store.add_user("alice", password_hash, NOW)
    ctx.dev1 = ctx.store.add_device("sensor-1", "hs256", None, b"1" * 32, NOW)
    ctx.dev2 = ctx.store.add_device("sensor-2", "hs256", None, b"2" * 32, NOW)
    return ctx


@pytest.fixture
def hub(tmp_path, password_hash):
    ctx = make_hub(tmp_path / "hub", password_hash)
    yield ctx
    ctx.close()


def new_token(hub, scopes=SCOPES, devices=None, user=None, now=NOW, lifetime=None):
    token, record = issue_token(TokenKeys.from_context(hub), hub.store, user or hub.test_user,
                                scopes, devices, lifetime, "", now)
    return token, record


def app_for(hub, clock=None, live=None, **override):
    rules = load_rules(override=dict(ROOMY, **override))
    return create_app(hub, live or LiveSessions(), clock or Clock(), rules=rules)


def client(app, ip="10.0.0.1"):
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=(ip, 40000)),
                             base_url="https://testserver")


def bearer(token):
    return {"Authorization": "Bearer " + token}


def run(coro):
    return asyncio.run(coro)


def add_readings(hub, device_id, count, start_ts=NOW - 100_000, streams=("temp",), msg_base=0):
    batches = []
    for i in range(count):
        readings = [(s, start_ts + i * 1000, 20.0 + i + k) for k, s in enumerate(streams)]
        batches.append(TelemetryBatch(device_id, msg_base + i, readings, NOW))
    hub.store.add_telemetry(batches)


# -- every endpoint against every scope -------------------------------------------------------

ENDPOINTS = [
    ("GET", "/api/v1/devices", "devices:read", None),
    ("GET", "/api/v1/devices/{dev}", "devices:read", None),
    # A fresh device to toggle: under xdist the cases of one worker run in any order, and a
    # disabled dev1 would make the command case answer 409.
    ("POST", "/api/v1/devices/{fresh_dev}/disable", "devices:write", None),
    ("POST", "/api/v1/devices/{fresh_dev}/enable", "devices:write", None),
    ("DELETE", "/api/v1/devices/{fresh_dev}", "devices:write", None),
    ("GET", "/api/v1/devices/{dev}/telemetry", "telemetry:read", None),
    ("GET", "/api/v1/devices/{dev}/telemetry?format=csv", "telemetry:read", None),
    ("POST", "/api/v1/devices/{dev}/commands", "commands:write", {"name": "blink", "args": [1]}),
    ("GET", "/api/v1/devices/{dev}/commands", "commands:read", None),
    ("GET", "/api/v1/devices/{dev}/commands/{cmd}", "commands:read", None),
    ("GET", "/api/v1/devices/{dev}/state", "state:read", None),
    ("PUT", "/api/v1/devices/{dev}/state/desired", "state:write", {"desired": {"led": "on"}}),
    ("GET", "/api/v1/tokens", "tokens:read", None),
    ("POST", "/api/v1/tokens", "tokens:write", {"scopes": ["tokens:write"]}),
    ("DELETE", "/api/v1/tokens/{victim_token}", "tokens:write", None),
    ("POST", "/api/v1/tokens/revoke-all", "tokens:write", None),
    ("GET", "/api/v1/audit", "audit:read", None),
]


@pytest.fixture(scope="module")
def matrix(tmp_path_factory, password_hash):
    ctx = make_hub(tmp_path_factory.mktemp("matrix") / "hub", password_hash)
    ctx.command = ctx.store.add_command(ctx.dev1.id, "blink", None, 60_000, NOW)
    ctx.app = app_for(ctx)
    ctx.counter = 0
    yield ctx
    ctx.close()


def fill_path(hub, template, user):
    values = {"dev": hub.dev1.id, "cmd": getattr(hub, "command", None) and hub.command.id}
    if "{fresh_dev}" in template:
        hub.counter = getattr(hub, "counter", 0) + 1
        values["fresh_dev"] = hub.store.add_device("fresh-%d-%s" % (hub.counter, os.urandom(3).hex()),
                                                   "hs256", None, b"f" * 32, NOW).id
    if "{victim_token}" in template:
        values["victim_token"] = new_token(hub, ["audit:read"], user=user)[1].id
    return template.format(**values)


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("method, template, needed, body", ENDPOINTS,
                         ids=["%s %s" % (m, t) for m, t, _, _ in ENDPOINTS])
def test_every_endpoint_against_every_scope(matrix, method, template, needed, body, scope):
    # A fresh user per case: revoke-all and token deletion stay inside the case.
    user = matrix.store.add_user("u-" + os.urandom(6).hex(), "x", NOW)
    token, _ = new_token(matrix, [scope], user=user)
    path = fill_path(matrix, template, user)

    async def go():
        async with client(matrix.app) as c:
            return await c.request(method, path, headers=bearer(token), json=body)
    response = run(go())
    if scope == needed:
        assert response.status_code in (200, 201, 204), response.text
    else:
        assert response.status_code == 403, response.text
        assert response.json() == {"error": "insufficient_scope",
                                   "detail": "this call needs the %s scope" % needed}


def test_device_limit_is_honoured(hub):
    app = app_for(hub)
    command = hub.store.add_command(hub.dev2.id, "blink", None, 60_000, NOW)
    token, _ = new_token(hub, SCOPES, [hub.dev1.id])
    full, _ = new_token(hub, SCOPES)

    async def go():
        async with client(app) as c:
            listed = await c.get("/api/v1/devices", headers=bearer(token))
            assert [d["id"] for d in listed.json()["items"]] == [hub.dev1.id]
            for method, template, _, body in ENDPOINTS:
                if "{dev}" not in template:
                    continue
                for device, allowed in ((hub.dev1.id, True), (hub.dev2.id, False)):
                    path = template.replace("{dev}", device).replace("{cmd}", command.id)
                    r = await c.request(method, path, headers=bearer(token), json=body)
                    if allowed:
                        assert r.status_code != 403, (path, r.text)
                    else:
                        assert r.status_code == 403, (path, r.text)
                        assert r.json()["error"] == "device_not_allowed"
            # No existence oracle for a limited token; a full one learns 404.
            assert (await c.get("/api/v1/devices/dev_nonexistent", headers=bearer(token))).status_code == 403
            assert (await c.get("/api/v1/devices/dev_nonexistent", headers=bearer(full))).status_code == 404
            # A limited creator makes only limited tokens.
            r = await c.post("/api/v1/tokens", headers=bearer(token), json={"scopes": ["devices:read"]})
            assert r.status_code == 403 and r.json()["error"] == "scope_escalation"
            r = await c.post("/api/v1/tokens", headers=bearer(token),
                             json={"scopes": ["devices:read"], "devices": [hub.dev2.id]})
            assert r.status_code == 403
            r = await c.post("/api/v1/tokens", headers=bearer(token),
                             json={"scopes": ["devices:read"], "devices": [hub.dev1.id]})
            assert r.status_code == 201 and r.json()["devices"] == [hub.dev1.id]
    run(go())


# -- refused tokens ---------------------------------------------------------------------------

def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def forged_tokens(hub):
    """Each kind of bad credential the issue names, built against a live valid token."""
    good, record = new_token(hub, ["devices:read"])
    strong, _ = new_token(hub, SCOPES)
    head_b64, payload_b64, signature = good[4:].split(".")
    header = json.loads(unb64url(head_b64))
    claims = json.loads(unb64url(payload_b64))
    kid = hub.token_key_id

    def es256(h, c):
        return "sxh_" + jwt.encode(c, hub.token_signing_key, algorithm="ES256", headers=h)

    pem = hub.token_public_key.public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    hs_input = "%s.%s" % (b64url(json.dumps(dict(header, alg="HS256")).encode()), payload_b64)
    tampered = dict(claims, exp=claims["exp"] + 10 ** 6)
    moved = dict(claims, scp=json.loads(unb64url(strong[4:].split(".")[1]))["scp"])
    return {
        "alg none": "sxh_%s.%s." % (b64url(json.dumps(dict(header, alg="none")).encode()),
                                    payload_b64),
        "HS256 with public key": "sxh_%s.%s" % (
            hs_input, b64url(hmac.new(pem, hs_input.encode(), hashlib.sha256).digest())),
        "tampered payload": "sxh_%s.%s.%s" % (head_b64, b64url(json.dumps(tampered).encode()),
                                              signature),
        "scope moved": "sxh_%s.%s.%s" % (head_b64, b64url(json.dumps(moved).encode()), signature),
        "scope moved, re-signed": es256({"typ": "sx-api+jwt", "kid": kid}, moved),
        "unknown kid": es256({"typ": "sx-api+jwt", "kid": "ffffffffffffffff"}, claims),
        "crit header": es256({"typ": "sx-api+jwt", "kid": kid, "crit": ["exp"]}, claims),
        "device JWT": "sxh_" + device_token(b"1" * 32, hub.dev1.id, hub.hub_id, NOW, b"n" * 16),
        "device typ, hub key": es256({"typ": "sx-device+jwt", "kid": kid}, claims),
        "no prefix": good[4:],
        "garbage": "sxh_not.a.token",
        "record deleted": es256({"typ": "sx-api+jwt", "kid": kid},
                                dict(claims, jti="gone", scp=seal_scope(hub.scope_key, "gone",
                                                                         ["devices:read"], None))),
    }


def test_forged_tokens_get_401(hub):
    app = app_for(hub)
    forged = forged_tokens(hub)

    async def go():
        async with client(app) as c:
            for name, token in forged.items():
                r = await c.get("/api/v1/devices", headers=bearer(token))
                assert r.status_code == 401, name
                assert set(r.json()) == {"error", "detail"}, name
                assert r.headers["www-authenticate"].startswith("Bearer"), name
                assert token not in r.text
    run(go())


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Basic YWxpY2U6cHc="},
                                     {"Authorization": "Bearer"}, {"Authorization": "Bearer  "},
                                     {"Cookie": "sx_session=made-up"}])
def test_missing_or_malformed_credentials_get_401(hub, headers):
    app = app_for(hub)

    async def go():
        async with client(app) as c:
            return await c.get("/api/v1/devices", headers=headers)
    r = run(go())
    assert r.status_code == 401 and r.json()["error"] in ("unauthorized", "invalid_token")


def test_expired_token_gets_401_with_the_injected_clock(hub):
    clock = Clock()
    app = app_for(hub, clock)
    token, record = new_token(hub, lifetime=3_600_000)

    async def go():
        async with client(app) as c:
            assert (await c.get("/api/v1/devices", headers=bearer(token))).status_code == 200
            clock.now = record.expires_ms
            r = await c.get("/api/v1/devices", headers=bearer(token))
            assert r.status_code == 401 and r.json()["error"] == "token_expired"
    run(go())


def test_revocation_is_effective_on_the_very_next_request(hub):
    app = app_for(hub)
    admin, _ = new_token(hub, ["tokens:read", "tokens:write"])
    victim, record = new_token(hub, ["devices:read"])

    async def go():
        async with client(app) as c:
            assert (await c.get("/api/v1/devices", headers=bearer(victim))).status_code == 200
            assert (await c.delete("/api/v1/tokens/" + record.id, headers=bearer(admin))).status_code == 204
            r = await c.get("/api/v1/devices", headers=bearer(victim))
            assert r.status_code == 401 and r.json()["error"] == "token_revoked"
            listed = (await c.get("/api/v1/tokens", headers=bearer(admin))).json()["items"]
            assert {t["id"]: t["status"] for t in listed}[record.id] == "revoked"
            # Revoking again is a no-op; someone else's or an unknown token is a 404.
            assert (await c.delete("/api/v1/tokens/" + record.id, headers=bearer(admin))).status_code == 204
            assert (await c.delete("/api/v1/tokens/nope", headers=bearer(admin))).status_code == 404
            other = hub.store.add_user("mallory", "x", NOW)
            _, theirs = new_token(hub, ["audit:read"], user=other)
            assert (await c.delete("/api/v1/tokens/" + theirs.id, headers=bearer(admin))).status_code == 404
            assert theirs.id not in [t["id"] for t in listed]
            # Revoke all: every token of the account, the caller's included, dies at once.
            survivor, _ = new_token(hub, ["devices:read"])
            r = await c.post("/api/v1/tokens/revoke-all", headers=bearer(admin))
            assert r.status_code == 200 and r.json() == {"revoked": 2}
            for token in (survivor, admin):
                assert (await c.get("/api/v1/devices", headers=bearer(token))).status_code == 401
            # mallory's token lives on.
            assert hub.store.get_token(theirs.id).revoked_ms is None
    run(go())


def test_token_creation_never_escalates(hub):
    clock = Clock()
    app = app_for(hub, clock)
    creator, creator_record = new_token(hub, ["tokens:write", "devices:read"], lifetime=86_400_000)

    async def go():
        async with client(app) as c:
            r = await c.post("/api/v1/tokens", headers=bearer(creator),
                             json={"scopes": ["devices:write"]})
            assert r.status_code == 403 and r.json()["error"] == "scope_escalation"
            r = await c.post("/api/v1/tokens", headers=bearer(creator),
                             json={"scopes": ["devices:read", "audit:read"]})
            assert r.status_code == 403
            r = await c.post("/api/v1/tokens", headers=bearer(creator),
                             json={"scopes": ["devices:read"], "expires_in_s": 2 * 86400})
            assert r.status_code == 403 and "outlive" in r.json()["detail"]
            r = await c.post("/api/v1/tokens", headers=bearer(creator), json={"scopes": ["devices:read"]})
            assert r.status_code == 201 and r.json()["expires_ms"] <= creator_record.expires_ms
            r = await c.post("/api/v1/tokens", headers=bearer(creator),
                             json={"scopes": ["devices:read"], "expires_in_s": 3600, "name": "ci"})
            assert r.status_code == 201
            child = r.json()
            assert child["scopes"] == ["devices:read"] and child["name"] == "ci"
            assert child["expires_ms"] == (NOW + 3_600_000) // 1000 * 1000
            assert r.headers["cache-control"] == "no-store"
            assert (await c.get("/api/v1/devices", headers=bearer(child["token"]))).status_code == 200
            for bad in ({"scopes": []}, {"scopes": ["root"]}, {"scopes": ["devices:read"], "devices": []},
                        {"scopes": ["devices:read"], "expires_in_s": 10},
                        {"scopes": ["devices:read"], "extra": 1},
                        {"scopes": ["devices:read"], "name": "a\nb"},
                        {"scopes": ["devices:read"], "devices": ["bad id"]}):
                r = await c.post("/api/v1/tokens", headers=bearer(creator), json=bad)
                assert r.status_code == 422 and r.json()["error"] == "validation_error", bad
            r = await c.post("/api/v1/tokens", headers=bearer(creator),
                             json={"scopes": ["devices:read"], "devices": ["dev_unknown"]})
            assert r.status_code == 404 and "unknown device" in r.json()["detail"]
    run(go())


# -- resources --------------------------------------------------------------------------------

def test_devices_online_last_seen_disable_enable_remove(hub):
    clock = Clock()
    live = LiveSessions()
    app = app_for(hub, clock, live)
    token, record = new_token(hub, ["devices:read", "devices:write"])
    hub.store.touch_device(hub.dev1.id, NOW - 5000)

    async def go():
        session = RecordingSession(hub.dev1.id, asyncio.get_running_loop())
        live.register(session)
        async with client(app, "10.7.0.7") as c:
            one = (await c.get("/api/v1/devices/" + hub.dev1.id, headers=bearer(token))).json()
            assert one == {"id": hub.dev1.id, "name": "sensor-1", "auth": "hs256", "enabled": True,
                           "online": True, "created_ms": NOW, "last_seen_ms": NOW - 5000}
            other = (await c.get("/api/v1/devices/" + hub.dev2.id, headers=bearer(token))).json()
            assert other["online"] is False and other["last_seen_ms"] is None
            assert "secret" not in json.dumps(one)
            clock.now += 10
            r = await c.post("/api/v1/devices/%s/disable" % hub.dev1.id, headers=bearer(token))
            assert r.status_code == 200 and r.json()["enabled"] is False
            await asyncio.sleep(0.05)
            assert session.closed == [(CLOSE_DEVICE_DISABLED, "disabled through the API")]
            assert hub.store.get_device(hub.dev1.id).enabled is False
            r = await c.post("/api/v1/devices/%s/enable" % hub.dev1.id, headers=bearer(token))
            assert r.json()["enabled"] is True and hub.store.get_device(hub.dev1.id).enabled
            r = await c.delete("/api/v1/devices/" + hub.dev1.id, headers=bearer(token))
            assert r.status_code == 204 and r.content == b""
            await asyncio.sleep(0.05)
            assert session.closed[-1][0] == CLOSE_REVOKED
            assert (await c.get("/api/v1/devices/" + hub.dev1.id, headers=bearer(token))).status_code == 404
        audit = hub.store.list_audit(10)
        actions = [(e.action, e.detail.get("device")) for e in audit]
        assert ("device.disabled", hub.dev1.id) in actions
        assert ("device.enabled", hub.dev1.id) in actions
        assert ("device.removed", hub.dev1.id) in actions
        disabled = next(e for e in audit if e.action == "device.disabled")
        assert disabled.actor == "user:alice/token:" + record.id
        assert disabled.source == "10.7.0.7" and disabled.ts_ms == NOW + 10
    run(go())


def test_telemetry_pages_newest_first_json_and_csv(hub):
    app = app_for(hub)
    token, _ = new_token(hub, ["telemetry:read"])
    add_readings(hub, hub.dev1.id, 25, streams=("temp", "hum"))
    hub.store.add_telemetry([TelemetryBatch(hub.dev1.id, 999, [
        ("=cmd", NOW - 200_000, "=HYPERLINK(\"x\")"), ("blob", NOW - 200_000, b"\x00\x01"),
        ("nan", NOW - 200_000, float("nan"))], NOW)])
    base = "/api/v1/devices/%s/telemetry" % hub.dev1.id

    async def go():
        async with client(app) as c:
            seen, cursor, pages = [], None, 0
            while True:
                url = base + "?limit=7" + ("&cursor=" + cursor if cursor else "")
                page = (await c.get(url, headers=bearer(token))).json()
                seen.extend(page["items"])
                pages += 1
                cursor = page["next_cursor"]
                if cursor is None:
                    break
                assert pages < 20
            assert len(seen) == 53 and pages == 8
            keys = [(r["ts_ms"], r["stream"], r["msg_id"]) for r in seen]
            assert len(set(keys)) == 53
            assert [r["ts_ms"] for r in seen] == sorted((r["ts_ms"] for r in seen), reverse=True)
            odd = {r["stream"]: r["value"] for r in seen if r["msg_id"] == 999}
            assert odd == {"=cmd": "=HYPERLINK(\"x\")", "blob": "AAE=", "nan": None}

            window = (await c.get(base, headers=bearer(token), params={
                "since": NOW - 100_000 + 5000, "until": NOW - 100_000 + 9000,
                "stream": "temp"})).json()
            assert [r["ts_ms"] for r in window["items"]] == [NOW - 100_000 + t * 1000
                                                             for t in (9, 8, 7, 6, 5)]
            assert all(r["stream"] == "temp" for r in window["items"])

            csv_response = await c.get(base, headers=bearer(token),
                                       params={"format": "csv", "limit": 60})
            assert csv_response.headers["content-type"].startswith("text/csv")
            lines = csv_response.text.strip().split("\n")
            assert lines[0] == "ts_ms,stream,value,received_ms,msg_id" and len(lines) == 54
            assert "'=cmd" in csv_response.text and "'=HYPERLINK" in csv_response.text
            paged = await c.get(base, headers=bearer(token), params={"format": "csv", "limit": 5})
            assert paged.headers["x-next-cursor"]

            for bad in ({"cursor": "garbage"}, {"cursor": "a5"}, {"cursor": "r" + "9" * 17}, {"limit": 0},
                        {"limit": 5000}, {"since": -1}, {"format": "xml"}, {"until": 2 ** 60}):
                r = await c.get(base, headers=bearer(token), params=bad)
                assert r.status_code in (400, 422) and set(r.json()) == {"error", "detail"}, bad
    run(go())


@given(st.sampled_from("ra"), st.integers(0, 10 ** 16 - 1))
def test_cursor_roundtrip(kind, number):
    assert decode_cursor(kind, encode_cursor(kind, number)) == number


@given(st.text(max_size=30))
def test_cursor_decoder_refuses_anything_else(text):
    try:
        number = decode_cursor("r", text)
    except ApiError as exc:
        assert exc.status == 400
    else:
        assert re.fullmatch(r"r[0-9]{1,16}", text) and int(text[1:]) == number


def test_commands_queue_wake_and_status(hub):
    live = LiveSessions()
    app = app_for(hub, live=live)
    token, _ = new_token(hub, ["commands:read", "commands:write", "devices:write"])
    base = "/api/v1/devices/%s/commands" % hub.dev1.id

    async def go():
        session = RecordingSession(hub.dev1.id, asyncio.get_running_loop())
        live.register(session)
        async with client(app) as c:
            r = await c.post(base, headers=bearer(token),
                             json={"name": "set-led", "args": {"on": "zebra-payload"}, "ttl_s": 60})
            assert r.status_code == 201, r.text
            command = r.json()
            assert command["status"] == "queued" and command["args"] == {"on": "zebra-payload"}
            assert command["expires_ms"] - command["created_ms"] == 60_000
            assert r.headers["location"] == base + "/" + command["id"]
            await asyncio.sleep(0.05)
            assert session.wakes == 1
            hub.store.set_command_result(command["id"], True, {"ok": 1}, None, NOW + 5)
            got = (await c.get(base + "/" + command["id"], headers=bearer(token))).json()
            assert got["status"] == "succeeded" and got["result"] == {"ok": 1}
            listed = (await c.get(base, headers=bearer(token))).json()["items"]
            assert [x["id"] for x in listed] == [command["id"]]
            # The command id under another device is not found.
            other = "/api/v1/devices/%s/commands/%s" % (hub.dev2.id, command["id"])
            assert (await c.get(other, headers=bearer(token))).status_code == 404
            deep = {"a": None}
            for _ in range(20):
                deep = {"a": deep}
            for bad in ({"name": ""}, {"name": "x" * 65}, {"name": "bad name"}, {"name": "n", "ttl_s": 0},
                        {"name": "n", "args": deep},
                        {"name": "n", "args": "x" * 20000}, {"name": "n", "other": 1}):
                r = await c.post(base, headers=bearer(token), json=bad)
                assert r.status_code == 422 and r.json()["error"] == "validation_error", bad
            r = await c.post(base, headers=dict(bearer(token), **{"content-type": "application/json"}),
                             content=b"[" * 30000 + b"]" * 30000)
            assert r.status_code in (400, 422) and set(r.json()) == {"error", "detail"}
            await c.post("/api/v1/devices/%s/disable" % hub.dev1.id, headers=bearer(token))
            r = await c.post(base, headers=bearer(token), json={"name": "blink"})
            assert r.status_code == 409 and r.json()["error"] == "device_disabled"
        sent = [e for e in hub.store.list_audit(20) if e.action == "command.sent"]
        assert len(sent) == 1 and sent[0].detail["command"] == command["id"]
        assert "zebra-payload" not in json.dumps(sent[0].detail)  # arguments stay out of the audit
    run(go())


def test_state_desired_and_reported(hub):
    live = LiveSessions()
    app = app_for(hub, live=live)
    token, _ = new_token(hub, ["state:read", "state:write"])
    base = "/api/v1/devices/%s/state" % hub.dev1.id
    hub.store.set_reported_state(hub.dev1.id, {"led": "off", "raw": b"\x01"}, NOW - 10)

    async def go():
        session = RecordingSession(hub.dev1.id, asyncio.get_running_loop())
        live.register(session)
        async with client(app) as c:
            state = (await c.get(base, headers=bearer(token))).json()
            assert state == {"device_id": hub.dev1.id, "desired": {}, "desired_version": 0,
                             "desired_ms": None, "reported": {"led": "off", "raw": "AQ=="},
                             "reported_ms": NOW - 10}
            for version in (1, 2):
                r = await c.put(base + "/desired", headers=bearer(token),
                                json={"desired": {"led": "on", "n": version}})
                assert r.status_code == 200 and r.json()["desired_version"] == version
            await asyncio.sleep(0.05)
            assert session.wakes == 2
            assert (await c.get(base, headers=bearer(token))).json()["desired"] == {"led": "on", "n": 2}
            for bad in ({"desired": [1]}, {"desired": "x"}, {}, {"led": "on"}):
                r = await c.put(base + "/desired", headers=bearer(token), json=bad)
                assert r.status_code == 422, bad
    run(go())


def test_audit_log_pages_and_records_who_where_when(hub):
    clock = Clock()
    app = app_for(hub, clock)
    token, record = new_token(hub, SCOPES)

    async def go():
        async with client(app, "10.8.0.8") as c:
            for i in range(5):
                clock.now = NOW + i
                r = await c.post("/api/v1/tokens", headers=bearer(token),
                                 json={"scopes": ["audit:read"], "name": "n%d" % i})
                created = r.json()
                await c.delete("/api/v1/tokens/" + created["id"], headers=bearer(token))
            first = (await c.get("/api/v1/audit?limit=4", headers=bearer(token))).json()
            second = (await c.get("/api/v1/audit?limit=4&cursor=" + first["next_cursor"],
                                  headers=bearer(token))).json()
            ids = [e["id"] for e in first["items"] + second["items"]]
            assert ids == sorted(ids, reverse=True) and len(set(ids)) == 8
            entry = next(e for e in first["items"] if e["action"] == "token.revoked")
            assert entry["actor"] == "user:alice/token:" + record.id
            assert entry["source"] == "10.8.0.8" and entry["ts_ms"] == NOW + 4
            created_entries = [e for e in first["items"] + second["items"]
                               if e["action"] == "token.created"]
            assert created_entries and all("scopes" in e["detail"] for e in created_entries)
    run(go())


# -- error shapes and the OpenAPI document ----------------------------------------------------

def test_framework_errors_are_json(hub):
    app = app_for(hub)
    token, _ = new_token(hub)

    async def go():
        async with client(app) as c:
            r = await c.get("/api/v1/nowhere", headers=bearer(token))
            assert r.status_code == 404 and r.json() == {"error": "not_found", "detail": "Not Found"}
            r = await c.put("/api/v1/devices", headers=bearer(token))
            assert r.status_code == 405 and r.json()["error"] == "method_not_allowed"
            assert "GET" in r.headers["allow"]
            r = await c.post("/api/v1/tokens", headers=dict(bearer(token), **{"content-type": "application/json"}),
                             content=b"{not json")
            assert r.status_code == 422 and r.json()["error"] == "validation_error"
            r = await c.get("/api/v1/audit?limit=abc", headers=bearer(token))
            assert r.status_code == 422 and "limit" in r.json()["detail"]
    run(go())


def test_openapi_documents_security_and_errors(hub):
    app = app_for(hub)

    async def go():
        async with client(app) as c:
            return (await c.get("/openapi.json")).json()
    doc = run(go())
    schemes = doc["components"]["securitySchemes"]
    assert schemes["bearerAuth"] == {"type": "http", "scheme": "bearer", "bearerFormat": schemes["bearerAuth"]["bearerFormat"],
                                     "description": schemes["bearerAuth"]["description"]}
    assert schemes["sessionCookie"]["in"] == "cookie" and schemes["sessionCookie"]["name"] == "sx_session"
    assert doc["components"]["schemas"]["Error"]["required"] == ["error", "detail"]
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    paths = doc["paths"]
    expected = {"/api/v1/devices", "/api/v1/devices/{device_id}", "/api/v1/devices/{device_id}/disable",
                "/api/v1/devices/{device_id}/enable", "/api/v1/devices/{device_id}/telemetry",
                "/api/v1/devices/{device_id}/commands", "/api/v1/devices/{device_id}/commands/{command_id}",
                "/api/v1/devices/{device_id}/state", "/api/v1/devices/{device_id}/state/desired",
                "/api/v1/tokens", "/api/v1/tokens/{token_id}", "/api/v1/tokens/revoke-all",
                "/api/v1/audit", "/healthz"}
    assert set(paths) == expected
    for path, operations in paths.items():
        for method, operation in operations.items():
            if path.startswith("/api/"):
                assert {"bearerAuth": []} in operation["security"]
                for code in ("401", "403", "422", "429"):
                    ref = operation["responses"][code]["content"]["application/json"]["schema"]
                    assert ref == {"$ref": "#/components/schemas/Error"}, (path, method, code)
            else:
                assert operation["security"] == []


# -- dashboard sessions -----------------------------------------------------------------------

def csrf_from(html: str) -> str:
    match = re.search(r'name="csrf(?:-token)?" (?:content|value)="([^"]+)"', html)
    assert match, html[:500]
    return match.group(1)


async def login(c, username="alice", password=PASSWORD):
    page = await c.get("/login")
    return await c.post("/login", data={"username": username, "password": password,
                                        "csrf": csrf_from(page.text)})


def test_session_login_cookie_csrf_and_logout(hub):
    app = app_for(hub)

    async def go():
        async with client(app, "10.9.0.1") as c:
            assert (await c.get("/", follow_redirects=False)).headers["location"] == "/login"
            r = await login(c)
            assert r.status_code == 303 and r.headers["location"] == "/"
            cookie = next(v for k, v in r.headers.multi_items()
                          if k == "set-cookie" and v.startswith("sx_session="))
            flags = {part.strip().lower() for part in cookie.split(";")[1:]}
            assert {"httponly", "secure", "samesite=strict", "path=/"} <= flags
            page = await c.get("/")
            assert page.status_code == 200 and "alice" in page.text
            csrf = csrf_from(page.text)
            headers = {"X-CSRF-Token": csrf}
            assert (await c.get("/api/v1/devices", headers=headers)).status_code == 200
            # The session has the user's full scope, the CSRF header is required.
            r = await c.post("/api/v1/tokens", headers=headers,
                             json={"scopes": list(SCOPES), "name": "from the dashboard"})
            assert r.status_code == 201
            created = r.json()["token"]
            for bad in ({}, {"X-CSRF-Token": "wrong"}, {"X-CSRF-Token": csrf + "x"}):
                r = await c.get("/api/v1/devices", headers=bad)
                assert r.status_code == 403 and r.json()["error"] == "csrf_failed"
            # Logout needs the CSRF field, then the session is gone.
            r = await c.post("/logout", data={"csrf": "wrong"})
            assert r.status_code == 403
            r = await c.post("/logout", data={"csrf": csrf})
            assert r.status_code == 303
            c.cookies.clear()
            c.cookies.set("sx_session", re.match(r"sx_session=([^;]+)", cookie).group(1),
                          domain="testserver")
            assert (await c.get("/api/v1/devices", headers=headers)).status_code == 401
        return created
    created = run(go())
    actions = [(e.action, e.actor) for e in hub.store.list_audit(20)]
    assert ("login.succeeded", "user:alice") in actions and ("logout", "user:alice") in actions
    assert created not in json.dumps([e.detail for e in hub.store.list_audit(20)])


def test_login_failures_throttle_and_audit(hub):
    app = app_for(hub, login={"ip_threshold": 4, "user_threshold": 2, "window_s": 900,
                              "block_s": 300, "max_block_s": 3600})

    async def go():
        async with client(app, "10.10.0.1") as a, client(app, "10.10.0.2") as b:
            page = await a.get("/login")
            r = await a.post("/login", data={"username": "alice", "password": PASSWORD,
                                             "csrf": "forged"})
            assert r.status_code == 403  # login CSRF: the double-submit value must match
            assert csrf_from(page.text)
            r = await login(a, "alice", "wrong password 1")
            assert r.status_code == 401 and "Wrong username or password" in r.text
            r = await login(b, "alice", "wrong password 2")
            assert r.status_code == 401
            # Two failures for alice: her login is paused from every address ...
            r = await login(b, "alice", PASSWORD)
            assert r.status_code == 429 and int(r.headers["retry-after"]) > 0
            # ... and an unknown username looks the same as a wrong password.
            r = await login(a, "nobody", "whatever password")
            assert r.status_code == 401 and "Wrong username or password" in r.text
            r = await login(a, "nobody2", "whatever password")
            assert r.status_code == 401
            r = await login(a, "nobody3", "whatever password")  # fourth failure from this IP
            assert r.status_code == 401
            r = await login(a, "carol", "anything at all")
            assert r.status_code == 429
    run(go())
    failed = [e for e in hub.store.list_audit(50) if e.action == "login.failed"]
    assert len(failed) == 5 and {e.source for e in failed} == {"10.10.0.1", "10.10.0.2"}
    assert failed[0].actor.startswith("user:")


def test_dashboard_pages_escape_and_need_login(hub):
    app = app_for(hub)

    async def go():
        async with client(app) as c:
            for path in ("/", "/tokens", "/audit", "/devices/x"):
                r = await c.get(path, follow_redirects=False)
                assert r.status_code == 303 and r.headers["location"] == "/login"
            await login(c)
            r = await c.get('/devices/"><img src=x onerror=alert(1)>')
            assert r.status_code == 200
            assert "<img" not in r.text and '&quot;&gt;&lt;img src=x onerror=alert(1)&gt;' in r.text
            for asset in ("/static/app.js", "/static/chart.js", "/static/style.css"):
                assert (await c.get(asset)).status_code == 200
    run(go())


# -- secrecy through a real HTTPS server ------------------------------------------------------


def test_token_secret_over_real_https_nowhere_after_creation(tmp_path, caplog):
    # Certificates must be valid on the real clock: this hub is made "now".
    hub = init_hub(str(tmp_path / "real-hub"), now_ms=int(time.time() * 1000))
    hub.test_user = hub.store.add_user("alice", "x", NOW)
    hub.dev1 = hub.store.add_device("sensor-1", "hs256", None, b"1" * 32, NOW)
    hub.dev2 = hub.store.add_device("sensor-2", "hs256", None, b"2" * 32, NOW)
    caplog.set_level(logging.DEBUG)
    for name in ("uvicorn", "uvicorn.access", "uvicorn.error", "smartx_hub", "httpx", "httpcore"):
        caplog.set_level(logging.DEBUG, logger=name)
    app = create_app(hub, LiveSessions(), rules=load_rules(override=ROOMY))
    bootstrap, _ = new_token(hub, SCOPES, now=int(time.time() * 1000))
    bodies = []
    with https_server(app, hub, access_log=True) as base, \
            httpx.Client(base_url=base, verify=hub.client_tls_context(), timeout=10) as c:
        assert c.get("/healthz").json() == {"status": "ok"}
        r = c.post("/api/v1/tokens", headers=bearer(bootstrap),
                   json={"scopes": ["telemetry:read"], "devices": [hub.dev1.id], "name": "curl"})
        assert r.status_code == 201, r.text
        token, token_id = r.json()["token"], r.json()["id"]
        assert r.headers["cache-control"] == "no-store"
        ok = c.get("/api/v1/devices/%s/telemetry" % hub.dev1.id, headers=bearer(token))
        assert ok.status_code == 200
        bodies.append(ok.text)
        bodies.append(c.get("/api/v1/devices/%s/telemetry" % hub.dev2.id,
                            headers=bearer(token)).text)  # 403: device limit
        bodies.append(c.get("/api/v1/tokens", headers=bearer(bootstrap)).text)
        bodies.append(c.get("/api/v1/audit", headers=bearer(bootstrap)).text)
        assert c.delete("/api/v1/tokens/" + token_id, headers=bearer(bootstrap)).status_code == 204
        refused = c.get("/api/v1/devices/%s/telemetry" % hub.dev1.id, headers=bearer(token))
        assert refused.status_code == 401
        bodies.append(refused.text)
        bodies.append(c.get("/api/v1/audit", headers=bearer(bootstrap)).text)
        bodies.append(c.get("/openapi.json").text)
    assert any(token_id in b for b in bodies)  # the listings do name the token ...
    for body in bodies:
        assert token not in body  # ... never the token itself
    messages = [r.getMessage() + " " + repr(r.args) + " " + str(r.exc_text) for r in caplog.records]
    assert any(r.name == "uvicorn.access" for r in caplog.records), "access log not captured"
    assert any("/api/v1/tokens" in m for m in messages)
    jws = token[4:]
    for message in messages:
        assert jws not in message and jws.split(".")[2] not in message
    hub.close()
    blob = b"".join(open(os.path.join(hub.data_dir, n), "rb").read()
                    for n in os.listdir(hub.data_dir) if n.startswith("hub.db"))
    assert hashlib.sha256(token.encode()).hexdigest().encode() in blob
    for piece in [token, jws] + jws.split("."):
        assert piece.encode() not in blob
