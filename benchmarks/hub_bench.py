"""Hub benchmark: verified handshakes per second, acknowledged readings per second over TLS, and
memory per idle verified session.

    python benchmarks/hub_bench.py [--rounds 3] [--duration 5] [--sessions 1000] [--json FILE]

What it does, so the numbers mean something:
- A fresh hub (``init_hub``) in a temporary directory, with devices enrolled in its encrypted
  store, runs as a real subprocess: ``python -m smartx_hub serve`` (device listener + API in
  one loop). Its flood limits are raised through ``device_limits`` in ``hub.json``: every client
  here shares 127.0.0.1.
- Clients run in separate processes (asyncio, the SDK's protocol core and signer), so the hub's
  CPU and memory are its own. The machine's cores are shared between both sides.
- Handshakes: each one is TCP + TLS + Hello/challenge/JWT/Accepted with a fresh nonce, verified
  against the store; ES256 and HS256 devices measured separately.
- Readings: devices pipeline Telemetry batches (1 or 16 readings each, up to ``--window`` in
  flight) and count Acks. An Ack is only sent after the batch is committed to SQLite (sealed
  with AES-256-GCM, ``synchronous=FULL``); after the run the store is opened and every acked
  reading is counted there too.
- Memory: the hub's RSS (``/proc/PID/status``) before and after ``--sessions`` verified idle
  sessions connect, divided by the number of sessions.
Each figure is measured ``--rounds`` times; the table shows the median (and the spread).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from smartx_device import messages as m  # noqa: E402
from smartx_device import session as core  # noqa: E402
from smartx_device.auth import Signer  # noqa: E402

BENCH_LIMITS = {
    "max_connections": 18000, "max_connections_per_ip": 18000, "max_unverified": 18000,
    "max_unverified_per_ip": 18000, "connection_rate_per_ip": 1e6,
    "connection_burst_per_ip": 1000000, "message_rate": 1e6, "message_burst": 1000000,
    "auth_failures_before_backoff": 1000000,
}


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return hard
    except (ValueError, OSError):
        return soft


# -- client side (runs in its own process) ----------------------------------------------


class Device:
    """One benchmark device on asyncio streams and the protocol core."""

    def __init__(self, creds: dict, port: int, context: ssl.SSLContext) -> None:
        self.creds = creds
        self.port = port
        self.context = context
        secret = None
        if creds["auth"] == "hs256":
            import base64
            secret = base64.b64decode(creds["secret_b64"])
        self.signer = Signer(creds["auth"], secret=secret,
                             private_key_pem=creds.get("private_key_pem"))
        self.reader = self.writer = self.session = None

    async def events(self) -> list:
        data = await self.reader.read(65536)
        events = self.session.receive_data(data, now_ms())
        pending = self.session.data_to_send()
        if pending:
            self.writer.write(pending)
        if not data:
            raise ConnectionError("hub closed the connection")
        return events

    async def connect(self) -> None:
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
        if self.writer is not None:
            self.writer.close()


async def client_handshakes(devices: list, port: int, context, duration: float,
                            concurrency: int) -> dict:
    done = 0
    failures = 0
    deadline = time.monotonic() + duration

    async def worker(index: int) -> None:
        nonlocal done, failures
        creds = devices[index % len(devices)]
        while time.monotonic() < deadline:
            device = Device(creds, port, context)
            try:
                await device.connect()
                done += 1
            except (ConnectionError, OSError, ssl.SSLError):
                failures += 1
            finally:
                device.close()

    started = time.monotonic()
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return {"handshakes": done, "failures": failures, "seconds": time.monotonic() - started}


async def client_readings(devices: list, port: int, context, duration: float,
                          per_message: int, window: int, first_id: int) -> dict:
    acked_readings = 0
    acked = {}

    async def run(creds: dict) -> None:
        nonlocal acked_readings
        device = Device(creds, port, context)
        await device.connect()
        readings = [["temp", 0, 21.5 + i] for i in range(per_message)]
        next_id, in_flight = first_id, set()
        mine = acked.setdefault(creds["device_id"], [])
        stop_at = time.monotonic() + duration
        try:
            while True:
                sending = time.monotonic() < stop_at
                while sending and len(in_flight) < window:
                    for reading in readings:
                        reading[1] = now_ms()
                    device.writer.write(device.session.send(
                        m.Telemetry(msg_id=next_id, readings=readings), now_ms()))
                    in_flight.add(next_id)
                    next_id += 1
                if not in_flight:
                    break
                for event in await device.events():
                    if isinstance(event, core.MessageReceived) and isinstance(event.message, m.Ack):
                        in_flight.discard(event.message.msg_id)
                        mine.append(event.message.msg_id)
                        acked_readings += per_message
                    elif isinstance(event, core.SessionClosed):
                        raise ConnectionError("closed: reason %s" % event.reason)
        finally:
            device.close()

    started = time.monotonic()
    await asyncio.gather(*(run(creds) for creds in devices))
    return {"readings": acked_readings, "seconds": time.monotonic() - started, "acked": acked}


async def client_idle(devices: list, port: int, context, count: int) -> None:
    held = []
    for index in range(count):
        device = Device(devices[index], port, context)
        await device.connect()
        held.append(device)
    print(json.dumps({"ready": len(held)}), flush=True)
    # Hold the sessions (answering nothing: keep-alive is long) until told to let go.
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.readline)
    for device in held:
        device.close()


def client_main(args: argparse.Namespace) -> None:
    raise_nofile()
    with open(args.device_file) as handle:
        devices = json.load(handle)
    with open(args.ca, "rb") as handle:
        from smartx_hub.pki import client_tls_context
        context = client_tls_context(handle.read())
    if args.client == "handshakes":
        result = asyncio.run(client_handshakes(devices, args.port, context, args.duration,
                                               args.concurrency))
    elif args.client == "readings":
        result = asyncio.run(client_readings(devices, args.port, context, args.duration,
                                             args.per_message, args.window, args.first_id))
    else:
        asyncio.run(client_idle(devices, args.port, context, args.count))
        return
    print(json.dumps(result), flush=True)


# -- hub side ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_kb(pid: int) -> int:
    with open("/proc/%d/status" % pid) as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS for %d" % pid)


class Hub:
    """A hub in a temporary directory, served by ``python -m smartx_hub serve``."""

    def __init__(self, workdir: str, devices_per_kind: dict) -> None:
        from cryptography.hazmat.primitives.asymmetric import ec

        from smartx_hub import pki
        from smartx_hub.state import init_hub

        self.data_dir = os.path.join(workdir, "hub")
        ctx = init_hub(self.data_dir)
        try:
            self.hub_id = ctx.hub_id
            self.ca_path = ctx.ca_cert_path
            self.devices = {}
            for auth, count in devices_per_kind.items():
                kind = []
                for index in range(count):
                    if auth == "hs256":
                        secret = os.urandom(32)
                        device = ctx.store.add_device("%s-%d" % (auth, index), auth, None, secret,
                                                      now_ms())
                        import base64
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
        self.workdir = workdir
        self.process = None
        self.port = None

    def start(self) -> None:
        self.port = free_port()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "smartx_hub", "serve", "--data", self.data_dir,
             "--host", "127.0.0.1", "--device-port", str(self.port),
             "--api-port", str(free_port())],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
        banner = ""
        while "CA fingerprint" not in banner:
            line = self.process.stdout.readline()
            if not line:
                raise RuntimeError("the hub did not start")
            banner += line

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        process.send_signal(signal.SIGTERM)
        if process.wait(timeout=60) != 0:
            raise RuntimeError("the hub exited with %s" % process.returncode)
        process.stdout.close()

    def client(self, mode: str, devices: list, **options) -> subprocess.Popen:
        path = os.path.join(self.workdir, "devices-%s-%d.json" % (mode, len(devices)))
        with open(path, "w") as handle:
            json.dump(devices, handle)
        command = [sys.executable, os.path.abspath(__file__), "--client", mode, "--port",
                   str(self.port), "--ca", self.ca_path, "--device-file", path]
        for name, value in options.items():
            command += ["--" + name.replace("_", "-"), str(value)]
        return subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                text=True, cwd=ROOT)

    def run_client(self, mode: str, devices: list, **options) -> dict:
        process = self.client(mode, devices, **options)
        out, _ = process.communicate(timeout=600)
        if process.returncode != 0:
            raise RuntimeError("%s client failed" % mode)
        return json.loads(out.strip().splitlines()[-1])

    def count_stored(self, acked: dict) -> int:
        """Readings of the acked batches found in the store (opened after the hub stopped)."""
        from smartx_hub.state import load_hub

        ctx = load_hub(self.data_dir)
        try:
            total = 0
            for device_id, batches in acked.items():
                wanted = set(batches)
                before = None
                while True:
                    page = ctx.store.query_telemetry(device_id, limit=10_000, before_seq=before)
                    total += sum(1 for r in page if r.msg_id in wanted)
                    if len(page) < 10_000:
                        break
                    before = page[-1].seq
            return total
        finally:
            ctx.close()


def median_row(name: str, values: list, unit: str) -> dict:
    return {"metric": name, "median": statistics.median(values), "min": min(values),
            "max": max(values), "unit": unit, "rounds": len(values)}


def bench(args: argparse.Namespace) -> list:
    rows = []
    with tempfile.TemporaryDirectory(prefix="smartx-bench-") as workdir:
        hub = Hub(workdir, {"es256": max(args.sessions, args.concurrency, args.devices),
                            "hs256": max(args.concurrency, args.devices)})
        hub.start()
        try:
            for auth in ("es256", "hs256") if "handshakes" in args.only else ():
                rates = []
                for _ in range(args.rounds):
                    result = hub.run_client("handshakes", hub.devices[auth][:args.concurrency],
                                            duration=args.duration, concurrency=args.concurrency)
                    if result["failures"]:
                        raise RuntimeError("%d handshakes failed" % result["failures"])
                    rates.append(result["handshakes"] / result["seconds"])
                rows.append(median_row("verified handshakes/s (%s, %d concurrent)"
                                       % (auth.upper(), args.concurrency), rates, "1/s"))
            acked_batches = {}  # device id -> {msg_id: readings in it}
            acked_readings = 0
            first_id = 1
            for per_message in (1, 16) if "readings" in args.only else ():
                rates = []
                for _ in range(args.rounds):
                    # Fresh message ids every run: a repeated id would be acked, not stored.
                    result = hub.run_client("readings", hub.devices["hs256"][:args.devices],
                                            duration=args.duration, per_message=per_message,
                                            window=args.window, first_id=first_id)
                    first_id += 100_000_000
                    rates.append(result["readings"] / result["seconds"])
                    acked_readings += result["readings"]
                    for device_id, ids in result["acked"].items():
                        batches = acked_batches.setdefault(device_id, {})
                        for msg_id in ids:
                            batches[msg_id] = per_message
                rows.append(median_row("acked readings/s (%d per message, %d devices)"
                                       % (per_message, args.devices), rates, "1/s"))
            per_session = []
            for _ in range(args.rounds if "memory" in args.only else 0):
                # A fresh hub process each round: freed memory is not returned to the OS, so a
                # second round in the same process would measure reuse, not growth.
                hub.stop()
                hub.start()
                # Warm up allocator arenas and caches with a few sessions first.
                warm = hub.client("idle", hub.devices["es256"][:20], count=20)
                warm.stdout.readline()
                warm.communicate("go\n", timeout=60)
                time.sleep(0.5)
                before = rss_kb(hub.process.pid)
                idle = hub.client("idle", hub.devices["es256"][:args.sessions],
                                  count=args.sessions)
                ready = json.loads(idle.stdout.readline())
                time.sleep(1.0)
                after = rss_kb(hub.process.pid)
                idle.communicate("go\n", timeout=120)
                if ready["ready"] != args.sessions:
                    raise RuntimeError("only %s sessions connected" % ready["ready"])
                per_session.append((after - before) * 1024 / args.sessions / 1000.0)
            if per_session:
                rows.append(median_row("hub RSS per idle verified session (%d sessions)"
                                       % args.sessions, per_session, "kB"))
        finally:
            hub.stop()
        if not acked_batches:
            return rows
        stored = hub.count_stored(acked_batches)
        rows.append({"metric": "acked readings (all runs) found in the store: %d of %d"
                     % (stored, acked_readings), "median": stored, "min": stored,
                     "max": stored, "unit": "readings", "rounds": 1})
        if stored != acked_readings:
            raise RuntimeError("%d readings acked but %d stored" % (acked_readings, stored))
    return rows


def print_table(rows: list) -> None:
    width = max(len(row["metric"]) for row in rows)
    print("\n%-*s  %12s  %12s  %12s" % (width, "metric", "median", "min", "max"))
    for row in rows:
        print("%-*s  %12.1f  %12.1f  %12.1f  %s" % (width, row["metric"], row["median"],
                                                    row["min"], row["max"], row["unit"]))
    print("\n(Python %s, %s, %d CPUs; hub and clients share them)"
          % (platform.python_version(), ssl.OPENSSL_VERSION, os.cpu_count() or 0))


def main() -> None:
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
    # Client mode (internal): the benchmark starts itself as the client process.
    parser.add_argument("--client", choices=["handshakes", "readings", "idle"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--device-file", help=argparse.SUPPRESS)
    parser.add_argument("--ca", help=argparse.SUPPRESS)
    parser.add_argument("--per-message", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--first-id", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        client_main(args)
        return
    rows = bench(args)
    print_table(rows)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=2)


if __name__ == "__main__":
    main()
