"""Wire messages: vectors, round trips, and a differential check against cbor2."""

from __future__ import annotations

import json
import pathlib

import cbor2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from smartx_device import messages as m
from smartx_device.errors import LocalProtocolError, RemoteProtocolError

VECTORS = json.loads((pathlib.Path(__file__).parent / "vectors" / "messages.json").read_text())


def test_vector_file_is_what_the_generator_writes():
    import importlib.util

    path = pathlib.Path(__file__).parent / "vectors" / "gen_messages.py"
    spec = importlib.util.spec_from_file_location("gen_messages", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert json.loads(module.render()) == VECTORS


@pytest.mark.parametrize("vector", VECTORS["messages"], ids=lambda v: v["name"])
def test_message_vectors_decode_and_reencode(vector):
    data = bytes.fromhex(vector["hex"])
    message = m.decode_message(data)
    assert type(message).__name__ == vector["type"]
    assert m.message_to_map(message) == eval(vector["value"])  # noqa: S307 (our own literal)
    assert m.encode_message(message) == data


@pytest.mark.parametrize("vector", VECTORS["invalid"], ids=lambda v: v["name"])
def test_invalid_messages_raise_remote_protocol_error(vector):
    with pytest.raises(RemoteProtocolError) as caught:
        m.decode_message(bytes.fromhex(vector["hex"]))
    assert caught.value.reason != 0


def test_encoding_an_invalid_message_is_a_local_error():
    with pytest.raises(LocalProtocolError):
        m.encode_message(m.Ack(msg_id=-1))
    with pytest.raises(LocalProtocolError):
        m.encode_message(m.Telemetry(msg_id=1, readings=[]))
    with pytest.raises(LocalProtocolError):
        m.Ack(msg_id=1, bogus=2)


def test_unknown_keys_are_ignored_for_forward_compatibility():
    data = cbor2.dumps({0: 7, 1: 5, 99: "from a newer minor version"}, canonical=True)
    assert m.decode_message(data) == m.Ack(msg_id=5)


uints = st.integers(min_value=0, max_value=2**64 - 1)
names = st.text(min_size=1, max_size=m.MAX_NAME_LENGTH)
ids = st.text(min_size=1, max_size=m.MAX_ID_LENGTH)
scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**64), 2**64 - 1),
                    st.floats(allow_nan=False), st.text(max_size=20), st.binary(max_size=20))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=10)
readings = st.lists(st.tuples(names, uints, values), min_size=1, max_size=8)
states = st.dictionaries(names, values, max_size=5)

any_message = st.one_of(
    st.builds(m.Hello, version=uints, device_id=st.none() | ids,
              capabilities=st.none() | st.lists(names, max_size=4),
              max_frame_size=st.none() | uints, software=st.none() | names),
    st.builds(m.AuthChallenge, nonce=st.binary(min_size=16, max_size=64), hub_time_ms=uints, hub_id=ids),
    st.builds(m.AuthResponse, token=st.text(min_size=1, max_size=200)),
    st.builds(m.Accepted, session_id=ids, keepalive_ms=uints, hub_time_ms=uints,
              max_frame_size=st.none() | uints),
    st.builds(m.Close, reason=uints, detail=st.none() | st.text(max_size=50),
              retry_after_ms=st.none() | uints),
    st.builds(m.Telemetry, msg_id=uints, readings=readings),
    st.builds(m.Ack, msg_id=uints),
    st.builds(m.Command, command_id=ids, name=names, args=values, expires_ms=st.none() | uints),
    st.builds(m.CommandResult, command_id=ids, ok=st.booleans(), result=values,
              error=st.none() | st.text(max_size=50)),
    st.builds(m.Ping, seq=uints),
    st.builds(m.Pong, seq=uints),
    st.builds(m.DesiredState, version=uints, state=states),
    st.builds(m.ReportedState, msg_id=uints, state=states),
)


@given(any_message)
def test_every_message_round_trips(message):
    data = m.encode_message(message)
    assert m.decode_message(data) == message


@given(any_message)
def test_encoding_agrees_with_cbor2(message):
    data = m.encode_message(message)
    mapping = m.message_to_map(message)
    assert data == cbor2.dumps(mapping, canonical=True)
    assert cbor2.loads(data) == mapping


@given(any_message, st.data())
def test_mutated_messages_raise_only_remote_protocol_error(message, data):
    encoded = bytearray(m.encode_message(message))
    position = data.draw(st.integers(0, len(encoded) - 1))
    encoded[position] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(encoded)))
    try:
        decoded = m.decode_message(bytes(encoded[:cut]))
    except RemoteProtocolError:
        return
    assert isinstance(decoded, m.Message)
