"""schemathesis against the hub's own ``/openapi.json``, with a valid full-scope token.

Every operation gets at most 30 generated requests (positive and negative data); each answer
must not be a 5xx and must match the documented status codes, headers, content type and
schema. The hub is real (init_hub in a temp dir, SQLite), with devices, telemetry, commands
and state in it; the shield runs with its per-request limits raised so that it does not turn
the fuzzer's volume into 429s, but its scanning rules stay on (their 400/403 are documented).
"""

from __future__ import annotations

import time

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

from smartx_hub import passwords
from smartx_hub.api import create_app
from smartx_hub.live import LiveSessions
from smartx_hub.shield import load_rules
from smartx_hub.state import init_hub
from smartx_hub.store import TelemetryBatch
from smartx_hub.tokens import MAX_EXPIRY_MS, SCOPES, TokenKeys, issue_token

ROOMY = {"rates": {"ip": {"rate": 100000.0, "burst": 100000},
                   "token": {"rate": 100000.0, "burst": 100000},
                   "account": {"rate": 100000.0, "burst": 100000}},
         "auth_failures": {"threshold": 100000}, "error_rate": {"threshold": 100000}}
STATE: dict = {}


def fresh_token(ctx) -> str:
    # The longest lifetime: tokens it creates may then ask for almost any lifetime.
    token, _ = issue_token(TokenKeys.from_context(ctx), ctx.store, STATE["user"], SCOPES, None,
                           MAX_EXPIRY_MS, "schemathesis", int(time.time() * 1000))
    return token


@pytest.fixture(scope="module")
def hub_app(tmp_path_factory):
    now = int(time.time() * 1000)
    ctx = init_hub(str(tmp_path_factory.mktemp("st") / "hub"), now_ms=now)
    STATE["ctx"] = ctx
    STATE["user"] = ctx.store.add_user("alice", passwords.hash_password("correct horse battery"), now)
    device = ctx.store.add_device("sensor-1", "hs256", None, b"1" * 32, now)
    ctx.store.add_telemetry([TelemetryBatch(device.id, i, [("temp", now - i * 1000, 20.5 + i),
                                                           ("raw", now - i * 1000, b"\x00")], now)
                             for i in range(30)])
    command = ctx.store.add_command(device.id, "blink", {"n": 1}, 60_000, now)
    ctx.store.set_reported_state(device.id, {"led": "on"}, now)
    STATE["token"] = fresh_token(ctx)
    STATE["ids"] = {"device_id": device.id, "command_id": command.id,
                    "token_id": issue_token(TokenKeys.from_context(ctx), ctx.store, STATE["user"],
                                            ["audit:read"], None, None, "victim", now)[1].id}
    yield create_app(ctx, LiveSessions(), rules=load_rules(override=ROOMY))
    ctx.close()


# The operations are driven by hand (hypothesis over each operation's strategy) rather than
# through ``schema.parametrize()``: the lazy fixture loader of this schemathesis release does
# not run under this pytest release, and the hub must live in a pytest tmp_path.
@pytest.mark.parametrize("mode, pinned", [(GenerationMode.POSITIVE, False),
                                          (GenerationMode.POSITIVE, True),
                                          (GenerationMode.NEGATIVE, False)],
                         ids=["positive", "positive-real-ids", "negative"])
def test_openapi_conformance(hub_app, mode, pinned):
    schema = schemathesis.openapi.from_asgi("/openapi.json", hub_app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 17  # every route of docs/api.md, /healthz included
    failures, statuses = [], {}
    for operation in operations:
        label = "%s %s" % (operation.method.upper(), operation.path)
        if mode == GenerationMode.NEGATIVE and operation.path == "/healthz":
            continue  # no parameters: there is no invalid request to make
        path_parameters = None
        if pinned:
            if label == "DELETE /api/v1/devices/{device_id}":
                continue  # would remove the device the other operations are pinned to
            path_parameters = {k: v for k, v in STATE["ids"].items()
                               if "{%s}" % k in operation.path}
        seen = statuses.setdefault(label, set())

        @given(case=operation.as_strategy(generation_mode=mode, path_parameters=path_parameters))
        @settings(max_examples=30, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        def check(case):
            response = case.call_and_validate(headers={"Authorization": "Bearer " + STATE["token"]})
            seen.add(response.status_code)
            assert response.status_code < 500
            if operation.path == "/api/v1/tokens/revoke-all" and response.status_code == 200:
                STATE["token"] = fresh_token(STATE["ctx"])  # it revoked the caller's token too

        try:
            check()
        except Exception as exc:  # collect them all: one report for every operation
            failures.append("%s: %s" % (label, str(exc)[:2000]))
    assert not failures, "\n\n".join(failures)
    if pinned:
        # With real ids, every operation must have succeeded at least once: the token worked.
        missing = [label for label, seen in statuses.items() if not seen & {200, 201, 204}]
        assert not missing, (missing, statuses)
