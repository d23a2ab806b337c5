"""At-rest crypto (smartx_hub/crypto.py): sealing format, tamper detection, key wrapping, key files."""

from __future__ import annotations

import os
import stat
import struct

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given
from hypothesis import strategies as st

from smartx_hub import crypto
from smartx_hub.crypto import (
    CryptoError,
    KeyFileError,
    Keyring,
    SealError,
    WrappedKey,
    build_aad,
    generate_master_key,
    load_master_key,
    unwrap_data_key,
    wrap_data_key,
    write_master_key,
)
from smartx_hub.store import StoreError


def make_keyring(master: bytes | None = None) -> tuple[Keyring, list[WrappedKey]]:
    ring = Keyring(master or generate_master_key())
    rows = [ring.create(i + 1, purpose) for i, purpose in enumerate(crypto.PURPOSES)]
    return ring, rows


RING, ROWS = make_keyring()


@given(st.binary(max_size=2048), st.binary(max_size=256))
def test_seal_open_round_trip(plaintext, aad):
    blob = RING.seal("telemetry", plaintext, aad)
    assert RING.open("telemetry", blob, aad) == plaintext
    assert len(blob) == crypto.HEADER_SIZE + crypto.NONCE_SIZE + len(plaintext) + crypto.TAG_SIZE


@given(st.binary(max_size=512), st.binary(max_size=64))
def test_blob_layout_matches_the_documented_format(plaintext, aad):
    """Differential: open the blob with AESGCM directly from the documented layout."""
    blob = RING.seal("commands", plaintext, aad)
    version, key_id = struct.unpack(">BI", blob[:5])
    assert version == crypto.SEAL_VERSION
    assert key_id == crypto.PURPOSES.index("commands") + 1
    nonce, body = blob[5:17], blob[17:]
    full_aad = bytes([version]) + key_id.to_bytes(4, "big") + b"commands" + b"\x00" + aad
    assert AESGCM(RING.data_key("commands")).decrypt(nonce, body, full_aad) == plaintext


def test_nonces_are_fresh():
    blobs = {RING.seal("state", b"same", b"aad") for _ in range(200)}
    assert len(blobs) == 200
    assert len({blob[5:17] for blob in blobs}) == 200


@given(st.lists(st.tuples(st.binary(max_size=64), st.binary(max_size=64)), max_size=20))
def test_seal_many_makes_documented_blobs_with_their_own_nonces(items):
    """Differential: every blob of ``seal_many`` opens with AESGCM from the documented layout
    under its own aad (and with ``open``), and no two share a nonce."""
    blobs = RING.seal_many("telemetry", items)
    assert len(blobs) == len(items)
    key_id = crypto.PURPOSES.index("telemetry") + 1
    aead = AESGCM(RING.data_key("telemetry"))
    for (plaintext, aad), blob in zip(items, blobs):
        assert blob[:5] == struct.pack(">BI", crypto.SEAL_VERSION, key_id)
        full_aad = blob[:5] + b"telemetry\x00" + aad
        assert aead.decrypt(blob[5:17], blob[17:], full_aad) == plaintext
        assert RING.open("telemetry", blob, aad) == plaintext
        with pytest.raises(SealError):
            RING.open("telemetry", blob, aad + b"x")  # still bound to its own record
    assert len({blob[5:17] for blob in blobs}) == len(blobs)


def test_seal_many_nonces_are_fresh_across_calls():
    blobs = [blob for _ in range(50) for blob in RING.seal_many("telemetry", [(b"v", b"a")] * 8)]
    assert len({blob[5:17] for blob in blobs}) == 400
    with pytest.raises(CryptoError):
        RING.seal_many("nonsense", [(b"v", b"a")])


@given(st.binary(min_size=1, max_size=64), st.data())
def test_any_flipped_bit_is_refused(plaintext, data):
    blob = bytearray(RING.seal("secrets", plaintext, b"devices|dev_x|secret"))
    index = data.draw(st.integers(0, len(blob) - 1))
    bit = data.draw(st.integers(0, 7))
    blob[index] ^= 1 << bit
    with pytest.raises(SealError):
        RING.open("secrets", bytes(blob), b"devices|dev_x|secret")


@given(st.binary(max_size=200))
def test_garbage_is_refused_with_seal_error(garbage):
    with pytest.raises(SealError):
        RING.open("telemetry", garbage, b"")


def test_wrong_aad_purpose_and_type_are_refused():
    blob = RING.seal("telemetry", b"21.5", b"readings|dev_a|1|0|value")
    with pytest.raises(SealError):
        RING.open("telemetry", blob, b"readings|dev_b|1|0|value")
    with pytest.raises(SealError):
        RING.open("secrets", blob, b"readings|dev_a|1|0|value")
    with pytest.raises(SealError):
        RING.open("telemetry", blob[:-1], b"readings|dev_a|1|0|value")
    with pytest.raises(SealError):
        RING.open("telemetry", "not bytes", b"")  # type: ignore[arg-type]
    assert isinstance(SealError("x"), StoreError)  # store callers catch it as a store failure


def test_unknown_purpose_cannot_seal():
    with pytest.raises(CryptoError):
        RING.seal("nope", b"x", b"")


_PARTS = st.text(alphabet=st.sampled_from("ab|%7C"), max_size=6)


@given(st.integers(1, 4).flatmap(lambda n: st.tuples(
    st.lists(_PARTS, min_size=n, max_size=n), st.lists(_PARTS, min_size=n, max_size=n))))
def test_build_aad_is_one_to_one_for_a_fixed_arity(pair):
    """The store always binds a fixed number of parts; with separators and escapes in the
    parts, two different records still never share additional data."""
    a, b = pair
    assert (build_aad(*a) == build_aad(*b)) == (a == b)


def test_build_aad_escapes_separators():
    assert build_aad("readings", "a|b", 1) != build_aad("readings", "a", "b", 1)
    assert build_aad("t", 7, "value") == b"t|7|value"


def test_wrapped_key_is_bound_to_master_id_and_purpose():
    master = generate_master_key()
    key = os.urandom(32)
    wrapped = wrap_data_key(master, 3, "telemetry", key)
    assert unwrap_data_key(master, 3, "telemetry", wrapped) == key
    for args in ((generate_master_key(), 3, "telemetry"), (master, 4, "telemetry"),
                 (master, 3, "secrets")):
        with pytest.raises(SealError):
            unwrap_data_key(args[0], args[1], args[2], wrapped)
    with pytest.raises(SealError):
        unwrap_data_key(master, 3, "telemetry", wrapped[:-1])


def test_rewrap_moves_keys_to_the_new_master_and_the_old_one_stops_working():
    old = generate_master_key()
    ring, rows = make_keyring(old)
    blob = ring.seal("telemetry", b"reading", b"aad")
    new = generate_master_key()
    rewrapped = [ring.rewrap(row, new) for row in rows]
    fresh = Keyring(new)
    fresh.load(rewrapped)
    assert fresh.open("telemetry", blob, b"aad") == b"reading"
    with pytest.raises(SealError):
        Keyring(old).load(rewrapped)
    with pytest.raises(SealError):
        ring.rewrap(rewrapped[0], new)  # the ring still has the old master: refuses foreign rows


def test_newest_key_of_a_purpose_seals_and_older_ones_still_open():
    ring, _ = make_keyring()
    old_blob = ring.seal("telemetry", b"old", b"a")
    ring.create(100, "telemetry")
    new_blob = ring.seal("telemetry", b"new", b"a")
    assert struct.unpack(">I", new_blob[1:5])[0] == 100
    assert ring.open("telemetry", old_blob, b"a") == b"old"
    assert ring.open("telemetry", new_blob, b"a") == b"new"
    with pytest.raises(CryptoError):
        ring.create(100, "state")  # ids are unique across purposes


def test_master_key_file_round_trip_and_mode(tmp_path):
    path = str(tmp_path / "master.key")
    key = generate_master_key()
    write_master_key(path, key)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert load_master_key(path) == key
    assert os.listdir(tmp_path) == ["master.key"]  # no temp file left behind
    other = generate_master_key()
    write_master_key(path, other)  # atomic replace
    assert load_master_key(path) == other


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660])
def test_master_key_readable_by_others_is_refused(tmp_path, mode):
    path = str(tmp_path / "master.key")
    write_master_key(path, generate_master_key())
    os.chmod(path, mode)
    with pytest.raises(KeyFileError, match="chmod 600"):
        load_master_key(path)


def test_bad_master_key_files_are_refused(tmp_path):
    missing = str(tmp_path / "missing.key")
    with pytest.raises(KeyFileError, match="missing"):
        load_master_key(missing)
    short = tmp_path / "short.key"
    short.write_bytes(b"x" * 31)
    os.chmod(short, 0o600)
    with pytest.raises(KeyFileError, match="32-byte"):
        load_master_key(str(short))
    long = tmp_path / "long.key"
    long.write_bytes(b"x" * 33)
    os.chmod(long, 0o600)
    with pytest.raises(KeyFileError):
        load_master_key(str(long))
    real = tmp_path / "real.key"
    write_master_key(str(real), generate_master_key())
    link = tmp_path / "link.key"
    link.symlink_to(real)
    with pytest.raises(KeyFileError):
        load_master_key(str(link))
    with pytest.raises(KeyFileError):
        write_master_key(str(tmp_path / "x.key"), b"short")


def test_master_key_id_is_stable_and_distinct():
    a, b = generate_master_key(), generate_master_key()
    assert crypto.master_key_id(a) == crypto.master_key_id(a)
    assert crypto.master_key_id(a) != crypto.master_key_id(b)
    assert a.hex() not in crypto.master_key_id(a)
