"""The offline queue: readings kept on flash until the hub acknowledges them, across reboots.

One append-only file (docs/device-sdk.md, "Offline queue: on-flash format"):

    header   b"SXQ\\x01" + 4 zero bytes                                  (8 bytes)
    record   u16 body length (big-endian) | u32 CRC-32 of body | body    (6 + n bytes)
    body     one CBOR array, its first item the record kind:
      [1, seq, stream, ts_ms, value]          READING, timestamp in Unix ms
      [2, seq, stream, monotonic_ms, value]   READING_RELATIVE, time unknown when published
      [3, msg_id, first_seq, [gaps...]]       BATCH: these readings went out under msg_id
      [4, msg_id]                             ACK: the hub committed msg_id
      [5, why, first_seq, [gaps...]]          DROP: readings discarded (1 bound, 2 ttl)
      [6, msg_id]                             DROP_BATCH: a sealed batch discarded (bound)
      [7, reserved_msg_id, next_seq, dropped] META: ids below reserved_msg_id may be in use

Invariants:
- Nothing is rewritten in place. A reading costs one append; an ack one small append. The file
  is rewritten (into ``path + ".tmp"``, flushed, fsynced, renamed over) only when the dead
  fraction passes ``compact_ratio``, when a torn tail was found, or when an append would pass
  ``max_bytes``: flash wears by erase cycles, so compaction is rare and bulk.
- A msg_id, once written in a BATCH, always names the same readings: a batch re-sent after a
  reconnect or a reboot is the same batch, so the hub's "repeat id: ack again, store once"
  gives each reading exactly once. msg_ids never repeat: META reserves them in blocks before
  use, and a reboot starts past the reservation.
- Power loss: a record is valid only if its length fits and its CRC matches; the scan stops at
  the first invalid record and the file is rewritten without it (a torn tail loses at most the
  record being written). A compaction torn before its rename leaves the old file in charge.
- Bounded: the live records never pass ``live_limit`` (three quarters of ``max_bytes``, the rest
  is room for appends between compactions); to make room the oldest live data is dropped
  (a sealed batch first, then the oldest reading) and counted in ``dropped``.
- Per-stream policy: keep all (default), keep the latest only (a new reading supersedes the
  unsent ones of its stream), drop older than a TTL (checked when batches are sealed).
MicroPython subset: imports ``os``, ``struct``, ``binascii`` and the core's CBOR codec.
"""

import binascii
import os
import struct

from smartx_device import cbor
from smartx_device.errors import ProtocolError

MAGIC = b"SXQ\x01"
HEADER = MAGIC + b"\x00\x00\x00\x00"
HEADER_SIZE = 8
RECORD_HEAD_SIZE = 6  # u16 length + u32 CRC-32
MAX_RECORD_BYTES = 4096  # one body; a reading's value must fit
DEFAULT_MAX_BYTES = 65536
MIN_MAX_BYTES = 2048
DEFAULT_COMPACT_RATIO = 0.5
COMPACT_MIN_BYTES = 4096  # never compact a file smaller than this just for its dead fraction
MSG_ID_BLOCK = 64  # msg_ids reserved per META record

READING = 1
READING_RELATIVE = 2
BATCH = 3
ACK = 4
DROP = 5
DROP_BATCH = 6
META = 7

DROP_BOUND = 1
DROP_TTL = 2

# Entry fields (a small list per live reading, kept in RAM; values stay on flash).
_SEQ = 0
_OFFSET = 1
_SIZE = 2
_STREAM = 3
_TIME = 4
_RELATIVE = 5

_crc32 = getattr(binascii, "crc32", None)
if _crc32 is None:  # a MicroPython port built without binascii.crc32

    def _crc32(data):
        crc = 0xFFFFFFFF
        for byte in data:
            crc ^= byte
            for _ in range(8):
                crc = (crc >> 1) ^ (0xEDB88320 & -(crc & 1))
        return crc ^ 0xFFFFFFFF


class QueueError(Exception):
    """The queue file cannot be used (not a queue file, or a value that cannot be stored)."""


class StreamPolicy:
    """What the queue keeps of one stream while offline: ``keep`` "all" or "latest", and an
    optional ``ttl_ms`` after which unsent readings are dropped."""

    def __init__(self, keep="all", ttl_ms=None):
        if keep not in ("all", "latest"):
            raise ValueError("keep must be 'all' or 'latest'")
        if ttl_ms is not None and ttl_ms <= 0:
            raise ValueError("ttl_ms must be positive")
        self.keep = keep
        self.ttl_ms = ttl_ms

    def __repr__(self):
        return "StreamPolicy(keep=%r, ttl_ms=%r)" % (self.keep, self.ttl_ms)


KEEP_ALL = StreamPolicy("all")
KEEP_LATEST = StreamPolicy("latest")


def drop_older_than(ttl_ms):
    """Return the policy that keeps every reading of a stream for at most ``ttl_ms``."""
    return StreamPolicy("all", ttl_ms)


def _encode_gaps(seqs):
    """[first, [gap...]] for ascending seqs: gaps are usually 1, one CBOR byte each."""
    gaps = []
    for i in range(1, len(seqs)):
        gaps.append(seqs[i] - seqs[i - 1])
    return seqs[0], gaps


def _decode_gaps(first, gaps):
    seqs = [first]
    for gap in gaps:
        seqs.append(seqs[-1] + gap)
    return seqs


def _is_uint(value):
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class OfflineQueue:
    """The append-only, bounded, reboot-proof queue of readings (see the module rules)."""

    def __init__(self, path, max_bytes=DEFAULT_MAX_BYTES, policies=None, default_policy=KEEP_ALL,
                 compact_ratio=DEFAULT_COMPACT_RATIO, durable=True, monotonic_now=0):
        if max_bytes < MIN_MAX_BYTES:
            raise ValueError("max_bytes must be at least %d" % MIN_MAX_BYTES)
        self.path = path
        self.max_bytes = max_bytes
        self.live_limit = max_bytes * 3 // 4
        self.policies = dict(policies or {})
        self.default_policy = default_policy
        self.compact_ratio = compact_ratio
        self.durable = durable
        self.dropped = 0  # readings discarded by policy or bound, over the file's life
        self.compactions = 0
        self.recovered_tail = False  # a torn or corrupt tail was cut off when opening
        self.opened_monotonic = monotonic_now  # when this boot opened the queue
        self._file = None
        self._reset_state()
        self._open()

    # -- state ------------------------------------------------------------------------------

    def _reset_state(self):
        self._unsealed = []  # entries, oldest first
        self._batches = []  # [msg_id, entries, record_size], oldest first
        self._live_bytes = 0
        self._meta_size = 0
        self._file_bytes = HEADER_SIZE
        self._next_seq = 1
        self._next_msg_id = 1
        self._reserved_msg_id = 1

    def policy(self, stream):
        """The policy in force for ``stream``."""
        return self.policies.get(stream, self.default_policy)

    @property
    def pending_readings(self):
        """Readings not yet acknowledged (sealed or not)."""
        count = len(self._unsealed)
        for batch in self._batches:
            count += len(batch[1])
        return count

    @property
    def unsealed_count(self):
        """Readings not yet put in a batch."""
        return len(self._unsealed)

    @property
    def file_bytes(self):
        """The queue file's size in bytes."""
        return self._file_bytes

    @property
    def live_bytes(self):
        """Bytes of the records still needed (the rest is dead until the next compaction)."""
        return self._live_bytes + self._meta_size + HEADER_SIZE

    def sealed_ids(self):
        """msg_ids of the sealed, unacknowledged batches, oldest first."""
        return [batch[0] for batch in self._batches]

    # -- opening and replay -----------------------------------------------------------------

    def _open(self):
        tmp = self.path + ".tmp"
        if _exists(tmp):
            if _exists(self.path):
                os.remove(tmp)  # a compaction torn before its rename: the old file is whole
            else:
                os.rename(tmp, self.path)  # torn between remove and rename (MicroPython path)
        if not _exists(self.path) or os.stat(self.path)[6] == 0:
            self._write_fresh()
            return
        torn = self._replay()
        self._boot_first_seq = self._next_seq
        self._file = open(self.path, "r+b")
        if torn:
            self.recovered_tail = True
            self.compact()

    def _write_fresh(self):
        self._reset_state()
        self._boot_first_seq = self._next_seq
        self._reserved_msg_id = self._next_msg_id + MSG_ID_BLOCK
        handle = open(self.path, "wb")
        meta = _record(self._meta_body())
        handle.write(HEADER + meta)
        _sync(handle, self.durable)
        handle.close()
        self._meta_size = len(meta)
        self._file_bytes = HEADER_SIZE + len(meta)
        self._file = open(self.path, "r+b")

    def _replay(self):
        """Rebuild the RAM index from the file; return True if the tail was torn or corrupt."""
        handle = open(self.path, "rb")
        try:
            header = handle.read(HEADER_SIZE)
            if len(header) < HEADER_SIZE or header[:4] != MAGIC:
                raise QueueError("%s is not a SmartX queue file" % self.path)
            offset = HEADER_SIZE
            while True:
                head = handle.read(RECORD_HEAD_SIZE)
                if not head:
                    return False
                if len(head) < RECORD_HEAD_SIZE:
                    return True
                length, crc = struct.unpack(">HI", head)
                if length == 0 or length > MAX_RECORD_BYTES:
                    return True
                body = handle.read(length)
                if len(body) < length or _crc32(body) & 0xFFFFFFFF != crc:
                    return True
                size = RECORD_HEAD_SIZE + length
                try:
                    self._apply(cbor.loads(body), offset, size)
                except (ProtocolError, TypeError, ValueError, IndexError, KeyError):
                    # A record with a good CRC but a shape we do not know: stop as if torn.
                    return True
                offset += size
                self._file_bytes = offset
        finally:
            handle.close()

    def _apply(self, record, offset, size):
        kind = record[0]
        if kind == READING or kind == READING_RELATIVE:
            seq, stream, when = record[1], record[2], record[3]
            if not _is_uint(seq) or not isinstance(stream, str) or not _is_uint(when):
                raise ValueError("bad reading record")
            self._add_reading([seq, offset, size, stream, when, kind == READING_RELATIVE])
            if seq >= self._next_seq:
                self._next_seq = seq + 1
        elif kind == BATCH:
            msg_id, seqs = record[1], _decode_gaps(record[2], record[3])
            by_seq = {}
            for entry in self._unsealed:
                by_seq[entry[_SEQ]] = entry
            entries = [by_seq[seq] for seq in seqs if seq in by_seq]
            if entries:  # none left (a policy changed across a reboot): nothing to re-send
                self._remove_unsealed(entries)
                for entry in entries:
                    self._live_bytes += entry[_SIZE]
                self._batches.append([msg_id, entries, size])
                self._live_bytes += size
            if msg_id >= self._next_msg_id:
                self._next_msg_id = msg_id + 1
        elif kind == ACK or kind == DROP_BATCH:
            batch = self._take_batch(record[1])
            if batch is not None and kind == DROP_BATCH:
                self.dropped += len(batch[1])
        elif kind == DROP:
            seqs = _decode_gaps(record[2], record[3])
            wanted = {}
            for seq in seqs:
                wanted[seq] = True
            entries = [entry for entry in self._unsealed if entry[_SEQ] in wanted]
            self._remove_unsealed(entries)
            self.dropped += len(entries)
        elif kind == META:
            reserved, next_seq, dropped = record[1], record[2], record[3]
            if reserved > self._reserved_msg_id:
                self._reserved_msg_id = reserved
            if reserved > self._next_msg_id:
                self._next_msg_id = reserved  # ids below may have gone out before a reboot
            if next_seq > self._next_seq:
                self._next_seq = next_seq
            self.dropped = dropped
            self._meta_size = size
        else:
            raise ValueError("unknown record kind %r" % (kind,))

    # -- RAM index helpers ------------------------------------------------------------------

    def _add_reading(self, entry):
        if self.policy(entry[_STREAM]).keep == "latest":
            # Superseded, unsent readings of the stream are dead (sealed ones are in flight).
            self._remove_unsealed([old for old in self._unsealed if old[_STREAM] == entry[_STREAM]])
        self._unsealed.append(entry)
        self._live_bytes += entry[_SIZE]

    def _remove_unsealed(self, entries):
        if not entries:
            return
        gone = {}
        for entry in entries:
            gone[entry[_SEQ]] = True
            self._live_bytes -= entry[_SIZE]
        self._unsealed = [entry for entry in self._unsealed if entry[_SEQ] not in gone]

    def _take_batch(self, msg_id):
        for index in range(len(self._batches)):
            batch = self._batches[index]
            if batch[0] == msg_id:
                del self._batches[index]
                self._live_bytes -= batch[2]
                for entry in batch[1]:
                    self._live_bytes -= entry[_SIZE]
                return batch
        return None

    def _meta_body(self):
        return [META, self._reserved_msg_id, self._next_seq, self.dropped]

    # -- writing ----------------------------------------------------------------------------

    def _append(self, records):
        """Append encoded records at the end of the file; return the offset of the first."""
        handle = self._file
        handle.seek(self._file_bytes)
        offset = self._file_bytes
        data = b"".join(records)
        handle.write(data)
        _sync(handle, self.durable)
        self._file_bytes += len(data)
        return offset

    def _write(self, record):
        """Make room for ``record`` under the bound, then append it (after any DROP records
        that making room needed). Returns the record's offset."""
        pending = self._make_room(len(record))
        if self._file_bytes + _total(pending) + len(record) > self.max_bytes:
            # Compaction writes the state as it now is: the drops need no records of their own.
            self.compact()
            pending = []
        offset = self._append(pending + [record])
        return offset + _total(pending)

    def _persist(self, record):
        """Append ``record``, whose change the RAM index already holds; if it would pass the
        bound, compact instead: the rewritten file holds that change too."""
        if self._file_bytes + len(record) > self.max_bytes:
            self.compact()
        else:
            self._append([record])

    def _make_room(self, size):
        """Drop the oldest live data until ``size`` more bytes fit under ``live_limit``;
        return the DROP records to write."""
        records = []
        while self.live_bytes + size > self.live_limit:
            if self._batches:
                batch = self._take_batch(self._batches[0][0])
                self.dropped += len(batch[1])
                records.append(_record([DROP_BATCH, batch[0]]))
            elif self._unsealed:
                entry = self._unsealed[0]
                self._remove_unsealed([entry])
                self.dropped += 1
                records.append(_record([DROP, DROP_BOUND, entry[_SEQ], []]))
            else:
                raise QueueError("a record of %d bytes cannot fit in a queue of %d bytes"
                                 % (size, self.max_bytes))
        return records

    def append(self, stream, value, ts_ms=None, monotonic_ms=None):
        """Store one reading; return its sequence number. ``ts_ms`` is Unix ms; when it is
        None the reading is stamped with ``monotonic_ms`` and resolved when sent."""
        if not isinstance(stream, str) or not stream:
            raise QueueError("a stream name is non-empty text")
        relative = ts_ms is None
        when = monotonic_ms if relative else ts_ms
        if not _is_uint(when):
            raise QueueError("a reading needs ts_ms or monotonic_ms (unsigned ms)")
        seq = self._next_seq
        body = [READING_RELATIVE if relative else READING, seq, stream, when, value]
        try:
            record = _record(body)
        except ProtocolError as error:
            raise QueueError("cannot store this value: %s" % error)
        self._next_seq += 1
        offset = self._write(record)
        self._add_reading([seq, offset, len(record), stream, when, relative])
        self._maybe_compact()
        return seq

    def allocate_msg_id(self):
        """Return a msg_id that was never used, persisting the reservation first if needed."""
        msg_id = self._next_msg_id
        if msg_id >= self._reserved_msg_id:
            self._reserved_msg_id = msg_id + MSG_ID_BLOCK
            meta = _record(self._meta_body())
            self._meta_size = len(meta)  # the previous META is dead from now on
            self._persist(meta)
        self._next_msg_id = msg_id + 1
        return msg_id

    # -- sealing, reading back, acknowledging -----------------------------------------------

    def expire(self, wall_now_ms, monotonic_now):
        """Drop the unsent readings past their stream's TTL; return how many."""
        expired = []
        for entry in self._unsealed:
            ttl = self.policy(entry[_STREAM]).ttl_ms
            if ttl is None:
                continue
            if entry[_RELATIVE]:
                if entry[_SEQ] < self._boot_first_seq:
                    expired.append(entry)  # its age is unknowable: at least one reboot old
                elif monotonic_now - entry[_TIME] > ttl:
                    expired.append(entry)
            elif wall_now_ms is not None and wall_now_ms - entry[_TIME] > ttl:
                expired.append(entry)
        if expired:
            self._remove_unsealed(expired)
            self.dropped += len(expired)
            first, gaps = _encode_gaps([entry[_SEQ] for entry in expired])
            self._write(_record([DROP, DROP_TTL, first, gaps]))
        return len(expired)

    def seal(self, resolve_time, max_readings=256, max_bytes=8192, wall_now_ms=None,
             monotonic_now=0):
        """Put the oldest unsent readings into a new batch; return ``(msg_id, readings)`` or
        None if nothing waits. ``resolve_time(monotonic_ms, this_boot)`` turns a relative
        stamp into Unix ms (``this_boot`` False: written before the queue was last opened)."""
        self.expire(wall_now_ms, monotonic_now)
        chosen = []
        size = 0
        for entry in self._unsealed:
            if len(chosen) >= max_readings or (chosen and size + entry[_SIZE] > max_bytes):
                break
            chosen.append(entry)
            size += entry[_SIZE]
        if not chosen:
            return None
        msg_id = self.allocate_msg_id()
        first, gaps = _encode_gaps([entry[_SEQ] for entry in chosen])
        record = _record([BATCH, msg_id, first, gaps])
        self._remove_unsealed(chosen)
        for entry in chosen:
            self._live_bytes += entry[_SIZE]
        batch = [msg_id, chosen, len(record)]
        self._batches.append(batch)
        self._live_bytes += len(record)
        self._persist(record)
        return msg_id, self._read_entries(chosen, resolve_time)

    def batch(self, msg_id, resolve_time):
        """Return the readings of the sealed batch ``msg_id`` (to re-send it), or None."""
        for batch in self._batches:
            if batch[0] == msg_id:
                return self._read_entries(batch[1], resolve_time)
        return None

    def ack(self, msg_id):
        """Record that the hub committed ``msg_id``; return False if no batch has that id."""
        if self._take_batch(msg_id) is None:
            return False
        self._persist(_record([ACK, msg_id]))
        self._maybe_compact()
        return True

    def _read_entries(self, entries, resolve_time):
        readings = []
        for entry in entries:
            body = self._read_record(entry[_OFFSET], entry[_SIZE])
            when = body[3]
            if entry[_RELATIVE]:
                when = resolve_time(when, entry[_SEQ] >= self._boot_first_seq)
                if when is None:
                    when = 0  # no clock anywhere: documented as "time unknown"
            readings.append([body[2], when, body[4]])
        return readings

    def _read_record(self, offset, size):
        handle = self._file
        handle.seek(offset)
        data = handle.read(size)
        length, crc = struct.unpack(">HI", data[:RECORD_HEAD_SIZE])
        body = data[RECORD_HEAD_SIZE:]
        if len(body) != length or _crc32(body) & 0xFFFFFFFF != crc:
            raise QueueError("the queue file changed under us at offset %d" % offset)
        return cbor.loads(body)

    # -- compaction -------------------------------------------------------------------------

    def _maybe_compact(self):
        dead = self._file_bytes - self.live_bytes
        # Rewriting is worth an erase cycle only once the file has used half its room.
        floor = max(COMPACT_MIN_BYTES, self.max_bytes // 2)
        if self._file_bytes >= floor and dead > self._file_bytes * self.compact_ratio:
            self.compact()

    def compact(self):
        """Rewrite the live records into a fresh file and rename it over the old one."""
        tmp = self.path + ".tmp"
        out = open(tmp, "wb")
        meta = _record(self._meta_body())
        out.write(HEADER + meta)
        offset = HEADER_SIZE + len(meta)
        moves = []
        # Each batch's readings, then its BATCH record, then the unsent readings: replaying
        # in this order rebuilds exactly this state (keep-latest never sees a sealed reading).
        for batch in self._batches:
            for entry in batch[1]:
                moves.append((entry, offset))
                out.write(self._raw(entry))
                offset += entry[_SIZE]
            first, gaps = _encode_gaps([entry[_SEQ] for entry in batch[1]])
            record = _record([BATCH, batch[0], first, gaps])
            out.write(record)
            batch[2] = len(record)
            offset += len(record)
        for entry in self._unsealed:
            moves.append((entry, offset))
            out.write(self._raw(entry))
            offset += entry[_SIZE]
        _sync(out, self.durable)
        out.close()
        self._file.close()
        _replace(tmp, self.path)
        for entry, new_offset in moves:
            entry[_OFFSET] = new_offset
        self._file = open(self.path, "r+b")
        self._file_bytes = offset
        self._meta_size = len(meta)
        self._live_bytes = 0
        for batch in self._batches:
            self._live_bytes += batch[2]
            for entry in batch[1]:
                self._live_bytes += entry[_SIZE]
        for entry in self._unsealed:
            self._live_bytes += entry[_SIZE]
        self.compactions += 1

    def _raw(self, entry):
        self._file.seek(entry[_OFFSET])
        return self._file.read(entry[_SIZE])

    def close(self):
        """Close the file (everything is already on flash)."""
        if self._file is not None:
            self._file.close()
            self._file = None


def _record(body):
    payload = cbor.dumps(body)
    if len(payload) > MAX_RECORD_BYTES:
        raise QueueError("a queue record is %d bytes, the limit is %d"
                         % (len(payload), MAX_RECORD_BYTES))
    return struct.pack(">HI", len(payload), _crc32(payload) & 0xFFFFFFFF) + payload


def _total(records):
    size = 0
    for item in records:
        size += len(item)
    return size


def _exists(path):
    try:
        os.stat(path)
        return True
    except OSError:
        return False


def _sync(handle, durable):
    handle.flush()
    if durable:
        fsync = getattr(os, "fsync", None)
        if fsync is not None:  # CPython; on MicroPython flush() reaches the flash
            fsync(handle.fileno())


def _replace(source, target):
    """Rename ``source`` over ``target``: atomically where the OS can (CPython ``os.replace``);
    on MicroPython filesystems that refuse to rename onto a file, remove then rename (a power
    cut between the two leaves only ``source``, which ``_open`` then takes)."""
    replace = getattr(os, "replace", None)
    if replace is not None:
        replace(source, target)
        directory = os.path.dirname(target) or "."
        try:
            fd = os.open(directory, os.O_RDONLY)
        except (OSError, AttributeError):
            return
        try:
            os.fsync(fd)  # the rename itself must reach the disk
        finally:
            os.close(fd)
        return
    try:
        os.rename(source, target)
    except OSError:
        os.remove(target)
        os.rename(source, target)
