"""Helpers for the simulator's tests: a real hub (its own command line, a thread, real SQLite
and loopback TLS) and small firmware scripts for simulated boards.

Nothing here fakes the hub or the SDK: boards run the real SDK against the real listener.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import time
from typing import Any, Callable, Dict, List, Optional

from smartx_hub import cli as hub_cli
from smartx_hub.server import run_hub_in_thread
from smartx_hub.state import load_hub

#: Short hub timers so a lost link is noticed in about two seconds, not a minute.
FAST_LIMITS = {"keepalive_ms": 1000, "first_frame_timeout_ms": 2000, "auth_timeout_ms": 3000}

#: A firmware that publishes every PERIOD_MS over TLS, with quick reconnects. It uses only the
#: SDK's public API; PERIOD_MS and TRANSPORT are filled in by ``firmware``.
FAST_NODE = '''
import machine
import smartx_device
from smartx_device.backoff import Backoff
from smartx_device.clock import monotonic_ms

OPTIONS = dict(queue_path="queue.log", log=print, handshake_timeout_ms=3000,
               connect_timeout_ms=2000, backoff=Backoff(base_ms=100, cap_ms=800),
               ack_timeout_ms=1000)
%(transport)s
client = smartx_device.Client.from_bundle("device.smartx.json", **OPTIONS)
print("fast node %%s booting" %% client.device_id)
adc = machine.ADC(26)
try:
    client.connect()
except smartx_device.ClientError as error:
    print("not connected yet: %%s" %% error)
last = None
while True:
    now = monotonic_ms()
    if last is None or now - last >= %(period_ms)d:
        last = now
        client.publish("adc", adc.read_u16())
    client.loop(20)
'''

SERIAL_TRANSPORT = '''
from smartx_device.transport import SerialTransport
OPTIONS["transport_factory"] = lambda: SerialTransport(1)  # machine.UART(1): the link
'''


def firmware(directory: Any, period_ms: int = 100, serial: bool = False,
             name: str = "fast_node.py") -> str:
    """Write the fast node firmware to ``directory``; return its path."""
    path = os.path.join(str(directory), name)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(FAST_NODE % {"period_ms": period_ms,
                                  "transport": SERIAL_TRANSPORT if serial else ""})
    return path


def hub_command(*args: str, stdin: Optional[str] = None) -> str:
    """Run ``smartx-hub ARGS`` in this process (its real command line); return its stdout."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = hub_cli.main(list(args))
    assert status == 0, "smartx-hub %s failed: %s" % (" ".join(args), err.getvalue())
    return out.getvalue()


def make_hub(tmp_path: Any, name: str = "hub") -> str:
    """``smartx-hub init`` in ``tmp_path/name``; returns the data directory."""
    data = os.path.join(str(tmp_path), name)
    hub_command("init", "--data", data)
    return data


def enrol(data: str, name: str, auth: str = "hs256") -> str:
    """``smartx-hub device add``; returns the bundle's path."""
    out = os.path.join(data, name + ".smartx.json")
    hub_command("device", "add", name, "--auth", auth, "--data", data, "--out", out)
    return out


def bundle_of(path: str) -> Dict[str, Any]:
    """A bundle's JSON."""
    with open(path, "r", encoding="utf-8") as handle:
        return json.load(handle)


def start_hub(data: str, **limits: Any) -> Any:
    """A real hub in a thread on 127.0.0.1, ephemeral ports, fast timers (stop it when done)."""
    merged = dict(FAST_LIMITS)
    merged.update(limits)
    return run_hub_in_thread(data, limits=merged)


def stored_readings(data: str, device_id: str) -> List[Any]:
    """Every reading the hub stored for ``device_id`` (read through a second hub context)."""
    with load_hub(data) as ctx:
        return ctx.store.query_telemetry(device_id, limit=100000)


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition"
               ) -> Any:
    """Poll until ``predicate`` is truthy (returned); AssertionError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError("timed out after %.1f s waiting for %s" % (timeout, what))
        time.sleep(0.05)
