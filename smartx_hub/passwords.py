"""Dashboard passwords: argon2id hashes, and the policy a new password must meet.

Rules (docs/security.md, "API tokens and accounts"):
- Only argon2id hashes (argon2-cffi, RFC 9106 low-memory profile: 64 MiB, 3 passes) are stored;
  the hash string carries its own parameters, so raising them later re-hashes on next login.
- A password longer than ``MAX_PASSWORD_CHARS`` is refused before hashing: argon2 accepts any
  length, and a megabyte password would let one request buy a lot of CPU.
- ``verify_password`` never raises for a wrong or malformed hash; it answers False.
"""

from __future__ import annotations

import threading

import argon2
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

MIN_PASSWORD_CHARS = 10
MAX_PASSWORD_CHARS = 1024

_HASHER = argon2.PasswordHasher.from_parameters(argon2.profiles.RFC_9106_LOW_MEMORY)
_dummy_lock = threading.Lock()
_dummy_hash: str | None = None


class PasswordPolicyError(ValueError):
    """A new password does not meet the policy (too short, too long, not text)."""


def check_password_policy(password: str) -> None:
    """Raise ``PasswordPolicyError`` unless ``password`` may be set as an account password."""
    if not isinstance(password, str):
        raise PasswordPolicyError("password must be text")
    if len(password) < MIN_PASSWORD_CHARS:
        raise PasswordPolicyError("password must have at least %d characters" % MIN_PASSWORD_CHARS)
    if len(password) > MAX_PASSWORD_CHARS:
        raise PasswordPolicyError("password must have at most %d characters" % MAX_PASSWORD_CHARS)


def hash_password(password: str) -> str:
    """Return the argon2id hash string of ``password`` after checking the policy."""
    check_password_policy(password)
    return _HASHER.hash(password)


def verify_password(password_hash: str, password: str) -> bool:
    """Whether ``password`` matches ``password_hash``; False for any malformed input."""
    if not isinstance(password, str) or len(password) > MAX_PASSWORD_CHARS:
        return False
    try:
        return _HASHER.verify(password_hash, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError, TypeError, ValueError):
        return False


def needs_rehash(password_hash: str) -> bool:
    """Whether the hash was made with weaker parameters than the current ones."""
    try:
        return _HASHER.check_needs_rehash(password_hash)
    except (InvalidHashError, ValueError):
        return True


def burn_verify_time(password: str) -> None:
    """Spend the time of one verification, so that an unknown username costs what a known one
    does and login timing does not reveal which accounts exist."""
    global _dummy_hash
    with _dummy_lock:
        if _dummy_hash is None:
            _dummy_hash = _HASHER.hash("smartx-dummy-password")
        dummy = _dummy_hash
    verify_password(dummy, password if isinstance(password, str) else "")
