"""The device JWT: the small HS256 signer against PyJWT, and the hub-side checks it must pass."""

from __future__ import annotations

import base64
import json
import pathlib
import warnings

import jwt as pyjwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from hypothesis import given
from hypothesis import strategies as st

from smartx_device import auth
from smartx_device import jwt as small_jwt
from smartx_device import messages as m

VECTORS = pathlib.Path(__file__).parent / "vectors" / "jwt.json"


def reference_token(secret, device_id, hub_id, hub_time_ms, nonce):
    iat = hub_time_ms // 1000
    claims = {"sub": device_id, "aud": hub_id, "iat": iat, "exp": iat + 300,
              "nonce": base64.urlsafe_b64encode(nonce).rstrip(b"=").decode("ascii")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pyjwt.encode(claims, secret, algorithm="HS256", headers={"typ": "sx-device+jwt"})


@given(
    secret=st.binary(min_size=1, max_size=200),
    device_id=st.text(max_size=70),
    hub_id=st.text(max_size=70),
    hub_time_ms=st.integers(0, 2**63),
    nonce=st.binary(min_size=16, max_size=64),
)
def test_small_signer_is_byte_identical_to_pyjwt(secret, device_id, hub_id, hub_time_ms, nonce):
    ours = small_jwt.device_token(secret, device_id, hub_id, hub_time_ms, nonce)
    assert ours == reference_token(secret, device_id, hub_id, hub_time_ms, nonce)


@given(st.text())
def test_json_string_matches_python_json(text):
    assert small_jwt.json_string(text) == json.dumps(text)


@given(st.binary(max_size=300), st.binary(max_size=300))
def test_hmac_matches_the_standard_library(key, message):
    import hashlib
    import hmac

    assert small_jwt.hmac_sha256(key, message) == hmac.new(key, message, hashlib.sha256).digest()


def test_stored_vectors_still_match_pyjwt_and_the_small_signer():
    data = json.loads(VECTORS.read_text())
    assert len(data["vectors"]) >= 3
    for vector in data["vectors"]:
        args = (bytes.fromhex(vector["secret_hex"]), vector["device_id"], vector["hub_id"],
                vector["hub_time_ms"], bytes.fromhex(vector["nonce_hex"]))
        assert reference_token(*args) == vector["token"], vector["name"]
        assert small_jwt.device_token(*args) == vector["token"], vector["name"]


def test_small_signer_refuses_an_empty_secret():
    with pytest.raises(ValueError):
        small_jwt.device_token(b"", "dev", "hub", 0, bytes(16))


CHALLENGE = m.AuthChallenge(nonce=bytes(range(16)), hub_time_ms=1_764_430_000_999, hub_id="hub_x")


def verify(token, key, algorithm):
    """Verify as the hub does: fixed algorithm, audience, required claims, explicit typ."""
    header = pyjwt.get_unverified_header(token)
    assert header == {"alg": algorithm, "typ": "sx-device+jwt"}
    return pyjwt.decode(token, key, algorithms=[algorithm], audience="hub_x",
                        options={"require": ["sub", "aud", "iat", "exp", "nonce"],
                                 "verify_exp": False, "verify_iat": False})


@pytest.mark.parametrize("kind", ["es256", "eddsa"])
def test_asymmetric_signers_verify_with_the_public_key(kind):
    key = ec.generate_private_key(ec.SECP256R1()) if kind == "es256" else ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    token = auth.Signer(kind, private_key_pem=pem).sign("dev_1", CHALLENGE)
    claims = verify(token, key.public_key(), auth.ALGORITHMS[kind])
    assert list(claims) == ["sub", "aud", "iat", "exp", "nonce"]
    assert claims["iat"] == 1_764_430_000 and claims["exp"] == claims["iat"] + 300
    assert claims["nonce"] == small_jwt.b64url(CHALLENGE.nonce)


def test_hs256_signer_matches_the_small_signer():
    secret = bytes(range(32))
    token = auth.Signer("hs256", secret=secret).sign("dev_1", CHALLENGE)
    assert token == small_jwt.device_token(secret, "dev_1", "hub_x", CHALLENGE.hub_time_ms, CHALLENGE.nonce)
    assert verify(token, secret, "HS256")["sub"] == "dev_1"


def test_signer_refuses_wrong_or_missing_keys():
    with pytest.raises(auth.CredentialError):
        auth.Signer("rs256", secret=b"x")
    with pytest.raises(auth.CredentialError):
        auth.Signer("hs256")
    with pytest.raises(auth.CredentialError):
        auth.Signer("es256")
    ed_pem = ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    with pytest.raises(auth.CredentialError):
        auth.Signer("es256", private_key_pem=ed_pem)
    with pytest.raises(auth.CredentialError):
        auth.Signer("eddsa", private_key_pem="not a key")
