"""The SmartX HUB demo (``make demo``): a hub, a fleet of simulated boards, live telemetry.

What it does, all on this machine and on loopback only (no zeroconf announcement):
1. makes a hub in ``./demo-data`` (or reuses the one an earlier demo made there; the boards'
   flash folders and credentials live in ``./demo-data/sim``),
2. enrols the boards (``smartx-hub device add``) and creates the dashboard user ``demo`` with a
   fresh random password,
3. starts the hub: TLS device listener and HTTPS API + dashboard on 127.0.0.1,
4. starts the simulated boards, each running ``examples/sensor_node.py`` unchanged,
5. creates a one-time API token (telemetry:read, devices:read) and prints the dashboard
   address, the login, the token and a curl line,
6. runs until Ctrl-C (or ``--seconds N``), then stops the boards (queues flushed, sessions
   closed) and the hub.

Run it: ``make demo``, or ``.venv/bin/python examples/demo.py [--boards N] [--seconds N]``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import secrets
import shutil
import signal
import sys
import threading
import time
from typing import Any, List, Optional, Tuple

STARTED = time.monotonic()
STARTED_UNIX_MS = int(time.time() * 1000)
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:  # run as a script from anywhere: the packages live next to examples/
    sys.path.insert(0, ROOT)

from firmware_sim import Fleet  # noqa: E402
from smartx_hub import cli as hub_cli  # noqa: E402

MARKER = "demo.json"
DEMO_USER = "demo"
DEFAULT_API_PORT = 8443
TOKEN_SCOPES = ("telemetry:read", "devices:read")


class DemoError(Exception):
    """The demo cannot start; the message says what to do."""


def hub(args: List[str], stdin: Optional[str] = None) -> str:
    """Run one ``smartx-hub`` command in this process; return its stdout (DemoError if it fails)."""
    out, err = io.StringIO(), io.StringIO()
    saved_stdin = sys.stdin
    try:
        if stdin is not None:
            sys.stdin = io.StringIO(stdin)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = hub_cli.main(args)
    finally:
        sys.stdin = saved_stdin
    if status != 0:
        raise DemoError("smartx-hub %s failed: %s" % (args[0], err.getvalue().strip()))
    return out.getvalue()


def prepare_folder(data: str, fresh: bool) -> bool:
    """Make sure ``data`` is ours; True if an earlier demo's hub is there to reuse."""
    marker = os.path.join(data, MARKER)
    if os.path.isdir(data) and os.listdir(data):
        if not os.path.isfile(marker):
            raise DemoError("%s exists and was not made by the demo; choose another folder"
                            " with --data DIR" % data)
        if fresh:
            shutil.rmtree(data)
        else:
            return True
    os.makedirs(data, exist_ok=True)
    with open(marker, "w", encoding="utf-8") as handle:
        json.dump({"made_by": "examples/demo.py", "created_ms": int(time.time() * 1000)}, handle)
    return False


def enrol(hub_data: str, bundle_dir: str, count: int) -> dict:
    """Enrol ``sim-000``.. through ``smartx-hub device add``; reuse bundles already made."""
    os.makedirs(bundle_dir, exist_ok=True)
    bundles = {}
    for index in range(count):
        name = "sim-%03d" % index
        path = os.path.join(bundle_dir, name + ".smartx.json")
        if not os.path.exists(path):
            hub(["device", "add", name, "--auth", "hs256", "--data", hub_data, "--out", path,
                 "--json"])
        bundles[name] = path
    return bundles


def set_demo_user(hub_data: str) -> str:
    """Create the dashboard user ``demo`` (or give it a new password); return the password."""
    password = secrets.token_urlsafe(12)
    users = json.loads(hub(["user", "list", "--json", "--data", hub_data]))
    if any(user["username"] == DEMO_USER for user in users):
        from smartx_hub.passwords import hash_password
        from smartx_hub.state import load_hub

        with load_hub(hub_data) as ctx:
            user = ctx.store.get_user_by_name(DEMO_USER)
            ctx.store.set_user_password(user.id, hash_password(password))
    else:
        hub(["user", "add", DEMO_USER, "--password-stdin", "--data", hub_data],
            stdin=password + "\n")
    return password


def start_hub(hub_data: str, api_port: int) -> Any:
    """The hub in a background thread on 127.0.0.1 (API on ``api_port`` if free, else any)."""
    from smartx_hub.server import run_hub_in_thread

    try:
        return run_hub_in_thread(hub_data, host="127.0.0.1", device_port=0, api_port=api_port)
    except OSError:
        if api_port == 0:
            raise
        return run_hub_in_thread(hub_data, host="127.0.0.1", device_port=0, api_port=0)


def first_reading(api_url: str, token: str, ca_path: str, since_ms: int,
                  timeout: float) -> Optional[Tuple]:
    """Poll the API (with the demo's token) until some device has a reading stamped at or after
    ``since_ms``; return (device name, reading) or None."""
    import ssl

    import httpx

    headers = {"Authorization": "Bearer " + token}
    deadline = time.monotonic() + timeout
    trust = ssl.create_default_context(cafile=ca_path)
    with httpx.Client(base_url=api_url, headers=headers, verify=trust, timeout=5.0) as client:
        while time.monotonic() < deadline:
            try:
                devices = client.get("/api/v1/devices").json().get("items", [])
                for device in devices:
                    page = client.get("/api/v1/devices/%s/telemetry" % device["id"],
                                      params={"limit": 1, "since": since_ms}).json()
                    if page.get("items"):
                        return device["name"], page["items"][0]
            except (httpx.HTTPError, ValueError):  # the API is still starting: ask again
                pass
            time.sleep(0.1)
    return None


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="SmartX HUB demo: a hub and simulated boards.")
    parser.add_argument("--data", default="demo-data",
                        help="the demo's folder (default ./demo-data; reused on the next run)")
    parser.add_argument("--boards", type=int, default=8, help="simulated boards (default 8)")
    parser.add_argument("--seconds", type=float, default=None,
                        help="stop after N seconds (default: run until Ctrl-C)")
    parser.add_argument("--interval", type=float, default=2.0,
                        help="seconds between readings, for firmware that reads config.json")
    parser.add_argument("--api-port", type=int, default=DEFAULT_API_PORT,
                        help="dashboard/API port (default 8443; any free one if taken)")
    parser.add_argument("--fresh", action="store_true",
                        help="start over: delete the earlier demo's hub and boards first")
    args = parser.parse_args(argv)
    if not 1 <= args.boards <= 500:
        parser.error("--boards must be 1..500")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    data = os.path.abspath(args.data)
    try:
        reused = prepare_folder(data, args.fresh)
    except DemoError as exc:
        print("demo: %s" % exc, file=sys.stderr)
        return 1
    hub_data = data  # the hub's files, with the demo's marker and the boards in sim/
    print("SmartX HUB demo: %s hub in %s" % ("reusing the" if reused else "making a", hub_data))
    try:
        if not reused or not os.path.isfile(os.path.join(hub_data, "hub.json")):
            hub(["init", "--data", hub_data, "--json"])
        bundles = enrol(hub_data, os.path.join(data, "sim", "bundles"), args.boards)
        password = set_demo_user(hub_data)
    except DemoError as exc:
        print("demo: %s%s" % (exc, " (--fresh starts the demo over)" if reused else ""),
              file=sys.stderr)
        return 1

    handle = start_hub(hub_data, args.api_port)
    fleet = None
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        script = os.path.join(HERE, "sensor_node.py")
        fleet = Fleet(os.path.join(data, "sim", "boards"), script, bundles,
                      hub=("127.0.0.1", handle.device_port), interval_s=args.interval)
        fleet.start()
        token_info = json.loads(hub(["token", "create", "--data", hub_data, "--user", DEMO_USER,
                                     "--name", "demo", "--json"]
                                    + [item for scope in TOKEN_SCOPES
                                       for item in ("--scope", scope)]))
        token = token_info["token"]
        api_url = "https://127.0.0.1:%d" % handle.api_port
        ca_path = handle.ctx.ca_cert_path
        print()
        print("  Dashboard:  %s/   (log in as %s / %s)" % (api_url, DEMO_USER, password))
        print("              the hub signs its own certificate: your browser will warn;")
        print("              the CA is %s" % ca_path)
        print("  API token:  export TOKEN=%s" % token)
        print("              (shown once; scopes %s)" % ", ".join(TOKEN_SCOPES))
        print("  Try:        curl --cacert %s -H \"Authorization: Bearer $TOKEN\" %s/api/v1/devices"
              % (ca_path, api_url))
        print("  Boards:     %d simulated sensor nodes running examples/sensor_node.py"
              " (flash and console logs in %s)" % (len(fleet), os.path.join(data, "sim", "boards")))
        print()
        found = first_reading(api_url, token, ca_path, STARTED_UNIX_MS - 1000, timeout=30.0)
        if found is None:
            print("  no reading reached the hub within 30 s: see the boards' console.log files")
        else:
            name, reading = found
            print("  First reading stored %.1f s after start (%s: %s = %s)"
                  % (time.monotonic() - STARTED, name, reading["stream"], reading["value"]))
        print("  Press Ctrl-C to stop." if args.seconds is None
              else "  Stopping in %.0f s." % args.seconds)
        deadline = None if args.seconds is None else STARTED + args.seconds
        tty = sys.stdout.isatty()
        last_plain = 0.0
        while not stop.is_set():
            if deadline is not None and time.monotonic() >= deadline:
                break
            line = "  " + fleet.summary().line()
            if tty:
                sys.stdout.write("\r\x1b[K" + line)
                sys.stdout.flush()
            elif time.monotonic() - last_plain >= 5.0:
                last_plain = time.monotonic()
                print(line, flush=True)
            stop.wait(0.5)
        print()
        print("  stopping: flushing the boards' queues and closing their sessions ...")
        final = fleet.stop()
        fleet = None
        print("  " + final.line())
        return 0
    finally:
        if fleet is not None:
            fleet.stop(flush_timeout=0)
        handle.stop()
        print("  hub stopped. Run the demo again to continue with the same hub and boards"
              " (--fresh starts over).")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C before the hub was up: nothing to stop yet
        print("demo: interrupted", file=sys.stderr)
        sys.exit(130)
