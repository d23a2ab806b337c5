"""Device verification against a real store: every refusal has its reason, nothing else escapes."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from hypothesis import given
from hypothesis import strategies as st

from smartx_device import messages as m
from smartx_device.reasons import (CLOSE_BAD_CREDENTIALS, CLOSE_DEVICE_DISABLED,
                                   CLOSE_TOKEN_EXPIRED, CLOSE_UNKNOWN_DEVICE)
from smartx_hub import pki
from smartx_hub.verify import DeviceVerifier, NonceCache, VerificationError, nonce_claim

from hubtools import b64url, device_token, enrol, make_hub, unsigned_token

NOW_MS = 1_800_000_000_000


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    ctx = make_hub(tmp_path_factory.mktemp("verify"))
    devices = {auth: enrol(ctx.store, "dev-" + auth, auth, NOW_MS)
               for auth in ("es256", "eddsa", "hs256")}
    yield ctx, devices
    ctx.close()


def challenge(ctx, now_ms=NOW_MS):
    return m.AuthChallenge(nonce=os.urandom(32), hub_time_ms=now_ms, hub_id=ctx.hub_id)


def verify(ctx, device_id, token, nonce, now_ms=NOW_MS, verifier=None):
    verifier = verifier or DeviceVerifier(ctx.store, ctx.hub_id)
    return verifier.verify(device_id, token, nonce, now_ms)


def refusal(ctx, device_id, token, nonce, now_ms=NOW_MS, verifier=None):
    with pytest.raises(VerificationError) as info:
        verify(ctx, device_id, token, nonce, now_ms, verifier)
    assert token not in str(info.value) and token not in info.value.detail
    return info.value.reason


@pytest.mark.parametrize("auth", ["es256", "eddsa", "hs256"])
def test_each_auth_kind_verifies(hub, auth):
    ctx, devices = hub
    creds = devices[auth]
    chal = challenge(ctx)
    device = verify(ctx, creds.device_id, device_token(creds, chal), chal.nonce)
    assert device.id == creds.device_id and device.auth == auth


def test_the_sdk_signer_output_verifies(hub):
    from smartx_device.auth import Signer

    ctx, devices = hub
    for auth, creds in devices.items():
        signer = Signer(auth, secret=creds.secret,
                        private_key_pem=None if auth == "hs256" else pki.private_key_pem(
                            creds.private_key))
        chal = challenge(ctx)
        token = signer.sign(creds.device_id, chal)
        assert verify(ctx, creds.device_id, token, chal.nonce).id == creds.device_id


@pytest.mark.parametrize("case", [
    "wrong_key", "wrong_aud", "wrong_sub", "wrong_nonce", "no_typ", "wrong_typ", "crit",
    "lifetime", "future_iat", "missing_nonce", "missing_exp", "missing_aud", "string_iat",
])
def test_bad_tokens_are_bad_credentials(hub, case):
    ctx, devices = hub
    creds = devices["es256"]
    chal = challenge(ctx)
    iat = NOW_MS // 1000
    options = {
        "wrong_key": dict(key=ec.generate_private_key(ec.SECP256R1())),
        "wrong_aud": dict(aud="hub_someoneelse00000"),
        "wrong_sub": dict(sub=devices["eddsa"].device_id),
        "wrong_nonce": dict(nonce=b64url(os.urandom(32))),
        "no_typ": dict(headers={"typ": None}),
        "wrong_typ": dict(headers={"typ": "JWT"}),
        "crit": dict(headers={"crit": ["exp"]}),
        "lifetime": dict(iat=iat, exp=iat + 3601),
        "future_iat": dict(iat=iat + 120, exp=iat + 300),
        "missing_nonce": dict(nonce=None),
        "missing_exp": dict(exp=None),
        "missing_aud": dict(aud=None),
        "string_iat": dict(iat=str(iat)),
    }[case]
    token = device_token(creds, chal, **options)
    assert refusal(ctx, creds.device_id, token, chal.nonce) == CLOSE_BAD_CREDENTIALS


def test_token_within_leeway_is_accepted_and_past_it_expired(hub):
    ctx, devices = hub
    creds = devices["hs256"]
    iat = NOW_MS // 1000 - 400
    chal = challenge(ctx)
    token = device_token(creds, chal, iat=iat, exp=iat + 350)  # expired 50 s ago: inside leeway
    assert verify(ctx, creds.device_id, token, chal.nonce).id == creds.device_id
    chal = challenge(ctx)
    token = device_token(creds, chal, iat=iat, exp=iat + 300)  # 100 s ago
    assert refusal(ctx, creds.device_id, token, chal.nonce) == CLOSE_TOKEN_EXPIRED


def test_alg_none_is_refused(hub):
    ctx, devices = hub
    creds = devices["es256"]
    chal = challenge(ctx)
    iat = NOW_MS // 1000
    token = unsigned_token({"sub": creds.device_id, "aud": ctx.hub_id, "iat": iat,
                            "exp": iat + 300, "nonce": nonce_claim(chal.nonce)},
                           {"alg": "none", "typ": "sx-device+jwt"})
    assert refusal(ctx, creds.device_id, token, chal.nonce) == CLOSE_BAD_CREDENTIALS


def hs256_with_key_bytes(claims, key_bytes):
    """HS256 by hand with arbitrary key bytes (PyJWT rightly refuses a PEM as HMAC secret)."""
    header = b64url(json.dumps({"alg": "HS256", "typ": "sx-device+jwt"},
                               separators=(",", ":")).encode())
    body = b64url(json.dumps(claims, separators=(",", ":")).encode())
    signature = hmac.new(key_bytes, ("%s.%s" % (header, body)).encode(), hashlib.sha256).digest()
    return "%s.%s.%s" % (header, body, b64url(signature))


@pytest.mark.parametrize("auth", ["es256", "eddsa"])
def test_hs256_signed_with_the_public_key_is_refused(hub, auth):
    ctx, devices = hub
    creds = devices[auth]
    chal = challenge(ctx)
    iat = NOW_MS // 1000
    claims = {"sub": creds.device_id, "aud": ctx.hub_id, "iat": iat, "exp": iat + 300,
              "nonce": nonce_claim(chal.nonce)}
    token = hs256_with_key_bytes(claims, creds.public_key_pem)
    assert refusal(ctx, creds.device_id, token, chal.nonce) == CLOSE_BAD_CREDENTIALS


def test_a_token_of_another_algorithm_is_refused_even_when_validly_signed(hub):
    ctx, devices = hub
    chal = challenge(ctx)
    # An HS256 device presenting a perfectly good ES256 token of some key.
    creds = devices["hs256"]
    token = device_token(creds, chal, key=ec.generate_private_key(ec.SECP256R1()), algorithm="ES256")
    assert refusal(ctx, creds.device_id, token, chal.nonce) == CLOSE_BAD_CREDENTIALS
    # An ES256 device presenting an EdDSA token.
    creds = devices["es256"]
    token = device_token(creds, chal, key=ed25519.Ed25519PrivateKey.generate(), algorithm="EdDSA")
    assert refusal(ctx, creds.device_id, token, chal.nonce) == CLOSE_BAD_CREDENTIALS


def test_header_key_hints_are_ignored(hub):
    ctx, devices = hub
    creds = devices["es256"]
    attacker = ec.generate_private_key(ec.SECP256R1())
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(attacker.public_key()))
    hints = {"jwk": jwk, "jku": "https://attacker.invalid/keys", "kid": "attacker",
             "x5u": "https://attacker.invalid/cert"}
    chal = challenge(ctx)
    token = device_token(creds, chal, key=attacker, headers=hints)
    assert refusal(ctx, creds.device_id, token, chal.nonce) == CLOSE_BAD_CREDENTIALS
    chal = challenge(ctx)
    token = device_token(creds, chal, headers=hints)  # the device's own key: hints change nothing
    assert verify(ctx, creds.device_id, token, chal.nonce).id == creds.device_id


def test_a_nonce_answers_once(hub):
    ctx, devices = hub
    creds = devices["eddsa"]
    verifier = DeviceVerifier(ctx.store, ctx.hub_id)
    chal = challenge(ctx)
    token = device_token(creds, chal)
    assert verify(ctx, creds.device_id, token, chal.nonce, verifier=verifier)
    assert refusal(ctx, creds.device_id, token, chal.nonce, verifier=verifier) \
        == CLOSE_BAD_CREDENTIALS
    # Replayed on a new challenge, the old token does not match the new nonce.
    new = challenge(ctx)
    assert refusal(ctx, creds.device_id, token, new.nonce, verifier=verifier) \
        == CLOSE_BAD_CREDENTIALS


def test_unknown_and_disabled_devices(hub):
    ctx, devices = hub
    chal = challenge(ctx)
    creds = enrol(ctx.store, "to-disable", "es256", NOW_MS)
    token = device_token(creds, chal)
    assert refusal(ctx, "dev_doesnotexist00", token, chal.nonce) == CLOSE_UNKNOWN_DEVICE
    ctx.store.set_device_enabled(creds.device_id, False)
    assert refusal(ctx, creds.device_id, token, chal.nonce) == CLOSE_DEVICE_DISABLED
    # Without its key, nobody learns that the device exists but is disabled.
    chal = challenge(ctx)
    forged = device_token(creds, chal, key=ec.generate_private_key(ec.SECP256R1()))
    assert refusal(ctx, creds.device_id, forged, chal.nonce) == CLOSE_BAD_CREDENTIALS
    ctx.store.set_device_enabled(creds.device_id, True)
    chal = challenge(ctx)
    assert verify(ctx, creds.device_id, device_token(creds, chal), chal.nonce)
    ctx.store.remove_device(creds.device_id)
    chal = challenge(ctx)
    assert refusal(ctx, creds.device_id, device_token(creds, chal), chal.nonce) \
        == CLOSE_UNKNOWN_DEVICE


@given(token=st.one_of(st.text(max_size=300), st.builds(
    lambda a, b, c: "%s.%s.%s" % (a, b, c), st.text("AZaz09-_=", max_size=60),
    st.text("AZaz09-_=", max_size=60), st.text("AZaz09-_", max_size=60))))
def test_garbage_tokens_raise_only_verification_errors(hub, token):
    ctx, devices = hub
    with pytest.raises(VerificationError) as info:
        verify(ctx, devices["hs256"].device_id, token, os.urandom(16))
    assert info.value.reason in (CLOSE_BAD_CREDENTIALS,)


@given(claims=st.dictionaries(st.sampled_from(["sub", "aud", "iat", "exp", "nonce", "x"]),
                              st.one_of(st.integers(-2**70, 2**70), st.text(max_size=20),
                                        st.none(), st.booleans(), st.lists(st.integers())),
                              max_size=6))
def test_signed_tokens_with_arbitrary_claims_never_escape(hub, claims):
    ctx, devices = hub
    creds = devices["hs256"]
    token = jwt.encode(claims, creds.secret, algorithm="HS256",
                       headers={"typ": "sx-device+jwt"})
    try:
        device = verify(ctx, creds.device_id, token, os.urandom(16))
    except VerificationError as exc:
        assert exc.reason in (CLOSE_BAD_CREDENTIALS, CLOSE_TOKEN_EXPIRED)
    else:  # only possible with every claim right, which random nonces rule out
        pytest.fail("accepted %r as %s" % (claims, device.id))


def test_nonce_cache_expires_and_is_bounded():
    minute = NonceCache.BUCKET_MS
    cache = NonceCache(max_entries=3)
    assert cache.use(b"a" * 32, until_ms=100, now_ms=0)
    assert not cache.use(b"a" * 32, until_ms=100, now_ms=50)
    assert not cache.use(b"a" * 32, until_ms=5000, now_ms=minute - 1)  # never forgotten early
    assert cache.use(b"a" * 32, until_ms=5 * minute, now_ms=minute)  # expired, usable again
    for nonce in (b"b", b"c", b"d"):
        assert cache.use(nonce * 32, until_ms=10 * minute, now_ms=minute)
    assert len(cache) == 3  # the soonest-expiring entry made room
    assert cache.use(b"a" * 32, until_ms=5 * minute, now_ms=minute)
    assert not cache.use(b"d" * 32, until_ms=10 * minute, now_ms=minute)


@given(st.lists(st.tuples(st.binary(min_size=16, max_size=32), st.integers(0, 10**7)),
                max_size=50))
def test_nonce_cache_refuses_every_repeat_before_its_expiry(entries):
    cache = NonceCache()
    now = 0
    remembered = {}
    for nonce, lifetime in entries:
        key = nonce[:16]
        fresh = cache.use(nonce, now + lifetime, now)
        if key in remembered and remembered[key] > now:
            assert not fresh
        if fresh:
            remembered[key] = now + lifetime
        now += 1000


def test_nonce_claim_is_unpadded_base64url():
    nonce = bytes(range(250, 256)) + b"\x00"
    assert nonce_claim(nonce) == base64.urlsafe_b64encode(nonce).decode().rstrip("=")
    assert "=" not in nonce_claim(nonce)
