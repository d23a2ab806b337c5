"""``SQLiteStore``: the embedded implementation of ``Store`` (smartx_hub/store.py).

Rules:
- One connection, guarded by one lock (``check_same_thread=False``): every method is safe from
  any thread. Several processes (``serve`` and the CLI) share the file through WAL mode.
- Durability: ``synchronous=FULL``. In WAL mode ``NORMAL`` does not fsync the log at commit, so a
  power cut may undo a commit the hub already acknowledged to a device; FULL fsyncs the WAL on every
  commit. The price is one fsync per transaction, which is why ``add_telemetry`` takes many
  batches (from many sessions) and commits them together.
- Sealed columns (AES-256-GCM, smartx_hub/crypto.py), each bound by its additional data to
  ``table|record id|...|column``: device secrets, user password hashes, telemetry batches (CBOR
  first), command args/results/errors, desired and reported state. Clear columns are what queries
  need: ids, names, stream names, timestamps, statuses, public keys, token hashes and scopes.
- Telemetry (schema version 4, ``_SCHEMA_V4``): one ``telemetry`` row per acknowledged batch,
  its readings as ONE sealed blob: the CBOR array ``[stream, ts_ms, value, stream, ts_ms,
  value, ...]`` of the batch's readings in order (flat: cbor2 encodes three items faster than
  one nested array of them). One AES-GCM seal and one row per batch, not per reading: per
  reading, that was the writer thread's cost at 16 readings a message. The blob's additional
  data binds ``telemetry|device id|msg id|received_ms|reading count|first ts|last ts|readings``,
  so a blob moved to another batch or device, or an edited count or time range of its row,
  fails to open. Each reading's stream name and timestamp are inside the blob.
- In the clear only what queries need, less than version 3 showed (every reading's stream and
  time): per batch its reading count and first and last timestamp, per batch and stream name
  in it that stream's first and last timestamp (``telemetry_ranges``), per device its widest
  batch (``telemetry_spans``). These are an index, not the record: editing them can hide
  readings from a query (as deleting rows can), not change one.
- ``Reading.seq`` is ``batch id * SEQ_PER_BATCH + index in batch``. A batch id is the largest id
  plus one, given under the write lock, so a later batch's readings sort after an earlier one's.
  (An id comes free again only when the newest batches are deleted with their device; a cursor
  is looked up with its device, so it cannot land on another device's reading.)
  ``SEQ_PER_BATCH`` (1024) is four times the wire's ``MAX_READINGS``; ``add_telemetry`` refuses
  a longer batch.
- A query walks the device's batches newest first by (last ts, id), through
  ``telemetry_by_time``, or with a stream by that stream's (last ts, id) through the key of
  ``telemetry_ranges``; it opens each batch and keeps the best ``limit`` readings in a heap. It
  stops at the first batch whose last ts and largest possible seq cannot beat the worst reading
  kept: the newest page opens about ``limit / readings a batch`` batches, whatever the history.
  Batches overlap in time (readings reach the hub out of order), so the walk under an upper
  bound (``until_ms`` or a cursor) starts at the bound plus the device's widest batch: a batch
  ending later cannot hold a reading at or before the bound.
- ``meta["devices_version"]`` counts changes to the device registry (add, enable, disable,
  remove). A running hub polls it to notice changes made by the CLI in another process.
- Schema version in ``meta["schema_version"]``; ``_MIGRATIONS[n]`` takes version n-1 to n.
  Version 2 adds ``devices.kind`` ("device" | "gateway") and ``devices.gateway_id`` (the gateway
  a board is assigned to; a foreign key with no delete action, so a gateway with boards cannot
  be deleted). Assigning a board bumps ``devices_version`` too: a running hub re-checks the
  sessions a gateway relays. Version 3 drops ``readings_by_batch``, the one index of ``readings``
  no query used (see ``_SCHEMA_V3``). Version 4 replaces ``readings`` and ``telemetry_batches``
  by the batch tables above, re-sealing every stored batch (``_migrate_to_v4``).
- ``remove_device`` deletes the device's ``telemetry_ranges`` rows itself (that table has no
  foreign key: a key check per row on every insert would buy nothing the method does not do);
  ``telemetry`` and ``telemetry_spans`` follow by ON DELETE CASCADE, each through an index
  that starts with the device id. Every telemetry statement searches an index
  (tests/test_store.py checks the plans).
"""

from __future__ import annotations

import base64
import heapq
import json
import os
import secrets
import sqlite3
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

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

SCHEMA_VERSION = 4
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

#: Version 4: one row per Telemetry batch, its readings sealed as one blob (module rules).
#: ``telemetry``: the batches, with the first and last ts of each; UNIQUE (device_id, msg_id)
#: makes a repeated batch a no-op and serves the cascade from ``devices``. ``readings`` and the
#: times are NULL for a batch of no readings (the store API allows one; the wire does not).
#: ``telemetry_by_time`` orders a device's batches by (last ts, id): the walk of a query with no
#: stream, one walk whatever the number of stream names a device uses (each name its own walk
#: would let a device make its own queries, under the store's lock, as slow as it likes).
#: ``telemetry_ranges``: per batch and stream name in it, that stream's first and last ts; its
#: key is the walk of a query for one stream, so a rare stream's batches are found without
#: opening the others. It has no foreign key: a key check per row on every insert would buy
#: nothing ``remove_device`` does not do.
#: ``telemetry_spans``: each device's widest batch (last ts - first ts, only ever raised): how far
#: past an upper bound a batch can end and still hold readings at or before it.
_SCHEMA_V4 = """
CREATE TABLE telemetry (
    id INTEGER PRIMARY KEY,
    device_id TEXT NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
    msg_id INTEGER NOT NULL,
    received_ms INTEGER NOT NULL,
    reading_count INTEGER NOT NULL,
    first_ts_ms INTEGER,
    last_ts_ms INTEGER,
    readings BLOB,
    UNIQUE (device_id, msg_id)
);
CREATE INDEX telemetry_by_time ON telemetry(device_id, last_ts_ms, id, first_ts_ms);
CREATE TABLE telemetry_ranges (
    device_id TEXT NOT NULL,
    stream TEXT NOT NULL,
    last_ts_ms INTEGER NOT NULL,
    batch_id INTEGER NOT NULL,
    first_ts_ms INTEGER NOT NULL,
    PRIMARY KEY (device_id, stream, last_ts_ms, batch_id)
) WITHOUT ROWID;
CREATE TABLE telemetry_spans (
    device_id TEXT PRIMARY KEY REFERENCES devices(id) ON DELETE CASCADE,
    max_span_ms INTEGER NOT NULL
) WITHOUT ROWID;
"""

#: Seqs of one batch: ``Reading.seq = batch id * SEQ_PER_BATCH + index`` (module rules).
SEQ_PER_BATCH = 1024
#: The longest batch the store takes: every index must fit below ``SEQ_PER_BATCH``.
MAX_BATCH_READINGS = SEQ_PER_BATCH
_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1
#: Batches converted per round of the version 4 migration: bounds its memory on a big file.
_MIGRATION_CHUNK = 512
_INT_ONLY = {int}
_STR_ONLY = {str}
_BAD_READING = "a reading's stream is text and its ts_ms an integer"


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


def _telemetry_aad(device_part: bytes, msg_id: int, received_ms: int, count: int, first: int,
                   last: int) -> bytes:
    """``build_aad("telemetry", device_id, msg_id, received_ms, count, first, last, "readings")``
    from the device id already escaped (``_aad_part``): the other parts are ints, whose ``%d``
    is their ``str``."""
    return b"telemetry|%s|%d|%d|%d|%d|%d|readings" % (device_part, msg_id, received_ms, count,
                                                       first, last)


def _stream_ranges(streams: Sequence[str], stamps: Sequence[int]) -> list[tuple[str, int, int]]:
    """``(stream, first ts, last ts)`` of each stream of a batch, in order of first appearance."""
    ranges: dict[str, list[int]] = {}
    for stream, ts_ms in zip(streams, stamps):
        span = ranges.get(stream)
        if span is None:
            ranges[stream] = [ts_ms, ts_ms]
        elif ts_ms < span[0]:
            span[0] = ts_ms
        elif ts_ms > span[1]:
            span[1] = ts_ms
    return [(stream, span[0], span[1]) for stream, span in ranges.items()]


def _cbor_array_head(length: int) -> bytes:
    """The CBOR head of an array of ``length`` items (RFC 8949, major type 4)."""
    if length < 24:
        return bytes([0x80 + length])
    if length < 0x100:
        return bytes([0x98, length])
    if length < 0x10000:
        return b"\x99" + length.to_bytes(2, "big")
    return b"\x9a" + length.to_bytes(4, "big")


def _migrate_to_v4(conn: sqlite3.Connection, keyring: Keyring) -> None:
    """Re-store every version 3 batch as one ``telemetry`` row with one sealed blob, then drop
    ``readings`` and ``telemetry_batches``; all inside ``_migrate``'s one transaction, so an
    interruption (or a value that fails to open) leaves the version 3 file as it was.

    A batch's id is the smallest seq version 3 gave its readings: ids stay unique, and the new
    seqs order the readings exactly as the old ones did (a batch's readings had consecutive
    seqs). Each value's CBOR is copied byte for byte into the new array."""
    _run_script(conn, _SCHEMA_V4)
    # ``_load_data_keys`` runs after ``_migrate``; opening the old values and sealing the new
    # blobs needs the keys now. (A new file has none yet, and no telemetry to convert.)
    keyring.load([WrappedKey(r[0], r[1], bytes(r[2])) for r in
                  conn.execute("SELECT id, purpose, wrapped FROM data_keys ORDER BY id")])
    # Batches with no readings have no seq to take an id from: they get ids past every seq.
    top_id = conn.execute("SELECT max(seq) FROM readings").fetchone()[0] or 0
    # Version 3 dropped its (device_id, msg_id) index; without one this join is quadratic.
    # It goes with the table at the end.
    conn.execute("CREATE INDEX readings_v4_migration ON readings(device_id, msg_id, idx)")
    rows = conn.execute(
        "SELECT b.device_id, b.msg_id, b.received_ms, r.seq, r.idx, r.stream, r.ts_ms, r.value"
        " FROM telemetry_batches b LEFT JOIN readings r ON r.device_id=b.device_id AND"
        " r.msg_id=b.msg_id ORDER BY b.device_id, b.msg_id, r.idx")
    spans: dict[str, int] = {}
    pending: list[tuple] = []

    def flush() -> None:
        nonlocal top_id
        to_seal = []
        batch_rows = []
        range_rows = []
        for device_id, msg_id, received_ms, items in pending:
            if not items:
                top_id += 1
                batch_rows.append((top_id, device_id, msg_id, received_ms, 0, None, None, None))
                continue
            if len(items) > MAX_BATCH_READINGS:
                raise StoreError("batch %s/%d has %d readings, more than %d"
                                 % (device_id, msg_id, len(items), MAX_BATCH_READINGS))
            batch_id = min(item[0] for item in items)
            stamps = [item[2] for item in items]
            first, last = min(stamps), max(stamps)
            # The flat array add_telemetry writes, each value's old CBOR bytes as they were.
            plaintext = _cbor_array_head(3 * len(items)) + b"".join(
                cbor2.dumps(stream) + cbor2.dumps(ts_ms) + value
                for _, stream, ts_ms, value in items)
            to_seal.append((plaintext, _telemetry_aad(_aad_part(device_id), msg_id, received_ms,
                                                      len(items), first, last)))
            batch_rows.append([batch_id, device_id, msg_id, received_ms, len(items), first, last,
                               None])
            for stream, stream_first, stream_last in _stream_ranges([item[1] for item in items],
                                                                    stamps):
                range_rows.append((device_id, stream, stream_last, batch_id, stream_first))
            spans[device_id] = max(spans.get(device_id, 0), min(last - first, _INT64_MAX))
        sealed = iter(keyring.seal_many("telemetry", to_seal))
        for batch_row in batch_rows:
            if batch_row[4]:
                batch_row[7] = next(sealed)
        conn.executemany("INSERT INTO telemetry(id, device_id, msg_id, received_ms, reading_count,"
                         " first_ts_ms, last_ts_ms, readings) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                         batch_rows)
        conn.executemany("INSERT INTO telemetry_ranges(device_id, stream, last_ts_ms, batch_id,"
                         " first_ts_ms) VALUES (?, ?, ?, ?, ?)", range_rows)
        pending.clear()

    current: Optional[tuple] = None
    for device_id, msg_id, received_ms, seq, idx, stream, ts_ms, value in rows:
        if current is None or current[0] != device_id or current[1] != msg_id:
            if len(pending) >= _MIGRATION_CHUNK:
                flush()
            current = (device_id, msg_id, received_ms, [])
            pending.append(current)
        if seq is not None:
            # The version 3 binding: a value that does not open stops the migration (rolled
            # back) rather than be dropped or carried over unchecked.
            plaintext = keyring.open("telemetry", bytes(value), build_aad(
                "readings", device_id, msg_id, idx, stream, ts_ms, "value"))
            current[3].append((seq, stream, ts_ms, plaintext))
    flush()
    conn.executemany("INSERT INTO telemetry_spans(device_id, max_span_ms) VALUES (?, ?)",
                     list(spans.items()))
    # Child first: dropping a table another one references would delete its rows one by one.
    conn.execute("DROP TABLE readings")
    conn.execute("DROP TABLE telemetry_batches")


#: ``_MIGRATIONS[n]`` upgrades a database at version n-1 to version n, inside the open transaction.
#: Version 1 is the initial schema. Add a function for each later version; never edit a shipped one.
_MIGRATIONS: dict[int, Callable[[sqlite3.Connection, Keyring], None]] = {
    1: lambda conn, keyring: _run_script(conn, _SCHEMA_V1),
    2: lambda conn, keyring: _run_script(conn, _SCHEMA_V2),
    3: lambda conn, keyring: _run_script(conn, _SCHEMA_V3),
    4: _migrate_to_v4,
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
        # device id -> the widest batch span this store has committed to telemetry_spans:
        # add_telemetry skips the upsert when a batch does not widen it.
        self._spans: dict[str, int] = {}
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
                _MIGRATIONS[version](conn, self._keyring)
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
            # telemetry_ranges has no foreign key (_SCHEMA_V4); telemetry and telemetry_spans
            # go by the cascade.
            conn.execute("DELETE FROM telemetry_ranges WHERE device_id=?", (device_id,))
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
        """Commit every batch in one transaction (see ``Store.add_telemetry``).

        Each batch becomes one ``telemetry`` row holding its readings as one sealed blob, and
        one ``telemetry_ranges`` row per stream name in it (module rules)."""
        if not batches:
            return []
        # Check, encode and seal before taking the lock: that work need not block other threads.
        prepared = []
        to_seal = []
        escaped: dict[str, bytes] = {}
        for batch in batches:
            device_id, msg_id, received_ms = batch.device_id, batch.msg_id, batch.received_ms
            # type(), not isinstance: a bool is no msg id or time, and it is the faster test.
            if type(msg_id) is not int or type(received_ms) is not int \
                    or type(device_id) is not str:
                raise StoreError("a batch has a text device_id, an integer msg_id and an integer"
                                 " received_ms")
            # The blob's CBOR array is flat, [stream, ts_ms, value, stream, ...]: cbor2 pays
            # more for a nested array than for its three items. Building the list here also
            # means the blob holds exactly what was checked, whatever the caller's reading
            # objects are (a dict of three keys would unpack, and encode as a map).
            flat: list = []
            extend = flat.extend
            try:
                for stream, ts_ms, value in batch.readings:
                    extend((stream, ts_ms, value))
            except (TypeError, ValueError):
                raise StoreError("a reading is a (stream, ts_ms, value) triple") from None
            count = len(flat) // 3
            if count == 1:  # the common case, without the general one's passes
                stream, first = flat[0], flat[1]
                if type(first) is not int or type(stream) is not str:
                    raise StoreError(_BAD_READING)
                ranges: Sequence[tuple] = ((stream, first, first),)
                last = first
            elif count:
                if count > MAX_BATCH_READINGS:
                    raise StoreError("a batch holds at most %d readings" % MAX_BATCH_READINGS)
                streams, stamps = flat[0::3], flat[1::3]
                if set(map(type, stamps)) != _INT_ONLY:
                    raise StoreError(_BAD_READING)
                try:
                    names = set(streams)
                except TypeError:  # an unhashable stream (a list, say) is no stream name
                    raise StoreError(_BAD_READING) from None
                if set(map(type, names)) != _STR_ONLY:
                    raise StoreError(_BAD_READING)
                first, last = min(stamps), max(stamps)
                ranges = ((streams[0], first, last),) if len(names) == 1 \
                    else _stream_ranges(streams, stamps)
            else:
                prepared.append((device_id, msg_id, received_ms, 0, None, None, ()))
                continue
            # Checked here so that SQLite cannot refuse a range half-way through the transaction.
            if first < _INT64_MIN or last > _INT64_MAX:
                raise StoreError("a reading's ts_ms is outside the 64-bit range")
            try:
                plaintext = cbor2.dumps(flat)
            except (cbor2.CBOREncodeError, TypeError, ValueError) as exc:
                raise StoreError("value cannot be stored: %s" % exc) from None
            part = escaped.get(device_id)
            if part is None:
                part = escaped[device_id] = _aad_part(device_id)
            # = _telemetry_aad(...), inlined: this loop runs once per batch on the writer thread.
            to_seal.append((plaintext, b"telemetry|%s|%d|%d|%d|%d|%d|readings" % (
                part, msg_id, received_ms, count, first, last)))
            prepared.append((device_id, msg_id, received_ms, count, first, last, ranges))
        sealed = iter(self._keyring.seal_many("telemetry", to_seal))
        known = self._spans
        with self._tx() as conn:
            # Ids are given here, not by SQLite, so the rows go in with one executemany per
            # table instead of a statement (and a lastrowid) per batch. The write lock is held,
            # so the ids past the largest are ours.
            base = (conn.execute("SELECT max(id) FROM telemetry").fetchone()[0] or 0) + 1
            batch_rows = []
            range_rows = []
            for batch_id, (device_id, msg_id, received_ms, count, first, last, ranges) \
                    in enumerate(prepared, base):
                batch_rows.append((batch_id, device_id, msg_id, received_ms, count, first, last,
                                   next(sealed) if count else None))
                for stream, stream_first, stream_last in ranges:
                    range_rows.append((device_id, stream, stream_last, batch_id, stream_first))
            try:
                inserted = conn.executemany(
                    "INSERT OR IGNORE INTO telemetry(id, device_id, msg_id, received_ms,"
                    " reading_count, first_ts_ms, last_ts_ms, readings)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)", batch_rows).rowcount
            except sqlite3.IntegrityError:  # the device foreign key: OR IGNORE does not cover it
                missing = [d for d in sorted({r[1] for r in batch_rows}) if not conn.execute(
                    "SELECT 1 FROM devices WHERE id=?", (d,)).fetchone()]
                raise NotFoundError("no device %s" % ", ".join(missing)) from None
            if inserted == len(batch_rows):
                results = [True] * len(batch_rows)
            else:
                # Some were repeats (ids OR IGNORE skipped): find which ids went in.
                kept = {r[0] for r in conn.execute(
                    "SELECT id FROM telemetry WHERE id BETWEEN ? AND ?",
                    (base, base + len(batch_rows) - 1))}
                results = [r[0] in kept for r in batch_rows]
                batch_rows = [r for r in batch_rows if r[0] in kept]
                range_rows = [r for r in range_rows if r[3] in kept]
            conn.executemany("INSERT INTO telemetry_ranges(device_id, stream, last_ts_ms,"
                             " batch_id, first_ts_ms) VALUES (?, ?, ?, ?, ?)", range_rows)
            raised: dict[str, int] = {}
            for _, device_id, _, _, count, first, last, _ in batch_rows:
                if count and last - first > known.get(device_id, -1):
                    # Clamped to what SQLite stores: the span only ever widens a search.
                    raised[device_id] = max(raised.get(device_id, 0), min(last - first,
                                                                          _INT64_MAX))
            if raised:
                # Only ever raised: another process may have raised it further meanwhile.
                conn.executemany(
                    "INSERT INTO telemetry_spans(device_id, max_span_ms) VALUES (?, ?)"
                    " ON CONFLICT(device_id) DO UPDATE SET max_span_ms=excluded.max_span_ms"
                    " WHERE excluded.max_span_ms > max_span_ms", list(raised.items()))
        # After the commit: a rolled-back raise must not let a later call skip its own.
        known.update(raised)
        return results

    def _open_batch(self, device_id: str, row: Sequence[Any]) -> list:
        """The flat readings ``[stream, ts_ms, value, ...]`` of a ``telemetry`` row
        ``(id, msg_id, received_ms, count, first ts, last ts, blob, ...)`` of ``device_id``.

        The device id comes from the caller, not the row: a blob reached through another
        device's range rows fails to open instead of showing as this device's."""
        _, msg_id, received_ms, count, first, last, blob = row[:7]
        plaintext = self._keyring.open("telemetry", bytes(blob), _telemetry_aad(
            _aad_part(device_id), msg_id, received_ms, count, first, last))
        try:
            flat = cbor2.loads(plaintext)
        except (cbor2.CBORDecodeError, ValueError) as exc:  # authenticated, so only our bug
            raise SealError("sealed batch is not CBOR: %s" % exc) from None
        if not isinstance(flat, list) or len(flat) != 3 * count:
            raise SealError("sealed batch does not hold its %d readings" % count)
        return flat

    def query_telemetry(self, device_id: str, since_ms: Optional[int] = None,
                        until_ms: Optional[int] = None, stream: Optional[str] = None,
                        limit: int = 100, before_seq: Optional[int] = None) -> list[Reading]:
        """Readings newest first by (ts_ms, seq); ``since_ms``/``until_ms`` are inclusive bounds.

        ``before_seq`` is the seq of the last reading of the previous page: the page continues
        strictly after it in that order. (If no reading of this device has that seq, the
        page holds readings with a smaller seq.) ``limit`` is capped at ``MAX_QUERY_LIMIT``."""
        if not isinstance(limit, int) or limit < 1:
            raise StoreError("limit must be a positive integer")
        for name, bound in (("since_ms", since_ms), ("until_ms", until_ms),
                            ("before_seq", before_seq)):
            if bound is not None and type(bound) is not int:
                raise StoreError("%s must be an integer" % name)
        if stream is not None and type(stream) is not str:
            raise StoreError("stream must be text")
        limit = min(limit, MAX_QUERY_LIMIT)
        # Stored timestamps are 64-bit: clamping a bound changes no answer, and SQLite takes it.
        low = _INT64_MIN if since_ms is None else max(since_ms, _INT64_MIN)
        high = _INT64_MAX if until_ms is None else min(until_ms, _INT64_MAX)
        if low > high:
            return []
        # Batches are opened under the lock, in one read transaction: the walk decides from
        # what it opened whether to read on, and its statements must all see one state of the
        # file. (A page of 100 opens about seven batches of 16: tens of microseconds.)
        with self._lock:
            try:
                self._conn.execute("BEGIN")
                try:
                    best = self._newest(device_id, low, high, stream, limit, before_seq)
                finally:
                    self._conn.execute("COMMIT")  # read only: this ends the snapshot
            except (sqlite3.Error, OverflowError) as exc:
                raise StoreError("database error: %s" % exc) from None
        # (ts_ms, seq) pairs are unique: sorting never compares the values.
        best.sort(reverse=True)
        return [Reading(device_id, msg_id, name, ts_ms, value, received_ms, seq)
                for ts_ms, seq, name, value, msg_id, received_ms in best]

    _BATCH_COLUMNS = "id, msg_id, received_ms, reading_count, first_ts_ms, last_ts_ms, readings"

    def _newest(self, device_id: str, low: int, high: int, stream: Optional[str], limit: int,
                before_seq: Optional[int]) -> list[tuple]:
        """``query_telemetry``'s work inside its read transaction: a min-heap of the ``limit``
        newest ``(ts_ms, seq, stream, value, msg_id, received_ms)`` that match."""
        conn = self._conn
        opened: dict[int, list] = {}
        cursor_seq = None  # the page continues after (high, cursor_seq) ...
        max_seq = None  # ... or, for a seq no reading of the device has, below it
        if before_seq is not None:
            batch_id, index = divmod(before_seq, SEQ_PER_BATCH)
            row = conn.execute("SELECT %s FROM telemetry WHERE id=? AND device_id=?"
                               % self._BATCH_COLUMNS, (batch_id, device_id)
                               ).fetchone() if _INT64_MIN <= batch_id <= _INT64_MAX else None
            if row is not None and index < row[3]:
                opened[batch_id] = self._open_batch(device_id, row)
                ts_ms = opened[batch_id][3 * index + 1]
                if ts_ms < low:
                    return []
                if ts_ms <= high:
                    high, cursor_seq = ts_ms, before_seq
            else:
                max_seq = before_seq
        # One list of terms for either walk: the stream walk names its table ``r``.
        terms = ["device_id=?", "last_ts_ms>=?"]
        params: list[Any] = [device_id, low]
        if stream is not None:
            terms.insert(1, "stream=?")
            params.insert(1, stream)
        if high < _INT64_MAX:
            # A batch ending after ``high`` holds readings at or before it only if it starts by
            # then, and it ends at most the device's widest batch after it.
            span = conn.execute("SELECT max_span_ms FROM telemetry_spans WHERE device_id=?",
                                (device_id,)).fetchone()
            terms += ["last_ts_ms<=?", "first_ts_ms<=?"]
            params += [min(high + (span[0] if span else 0), _INT64_MAX), high]
        if max_seq is not None:
            terms.append("%s<=?" % ("id" if stream is None else "batch_id"))
            params.append(min(max((max_seq - 1) // SEQ_PER_BATCH, -1), _INT64_MAX))
        if stream is None:
            sql = ("SELECT %s, last_ts_ms FROM telemetry WHERE %s"
                   " ORDER BY last_ts_ms DESC, id DESC"
                   % (self._BATCH_COLUMNS, " AND ".join(terms)))
        else:
            # CROSS JOIN: the stream's range walk leads, each batch is then fetched by its id.
            sql = ("SELECT t.id, t.msg_id, t.received_ms, t.reading_count, t.first_ts_ms,"
                   " t.last_ts_ms, t.readings, r.last_ts_ms FROM telemetry_ranges r CROSS JOIN"
                   " telemetry t ON t.id=r.batch_id WHERE %s"
                   " ORDER BY r.last_ts_ms DESC, r.batch_id DESC"
                   % " AND ".join("r." + term for term in terms))
        best: list[tuple] = []
        walk = conn.execute(sql, params)
        try:
            self._collect(device_id, walk, opened, best, limit, stream, low, high, cursor_seq,
                          max_seq)
        finally:
            walk.close()
        return best

    def _collect(self, device_id: str, walk: Iterable[Sequence[Any]], opened: dict[int, list],
                 best: list[tuple], limit: int, stream: Optional[str], low: int, high: int,
                 cursor_seq: Optional[int], max_seq: Optional[int]) -> None:
        """Open the walk's batches into ``best`` (a min-heap of at most ``limit`` readings)
        until no later batch can hold a reading newer than the worst one kept."""
        for row in walk:
            batch_id = row[0]
            top = batch_id * SEQ_PER_BATCH
            # The walk is ordered by (last ts, id), descending: once a batch cannot beat the
            # worst reading kept, no later one can.
            if len(best) == limit and (row[7], top + SEQ_PER_BATCH - 1) < best[0][:2]:
                return
            flat = opened.get(batch_id)
            if flat is None:
                flat = self._open_batch(device_id, row)
            msg_id, received_ms = row[1], row[2]
            for index, (name, ts_ms, value) in enumerate(zip(flat[0::3], flat[1::3],
                                                             flat[2::3])):
                if ts_ms < low or ts_ms > high or (stream is not None and name != stream):
                    continue
                seq = top + index
                if (cursor_seq is not None and ts_ms == high and seq >= cursor_seq) \
                        or (max_seq is not None and seq >= max_seq):
                    continue
                if len(best) < limit:
                    heapq.heappush(best, (ts_ms, seq, name, value, msg_id, received_ms))
                elif (ts_ms, seq) > best[0][:2]:
                    heapq.heapreplace(best, (ts_ms, seq, name, value, msg_id, received_ms))

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
        # Most sessions start with nothing queued: a plain read answers them without taking the
        # write lock (with no queued row there is nothing to expire either).
        if not self._read("SELECT 1 FROM commands WHERE device_id=? AND status='queued' LIMIT 1",
                          (device_id,)):
            return []
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
