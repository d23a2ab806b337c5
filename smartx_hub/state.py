"""The hub's state on disk: ``init_hub`` makes it, ``load_hub`` opens it, as a ``HubContext``.

The data directory (mode 0700) holds:

    hub.json           config: hub id, host names, ports (written last by init: its presence
                       means the hub is complete)
    master.key         the 32-byte master key, mode 0600 (wraps the data keys, nothing else)
    hub.db (-wal/-shm) the SQLite store (smartx_hub/sqlite_store.py), mode 0600
    ca.pem / ca.key    the hub CA certificate / its private key, encrypted, mode 0600
    server.pem / .key  the TLS server certificate / its key, unencrypted (the ssl module must
                       load it), mode 0600
    hub.lock           advisory lock: every open hub holds it shared; key rotation holds it
                       exclusive, so a rotation never runs under a live hub

Master key rotation (``rotate_master_key``), in this order, so an interruption at any point
loses nothing (docs/security.md, "Master key rotation"):

    1. copy the old key to master.key.old-<ts>             (fsync)
    2. write the new key to master.key.new                  (temp, fsync, rename, fsync dir)
    3. rewrap every data key in one transaction             (the database now needs the new key)
    4. rename master.key.new over master.key                (fsync dir)
    5. delete master.key.old-<ts> (unless asked to keep it)

``load_hub`` finishes an interrupted rotation: if master.key no longer opens the data keys but
master.key.new does, step 3 committed and it performs step 4; if master.key opens them, any
master.key.new is a leftover of a rotation that never committed and is deleted.
"""

from __future__ import annotations

import base64
import datetime
import errno
import fcntl
import hashlib
import json
import logging
import os
import ssl
import time
from typing import Any, Optional

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from smartx_hub import pki
from smartx_hub.crypto import (
    Keyring,
    KeyFileError,
    SealError,
    build_aad,
    fsync_dir,
    generate_master_key,
    load_master_key,
    write_master_key,
    write_private_file,
)
from smartx_hub.sqlite_store import SQLiteStore, new_id

log = logging.getLogger(__name__)

CONFIG_FILE = "hub.json"
MASTER_KEY_FILE = "master.key"
NEW_MASTER_KEY_FILE = "master.key.new"
OLD_MASTER_KEY_PREFIX = "master.key.old-"
DB_FILE = "hub.db"
CA_CERT_FILE = "ca.pem"
CA_KEY_FILE = "ca.key"
SERVER_CERT_FILE = "server.pem"
SERVER_KEY_FILE = "server.key"
LOCK_FILE = "hub.lock"
HUB_FILES = (CONFIG_FILE, MASTER_KEY_FILE, NEW_MASTER_KEY_FILE, DB_FILE, DB_FILE + "-wal",
             CA_CERT_FILE, CA_KEY_FILE, SERVER_CERT_FILE, SERVER_KEY_FILE)

CONFIG_VERSION = 1
DEFAULT_DEVICE_PORT = 7883
DEFAULT_API_PORT = 8443
#: How long opening a hub waits for a key rotation to finish before giving up.
SHARED_LOCK_WAIT_S = 10.0
#: How long a key rotation waits for other users of the hub (a short CLI command) to finish.
EXCLUSIVE_LOCK_WAIT_S = 1.0

_TOKEN_KEY_META = "token_signing_key"
_CA_PASSWORD_INFO = b"smartx ca private key password v1"


class HubStateError(Exception):
    """The hub's data directory is missing, unusable, or in a state the request cannot handle."""


class HubExistsError(HubStateError):
    """``init`` found a hub (or the remains of one) where it was asked to create one."""


class HubNotFoundError(HubStateError):
    """No initialised hub in the data directory."""


class HubBusyError(HubStateError):
    """Another process holds the hub's lock in a conflicting way."""


def wall_clock_ms() -> int:
    """The wall clock in integer milliseconds (the CLI's time source; the store takes time in)."""
    return time.time_ns() // 1_000_000


# -- locking ------------------------------------------------------------------------------


def _lock(data_dir: str, exclusive: bool) -> int:
    path = os.path.join(data_dir, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
    deadline = time.monotonic() + (EXCLUSIVE_LOCK_WAIT_S if exclusive else SHARED_LOCK_WAIT_S)
    while True:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
            return fd
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise HubStateError("cannot lock %s: %s" % (path, exc.strerror)) from None
        if time.monotonic() >= deadline:
            os.close(fd)
            if exclusive:
                raise HubBusyError("the hub in %s is in use (serve or another command is running);"
                                   " stop it first" % data_dir)
            raise HubBusyError("the hub in %s is locked by a key rotation; try again" % data_dir)
        time.sleep(0.05)


# -- the context --------------------------------------------------------------------------


class HubContext:
    """An open hub: its store, keys, certificates and config. Close it when done."""

    def __init__(self, data_dir: str, config: dict, store: SQLiteStore, keyring: Keyring,
                 lock_fd: int) -> None:
        self.data_dir = data_dir
        self.config = config
        self.hub_id: str = config["hub_id"]
        self.store = store
        self.keyring = keyring
        self._lock_fd: Optional[int] = lock_fd
        self.master_key_path = os.path.join(data_dir, MASTER_KEY_FILE)
        self.ca_cert_path = os.path.join(data_dir, CA_CERT_FILE)
        self.ca_key_path = os.path.join(data_dir, CA_KEY_FILE)
        self.server_cert_path = os.path.join(data_dir, SERVER_CERT_FILE)
        self.server_key_path = os.path.join(data_dir, SERVER_KEY_FILE)
        try:
            with open(self.ca_cert_path, "rb") as handle:
                self.ca_cert_pem: bytes = handle.read()
        except OSError as exc:
            raise HubStateError("cannot read %s: %s" % (self.ca_cert_path, exc.strerror)) from None
        try:
            self.ca_fingerprint: str = pki.ca_fingerprint(self.ca_cert_pem)
        except pki.PKIError as exc:
            raise HubStateError("%s: %s" % (self.ca_cert_path, exc)) from None
        self.token_signing_key: ec.EllipticCurvePrivateKey = _load_token_key(store, keyring)
        self.token_public_key: ec.EllipticCurvePublicKey = self.token_signing_key.public_key()
        self.token_key_id: str = token_key_id(self.token_public_key)
        self.scope_key: bytes = keyring.data_key("scope")

    @property
    def hosts(self) -> list[str]:
        """The host names the server certificate carries (the first is what bundles name)."""
        return list(self.config["hosts"])

    @property
    def device_port(self) -> int:
        """The configured device listener port."""
        return int(self.config["device_port"])

    @property
    def api_port(self) -> int:
        """The configured API port."""
        return int(self.config["api_port"])

    def device_tls_context(self) -> ssl.SSLContext:
        """Server TLS context for the device listener (Mozilla intermediate profile)."""
        return pki.server_tls_context(self.server_cert_path, self.server_key_path)

    def api_tls_context(self) -> ssl.SSLContext:
        """Server TLS context for the HTTPS API (the same profile and certificate)."""
        return pki.server_tls_context(self.server_cert_path, self.server_key_path)

    def client_tls_context(self) -> ssl.SSLContext:
        """Client TLS context trusting only this hub's CA (for tools and tests)."""
        return pki.client_tls_context(self.ca_cert_pem)

    def load_ca_key(self) -> ec.EllipticCurvePrivateKey:
        """Open the CA private key (needed only to issue server certificates)."""
        try:
            with open(self.ca_key_path, "rb") as handle:
                data = handle.read()
        except OSError as exc:
            raise HubStateError("cannot read %s: %s" % (self.ca_key_path, exc.strerror)) from None
        return pki.load_private_key_pem(data, _ca_password(self.keyring))

    def close(self) -> None:
        """Close the store and release the hub lock (idempotent)."""
        if self._lock_fd is None:
            return
        try:
            self.store.close()
        finally:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    def __enter__(self) -> "HubContext":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


def token_key_id(public_key: ec.EllipticCurvePublicKey) -> str:
    """The ``kid`` of the token signing key: 16 hex digits of SHA-256 of its SubjectPublicKeyInfo."""
    der = public_key.public_bytes(serialization.Encoding.DER,
                                  serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()[:16]


def _ca_password(keyring: Keyring) -> bytes:
    # base64 keeps the password printable: some PEM tooling stops at a NUL byte.
    return base64.b64encode(keyring.derive("pki", _CA_PASSWORD_INFO))


def _token_key_aad() -> bytes:
    return build_aad("meta", _TOKEN_KEY_META, "value")


def _store_token_key(store: SQLiteStore, keyring: Keyring, key: ec.EllipticCurvePrivateKey) -> None:
    der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    blob = keyring.seal("secrets", der, _token_key_aad())
    store.set_meta(_TOKEN_KEY_META, base64.b64encode(blob).decode("ascii"))
    store.set_meta("token_key_id", token_key_id(key.public_key()))


def _load_token_key(store: SQLiteStore, keyring: Keyring) -> ec.EllipticCurvePrivateKey:
    encoded = store.get_meta(_TOKEN_KEY_META)
    if encoded is None:
        raise HubStateError("the database holds no token signing key")
    try:
        blob = base64.b64decode(encoded, validate=True)
    except ValueError:
        raise HubStateError("the stored token signing key is not base64") from None
    der = keyring.open("secrets", blob, _token_key_aad())
    key = serialization.load_der_private_key(der, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise HubStateError("the stored token signing key is not an EC key")
    return key


# -- config -------------------------------------------------------------------------------


def _check_port(name: str, port: Any) -> int:
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        raise HubStateError("%s must be a port number in 1..65535" % name)
    return port


def _read_config(data_dir: str) -> dict:
    path = os.path.join(data_dir, CONFIG_FILE)
    try:
        with open(path, "rb") as handle:
            config = json.loads(handle.read().decode("utf-8"))
    except FileNotFoundError:
        raise HubNotFoundError("no hub in %s (run: smartx-hub init --data %s)"
                               % (data_dir, data_dir)) from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise HubStateError("cannot read %s: %s" % (path, exc)) from None
    if not isinstance(config, dict) or config.get("version") != CONFIG_VERSION:
        raise HubStateError("%s is not a version %d hub config" % (path, CONFIG_VERSION))
    hosts = config.get("hosts")
    if not isinstance(config.get("hub_id"), str) or not isinstance(hosts, list) or not hosts \
            or not all(isinstance(h, str) for h in hosts):
        raise HubStateError("%s lacks hub_id or hosts" % path)
    _check_port("device_port", config.get("device_port"))
    _check_port("api_port", config.get("api_port"))
    return config


# -- init and load ------------------------------------------------------------------------


def init_hub(data_dir: str, hosts: Optional[list[str]] = None,
             device_port: int = DEFAULT_DEVICE_PORT, api_port: int = DEFAULT_API_PORT,
             now_ms: Optional[int] = None) -> HubContext:
    """Create a new hub in ``data_dir``; ``HubExistsError`` if one (or part of one) is there."""
    now = wall_clock_ms() if now_ms is None else now_ms
    hosts = list(hosts) if hosts else list(pki.DEFAULT_HOSTS)
    for host in hosts:
        try:
            pki.parse_host(host)
        except pki.PKIError as exc:
            raise HubStateError(str(exc)) from None
    _check_port("device_port", device_port)
    _check_port("api_port", api_port)
    if device_port == api_port:
        raise HubStateError("device_port and api_port must differ")
    data_dir = os.path.abspath(data_dir)
    if os.path.exists(os.path.join(data_dir, CONFIG_FILE)):
        raise HubExistsError("%s already holds a hub; refusing to overwrite it" % data_dir)
    try:
        os.makedirs(data_dir, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise HubStateError("cannot create %s: %s" % (data_dir, exc.strerror)) from None
    if not os.path.isdir(data_dir):
        raise HubStateError("%s is not a directory" % data_dir)
    leftovers = [name for name in HUB_FILES if os.path.lexists(os.path.join(data_dir, name))]
    if leftovers:
        raise HubExistsError("%s holds files of an earlier hub (%s); refusing to overwrite them"
                             % (data_dir, ", ".join(leftovers)))
    lock_fd = _lock(data_dir, exclusive=True)
    created: list[str] = []
    store: Optional[SQLiteStore] = None

    def _track(name: str) -> str:
        created.append(os.path.join(data_dir, name))
        return created[-1]

    try:
        # Re-check under the lock: a concurrent init may have won the race.
        if os.path.exists(os.path.join(data_dir, MASTER_KEY_FILE)):
            raise HubExistsError("%s already holds a hub; refusing to overwrite it" % data_dir)
        master_key = generate_master_key()
        write_master_key(_track(MASTER_KEY_FILE), master_key)
        keyring = Keyring(master_key)
        for suffix in ("", "-wal", "-shm"):
            _track(DB_FILE + suffix)
        store = SQLiteStore(os.path.join(data_dir, DB_FILE), keyring)
        hub_id = new_id("hub")
        store.set_meta("hub_id", hub_id)
        ca_key, ca_cert = pki.create_ca(hub_id, now)
        write_private_file(_track(CA_KEY_FILE), pki.private_key_pem(ca_key, _ca_password(keyring)))
        write_private_file(_track(CA_CERT_FILE), pki.cert_pem(ca_cert))
        server_key, server_cert = pki.create_server_cert(ca_key, ca_cert, hosts, now)
        write_private_file(_track(SERVER_KEY_FILE), pki.private_key_pem(server_key))
        write_private_file(_track(SERVER_CERT_FILE), pki.cert_pem(server_cert))
        _store_token_key(store, keyring, ec.generate_private_key(ec.SECP256R1()))
        store.set_meta("created_ms", str(now))
        config = {"version": CONFIG_VERSION, "hub_id": hub_id, "hosts": hosts,
                  "device_port": device_port, "api_port": api_port, "created_ms": now}
        write_private_file(_track(CONFIG_FILE),
                           (json.dumps(config, indent=2) + "\n").encode("utf-8"))
        fcntl.flock(lock_fd, fcntl.LOCK_SH)  # init is done: let CLI commands share the hub
        return HubContext(data_dir, config, store, keyring, lock_fd)
    except BaseException:
        # Leave the directory as we found it, so that init can simply be run again.
        if store is not None:
            store.close()
        for name in reversed(created):
            try:
                os.unlink(name)
            except FileNotFoundError:
                pass
        os.close(lock_fd)
        raise


def _open_store(data_dir: str, key_path: str) -> tuple[Keyring, SQLiteStore]:
    keyring = Keyring(load_master_key(key_path))
    return keyring, SQLiteStore(os.path.join(data_dir, DB_FILE), keyring)


def _open_with_recovery(data_dir: str) -> tuple[Keyring, SQLiteStore]:
    current = os.path.join(data_dir, MASTER_KEY_FILE)
    pending = os.path.join(data_dir, NEW_MASTER_KEY_FILE)
    try:
        keyring, store = _open_store(data_dir, current)
    except SealError:
        if not os.path.exists(pending):
            raise HubStateError("%s does not open this hub's data keys (wrong or damaged key"
                                " file?)" % current) from None
        try:
            keyring, store = _open_store(data_dir, pending)
        except (SealError, KeyFileError):
            raise HubStateError("neither %s nor %s opens this hub's data keys"
                                % (current, pending)) from None
        # The database committed a rotation whose final rename never happened: finish it.
        os.replace(pending, current)
        fsync_dir(data_dir)
        log.warning("finished an interrupted master key rotation; the previous key may remain"
                    " in %s* (delete it once no old backup needs it)", OLD_MASTER_KEY_PREFIX)
        return keyring, store
    if os.path.exists(pending):
        # A rotation died before its commit: the database never used this key.
        os.unlink(pending)
        fsync_dir(data_dir)
        log.warning("removed %s left by an interrupted key rotation that never committed",
                    pending)
    return keyring, store


def load_hub(data_dir: str, exclusive: bool = False) -> HubContext:
    """Open the hub in ``data_dir`` (finishing an interrupted key rotation if one is found).

    ``exclusive`` fails with ``HubBusyError`` unless no other process has the hub open."""
    data_dir = os.path.abspath(data_dir)
    config = _read_config(data_dir)
    lock_fd = _lock(data_dir, exclusive)
    store = None
    try:
        keyring, store = _open_with_recovery(data_dir)
        stored_id = store.get_meta("hub_id")
        if stored_id != config["hub_id"]:
            raise HubStateError("%s names hub %s but the database belongs to %s"
                                % (CONFIG_FILE, config["hub_id"], stored_id))
        return HubContext(data_dir, config, store, keyring, lock_fd)
    except BaseException:
        if store is not None:
            store.close()
        os.close(lock_fd)
        raise


def _backup_name(data_dir: str, now: int) -> str:
    stamp = datetime.datetime.fromtimestamp(now / 1000, tz=datetime.timezone.utc)
    base = os.path.join(data_dir, OLD_MASTER_KEY_PREFIX + stamp.strftime("%Y%m%dT%H%M%SZ"))
    candidate, n = base, 1
    while os.path.lexists(candidate):
        n += 1
        candidate = "%s-%d" % (base, n)
    return candidate


def rotate_master_key(data_dir: str, now_ms: Optional[int] = None,
                      keep_old: bool = False) -> dict:
    """Replace the master key, rewrapping every data key (see the module docstring for the order).

    Returns ``{"old_key_id", "new_key_id", "data_keys", "kept_old"}`` (``kept_old``: the backup
    path of the old key when ``keep_old``, else None)."""
    now = wall_clock_ms() if now_ms is None else now_ms
    ctx = load_hub(data_dir, exclusive=True)
    try:
        data_dir = ctx.data_dir
        old_key = load_master_key(ctx.master_key_path)
        old_key_id = ctx.keyring.master_key_id
        new_key = generate_master_key()
        backup = _backup_name(data_dir, now)
        pending = os.path.join(data_dir, NEW_MASTER_KEY_FILE)
        write_master_key(backup, old_key)                                   # 1
        try:
            write_master_key(pending, new_key)                              # 2
            ctx.store.rotate_master_key(new_key)                            # 3
        except BaseException:
            # Nothing committed: the old key still rules; drop the unused files.
            for name in (pending, backup):
                try:
                    os.unlink(name)
                except FileNotFoundError:
                    pass
            raise
        os.replace(pending, ctx.master_key_path)                            # 4
        fsync_dir(data_dir)
        if not keep_old:                                                    # 5
            os.unlink(backup)
            fsync_dir(data_dir)
        return {"old_key_id": old_key_id, "new_key_id": ctx.keyring.master_key_id,
                "data_keys": ctx.store.data_key_count(),
                "kept_old": backup if keep_old else None}
    finally:
        ctx.close()
