"""Writes tests/vectors/jwt.json: HS256 device JWTs made by PyJWT, the reference.

tests/micropython/check_sdk.py signs the same inputs with smartx_device.jwt under MicroPython
and compares; tests/test_jwt.py checks the file still matches PyJWT.
Run: python tests/vectors/gen_jwt.py
"""

from __future__ import annotations

import base64
import json
import pathlib
import warnings

import jwt

HERE = pathlib.Path(__file__).parent

# (name, secret, device_id, hub_id, hub_time_ms, nonce)
INPUTS = [
    ("typical board", bytes(range(32)), "dev_0123456789abcdef", "hub_a1b2c3d4e5f60718",
     1764430000123, bytes(range(16))),
    ("short secret, long nonce", b"sixteen byte key", "dev_zzzzzzzzzzzzzzzz", "hub_0000000000000000",
     999, bytes(range(200, 232))),
    ("secret longer than a block", bytes(range(100)), "dev_\u00e9\"quote\\", "hub_\U0001f600\n",
     4102444800000, b"\xff" * 64),
]


def vector(name, secret, device_id, hub_id, hub_time_ms, nonce):
    iat = hub_time_ms // 1000
    claims = {"sub": device_id, "aud": hub_id, "iat": iat, "exp": iat + 300,
              "nonce": base64.urlsafe_b64encode(nonce).rstrip(b"=").decode("ascii")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # short HMAC keys are part of the vectors on purpose
        token = jwt.encode(claims, secret, algorithm="HS256", headers={"typ": "sx-device+jwt"})
    return {"name": name, "secret_hex": secret.hex(), "device_id": device_id, "hub_id": hub_id,
            "hub_time_ms": hub_time_ms, "nonce_hex": nonce.hex(), "token": token}


def build():
    return {"pyjwt_version": jwt.__version__,
            "vectors": [vector(*item) for item in INPUTS]}


if __name__ == "__main__":
    (HERE / "jwt.json").write_text(json.dumps(build(), indent=1, ensure_ascii=True) + "\n")
