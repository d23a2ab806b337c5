"""Figures for the serial path (docs/hil.md, "Measured"): run ``python -m hil.measure``.

- ``goodput``: one simulated board on a serial link paced at the line rate (115200 baud, 8N1:
  10 bits a byte, so 11 520 bytes/s each way), behind the test host's gateway, publishes a
  burst of readings; the time until the hub has acknowledged all of them gives the payload
  bytes per second (the readings' values), the message bytes per second (the Telemetry
  frames' CBOR) and the wire bytes per second (with COBS, CRC and delimiters), against the
  line rate.
- ``boards``: N simulated boards, each publishing every 500 ms, behind ONE
  ``examples/pi_gateway.py`` process: how long until all are online, the gateway's CPU time
  per second, whether every board's readings keep arriving.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Dict, List

from hil.lab import Lab

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINE_RATE = 115200


def goodput(count: int, size: int, baudrate: int = LINE_RATE) -> Dict[str, float]:
    """Publish ``count`` readings of ``size`` value bytes; figures of the transfer.

    The simulated line hands a frame on when its time slot on the wire begins (the pty itself
    has no baud limit), so the rates are taken between the arrivals of the second and the last
    Telemetry frame of the burst, over the frames from the second to the one before the last:
    exactly the time those frames held the line. (The first frame is left out: its arrival
    also carries the time the board took to publish the burst.)"""
    from smartx_device import messages as m

    lab = Lab(tempfile.mkdtemp(prefix="hil-measure-"), ["sim"], baudrate).build()
    arrivals: List[tuple] = []  # (time, message bytes, wire bytes, value bytes)
    try:
        board = lab.boards[0]
        board.ensure_ready()
        if board.broken:
            raise RuntimeError(board.broken)
        relay_up = board.port.on_frame

        def tap(payload: bytes) -> None:
            message = m.decode_message(payload)
            if message.TYPE == m.TELEMETRY:
                values = sum(len(r[2]) for r in message.readings if isinstance(r[2], bytes))
                arrivals.append((time.monotonic(), len(payload),
                                 len(board.port.framer.encode(payload)), values))
            relay_up(payload)

        with board.paused():
            time.sleep(1.0)  # let the periodic readings drain
            board.port.on_frame = tap
            before = len(lab.hub.readings(board.device_id, "bulk"))
            started = time.monotonic()
            command = lab.hub.send_command(board.device_id, "publish",
                                           {"count": count, "size": size})
            deadline = started + 120
            while len(lab.hub.readings(board.device_id, "bulk")) - before < count:
                if time.monotonic() > deadline:
                    raise RuntimeError("the burst did not arrive")
                time.sleep(0.05)
            end_to_end = time.monotonic() - started
            lab.hub.wait_command(command.id)
            board.port.on_frame = relay_up
        bulk = [a for a in arrivals if a[3]]
        if len(bulk) < 3:
            raise RuntimeError("the burst came in %d frame(s): publish more" % len(bulk))
        span = bulk[-1][0] - bulk[1][0]
        line_bytes = baudrate / 10.0
        sums = [sum(a[i] for a in bulk[1:-1]) for i in (1, 2, 3)]
        return {"baudrate": baudrate, "line_bytes_per_s": line_bytes, "readings": count,
                "value_bytes": size, "frames": len(bulk),
                "end_to_end_seconds": round(end_to_end, 2),
                "payload_bytes_per_s": round(sums[2] / span),
                "message_bytes_per_s": round(sums[0] / span),
                "wire_bytes_per_s": round(sums[1] / span),
                "payload_share_of_line": round(sums[2] / span / line_bytes, 3),
                "framing_efficiency": round(sums[2] / sums[1], 3)}
    finally:
        lab.close()


def _cpu_seconds(pid: int) -> float:
    with open("/proc/%d/stat" % pid, "r", encoding="ascii") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def boards(count: int, settle_s: float = 10.0) -> Dict[str, float]:
    """``count`` simulated boards behind one gateway process; its cost and what arrives."""
    from firmware_sim import Board

    from hil.hub import HilHub

    directory = tempfile.mkdtemp(prefix="hil-measure-")
    hub = HilHub(os.path.join(directory, "hub"),
                 limits={"connection_rate_per_ip": 1000, "connection_burst_per_ip": 1000,
                         "max_unverified_per_ip": 1000}).start()
    gateway_bundle = os.path.join(directory, "gateway.json")
    with open(gateway_bundle, "w", encoding="utf-8") as handle:
        json.dump(hub.enrol_gateway("pi"), handle)
    sims: List[Board] = []
    ids = []
    firmware = os.path.join(ROOT, "hil", "firmware", "main.py")
    for index in range(count):
        bundle = hub.enrol("b%03d" % index, via="pi")
        ids.append(bundle["device_id"])
        sims.append(Board("b%03d" % index, firmware, bundle=bundle, serial=True,
                          directory=os.path.join(directory, "b%03d" % index),
                          files={"hil.json": json.dumps({"link": "uart", "uart": 0})},
                          console_log=False))
    process = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "examples", "pi_gateway.py"), "--bundle",
         gateway_bundle, "--hub", "127.0.0.1:%d" % hub.device_port, "--status-interval", "0",
         "--log-level", "WARNING"] + [b.serial_path for b in sims],
        cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))
    try:
        time.sleep(1.0)
        started = time.monotonic()
        for board in sims:
            board.start()
        while sum(hub.is_online(i) for i in ids) < count:
            if time.monotonic() - started > 120:
                break
            time.sleep(0.1)
        all_online = time.monotonic() - started
        online = sum(hub.is_online(i) for i in ids)
        cpu0, t0 = _cpu_seconds(process.pid), time.monotonic()
        own0 = _cpu_seconds(os.getpid())
        stored0 = sum(len(hub.readings(i)) for i in ids)
        time.sleep(settle_s)
        cpu = (_cpu_seconds(process.pid) - cpu0) / (time.monotonic() - t0)
        stored = sum(len(hub.readings(i)) for i in ids) - stored0
        with open("/proc/%d/status" % process.pid, encoding="ascii") as handle:
            rss_kb = next(int(line.split()[1]) for line in handle if line.startswith("VmRSS"))
        return {"boards": count, "online": online, "seconds_to_all_online": round(all_online, 1),
                "gateway_cpu_share": round(cpu, 3),
                "gateway_cpu_ms_per_board_second": round(cpu * 1000 / count, 3),
                "gateway_rss_mb": round(rss_kb / 1024, 1),
                "readings_per_s_stored": round(stored / settle_s, 1),
                "readings_per_s_published": round(count / 0.5, 1),
                "hub": {k: v for k, v in hub.stats().items()
                        if k.startswith(("refused", "auth", "timeouts", "sessions",
                                         "protocol", "route"))},
                "measuring_process_cpu_share": round(
                    (_cpu_seconds(os.getpid()) - own0) / (time.monotonic() - t0), 2)}
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
        for board in sims:
            board.close()
        hub.close()


def main(argv: List[str] = None) -> int:
    """``python -m hil.measure goodput|boards``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    g = sub.add_parser("goodput")
    g.add_argument("--count", type=int, default=300)
    g.add_argument("--size", type=int, default=100)
    g.add_argument("--baud", type=int, default=LINE_RATE)
    b = sub.add_parser("boards")
    b.add_argument("counts", type=int, nargs="+")
    args = parser.parse_args(argv)
    if args.what == "goodput":
        print(json.dumps(goodput(args.count, args.size, args.baud)))
    else:
        for count in args.counts:
            print(json.dumps(boards(count)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
