"""At-rest encryption: the master key, data keys, and AES-256-GCM sealing (docs/security.md).

Rules:
- Every primitive comes from ``cryptography`` (AESGCM, HKDF); nothing here is hand-made.
- The master key is 32 random bytes in ``DATA/master.key`` (mode 0600). It only wraps data keys;
  it never seals a record. Loading refuses a file that group or others can read.
- A data key is 32 random bytes with an integer id and a purpose ("secrets", "telemetry", ...).
  It is kept in the database wrapped by the master key with AES-256-GCM, the additional data
  binding its id and purpose, so a wrapped key cannot be moved to another id or purpose.
- A sealed blob is ``version (1 byte) | data key id (4 bytes, big-endian) | nonce (12 bytes) |
  ciphertext+tag``. The GCM additional data is ``version | key id | purpose | 0x00 | aad``: the
  header, the purpose and the caller's record binding (table, record id, column) are all
  authenticated, so a flipped byte or a blob moved to another row fails with ``SealError``.
- Nonces are 12 random bytes from ``os.urandom`` (``seal_many`` reads a batch's nonces in one
  call and gives each blob its own slice); NIST SP 800-38D caps random-nonce use at 2**32
  seals per key, which is why the keyring can hold several keys per purpose (the newest seals).
"""

from __future__ import annotations

import hashlib
import os
import secrets
import stat
import struct
from dataclasses import dataclass
from typing import Iterable, Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from smartx_hub.store import StoreError

KEY_SIZE = 32
NONCE_SIZE = 12
TAG_SIZE = 16
SEAL_VERSION = 1
WRAP_VERSION = 1
_HEADER = struct.Struct(">BI")  # version, data key id
HEADER_SIZE = _HEADER.size
MIN_BLOB_SIZE = HEADER_SIZE + NONCE_SIZE + TAG_SIZE
MAX_KEY_ID = 2**32 - 1

#: Purposes the hub creates a data key for at initialisation. One key per purpose means a
#: leaked telemetry key opens no secrets, and each can be replaced on its own.
PURPOSES = ("secrets", "telemetry", "commands", "state", "scope", "pki")


class CryptoError(Exception):
    """Base of the at-rest encryption errors."""


class SealError(CryptoError, StoreError):
    """A sealed blob or wrapped key failed to open: tampered, truncated, moved, or wrong key.

    Also a ``StoreError``: to a store's caller, a record that fails to open is a store failure."""


class KeyFileError(CryptoError):
    """The master key file is missing, malformed, or readable by group or others."""


@dataclass(frozen=True)
class WrappedKey:
    """A data key as the database holds it: wrapped by the master key."""

    key_id: int
    purpose: str
    wrapped: bytes


def generate_master_key() -> bytes:
    """Return a fresh random master key."""
    return secrets.token_bytes(KEY_SIZE)


def master_key_id(master_key: bytes) -> str:
    """A short public name for a master key (safe to print or log: a one-way HKDF output)."""
    return hkdf_derive(master_key, b"smartx master key id", 8).hex()


def hkdf_derive(key: bytes, info: bytes, length: int = KEY_SIZE) -> bytes:
    """Derive ``length`` bytes from ``key`` for one named use (HKDF-SHA256, RFC 5869)."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(key)


# -- key files -----------------------------------------------------------------------------


def fsync_dir(path: str) -> None:
    """Flush a directory entry change (a create or rename) to disk."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_private_file(path: str, data: bytes) -> None:
    """Atomically write ``data`` to ``path`` with mode 0600: temp file, fsync, rename, fsync dir.

    A reader sees either the old file or the whole new one, never a torn write."""
    directory = os.path.dirname(os.path.abspath(path))
    temp = os.path.join(directory, ".%s.tmp-%s" % (os.path.basename(path), secrets.token_hex(4)))
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)  # the umask may only narrow it, but say it outright
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(temp)
        raise
    os.close(fd)
    try:
        os.replace(temp, path)
    except BaseException:
        os.unlink(temp)
        raise
    fsync_dir(directory)


def write_master_key(path: str, master_key: bytes) -> None:
    """Write a master key file atomically with mode 0600."""
    if len(master_key) != KEY_SIZE:
        raise KeyFileError("a master key is %d bytes, not %d" % (KEY_SIZE, len(master_key)))
    write_private_file(path, master_key)


def load_master_key(path: str) -> bytes:
    """Read a master key file, refusing one that group or others can read or that is not 32 bytes."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        raise KeyFileError("master key file %s is missing" % path) from None
    except OSError as exc:
        raise KeyFileError("cannot open master key file %s: %s" % (path, exc.strerror)) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise KeyFileError("master key file %s is not a regular file" % path)
        if info.st_mode & 0o077:
            raise KeyFileError(
                "master key file %s has mode %04o: group or others can read it; run chmod 600 on it"
                % (path, stat.S_IMODE(info.st_mode)))
        data = os.read(fd, KEY_SIZE + 1)
    finally:
        os.close(fd)
    if len(data) != KEY_SIZE:
        raise KeyFileError("master key file %s does not hold a %d-byte key" % (path, KEY_SIZE))
    return data


# -- wrapping and sealing ------------------------------------------------------------------


def _check_key_id(key_id: int) -> None:
    if not isinstance(key_id, int) or isinstance(key_id, bool) or not 0 < key_id <= MAX_KEY_ID:
        raise CryptoError("data key id must be an integer in 1..%d" % MAX_KEY_ID)


def _wrap_aad(key_id: int, purpose: str) -> bytes:
    return b"smartx-data-key|%d|%d|%s" % (WRAP_VERSION, key_id, purpose.encode())


def wrap_data_key(master_key: bytes, key_id: int, purpose: str, data_key: bytes) -> bytes:
    """Wrap a data key under the master key: ``version | nonce | ciphertext+tag``."""
    _check_key_id(key_id)
    nonce = os.urandom(NONCE_SIZE)
    sealed = AESGCM(master_key).encrypt(nonce, data_key, _wrap_aad(key_id, purpose))
    return bytes([WRAP_VERSION]) + nonce + sealed


def unwrap_data_key(master_key: bytes, key_id: int, purpose: str, wrapped: bytes) -> bytes:
    """Open a wrapped data key; ``SealError`` if this master key did not wrap it for this id and purpose."""
    if len(wrapped) != 1 + NONCE_SIZE + KEY_SIZE + TAG_SIZE or wrapped[0] != WRAP_VERSION:
        raise SealError("wrapped data key %d (%s) is malformed" % (key_id, purpose))
    nonce = wrapped[1:1 + NONCE_SIZE]
    try:
        return AESGCM(master_key).decrypt(nonce, wrapped[1 + NONCE_SIZE:], _wrap_aad(key_id, purpose))
    except InvalidTag:
        raise SealError("master key does not open data key %d (%s)" % (key_id, purpose)) from None


def seal_aad(key_id: int, purpose: str, aad: bytes) -> bytes:
    """The exact GCM additional data for a blob (exposed so tests can check the format)."""
    return _HEADER.pack(SEAL_VERSION, key_id) + purpose.encode() + b"\x00" + aad


class Keyring:
    """The master key and the opened data keys; seals and opens records.

    The store persists ``WrappedKey`` rows; the keyring only ever sees them in memory. Thread-safe
    for ``seal``/``open`` once loaded (dict reads; AESGCM objects are stateless)."""

    def __init__(self, master_key: bytes) -> None:
        if len(master_key) != KEY_SIZE:
            raise KeyFileError("a master key is %d bytes" % KEY_SIZE)
        self._master = master_key
        self._keys: dict[int, tuple[str, bytes, AESGCM]] = {}
        self._active: dict[str, int] = {}

    # -- data keys -------------------------------------------------------------------------
    def load(self, rows: Iterable[WrappedKey]) -> None:
        """Unwrap and hold every given data key; ``SealError`` if the master key opens one not."""
        opened = [(row, unwrap_data_key(self._master, row.key_id, row.purpose, row.wrapped))
                  for row in rows]
        for row, key in opened:
            self._hold(row.key_id, row.purpose, key)

    def create(self, key_id: int, purpose: str) -> WrappedKey:
        """Make a new random data key for ``purpose``, hold it, and return it wrapped to persist.

        It becomes the purpose's sealing key when its id is the highest of that purpose."""
        if key_id in self._keys:
            raise CryptoError("data key id %d is taken" % key_id)
        key = secrets.token_bytes(KEY_SIZE)
        wrapped = wrap_data_key(self._master, key_id, purpose, key)
        self._hold(key_id, purpose, key)
        return WrappedKey(key_id, purpose, wrapped)

    def rewrap(self, row: WrappedKey, new_master_key: bytes) -> WrappedKey:
        """Return ``row`` rewrapped under ``new_master_key`` (checked against the current master first)."""
        key = unwrap_data_key(self._master, row.key_id, row.purpose, row.wrapped)
        return WrappedKey(row.key_id, row.purpose,
                          wrap_data_key(new_master_key, row.key_id, row.purpose, key))

    def replace_master(self, new_master_key: bytes) -> None:
        """Use ``new_master_key`` from now on (call only after the rewrapped keys are committed)."""
        if len(new_master_key) != KEY_SIZE:
            raise KeyFileError("a master key is %d bytes" % KEY_SIZE)
        self._master = new_master_key

    def has_purpose(self, purpose: str) -> bool:
        """Whether a data key for ``purpose`` is held."""
        return purpose in self._active

    def key_ids(self) -> list[int]:
        """Ids of every held data key."""
        return sorted(self._keys)

    def data_key(self, purpose: str) -> bytes:
        """The raw active data key of ``purpose`` (for a use that is not record sealing, e.g. scope)."""
        return self._keys[self._active_id(purpose)][1]

    def derive(self, purpose: str, info: bytes, length: int = KEY_SIZE) -> bytes:
        """HKDF of the active data key of ``purpose`` for one named use."""
        return hkdf_derive(self.data_key(purpose), info, length)

    @property
    def master_key_id(self) -> str:
        """The public name of the master key in use."""
        return master_key_id(self._master)

    # -- sealing ---------------------------------------------------------------------------
    def seal(self, purpose: str, plaintext: bytes, aad: bytes) -> bytes:
        """Encrypt and authenticate ``plaintext`` bound to ``purpose`` and ``aad``."""
        key_id = self._active_id(purpose)
        aead = self._keys[key_id][2]
        nonce = os.urandom(NONCE_SIZE)
        sealed = aead.encrypt(nonce, bytes(plaintext), seal_aad(key_id, purpose, aad))
        return _HEADER.pack(SEAL_VERSION, key_id) + nonce + sealed

    def seal_many(self, purpose: str, items: Sequence[tuple[bytes, bytes]]) -> list[bytes]:
        """``seal`` of each ``(plaintext, aad)`` pair: the same blobs, made for less per item.

        Each blob still gets its own random 12-byte nonce (one ``os.urandom`` call reads them
        all, then each takes its slice) under the purpose's active key; the header and the
        key/purpose prefix of the additional data are built once."""
        if not items:
            return []
        key_id = self._active_id(purpose)
        encrypt = self._keys[key_id][2].encrypt
        header = _HEADER.pack(SEAL_VERSION, key_id)
        prefix = seal_aad(key_id, purpose, b"")
        nonces = os.urandom(NONCE_SIZE * len(items))
        out = []
        start = 0
        for plaintext, aad in items:
            nonce = nonces[start:start + NONCE_SIZE]
            start += NONCE_SIZE
            out.append(header + nonce + encrypt(nonce, plaintext, prefix + aad))
        return out

    def open(self, purpose: str, blob: bytes, aad: bytes) -> bytes:
        """Authenticate and decrypt a blob made by ``seal`` with the same purpose and ``aad``."""
        if not isinstance(blob, (bytes, bytearray, memoryview)) or len(blob) < MIN_BLOB_SIZE:
            raise SealError("sealed value is truncated or not bytes")
        blob = bytes(blob)
        version, key_id = _HEADER.unpack_from(blob)
        if version != SEAL_VERSION:
            raise SealError("sealed value has unknown version %d" % version)
        held = self._keys.get(key_id)
        if held is None or held[0] != purpose:
            raise SealError("sealed value names data key %d, not a %s key" % (key_id, purpose))
        nonce = blob[HEADER_SIZE:HEADER_SIZE + NONCE_SIZE]
        try:
            return held[2].decrypt(nonce, blob[HEADER_SIZE + NONCE_SIZE:],
                                   seal_aad(key_id, purpose, aad))
        except InvalidTag:
            raise SealError("sealed value failed authentication (tampered or moved)") from None

    # -- internals -------------------------------------------------------------------------
    def _hold(self, key_id: int, purpose: str, key: bytes) -> None:
        self._keys[key_id] = (purpose, key, AESGCM(key))
        if key_id > self._active.get(purpose, 0):
            self._active[purpose] = key_id

    def _active_id(self, purpose: str) -> int:
        try:
            return self._active[purpose]
        except KeyError:
            raise CryptoError("no data key for purpose %r" % purpose) from None


def build_aad(*parts: object) -> bytes:
    """Join record-binding parts as ``a|b|c``, escaping ``%`` and ``|`` so the join is one-to-one."""
    out = []
    for part in parts:
        text = part.decode() if isinstance(part, bytes) else str(part)
        out.append(text.replace("%", "%25").replace("|", "%7C"))
    return "|".join(out).encode()


def fingerprint_bytes(data: bytes) -> str:
    """``sha256:<hex>`` of ``data``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()
