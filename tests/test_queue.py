"""The offline queue on a real file: replay, reboot, torn tails, compaction, bound, policies."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smartx_device import queue as q


def no_resolve(monotonic_ms, this_boot):
    return 1_000_000 + monotonic_ms


def drain(queue):
    """Seal everything and return [(msg_id, readings)] without acking."""
    out = []
    while True:
        sealed = queue.seal(no_resolve)
        if sealed is None:
            return out
        out.append(sealed)


def values(batches):
    return [reading[2] for _, readings in batches for reading in readings]


def test_append_seal_ack_and_replay_after_reopen(tmp_path):
    path = str(tmp_path / "queue.log")
    queue = q.OfflineQueue(path)
    seqs = [queue.append("temp", i, ts_ms=1_700_000_000_000 + i) for i in range(5)]
    assert seqs == [1, 2, 3, 4, 5]
    msg_id, readings = queue.seal(no_resolve, max_readings=3)
    assert readings == [["temp", 1_700_000_000_000 + i, i] for i in range(3)]
    queue.close()
    reopened = q.OfflineQueue(path)
    assert reopened.pending_readings == 5
    assert reopened.sealed_ids() == [msg_id]
    # The sealed batch is the same batch after a reboot: same id, same readings.
    assert reopened.batch(msg_id, no_resolve) == readings
    assert reopened.ack(msg_id) is True
    assert reopened.ack(msg_id) is False
    second_id, rest = reopened.seal(no_resolve)
    assert second_id > msg_id
    assert [r[2] for r in rest] == [3, 4]
    assert reopened.append("temp", 99, ts_ms=5) == 6  # seqs continue past the reboot
    reopened.close()


def test_msg_ids_never_repeat_across_reboots(tmp_path):
    path = str(tmp_path / "queue.log")
    seen = set()
    for _ in range(5):
        queue = q.OfflineQueue(path)
        for _ in range(q.MSG_ID_BLOCK + 3):
            msg_id = queue.allocate_msg_id()
            assert msg_id not in seen
            seen.add(msg_id)
        queue.close()


def test_relative_timestamps_are_resolved_per_boot(tmp_path):
    path = str(tmp_path / "queue.log")
    queue = q.OfflineQueue(path)
    queue.append("t", 1, monotonic_ms=500)
    queue.close()
    queue = q.OfflineQueue(path)
    queue.append("t", 2, monotonic_ms=700)
    calls = []

    def resolve(monotonic_ms, this_boot):
        calls.append((monotonic_ms, this_boot))
        return 42

    _, readings = queue.seal(resolve)
    assert calls == [(500, False), (700, True)]
    assert readings == [["t", 42, 1], ["t", 42, 2]]


def test_torn_tail_at_every_byte_is_ignored(tmp_path):
    path = str(tmp_path / "queue.log")
    queue = q.OfflineQueue(path, durable=False)
    for i in range(3):
        queue.append("temp", i, ts_ms=10 + i)
    size_before_last = queue.file_bytes
    queue.append("temp", "last one", ts_ms=99)
    queue.close()
    whole = open(path, "rb").read()
    for cut in range(size_before_last, len(whole)):
        with open(path, "wb") as handle:
            handle.write(whole[:cut])
        reopened = q.OfflineQueue(path, durable=False)
        assert reopened.recovered_tail == (cut != size_before_last)
        assert values(drain(reopened)) == [0, 1, 2]
        reopened.close()
        # The rewrite left a clean file: a second open finds nothing torn.
        again = q.OfflineQueue(path, durable=False)
        assert not again.recovered_tail
        again.close()


def test_corrupt_crc_in_the_tail_is_cut_off(tmp_path):
    path = str(tmp_path / "queue.log")
    queue = q.OfflineQueue(path)
    queue.append("a", 1, ts_ms=1)
    queue.append("a", 2, ts_ms=2)
    queue.close()
    data = bytearray(open(path, "rb").read())
    data[-1] ^= 0x40
    open(path, "wb").write(bytes(data))
    reopened = q.OfflineQueue(path)
    assert reopened.recovered_tail
    assert values(drain(reopened)) == [1]


def test_not_a_queue_file_is_refused(tmp_path):
    path = tmp_path / "queue.log"
    path.write_bytes(b"#!/bin/sh\necho important\n")
    with pytest.raises(q.QueueError):
        q.OfflineQueue(str(path))
    assert path.read_bytes() == b"#!/bin/sh\necho important\n"


def test_leftover_tmp_from_a_torn_compaction(tmp_path):
    path = str(tmp_path / "queue.log")
    queue = q.OfflineQueue(path)
    queue.append("a", 1, ts_ms=1)
    queue.close()
    with open(path + ".tmp", "wb") as handle:
        handle.write(b"SXQ\x01\x00\x00\x00\x00\x00")  # half-written
    reopened = q.OfflineQueue(path)
    assert values(drain(reopened)) == [1]
    assert not os.path.exists(path + ".tmp")
    reopened.close()
    # Torn between remove and rename: only the complete tmp is left; it is taken.
    os.rename(path, path + ".tmp")
    taken = q.OfflineQueue(path)
    assert taken.pending_readings == 1


def test_compaction_is_rare_and_keeps_everything_live(tmp_path):
    path = str(tmp_path / "queue.log")
    queue = q.OfflineQueue(path, max_bytes=32768, durable=False)
    sizes = []
    for i in range(2000):
        queue.append("temp", i, ts_ms=1_700_000_000_000 + i)
        if i % 10 == 9:
            msg_id, _ = queue.seal(no_resolve)
            queue.ack(msg_id)
        sizes.append(queue.file_bytes)
        assert queue.file_bytes <= queue.max_bytes
    assert queue.dropped == 0
    # Between compactions the file only grows: nothing is rewritten per message.
    shrinks = sum(1 for a, b in zip(sizes, sizes[1:]) if b < a)
    assert shrinks == queue.compactions
    # Each compaction waits for half the bound to fill: a handful for ~70 KB of appends.
    assert 1 <= queue.compactions <= 2000 * 40 // (32768 // 2)
    queue.close()
    assert q.OfflineQueue(path).pending_readings == 0


def test_bound_drops_the_oldest_and_counts(tmp_path):
    path = str(tmp_path / "queue.log")
    queue = q.OfflineQueue(path, max_bytes=4096, durable=False)
    for i in range(1000):
        queue.append("temp", i, ts_ms=1_700_000_000_000 + i)
        assert queue.file_bytes <= 4096
    kept = queue.pending_readings
    assert queue.dropped == 1000 - kept and kept > 50
    queue.close()
    reopened = q.OfflineQueue(path, max_bytes=4096)
    assert reopened.dropped == 1000 - kept
    assert values(drain(reopened)) == list(range(1000 - kept, 1000))


def test_bound_drops_a_sealed_batch_first(tmp_path):
    path = str(tmp_path / "queue.log")
    queue = q.OfflineQueue(path, max_bytes=4096, durable=False)
    for i in range(20):
        queue.append("temp", i, ts_ms=i)
    first_id, _ = queue.seal(no_resolve)
    for i in range(20, 400):
        queue.append("temp", i, ts_ms=i)
    assert first_id not in queue.sealed_ids()
    assert queue.ack(first_id) is False
    queue.close()
    assert first_id not in q.OfflineQueue(path, max_bytes=4096).sealed_ids()


def test_keep_latest_and_ttl_policies(tmp_path):
    path = str(tmp_path / "queue.log")
    policies = {"led": q.KEEP_LATEST, "vibration": q.drop_older_than(1000)}
    queue = q.OfflineQueue(path, policies=policies)
    queue.append("led", "off", ts_ms=1)
    queue.append("temp", 20, ts_ms=1)
    queue.append("vibration", 0.1, ts_ms=1000)
    queue.append("led", "on", ts_ms=2)
    queue.append("vibration", 0.2, ts_ms=2500)
    queue.append("temp", 21, ts_ms=3000)
    assert queue.pending_readings == 5
    queue.close()
    queue = q.OfflineQueue(path, policies=policies)  # policies hold after a reboot too
    assert queue.pending_readings == 5
    _, readings = queue.seal(no_resolve, wall_now_ms=3000)
    assert [(r[0], r[2]) for r in readings] == [("temp", 20), ("led", "on"), ("vibration", 0.2),
                                                ("temp", 21)]
    assert queue.dropped == 1


def test_unstorable_value_is_a_queue_error(tmp_path):
    queue = q.OfflineQueue(str(tmp_path / "queue.log"))
    with pytest.raises(q.QueueError):
        queue.append("temp", object(), ts_ms=1)
    with pytest.raises(q.QueueError):
        queue.append("temp", "x" * 5000, ts_ms=1)
    with pytest.raises(q.QueueError):
        queue.append("", 1, ts_ms=1)
    assert queue.append("temp", 1, ts_ms=1) == 1  # nothing was half-written


OPERATIONS = st.lists(st.one_of(
    st.tuples(st.just("append"), st.sampled_from(["a", "b"]), st.integers(-5, 10**6)),
    st.tuples(st.just("seal"), st.integers(1, 5)),
    st.tuples(st.just("ack_oldest")),
    st.tuples(st.just("reboot")),
    st.tuples(st.just("compact")),
), max_size=60)


@settings(max_examples=60)
@given(OPERATIONS, st.integers(0, 400))
def test_queue_matches_a_model_through_reboots_and_a_final_torn_write(tmp_path_factory, operations,
                                                                      tear):
    path = str(tmp_path_factory.mktemp("q") / "queue.log")
    queue = q.OfflineQueue(path, durable=False)
    model_unsealed, model_batches, used_ids = [], [], set()
    for operation in operations:
        if operation[0] == "append":
            queue.append(operation[1], operation[2], ts_ms=7)
            model_unsealed.append([operation[1], 7, operation[2]])
        elif operation[0] == "seal":
            sealed = queue.seal(no_resolve, max_readings=operation[1])
            if sealed is None:
                assert not model_unsealed
                continue
            msg_id, readings = sealed
            assert msg_id not in used_ids
            used_ids.add(msg_id)
            assert readings == model_unsealed[:operation[1]]
            model_batches.append((msg_id, readings))
            del model_unsealed[:operation[1]]
        elif operation[0] == "ack_oldest" and model_batches:
            assert queue.ack(model_batches.pop(0)[0])
        elif operation[0] == "reboot":
            queue.close()
            queue = q.OfflineQueue(path, durable=False)
        elif operation[0] == "compact":
            queue.compact()
        assert queue.sealed_ids() == [msg_id for msg_id, _ in model_batches]
        for msg_id, readings in model_batches:
            assert queue.batch(msg_id, no_resolve) == readings
    # Power fails in the middle of one more append: everything before it survives.
    queue.close()
    size = os.path.getsize(path)
    queue = q.OfflineQueue(path, durable=False)
    queue.append("a", "torn", ts_ms=7)
    queue.close()
    with open(path, "r+b") as handle:
        handle.truncate(size + tear % max(1, os.path.getsize(path) - size))
    queue = q.OfflineQueue(path, durable=False)
    assert queue.sealed_ids() == [msg_id for msg_id, _ in model_batches]
    assert values(drain(queue)) == [reading[2] for reading in model_unsealed]
