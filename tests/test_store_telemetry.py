"""Telemetry in SQLiteStore, schema version 4 (smartx_hub/sqlite_store.py): queries checked
against a brute-force model, the bounded work of a query on a long history, the input rules,
and the migration of a version 3 file (built here from version 3's own SQL and sealing rules)
including its rollback when interrupted."""

from __future__ import annotations

import itertools
import os
import sqlite3
import subprocess
import sys

import cbor2
import pytest
from hypothesis import given, strategies as st

from smartx_hub import sqlite_store
from smartx_hub.crypto import (
    PURPOSES,
    Keyring,
    SealError,
    WrappedKey,
    build_aad,
    generate_master_key,
)
from smartx_hub.sqlite_store import MAX_BATCH_READINGS, SEQ_PER_BATCH, SQLiteStore
from smartx_hub.store import StoreError, TelemetryBatch

PEM = b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_NAMES = itertools.count()


@pytest.fixture
def master():
    return generate_master_key()


@pytest.fixture
def store(tmp_path, master):
    s = SQLiteStore(str(tmp_path / "hub.db"), Keyring(master))
    yield s
    s.close()


def new_device(store):
    return store.add_device("d%d" % next(_NAMES), "es256", PEM, None, 1).id


def view(readings):
    """What a test compares of readings (seq aside: the store assigns it)."""
    return [(r.stream, r.ts_ms, r.value, r.msg_id, r.received_ms) for r in readings]


def count_opens(store):
    """Wrap the store's keyring so each opened blob is counted; returns the counter list."""
    opened = []
    real = store._keyring.open

    def counting(purpose, blob, aad):
        opened.append(aad)
        return real(purpose, blob, aad)

    store._keyring.open = counting
    return opened


# -- queries against a model ---------------------------------------------------------------

STREAMS = ["a", "b", "c"]
BATCHES = st.tuples(st.integers(0, 9),  # msg ids repeat: resends must be no-ops
                    st.lists(st.tuples(st.sampled_from(STREAMS), st.integers(0, 40)),
                             max_size=6))
QUERIES = st.tuples(st.none() | st.integers(-1, 41), st.none() | st.integers(-1, 41),
                    st.sampled_from([None, "a", "b", "c", "never"]), st.integers(1, 8))


def test_queries_match_a_brute_force_model(tmp_path, master):
    """Random batches (overlapping in time, repeated msg ids, several calls) on one device among
    two; random since/until/stream/limit. The first page is the model's newest ``limit``, and
    paging with each page's last seq walks exactly the model's list, in its order: (ts_ms,
    insertion order of the batch, index in the batch), newest first. A cursor that is no seq
    of the device continues below it."""
    s = SQLiteStore(str(tmp_path / "hub.db"), Keyring(master))

    @given(st.lists(st.lists(BATCHES, min_size=1, max_size=5), min_size=1, max_size=4),
           st.lists(QUERIES, min_size=1, max_size=4), st.data())
    def check(calls, queries, data):
        dev, other = new_device(s), new_device(s)
        model = []  # (ts_ms, batch order, index, stream, value, msg_id, received_ms)
        stored = set()
        order = itertools.count()
        for call in calls:
            batches, expected = [], []
            for msg_id, readings in call:
                number = next(order)
                values = [(stream, ts, "v%d.%d" % (number, i))
                          for i, (stream, ts) in enumerate(readings)]
                batches.append(TelemetryBatch(dev, msg_id, values, 1000 + number))
                # The other device: same msg ids and times, so a leak would show.
                batches.append(TelemetryBatch(other, msg_id, [(st_, ts, "x") for st_, ts, _
                                                              in values], 7))
                expected += [msg_id not in stored, None]
                if msg_id not in stored:
                    stored.add(msg_id)
                    model += [(ts, number, i, stream, value, msg_id, 1000 + number)
                              for i, (stream, ts, value) in enumerate(values)]
            flags = s.add_telemetry(batches)
            assert flags[0::2] == expected[0::2]
        everything = s.query_telemetry(dev, limit=10_000)
        assert len(everything) == len(model)
        seqs = {r.seq for r in everything}
        assert len(seqs) == len(model)
        for since, until, stream, limit in queries:
            want = sorted((m for m in model if (since is None or m[0] >= since)
                           and (until is None or m[0] <= until)
                           and (stream is None or m[3] == stream)), reverse=True)
            want = [(m[3], m[0], m[4], m[5], m[6]) for m in want]
            page = s.query_telemetry(dev, since, until, stream, limit)
            assert view(page) == want[:limit]
            walked, cursor = [], None
            for _ in range(len(want) + 2):
                chunk = s.query_telemetry(dev, since, until, stream, limit, before_seq=cursor)
                if not chunk:
                    break
                assert len(chunk) <= limit
                walked += chunk
                cursor = chunk[-1].seq
            assert view(walked) == want
            if seqs:
                # Drawn relative to the seqs: hypothesis draws must not depend on the database.
                near = sorted(seqs)[data.draw(st.integers(0, 10**6), label="near") % len(seqs)]
                probe = near + data.draw(st.integers(-3, 3), label="offset")
                if probe not in seqs:
                    below = [r for r in walked if r.seq < probe][:limit]
                    got = s.query_telemetry(dev, since, until, stream, limit, before_seq=probe)
                    assert view(got) == view(below) and [r.seq for r in got] == \
                        [r.seq for r in below]

    check()
    s.close()


def test_equal_times_across_batches_order_by_insertion(store):
    """Readings at one time in many batches (a board with no clock yet): newest first by seq,
    and the newest page opens the newest batches only."""
    dev = new_device(store)
    store.add_telemetry([TelemetryBatch(dev, m, [("t", 0, m * 10 + i) for i in range(4)], 1)
                         for m in range(300)])
    opened = count_opens(store)
    page = store.query_telemetry(dev, limit=6)
    assert [r.value for r in page] == [2993, 2992, 2991, 2990, 2983, 2982]
    assert len(opened) == 2
    assert page[0].seq > page[1].seq > page[4].seq
    rest = store.query_telemetry(dev, limit=3, before_seq=page[-1].seq)
    assert [r.value for r in rest] == [2981, 2980, 2973]


# -- bounded work on a long history --------------------------------------------------------


def fill_history(store, dev, batches, per_batch=16, step=10, overlap=3):
    """``batches`` batches of ``per_batch`` readings of stream "t", batch k covering
    [k*step, k*step + overlap*step] (readings reach the hub out of order, so batches overlap),
    and five batches of a rare stream among them."""
    calls, pending = [], []
    for k in range(batches):
        span = overlap * step
        readings = [("t", k * step + (i * span) // (per_batch - 1), k * 100 + i)
                    for i in reversed(range(per_batch))]
        if k % (batches // 5) == 7:
            readings = [("rare", k * step + 1, -k)]
        pending.append(TelemetryBatch(dev, k, readings, k))
        if len(pending) == 200:
            calls.append(pending)
            pending = []
    calls.append(pending)
    for call in calls:
        store.add_telemetry(call)


def brute_force(store, dev, since=None, until=None, stream=None):
    rows = store._conn.execute("SELECT id, msg_id, received_ms, reading_count, first_ts_ms,"
                               " last_ts_ms, readings FROM telemetry WHERE device_id=?",
                               (dev,)).fetchall()
    out = []
    for row in rows:
        flat = store._open_batch(dev, row)
        for i in range(row[3]):
            name, ts_ms, value = flat[3 * i:3 * i + 3]
            if (since is None or ts_ms >= since) and (until is None or ts_ms <= until) \
                    and (stream is None or name == stream):
                out.append((ts_ms, row[0] * SEQ_PER_BATCH + i, name, value))
    return sorted(out, reverse=True)


def test_queries_on_a_long_history_open_only_what_they_return(store):
    """3,000 batches of 16 readings (48,000 readings, each batch overlapping three others in
    time) among another device's: the newest page, a page deep in the history, a time window
    and a rare stream each open a handful of batches, and return what a full scan would."""
    dev, other = new_device(store), new_device(store)
    fill_history(store, dev, 3000)
    fill_history(store, other, 200)
    full = brute_force(store, dev)
    opened = count_opens(store)

    def check(expected, **query):
        del opened[:]
        got = store.query_telemetry(dev, **query)
        assert [(r.ts_ms, r.seq, r.stream, r.value) for r in got] == expected
        return len(opened)

    # 100 readings are about 7 batches; overlap makes it a few more, never the history.
    assert check(full[:100], limit=100) <= 12
    deep = full[20_000]
    below = [r for r in full if (r[0], r[1]) < deep[:2]]
    assert check(below[:100], limit=100, before_seq=deep[1]) <= 13  # + the cursor's batch
    window = [r for r in full if 10_000 <= r[0] <= 12_000]
    assert check(window[:50], since_ms=10_000, until_ms=12_000, limit=50) <= 8
    rare = [r for r in full if r[2] == "rare"]
    assert len(rare) == 5 and check(rare, stream="rare", limit=100) == 5
    assert check([], stream="never", limit=100) == 0
    assert check(brute_force(store, dev, until=-1), until_ms=-1) == 0


def test_many_stream_names_do_not_slow_a_query_without_a_stream(store):
    """A device that names a new stream in every reading (device input: any names at all)
    still gets its newest page from one walk: the statements run and batches opened do not
    grow with the number of names."""
    dev = new_device(store)
    store.add_telemetry([TelemetryBatch(dev, m, [("s%d.%d" % (m, i), m * 10 + i, i)
                                                 for i in range(4)], 1) for m in range(500)])
    opened = count_opens(store)
    statements = []
    store._conn.set_trace_callback(statements.append)
    try:
        page = store.query_telemetry(dev, limit=8)
        until = store.query_telemetry(dev, limit=8, until_ms=2500)
    finally:
        store._conn.set_trace_callback(None)
    assert [r.stream for r in page] == ["s499.3", "s499.2", "s499.1", "s499.0", "s498.3",
                                        "s498.2", "s498.1", "s498.0"]
    assert [r.ts_ms for r in until] == [2500, 2493, 2492, 2491, 2490, 2483, 2482, 2481]
    assert len(opened) <= 6 and len(statements) <= 8
    assert [r.value for r in store.query_telemetry(dev, stream="s7.2")] == [2]


def test_a_batch_spanning_the_whole_range_is_still_found(store):
    """One batch whose readings are far apart (a board flushing an old offline reading with a
    new one) widens the search under an upper bound, and its old reading is not missed."""
    dev = new_device(store)
    store.add_telemetry([TelemetryBatch(dev, 1, [("t", 5, "old"), ("t", 10**6, "new")], 1)])
    store.add_telemetry([TelemetryBatch(dev, m + 1, [("t", m * 100, m)], 1)
                         for m in range(1, 50)])
    assert [r.value for r in store.query_telemetry(dev, until_ms=150)] == [1, "old"]
    assert [r.value for r in store.query_telemetry(dev, until_ms=99)] == ["old"]
    extreme = new_device(store)
    store.add_telemetry([TelemetryBatch(extreme, 1, [("t", -2**63, "min"), ("t", 2**63 - 1,
                                                                            "max")], 1)])
    assert [r.value for r in store.query_telemetry(extreme, until_ms=0)] == ["min"]
    assert [r.value for r in store.query_telemetry(extreme, since_ms=0)] == ["max"]
    assert [r.value for r in store.query_telemetry(extreme, since_ms=-2**70,
                                                   until_ms=2**70)] == ["max", "min"]


# -- input rules ---------------------------------------------------------------------------


def test_bad_batches_are_store_errors_and_store_nothing(store):
    dev = new_device(store)
    good = TelemetryBatch(dev, 1, [("t", 1, 1)], 1)
    bad = [
        TelemetryBatch(dev, 2, [("t", True, 1)], 1),  # a bool is no timestamp
        TelemetryBatch(dev, 2, [("t", 1, 1), ("u", 1.5, 1)], 1),
        TelemetryBatch(dev, 2, [("t", 2**63, 1)], 1),  # past what SQLite stores
        TelemetryBatch(dev, 2, [("t", 1, 1), ("t", -2**63 - 1, 1)], 1),
        TelemetryBatch(dev, 2, [(["t"], 1, 1), ("t", 1, 1)], 1),  # an unhashable stream
        TelemetryBatch(dev, 2, [(None, 1, 1)], 1),
        TelemetryBatch(dev, 2, [{"s": 1, "t": 2, "v": 3}], 1),  # unpacks, but is no triple
        TelemetryBatch(dev, 2, [("t", 1, 1, 1)], 1),
        TelemetryBatch(dev, 2, 5, 1),
        TelemetryBatch(dev, 2, [("t", 1, object())], 1),  # cbor2 has no encoding for it
        TelemetryBatch(dev, 2, [("t", i, i) for i in range(MAX_BATCH_READINGS + 1)], 1),
        TelemetryBatch(dev, True, [("t", 1, 1)], 1),
        TelemetryBatch(dev, 2**63, [("t", 1, 1)], 1),  # SQLite refuses it inside the transaction
        TelemetryBatch(dev, 2, [("t", 1, 1)], 1.0),
        TelemetryBatch(5, 2, [("t", 1, 1)], 1),
    ]
    for one in bad:
        with pytest.raises(StoreError):
            store.add_telemetry([good, one])
    assert store.query_telemetry(dev) == []
    longest = [("t", i, i) for i in range(MAX_BATCH_READINGS)]
    assert store.add_telemetry([good, TelemetryBatch(dev, 2, longest, 1)]) == [True, True]
    got = store.query_telemetry(dev, limit=2000)
    assert len(got) == MAX_BATCH_READINGS + 1 and len({r.seq for r in got}) == len(got)
    for query in (dict(limit=0), dict(since_ms=1.5), dict(until_ms="9"), dict(stream=5),
                  dict(before_seq=True)):
        with pytest.raises(StoreError):
            store.query_telemetry(dev, **query)


def test_cursor_and_bounds_at_the_extremes(store):
    dev = new_device(store)
    store.add_telemetry([TelemetryBatch(dev, 1, [("t", 1, "a"), ("t", 2, "b")], 1)])
    assert [r.value for r in store.query_telemetry(dev, before_seq=10**30)] == ["b", "a"]
    assert store.query_telemetry(dev, before_seq=-10**30) == []
    assert store.query_telemetry(dev, before_seq=0) == []
    assert store.query_telemetry(dev, since_ms=3, until_ms=1) == []
    assert store.query_telemetry("dev_missing") == []
    first = store.query_telemetry(dev, limit=1)[0]
    assert [r.value for r in store.query_telemetry(dev, before_seq=first.seq, since_ms=2)] == []
    assert [r.value for r in store.query_telemetry(dev, before_seq=first.seq, until_ms=0)] == []


def test_an_empty_batch_is_recorded_once(store):
    dev = new_device(store)
    assert store.add_telemetry([TelemetryBatch(dev, 1, [], 1)]) == [True]
    assert store.add_telemetry([TelemetryBatch(dev, 1, [("t", 1, 1)], 1)]) == [False]
    assert store.query_telemetry(dev) == [] and store.add_telemetry([]) == []


def test_the_benchmark_counts_readings_of_msg_ids_with_sql(store, tmp_path):
    """The clear reading count answers "how many readings of msg ids a..b were stored"
    without opening a blob (benchmarks count acknowledged readings this way)."""
    dev = new_device(store)
    store.add_telemetry([TelemetryBatch(dev, m, [("t", m, i) for i in range(m % 5 + 1)], 1)
                         for m in range(1, 40)])
    conn = sqlite3.connect(str(tmp_path / "hub.db"))
    count = conn.execute("SELECT COALESCE(SUM(reading_count), 0) FROM telemetry WHERE"
                         " device_id=? AND msg_id BETWEEN ? AND ?", (dev, 5, 20)).fetchone()[0]
    conn.close()
    assert count == sum(m % 5 + 1 for m in range(5, 21)) == \
        len([r for r in store.query_telemetry(dev, limit=1000) if 5 <= r.msg_id <= 20])


# -- migration from version 3 ----------------------------------------------------------------

#: The complete version 3 schema, as version 3 of smartx_hub/sqlite_store.py created it (its
#: version 1 script, then versions 2 and 3), written out so that this test keeps building a
#: true version 3 file whatever the module becomes.
V3_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE data_keys (id INTEGER PRIMARY KEY, purpose TEXT NOT NULL, wrapped BLOB NOT NULL);
CREATE TABLE devices (
    id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE,
    auth TEXT NOT NULL CHECK (auth IN ('es256', 'eddsa', 'hs256')),
    public_key_pem BLOB, secret BLOB, enabled INTEGER NOT NULL, created_ms INTEGER NOT NULL,
    last_seen_ms INTEGER
);
CREATE TABLE telemetry_batches (
    device_id TEXT NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
    msg_id INTEGER NOT NULL, received_ms INTEGER NOT NULL, PRIMARY KEY (device_id, msg_id)
) WITHOUT ROWID;
CREATE TABLE readings (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, device_id TEXT NOT NULL, msg_id INTEGER NOT NULL,
    idx INTEGER NOT NULL, stream TEXT NOT NULL, ts_ms INTEGER NOT NULL,
    received_ms INTEGER NOT NULL, value BLOB NOT NULL,
    FOREIGN KEY (device_id, msg_id) REFERENCES telemetry_batches(device_id, msg_id)
        ON DELETE CASCADE
);
CREATE INDEX readings_by_time ON readings(device_id, ts_ms, seq);
CREATE INDEX readings_by_stream ON readings(device_id, stream, ts_ms, seq);
CREATE TABLE commands (
    id TEXT PRIMARY KEY, device_id TEXT NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
    name TEXT NOT NULL, args BLOB NOT NULL,
    status TEXT NOT NULL
        CHECK (status IN ('queued', 'delivered', 'succeeded', 'failed', 'expired')),
    created_ms INTEGER NOT NULL, expires_ms INTEGER NOT NULL, delivered_ms INTEGER,
    completed_ms INTEGER, result BLOB, error BLOB
);
CREATE INDEX commands_by_device ON commands(device_id, status, created_ms);
CREATE TABLE device_state (
    device_id TEXT PRIMARY KEY REFERENCES devices(id) ON DELETE CASCADE, desired BLOB,
    desired_version INTEGER NOT NULL DEFAULT 0, desired_ms INTEGER, reported BLOB,
    reported_ms INTEGER
);
CREATE TABLE users (
    id TEXT PRIMARY KEY, username TEXT NOT NULL UNIQUE COLLATE NOCASE,
    password_hash BLOB NOT NULL, created_ms INTEGER NOT NULL,
    tokens_valid_after_ms INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE tokens (
    id TEXT PRIMARY KEY, user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    name TEXT NOT NULL, token_hash TEXT NOT NULL UNIQUE, hint TEXT NOT NULL,
    scopes TEXT NOT NULL, devices TEXT, created_ms INTEGER NOT NULL, expires_ms INTEGER NOT NULL,
    last_used_ms INTEGER, revoked_ms INTEGER
);
CREATE INDEX tokens_by_user ON tokens(user_id);
CREATE TABLE audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT, ts_ms INTEGER NOT NULL, action TEXT NOT NULL,
    actor TEXT NOT NULL, source TEXT NOT NULL, detail TEXT NOT NULL
);
ALTER TABLE devices ADD COLUMN kind TEXT NOT NULL DEFAULT 'device'
    CHECK (kind IN ('device', 'gateway'));
ALTER TABLE devices ADD COLUMN gateway_id TEXT REFERENCES devices(id);
CREATE INDEX devices_by_gateway ON devices(gateway_id);
INSERT INTO meta(key, value) VALUES ('schema_version', '3');
"""

#: Value encodings a version 3 file can hold that cbor2 would not write back the same way:
#: the migration must carry each one byte for byte.
ODD_CBOR = [
    bytes.fromhex("f93e00"),  # 1.5 as a half float (cbor2 writes a double)
    bytes.fromhex("1a00000005"),  # 5 in four bytes (not the shortest form)
    bytes.fromhex("a2616201616102"),  # {"b": 1, "a": 2}: keys not in canonical order
    bytes.fromhex("c249010000000000000000"),  # 2**64 as a bignum, tag 2
    bytes.fromhex("d90fa0826178f6"),  # tag 4000 over ["x", null]
    bytes.fromhex("5f4201024103ff"),  # an indefinite-length byte string, b"\x01\x02\x03"
]


def make_v3_file(path, master, batches):
    """A version 3 hub database: data keys wrapped by ``master``, a device per id named in
    ``batches``, and each batch ``(device_id, msg_id, received_ms, [(stream, ts_ms, value
    CBOR bytes), ...])`` stored as version 3 did: a telemetry_batches row, then one readings
    row per reading (in order, so its seqs are consecutive), each value sealed with the
    binding ``readings|<device>|<msg>|<index>|<stream>|<ts_ms>|value``."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.executescript(V3_SCHEMA)
    keyring = Keyring(master)
    for key_id, purpose in enumerate(PURPOSES, 1):
        made = keyring.create(key_id, purpose)
        conn.execute("INSERT INTO data_keys VALUES (?, ?, ?)", (key_id, purpose, made.wrapped))
    for device_id in sorted({b[0] for b in batches}):
        conn.execute("INSERT INTO devices(id, name, auth, public_key_pem, secret, enabled,"
                     " created_ms) VALUES (?, ?, 'es256', ?, NULL, 1, 1)",
                     (device_id, "n-" + device_id, PEM))
    for device_id, msg_id, received_ms, readings in batches:
        conn.execute("INSERT INTO telemetry_batches VALUES (?, ?, ?)",
                     (device_id, msg_id, received_ms))
        for idx, (stream, ts_ms, value) in enumerate(readings):
            sealed = keyring.seal("telemetry", value, build_aad(
                "readings", device_id, msg_id, idx, stream, ts_ms, "value"))
            conn.execute("INSERT INTO readings(device_id, msg_id, idx, stream, ts_ms,"
                         " received_ms, value) VALUES (?, ?, ?, ?, ?, ?, ?)",
                         (device_id, msg_id, idx, stream, ts_ms, received_ms, sealed))
    conn.close()


def v3_newest_first(path, master, device_id):
    """A version 3 query, as version 3 ran and opened it: (stream, ts_ms, value CBOR, msg_id,
    received_ms) newest first by (ts_ms, seq)."""
    conn = sqlite3.connect(path)
    keyring = Keyring(master)
    keyring.load([WrappedKey(r[0], r[1], r[2]) for r in
                  conn.execute("SELECT id, purpose, wrapped FROM data_keys")])
    rows = conn.execute("SELECT stream, ts_ms, value, msg_id, received_ms, idx FROM readings"
                        " WHERE device_id=? ORDER BY ts_ms DESC, seq DESC", (device_id,))
    out = [(stream, ts_ms, keyring.open("telemetry", value, build_aad(
                "readings", device_id, msg_id, idx, stream, ts_ms, "value")), msg_id, received)
           for stream, ts_ms, value, msg_id, received, idx in rows]
    conn.close()
    return out


def file_state(path):
    """Everything of a version 3 file the migration could touch."""
    conn = sqlite3.connect(path)
    state = (sorted(conn.execute("SELECT type, name, sql FROM sqlite_master")),
             conn.execute("SELECT * FROM meta ORDER BY key").fetchall(),
             conn.execute("SELECT * FROM telemetry_batches ORDER BY device_id, msg_id").fetchall(),
             conn.execute("SELECT * FROM readings ORDER BY seq").fetchall(),
             conn.execute("SELECT * FROM sqlite_sequence").fetchall())
    conn.close()
    return state


DEV_A, DEV_B = "dev_aaaaaaaaaaaaaaaa", "dev_bbbbbbbbbbbbbbbb"


def sample_batches():
    """Version 3 telemetry with what the migration must keep: odd encodings, equal times
    across batches (order then comes from seq), a batch of no readings, two devices with the
    same msg id, several streams in a batch, stream names with the binding's separators."""
    plain = cbor2.dumps
    return [
        (DEV_A, 1, 100, [("t", 10, plain(1.25)), ("h|%", 10, plain("x")), ("t", 12, plain(None))]),
        (DEV_B, 1, 101, [("t", 10, plain(-7))]),
        (DEV_A, 2, 102, [("t", 10, odd) for odd in ODD_CBOR]),
        (DEV_A, 3, 103, []),
        (DEV_A, 4, 104, [("t", 9, plain(b"\x00raw")), ("t", 11, plain({"k": [1, 2.5]}))]),
        (DEV_A, 2**63 - 1, 105, [("w", -2**63, plain(2**64 - 1)), ("w", 2**63 - 1, plain(-1))]),
        (DEV_A, 0, 106, [("t", 10, plain("last in, lowest msg id"))]),
    ]


def test_migration_from_a_version_3_file(tmp_path, master):
    path = str(tmp_path / "hub.db")
    batches = sample_batches()
    make_v3_file(path, master, batches)
    before = {dev: v3_newest_first(path, master, dev) for dev in (DEV_A, DEV_B)}
    assert len(before[DEV_A]) == 14

    s = SQLiteStore(path, Keyring(master))
    assert s.get_meta("schema_version") == "4"
    tables = {r[0] for r in s._conn.execute("SELECT name FROM sqlite_master")}
    assert "readings" not in tables and "telemetry_batches" not in tables
    assert "readings_v4_migration" not in tables
    for dev in (DEV_A, DEV_B):
        after = s.query_telemetry(dev, limit=100)
        # Same readings, same order (ties on ts_ms broken by the old seq order), same values.
        assert [(r.stream, r.ts_ms, r.value, r.msg_id, r.received_ms) for r in after] == \
            [(b[0], b[1], cbor2.loads(b[2]), b[3], b[4]) for b in before[dev]]
    # Each value's bytes, odd encodings included, are in the new blob as they were.
    for device_id, msg_id, received_ms, readings in batches:
        row = s._conn.execute("SELECT reading_count, first_ts_ms, last_ts_ms, readings FROM"
                              " telemetry WHERE device_id=? AND msg_id=?",
                              (device_id, msg_id)).fetchone()
        assert row[0] == len(readings)
        if not readings:
            assert row[1:] == (None, None, None)
            continue
        stamps = [ts_ms for _, ts_ms, _ in readings]
        assert row[1:3] == (min(stamps), max(stamps))
        plaintext = s._keyring.open("telemetry", row[3], build_aad(
            "telemetry", device_id, msg_id, received_ms, len(readings), min(stamps), max(stamps),
            "readings"))
        assert plaintext == sqlite_store._cbor_array_head(3 * len(readings)) + b"".join(
            cbor2.dumps(stream) + cbor2.dumps(ts_ms) + value for stream, ts_ms, value in readings)
    odd = [r.value for r in s.query_telemetry(DEV_A, limit=100) if r.msg_id == 2]
    assert odd == [cbor2.loads(v) for v in reversed(ODD_CBOR)]
    # Stream queries and paging over migrated data.
    assert [r.value for r in s.query_telemetry(DEV_A, stream="h|%")] == ["x"]
    walked, cursor = [], None
    while True:
        page = s.query_telemetry(DEV_A, limit=3, before_seq=cursor)
        if not page:
            break
        walked += page
        cursor = page[-1].seq
    assert [(r.stream, r.ts_ms, r.msg_id) for r in walked] == \
        [(b[0], b[1], b[3]) for b in before[DEV_A]]
    # Resends of migrated batches (the empty one too) stay no-ops; new batches sort after.
    assert s.add_telemetry([TelemetryBatch(DEV_A, 2, [("t", 10, 0)], 1),
                            TelemetryBatch(DEV_A, 3, [("t", 10, 0)], 1),
                            TelemetryBatch(DEV_A, 5, [("t", 10, "new")], 1)]) == \
        [False, False, True]
    newest = s.query_telemetry(DEV_A, since_ms=10, until_ms=10, limit=1)[0]
    assert newest.value == "new" and newest.seq > max(r.seq for r in walked)
    s.remove_device(DEV_B)
    assert s.query_telemetry(DEV_B) == []
    s.close()
    s = SQLiteStore(path, Keyring(master))  # reopening migrates nothing twice
    assert len(s.query_telemetry(DEV_A, limit=100)) == 15
    s.close()


def test_a_value_that_fails_to_open_leaves_the_version_3_file_as_it_was(tmp_path, master):
    """The migration opens every old value with its old binding; one that fails stops it and
    the transaction rolls back: the file is still version 3, whole, and opens once repaired."""
    path = str(tmp_path / "hub.db")
    make_v3_file(path, master, sample_batches())
    conn = sqlite3.connect(path, isolation_level=None)
    seq, original = conn.execute("SELECT seq, value FROM readings WHERE msg_id=4 AND idx=1"
                                 ).fetchone()
    tampered = bytearray(original)
    tampered[-1] ^= 1
    conn.execute("UPDATE readings SET value=? WHERE seq=?", (bytes(tampered), seq))
    conn.close()
    before = file_state(path)
    with pytest.raises(SealError):
        SQLiteStore(path, Keyring(master))
    assert file_state(path) == before
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("UPDATE readings SET value=? WHERE seq=?", (original, seq))
    conn.close()
    s = SQLiteStore(path, Keyring(master))
    assert len(s.query_telemetry(DEV_A, limit=100)) == 14
    s.close()


CRASH = r"""
import os, sys
from smartx_hub import sqlite_store
from smartx_hub.crypto import Keyring
sqlite_store._MIGRATION_CHUNK = 4  # several rounds of inserts before the crash
keyring = Keyring(bytes.fromhex(sys.argv[2]))
real = keyring.seal_many
rounds = []
def seal_many(purpose, items):
    rounds.append(purpose)
    if len(rounds) == 3:  # two rounds of rows are in the open transaction by now
        os._exit(17)  # no rollback, no close: as a power cut or a kill -9 leaves it
    return real(purpose, items)
keyring.seal_many = seal_many
sqlite_store.SQLiteStore(sys.argv[1], keyring)
"""


def test_a_crash_during_the_migration_leaves_the_version_3_file_usable(tmp_path, master):
    """A process killed half-way through the migration (after rows went into the open
    transaction) leaves a version 3 file: SQLite drops the uncommitted WAL frames. The next
    open migrates it whole."""
    path = str(tmp_path / "hub.db")
    batches = [(DEV_A, m, m, [("t", m, cbor2.dumps(m)), ("u", m + 1, cbor2.dumps(-m))])
               for m in range(1, 21)]
    make_v3_file(path, master, batches)
    before = file_state(path)
    env = dict(os.environ, PYTHONPATH=ROOT)
    done = subprocess.run([sys.executable, "-c", CRASH, path, master.hex()], cwd=ROOT, env=env,
                          capture_output=True, timeout=60)
    assert done.returncode == 17, done.stderr.decode()
    assert file_state(path) == before
    s = SQLiteStore(path, Keyring(master))
    got = s.query_telemetry(DEV_A, limit=100)
    assert [(r.stream, r.ts_ms, r.value) for r in got][:3] == \
        [("u", 21, -20), ("t", 20, 20), ("u", 20, -19)]
    assert len(got) == 40
    s.close()


def test_a_new_file_still_works_without_a_migration_of_telemetry(tmp_path, master):
    """A brand-new file runs every migration, version 4 included, before it has data keys."""
    s = SQLiteStore(str(tmp_path / "hub.db"), Keyring(master))
    assert s.get_meta("schema_version") == "4"
    dev = new_device(s)
    assert s.add_telemetry([TelemetryBatch(dev, 1, [("t", 1, 2.5)], 3)]) == [True]
    s.close()
    s = SQLiteStore(str(tmp_path / "hub.db"), Keyring(master))
    assert [(r.value, r.received_ms) for r in s.query_telemetry(dev)] == [(2.5, 3)]
    s.close()
