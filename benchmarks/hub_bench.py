"""Our side of the benchmark: a hub in a temporary directory and the device load generators.

    python benchmarks/hub_bench.py [--rounds 3] [--duration 5] [--sessions 1000] [--json FILE]

runs the hub-only figures (verified handshakes/s, acked readings/s, RSS per idle verified
session); ``benchmarks/run.py`` uses the same parts for the side-by-side table.

What it does, so the numbers mean something:
- A fresh hub (``init_hub``) in a temporary directory, with devices enrolled in its encrypted
  store, runs as a real subprocess: ``python -m smartx_hub serve`` (device listener + API in one
  loop), started through ``--serve`` here, which only decides TCP_NODELAY first (asyncio sets it
  on every transport; the hub has no setting). Its flood limits are raised through
  ``device_limits`` in ``hub.json``: every client here shares 127.0.0.1.
- Clients run in separate worker processes (asyncio, the SDK's protocol core and signer), so the
  hub's CPU and memory are its own. The machine's cores are shared between both sides.
- Handshakes: each is TCP + TLS + Hello/challenge/JWT/Accepted with a fresh nonce, verified
  against the store.
- Readings: devices pipeline Telemetry batches (up to ``window`` in flight) and count Acks. An
  Ack is only sent after the batch is committed to SQLite (sealed with AES-256-GCM,
  ``synchronous=FULL``); after the run the hub is stopped and every acked batch is counted in
  its database (``Hub.count_stored``).
- Memory: the hub's RSS (``/proc/PID/status``) before and after N verified idle sessions.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import signal
import sqlite3
import ssl
import subprocess
import sys
import tempfile
import time
from typing import Optional

import cbor2

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (ROOT, Worker, cpu_seconds, free_port, median, raise_nofile,  # noqa: E402
                    rss_kb, set_asyncio_nodelay, worker_io)

from smartx_device import messages as m  # noqa: E402
from smartx_device.framing import StreamFramer  # noqa: E402
from smartx_device import session as core  # noqa: E402
from smartx_device.auth import Signer  # noqa: E402

BENCH_LIMITS = {
    "max_connections": 18000, "max_connections_per_ip": 18000, "max_unverified": 18000,
    "max_unverified_per_ip": 18000, "connection_rate_per_ip": 1e6,
    "connection_burst_per_ip": 1000000, "message_rate": 1e6, "message_burst": 1000000,
    "auth_failures_before_backoff": 1000000,
}
THIS = os.path.abspath(__file__)


def now_ms() -> int:
    """Wall-clock milliseconds, as the devices' core takes them."""
    return time.time_ns() // 1_000_000


def sample_readings(count: int, ts_ms: int) -> list:
    """The readings every ingest and wire figure uses: a sensor value with two decimals (a
    CBOR float64 on our wire, five characters of JSON on MQTT's)."""
    return [["temp", ts_ms, 21.37 + index] for index in range(count)]


# -- device side (worker processes) -----------------------------------------------------


def make_signer(creds: dict) -> Signer:
    """The device's signer: its key is loaded once, as a board loads it once at boot."""
    secret = None
    if creds["auth"] == "hs256":
        secret = base64.b64decode(creds["secret_b64"])
    return Signer(creds["auth"], secret=secret, private_key_pem=creds.get("private_key_pem"))


class Device:
    """One benchmark device on asyncio streams and the protocol core."""

    def __init__(self, creds: dict, port: int, context: ssl.SSLContext,
                 signer: Optional[Signer] = None) -> None:
        self.creds = creds
        self.port = port
        self.context = context
        self.signer = signer or make_signer(creds)
        self.reader = self.writer = self.session = None
        self.next_id = 1  # set per worker: a repeated msg_id is acked again but stored once

    async def events(self) -> list:
        """Read once; return the core's events (answering Pings); ConnectionError at EOF."""
        data = await self.reader.read(65536)
        events = self.session.receive_data(data, now_ms())
        pending = self.session.data_to_send()
        if pending:
            self.writer.write(pending)
        if not data:
            raise ConnectionError("hub closed the connection")
        return events

    async def connect(self) -> None:
        """TLS, Hello, challenge, JWT, Accepted."""
        self.reader, self.writer = await asyncio.open_connection(
            "127.0.0.1", self.port, ssl=self.context, server_hostname="localhost")
        self.session = core.DeviceSession(now_ms())
        self.writer.write(self.session.start(self.creds["device_id"], now_ms()))
        while True:
            for event in await self.events():
                if isinstance(event, core.ChallengeReceived):
                    token = self.signer.sign(self.creds["device_id"], event.message)
                    self.writer.write(self.session.authenticate(token, now_ms()))
                elif isinstance(event, core.SessionEstablished):
                    return
                elif isinstance(event, core.SessionClosed):
                    raise ConnectionError("refused: reason %s" % event.reason)

    def close(self) -> None:
        """Close the connection (no Close message)."""
        if self.writer is not None:
            self.writer.close()


async def run_handshakes(devices: list, port: int, context, duration: float,
                         concurrency: int) -> dict:
    """Connect, verify and drop devices for ``duration`` s, ``concurrency`` at a time."""
    done = failures = 0
    deadline = time.monotonic() + duration

    async def worker(index: int) -> None:
        nonlocal done, failures
        creds = devices[index % len(devices)]
        signer = make_signer(creds)  # parsing a PEM key each time would be the client's cost
        while time.monotonic() < deadline:
            device = Device(creds, port, context, signer)
            try:
                await device.connect()
                done += 1
            except (ConnectionError, OSError, ssl.SSLError):
                failures += 1
            finally:
                device.close()

    started = time.monotonic()
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return {"count": done, "failures": failures, "seconds": time.monotonic() - started}


_FRAMER = StreamFramer()


def telemetry_frame(msg_id: int, readings: list) -> bytes:
    """The stream frame of ``Telemetry(msg_id, readings)``, encoded by cbor2 (C)."""
    payload = cbor2.dumps({0: m.TELEMETRY, 1: msg_id, 2: readings}, canonical=True)
    return _FRAMER.encode(payload)


async def run_readings(devices: list, duration: float, per_message: int, window: int) -> dict:
    """Every connected device pipelines Telemetry for ``duration`` s; acked readings counted
    when their Ack arrives. Returns the msg_id range each device used (all acked)."""
    acked_readings = 0

    async def run(device: Device) -> list:
        nonlocal acked_readings
        readings = sample_readings(per_message, now_ms())
        first = device.next_id
        in_flight = set()
        stop_at = time.monotonic() + duration
        session = device.session
        write = device.writer.write
        # The core encodes this Telemetry byte for byte as cbor2's C encoder does (canonical
        # mode: the codec's documented invariant, checked here once per device), so the load
        # generator uses cbor2, as the MQTT publishers use the C json encoder: a pure-Python
        # encoder would spend on the shared cores what the hub should be measured with.
        check = m.Telemetry(msg_id=device.next_id, readings=readings)
        if telemetry_frame(device.next_id, readings) != StreamFramer().encode(
                m.encode_message(check)):
            raise RuntimeError("cbor2's canonical encoding differs from the core's")
        while True:
            sending = time.monotonic() < stop_at
            while sending and len(in_flight) < window:
                stamp = now_ms()
                for reading in readings:
                    reading[1] = stamp
                write(telemetry_frame(device.next_id, readings))
                session.last_sent_ms = stamp
                in_flight.add(device.next_id)
                device.next_id += 1
            if not in_flight:
                break
            for event in await device.events():
                if isinstance(event, core.MessageReceived) and isinstance(event.message, m.Ack):
                    in_flight.discard(event.message.msg_id)
                    acked_readings += per_message
                elif isinstance(event, core.SessionClosed):
                    raise ConnectionError("closed: reason %s" % event.reason)
        return [device.creds["device_id"], first, device.next_id - 1, per_message]

    started = time.monotonic()
    ranges = await asyncio.gather(*(run(device) for device in devices))
    return {"count": acked_readings, "seconds": time.monotonic() - started, "ranges": ranges}


def device_worker(args: argparse.Namespace) -> None:
    """A worker process: connect (for ``readings`` and ``idle``), say ready, then run one
    measurement per command line until ``quit``."""
    raise_nofile()
    set_asyncio_nodelay(args.nodelay)
    emit, next_command = worker_io()
    with open(args.device_file) as handle:
        creds = json.load(handle)
    with open(args.ca, "rb") as handle:
        from smartx_hub.pki import client_tls_context
        context = client_tls_context(handle.read())

    async def main() -> None:
        loop = asyncio.get_running_loop()
        devices = []
        if args.mode in ("readings", "idle"):
            # Connected a few at a time: the hub's own flood limits are raised, but a burst
            # of thousands of handshakes would only measure the accept backlog.
            for start in range(0, len(creds), 64):
                batch = [Device(c, args.port, context) for c in creds[start:start + 64]]
                for device in batch:
                    device.next_id = args.first_id
                await asyncio.gather(*(d.connect() for d in batch))
                devices.extend(batch)
        emit({"ready": len(devices)})
        while True:
            command = await loop.run_in_executor(None, next_command)
            if command == "quit":
                break
            if args.mode == "handshakes":
                emit(await run_handshakes(creds, args.port, context, args.duration,
                                          args.concurrency))
            elif args.mode == "readings":
                emit(await run_readings(devices, args.duration, args.per_message, args.window))
            else:
                emit({"held": len(devices)})
        for device in devices:
            device.close()
        await asyncio.sleep(0.05)

    asyncio.run(main())


# -- hub side ----------------------------------------------------------------------------


class Hub:
    """A hub in a temporary directory, served by ``python -m smartx_hub serve``."""

    def __init__(self, workdir: str, devices_per_kind: dict) -> None:
        from cryptography.hazmat.primitives.asymmetric import ec

        from smartx_hub import pki
        from smartx_hub.state import init_hub

        self.workdir = workdir
        self.data_dir = os.path.join(workdir, "hub")
        ctx = init_hub(self.data_dir)
        try:
            self.hub_id = ctx.hub_id
            self.ca_path = ctx.ca_cert_path
            self.cert_path = ctx.server_cert_path
            self.key_path = ctx.server_key_path
            self.devices = {}
            for auth, count in devices_per_kind.items():
                kind = []
                for index in range(count):
                    if auth == "hs256":
                        secret = os.urandom(32)
                        device = ctx.store.add_device("%s-%d" % (auth, index), auth, None, secret,
                                                      now_ms())
                        kind.append({"device_id": device.id, "auth": auth,
                                     "secret_b64": base64.b64encode(secret).decode()})
                    else:
                        key = ec.generate_private_key(ec.SECP256R1())
                        device = ctx.store.add_device("%s-%d" % (auth, index), auth,
                                                      pki.public_key_pem(key), None, now_ms())
                        kind.append({"device_id": device.id, "auth": auth,
                                     "private_key_pem": pki.private_key_pem(key).decode()})
                self.devices[auth] = kind
        finally:
            ctx.close()
        config_path = os.path.join(self.data_dir, "hub.json")
        with open(config_path) as handle:
            config = json.load(handle)
        config["device_limits"] = BENCH_LIMITS
        with open(config_path, "w") as handle:
            json.dump(config, handle)
        self.process: Optional[subprocess.Popen] = None
        self.port: Optional[int] = None
        self.api_port: Optional[int] = None
        self.nodelay = True
        self._next_first_id = 1

    @property
    def pid(self) -> int:
        """The hub process's pid."""
        return self.process.pid

    def start(self, nodelay: bool = True) -> None:
        """Start ``serve`` (TCP_NODELAY on every connection, or on none)."""
        self.nodelay = nodelay
        self.port = free_port()
        self.api_port = free_port()
        self.process = subprocess.Popen(
            [sys.executable, THIS, "--serve", "--nodelay", str(int(nodelay)), "--",
             "serve", "--data", self.data_dir, "--host", "127.0.0.1",
             "--device-port", str(self.port), "--api-port", str(self.api_port)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
        banner = ""
        while "CA fingerprint" not in banner:
            line = self.process.stdout.readline()
            if not line:
                raise RuntimeError("the hub did not start")
            banner += line

    def stop(self) -> None:
        """SIGTERM the hub and wait for a clean exit."""
        process, self.process = self.process, None
        if process is None:
            return
        process.send_signal(signal.SIGTERM)
        if process.wait(timeout=120) != 0:
            raise RuntimeError("the hub exited with %s" % process.returncode)
        process.stdout.close()

    def rss_kb(self) -> int:
        """The hub's resident set size, KiB."""
        return rss_kb(self.pid)

    def cpu_seconds(self) -> float:
        """CPU time the hub process has used so far."""
        return cpu_seconds(self.pid)

    def worker(self, mode: str, devices: list, **options) -> Worker:
        """Start a device worker (``handshakes``, ``readings`` or ``idle``); it is ready (and
        connected) when this returns."""
        path = os.path.join(self.workdir, "devices-%s-%d-%d.json" % (mode, len(devices),
                                                                     time.monotonic_ns()))
        with open(path, "w") as handle:
            json.dump(devices, handle)
        command = [THIS, "--client", mode, "--port", str(self.port), "--ca", self.ca_path,
                   "--device-file", path, "--nodelay", str(int(self.nodelay))]
        if mode == "readings":
            # Each worker numbers its batches in its own range of msg_ids.
            command += ["--first-id", str(self._next_first_id)]
            self._next_first_id += 1_000_000_000
        for name, value in options.items():
            command += ["--" + name.replace("_", "-"), str(value)]
        worker = Worker(command)
        worker.read("while connecting devices")
        return worker

    def count_stored(self, ranges: list) -> int:
        """Readings of the acked batches found in the hub's database (the hub is stopped).

        ``ranges`` are ``[device_id, first msg_id, last msg_id, readings per message]``.
        Counted with SQL on the telemetry table (a batch's readings stay sealed); ``check_readable``
        opens some through the store's own API."""
        connection = sqlite3.connect(os.path.join(self.data_dir, "hub.db"))
        try:
            total = 0
            for device_id, first, last, _ in ranges:
                if last < first:
                    continue
                total += connection.execute(
                    "SELECT COALESCE(SUM(reading_count), 0) FROM telemetry"
                    " WHERE device_id=? AND msg_id BETWEEN ? AND ?",
                    (device_id, first, last)).fetchone()[0]
            return total
        finally:
            connection.close()

    def check_readable(self, device_ids: list) -> int:
        """Open the newest readings of some devices through the store (decrypts them)."""
        from smartx_hub.state import load_hub

        ctx = load_hub(self.data_dir)
        try:
            opened = 0
            for device_id in device_ids:
                for reading in ctx.store.query_telemetry(device_id, limit=20):
                    if reading.stream != "temp" or not isinstance(reading.value, float):
                        raise RuntimeError("a stored reading does not read back")
                    opened += 1
            return opened
        finally:
            ctx.close()


def expected_readings(ranges: list) -> int:
    """Readings the ranges stand for."""
    return sum((last - first + 1) * per for _, first, last, per in ranges if last >= first)


# -- standalone run ------------------------------------------------------------------------


def measure(server_pid: int, worker: Worker, command: str = "run") -> dict:
    """One measurement by ``worker``, with the server's CPU time over exactly that span."""
    before = cpu_seconds(server_pid)
    result = worker.ask(command)
    result["server_cpu_s"] = cpu_seconds(server_pid) - before
    return result


def idle_rss_per_session(hub: Hub, devices: list, warm: int = 20) -> float:
    """Bytes of hub RSS per idle verified session (a fresh hub process: freed memory is not
    returned to the OS, so a second measurement in one process would measure reuse)."""
    hub.stop()
    hub.start(hub.nodelay)
    warmup = hub.worker("idle", devices[:warm])
    warmup.close()
    time.sleep(0.5)
    before = hub.rss_kb()
    idle = hub.worker("idle", devices)
    time.sleep(1.0)
    after = hub.rss_kb()
    idle.close()
    return (after - before) * 1024.0 / len(devices)


def standalone(args: argparse.Namespace) -> list:
    """The hub-only figures of ``main`` (no Mosquitto)."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="smartx-bench-") as workdir:
        hub = Hub(workdir, {"es256": max(args.sessions, args.concurrency),
                            "hs256": max(args.concurrency, args.devices)})
        hub.start()
        ranges = []
        try:
            if "handshakes" in args.only:
                for auth in ("es256", "hs256"):
                    worker = hub.worker("handshakes", hub.devices[auth][:args.concurrency],
                                        duration=args.duration, concurrency=args.concurrency)
                    rates = []
                    for _ in range(args.rounds):
                        result = measure(hub.pid, worker)
                        rates.append(result["count"] / result["seconds"])
                    worker.close()
                    rows.append(("verified handshakes/s (%s, %d concurrent)"
                                 % (auth.upper(), args.concurrency), rates, "1/s"))
            if "readings" in args.only:
                for per_message in (1, 16):
                    worker = hub.worker("readings", hub.devices["hs256"][:args.devices],
                                        duration=args.duration, per_message=per_message,
                                        window=args.window)
                    rates = []
                    for _ in range(args.rounds):
                        result = measure(hub.pid, worker)
                        rates.append(result["count"] / result["seconds"])
                        ranges.extend(result["ranges"])
                    worker.close()
                    rows.append(("acked readings/s (%d per message, %d devices)"
                                 % (per_message, args.devices), rates, "1/s"))
            if "memory" in args.only:
                sizes = [idle_rss_per_session(hub, hub.devices["es256"][:args.sessions]) / 1000
                         for _ in range(args.rounds)]
                rows.append(("hub RSS per idle verified session (%d sessions)" % args.sessions,
                             sizes, "kB"))
        finally:
            hub.stop()
        if ranges:
            stored, wanted = hub.count_stored(ranges), expected_readings(ranges)
            if stored != wanted:
                raise RuntimeError("%d readings acked but %d stored" % (wanted, stored))
            rows.append(("acked readings found in the store (all runs)", [stored], "readings"))
    return rows


def main() -> None:
    """Standalone run, the hub launcher (``--serve``) and the device workers (``--client``)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measurement")
    parser.add_argument("--concurrency", type=int, default=8, help="parallel handshakes")
    parser.add_argument("--devices", type=int, default=16, help="devices sending telemetry")
    parser.add_argument("--window", type=int, default=32, help="unacked batches per device")
    parser.add_argument("--sessions", type=int, default=1000, help="idle sessions for memory")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--only", nargs="+", choices=["handshakes", "readings", "memory"],
                        default=["handshakes", "readings", "memory"], help="measure only these")
    parser.add_argument("--nodelay", type=int, default=1, help=argparse.SUPPRESS)
    # Internal: the hub launcher, and the device workers.
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--client", dest="mode", choices=["handshakes", "readings", "idle"],
                        help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--device-file", help=argparse.SUPPRESS)
    parser.add_argument("--ca", help=argparse.SUPPRESS)
    parser.add_argument("--per-message", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--first-id", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        set_asyncio_nodelay(bool(args.nodelay))  # the API's connections (uvicorn on asyncio)
        if not args.nodelay:
            # The device listener sets TCP_NODELAY itself; the hub has no setting to turn off.
            import smartx_hub.listener

            smartx_hub.listener.set_nodelay = lambda sock: None
        from smartx_hub.cli import main as hub_main
        raise SystemExit(hub_main(args.rest))
    if args.mode:
        device_worker(args)
        return
    rows = standalone(args)
    width = max(len(name) for name, _, _ in rows)
    for name, values, unit in rows:
        print("%-*s  %12.1f  (min %.1f, max %.1f) %s" % (width, name, median(values),
                                                         min(values), max(values), unit))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump([{"metric": n, "median": median(v), "values": v, "unit": u}
                       for n, v, u in rows], handle, indent=2)


if __name__ == "__main__":
    main()
