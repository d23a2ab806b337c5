"""Device verification parses a good token once (smartx_hub/verify.py) and still refuses
exactly as the contract orders it: header faults first, then an unknown device, the key, the
signature and claims, times, the nonce, a disabled device.

The reference below is the verifier as it was before the single parse (header read with
``jwt.get_unverified_header``, then the device, then ``jwt.decode``). A property test feeds
both the same tokens, good and bad in every part, and requires the same outcome: the same
device, or the same refusal reason, cause and detail.
"""

from __future__ import annotations

import base64
import hmac
import json
import os

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from hypothesis import given
from hypothesis import strategies as st

from smartx_device.reasons import (CLOSE_BAD_CREDENTIALS, CLOSE_DEVICE_DISABLED,
                                   CLOSE_TOKEN_EXPIRED, CLOSE_UNKNOWN_DEVICE)
from smartx_hub.verify import (ALGORITHMS, LEEWAY_S, MAX_LIFETIME_S, REQUIRED_CLAIMS,
                               TOKEN_TYP, DeviceVerifier, NonceCache, VerificationError,
                               nonce_claim)
from smartx_device.messages import MAX_TOKEN_LENGTH

from hubtools import b64url, enrol, make_hub

NOW_MS = 1_800_000_000_000
NOW_S = NOW_MS // 1000


def _bad(cause):
    return VerificationError(CLOSE_BAD_CREDENTIALS, "credentials not accepted", cause)


def reference_verify(verifier, store, device_id, token, nonce, now_ms):
    """The verifier before the single parse, step for step (its own NonceCache)."""
    if not isinstance(token, str) or not 0 < len(token) <= MAX_TOKEN_LENGTH:
        raise _bad("token missing or too long")
    try:
        header = jwt.get_unverified_header(token)
    except (jwt.PyJWTError, ValueError, TypeError):
        raise _bad("malformed token") from None
    if header.get("typ") != TOKEN_TYP:
        raise _bad("wrong token type")
    if "crit" in header:
        raise _bad("critical header extension")
    device = store.get_device(device_id)
    if device is None:
        raise VerificationError(CLOSE_UNKNOWN_DEVICE, "unknown device", "unknown device")
    algorithm = ALGORITHMS.get(device.auth)
    if algorithm is None:
        raise _bad("device has unknown auth kind %r" % (device.auth,))
    key = verifier._key_for(device)
    try:
        claims = jwt.decode(
            token, key, algorithms=[algorithm], audience=verifier.hub_id,
            options={"require": REQUIRED_CLAIMS, "verify_exp": False, "verify_iat": False,
                     "verify_nbf": False, "strict_aud": True})
    except jwt.InvalidAlgorithmError:
        raise _bad("algorithm is not the device's") from None
    except jwt.InvalidAudienceError:
        raise _bad("wrong audience") from None
    except jwt.MissingRequiredClaimError as exc:
        raise _bad("missing claim %s" % exc.claim) from None
    except (jwt.PyJWTError, ValueError, TypeError):
        raise _bad("signature or claims not valid") from None
    iat, exp = claims.get("iat"), claims.get("exp")

    def is_int(value):
        return isinstance(value, int) and not isinstance(value, bool)

    if not is_int(iat) or not is_int(exp):
        raise _bad("iat and exp must be integers")
    if claims.get("sub") != device_id:
        raise _bad("subject is not the device of the Hello")
    presented = claims.get("nonce")
    if not isinstance(presented, str) or not hmac.compare_digest(
            presented.encode("utf-8", "replace"), nonce_claim(nonce).encode("ascii")):
        raise _bad("nonce is not this connection's challenge")
    if exp < iat or exp - iat > MAX_LIFETIME_S:
        raise _bad("lifetime over %d s" % MAX_LIFETIME_S)
    now_s = now_ms / 1000.0
    if iat > now_s + LEEWAY_S:
        raise _bad("token issued in the future")
    if exp <= now_s - LEEWAY_S:
        raise VerificationError(CLOSE_TOKEN_EXPIRED, "token expired", "token expired")
    if not verifier.nonces.use(nonce, (exp + LEEWAY_S) * 1000, now_ms):
        raise _bad("nonce already answered")
    if not device.enabled:
        raise VerificationError(CLOSE_DEVICE_DISABLED, "device disabled", "device disabled")
    return device


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    ctx = make_hub(tmp_path_factory.mktemp("single-parse"))
    creds = {auth: enrol(ctx.store, "sp-" + auth, auth, NOW_MS)
             for auth in ("es256", "eddsa", "hs256")}
    creds["disabled"] = enrol(ctx.store, "sp-disabled", "es256", NOW_MS)
    ctx.store.set_device_enabled(creds["disabled"].device_id, False)
    yield ctx, creds
    ctx.close()


def outcome(fn, *args):
    try:
        device = fn(*args)
    except VerificationError as exc:
        return ("refused", exc.reason, exc.cause, exc.detail)
    return ("verified", device.id)


def both(ctx, device_id, token, nonce):
    """(new outcome, reference outcome), each verifier with a nonce cache of its own."""
    new = DeviceVerifier(ctx.store, ctx.hub_id, NonceCache())
    old = DeviceVerifier(ctx.store, ctx.hub_id, NonceCache())
    return (outcome(new.verify, device_id, token, nonce, NOW_MS),
            outcome(reference_verify, old, ctx.store, device_id, token, nonce, NOW_MS))


OTHER_KEYS = {"ES256": ec.generate_private_key(ec.SECP256R1()),
              "EdDSA": ed25519.Ed25519PrivateKey.generate(), "HS256": os.urandom(32)}


@st.composite
def tokens(draw, creds_by_name):
    """A device id, a nonce and a token answering it: right or wrong in each part."""
    name = draw(st.sampled_from(sorted(creds_by_name) + ["unknown"]))
    creds = creds_by_name.get(name, creds_by_name["es256"])
    device_id = creds.device_id if name != "unknown" else "dev_" + "u" * 16
    nonce = os.urandom(32)
    iat = NOW_S + draw(st.sampled_from([0, -30, -400, 200, -4000]))
    claims = {"sub": draw(st.sampled_from([device_id, creds_by_name["hs256"].device_id])),
              "aud": draw(st.sampled_from(["HUB", "hub_someoneelse00000"])),
              "iat": draw(st.sampled_from([iat, str(iat), True])),
              "exp": iat + draw(st.sampled_from([300, 3601, -1, 50])),
              "nonce": draw(st.sampled_from([nonce_claim(nonce), nonce_claim(os.urandom(32)),
                                             42]))}
    for claim in draw(st.sets(st.sampled_from(sorted(claims)), max_size=2)):
        del claims[claim]
    # None drops the typ header (PyJWT would add "JWT" otherwise).
    header = {"typ": draw(st.sampled_from([TOKEN_TYP, "JWT", None]))}
    if draw(st.booleans()):
        header.update(draw(st.sampled_from([{"crit": ["exp"]}, {"kid": "attacker"},
                                            {"jku": "https://x.invalid/k"}])))
    own = ALGORITHMS[creds.auth]
    algorithm = draw(st.sampled_from([own, own, "ES256", "EdDSA", "HS256"]))
    if algorithm == own and draw(st.booleans()):
        key = creds.signing_key
    else:
        key = OTHER_KEYS[algorithm]
    return device_id, nonce, claims, header, algorithm, key, draw(
        st.sampled_from(["as is", "as is", "flip signature", "no signature", "garbage header",
                         "alg none", "not json", "kid not a string"]))


def build(claims, header, algorithm, key, damage, hub_id):
    claims = {k: (hub_id if v == "HUB" else v) for k, v in claims.items()}
    token = jwt.encode(claims, key, algorithm=algorithm, headers=header)
    head, body, signature = token.split(".")
    if damage == "flip signature":
        raw = bytearray(base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4)))
        raw[0] ^= 1
        token = "%s.%s.%s" % (head, body, b64url(bytes(raw)))
    elif damage == "no signature":
        token = "%s.%s." % (head, body)
    elif damage == "garbage header":
        token = "%s.%s.%s" % (head[:-3], body, signature)
    elif damage in ("alg none", "kid not a string"):
        changed = dict(json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4))))
        if damage == "alg none":
            changed["alg"] = "none"
            signature = ""
        else:
            changed["kid"] = 7
        token = "%s.%s.%s" % (b64url(json.dumps(changed).encode()), body, signature)
    elif damage == "not json":
        token = "%s.%s.%s" % (b64url(b"{not json"), body, signature)
    return token


def test_the_single_parse_refuses_exactly_as_before(hub):
    ctx, creds = hub

    @given(tokens(creds))
    def check(case):
        device_id, nonce, claims, header, algorithm, key, damage = case
        token = build(claims, header, algorithm, key, damage, ctx.hub_id)
        new, old = both(ctx, device_id, token, nonce)
        assert new == old, (damage, header, claims)

    check()


DAMAGES = ["as is", "flip signature", "no signature", "garbage header", "alg none", "not json",
           "kid not a string"]
CLAIM_FAULTS = [{}, {"sub": "OTHER"}, {"aud": "hub_someoneelse00000"}, {"iat": "STR"},
                {"exp": "LONG"}, {"exp": "EXPIRED"}, {"iat": "FUTURE"}, {"nonce": "OTHER"},
                {"nonce": None}, {"exp": None}, {"aud": None}]


def test_every_kind_of_fault_is_refused_as_before(hub):
    """A fixed sweep (devices x header x damage, then each claim fault): the same outcomes,
    and enough kinds of them that the comparison means something."""
    ctx, creds = hub
    outcomes = set()
    names = sorted(creds) + ["unknown"]
    for name in names:
        device_id = creds[name].device_id if name != "unknown" else "dev_" + "u" * 16
        signer = creds.get(name, creds["es256"])
        algorithm = ALGORITHMS[signer.auth]
        for typ in (TOKEN_TYP, "JWT", None):
            for extra in ({}, {"crit": ["exp"]}, {"kid": "attacker"}):
                for damage in DAMAGES:
                    nonce = os.urandom(32)
                    claims = {"sub": device_id, "aud": "HUB", "iat": NOW_S, "exp": NOW_S + 300,
                              "nonce": nonce_claim(nonce)}
                    token = build(claims, dict(extra, typ=typ), algorithm, signer.signing_key,
                                  damage, ctx.hub_id)
                    new, old = both(ctx, device_id, token, nonce)
                    assert new == old, (name, typ, extra, damage)
                    outcomes.add(new[:3])
        for fault in CLAIM_FAULTS:
            nonce = os.urandom(32)
            claims = {"sub": device_id, "aud": "HUB", "iat": NOW_S, "exp": NOW_S + 300,
                      "nonce": nonce_claim(nonce)}
            values = {"OTHER": None, "STR": str(NOW_S), "LONG": NOW_S + 3601,
                      "EXPIRED": NOW_S - 100, "FUTURE": NOW_S + 120}
            for claim, value in fault.items():
                if value is None:
                    del claims[claim]
                elif value == "OTHER":
                    claims[claim] = (creds["hs256"].device_id if claim == "sub"
                                     else nonce_claim(os.urandom(32)))
                else:
                    claims[claim] = values.get(value, value)
            if claims.get("exp") == NOW_S - 100:
                claims["iat"] = NOW_S - 400
            token = build(claims, {"typ": TOKEN_TYP}, algorithm, signer.signing_key, "as is",
                          ctx.hub_id)
            new, old = both(ctx, device_id, token, nonce)
            assert new == old, (name, fault)
            outcomes.add(new[:3])
    verified = {entry for entry in outcomes if entry[0] == "verified"}
    causes = {entry[2] for entry in outcomes if entry[0] == "refused"}
    assert len(verified) == 3  # es256, eddsa, hs256 (the disabled one is refused)
    assert {CLOSE_BAD_CREDENTIALS, CLOSE_UNKNOWN_DEVICE, CLOSE_TOKEN_EXPIRED,
            CLOSE_DEVICE_DISABLED} <= {entry[1] for entry in outcomes if entry[0] == "refused"}
    assert {"malformed token", "wrong token type", "signature or claims not valid",
            "wrong audience", "missing claim nonce", "nonce is not this connection's challenge",
            "iat and exp must be integers", "subject is not the device of the Hello",
            "lifetime over 3600 s", "token issued in the future"} <= causes, causes


@pytest.mark.parametrize("auth", ["es256", "eddsa", "hs256"])
def test_good_tokens_agree_and_parse_the_header_once(hub, auth, monkeypatch):
    ctx, creds = hub
    nonce = os.urandom(32)
    claims = {"sub": creds[auth].device_id, "aud": ctx.hub_id, "iat": NOW_S, "exp": NOW_S + 300,
              "nonce": nonce_claim(nonce)}
    token = jwt.encode(claims, creds[auth].signing_key, algorithm=ALGORITHMS[auth],
                       headers={"typ": TOKEN_TYP})
    new, old = both(ctx, creds[auth].device_id, token, nonce)
    assert new == old == ("verified", creds[auth].device_id)
    calls = []
    real = jwt.api_jws.PyJWS._load

    def counting_load(self, *args, **kwargs):
        calls.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(jwt.api_jws.PyJWS, "_load", counting_load)
    verifier = DeviceVerifier(ctx.store, ctx.hub_id, NonceCache())
    assert verifier.verify(creds[auth].device_id, token, nonce, NOW_MS).id == creds[auth].device_id
    assert len(calls) == 1


@pytest.mark.parametrize("header", [{"typ": "JWT"}, {"typ": None},
                                    {"typ": TOKEN_TYP, "crit": ["exp"]}])
def test_a_header_fault_outranks_an_unknown_device(hub, header):
    ctx, creds = hub
    nonce = os.urandom(32)
    device_id = "dev_" + "n" * 16
    claims = {"sub": device_id, "aud": ctx.hub_id, "iat": NOW_S, "exp": NOW_S + 300,
              "nonce": nonce_claim(nonce)}
    token = jwt.encode(claims, OTHER_KEYS["ES256"], algorithm="ES256", headers=header)
    new, old = both(ctx, device_id, token, nonce)
    assert new == old
    assert new[:2] == ("refused", CLOSE_BAD_CREDENTIALS)
    assert new[2] in ("wrong token type", "critical header extension", "malformed token")
    new, old = both(ctx, device_id, "not.a.token", nonce)
    assert new == old == ("refused", CLOSE_BAD_CREDENTIALS, "malformed token",
                          "credentials not accepted")
    # The same token with a good header: now the unknown device is what is refused.
    good = jwt.encode(claims, OTHER_KEYS["ES256"], algorithm="ES256",
                      headers={"typ": TOKEN_TYP})
    new, old = both(ctx, device_id, good, nonce)
    assert new == old == ("refused", CLOSE_UNKNOWN_DEVICE, "unknown device", "unknown device")
