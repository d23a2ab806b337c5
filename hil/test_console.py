"""The harness's own parsers, property-tested: the console buffer (line ends normalised the same
whatever the reads' split, ``expect`` order and timeouts) and the relay's reading of a device
JWT's nonce (differential against PyJWT, and total on garbage)."""

from __future__ import annotations

import threading
import time

import jwt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hil.console import ConsoleBuffer, ExpectTimeout
from hil.relay import b64url, token_nonce

TEXT = st.text(alphabet=st.sampled_from(list("ab \t\r\n:=0")), max_size=200)


def feed_split(text: str, cuts: list) -> str:
    console = ConsoleBuffer("t")
    positions = sorted({min(len(text), cut) for cut in cuts})
    start = 0
    for position in positions + [len(text)]:
        console.feed(text[start:position])
        start = position
    return console.text


@settings(max_examples=200, deadline=None)
@given(TEXT, st.lists(st.integers(min_value=0, max_value=200), max_size=10))
def test_any_split_of_the_console_stream_reads_the_same(text, cuts):
    whole = ConsoleBuffer("t")
    whole.feed(text)
    assert feed_split(text, cuts) == whole.text
    assert "\r" not in whole.text
    # CR LF and lone CR became LF; a CR at the very end waits for what follows it.
    expected = text.replace("\r\n", "\n").replace("\r", "\n")
    if text.endswith("\r"):
        expected = expected[:-1]
    assert whole.text == expected


def test_expect_reads_in_order_and_reports_what_came_instead():
    console = ConsoleBuffer("board0")
    console.feed("booting\r\nconnected\nvalue=1\n")
    first = console.expect(r"connected")
    assert first.before == "booting\n"
    second = console.expect(r"value=(\d)")
    assert second.group(1) == "1" and second.before == "\n"
    with pytest.raises(ExpectTimeout) as missed:
        console.expect("connected", timeout=0.05)  # already consumed: not found again
    assert "board0: no match for 'connected'" in str(missed.value)


def test_expect_wakes_when_the_text_arrives():
    console = ConsoleBuffer("b")
    threading.Timer(0.1, console.feed, args=("late line\n",)).start()
    started = time.monotonic()
    assert console.expect("late", timeout=5).text == "late"
    assert time.monotonic() - started < 2


def test_marks_survive_trimming():
    console = ConsoleBuffer("b", max_chars=10)
    mark = console.mark()
    console.feed("0123456789abcdef")
    assert console.text == "6789abcdef"
    assert console.since(mark) == "6789abcdef"
    assert console.since(console.mark() - 3) == "def"


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=16, max_size=64), st.text(min_size=1, max_size=64),
       st.binary(min_size=32, max_size=64))
def test_token_nonce_reads_what_pyjwt_wrote(nonce, device_id, secret):
    token = jwt.encode({"sub": device_id, "aud": "hub_x", "iat": 1, "exp": 301,
                        "nonce": b64url(nonce)}, secret, algorithm="HS256",
                       headers={"typ": "sx-device+jwt"})
    assert token_nonce(token) == b64url(nonce)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_token_nonce_never_raises_on_garbage(text):
    result = token_nonce(text)
    assert result is None or isinstance(result, str)
