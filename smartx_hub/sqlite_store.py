"""``SQLiteStore``: the embedded implementation of ``Store`` (smartx_hub/store.py).

Rules:
- One connection, guarded by one lock (``check_same_thread=False``): every method is safe from
  any thread. Several processes (``serve`` and the CLI) share the file through WAL mode.
- Durability: ``synchronous=FULL``. In WAL mode ``NORMAL`` does not fsync the log at commit, so a
  power cut may undo a commit the hub already acknowledged to a device; FULL fsyncs the WAL on every
  commit. The price is one fsync per transaction, which is why ``add_telemetry`` takes many
  batches (from many sessions) and commits them together.
- Sealed columns (AES-256-GCM, smartx_hub/crypto.py), each bound by its additional data to
  ``table|record id|...|column``: device secrets, user password hashes, reading values (CBOR
  first), command args/results/errors, desired and reported state. Clear columns are what queries
  need: ids, names, stream names, timestamps, statuses, public keys, token hashes and scopes.
  A reading's stream name and timestamp are also in its value's additional data, so they cannot be
  altered unseen either.
- ``meta["devices_version"]`` counts changes to the device registry (add, enable, disable,
  remove). A running hub polls it to notice changes made by the CLI in another process.
- Schema version in ``meta["schema_version"]``; ``_MIGRATIONS[n]`` takes version n-1 to n.
  Version 2 adds ``devices.kind`` ("device" | "gateway") and ``devices.gateway_id`` (the gateway
  a board is assigned to; a foreign key with no delete action, so a gateway with boards cannot
  be deleted). Assigning a board bumps ``devices_version`` too: a running hub re-checks the
  sessions a gateway relays. Version 3 drops ``readings_by_batch``, the one index of ``readings``
  no query used (see ``_SCHEMA_V3``).
- Indexes of ``readings`` (every row pays for each on insert): ``readings_by_time`` serves
  ``query_telemetry`` without a stream, ``readings_by_stream`` with one, the primary key the
  pagination cursor. ``remove_device`` deletes a device's readings through ``readings_by_time``
  before the cascade from its batches runs, so each cascaded lookup finds an empty range
  (tests/test_store.py checks these plans).
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import sqlite3
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional, Sequence

import cbor2

from smartx_hub.crypto import PURPOSES, Keyring, SealError, WrappedKey, build_aad
from smartx_hub.store import (
    AuditEntry,
    Command,
    ConflictError,
    Device,
    DEVICE_KINDS,
    DeviceState,
    NotFoundError,
    Reading,
    Store,
    StoreError,
    TelemetryBatch,
    TokenRecord,
    User,
)

SCHEMA_VERSION = 3
AUTH_KINDS = ("es256", "eddsa", "hs256")
MAX_NAME_LENGTH = 64
MAX_QUERY_LIMIT = 10_000
DEVICES_VERSION_KEY = "devices_version"
COMMAND_STATUSES = ("queued", "delivered", "succeeded", "failed", "expired")
_DONE_STATUSES = ("succeeded", "failed", "expired")

_SCHEMA_V1 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE data_keys (
    id INTEGER PRIMARY KEY,
    purpose TEXT NOT NULL,
    wrapped BLOB NOT NULL
);
CREATE TABLE devices (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    auth TEXT NOT NULL CHECK (auth IN ('es256', 'eddsa', 'hs256')),
    public_key_pem BLOB,
    secret BLOB,
    enabled INTEGER NOT NULL,
    created_ms INTEGER NOT NULL,
    last_seen_ms INTEGER
);
-- The primary key is the unique index that makes a repeated (device_id, msg_id) a no-op.
CREATE TABLE telemetry_batches (
    device_id TEXT NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
    msg_id INTEGER NOT NULL,
    received_ms INTEGER NOT NULL,
    PRIMARY KEY (device_id, msg_id)
) WITHOUT ROWID;
-- AUTOINCREMENT: a seq is never reused, so a pagination cursor never points at a newer row.
CREATE TABLE readings (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    device_id TEXT NOT NULL,
    msg_id INTEGER NOT NULL,
    idx INTEGER NOT NULL,
    stream TEXT NOT NULL,
    ts_ms INTEGER NOT NULL,
    received_ms INTEGER NOT NULL,
    value BLOB NOT NULL,
    FOREIGN KEY (device_id, msg_id) REFERENCES telemetry_batches(device_id, msg_id)
        ON DELETE CASCADE
);
CREATE INDEX readings_by_time ON readings(device_id, ts_ms, seq);
CREATE INDEX readings_by_stream ON readings(device_id, stream, ts_ms, seq);
CREATE INDEX readings_by_batch ON readings(device_id, msg_id);
CREATE TABLE commands (
    id TEXT PRIMARY KEY,
    device_id TEXT NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    args BLOB NOT NULL,
    status TEXT NOT NULL
        CHECK (status IN ('queued', 'delivered', 'succeeded', 'failed', 'expired')),
    created_ms INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL,
    delivered_ms INTEGER,
    completed_ms INTEGER,
    result BLOB,
    error BLOB
);
CREATE INDEX commands_by_device ON commands(device_id, status, created_ms);
CREATE TABLE device_state (
    device_id TEXT PRIMARY KEY REFERENCES devices(id) ON DELETE CASCADE,
    desired BLOB,
    desired_version INTEGER NOT NULL DEFAULT 0,
    desired_ms INTEGER,
    reported BLOB,
    reported_ms INTEGER
);
CREATE TABLE users (
    id TEXT PRIMARY KEY,
    username TEXT NOT NULL UNIQUE COLLATE NOCASE,
    password_hash BLOB NOT NULL,
    created_ms INTEGER NOT NULL,
    tokens_valid_after_ms INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE tokens (
    id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    token_hash TEXT NOT NULL UNIQUE,
    hint TEXT NOT NULL,
    scopes TEXT NOT NULL,
    devices TEXT,
    created_ms INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL,
    last_used_ms INTEGER,
    revoked_ms INTEGER
);
CREATE INDEX tokens_by_user ON tokens(user_id);
CREATE TABLE audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts_ms INTEGER NOT NULL,
    action TEXT NOT NULL,
    actor TEXT NOT NULL,
    source TEXT NOT NULL,
    detail TEXT NOT NULL
);
"""

#: Version 2: device kinds and gateway assignment (docs/security.md, "Gateways"). SQLite's
#: ADD COLUMN accepts the CHECK and the REFERENCES clause (whose default must be NULL), so the
#: table need not be rebuilt; every existing device becomes a directly connected "device".
_SCHEMA_V2 = """
ALTER TABLE devices ADD COLUMN kind TEXT NOT NULL DEFAULT 'device'
    CHECK (kind IN ('device', 'gateway'));
ALTER TABLE devices ADD COLUMN gateway_id TEXT REFERENCES devices(id);
CREATE INDEX devices_by_gateway ON devices(gateway_id);
"""

#: Version 3: ``readings_by_batch`` (device_id, msg_id) only served the ON DELETE CASCADE from
#: ``telemetry_batches``, which happens only in ``remove_device``; that now deletes the device's
#: readings first (by ``readings_by_time``), so the index cost every reading an insert for nothing.
_SCHEMA_V3 = """
DROP INDEX IF EXISTS readings_by_batch;
"""

#: ``_MIGRATIONS[n]`` upgrades a database at version n-1 to version n, inside the open transaction.
#: Version 1 is the initial schema. Add a function for each later version; never edit a shipped one.
def _run_script(conn: sqlite3.Connection, script: str) -> None:
    """Run ``;``-separated statements inside the caller's transaction.

    (``Connection.executescript`` would COMMIT first, tearing the migration in two.)"""
    pending = ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            conn.execute(pending)
            pending = ""
    if pending.strip():
        raise StoreError("migration script ends inside a statement")


_MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {
    1: lambda conn: _run_script(conn, _SCHEMA_V1),
    2: lambda conn: _run_script(conn, _SCHEMA_V2),
    3: lambda conn: _run_script(conn, _SCHEMA_V3),
}


def new_id(prefix: str) -> str:
    """``<prefix>_`` + 16 random lowercase base32 characters (80 bits)."""
    return prefix + "_" + base64.b32encode(secrets.token_bytes(10)).decode("ascii").lower()


def _aad_part(part: object) -> bytes:
    """One part of ``build_aad``'s join, converted, escaped and encoded the same way."""
    text = part if type(part) is str else (part.decode() if isinstance(part, bytes)
                                           else str(part))
    return text.replace("%", "%25").replace("|", "%7C").encode()


def _check_name(kind: str, name: str) -> None:
    if not isinstance(name, str) or not name or len(name) > MAX_NAME_LENGTH:
        raise StoreError("%s name must be 1 to %d characters" % (kind, MAX_NAME_LENGTH))
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in name):
        raise StoreError("%s name must not contain control characters" % kind)


class SQLiteStore(Store):
    """The hub's store in one SQLite file, sealed columns opened with ``keyring``."""

    def __init__(self, path: str, keyring: Keyring) -> None:
        self.path = path
        self._keyring = keyring
        self._lock = threading.RLock()
        if not os.path.exists(path):
            # Create the file ourselves so it (and the -wal/-shm SQLite derives from it) is 0600.
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        try:
            # isolation_level=None: we issue BEGIN IMMEDIATE ourselves, so a write transaction
            # takes the write lock up front instead of failing half-way on a lock upgrade.
            self._conn = sqlite3.connect(path, timeout=10.0, isolation_level=None,
                                         check_same_thread=False)
        except sqlite3.Error as exc:
            raise StoreError("cannot open database %s: %s" % (path, exc)) from None
        try:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            self._migrate()
            self._load_data_keys()
        except sqlite3.Error as exc:
            self._conn.close()
            raise StoreError("cannot open database %s: %s" % (path, exc)) from None
        except BaseException:
            self._conn.close()
            raise

    # -- plumbing -------------------------------------------------------------------------
    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction under the lock; sqlite errors become StoreError."""
        with self._lock:
            conn = self._conn
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise StoreError("database busy or unavailable: %s" % exc) from None
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                if isinstance(exc, sqlite3.IntegrityError):
                    raise ConflictError("constraint failed: %s" % exc) from None
                if isinstance(exc, (sqlite3.Error, OverflowError)):
                    raise StoreError("database error: %s" % exc) from None
                raise

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            try:
                return self._conn.execute(sql, params).fetchall()
            except (sqlite3.Error, OverflowError) as exc:
                raise StoreError("database error: %s" % exc) from None

    def _migrate(self) -> None:
        with self._tx() as conn:
            has_meta = conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'").fetchone()
            current = 0
            if has_meta:
                row = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
                current = int(row[0]) if row else 0
            if current > SCHEMA_VERSION:
                raise StoreError("database schema version %d is newer than this hub supports (%d)"
                                 % (current, SCHEMA_VERSION))
            for version in range(current + 1, SCHEMA_VERSION + 1):
                _MIGRATIONS[version](conn)
                conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('schema_version', ?)",
                             (str(version),))

    def _load_data_keys(self) -> None:
        rows = [WrappedKey(r[0], r[1], bytes(r[2])) for r in
                self._read("SELECT id, purpose, wrapped FROM data_keys ORDER BY id")]
        self._keyring.load(rows)
        if all(self._keyring.has_purpose(p) for p in PURPOSES):
            return
        with self._tx() as conn:
            # Re-read inside the write lock: another process may have created them meanwhile.
            rows = [WrappedKey(r[0], r[1], bytes(r[2])) for r in
                    conn.execute("SELECT id, purpose, wrapped FROM data_keys ORDER BY id")]
            self._keyring.load(rows)
            next_id = max([r.key_id for r in rows] + [0]) + 1
            for purpose in PURPOSES:
                if not self._keyring.has_purpose(purpose):
                    made = self._keyring.create(next_id, purpose)
                    conn.execute("INSERT INTO data_keys(id, purpose, wrapped) VALUES (?, ?, ?)",
                                 (made.key_id, made.purpose, made.wrapped))
                    next_id += 1

    def _seal(self, purpose: str, plaintext: bytes, *aad_parts: object) -> bytes:
        return self._keyring.seal(purpose, plaintext, build_aad(*aad_parts))

    def _open(self, purpose: str, blob: bytes, *aad_parts: object) -> bytes:
        return self._keyring.open(purpose, bytes(blob), build_aad(*aad_parts))

    def _seal_value(self, purpose: str, value: Any, *aad_parts: object) -> bytes:
        try:
            encoded = cbor2.dumps(value)
        except (cbor2.CBOREncodeError, TypeError, ValueError) as exc:
            raise StoreError("value cannot be stored: %s" % exc) from None
        return self._seal(purpose, encoded, *aad_parts)

    def _open_value(self, purpose: str, blob: bytes, *aad_parts: object) -> Any:
        plaintext = self._open(purpose, blob, *aad_parts)
        try:
            return cbor2.loads(plaintext)
        except (cbor2.CBORDecodeError, ValueError) as exc:  # authenticated, so only our bug
            raise SealError("sealed value is not CBOR: %s" % exc) from None

    @staticmethod
    def _bump_devices_version(conn: sqlite3.Connection) -> None:
        conn.execute(
            "INSERT INTO meta(key, value) VALUES (?, '1') ON CONFLICT(key) DO UPDATE "
            "SET value = CAST(CAST(value AS INTEGER) + 1 AS TEXT)", (DEVICES_VERSION_KEY,))

    @staticmethod
    def _require(conn: sqlite3.Connection, sql: str, params: Sequence[Any], what: str) -> None:
        if conn.execute(sql, params).fetchone() is None:
            raise NotFoundError(what)

    # -- lifecycle and metadata -------------------------------------------------------------
    def close(self) -> None:
        """Close the connection (checkpointing the WAL into the main file)."""
        with self._lock:
            try:
                self._conn.close()
            except sqlite3.Error:
                pass

    def get_meta(self, key: str) -> Optional[str]:
        """The value stored under ``key``, or None."""
        rows = self._read("SELECT value FROM meta WHERE key=?", (key,))
        return rows[0][0] if rows else None

    def set_meta(self, key: str, value: str) -> None:
        """Store ``value`` under ``key`` (clear text: put nothing secret here unsealed)."""
        with self._tx() as conn:
            conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))

    # -- devices ----------------------------------------------------------------------------
    def add_device(self, name: str, auth: str, public_key_pem: Optional[bytes],
                   secret: Optional[bytes], now_ms: int, kind: str = "device",
                   gateway_id: Optional[str] = None) -> Device:
        """Enrol a device; ``ConflictError`` if the name is taken.

        ``kind`` is "device" or "gateway"; ``gateway_id`` assigns a new board to a gateway
        (``NotFoundError`` if there is no such device, ``StoreError`` if it is no gateway)."""
        _check_name("device", name)
        if kind not in DEVICE_KINDS:
            raise StoreError("kind must be one of %s" % ", ".join(DEVICE_KINDS))
        if gateway_id is not None and kind != "device":
            raise StoreError("a gateway connects directly: it cannot be assigned to a gateway")
        if auth not in AUTH_KINDS:
            raise StoreError("auth must be one of %s" % ", ".join(AUTH_KINDS))
        if auth == "hs256":
            if not secret or public_key_pem is not None:
                raise StoreError("an hs256 device has a secret and no public key")
        elif not public_key_pem or secret is not None:
            raise StoreError("an %s device has a public key and no secret" % auth)
        device_id = new_id("dev")
        sealed = None if secret is None else self._seal("secrets", bytes(secret),
                                                        "devices", device_id, "secret")
        with self._tx() as conn:
            if conn.execute("SELECT 1 FROM devices WHERE name=?", (name,)).fetchone():
                raise ConflictError("a device named %r already exists" % name)
            if gateway_id is not None:
                self._require_gateway(conn, gateway_id)
            conn.execute(
                "INSERT INTO devices(id, name, auth, public_key_pem, secret, enabled, created_ms,"
                " kind, gateway_id) VALUES (?, ?, ?, ?, ?, 1, ?, ?, ?)",
                (device_id, name, auth, public_key_pem, sealed, now_ms, kind, gateway_id))
            self._bump_devices_version(conn)
        return Device(device_id, name, auth, public_key_pem, secret, True, now_ms, None, kind,
                      gateway_id)

    @staticmethod
    def _require_gateway(conn: sqlite3.Connection, gateway_id: str) -> None:
        row = conn.execute("SELECT kind FROM devices WHERE id=?", (gateway_id,)).fetchone()
        if row is None:
            raise NotFoundError("no gateway %s" % gateway_id)
        if row[0] != "gateway":
            raise StoreError("device %s is not a gateway" % gateway_id)

    def _device_from_row(self, row: Sequence[Any]) -> Device:
        (device_id, name, auth, public_key_pem, sealed, enabled, created_ms, last_seen_ms, kind,
         gateway_id) = row
        secret = None if sealed is None else self._open("secrets", sealed,
                                                        "devices", device_id, "secret")
        return Device(device_id, name, auth,
                      None if public_key_pem is None else bytes(public_key_pem), secret,
                      bool(enabled), created_ms, last_seen_ms, kind, gateway_id)

    _DEVICE_COLUMNS = ("id, name, auth, public_key_pem, secret, enabled, created_ms, last_seen_ms,"
                       " kind, gateway_id")

    def get_device(self, device_id: str) -> Optional[Device]:
        """The device, or None."""
        rows = self._read("SELECT %s FROM devices WHERE id=?" % self._DEVICE_COLUMNS, (device_id,))
        return self._device_from_row(rows[0]) if rows else None

    def get_device_by_name(self, name: str) -> Optional[Device]:
        """The device with this name, or None (names are unique)."""
        rows = self._read("SELECT %s FROM devices WHERE name=?" % self._DEVICE_COLUMNS, (name,))
        return self._device_from_row(rows[0]) if rows else None

    def list_devices(self) -> list[Device]:
        """Every device, oldest first."""
        rows = self._read("SELECT %s FROM devices ORDER BY created_ms, rowid" % self._DEVICE_COLUMNS)
        return [self._device_from_row(row) for row in rows]

    def set_device_enabled(self, device_id: str, enabled: bool) -> None:
        """Enable or disable a device and bump ``devices_version`` so a running hub notices."""
        with self._tx() as conn:
            cursor = conn.execute("UPDATE devices SET enabled=? WHERE id=?",
                                  (1 if enabled else 0, device_id))
            if cursor.rowcount == 0:
                raise NotFoundError("no device %s" % device_id)
            self._bump_devices_version(conn)

    def remove_device(self, device_id: str) -> None:
        """Delete a device with its telemetry, commands and state; bump ``devices_version``.

        A gateway that boards are still assigned to is refused (``ConflictError``): removing it
        must not silently turn its boards into directly connected ones."""
        with self._tx() as conn:
            boards = [row[0] for row in conn.execute(
                "SELECT name FROM devices WHERE gateway_id=? ORDER BY name LIMIT 4", (device_id,))]
            if boards:
                raise ConflictError(
                    "gateway %s still relays for %s%s; assign them elsewhere first"
                    % (device_id, ", ".join(boards[:3]), ", ..." if len(boards) > 3 else ""))
            # Readings first, through readings_by_time: the cascade below then looks up
            # (device_id, msg_id) for each batch with no index of its own, in an empty range.
            conn.execute("DELETE FROM readings WHERE device_id=?", (device_id,))
            cursor = conn.execute("DELETE FROM devices WHERE id=?", (device_id,))
            if cursor.rowcount == 0:
                raise NotFoundError("no device %s" % device_id)
            self._bump_devices_version(conn)

    def set_device_gateway(self, device_id: str, gateway_id: Optional[str]) -> None:
        """Assign a board to a gateway, or (None) let it connect directly; bump
        ``devices_version`` so a running hub re-checks the sessions relayed for it."""
        with self._tx() as conn:
            row = conn.execute("SELECT kind FROM devices WHERE id=?", (device_id,)).fetchone()
            if row is None:
                raise NotFoundError("no device %s" % device_id)
            if gateway_id is not None:
                if row[0] != "device":
                    raise StoreError("%s is a gateway: it connects directly" % device_id)
                self._require_gateway(conn, gateway_id)
            conn.execute("UPDATE devices SET gateway_id=? WHERE id=?", (gateway_id, device_id))
            self._bump_devices_version(conn)

    def touch_device(self, device_id: str, last_seen_ms: int) -> None:
        """Record when the device was last seen."""
        with self._tx() as conn:
            cursor = conn.execute("UPDATE devices SET last_seen_ms=? WHERE id=?",
                                  (last_seen_ms, device_id))
            if cursor.rowcount == 0:
                raise NotFoundError("no device %s" % device_id)

    def touch_devices(self, last_seen: dict[str, int]) -> None:
        """Record many last-seen times in one transaction (see ``Store.touch_devices``)."""
        rows = []
        for device_id, when in last_seen.items():
            if not isinstance(device_id, str) or not isinstance(when, int) \
                    or isinstance(when, bool):
                raise StoreError("last_seen maps device ids to integer milliseconds")
            rows.append((when, device_id, when))
        if not rows:
            return
        with self._tx() as conn:
            # An id that matches no row updates nothing: a device removed meanwhile is skipped.
            conn.executemany("UPDATE devices SET last_seen_ms=? WHERE id=? AND"
                             " (last_seen_ms IS NULL OR last_seen_ms<?)", rows)

    # -- telemetry --------------------------------------------------------------------------
    def add_telemetry(self, batches: Sequence[TelemetryBatch]) -> list[bool]:
        """Commit every batch in one transaction (see ``Store.add_telemetry``)."""
        # Seal before taking the lock: AES-GCM work need not block other threads' queries.
        # The additional data of each value is exactly ``build_aad("readings", device_id,
        # msg_id, idx, stream, ts_ms, "value")``, assembled from bytes parts built once a batch
        # (and once a stream name): formatting it part by part was a quarter of a seal.
        prepared = []
        to_seal = []
        escaped: dict[str, bytes] = {}
        for batch in batches:
            if not isinstance(batch.msg_id, int) or isinstance(batch.msg_id, bool):
                raise StoreError("a batch's msg_id is an integer")
            head = b"readings|%s|%s|" % (_aad_part(batch.device_id), _aad_part(batch.msg_id))
            rows = []
            for idx, reading in enumerate(batch.readings):
                try:
                    stream, ts_ms, value = reading
                except (TypeError, ValueError):
                    raise StoreError("a reading is a (stream, ts_ms, value) triple") from None
                if not isinstance(stream, str) or not isinstance(ts_ms, int):
                    raise StoreError("a reading's stream is text and its ts_ms an integer")
                try:
                    encoded = cbor2.dumps(value)
                except (cbor2.CBOREncodeError, TypeError, ValueError) as exc:
                    raise StoreError("value cannot be stored: %s" % exc) from None
                part = escaped.get(stream)
                if part is None:
                    part = escaped[stream] = _aad_part(stream)
                # str(), not %d, for ts_ms: a bool passes the check above and build_aad says "True".
                to_seal.append((encoded, b"%s%d|%s|%s|value" % (head, idx, part,
                                                                str(ts_ms).encode())))
                rows.append([batch.device_id, batch.msg_id, idx, stream, ts_ms,
                             batch.received_ms, None])
            prepared.append((batch, rows))
        sealed = iter(self._keyring.seal_many("telemetry", to_seal))
        for _, rows in prepared:
            for row in rows:
                row[6] = next(sealed)
        results = []
        with self._tx() as conn:
            new_rows = []
            for batch, rows in prepared:
                try:
                    cursor = conn.execute(
                        "INSERT OR IGNORE INTO telemetry_batches(device_id, msg_id, received_ms)"
                        " VALUES (?, ?, ?)", (batch.device_id, batch.msg_id, batch.received_ms))
                except sqlite3.IntegrityError:
                    raise NotFoundError("no device %s" % batch.device_id) from None
                is_new = cursor.rowcount == 1
                results.append(is_new)
                if is_new:
                    new_rows.extend(rows)
            conn.executemany(
                "INSERT INTO readings(device_id, msg_id, idx, stream, ts_ms, received_ms, value)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)", new_rows)
        return results

    def query_telemetry(self, device_id: str, since_ms: Optional[int] = None,
                        until_ms: Optional[int] = None, stream: Optional[str] = None,
                        limit: int = 100, before_seq: Optional[int] = None) -> list[Reading]:
        """Readings newest first by (ts_ms, seq); ``since_ms``/``until_ms`` are inclusive bounds.

        ``before_seq`` is the seq of the last reading of the previous page: the page continues
        strictly after it in that order. (If no reading of this device has that seq, the
        page holds readings with a smaller seq.) ``limit`` is capped at ``MAX_QUERY_LIMIT``."""
        if not isinstance(limit, int) or limit < 1:
            raise StoreError("limit must be a positive integer")
        limit = min(limit, MAX_QUERY_LIMIT)
        where = ["device_id=?"]
        params: list[Any] = [device_id]
        if since_ms is not None:
            where.append("ts_ms>=?")
            params.append(since_ms)
        if until_ms is not None:
            where.append("ts_ms<=?")
            params.append(until_ms)
        if stream is not None:
            where.append("stream=?")
            params.append(stream)
        with self._lock:
            if before_seq is not None:
                cursor_row = self._read("SELECT ts_ms FROM readings WHERE seq=? AND device_id=?",
                                        (before_seq, device_id))
                if cursor_row:
                    where.append("(ts_ms<? OR (ts_ms=? AND seq<?))")
                    params.extend([cursor_row[0][0], cursor_row[0][0], before_seq])
                else:
                    where.append("seq<?")
                    params.append(before_seq)
            params.append(limit)
            rows = self._read(
                "SELECT seq, device_id, msg_id, idx, stream, ts_ms, received_ms, value FROM readings"
                " WHERE %s ORDER BY ts_ms DESC, seq DESC LIMIT ?" % " AND ".join(where), params)
        out = []
        for seq, dev, msg_id, idx, stream_name, ts_ms, received_ms, sealed in rows:
            value = self._open_value("telemetry", sealed, "readings", dev, msg_id, idx,
                                     stream_name, ts_ms, "value")
            out.append(Reading(dev, msg_id, stream_name, ts_ms, value, received_ms, seq))
        return out

    # -- commands ---------------------------------------------------------------------------
    _COMMAND_COLUMNS = ("id, device_id, name, args, status, created_ms, expires_ms, delivered_ms,"
                        " completed_ms, result, error")

    def _command_from_row(self, row: Sequence[Any]) -> Command:
        (command_id, device_id, name, args, status, created_ms, expires_ms, delivered_ms,
         completed_ms, result, error) = row
        return Command(
            id=command_id, device_id=device_id, name=name,
            args=self._open_value("commands", args, "commands", command_id, "args"),
            status=status, created_ms=created_ms, expires_ms=expires_ms,
            delivered_ms=delivered_ms, completed_ms=completed_ms,
            result=None if result is None else self._open_value("commands", result, "commands",
                                                                 command_id, "result"),
            error=None if error is None else self._open("commands", error, "commands",
                                                         command_id, "error").decode("utf-8"))

    def add_command(self, device_id: str, name: str, args: Any, ttl_ms: int,
                    now_ms: int) -> Command:
        """Queue a command for the device, alive for ``ttl_ms``."""
        _check_name("command", name)
        if not isinstance(ttl_ms, int) or ttl_ms <= 0:
            raise StoreError("ttl_ms must be a positive integer")
        command_id = new_id("cmd")
        sealed = self._seal_value("commands", args, "commands", command_id, "args")
        with self._tx() as conn:
            self._require(conn, "SELECT 1 FROM devices WHERE id=?", (device_id,),
                          "no device %s" % device_id)
            conn.execute(
                "INSERT INTO commands(id, device_id, name, args, status, created_ms, expires_ms)"
                " VALUES (?, ?, ?, ?, 'queued', ?, ?)",
                (command_id, device_id, name, sealed, now_ms, now_ms + ttl_ms))
        return Command(command_id, device_id, name, args, "queued", now_ms, now_ms + ttl_ms)

    def get_command(self, command_id: str) -> Optional[Command]:
        """The command, or None."""
        rows = self._read("SELECT %s FROM commands WHERE id=?" % self._COMMAND_COLUMNS,
                          (command_id,))
        return self._command_from_row(rows[0]) if rows else None

    def list_commands(self, device_id: str, limit: int = 100) -> list[Command]:
        """The device's commands, newest first."""
        if not isinstance(limit, int) or limit < 1:
            raise StoreError("limit must be a positive integer")
        rows = self._read("SELECT %s FROM commands WHERE device_id=? ORDER BY created_ms DESC,"
                          " rowid DESC LIMIT ?" % self._COMMAND_COLUMNS,
                          (device_id, min(limit, MAX_QUERY_LIMIT)))
        return [self._command_from_row(row) for row in rows]

    def pending_commands(self, device_id: str, now_ms: int) -> list[Command]:
        """Queued commands alive at ``now_ms``, oldest first; expire the rest."""
        with self._tx() as conn:
            conn.execute("UPDATE commands SET status='expired', completed_ms=? WHERE device_id=?"
                         " AND status='queued' AND expires_ms<=?", (now_ms, device_id, now_ms))
            rows = conn.execute(
                "SELECT %s FROM commands WHERE device_id=? AND status='queued'"
                " ORDER BY created_ms, rowid" % self._COMMAND_COLUMNS, (device_id,)).fetchall()
        return [self._command_from_row(row) for row in rows]

    def mark_command_delivered(self, command_id: str, now_ms: int) -> None:
        """Record delivery of a queued command (a no-op for one already past queued)."""
        with self._tx() as conn:
            self._require(conn, "SELECT 1 FROM commands WHERE id=?", (command_id,),
                          "no command %s" % command_id)
            conn.execute("UPDATE commands SET status='delivered', delivered_ms=? WHERE id=?"
                         " AND status='queued'", (now_ms, command_id))

    def set_command_result(self, command_id: str, ok: bool, result: Any,
                           error: Optional[str], now_ms: int) -> None:
        """Store the device's answer. The first answer wins: a device that retries (at-least-once
        delivery) cannot overwrite it."""
        sealed_result = self._seal_value("commands", result, "commands", command_id, "result")
        sealed_error = None if error is None else self._seal(
            "commands", str(error).encode("utf-8"), "commands", command_id, "error")
        with self._tx() as conn:
            self._require(conn, "SELECT 1 FROM commands WHERE id=?", (command_id,),
                          "no command %s" % command_id)
            conn.execute(
                "UPDATE commands SET status=?, completed_ms=?, result=?, error=?,"
                " delivered_ms=COALESCE(delivered_ms, ?) WHERE id=? AND status IN"
                " ('queued', 'delivered')",
                ("succeeded" if ok else "failed", now_ms, sealed_result, sealed_error, now_ms,
                 command_id))

    # -- device state -----------------------------------------------------------------------
    def get_state(self, device_id: str) -> DeviceState:
        """The device's desired and reported state (empty if never set)."""
        with self._lock:
            if not self._read("SELECT 1 FROM devices WHERE id=?", (device_id,)):
                raise NotFoundError("no device %s" % device_id)
            rows = self._read("SELECT desired, desired_version, desired_ms, reported, reported_ms"
                              " FROM device_state WHERE device_id=?", (device_id,))
        if not rows:
            return DeviceState(device_id)
        desired, desired_version, desired_ms, reported, reported_ms = rows[0]
        return DeviceState(
            device_id=device_id,
            desired={} if desired is None else self._open_value(
                "state", desired, "device_state", device_id, "desired"),
            desired_version=desired_version, desired_ms=desired_ms,
            reported={} if reported is None else self._open_value(
                "state", reported, "device_state", device_id, "reported"),
            reported_ms=reported_ms)

    def set_desired_state(self, device_id: str, desired: dict, now_ms: int) -> DeviceState:
        """Replace the desired state and bump its version."""
        if not isinstance(desired, dict):
            raise StoreError("desired state is a map")
        sealed = self._seal_value("state", desired, "device_state", device_id, "desired")
        with self._tx() as conn:
            self._require(conn, "SELECT 1 FROM devices WHERE id=?", (device_id,),
                          "no device %s" % device_id)
            conn.execute(
                "INSERT INTO device_state(device_id, desired, desired_version, desired_ms)"
                " VALUES (?, ?, 1, ?) ON CONFLICT(device_id) DO UPDATE SET desired=excluded.desired,"
                " desired_version=desired_version+1, desired_ms=excluded.desired_ms",
                (device_id, sealed, now_ms))
        return self.get_state(device_id)

    def set_reported_state(self, device_id: str, reported: dict, now_ms: int) -> None:
        """Replace the state the device reported."""
        if not isinstance(reported, dict):
            raise StoreError("reported state is a map")
        sealed = self._seal_value("state", reported, "device_state", device_id, "reported")
        with self._tx() as conn:
            self._require(conn, "SELECT 1 FROM devices WHERE id=?", (device_id,),
                          "no device %s" % device_id)
            conn.execute(
                "INSERT INTO device_state(device_id, reported, reported_ms) VALUES (?, ?, ?)"
                " ON CONFLICT(device_id) DO UPDATE SET reported=excluded.reported,"
                " reported_ms=excluded.reported_ms", (device_id, sealed, now_ms))

    # -- users ------------------------------------------------------------------------------
    def _user_from_row(self, row: Sequence[Any]) -> User:
        user_id, username, sealed, created_ms, valid_after = row
        password_hash = self._open("secrets", sealed, "users", user_id, "password_hash")
        return User(user_id, username, password_hash.decode("utf-8"), created_ms, valid_after)

    _USER_COLUMNS = "id, username, password_hash, created_ms, tokens_valid_after_ms"

    def add_user(self, username: str, password_hash: str, now_ms: int) -> User:
        """Create a dashboard account; ``ConflictError`` if the name is taken (case-insensitive)."""
        _check_name("user", username)
        user_id = new_id("usr")
        sealed = self._seal("secrets", password_hash.encode("utf-8"), "users", user_id,
                            "password_hash")
        with self._tx() as conn:
            if conn.execute("SELECT 1 FROM users WHERE username=?", (username,)).fetchone():
                raise ConflictError("a user named %r already exists" % username)
            conn.execute("INSERT INTO users(id, username, password_hash, created_ms) VALUES"
                         " (?, ?, ?, ?)", (user_id, username, sealed, now_ms))
        return User(user_id, username, password_hash, now_ms)

    def get_user(self, user_id: str) -> Optional[User]:
        """The user, or None."""
        rows = self._read("SELECT %s FROM users WHERE id=?" % self._USER_COLUMNS, (user_id,))
        return self._user_from_row(rows[0]) if rows else None

    def get_user_by_name(self, username: str) -> Optional[User]:
        """The user with this name (compared case-insensitively), or None."""
        rows = self._read("SELECT %s FROM users WHERE username=?" % self._USER_COLUMNS,
                          (username,))
        return self._user_from_row(rows[0]) if rows else None

    def list_users(self) -> list[User]:
        """Every user, oldest first."""
        rows = self._read("SELECT %s FROM users ORDER BY created_ms, rowid" % self._USER_COLUMNS)
        return [self._user_from_row(row) for row in rows]

    def set_user_password(self, user_id: str, password_hash: str) -> None:
        """Replace the user's password hash."""
        sealed = self._seal("secrets", password_hash.encode("utf-8"), "users", user_id,
                            "password_hash")
        with self._tx() as conn:
            if conn.execute("UPDATE users SET password_hash=? WHERE id=?",
                            (sealed, user_id)).rowcount == 0:
                raise NotFoundError("no user %s" % user_id)

    def set_tokens_valid_after(self, user_id: str, now_ms: int) -> None:
        """Kill every token of the user issued before ``now_ms``."""
        with self._tx() as conn:
            if conn.execute("UPDATE users SET tokens_valid_after_ms=? WHERE id=?",
                            (now_ms, user_id)).rowcount == 0:
                raise NotFoundError("no user %s" % user_id)

    # -- API tokens -------------------------------------------------------------------------
    _TOKEN_COLUMNS = ("id, user_id, name, token_hash, hint, scopes, devices, created_ms,"
                      " expires_ms, last_used_ms, revoked_ms")

    @staticmethod
    def _token_from_row(row: Sequence[Any]) -> TokenRecord:
        (token_id, user_id, name, token_hash, hint, scopes, devices, created_ms, expires_ms,
         last_used_ms, revoked_ms) = row
        return TokenRecord(token_id, user_id, name, token_hash, hint, json.loads(scopes),
                           None if devices is None else json.loads(devices), created_ms,
                           expires_ms, last_used_ms, revoked_ms)

    def add_token(self, record: TokenRecord) -> None:
        """Store a token's record; ``ConflictError`` on a repeated id or hash."""
        with self._tx() as conn:
            self._require(conn, "SELECT 1 FROM users WHERE id=?", (record.user_id,),
                          "no user %s" % record.user_id)
            if conn.execute("SELECT 1 FROM tokens WHERE id=? OR token_hash=?",
                            (record.id, record.token_hash)).fetchone():
                raise ConflictError("token %s already exists" % record.id)
            conn.execute(
                "INSERT INTO tokens(%s) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                % self._TOKEN_COLUMNS,
                (record.id, record.user_id, record.name, record.token_hash, record.hint,
                 json.dumps(list(record.scopes)),
                 None if record.devices is None else json.dumps(list(record.devices)),
                 record.created_ms, record.expires_ms, record.last_used_ms, record.revoked_ms))

    def get_token(self, token_id: str) -> Optional[TokenRecord]:
        """The token's record, or None."""
        rows = self._read("SELECT %s FROM tokens WHERE id=?" % self._TOKEN_COLUMNS, (token_id,))
        return self._token_from_row(rows[0]) if rows else None

    def list_tokens(self, user_id: Optional[str] = None) -> list[TokenRecord]:
        """Every token (of one user if given), newest first."""
        if user_id is None:
            rows = self._read("SELECT %s FROM tokens ORDER BY created_ms DESC, rowid DESC"
                              % self._TOKEN_COLUMNS)
        else:
            rows = self._read("SELECT %s FROM tokens WHERE user_id=? ORDER BY created_ms DESC,"
                              " rowid DESC" % self._TOKEN_COLUMNS, (user_id,))
        return [self._token_from_row(row) for row in rows]

    def revoke_token(self, token_id: str, now_ms: int) -> None:
        """Revoke a token (revoking twice keeps the first time)."""
        with self._tx() as conn:
            self._require(conn, "SELECT 1 FROM tokens WHERE id=?", (token_id,),
                          "no token %s" % token_id)
            conn.execute("UPDATE tokens SET revoked_ms=? WHERE id=? AND revoked_ms IS NULL",
                         (now_ms, token_id))

    def revoke_all_tokens(self, user_id: str, now_ms: int) -> int:
        """Revoke the user's tokens that are neither revoked nor expired; return how many."""
        with self._tx() as conn:
            self._require(conn, "SELECT 1 FROM users WHERE id=?", (user_id,),
                          "no user %s" % user_id)
            return conn.execute("UPDATE tokens SET revoked_ms=? WHERE user_id=? AND revoked_ms"
                                " IS NULL AND expires_ms>?", (now_ms, user_id, now_ms)).rowcount

    def touch_token(self, token_id: str, now_ms: int) -> None:
        """Record the token's last use."""
        with self._tx() as conn:
            if conn.execute("UPDATE tokens SET last_used_ms=? WHERE id=?",
                            (now_ms, token_id)).rowcount == 0:
                raise NotFoundError("no token %s" % token_id)

    # -- audit ------------------------------------------------------------------------------
    def add_audit(self, action: str, actor: str, source: str, detail: dict,
                  now_ms: int) -> None:
        """Append one audit line (``detail`` is stored as clear JSON: no secrets in it)."""
        try:
            encoded = json.dumps(detail, sort_keys=True)
        except (TypeError, ValueError) as exc:
            raise StoreError("audit detail is not JSON: %s" % exc) from None
        with self._tx() as conn:
            conn.execute("INSERT INTO audit(ts_ms, action, actor, source, detail) VALUES"
                         " (?, ?, ?, ?, ?)", (now_ms, action, actor, source, encoded))

    def list_audit(self, limit: int = 100, before_id: Optional[int] = None) -> list[AuditEntry]:
        """Audit lines newest first; ``before_id`` continues a page."""
        if not isinstance(limit, int) or limit < 1:
            raise StoreError("limit must be a positive integer")
        limit = min(limit, MAX_QUERY_LIMIT)
        if before_id is None:
            rows = self._read("SELECT id, ts_ms, action, actor, source, detail FROM audit"
                              " ORDER BY id DESC LIMIT ?", (limit,))
        else:
            rows = self._read("SELECT id, ts_ms, action, actor, source, detail FROM audit"
                              " WHERE id<? ORDER BY id DESC LIMIT ?", (before_id, limit))
        return [AuditEntry(r[0], r[1], r[2], r[3], r[4], json.loads(r[5])) for r in rows]

    # -- keys -------------------------------------------------------------------------------
    def rotate_master_key(self, new_master_key: bytes) -> None:
        """Rewrap every data key under ``new_master_key`` in one transaction, then use it.

        The caller must have made the new key durable on disk before calling: once this commits,
        only the new key opens the database (see state.rotate_master_key for the file order)."""
        with self._tx() as conn:
            rows = [WrappedKey(r[0], r[1], bytes(r[2])) for r in
                    conn.execute("SELECT id, purpose, wrapped FROM data_keys ORDER BY id")]
            rewrapped = [self._keyring.rewrap(row, new_master_key) for row in rows]
            conn.executemany("UPDATE data_keys SET wrapped=? WHERE id=?",
                             [(row.wrapped, row.key_id) for row in rewrapped])
        self._keyring.replace_master(new_master_key)

    def data_key_count(self) -> int:
        """How many data keys the database holds."""
        return self._read("SELECT count(*) FROM data_keys")[0][0]
