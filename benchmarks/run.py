"""SmartX HUB benchmarks, side by side with Mosquitto: one command, one table, one JSON file.

    .venv/bin/python benchmarks/run.py [--quick] [--rounds N] [--duration S] [--only SECTION ...]

(``make bench`` runs it with no options.) What each row measures, how, and what limits it:
docs/performance.md. In short:

- ingest    acknowledged readings/s over TLS, 1/10/100 devices, 1 and 16 readings a message;
            ours counts readings committed to the encrypted store (an Ack is sent only after
            the commit), Mosquitto counts PUBACKs of QoS 1 PUBLISHes of the same readings as
            JSON from paho-mqtt. Both with TCP_NODELAY on, then both with it off.
- sessions  verified device sessions/s (TLS + Hello, challenge, JWT, Accepted) against
            Mosquitto TLS connects/s (TLS + CONNECT/CONNACK).
- memory    server RSS per idle session at 1,000 and 5,000 sessions.
- wire      bytes per reading on the wire inside TLS, ours against MQTT + JSON.
- api       requests/s on a telemetry read with the token check, and without it.
- micropython  heap allocated per telemetry publish and by importing the device core.
- serial    payload goodput at 115200 baud against the framing-limited maximum.

Every figure is the median over rounds; every ratio is the median of per-round ratios of two
measurements made back to back (their order alternating round by round). Server CPU is read
from /proc/PID/stat of the server process over exactly the measured span. The load generators
share the machine's cores with the servers.

It installs what it needs when missing: Mosquitto (apt-get), paho-mqtt (pip, into this
interpreter's environment), the MicroPython npm package (npm install).
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import shutil
import ssl
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import ROOT, cpu_seconds, median, raise_nofile  # noqa: E402

SECTIONS = ["wire", "ingest", "sessions", "memory", "api", "micropython", "serial"]
RESULTS_DIR = os.path.join(ROOT, "bench-results")
MP_RUNNER = os.path.join(ROOT, "tests", "micropython", "run.mjs")
MP_PACKAGE = os.path.join(ROOT, "node_modules", "@micropython",
                          "micropython-webassembly-pyscript", "micropython.mjs")
MP_CORE = ["smartx_device/_compat.py", "smartx_device/_utf8.py", "smartx_device/errors.py", "smartx_device/reasons.py",
           "smartx_device/cbor.py", "smartx_device/framing.py", "smartx_device/messages.py",
           "smartx_device/session.py"]
MP_SDK = MP_CORE + ["smartx_device/jwt.py", "smartx_device/queue.py",
                    "smartx_device/__init__.py", "smartx_device/auth.py",
                    "smartx_device/backoff.py", "smartx_device/client.py",
                    "smartx_device/clock.py", "smartx_device/credentials.py",
                    "smartx_device/transport.py"]


def log(text: str) -> None:
    """Progress on stderr (the table goes to stdout)."""
    sys.stderr.write("[bench %s] %s\n" % (time.strftime("%H:%M:%S"), text))
    sys.stderr.flush()


class Plan:
    """What to measure: the full run (``make bench``) or the reduced ``--quick`` one."""

    def __init__(self, args: argparse.Namespace) -> None:
        quick = args.quick
        self.quick = quick
        # Four rounds of each throughput pair (each side goes first twice); memory and serial,
        # steadier and slower to set up, take three.
        self.rounds = args.rounds or (1 if quick else 4)
        self.slow_rounds = args.rounds or (1 if quick else 3)
        self.duration = args.duration or (1.5 if quick else 3.0)
        self.window = 32
        self.concurrency = 8
        if quick:
            # nodelay -> (devices, readings per message) cells
            self.ingest = {True: [(1, 1), (10, 16)], False: [(10, 1)]}
            self.memory_sizes = [1000]
            self.serial_readings = 1500
        else:
            cells = [(devices, per) for per in (1, 16) for devices in (1, 10, 100)]
            self.ingest = {True: cells, False: cells}
            self.memory_sizes = [1000, 5000]
            self.serial_readings = 3000
        self.sections = args.only or SECTIONS

    @property
    def devices_needed(self) -> dict:
        """Devices to enrol per auth kind for this plan."""
        hs256 = max([d for cells in self.ingest.values() for d, _ in cells] + [self.concurrency])
        es256 = max(self.memory_sizes + [self.concurrency]) if (
            "memory" in self.sections or "sessions" in self.sections) else self.concurrency
        # Two more HS256 boards: the API's device and the serial board.
        return {"hs256": hs256 + 2, "es256": es256}


# -- tools -----------------------------------------------------------------------------------


def ensure_paho() -> str:
    """paho-mqtt's version, installing it with pip first if it is missing."""
    try:
        import paho.mqtt
    except ImportError:
        log("paho-mqtt is missing: pip install paho-mqtt")
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "paho-mqtt"],
                       check=True)
        importlib.invalidate_caches()
        import paho.mqtt
    return paho.mqtt.__version__


def ensure_micropython() -> bool:
    """True once the MicroPython npm package is installed (npm install if not)."""
    if os.path.isfile(MP_PACKAGE):
        return True
    npm = shutil.which("npm")
    if npm is None or shutil.which("node") is None:
        return False
    log("the MicroPython npm package is missing: npm install")
    subprocess.run([npm, "install", "--no-audit", "--no-fund", "--silent"], cwd=ROOT,
                   check=False)
    return os.path.isfile(MP_PACKAGE)


# -- rows ------------------------------------------------------------------------------------


def row(section: str, metric: str, unit: str, ours: list, theirs: list = None,
        ratios: list = None, goal: str = "", ours_cpu: list = None, theirs_cpu: list = None,
        cpu_unit: str = "", note: str = "", theirs_name: str = "Mosquitto", **extra) -> dict:
    """One table row: medians of ``ours`` and ``theirs`` and of the per-round ``ratios``."""
    out = {"section": section, "metric": metric, "unit": unit, "ours": median(ours),
           "ours_values": ours, "theirs_name": theirs_name, "goal": goal, "note": note}
    if theirs is not None:
        out["theirs"] = median(theirs)
        out["theirs_values"] = theirs
    if ratios is not None:
        out["ratio"] = median(ratios)
        out["ratio_values"] = ratios
    if ours_cpu:
        out["ours_cpu"] = median(ours_cpu)
        out["cpu_unit"] = cpu_unit
    if theirs_cpu:
        out["theirs_cpu"] = median(theirs_cpu)
    out.update(extra)
    return out


def measure(server_pid: int, worker, command: str = "run") -> dict:
    """One measurement by a load-generator worker, with the server's CPU over that span."""
    before = cpu_seconds(server_pid)
    result = worker.ask(command)
    result["server_cpu_s"] = cpu_seconds(server_pid) - before
    if result.get("failures"):
        raise RuntimeError("%d failures in a measurement" % result["failures"])
    if not result.get("count"):
        raise RuntimeError("a measurement counted nothing: %s" % result)
    return result


def paired(plan: Plan, ours_fn, theirs_fn) -> tuple:
    """Run ours and theirs back to back, ``plan.rounds`` times, alternating which goes first.
    Returns (ours results, theirs results, ratios of their rates)."""
    ours, theirs, ratios = [], [], []
    for index in range(plan.rounds):
        if index % 2 == 0:
            a, b = ours_fn(), theirs_fn()
        else:
            b, a = theirs_fn(), ours_fn()
        ours.append(a)
        theirs.append(b)
        ratios.append((a["count"] / a["seconds"]) / (b["count"] / b["seconds"]))
    return ours, theirs, ratios


def rates(results: list) -> list:
    """Rates (count / seconds) of measurement results."""
    return [r["count"] / r["seconds"] for r in results]


def cpu_per(results: list, scale: float = 1e6) -> list:
    """Server CPU per counted unit, scaled (1e6: µs, 1e3: ms)."""
    return [r["server_cpu_s"] / r["count"] * scale for r in results]


# -- sections ----------------------------------------------------------------------------------


def bench_wire() -> list:
    """Rows: bytes per reading, ours against MQTT+JSON."""
    import wire

    out = []
    for item in wire.measure():
        count = item["readings"]
        out.append(row(
            "wire", "bytes per reading, %d reading%s a message (message + ack)"
            % (count, "" if count == 1 else "s"), "B",
            [item["ours_per_reading"]], [item["mqtt_per_reading"]],
            [item["ours_per_reading"] / item["mqtt_per_reading"]], goal="<= 1",
            theirs_name="MQTT+JSON",
            note="ours %d B Telemetry frame + %d B Ack; MQTT %d B PUBLISH (QoS 1, %d B JSON) "
                 "+ %d B PUBACK; TLS adds the same to both"
                 % (item["ours_up"], item["ours_ack"], item["mqtt_up"], item["json_payload"],
                    item["mqtt_ack"]),
            detail=item))
    return out


def bench_ingest(plan: Plan, hub, mosquitto, nodelay: bool, ranges: list) -> list:
    """Rows: acknowledged readings/s, ours against Mosquitto, per cell."""
    out = []
    for devices, per in plan.ingest[nodelay]:
        log("ingest: %d device%s, %d reading%s a message, TCP_NODELAY %s"
            % (devices, "" if devices == 1 else "s", per, "" if per == 1 else "s",
               "on" if nodelay else "off"))
        ours_worker = hub.worker("readings", hub.devices["hs256"][:devices],
                                 duration=plan.duration, per_message=per, window=plan.window)
        theirs_worker = mosquitto.worker("publish", count=devices, per_message=per,
                                         window=plan.window, duration=plan.duration)
        try:
            ours, theirs, ratios = paired(plan, lambda: measure(hub.pid, ours_worker),
                                          lambda: measure(mosquitto.pid, theirs_worker))
        finally:
            ours_worker.close()
            theirs_worker.close()
        for result in ours:
            ranges.extend(result["ranges"])
        out.append(row(
            "ingest", "acked readings/s: %d device%s, %d reading%s/msg, nodelay %s"
            % (devices, "" if devices == 1 else "s", per, "" if per == 1 else "s",
               "on" if nodelay else "off"), "readings/s",
            rates(ours), rates(theirs), ratios, goal=">= 1",
            ours_cpu=cpu_per(ours), theirs_cpu=cpu_per(theirs), cpu_unit="us/reading",
            devices=devices, per_message=per, nodelay=nodelay, window=plan.window))
    return out


def bench_sessions(plan: Plan, hub, mosquitto, nodelay: bool) -> list:
    """Rows: verified sessions/s against Mosquitto connects/s."""
    out = []
    log("sessions: TCP_NODELAY %s" % ("on" if nodelay else "off"))
    workers = {auth: hub.worker("handshakes", hub.devices[auth][:plan.concurrency],
                                duration=plan.duration, concurrency=plan.concurrency)
               for auth in ("es256", "hs256")}
    theirs_worker = mosquitto.worker("connects", duration=plan.duration,
                                     concurrency=plan.concurrency)
    try:
        for auth in ("es256", "hs256") if not plan.quick or nodelay else ("es256",):
            ours, theirs, ratios = paired(plan, lambda: measure(hub.pid, workers[auth]),
                                          lambda: measure(mosquitto.pid, theirs_worker))
            out.append(row(
                "sessions", "verified sessions/s (%s device JWT), %d concurrent, nodelay %s"
                % (auth.upper(), plan.concurrency, "on" if nodelay else "off"), "sessions/s",
                rates(ours), rates(theirs), ratios, goal=">= 1",
                ours_cpu=cpu_per(ours, 1e3), theirs_cpu=cpu_per(theirs, 1e3),
                cpu_unit="ms/session", nodelay=nodelay, auth=auth,
                note="Mosquitto: TLS connect + CONNECT/CONNACK"))
    finally:
        for worker in workers.values():
            worker.close()
        theirs_worker.close()
    return out


def bench_memory(plan: Plan, hub, mosquitto) -> list:
    """Rows: RSS per idle session, ours against Mosquitto."""
    out = []
    for size in plan.memory_sizes:
        ours, theirs, ratios = [], [], []
        for index in range(plan.slow_rounds):
            log("memory: %d idle sessions, round %d" % (size, index + 1))

            def ours_fn() -> float:
                hub.stop()
                hub.start(True)  # a fresh process: freed memory is not given back to the OS
                warm = hub.worker("idle", hub.devices["es256"][:20])
                warm.close()
                time.sleep(0.5)
                before = hub.rss_kb()
                idle = hub.worker("idle", hub.devices["es256"][:size])
                time.sleep(1.0)
                after = hub.rss_kb()
                idle.close()
                return (after - before) * 1024.0 / size

            def theirs_fn() -> float:
                mosquitto.stop()
                mosquitto.start(True)
                warm = mosquitto.worker("idle", count=20)
                warm.close()
                time.sleep(0.5)
                before = rss_of(mosquitto.pid)
                idle = mosquitto.worker("idle", count=size)
                time.sleep(1.0)
                after = rss_of(mosquitto.pid)
                idle.close()
                return (after - before) * 1024.0 / size

            if index % 2 == 0:
                a, b = ours_fn(), theirs_fn()
            else:
                b, a = theirs_fn(), ours_fn()
            ours.append(a / 1000)
            theirs.append(b / 1000)
            ratios.append(a / b)
        out.append(row("memory", "RSS per idle verified TLS session, %d sessions" % size, "kB",
                       ours, theirs, ratios, goal="<= 1", sessions=size,
                       note="server RSS growth / sessions (fresh server each round)"))
    return out


def rss_of(pid: int) -> int:
    """VmRSS of ``pid`` in KiB."""
    from common import rss_kb

    return rss_kb(pid)


def bench_api(plan: Plan, hub, workdir: str) -> list:
    """Rows: telemetry reads/s with the token check against without."""
    from api_bench import ApiServers

    device = hub.devices["hs256"][-1]["device_id"]
    servers = ApiServers(hub.data_dir, hub.ca_path, device, plan.duration)
    out = []
    try:
        for limit, load in servers.loads.items():
            log("api: telemetry read (%d reading%s) with and without the token check"
                % (limit, "" if limit == 1 else "s"))

            def run(auth: bool) -> dict:
                return measure(servers.pid(auth), load, "run %d" % servers.port(auth))

            checked, unchecked, ratios = paired(plan, lambda: run(True), lambda: run(False))
            out.append(row(
                "api", "GET /api/v1/devices/{id}/telemetry?limit=%d, %d connections"
                % (limit, servers.connections), "requests/s",
                rates(checked), rates(unchecked), ratios, goal="",
                ours_cpu=cpu_per(checked, 1e3), theirs_cpu=cpu_per(unchecked, 1e3),
                cpu_unit="ms/request", theirs_name="no token check", limit=limit,
                note="same app with the authenticate dependency overridden; HTTPS keep-alive"))
    finally:
        servers.close()
    return out


def run_micropython(modules: list, mode: str, bare: bool) -> dict:
    """Run benchmarks/mp_heap.py under MicroPython; return its JSON line."""
    command = ["node", MP_RUNNER, "--module-dir", ROOT, "--modules", ",".join(modules),
               "--heap", "512k", "--script", os.path.join(ROOT, "benchmarks", "mp_heap.py")]
    if bare:
        command.append("--bare-packages")
    command += ["--", mode]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError("MicroPython run failed: %s" % (done.stderr or done.stdout)[-500:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_micropython() -> list:
    """Rows: heap figures under MicroPython."""
    log("micropython: heap under the MicroPython interpreter (WebAssembly port)")
    if not ensure_micropython():
        return [row("micropython", "not measured: node or the MicroPython npm package is "
                    "missing", "", [float("nan")])]
    core = run_micropython(MP_CORE, "core", True)
    sdk = run_micropython(MP_SDK, "sdk", False)
    return [
        row("micropython", "heap allocated by importing the wire core (from .py source)", "B",
            [core["import_allocated"]], note="%d B stay live after a collection"
            % core["import_retained"], retained=core["import_retained"]),
        row("micropython", "heap allocated by importing the board client (from .py source)",
            "B",
            [sdk["import_allocated"]], note="%d B stay live after a collection"
            % sdk["import_retained"], retained=sdk["import_retained"]),
        row("micropython", "heap allocated per publish, 1 reading (flash queue, seal, frame)",
            "B", sdk["one"], note="Client core: queue append + Telemetry of one reading"),
        row("micropython", "heap allocated per reading, batch of 16 (flash queue, seal, frame)",
            "B", [v / 16.0 for v in sdk["batch16"]],
            note="16 appends + one Telemetry of 16 readings, divided by 16"),
        row("micropython", "heap allocated by the core to send one Telemetry (1 reading)", "B",
            core["one"], note="message, validation, CBOR, stream frame"),
        row("micropython", "heap allocated by the core to send one Telemetry (16 readings)",
            "B", core["batch16"]),
    ]


def bench_serial(plan: Plan, hub, workdir: str) -> list:
    """Rows: serial goodput against the framing limit."""
    from serial_bench import SerialBench

    device = hub.devices["hs256"][-2]
    with open(hub.ca_path) as handle:
        ca_pem = handle.read()
    bundle = {"version": 1, "device_id": device["device_id"], "hub_id": hub.hub_id,
              "auth": "hs256", "secret_b64": device["secret_b64"], "ca_pem": ca_pem,
              "hub_host": "127.0.0.1", "hub_port": hub.port, "server_name": "localhost"}
    out = []
    for label, in_flight, rounds in (("SDK window", 0, plan.slow_rounds),
                                     ("stop-and-wait reference", 1, 1)):
        log("serial: %s" % label)
        bench = SerialBench(workdir, hub.port, hub.ca_path, bundle, plan.serial_readings,
                            in_flight)
        try:
            results = [bench.run() for _ in range(rounds)]
        finally:
            bench.close()
        out.append(row(
            "serial", "goodput at 115200 baud, %s (%d batch%s in flight)" % (
                label, bench.max_in_flight, "" if bench.max_in_flight == 1 else "es"), "B/s",
            [r["goodput"] for r in results], [r["max_goodput"] for r in results],
            [r["goodput"] / r["max_goodput"] for r in results],
            goal=">= 0.95" if not in_flight else "", theirs_name="framing limit",
            note="%d readings in %d Telemetry frames; idle line %.0f ms in %d gaps "
                 "(longest %.1f ms)" % (
                     results[0]["board"]["readings"], results[0]["frames"],
                     median([r["idle_ms"] for r in results]),
                     int(median([r["stalls"] for r in results])),
                     median([r["longest_gap_ms"] for r in results])),
            runs=results))
    return out


# -- the run ---------------------------------------------------------------------------------


def verify_store(hub, ranges: list) -> dict:
    """Count every acknowledged reading in the store; fail if one is missing."""
    from hub_bench import expected_readings

    wanted = expected_readings(ranges)
    stored = hub.count_stored(ranges)
    opened = hub.check_readable(sorted({r[0] for r in ranges})[:5])
    if stored != wanted:
        raise RuntimeError("%d readings were acknowledged but %d are in the store"
                           % (wanted, stored))
    return {"acked": wanted, "stored": stored, "opened": opened}


def bench(plan: Plan) -> dict:
    """Run the plan; return the rows and the run's metadata."""
    from hub_bench import Hub
    from mqtt_bench import Mosquitto, ensure_mosquitto, mosquitto_version

    started = time.monotonic()
    raise_nofile()
    meta = {"started": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "python": platform.python_version(), "openssl": ssl.OPENSSL_VERSION,
            "cpus": os.cpu_count(), "machine": platform.machine(), "quick": plan.quick,
            "rounds": plan.rounds, "slow_rounds": plan.slow_rounds,
            "duration_s": plan.duration, "window": plan.window,
            "load_average_start": os.getloadavg()}
    needs_mqtt = {"ingest", "sessions", "memory", "wire"} & set(plan.sections)
    if needs_mqtt:
        meta["paho_mqtt"] = ensure_paho()
    if {"ingest", "sessions", "memory"} & set(plan.sections):
        meta["mosquitto"] = mosquitto_version(ensure_mosquitto(log))
    rows = []
    if "wire" in plan.sections:
        log("wire: bytes per reading")
        rows += bench_wire()
    with tempfile.TemporaryDirectory(prefix="smartx-bench-") as workdir:
        log("setting up a hub with %s devices" % plan.devices_needed)
        hub = Hub(workdir, plan.devices_needed)
        mosquitto = Mosquitto(workdir, hub.cert_path, hub.key_path, hub.ca_path) \
            if needs_mqtt - {"wire"} else None
        ranges = []
        try:
            for nodelay in (True, False):
                wanted = [s for s in ("ingest", "sessions") if s in plan.sections]
                if not wanted or (not nodelay and not plan.ingest[False]):
                    continue
                hub.start(nodelay)
                mosquitto.start(nodelay)
                try:
                    if "ingest" in wanted:
                        rows += bench_ingest(plan, hub, mosquitto, nodelay, ranges)
                    if "sessions" in wanted:
                        rows += bench_sessions(plan, hub, mosquitto, nodelay)
                finally:
                    hub.stop()
                    mosquitto.stop()
            if ranges:
                meta["store_check"] = verify_store(hub, ranges)
                log("store check: %(acked)d acked readings, %(stored)d in the store"
                    % meta["store_check"])
            if "memory" in plan.sections:
                hub.start(True)
                mosquitto.start(True)
                try:
                    rows += bench_memory(plan, hub, mosquitto)
                finally:
                    hub.stop()
                    mosquitto.stop()
            if "api" in plan.sections:
                rows += bench_api(plan, hub, workdir)
            if "micropython" in plan.sections:
                rows += bench_micropython()
            if "serial" in plan.sections:
                hub.start(True)
                try:
                    rows += bench_serial(plan, hub, workdir)
                finally:
                    hub.stop()
        finally:
            hub.stop()
            if mosquitto is not None:
                mosquitto.stop()
    meta["seconds"] = time.monotonic() - started
    meta["load_average_end"] = os.getloadavg()
    return {"meta": meta, "rows": rows}


def fmt(value: float) -> str:
    """A number for the table."""
    if value != value:  # NaN
        return "-"
    if abs(value) >= 1000:
        return "{:,.0f}".format(value)
    if abs(value) >= 100:
        return "%.0f" % value
    if abs(value) >= 10:
        return "%.1f" % value
    return "%.2f" % value


def table(result: dict) -> str:
    """The result as a plain-text table."""
    lines = []
    header = ("%-11s %-72s %12s %12s  %-15s %7s %-6s  %s"
              % ("section", "metric", "SmartX", "other", "other is", "ratio", "goal",
                 "server CPU (SmartX | other)"))
    lines.append(header)
    lines.append("-" * len(header))
    for r in result["rows"]:
        cpu = ""
        if "ours_cpu" in r:
            cpu = "%s | %s %s" % (fmt(r["ours_cpu"]), fmt(r.get("theirs_cpu", float("nan"))),
                                  r["cpu_unit"])
        lines.append("%-11s %-72s %12s %12s  %-15s %7s %-6s  %s" % (
            r["section"], r["metric"][:72], fmt(r["ours"]) + " " * 0,
            fmt(r["theirs"]) if "theirs" in r else "",
            r["theirs_name"] if "theirs" in r else "",
            ("%.2f" % r["ratio"]) if "ratio" in r else "", r["goal"], cpu))
    lines.append("")
    lines.append("units: ingest readings/s, sessions sessions/s, memory kB, wire B/reading, "
                 "api requests/s, micropython B, serial B/s; ratio = SmartX / other "
                 "(median of per-round ratios)")
    meta = result["meta"]
    lines.append("Python %s, %s, %s CPUs shared by servers and load generators; %s; "
                 "medians of %d round(s) of %.1f s (memory, serial: %d); %.0f s in all"
                 % (meta["python"], meta["openssl"], meta["cpus"],
                    meta.get("mosquitto", "no Mosquitto"), meta["rounds"], meta["duration_s"],
                    meta["slow_rounds"], meta["seconds"]))
    check = meta.get("store_check")
    if check:
        lines.append("ingest: every acknowledged reading was found in the encrypted store "
                     "(%d of %d; a sample opened and decrypted)" % (check["stored"],
                                                                    check["acked"]))
    return "\n".join(lines)


def markdown(result: dict) -> str:
    """The table as Markdown (docs/performance.md quotes it)."""
    lines = ["| section | metric | SmartX | other | ratio | goal | server CPU, SmartX / other |",
             "|---|---|---:|---:|---:|---|---|"]
    for r in result["rows"]:
        cpu = ""
        if "ours_cpu" in r:
            cpu = "%s / %s %s" % (fmt(r["ours_cpu"]), fmt(r.get("theirs_cpu", float("nan"))),
                                  r["cpu_unit"].replace("us/", "µs/"))
        other = "%s (%s)" % (fmt(r["theirs"]), r["theirs_name"]) if "theirs" in r else ""
        lines.append("| %s | %s | %s %s | %s | %s | %s | %s |" % (
            r["section"], r["metric"], fmt(r["ours"]), r["unit"], other,
            ("%.2f" % r["ratio"]) if "ratio" in r else "", r["goal"].replace(">=", "≥")
            .replace("<=", "≤"), cpu))
    return "\n".join(lines)


def main() -> None:
    """Parse the options, run, print the table and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="a reduced set (about 2 minutes) for development")
    parser.add_argument("--rounds", type=int,
                        help="rounds per figure (default 4, memory and serial 3; quick 1)")
    parser.add_argument("--duration", type=float,
                        help="seconds per throughput measurement (default 3, quick 1.5)")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, help="run only these sections")
    parser.add_argument("--json", help="write the JSON here (default: bench-results/)")
    args = parser.parse_args()
    plan = Plan(args)
    result = bench(plan)
    text = table(result)
    print(text)
    path = args.json
    if path is None:
        os.makedirs(RESULTS_DIR, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path = os.path.join(RESULTS_DIR, "bench-%s%s.json" % (stamp, "-quick" if plan.quick
                                                                 else ""))
    with open(path, "w") as handle:
        json.dump(result, handle, indent=1)
    if args.json is None:
        # A quick run does not replace the last full one.
        latest = os.path.join(RESULTS_DIR, "latest-quick" if plan.quick else "latest")
        shutil.copyfile(path, latest + ".json")
        with open(latest + ".txt", "w") as handle:
            handle.write(text + "\n")
        with open(latest + ".md", "w") as handle:
            handle.write(markdown(result) + "\n")
    print("\nJSON: %s" % os.path.relpath(path, ROOT))


if __name__ == "__main__":
    main()
