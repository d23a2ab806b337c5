"""API tokens (smartx_hub/tokens.py), passwords, and the ``token``/``user`` commands.

Real parts: a hub made by ``init_hub`` in tmp_path (real SQLite file, real keys); PyJWT as the
reference decoder; the CLI through ``smartx_hub.cli.main`` and one real subprocess.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import subprocess
import sys
import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings, strategies as st

from smartx_device.jwt import device_token
from smartx_hub import passwords, tokens
from smartx_hub.state import init_hub, load_hub
from smartx_hub.tokens import (
    SCOPES,
    GrantError,
    Principal,
    TokenError,
    TokenKeys,
    TokenRequestError,
    TokenVerifier,
    check_grant,
    issue_token,
    open_scope,
    parse_duration,
    seal_scope,
)

NOW = 1_800_000_000_000  # a fixed "now" in ms: every clock here is this or derived from it
# A pre-computed argon2id hash: users made in bulk need no 0.1 s hashing each.
PASSWORD = "correct horse battery staple"


@pytest.fixture(scope="module")
def password_hash():
    return passwords.hash_password(PASSWORD)


@pytest.fixture
def hub(tmp_path, password_hash):
    ctx = init_hub(str(tmp_path / "hub"), now_ms=NOW)
    ctx.test_user = ctx.store.add_user("alice", password_hash, NOW)
    ctx.test_device = ctx.store.add_device("sensor-1", "hs256", None, b"s" * 32, NOW)
    yield ctx
    ctx.close()


def keys_of(ctx) -> TokenKeys:
    return TokenKeys.from_context(ctx)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def parts(token: str):
    header, payload, signature = token[len("sxh_"):].split(".")
    return json.loads(unb64url(header)), json.loads(unb64url(payload)), signature


def new_token(ctx, scopes=("telemetry:read",), devices=None, now=NOW, lifetime=None):
    return issue_token(keys_of(ctx), ctx.store, ctx.test_user, scopes, devices, lifetime, "t", now)


def sign_es256(ctx, header: dict, claims: dict) -> str:
    return "sxh_" + jwt.encode(claims, ctx.token_signing_key, algorithm="ES256", headers=header)


def signed_and_recorded(ctx, header: dict, **changes) -> str:
    """A token signed with the hub's real key AND recorded in the store as if issued: only the
    check under test stands between it and acceptance."""
    jti = "forged-" + os.urandom(6).hex()
    claims = {"iss": ctx.hub_id, "aud": "smartx-api:" + ctx.hub_id, "sub": ctx.test_user.id,
              "jti": jti, "iat": NOW // 1000, "exp": NOW // 1000 + 3600,
              "scp": seal_scope(ctx.scope_key, jti, ["telemetry:read"], None)}
    claims.update(changes)
    claims = {k: v for k, v in claims.items() if v is not None}
    token = sign_es256(ctx, header, claims)
    ctx.store.add_token(tokens.TokenRecord(
        id=jti, user_id=ctx.test_user.id, name="", token_hash=tokens.token_hash(token),
        hint=token[-4:], scopes=["telemetry:read"], devices=None, created_ms=NOW,
        expires_ms=NOW + 3_600_000))
    return token


def test_signed_and_recorded_control(hub):
    """The control for the isolation helper: with an honest header it is accepted."""
    token = signed_and_recorded(hub, {"typ": "sx-api+jwt", "kid": hub.token_key_id})
    assert TokenVerifier(keys_of(hub), hub.store).verify(token, NOW).username == "alice"


# -- issuing ----------------------------------------------------------------------------------

def test_token_shape_and_differential_decode_with_pyjwt(hub):
    token, record = new_token(hub, ["telemetry:read", "devices:read"], [hub.test_device.id])
    assert token.startswith("sxh_")
    header, claims, _ = parts(token)
    assert header == {"alg": "ES256", "typ": "sx-api+jwt", "kid": hub.token_key_id}
    assert set(claims) == {"iss", "aud", "sub", "jti", "iat", "exp", "scp"}
    # Reference decode by PyJWT with the hub's public key, independent of our verifier.
    decoded = jwt.decode(token[4:], hub.token_public_key, algorithms=["ES256"],
                         audience="smartx-api:" + hub.hub_id, issuer=hub.hub_id,
                         options={"verify_exp": False, "verify_iat": False})
    assert decoded["sub"] == hub.test_user.id and decoded["jti"] == record.id
    assert decoded["exp"] - decoded["iat"] == 90 * 86400
    # The scope is not readable in the token: neither names nor the device id appear.
    payload_text = unb64url(token[4:].split(".")[1]).decode()
    for secret_part in ("telemetry", "devices:read", hub.test_device.id):
        assert secret_part not in payload_text
    assert record.token_hash == hashlib.sha256(token.encode()).hexdigest()
    assert record.hint == token[-4:] and len(record.hint) == 4
    assert record.scopes == ["devices:read", "telemetry:read"]
    assert record.expires_ms == decoded["exp"] * 1000
    stored = hub.store.get_token(record.id)
    assert stored.token_hash == record.token_hash and stored.devices == [hub.test_device.id]


def test_verify_roundtrip_and_principal(hub):
    token, record = new_token(hub, ["commands:write"], [hub.test_device.id])
    principal = TokenVerifier(keys_of(hub), hub.store).verify(token, NOW + 1000)
    assert principal == Principal(user_id=hub.test_user.id, username="alice",
                                  scopes=frozenset({"commands:write"}),
                                  devices=frozenset({hub.test_device.id}), token_id=record.id,
                                  expires_ms=record.expires_ms)
    assert principal.may_access_device(hub.test_device.id)
    assert not principal.may_access_device("dev_other")
    assert principal.identity == "token:" + record.id


def test_token_not_in_database_file(hub):
    token, record = new_token(hub)
    TokenVerifier(keys_of(hub), hub.store).verify(token, NOW + 1)
    hub.store.close()  # checkpoint nothing away: read the main file and the WAL as they are
    blob = b""
    for name in os.listdir(hub.data_dir):
        if name.startswith("hub.db"):
            with open(os.path.join(hub.data_dir, name), "rb") as handle:
                blob += handle.read()
    assert record.token_hash.encode() in blob  # we are looking at the right file
    jws = token[4:].encode()
    for piece in [token.encode(), jws] + jws.split(b"."):
        assert piece not in blob


@pytest.mark.parametrize("text, ms", [("30d", 30 * 86_400_000), ("12h", 12 * 3_600_000),
                                      ("90m", 90 * 60_000), ("3600s", 3_600_000)])
def test_parse_duration(text, ms):
    assert parse_duration(text) == ms


@pytest.mark.parametrize("text", ["", "0d", "30", "d", "-1d", "1w", "1.5d", "30 d x"])
def test_parse_duration_refuses(text):
    with pytest.raises(TokenRequestError):
        parse_duration(text)


@pytest.mark.parametrize("kwargs, message", [
    (dict(scopes=[]), "at least one scope"),
    (dict(scopes=["root:all"]), "unknown scope"),
    (dict(devices=[]), "at least one device"),
    (dict(devices=["dev_missing"]), "unknown device"),
    (dict(devices=["d%d" % i for i in range(33)]), "at most 32"),
    (dict(lifetime=366 * 86_400_000), "365 days"),
    (dict(lifetime=1000), "1 minute"),
])
def test_issue_refuses_bad_requests(hub, kwargs, message):
    args = dict(scopes=["telemetry:read"], devices=None, lifetime=None)
    args.update(kwargs)
    with pytest.raises(TokenRequestError, match=message):
        new_token(hub, args["scopes"], args["devices"], lifetime=args["lifetime"])


def test_max_size_token_stays_under_length_cap(hub):
    devices = [hub.store.add_device("d%02d" % i, "hs256", None, b"k" * 32, NOW).id
               for i in range(tokens.MAX_TOKEN_DEVICES)]
    token, _ = issue_token(keys_of(hub), hub.store, hub.test_user, SCOPES, devices,
                           None, "n" * 64, NOW)
    assert len(token) < tokens.MAX_TOKEN_CHARS
    assert TokenVerifier(keys_of(hub), hub.store).verify(token, NOW).devices == frozenset(devices)


# -- refusing ---------------------------------------------------------------------------------

def refuse(hub, token, now=NOW, code="invalid_token"):
    with pytest.raises(TokenError) as info:
        TokenVerifier(keys_of(hub), hub.store).verify(token, now)
    assert info.value.code == code
    assert token not in str(info.value) or len(token) < 8
    return info.value


def test_refuses_alg_none(hub):
    token, _ = new_token(hub)
    header, claims, _ = parts(token)
    forged = "sxh_%s.%s." % (b64url(json.dumps(dict(header, alg="none")).encode()),
                              b64url(json.dumps(claims).encode()))
    refuse(hub, forged)


def test_refuses_hs256_signed_with_public_key(hub):
    token, _ = new_token(hub)
    header, claims, _ = parts(token)
    pem = hub.token_public_key.public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    signing_input = "%s.%s" % (b64url(json.dumps(dict(header, alg="HS256")).encode()),
                               b64url(json.dumps(claims).encode()))
    signature = hmac.new(pem, signing_input.encode(), hashlib.sha256).digest()
    refuse(hub, "sxh_%s.%s" % (signing_input, b64url(signature)))


def test_refuses_tampered_payload(hub):
    token, _ = new_token(hub)
    header_b64, payload_b64, signature = token[4:].split(".")
    claims = json.loads(unb64url(payload_b64))
    claims["exp"] += 86400 * 365
    refuse(hub, "sxh_%s.%s.%s" % (header_b64, b64url(json.dumps(claims).encode()), signature))


def test_refuses_scope_moved_from_another_token(hub):
    weak, _ = new_token(hub, ["telemetry:read"])
    strong, _ = new_token(hub, list(SCOPES))
    header_b64, payload_b64, signature = weak[4:].split(".")
    weak_claims = json.loads(unb64url(payload_b64))
    weak_claims["scp"] = parts(strong)[1]["scp"]
    # Moved without the signing key: the signature no longer covers the payload.
    refuse(hub, "sxh_%s.%s.%s" % (header_b64, b64url(json.dumps(weak_claims).encode()), signature))
    # Even re-signed with the hub's own key, the sealed scope is bound to the other jti.
    refuse(hub, sign_es256(hub, {"typ": "sx-api+jwt", "kid": hub.token_key_id}, weak_claims))


def test_refuses_unknown_kid(hub):
    token, _ = new_token(hub)
    _, claims, _ = parts(token)
    refuse(hub, sign_es256(hub, {"typ": "sx-api+jwt", "kid": "0123456789abcdef"}, claims))
    other_key = ec.generate_private_key(ec.SECP256R1())
    forged = "sxh_" + jwt.encode(claims, other_key, algorithm="ES256",
                                 headers={"typ": "sx-api+jwt", "kid": hub.token_key_id})
    refuse(hub, forged)


def test_refuses_crit_header(hub):
    token, _ = new_token(hub)
    _, claims, _ = parts(token)
    for crit in (["exp"], ["b64"], ["x-custom"]):
        refuse(hub, sign_es256(hub, {"typ": "sx-api+jwt", "kid": hub.token_key_id,
                                     "crit": crit, "x-custom": 1}, claims))
        refuse(hub, signed_and_recorded(hub, {"typ": "sx-api+jwt", "kid": hub.token_key_id,
                                              "crit": crit, "x-custom": 1}))


def test_ignores_key_hints_in_header(hub):
    """jku/x5u/jwk never choose the key: a token signed by another key that points at it fails."""
    token, _ = new_token(hub)
    _, claims, _ = parts(token)
    other_key = ec.generate_private_key(ec.SECP256R1())
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(other_key.public_key()))
    forged = "sxh_" + jwt.encode(claims, other_key, algorithm="ES256", headers={
        "typ": "sx-api+jwt", "kid": hub.token_key_id, "jwk": jwk,
        "jku": "https://attacker.invalid/keys", "x5u": "https://attacker.invalid/cert"})
    refuse(hub, forged)


def test_refuses_device_jwts(hub):
    device = hub.test_device
    hs = device_token(b"s" * 32, device.id, hub.hub_id, NOW, b"nonce-123456")
    refuse(hub, "sxh_" + hs)
    refuse(hub, hs)  # without our prefix
    # Worst case: a device-typed JWT with API-looking claims signed by the hub's own token key.
    token, _ = new_token(hub)
    _, claims, _ = parts(token)
    refuse(hub, sign_es256(hub, {"typ": "sx-device+jwt", "kid": hub.token_key_id}, claims))
    refuse(hub, sign_es256(hub, {"kid": hub.token_key_id}, claims))  # PyJWT's default typ JWT
    for typ in ("sx-device+jwt", "JWT", None):
        refuse(hub, signed_and_recorded(hub, {"typ": typ, "kid": hub.token_key_id}))


@pytest.mark.parametrize("claim, value", [("aud", "smartx-api:hub_other"), ("aud", "hub_x"),
                                          ("iss", "hub_other"), ("sub", "usr_other")])
def test_refuses_wrong_audience_issuer_subject(hub, claim, value):
    token, _ = new_token(hub)
    _, claims, _ = parts(token)
    claims[claim] = value
    refuse(hub, sign_es256(hub, {"typ": "sx-api+jwt", "kid": hub.token_key_id}, claims))
    if claim != "sub":
        refuse(hub, signed_and_recorded(hub, {"typ": "sx-api+jwt", "kid": hub.token_key_id},
                                        **{claim: value}))


@pytest.mark.parametrize("claim", ["iss", "aud", "sub", "jti", "iat", "exp", "scp"])
def test_refuses_missing_required_claim(hub, claim):
    token, _ = new_token(hub)
    _, claims, _ = parts(token)
    del claims[claim]
    refuse(hub, sign_es256(hub, {"typ": "sx-api+jwt", "kid": hub.token_key_id}, claims))
    if claim not in ("jti", "scp", "sub"):
        refuse(hub, signed_and_recorded(hub, {"typ": "sx-api+jwt", "kid": hub.token_key_id},
                                        **{claim: None}))


def test_refuses_record_gone_or_jti_reused(hub):
    token, record = new_token(hub)
    _, claims, _ = parts(token)
    # A validly signed token reusing a live token's jti (with that jti's sealed scope) differs
    # from the stored one, so its hash does not match the record.
    claims["exp"] -= 10
    refuse(hub, sign_es256(hub, {"typ": "sx-api+jwt", "kid": hub.token_key_id}, claims))
    # A jti the store never saw.
    claims["jti"] = "never-issued"
    claims["scp"] = seal_scope(hub.scope_key, "never-issued", ["telemetry:read"], None)
    refuse(hub, sign_es256(hub, {"typ": "sx-api+jwt", "kid": hub.token_key_id}, claims))


def test_refuses_malleated_ecdsa_signature(hub):
    """ECDSA (r, s) and (r, n - s) both verify: the stored hash is what pins the exact token."""
    token, _ = new_token(hub)
    head, payload, signature = token[4:].split(".")
    raw = unb64url(signature)
    r, s = int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big")
    n = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
    twin = "%s.%s.%s" % (head, payload,
                         b64url(r.to_bytes(32, "big") + (n - s).to_bytes(32, "big")))
    jwt.decode(twin, hub.token_public_key, algorithms=["ES256"], options={"verify_signature": True,
               "verify_aud": False, "verify_exp": False, "verify_iat": False})  # PyJWT accepts it
    refuse(hub, "sxh_" + twin)


def test_expiry_and_clock(hub):
    token, record = new_token(hub, lifetime=3_600_000)
    verifier = TokenVerifier(keys_of(hub), hub.store)
    verifier.verify(token, NOW + 3_599_000)
    refuse(hub, token, now=record.expires_ms, code="token_expired")
    refuse(hub, token, now=NOW + 86_400_000, code="token_expired")
    refuse(hub, token, now=NOW - 61_000)  # issued in the future (past the 60 s leeway)
    verifier.verify(token, NOW - 59_000)  # within the leeway


def test_revoked_and_revoke_all(hub):
    first, record = new_token(hub)
    verifier = TokenVerifier(keys_of(hub), hub.store)
    verifier.verify(first, NOW + 1)
    hub.store.revoke_token(record.id, NOW + 2)
    refuse(hub, first, now=NOW + 3, code="token_revoked")
    second, _ = new_token(hub, now=NOW + 10)
    third, _ = new_token(hub, now=NOW + 11)
    hub.store.set_tokens_valid_after(hub.test_user.id, NOW + 20)
    refuse(hub, second, now=NOW + 21, code="token_revoked")
    refuse(hub, third, now=NOW + 21, code="token_revoked")
    fourth, _ = new_token(hub, now=NOW + 30)
    assert verifier.verify(fourth, NOW + 31).username == "alice"


def test_refuses_garbage_and_length(hub):
    for garbage in ["", "sxh_", "sxh_a.b.c", "sxh_" + "A" * 5000, "Bearer x", "sxh_...",
                    "sxh_e30.e30.", "sxh_\u00e9\u00e9.x.y", "sxh_" + b64url(b"[]") + ".e30.AA"]:
        refuse(hub, garbage)


@settings(max_examples=60)
@given(st.text(max_size=300))
def test_refuses_arbitrary_text(hub_for_property, text):
    with pytest.raises(TokenError):
        TokenVerifier(keys_of(hub_for_property), hub_for_property.store).verify("sxh_" + text, NOW)


@pytest.fixture(scope="module")
def hub_for_property(tmp_path_factory, password_hash):
    ctx = init_hub(str(tmp_path_factory.mktemp("prop") / "hub"), now_ms=NOW)
    ctx.test_user = ctx.store.add_user("alice", password_hash, NOW)
    yield ctx
    ctx.close()


def test_last_used_is_throttled(hub):
    token, record = new_token(hub)
    verifier = TokenVerifier(keys_of(hub), hub.store)
    verifier.verify(token, NOW + 1000)
    assert hub.store.get_token(record.id).last_used_ms == NOW + 1000
    verifier.verify(token, NOW + 30_000)
    assert hub.store.get_token(record.id).last_used_ms == NOW + 1000
    verifier.verify(token, NOW + 61_000)
    assert hub.store.get_token(record.id).last_used_ms == NOW + 61_000


# -- the sealed scope -------------------------------------------------------------------------

KEY = bytes(range(32))
scope_sets = st.sets(st.sampled_from(SCOPES), min_size=1)
device_lists = st.none() | st.lists(st.text("abcdef0123456789_", min_size=1, max_size=20),
                                    min_size=1, max_size=8)


@given(scope_sets, device_lists, st.text("abcXYZ019_-", min_size=1, max_size=30))
def test_seal_roundtrip(scopes, devices, jti):
    sealed = seal_scope(KEY, jti, scopes, devices)
    opened_scopes, opened_devices = open_scope(KEY, jti, sealed)
    assert opened_scopes == frozenset(scopes)
    assert opened_devices == (None if devices is None else frozenset(devices))


@given(scope_sets, device_lists, st.data())
def test_seal_is_bound_to_jti_and_tamper_evident(scopes, devices, data):
    sealed = seal_scope(KEY, "jti-1", scopes, devices)
    with pytest.raises(TokenError):
        open_scope(KEY, "jti-2", sealed)
    with pytest.raises(TokenError):
        open_scope(bytes(32), "jti-1", sealed)
    raw = bytearray(unb64url(sealed))
    index = data.draw(st.integers(0, len(raw) - 1))
    raw[index] ^= data.draw(st.integers(1, 255))
    with pytest.raises(TokenError):
        open_scope(KEY, "jti-1", b64url(bytes(raw)))


# -- no escalation ----------------------------------------------------------------------------

@given(scope_sets, scope_sets, st.booleans(), st.booleans())
def test_check_grant_never_escalates(held, asked, creator_limited, ask_limited):
    creator = Principal("u", "alice", frozenset(held), frozenset({"d1"}) if creator_limited else None,
                        token_id="t", expires_ms=NOW + 1000)
    devices = ["d1"] if ask_limited else None
    allowed = set(asked) <= set(held) and (not creator_limited or ask_limited)
    if allowed:
        check_grant(creator, asked, devices, NOW + 1000)
    else:
        with pytest.raises(GrantError):
            check_grant(creator, asked, devices, NOW + 1000)


def test_check_grant_lifetime_and_devices():
    creator = Principal("u", "alice", frozenset(SCOPES), frozenset({"d1", "d2"}), token_id="t",
                        expires_ms=NOW)
    check_grant(creator, ["devices:read"], ["d2"], NOW)
    with pytest.raises(GrantError):
        check_grant(creator, ["devices:read"], ["d3"], NOW)
    with pytest.raises(GrantError):
        check_grant(creator, ["devices:read"], ["d1"], NOW + 1)


def test_issue_with_creator_for_other_user_refused(hub, password_hash):
    bob = hub.store.add_user("bob", password_hash, NOW)
    creator = Principal(hub.test_user.id, "alice", frozenset(SCOPES), None, token_id="t",
                        expires_ms=NOW + 10 ** 12)
    with pytest.raises(GrantError):
        issue_token(keys_of(hub), hub.store, bob, ["devices:read"], None, None, "", NOW,
                    creator=creator)


# -- passwords --------------------------------------------------------------------------------

def test_password_hash_is_argon2id_and_verifies(password_hash):
    assert password_hash.startswith("$argon2id$")
    assert passwords.verify_password(password_hash, PASSWORD)
    assert not passwords.verify_password(password_hash, PASSWORD + "x")
    assert not passwords.verify_password("not a hash", PASSWORD)
    assert not passwords.verify_password(password_hash, "x" * 5000)
    assert not passwords.needs_rehash(password_hash)


@pytest.mark.parametrize("bad", ["short", "x" * 1025, None])
def test_password_policy(bad):
    with pytest.raises(passwords.PasswordPolicyError):
        passwords.hash_password(bad)


# -- the command line -------------------------------------------------------------------------

def run_cli(capsys, *argv, stdin=None, monkeypatch=None):
    from smartx_hub import cli

    if stdin is not None:
        import io
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_user_and_token_lifecycle(tmp_path, capsys, monkeypatch):
    data = str(tmp_path / "hub")
    init_hub(data, now_ms=NOW).close()
    code, out, err = run_cli(capsys, "token", "create", "--scope", "telemetry:read", "--data", data)
    assert code == 1 and err.startswith("error: ") and "user add" in err and err.count("\n") == 1
    code, out, err = run_cli(capsys, "user", "add", "carol", "--password-stdin", "--data", data,
                             stdin=PASSWORD + "\n", monkeypatch=monkeypatch)
    assert code == 0, err
    code, out, err = run_cli(capsys, "user", "add", "carol", "--password-stdin", "--data", data,
                             stdin=PASSWORD + "\n", monkeypatch=monkeypatch)
    assert code == 1 and err.startswith("error: ") and "exists" in err
    code, out, err = run_cli(capsys, "user", "add", "dave", "--password-stdin", "--data", data,
                             stdin="short\n", monkeypatch=monkeypatch)
    assert code == 1 and "at least" in err
    code, out, _ = run_cli(capsys, "user", "list", "--json", "--data", data)
    assert [u["username"] for u in json.loads(out)] == ["carol"]

    with load_hub(data) as ctx:
        device = ctx.store.add_device("pump", "hs256", None, b"p" * 32, NOW)
    code, out, err = run_cli(capsys, "token", "create", "--scope", "telemetry:read",
                             "--device", "pump", "--expires", "30d", "--name", "grafana",
                             "--data", data)
    assert code == 0, err
    token = out.strip()
    assert token.startswith("sxh_") and out.count("\n") == 1
    assert "cannot be shown again" in err and token not in err
    with load_hub(data) as ctx:
        principal = TokenVerifier(keys_of(ctx), ctx.store).verify(token, int(time.time() * 1000))
        assert principal.scopes == frozenset({"telemetry:read"})
        assert principal.devices == frozenset({device.id})
        assert principal.expires_ms - int(time.time() * 1000) <= 30 * 86_400_000
    code, out, _ = run_cli(capsys, "token", "list", "--json", "--data", data)
    listed = json.loads(out)
    assert len(listed) == 1 and listed[0]["hint"] == token[-4:] and token not in out
    assert listed[0]["status"] == "active" and listed[0]["devices"] == [device.id]
    code, out, _ = run_cli(capsys, "token", "list", "--data", data)
    assert "grafana" in out and token not in out and listed[0]["id"] in out

    code, out, err = run_cli(capsys, "token", "revoke", listed[0]["id"], "--data", data)
    assert code == 0 and "revoked 1" in out
    with load_hub(data) as ctx:
        with pytest.raises(TokenError):
            TokenVerifier(keys_of(ctx), ctx.store).verify(token, int(time.time() * 1000))
    code, _, err = run_cli(capsys, "token", "revoke", "nope", "--data", data)
    assert code == 1 and err.startswith("error: ")
    code, _, err = run_cli(capsys, "token", "revoke", "--data", data)
    assert code == 1 and err.startswith("error: ")
    code, _, err = run_cli(capsys, "token", "create", "--scope", "root", "--data", data)
    assert code == 2 and err.startswith("error: ")
    code, _, err = run_cli(capsys, "token", "create", "--scope", "audit:read", "--expires", "400d",
                           "--data", data)
    assert code == 1 and "365" in err

    for _ in range(2):
        assert run_cli(capsys, "token", "create", "--scope", "audit:read", "--json",
                       "--data", data)[0] == 0
    code, out, _ = run_cli(capsys, "token", "revoke", "--all", "--json", "--data", data)
    assert code == 0 and json.loads(out) == {"revoked": 2}


def test_cli_token_create_in_subprocess(tmp_path):
    """The real command, as a user runs it: the token alone on stdout."""
    data = str(tmp_path / "hub")
    with init_hub(data, now_ms=NOW) as ctx:
        ctx.store.add_user("erin", passwords.hash_password(PASSWORD), NOW)
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    result = subprocess.run([sys.executable, "-m", "smartx_hub", "token", "create", "--scope",
                             "devices:read", "--json", "--data", data],
                            capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 0, result.stderr
    created = json.loads(result.stdout)
    assert created["token"].startswith("sxh_") and created["scopes"] == ["devices:read"]
    assert created["token"] not in result.stderr


@given(st.integers(1, 9_999_999), st.sampled_from("smhd"))
def test_parse_duration_property(number, unit):
    factor = {"s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}[unit]
    assert parse_duration("%d%s" % (number, unit)) == number * factor
