"""SQLiteStore (smartx_hub/sqlite_store.py) on real SQLite files: the Store contract, sealing at
rest (sentinel scan of the raw files), tamper detection, rotation, dedup and pagination."""

from __future__ import annotations

import itertools
import re
import sqlite3
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smartx_hub import sqlite_store
from smartx_hub.crypto import Keyring, SealError, WrappedKey, generate_master_key
from smartx_hub.sqlite_store import SCHEMA_VERSION, SQLiteStore
from smartx_hub.store import (
    ConflictError,
    Device,
    NotFoundError,
    StoreError,
    TelemetryBatch,
    TokenRecord,
)

SENTINEL = "SENTINEL-7f3a9c-PLAINTEXT"
PEM = b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n"
ID = re.compile(r"^(dev|cmd|usr)_[a-z2-7]{16}$")


def open_store(path, master: bytes) -> SQLiteStore:
    return SQLiteStore(str(path), Keyring(master))


@pytest.fixture
def master():
    return generate_master_key()


@pytest.fixture
def store(tmp_path, master):
    s = open_store(tmp_path / "hub.db", master)
    yield s
    s.close()


def raw(path) -> sqlite3.Connection:
    return sqlite3.connect(str(path), isolation_level=None)


def add_es(store, name="dev", now=1000):
    return store.add_device(name, "es256", PEM, None, now)


# -- setup -------------------------------------------------------------------------------


def test_pragmas_schema_and_data_keys(store, tmp_path):
    conn = store._conn
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert store.get_meta("schema_version") == str(SCHEMA_VERSION)
    purposes = {r[0] for r in conn.execute("SELECT purpose FROM data_keys")}
    assert {"secrets", "telemetry", "commands", "state", "scope"} <= purposes
    assert store.data_key_count() == len(purposes)


def test_newer_schema_is_refused(tmp_path, master):
    s = open_store(tmp_path / "hub.db", master)
    s.set_meta("schema_version", str(SCHEMA_VERSION + 1))
    s.close()
    with pytest.raises(StoreError, match="newer"):
        open_store(tmp_path / "hub.db", master)


def test_reopening_keeps_data_keys(tmp_path, master):
    s = open_store(tmp_path / "hub.db", master)
    dev = s.add_device("h", "hs256", None, b"s" * 32, 1)
    count = s.data_key_count()
    s.close()
    s = open_store(tmp_path / "hub.db", master)
    assert s.data_key_count() == count
    assert s.get_device(dev.id).secret == b"s" * 32
    s.close()


def test_wrong_master_key_cannot_open(tmp_path, master):
    open_store(tmp_path / "hub.db", master).close()
    with pytest.raises(SealError):
        open_store(tmp_path / "hub.db", generate_master_key())


# -- devices -----------------------------------------------------------------------------


def test_device_lifecycle_and_devices_version(store):
    assert store.get_meta("devices_version") is None
    a = add_es(store, "a", 10)
    b = store.add_device("b", "hs256", None, b"k" * 32, 20)
    assert ID.match(a.id) and ID.match(b.id) and a.id != b.id
    assert store.get_device(b.id).secret == b"k" * 32
    assert store.get_device(a.id).public_key_pem == PEM
    assert [d.name for d in store.list_devices()] == ["a", "b"]
    assert store.get_device_by_name("b").id == b.id
    v0 = int(store.get_meta("devices_version"))
    store.set_device_enabled(a.id, False)
    assert store.get_device(a.id).enabled is False
    v1 = int(store.get_meta("devices_version"))
    assert v1 == v0 + 1
    store.set_device_enabled(a.id, True)
    store.remove_device(b.id)
    assert int(store.get_meta("devices_version")) == v1 + 2
    assert store.get_device(b.id) is None
    store.touch_device(a.id, 999)
    assert store.get_device(a.id).last_seen_ms == 999


def test_device_errors(store):
    add_es(store, "a")
    with pytest.raises(ConflictError):
        add_es(store, "a")
    with pytest.raises(StoreError):
        store.add_device("x", "rs256", PEM, None, 1)
    with pytest.raises(StoreError):
        store.add_device("x", "hs256", None, None, 1)
    with pytest.raises(StoreError):
        store.add_device("x", "es256", None, None, 1)
    with pytest.raises(StoreError):
        store.add_device("", "es256", PEM, None, 1)
    with pytest.raises(StoreError):
        store.add_device("bad\nname", "es256", PEM, None, 1)
    for call in (lambda: store.set_device_enabled("dev_missing", False),
                 lambda: store.remove_device("dev_missing"),
                 lambda: store.touch_device("dev_missing", 1)):
        with pytest.raises(NotFoundError):
            call()


def test_devices_version_is_seen_by_another_connection(tmp_path, master):
    """The CLI (another process, another connection) disables; the hub's connection notices."""
    hub = open_store(tmp_path / "hub.db", master)
    cli = open_store(tmp_path / "hub.db", master)
    dev = add_es(hub)
    before = hub.get_meta("devices_version")
    cli.set_device_enabled(dev.id, False)
    assert hub.get_meta("devices_version") != before
    assert hub.get_device(dev.id).enabled is False
    cli.close()
    hub.close()


def count_transactions(store, action):
    """How many write transactions ``action`` opens on the store's connection."""
    statements = []
    store._conn.set_trace_callback(statements.append)
    try:
        action()
    finally:
        store._conn.set_trace_callback(None)
    return sum(1 for sql in statements if sql.strip().upper().startswith("BEGIN"))


def test_touch_devices_one_transaction_unknown_skipped_never_backwards(store):
    a, b, c = add_es(store, "a"), add_es(store, "b"), add_es(store, "c")
    store.touch_device(b.id, 500)
    touches = {a.id: 100, b.id: 400, c.id: 700, "dev_removedmeanwhile": 900}
    assert count_transactions(store, lambda: store.touch_devices(touches)) == 1
    assert [store.get_device(d.id).last_seen_ms for d in (a, b, c)] == [100, 500, 700]
    store.touch_devices({a.id: 150, c.id: 650})
    assert (store.get_device(a.id).last_seen_ms, store.get_device(c.id).last_seen_ms) == (150, 700)
    assert count_transactions(store, lambda: store.touch_devices({})) == 0
    version = store.get_meta("devices_version")
    store.touch_devices({a.id: 10_000})
    assert store.get_meta("devices_version") == version  # not a registry change


def test_touch_devices_bad_input_changes_nothing(store):
    a, b = add_es(store, "a"), add_es(store, "b")
    # Each call mixes a good entry for a with a bad one: all or nothing.
    for bad in ({b.id: "soon"}, {b.id: True}, {b.id: 1.5}, {5: 1}, {b.id: 2**70}):
        with pytest.raises(StoreError):
            store.touch_devices({a.id: 7, **bad})
        assert store.get_device(a.id).last_seen_ms is None


@settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.dictionaries(st.sampled_from(range(4)), st.integers(0, 10**13), max_size=4),
                max_size=5))
def test_touch_devices_keeps_the_latest_time(store, rounds):
    """Model: after any sequence of calls, each device's last_seen is the largest time given."""
    names = ["m%d-%d" % (next(_UNIQUE), i) for i in range(3)]
    devices = [add_es(store, name) for name in names]
    ids = [d.id for d in devices] + ["dev_notenrolledyet"]
    expected: dict = {}
    for touches in rounds:
        store.touch_devices({ids[i]: when for i, when in touches.items()})
        for i, when in touches.items():
            expected[ids[i]] = max(expected.get(ids[i], when), when)
    for device in devices:
        assert store.get_device(device.id).last_seen_ms == expected.get(device.id)


_UNIQUE = itertools.count()


# -- gateways ----------------------------------------------------------------------------


def test_device_kind_and_gateway_defaults(store):
    board = add_es(store, "board")
    assert (board.kind, board.gateway_id) == ("device", None)
    assert (store.get_device(board.id).kind, store.get_device(board.id).gateway_id) == \
        ("device", None)
    positional = Device("dev_x", "x", "es256", PEM, None, True, 1)  # older callers still work
    assert (positional.kind, positional.gateway_id, positional.last_seen_ms) == \
        ("device", None, None)


def test_gateway_assignment(store):
    gateway = store.add_device("pi", "es256", PEM, None, 1, kind="gateway")
    other = store.add_device("pi2", "eddsa", PEM, None, 2, kind="gateway")
    board = store.add_device("b1", "hs256", None, b"k" * 32, 3, gateway_id=gateway.id)
    loose = add_es(store, "b2", 4)
    assert (gateway.kind, gateway.gateway_id) == ("gateway", None)
    assert (board.kind, board.gateway_id) == ("device", gateway.id)
    listed = {d.name: (d.kind, d.gateway_id) for d in store.list_devices()}
    assert listed == {"pi": ("gateway", None), "pi2": ("gateway", None),
                      "b1": ("device", gateway.id), "b2": ("device", None)}
    assert store.get_device_by_name("b1").gateway_id == gateway.id
    assert store.get_device(board.id).secret == b"k" * 32

    version = int(store.get_meta("devices_version"))
    store.set_device_gateway(loose.id, other.id)
    store.set_device_gateway(board.id, None)
    assert store.get_device(loose.id).gateway_id == other.id
    assert store.get_device(board.id).gateway_id is None
    assert int(store.get_meta("devices_version")) == version + 2  # a running hub re-checks


def test_gateway_rules(store):
    gateway = store.add_device("pi", "es256", PEM, None, 1, kind="gateway")
    board = store.add_device("b1", "es256", PEM, None, 2, gateway_id=gateway.id)
    version = store.get_meta("devices_version")
    refused = [
        (StoreError, lambda: store.add_device("x", "es256", PEM, None, 1, kind="bridge")),
        (NotFoundError, lambda: store.add_device("x", "es256", PEM, None, 1,
                                                 gateway_id="dev_missing")),
        (StoreError, lambda: store.add_device("x", "es256", PEM, None, 1, gateway_id=board.id)),
        (StoreError, lambda: store.add_device("x", "es256", PEM, None, 1, kind="gateway",
                                              gateway_id=gateway.id)),
        (StoreError, lambda: store.set_device_gateway(gateway.id, gateway.id)),
        (StoreError, lambda: store.set_device_gateway(board.id, board.id)),
        (NotFoundError, lambda: store.set_device_gateway("dev_missing", gateway.id)),
        (NotFoundError, lambda: store.set_device_gateway(board.id, "dev_missing")),
        (ConflictError, lambda: store.remove_device(gateway.id)),
    ]
    for error, call in refused:
        with pytest.raises(error):
            call()
    # Nothing of the refused calls stuck.
    assert store.get_device_by_name("x") is None
    assert store.get_device(board.id).gateway_id == gateway.id
    assert store.get_device(gateway.id) is not None
    assert store.get_meta("devices_version") == version
    with pytest.raises(ConflictError, match="b1"):
        store.remove_device(gateway.id)
    store.set_device_gateway(board.id, None)
    store.remove_device(gateway.id)
    assert store.get_device(gateway.id) is None and store.get_device(board.id) is not None


def test_gateway_foreign_key_backs_the_rule(store, tmp_path):
    """Even SQL that skips the store's check cannot orphan a board or invent a kind."""
    gateway = store.add_device("pi", "es256", PEM, None, 1, kind="gateway")
    store.add_device("b1", "es256", PEM, None, 2, gateway_id=gateway.id)
    conn = raw(tmp_path / "hub.db")
    conn.execute("PRAGMA foreign_keys=ON")
    with pytest.raises(sqlite3.IntegrityError):
        conn.execute("DELETE FROM devices WHERE id=?", (gateway.id,))
    with pytest.raises(sqlite3.IntegrityError):
        conn.execute("UPDATE devices SET gateway_id='dev_missing' WHERE name='b1'")
    with pytest.raises(sqlite3.IntegrityError):
        conn.execute("UPDATE devices SET kind='bridge' WHERE name='b1'")
    conn.close()


def test_migration_from_schema_1(tmp_path, master, monkeypatch):
    """A database made by the version 1 hub gains kind and gateway_id, keeping its devices."""
    monkeypatch.setattr(sqlite_store, "SCHEMA_VERSION", 1)
    old = open_store(tmp_path / "hub.db", master)
    assert old.get_meta("schema_version") == "1"
    old._conn.execute("INSERT INTO devices(id, name, auth, public_key_pem, secret, enabled,"
                      " created_ms, last_seen_ms) VALUES ('dev_aaaaaaaaaaaaaaaa', 'old', 'es256',"
                      " ?, NULL, 1, 5, 6)", (PEM,))
    columns = {r[1] for r in old._conn.execute("PRAGMA table_info(devices)")}
    assert "kind" not in columns and "gateway_id" not in columns
    old.close()
    monkeypatch.undo()

    s = open_store(tmp_path / "hub.db", master)
    assert s.get_meta("schema_version") == str(SCHEMA_VERSION) == "4"
    tables = {r[0] for r in s._conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"telemetry", "telemetry_ranges", "telemetry_spans"} <= tables
    assert not {"readings", "telemetry_batches"} & tables  # version 4 replaced them
    indexes = {r[0] for r in s._conn.execute(
        "SELECT name FROM sqlite_master WHERE type='index' AND tbl_name LIKE 'telemetry%'")
        if not r[0].startswith("sqlite_")}
    assert indexes == {"telemetry_by_time"}  # and the keys and UNIQUE: see _SCHEMA_V4
    device = s.get_device("dev_aaaaaaaaaaaaaaaa")
    assert (device.name, device.public_key_pem, device.last_seen_ms, device.kind,
            device.gateway_id) == ("old", PEM, 6, "device", None)
    gateway = s.add_device("pi", "es256", PEM, None, 7, kind="gateway")
    s.set_device_gateway(device.id, gateway.id)
    s.close()
    s = open_store(tmp_path / "hub.db", master)  # reopening migrates nothing twice
    assert s.get_device(device.id).gateway_id == gateway.id
    s.close()


# -- telemetry ---------------------------------------------------------------------------


def batch(device_id, msg_id, readings, received=5000):
    return TelemetryBatch(device_id, msg_id, readings, received)


def test_telemetry_dedup_on_device_and_msg_id(store):
    a, b = add_es(store, "a"), add_es(store, "b")
    first = store.add_telemetry([batch(a.id, 1, [("t", 100, 1.5), ("h", 100, 40)]),
                                 batch(a.id, 1, [("t", 100, 99.0)]),  # repeat in the same call
                                 batch(b.id, 1, [("t", 100, 2.5)])])  # same msg id, other device
    assert first == [True, False, True]
    assert store.add_telemetry([batch(a.id, 1, [("t", 100, 77.0)]), batch(a.id, 2, [])]) == \
        [False, True]
    readings = store.query_telemetry(a.id)
    assert sorted((r.stream, r.value) for r in readings) == [("h", 40), ("t", 1.5)]
    assert [r.value for r in store.query_telemetry(b.id)] == [2.5]


def test_telemetry_batch_list_is_one_transaction(store):
    a = add_es(store, "a")
    with pytest.raises(NotFoundError):
        store.add_telemetry([batch(a.id, 1, [("t", 1, 1)]), batch("dev_missing", 1, [("t", 1, 1)])])
    assert store.query_telemetry(a.id) == []
    assert store.add_telemetry([batch(a.id, 1, [("t", 1, 1)])]) == [True]  # nothing half-stored


def test_telemetry_bad_input_is_a_store_error(store):
    a = add_es(store, "a")
    for bad in ([("t", 1)], [("t", "soon", 1)], [(5, 1, 1)], [("t", 1, object())]):
        with pytest.raises(StoreError):
            store.add_telemetry([batch(a.id, 1, bad)])
    with pytest.raises(StoreError):
        store.add_telemetry([batch(a.id, "1", [])])
    with pytest.raises(StoreError):
        store.query_telemetry(a.id, limit=0)


VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False)
    | st.text(max_size=20) | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner,
                                                                max_size=4),
    max_leaves=10)


def test_values_round_trip(store):
    a = add_es(store, "a")
    msg_ids = itertools.count(1)

    @given(VALUES)
    def check(value):
        msg_id = next(msg_ids)
        store.add_telemetry([batch(a.id, msg_id, [("v", msg_id, value)])])
        assert store.query_telemetry(a.id, limit=1)[0].value == value

    check()


def test_query_order_range_stream_and_limit(store):
    a = add_es(store, "a")
    store.add_telemetry([batch(a.id, 1, [("t", 300, 3), ("h", 100, 1)]),
                         batch(a.id, 2, [("t", 200, 2), ("t", 300, 4)])])
    got = store.query_telemetry(a.id)
    assert [(r.ts_ms, r.value) for r in got] == [(300, 4), (300, 3), (200, 2), (100, 1)]
    assert all(got[i].seq > got[i + 1].seq for i in (0,))  # equal ts: newer seq first
    assert [r.value for r in store.query_telemetry(a.id, stream="t")] == [4, 3, 2]
    assert [r.value for r in store.query_telemetry(a.id, since_ms=200, until_ms=300,
                                                   stream="t", limit=2)] == [4, 3]
    assert [r.value for r in store.query_telemetry(a.id, until_ms=200)] == [2, 1]
    assert got[0].msg_id == 2 and got[0].received_ms == 5000 and got[0].device_id == a.id


def test_pagination_walks_every_reading_once(tmp_path, master):
    s = open_store(tmp_path / "hub.db", master)
    counter = itertools.count(1)

    @given(st.lists(st.integers(0, 20), max_size=30), st.integers(1, 7),
           st.sampled_from([None, "x"]))
    def check(timestamps, page, stream):
        dev = add_es(s, "d%d" % next(counter))
        readings = [("x" if i % 2 else "y", ts, i) for i, ts in enumerate(timestamps)]
        s.add_telemetry([batch(dev.id, 1, readings)])
        expected = sorted((r for r in s.query_telemetry(dev.id, stream=stream, limit=1000)),
                          key=lambda r: (r.ts_ms, r.seq), reverse=True)
        walked, cursor = [], None
        for _ in range(len(readings) + 2):
            chunk = s.query_telemetry(dev.id, stream=stream, limit=page, before_seq=cursor)
            if not chunk:
                break
            walked.extend(chunk)
            cursor = chunk[-1].seq
        assert [r.seq for r in walked] == [r.seq for r in expected]
        assert len(expected) == sum(1 for r in readings if stream is None or r[0] == stream)

    check()
    s.close()


def test_concurrent_threads(store):
    devices = [add_es(store, "t%d" % i) for i in range(4)]
    errors = []

    def work(dev):
        try:
            for m in range(25):
                store.add_telemetry([batch(dev.id, m, [("t", m, m)])])
                store.query_telemetry(dev.id, limit=5)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(d,)) for d in devices]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    for d in devices:
        assert len(store.query_telemetry(d.id, limit=1000)) == 25


# -- commands, state, users, tokens, audit -----------------------------------------------


def test_command_lifecycle(store):
    a = add_es(store, "a")
    c1 = store.add_command(a.id, "reboot", {"delay": 5}, ttl_ms=1000, now_ms=100)
    c2 = store.add_command(a.id, "blink", [1, 2], ttl_ms=50, now_ms=110)
    c3 = store.add_command(a.id, "read", None, ttl_ms=5000, now_ms=120)
    assert ID.match(c1.id) and c1.status == "queued" and c1.expires_ms == 1100
    assert store.get_command(c1.id).args == {"delay": 5}
    pending = store.pending_commands(a.id, now_ms=200)  # c2 expired at 160
    assert [c.id for c in pending] == [c1.id, c3.id]
    assert store.get_command(c2.id).status == "expired"
    store.mark_command_delivered(c1.id, 210)
    assert [c.id for c in store.pending_commands(a.id, 220)] == [c3.id]
    store.set_command_result(c1.id, True, {"ok": 1}, None, 230)
    store.set_command_result(c1.id, False, None, "late duplicate", 240)  # first answer wins
    done = store.get_command(c1.id)
    assert (done.status, done.result, done.error, done.delivered_ms, done.completed_ms) == \
        ("succeeded", {"ok": 1}, None, 210, 230)
    store.set_command_result(c3.id, False, None, "no sensor", 250)
    failed = store.get_command(c3.id)
    assert (failed.status, failed.error, failed.result) == ("failed", "no sensor", None)
    assert [c.id for c in store.list_commands(a.id)] == [c3.id, c2.id, c1.id]
    assert [c.id for c in store.list_commands(a.id, limit=1)] == [c3.id]
    assert store.get_command("cmd_missing") is None
    with pytest.raises(NotFoundError):
        store.add_command("dev_missing", "x", 1, 10, 1)
    with pytest.raises(NotFoundError):
        store.mark_command_delivered("cmd_missing", 1)
    with pytest.raises(NotFoundError):
        store.set_command_result("cmd_missing", True, 1, None, 1)
    with pytest.raises(StoreError):
        store.add_command(a.id, "x", 1, 0, 1)


def test_device_state(store):
    a = add_es(store, "a")
    assert store.get_state(a.id).desired == {} and store.get_state(a.id).desired_version == 0
    s1 = store.set_desired_state(a.id, {"led": True}, 10)
    s2 = store.set_desired_state(a.id, {"led": False}, 20)
    assert (s1.desired_version, s2.desired_version, s2.desired, s2.desired_ms) == \
        (1, 2, {"led": False}, 20)
    store.set_reported_state(a.id, {"led": False, "fw": "1.0"}, 30)
    state = store.get_state(a.id)
    assert (state.reported, state.reported_ms, state.desired_version) == \
        ({"led": False, "fw": "1.0"}, 30, 2)
    b = add_es(store, "b")
    store.set_reported_state(b.id, {"x": 1}, 5)
    assert store.get_state(b.id).desired_version == 0
    for call in (lambda: store.get_state("dev_missing"),
                 lambda: store.set_desired_state("dev_missing", {}, 1),
                 lambda: store.set_reported_state("dev_missing", {}, 1)):
        with pytest.raises(NotFoundError):
            call()
    with pytest.raises(StoreError):
        store.set_desired_state(a.id, [1], 1)  # type: ignore[arg-type]


def test_users(store):
    u = store.add_user("Alice", "$argon2id$hash", 5)
    assert ID.match(u.id)
    assert store.get_user(u.id).password_hash == "$argon2id$hash"
    assert store.get_user_by_name("alice").id == u.id  # names compare case-insensitively
    with pytest.raises(ConflictError):
        store.add_user("ALICE", "h", 6)
    store.set_user_password(u.id, "$argon2id$new")
    store.set_tokens_valid_after(u.id, 77)
    again = store.get_user(u.id)
    assert (again.password_hash, again.tokens_valid_after_ms) == ("$argon2id$new", 77)
    assert [x.username for x in store.list_users()] == ["Alice"]
    with pytest.raises(NotFoundError):
        store.set_user_password("usr_missing", "h")
    with pytest.raises(NotFoundError):
        store.set_tokens_valid_after("usr_missing", 1)


def token(user_id, jti, expires=10_000, created=1):
    return TokenRecord(jti, user_id, "ci", "ab" * 32 if jti == "t1" else jti * 8, "x1Yz",
                       ["telemetry:read"], None if jti == "t1" else ["dev_a"], created, expires)


def test_tokens(store):
    u = store.add_user("bob", "h", 1)
    store.add_token(token(u.id, "t1", created=1))
    store.add_token(token(u.id, "t2", created=2))
    store.add_token(token(u.id, "t3", expires=50, created=3))
    with pytest.raises(ConflictError):
        store.add_token(token(u.id, "t1"))
    with pytest.raises(NotFoundError):
        store.add_token(token("usr_missing", "t9"))
    t1 = store.get_token("t1")
    assert (t1.scopes, t1.devices, t1.hint, t1.revoked_ms) == (["telemetry:read"], None, "x1Yz",
                                                               None)
    assert store.get_token("t2").devices == ["dev_a"]
    assert [t.id for t in store.list_tokens(u.id)] == ["t3", "t2", "t1"]
    store.revoke_token("t1", 100)
    store.revoke_token("t1", 200)
    assert store.get_token("t1").revoked_ms == 100
    assert store.revoke_all_tokens(u.id, 300) == 1  # t2 only: t1 revoked, t3 expired
    assert store.get_token("t2").revoked_ms == 300 and store.get_token("t3").revoked_ms is None
    store.touch_token("t2", 400)
    assert store.get_token("t2").last_used_ms == 400
    for call in (lambda: store.revoke_token("nope", 1), lambda: store.touch_token("nope", 1),
                 lambda: store.revoke_all_tokens("usr_missing", 1)):
        with pytest.raises(NotFoundError):
            call()
    assert store.get_token("nope") is None and len(store.list_tokens()) == 3


def test_audit(store):
    for i in range(5):
        store.add_audit("device.enrolled", "cli", "local", {"n": i}, 100 + i)
    entries = store.list_audit(limit=3)
    assert [e.detail["n"] for e in entries] == [4, 3, 2]
    assert [e.detail["n"] for e in store.list_audit(before_id=entries[-1].id)] == [1, 0]
    assert (entries[0].action, entries[0].actor, entries[0].source, entries[0].ts_ms) == \
        ("device.enrolled", "cli", "local", 104)
    with pytest.raises(StoreError):
        store.add_audit("x", "cli", "local", {"bad": object()}, 1)


def test_removing_a_device_removes_its_data(store, tmp_path):
    a, b = add_es(store, "a"), add_es(store, "b")
    for dev in (a, b):
        store.add_telemetry([batch(dev.id, 1, [("t", 1, 1)])])
        store.add_command(dev.id, "x", 1, 100, 1)
        store.set_desired_state(dev.id, {"k": 1}, 1)
    store.remove_device(a.id)
    conn = raw(tmp_path / "hub.db")
    for table in ("telemetry", "telemetry_ranges", "telemetry_spans", "commands",
                  "device_state"):
        ids = {r[0] for r in conn.execute("SELECT device_id FROM %s" % table)}
        assert ids == {b.id}, table
    conn.close()
    assert [r.value for r in store.query_telemetry(b.id)] == [1]


# -- at rest: sentinel, tampering, rotation -----------------------------------------------


def fill_with_sentinel(store):
    secret_dev = store.add_device("hs", "hs256", None, SENTINEL.encode() + b"-secret", 1)
    dev = add_es(store, "es")
    store.add_telemetry([batch(dev.id, 1, [("temp", 10, SENTINEL + "-reading"),
                                            ("blob", 11, (SENTINEL + "-bytes").encode()),
                                            ("nested", 12, {"k": [SENTINEL + "-nested"]})])])
    cmd = store.add_command(dev.id, "say", {"text": SENTINEL + "-args"}, 1000, 1)
    store.set_command_result(cmd.id, False, {"echo": SENTINEL + "-result"},
                             SENTINEL + "-error", 2)
    store.set_desired_state(dev.id, {"motd": SENTINEL + "-desired"}, 3)
    store.set_reported_state(dev.id, {"motd": SENTINEL + "-reported"}, 4)
    store.add_user("admin", "$argon2id$" + SENTINEL + "-pwhash", 5)
    return secret_dev, dev, cmd


def raw_bytes(tmp_path) -> bytes:
    data = b""
    for suffix in ("", "-wal", "-shm"):
        path = tmp_path / ("hub.db" + suffix)
        if path.exists():
            data += path.read_bytes()
    return data


def test_sentinel_never_reaches_the_database_files(tmp_path, master):
    s = open_store(tmp_path / "hub.db", master)
    secret_dev, dev, cmd = fill_with_sentinel(s)
    # The scan can fail: a clear column (a stream name) with a marker is found in the same bytes.
    s.add_telemetry([batch(dev.id, 2, [("CLEAR-MARKER-stream", 20, 1)])])
    assert (tmp_path / "hub.db-wal").stat().st_size > 0  # the data is still in the WAL
    data = raw_bytes(tmp_path)
    assert b"CLEAR-MARKER-stream" in data
    assert SENTINEL.encode() not in data
    assert SENTINEL.encode("utf-16-le") not in data
    # The store still gives everything back in the clear.
    assert s.get_device(secret_dev.id).secret.startswith(SENTINEL.encode())
    assert s.get_command(cmd.id).args == {"text": SENTINEL + "-args"}
    s.close()  # checkpoint: now the main file holds it all
    data = raw_bytes(tmp_path)
    assert b"CLEAR-MARKER-stream" in data
    assert SENTINEL.encode() not in data


def test_flipped_byte_in_each_sealed_column_is_refused(tmp_path, master):
    s = open_store(tmp_path / "hub.db", master)
    secret_dev, dev, cmd = fill_with_sentinel(s)
    conn = raw(tmp_path / "hub.db")
    cases = [
        ("devices", "secret", "id=?", secret_dev.id, lambda: s.get_device(secret_dev.id)),
        ("telemetry", "readings", "msg_id=1", None, lambda: s.query_telemetry(dev.id)),
        ("commands", "args", "id=?", cmd.id, lambda: s.get_command(cmd.id)),
        ("commands", "result", "id=?", cmd.id, lambda: s.get_command(cmd.id)),
        ("commands", "error", "id=?", cmd.id, lambda: s.get_command(cmd.id)),
        ("device_state", "desired", "device_id=?", dev.id, lambda: s.get_state(dev.id)),
        ("device_state", "reported", "device_id=?", dev.id, lambda: s.get_state(dev.id)),
        ("users", "password_hash", "username='admin'", None, lambda: s.list_users()),
    ]
    for table, column, where, arg, read in cases:
        params = () if arg is None else (arg,)
        original = conn.execute("SELECT %s FROM %s WHERE %s" % (column, table, where),
                                params).fetchone()[0]
        tampered = bytearray(original)
        tampered[len(tampered) // 2] ^= 0x01
        conn.execute("UPDATE %s SET %s=? WHERE %s" % (table, column, where),
                     (bytes(tampered),) + params)
        with pytest.raises(SealError):
            read()
        conn.execute("UPDATE %s SET %s=? WHERE %s" % (table, column, where),
                     (original,) + params)
        read()  # restored: opens again
    conn.close()
    s.close()


def test_blobs_moved_between_rows_are_refused(tmp_path, master):
    s = open_store(tmp_path / "hub.db", master)
    d1 = s.add_device("one", "hs256", None, b"1" * 32, 1)
    d2 = s.add_device("two", "hs256", None, b"2" * 32, 1)
    s.add_telemetry([batch(d1.id, 1, [("t", 10, 1.0), ("t", 11, 2.0)])])
    s.set_desired_state(d1.id, {"a": 1}, 1)
    s.set_reported_state(d1.id, {"b": 2}, 1)
    conn = raw(tmp_path / "hub.db")

    def swap(table, column, key, k1, k2):
        v1 = conn.execute("SELECT %s FROM %s WHERE %s=?" % (column, table, key), (k1,)).fetchone()[0]
        v2 = conn.execute("SELECT %s FROM %s WHERE %s=?" % (column, table, key), (k2,)).fetchone()[0]
        conn.execute("UPDATE %s SET %s=? WHERE %s=?" % (table, column, key), (v2, k1))
        conn.execute("UPDATE %s SET %s=? WHERE %s=?" % (table, column, key), (v1, k2))

    swap("devices", "secret", "id", d1.id, d2.id)
    with pytest.raises(SealError):
        s.get_device(d1.id)
    swap("devices", "secret", "id", d1.id, d2.id)
    assert s.get_device(d1.id).secret == b"1" * 32
    s.add_telemetry([batch(d1.id, 2, [("t", 12, 3.0), ("t", 13, 4.0)]),
                     batch(d2.id, 1, [("t", 10, 1.0), ("t", 11, 2.0)])])
    # Two batches of one device, and two devices' batches with the same msg id and shape.
    for k1, k2 in (("1", "2"), ("1", "3")):
        ids = [r[0] for r in conn.execute("SELECT id FROM telemetry ORDER BY id")]
        swap("telemetry", "readings", "id", ids[int(k1) - 1], ids[int(k2) - 1])
        with pytest.raises(SealError):
            s.query_telemetry(d1.id)
        swap("telemetry", "readings", "id", ids[int(k1) - 1], ids[int(k2) - 1])
        assert [r.value for r in s.query_telemetry(d1.id)] == [4.0, 3.0, 2.0, 1.0]
    # The batch's clear count and time range are bound into the additional data: editing
    # one is caught.
    for column, edited, original in (("reading_count", 1, 2), ("first_ts_ms", 9, 10),
                                     ("last_ts_ms", 12, 11)):
        conn.execute("UPDATE telemetry SET %s=? WHERE device_id=? AND msg_id=1" % column,
                     (edited, d1.id))
        with pytest.raises(SealError):
            s.query_telemetry(d1.id)
        conn.execute("UPDATE telemetry SET %s=? WHERE device_id=? AND msg_id=1" % column,
                     (original, d1.id))
    assert len(s.query_telemetry(d1.id)) == 4
    # A range row of d1 pointed at d2's batch: opened as d1's, it fails instead of showing.
    d2_batch = conn.execute("SELECT id FROM telemetry WHERE device_id=?", (d2.id,)).fetchone()[0]
    conn.execute("INSERT INTO telemetry_ranges VALUES (?, 't', 99, ?, 99)", (d1.id, d2_batch))
    with pytest.raises(SealError):
        s.query_telemetry(d1.id, stream="t")
    conn.execute("DELETE FROM telemetry_ranges WHERE last_ts_ms=99")
    # The stream ranges are an index, not the record: an edited range can hide a batch from a
    # query (as deleting its row can) but never alter a reading's time or value.
    conn.execute("UPDATE telemetry_ranges SET first_ts_ms=1, last_ts_ms=1 WHERE device_id=?"
                 " AND last_ts_ms=13", (d1.id,))
    assert [(r.ts_ms, r.value) for r in s.query_telemetry(d1.id, stream="t")] == \
        [(13, 4.0), (12, 3.0), (11, 2.0), (10, 1.0)]
    assert [r.ts_ms for r in s.query_telemetry(d1.id, stream="t", limit=2)] == [11, 10]
    # Desired and reported state of one device: moving one column into the other is caught.
    desired = conn.execute("SELECT desired FROM device_state").fetchone()[0]
    conn.execute("UPDATE device_state SET reported=?", (desired,))
    with pytest.raises(SealError):
        s.get_state(d1.id)
    conn.close()
    s.close()


def test_rotation_keeps_every_record_and_retires_the_old_key(tmp_path, master):
    s = open_store(tmp_path / "hub.db", master)
    secret_dev, dev, cmd = fill_with_sentinel(s)
    before = (s.get_device(secret_dev.id), s.query_telemetry(dev.id), s.get_command(cmd.id),
              s.get_state(dev.id), s.list_users())
    conn = raw(tmp_path / "hub.db")
    wrapped_before = dict(conn.execute("SELECT id, wrapped FROM data_keys").fetchall())
    new = generate_master_key()
    s.rotate_master_key(new)
    wrapped_after = dict(conn.execute("SELECT id, wrapped FROM data_keys").fetchall())
    assert wrapped_before.keys() == wrapped_after.keys()
    assert all(wrapped_before[k] != wrapped_after[k] for k in wrapped_before)
    # The open store keeps working, and can make new records.
    s.add_telemetry([batch(dev.id, 9, [("t", 50, "after")])])
    s.close()
    s = open_store(tmp_path / "hub.db", new)
    after = (s.get_device(secret_dev.id), [r for r in s.query_telemetry(dev.id) if r.msg_id != 9],
             s.get_command(cmd.id), s.get_state(dev.id), s.list_users())
    assert after == before
    assert s.query_telemetry(dev.id, limit=1)[0].value == "after"
    s.close()
    rows = [WrappedKey(r[0], r[1], r[2]) for r in
            conn.execute("SELECT id, purpose, wrapped FROM data_keys")]
    with pytest.raises(SealError):
        Keyring(master).load(rows)
    with pytest.raises(SealError):
        open_store(tmp_path / "hub.db", master)
    conn.close()


def test_failed_rotation_changes_nothing(tmp_path, master):
    s = open_store(tmp_path / "hub.db", master)
    dev = s.add_device("h", "hs256", None, b"x" * 32, 1)
    conn = raw(tmp_path / "hub.db")
    # A foreign row this master key never wrapped makes the rewrap fail half-way.
    conn.execute("INSERT INTO data_keys(id, purpose, wrapped) VALUES (999, 'telemetry', ?)",
                 (b"\x01" + b"\x00" * 60,))
    with pytest.raises(SealError):
        s.rotate_master_key(generate_master_key())
    conn.execute("DELETE FROM data_keys WHERE id=999")
    conn.close()
    s.close()
    s = open_store(tmp_path / "hub.db", master)  # the old key still opens everything
    assert s.get_device(dev.id).secret == b"x" * 32
    s.close()


# -- query plans and the additional data of telemetry ---------------------------------------


def plan(conn, sql, params=()):
    return " / ".join(r[3] for r in conn.execute("EXPLAIN QUERY PLAN " + sql, params))


TELEMETRY_TABLES = ("telemetry", "telemetry_ranges", "telemetry_spans")


def test_every_telemetry_statement_is_served_by_an_index(store, tmp_path):
    """Every statement the store runs on the telemetry tables (captured as run) searches an
    index: none scans a table or sorts for ORDER BY; and the cascades of remove_device search
    one too."""
    a, b = add_es(store, "a"), add_es(store, "b")
    store.add_telemetry([batch(dev.id, m, [("t", m * 10 + i, i) for i in range(3)] +
                               [("h", m * 10, 1)]) for dev in (a, b) for m in range(1, 40)])
    seen = []
    store._conn.set_trace_callback(seen.append)
    try:
        store.add_telemetry([batch(a.id, 99, [("t", 5, 1)]), batch(a.id, 99, [("t", 5, 1)])])
        first = store.query_telemetry(a.id, limit=5)
        store.query_telemetry(a.id, limit=5, before_seq=first[-1].seq)
        store.query_telemetry(a.id, limit=5, before_seq=3)  # a seq no reading has
        store.query_telemetry(a.id, since_ms=100, until_ms=200, limit=5)
        store.query_telemetry(a.id, stream="t", limit=5)
        store.query_telemetry(a.id, stream="h", since_ms=100, limit=5, before_seq=first[-1].seq)
        store.remove_device(b.id)
    finally:
        store._conn.set_trace_callback(None)
    statements = [sql for sql in seen if any(t in sql for t in TELEMETRY_TABLES)
                  and not sql.startswith("INSERT")]
    assert len(statements) >= 15
    conn = raw(tmp_path / "hub.db")
    try:
        for sql in statements:
            text = plan(conn, sql)
            assert "SCAN" not in text and "TEMP B-TREE" not in text, (sql, text)
            assert "SEARCH" in text, (sql, text)
        # What the ON DELETE CASCADE from devices looks up, once per removed device.
        for table in ("telemetry", "telemetry_spans"):
            text = plan(conn, "SELECT 1 FROM %s WHERE device_id=?" % table, (a.id,))
            assert "SEARCH %s USING" % table in text and "(device_id=?)" in text, text
        walk = plan(conn, "SELECT t.readings FROM telemetry_ranges r CROSS JOIN telemetry t ON"
                          " t.id=r.batch_id WHERE r.device_id=? AND r.stream=? AND"
                          " r.last_ts_ms>=? AND r.last_ts_ms<=? AND r.first_ts_ms<=?"
                          " ORDER BY r.last_ts_ms DESC, r.batch_id DESC", (a.id, "t", 0, 9, 9))
        assert "SEARCH r USING PRIMARY KEY (device_id=? AND stream=? AND last_ts_ms>? AND" \
               " last_ts_ms<?)" in walk and "SEARCH t USING INTEGER PRIMARY KEY" in walk, walk
        walk = plan(conn, "SELECT readings FROM telemetry WHERE device_id=? AND last_ts_ms>=? AND"
                          " last_ts_ms<=? AND first_ts_ms<=? AND id<=?"
                          " ORDER BY last_ts_ms DESC, id DESC", (a.id, 0, 9, 9, 5))
        assert "SEARCH telemetry USING INDEX telemetry_by_time (device_id=? AND last_ts_ms>? AND" \
               " last_ts_ms<?)" in walk and "TEMP" not in walk, walk
        assert sum("ORDER BY last_ts_ms DESC, id DESC" in sql for sql in statements) >= 4
    finally:
        conn.close()
    assert store.query_telemetry(b.id) == [] and len(store.query_telemetry(a.id, limit=999)) == 157


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(readings=st.lists(st.tuples(
           st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
           | st.sampled_from(["%", "|", "%7C", "a|b", "%25|"]),
           st.integers(-2**63, 2**63 - 1), st.integers(-5, 5) | st.text(max_size=5)),
       min_size=1, max_size=5),
       msg_id=st.integers(-2**63, 2**63 - 1), received=st.integers(-2**63, 2**63 - 1))
def test_batches_are_sealed_with_the_build_aad_binding(store, readings, msg_id, received):
    """The batch sealing path builds exactly ``build_aad(...)`` as additional data, and the
    blob is the flat CBOR array of the readings (cbor2 decodes it: the reference codec)."""
    import cbor2

    from smartx_hub.crypto import build_aad
    dev = store.get_device_by_name("aad") or add_es(store, "aad")
    if not store.add_telemetry([TelemetryBatch(dev.id, msg_id, readings, received)])[0]:
        return  # hypothesis repeated a msg_id: stored once already
    row = store._conn.execute("SELECT reading_count, readings FROM telemetry WHERE device_id=?"
                              " AND msg_id=?", (dev.id, msg_id)).fetchone()
    assert row[0] == len(readings)
    first, last = min(r[1] for r in readings), max(r[1] for r in readings)
    parts = ["telemetry", dev.id, msg_id, received, len(readings), first, last, "readings"]
    plaintext = store._keyring.open("telemetry", row[1], build_aad(*parts))
    assert cbor2.loads(plaintext) == [part for reading in readings for part in reading]
    assert plaintext == cbor2.dumps([part for reading in readings for part in reading])
    for changed in range(2, 7):  # each bound part, changed by one, fails to open
        wrong = list(parts)
        wrong[changed] += 1
        with pytest.raises(SealError):
            store._keyring.open("telemetry", row[1], build_aad(*wrong))
    ranges = store._conn.execute("SELECT stream, r.first_ts_ms, r.last_ts_ms FROM telemetry_ranges"
                                 " r JOIN telemetry t ON t.id=r.batch_id WHERE t.device_id=? AND"
                                 " t.msg_id=?", (dev.id, msg_id)).fetchall()
    expected = {}
    for stream, ts_ms, _ in readings:
        low, high = expected.get(stream, (ts_ms, ts_ms))
        expected[stream] = (min(low, ts_ms), max(high, ts_ms))
    assert {r[0]: (r[1], r[2]) for r in ranges} == expected
