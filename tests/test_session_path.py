"""The verified-session path of the device listener (smartx_hub/listener.py): one hand-off to a
worker thread per session, and pending work delivered exactly as before.

Verification and the look at the device's pending work (desired state, queued commands) share
that one trip to the verify pool. The look is taken before the session is registered and off
the writer thread, so the listener must catch what it cannot see: a command queued (and woken)
while the device verifies, a delivery by an older session of the device whose record is not
written yet, and a look that failed. Each test here makes one of those happen for real, with
the hub's own threads held at the right moment, on a real hub over loopback TLS.
"""

from __future__ import annotations

import threading
import time

import pytest

from smartx_device import messages as m
from smartx_device import session as core
from smartx_device.reasons import CLOSE_REPLACED
from smartx_hub.live import LiveSessions
from smartx_hub.server import run_hub_in_thread
from smartx_hub.store import StoreError

from hubtools import connect_device, enrol, make_hub, wait_until


@pytest.fixture
def hub(tmp_path):
    """A hub of its own (its counters start at zero): ``ctx, hub``."""
    ctx = make_hub(tmp_path)
    running = run_hub_in_thread(ctx, api=False)
    yield ctx, running
    running.stop()
    ctx.close()


def now_ms() -> int:
    return int(time.time() * 1000)


def is_command(event, command_id=None):
    return isinstance(event, core.MessageReceived) and isinstance(event.message, m.Command) \
        and (command_id is None or event.message.command_id == command_id)


def commands_in(device):
    return [e.message.command_id for e in device.events if is_command(e)]


def round_trip(device, msg_id):
    """A ReportedState and its Ack: the writer has run everything queued before it, and the
    loop has written whatever that released before the Ack."""
    device.send(m.ReportedState(msg_id=msg_id, state={"probe": msg_id}))
    device.wait_for(lambda e: isinstance(e, core.MessageReceived)
                    and isinstance(e.message, m.Ack) and e.message.msg_id == msg_id)


def record_calls(listener, name):
    """Wrap ``listener.<name>``; return the list of thread names it runs on."""
    real = getattr(listener, name)
    threads = []

    def wrapper(*args):
        threads.append(threading.current_thread().name)
        return real(*args)

    setattr(listener, name, wrapper)
    return threads


def hold_delivery_records(listener):
    """Make the writer wait before recording deliveries; return the Event that releases it."""
    release = threading.Event()
    real = listener.mark_delivered

    def held(*args):
        release.wait(10)
        return real(*args)

    listener.mark_delivered = held
    return release


# -- one hand-off ------------------------------------------------------------------------


@pytest.mark.parametrize("auth", ["es256", "hs256"])
def test_a_session_with_nothing_pending_takes_one_trip_to_a_worker(hub, auth):
    ctx, running = hub
    listener = running.listener
    creds = enrol(ctx.store, "one-trip-" + auth, auth)
    submitted = []
    real_submit = listener.verify_executor.submit

    def submit(fn, *args, **kwargs):
        submitted.append(getattr(fn, "__name__", repr(fn)))
        return real_submit(fn, *args, **kwargs)

    listener.verify_executor.submit = submit
    fetched_on = record_calls(listener, "fetch_pending")
    written = []
    real_write = listener.write

    def write(fn, *args):
        written.append(getattr(fn, "__name__", repr(fn)))
        return real_write(fn, *args)

    listener.write = write
    with connect_device(running.device_port, ctx.ca_cert_pem, creds) as device:
        assert running.live.is_online(creds.device_id)
        round_trip(device, 1)
        assert commands_in(device) == []
    # Verification and the look at pending work: one submission, on the verify pool.
    assert submitted.count("verify_session") == 1
    assert len(fetched_on) == 1 and fetched_on[0].startswith("smartx-verify")
    assert "fetch_pending" not in written  # no second trip (wake) to the writer


def test_work_queued_before_connecting_arrives_from_the_verification_trip(hub):
    ctx, running = hub
    creds = enrol(ctx.store, "queued", "es256")
    fetched_on = record_calls(running.listener, "fetch_pending")
    command = ctx.store.add_command(creds.device_id, "blink", {"times": 2}, 60_000, now_ms())
    ctx.store.set_desired_state(creds.device_id, {"led": "on"}, now_ms())
    with connect_device(running.device_port, ctx.ca_cert_pem, creds) as device:
        desired = device.wait_for(lambda e: isinstance(e, core.MessageReceived)
                                  and isinstance(e.message, m.DesiredState)).message
        assert (desired.version, desired.state) == (1, {"led": "on"})
        sent = device.wait_for(lambda e: is_command(e, command.id)).message
        assert (sent.name, sent.args) == ("blink", {"times": 2})
        round_trip(device, 1)
        assert commands_in(device) == []  # once
    assert len(fetched_on) == 1 and fetched_on[0].startswith("smartx-verify")
    wait_until(lambda: ctx.store.get_command(command.id).status == "delivered")


# -- what the early look cannot see ------------------------------------------------------


def test_a_command_woken_while_the_device_verifies_is_delivered(hub):
    """The API queues a command and wakes the device after the look and before the session is
    registered: the wake finds no session, so the session must look again."""
    ctx, running = hub
    listener = running.listener
    creds = enrol(ctx.store, "woken-meanwhile", "hs256")
    real_verify = listener.verify_session
    queued = {}

    def verify_then_queue(*args):
        result = real_verify(*args)  # verified, and nothing pending yet
        command = ctx.store.add_command(creds.device_id, "late", None, 60_000, now_ms())
        queued["id"] = command.id
        queued["woke_a_session"] = running.live.wake(creds.device_id)
        return result

    listener.verify_session = verify_then_queue
    with connect_device(running.device_port, ctx.ca_cert_pem, creds) as device:
        assert queued["woke_a_session"] is False  # the race happened: nobody was told
        device.wait_for(lambda e: is_command(e, queued["id"]))
        round_trip(device, 1)
        assert commands_in(device) == []
    wait_until(lambda: ctx.store.get_command(queued["id"]).status == "delivered")


def test_a_delivery_not_yet_recorded_is_not_sent_again_by_a_new_session(hub):
    """An older session sent command X; its delivery record waits on the writer when the device
    reconnects. A look taken off the writer would still see X queued: it must not be used."""
    ctx, running = hub
    listener = running.listener
    creds = enrol(ctx.store, "unrecorded", "hs256")
    release = hold_delivery_records(listener)
    old = connect_device(running.device_port, ctx.ca_cert_pem, creds)
    try:
        command = ctx.store.add_command(creds.device_id, "once", None, 60_000, now_ms())
        assert running.live.wake(creds.device_id)
        old.wait_for(lambda e: is_command(e, command.id))
        assert ctx.store.get_command(command.id).status == "queued"  # record held back
        with connect_device(running.device_port, ctx.ca_cert_pem, creds) as new:
            assert old.wait_closed().reason == CLOSE_REPLACED
            release.set()
            round_trip(new, 1)
            assert commands_in(new) == []
        assert ctx.store.get_command(command.id).status == "delivered"
    finally:
        release.set()
        old.close()


def test_a_delivery_made_while_the_device_verifies_is_not_sent_again(hub):
    """The older session delivers command X (not through ``LiveSessions.wake``) after the new
    session's verification started and before its look: the look sees X queued (the record is
    held back) and must be dropped for an ordered look on the writer."""
    ctx, running = hub
    listener = running.listener
    creds = enrol(ctx.store, "delivered-meanwhile", "hs256")
    release = hold_delivery_records(listener)
    old = connect_device(running.device_port, ctx.ca_cert_pem, creds)
    real_verify = listener.verify_session
    state = {}

    def deliver_then_verify(*args):
        if "id" not in state:
            command = ctx.store.add_command(creds.device_id, "once", None, 60_000, now_ms())
            state["id"] = command.id
            handle = next(h for h in running.live.all_handles()
                          if h.device_id == creds.device_id)
            before = listener.deliveries
            running.loop.call_soon_threadsafe(handle.wake)
            deadline = time.monotonic() + 5
            while listener.deliveries == before and time.monotonic() < deadline:
                time.sleep(0.005)
            state["delivered_meanwhile"] = listener.deliveries != before
        return real_verify(*args)

    listener.verify_session = deliver_then_verify
    wakes = running.live.wakes()
    try:
        with connect_device(running.device_port, ctx.ca_cert_pem, creds) as new:
            assert state["delivered_meanwhile"]
            old.wait_for(lambda e: is_command(e, state["id"]))
            release.set()
            round_trip(new, 1)
            assert commands_in(new) == []
        assert running.live.wakes() == wakes  # caught by the delivery count, not by a wake
        assert ctx.store.get_command(state["id"]).status == "delivered"
    finally:
        release.set()
        old.close()


def test_a_failed_look_in_the_verification_trip_falls_back_to_the_writer(hub):
    ctx, running = hub
    listener = running.listener
    creds = enrol(ctx.store, "look-fails", "es256")
    command = ctx.store.add_command(creds.device_id, "still", None, 60_000, now_ms())
    real_fetch = listener.fetch_pending
    threads = []

    def fetch(*args):
        threads.append(threading.current_thread().name)
        if threading.current_thread().name.startswith("smartx-verify"):
            raise StoreError("injected: the store hiccupped")
        return real_fetch(*args)

    listener.fetch_pending = fetch
    with connect_device(running.device_port, ctx.ca_cert_pem, creds) as device:
        assert running.live.is_online(creds.device_id)  # verified all the same
        device.wait_for(lambda e: is_command(e, command.id))
    assert [name.split("_")[0] for name in threads] == ["smartx-verify", "smartx-writer"]


# -- LiveSessions.wakes ------------------------------------------------------------------


class _Handle:
    def __init__(self, device_id, loop):
        self.device_id = device_id
        self.loop = loop
        self.woken = 0

    def close(self, reason, detail):
        pass

    def wake(self):
        self.woken += 1


def test_wakes_counts_every_wake_with_or_without_a_session():
    import asyncio

    live = LiveSessions()
    loop = asyncio.new_event_loop()
    try:
        assert live.wakes() == 0
        assert live.wake("dev_nobody") is False
        assert live.wakes() == 1
        handle = _Handle("dev_somebody", loop)
        live.register(handle)
        assert live.wake("dev_somebody") is True
        loop.run_until_complete(asyncio.sleep(0))  # the wake is handed to the handle's loop
        assert live.wakes() == 2 and handle.woken == 1
    finally:
        loop.close()


def test_wakes_from_many_threads_are_all_counted():
    live = LiveSessions()
    threads = [threading.Thread(target=lambda: [live.wake("dev_x") for _ in range(500)])
               for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert live.wakes() == 2000
