"""A small HS256 signer for device JWTs: what a MicroPython board uses to answer a challenge.

Contract (docs/device-sdk.md, "Device JWT"; docs/security.md for the hub's checks):
- ``device_token(secret, device_id, hub_id, hub_time_ms, nonce)`` returns the compact JWS
  ``base64url(header) "." base64url(claims) "." base64url(HMAC-SHA256)`` with the header
  ``{"alg":"HS256","typ":"sx-device+jwt"}`` and the claims, in exactly this order,
  ``{"sub", "aud", "iat", "exp", "nonce"}``: ``iat`` is the hub's time in seconds (the board
  needs no clock), ``exp = iat + TOKEN_LIFETIME_S``, ``nonce`` the challenge nonce in
  base64url without padding.
- The output is byte-identical to PyJWT's ``jwt.encode(claims, secret, algorithm="HS256",
  headers={"typ": "sx-device+jwt"})`` for the same claims: JSON with no spaces, header keys
  sorted, non-ASCII and control characters escaped as Python's ``json`` escapes them.
  tests/test_jwt.py proves it with a differential property test; tests/micropython/check_sdk.py
  checks a stored vector under MicroPython.
Why hand-written: MicroPython ports may lack ``hmac`` and ``json``; HMAC (RFC 2104) and the
fixed JSON shape are a few lines. MicroPython subset: imports only ``hashlib`` and ``binascii``.
"""

import binascii
import hashlib

TOKEN_TYPE = "sx-device+jwt"
TOKEN_LIFETIME_S = 300  # the hub accepts at most an hour; five minutes covers any handshake
_BLOCK_SIZE = 64  # SHA-256 block size in bytes (RFC 2104's B)
# base64url of the fixed header '{"alg":"HS256","typ":"sx-device+jwt"}' (sorted keys, as PyJWT).
_HEADER = '{"alg":"HS256","typ":"%s"}' % TOKEN_TYPE

_SHORT_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t",
                  "\b": "\\b", "\f": "\\f"}


def b64url(data):
    """Return ``data`` (bytes) in base64url without padding, as text."""
    text = binascii.b2a_base64(data).decode("ascii").strip()
    return text.replace("+", "-").replace("/", "_").rstrip("=")


def hmac_sha256(key, message):
    """Return HMAC-SHA256(key, message) (RFC 2104) as 32 bytes."""
    if len(key) > _BLOCK_SIZE:
        key = hashlib.sha256(key).digest()
    key = bytes(key) + bytes(_BLOCK_SIZE - len(key))
    inner = hashlib.sha256(bytes([b ^ 0x36 for b in key]))
    inner.update(message)
    outer = hashlib.sha256(bytes([b ^ 0x5C for b in key]))
    outer.update(inner.digest())
    return outer.digest()


def json_string(text):
    """Return ``text`` as a JSON string literal, escaped exactly as Python's ``json.dumps``
    (``ensure_ascii``): short escapes, ``\\u00XX`` below space and above ``~``, surrogate
    pairs beyond the BMP."""
    parts = ['"']
    for char in text:
        code = ord(char)
        if 0x20 <= code < 0x7F and char != '"' and char != "\\":
            parts.append(char)
        elif char in _SHORT_ESCAPES:
            parts.append(_SHORT_ESCAPES[char])
        elif code < 0x10000:
            parts.append("\\u%04x" % code)
        else:
            code -= 0x10000
            parts.append("\\u%04x\\u%04x" % (0xD800 | (code >> 10), 0xDC00 | (code & 0x3FF)))
    parts.append('"')
    return "".join(parts)


def claims_json(device_id, hub_id, iat, nonce_b64):
    """Return the claims object as JSON text, keys in the contract's order."""
    return '{"sub":%s,"aud":%s,"iat":%d,"exp":%d,"nonce":%s}' % (
        json_string(device_id), json_string(hub_id), iat, iat + TOKEN_LIFETIME_S,
        json_string(nonce_b64))


def sign_hs256(secret, header_json, claims):
    """Return the compact HS256 JWS of the JSON texts ``header_json`` and ``claims``."""
    signing_input = "%s.%s" % (b64url(header_json.encode("utf-8")), b64url(claims.encode("utf-8")))
    signature = hmac_sha256(secret, signing_input.encode("ascii"))
    return "%s.%s" % (signing_input, b64url(signature))


def device_token(secret, device_id, hub_id, hub_time_ms, nonce):
    """Return the HS256 device JWT answering a challenge (``nonce`` bytes, hub time in ms)."""
    if not isinstance(secret, (bytes, bytearray)) or not secret:
        raise ValueError("the HS256 secret must be non-empty bytes")
    iat = hub_time_ms // 1000
    return sign_hs256(secret, _HEADER, claims_json(device_id, hub_id, iat, b64url(nonce)))
