"""The Raspberry Pi gateway (examples/pi_gateway.py), run as its own process, bridging simulated
serial boards (firmware_sim, pseudo-terminals pyserial opens as USB adapters) to a real hub over
TLS with its client certificate.

Covered: several boards through one gateway, one unplugged and plugged back; a hub restart;
forged or misrouted board identities refused by the hub; the hub found by zeroconf inside a
private network namespace (no multicast on a real interface).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from typing import Callable, List, Optional

import pytest

from firmware_sim import Board
from smartx_hub import cli as hub_cli
from smartx_hub.server import run_hub_in_thread
from smartx_hub.state import init_hub

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GATEWAY = os.path.join(ROOT, "examples", "pi_gateway.py")
FIRMWARE = os.path.join(ROOT, "hil", "firmware", "main.py")  # the HIL node firmware


def wait_until(predicate: Callable[[], object], timeout: float, what: str) -> object:
    """Poll until ``predicate`` is truthy; fail naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError("timed out after %.0f s waiting for %s" % (timeout, what))
        time.sleep(0.05)


def enrol(data: str, name: str, out_dir: str, *flags: str) -> dict:
    """``smartx-hub device add NAME --auth hs256 FLAGS`` in-process; the bundle as a dict."""
    out = os.path.join(out_dir, name + ".json")
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        status = hub_cli.main(["device", "add", name, "--auth", "hs256", "--data", data,
                               "--out", out, "--json", *flags])
    assert status == 0, "enrolling %s failed" % name
    with open(out, encoding="utf-8") as handle:
        return json.load(handle)


class GatewayProcess:
    """examples/pi_gateway.py as a child process; its log lines are collected."""

    def __init__(self, bundle_path: str, ports: List[str], hub_port: Optional[int],
                 *extra: str) -> None:
        argv = [sys.executable, GATEWAY, "--bundle", bundle_path, "--status-interval", "0",
                *extra, *ports]
        if hub_port is not None:
            argv[2:2] = ["--hub", "127.0.0.1:%d" % hub_port]
        self.lines: List[str] = []
        self.process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True, cwd=ROOT,
                                        env=dict(os.environ, PYTHONPATH=ROOT))
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    def log(self) -> str:
        """Everything the gateway logged so far."""
        return "\n".join(self.lines)

    def stop(self) -> int:
        """SIGTERM, then wait; the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self._reader.join(5)
        return self.process.returncode


class Bench:
    """A hub, a gateway enrolled on it, and simulated serial boards."""

    def __init__(self, tmp: str) -> None:
        self.tmp = tmp
        self.data = os.path.join(tmp, "hub")
        self.ctx = init_hub(self.data)
        self.port = 0
        self.hub = None
        self.start_hub()
        self.gateway_bundle = enrol(self.data, "pi-1", tmp, "--gateway")
        self.gateway_path = os.path.join(tmp, "pi-1.json")
        self.boards: List[Board] = []
        self.gateways: List[GatewayProcess] = []

    def start_hub(self) -> None:
        self.hub = run_hub_in_thread(self.ctx, device_port=self.port, api=False,
                                     limits={"auth_failures_before_backoff": 1000})
        self.port = self.hub.device_port
        if self.hub.listener.client_ca_pem is None:  # a server that does not pass the CA yet
            self.hub.listener.accept_gateways(self.ctx.ca_cert_pem)

    def stop_hub(self) -> None:
        self.hub.stop()

    def board(self, name: str, bundle: dict) -> Board:
        """A simulated board on a serial link (115200 baud) running the HIL firmware."""
        board = Board(name, FIRMWARE, directory=os.path.join(self.tmp, "boards", name),
                      bundle=bundle, serial=True,
                      files={"hil.json": json.dumps({"link": "uart", "uart": 0})})
        self.boards.append(board)
        return board

    def gateway(self, ports: List[str], *extra: str, hub: bool = True) -> GatewayProcess:
        """Start the gateway on ``ports`` and wait until it has them open."""
        process = GatewayProcess(self.gateway_path, ports, self.port if hub else None, *extra)
        self.gateways.append(process)
        wait_until(lambda: process.log().count("] port open") >= len(ports), 15,
                   "the gateway to open its ports")
        return process

    def online(self, device_id: str) -> bool:
        return self.hub.live.is_online(device_id)

    def seq(self, device_id: str) -> List[int]:
        """The n of every stored "seq" reading of the device's first boot."""
        readings = self.ctx.store.query_telemetry(device_id, stream="seq", limit=10000)
        return [r.value[1] for r in readings if r.value[0] == 1]

    def close(self) -> None:
        for process in self.gateways:
            process.stop()
        for board in self.boards:
            board.close()
        self.hub.stop()
        self.ctx.close()


@pytest.fixture
def bench(tmp_path):
    bench = Bench(str(tmp_path))
    yield bench
    bench.close()


def assert_first_readings_complete(bench: Bench, device_id: str, count: int) -> None:
    """Readings 0 .. count-1 of boot 1 are stored, and nothing is stored twice."""
    values = wait_until(lambda: (lambda v: v if set(range(count)) <= set(v) else None)(
        bench.seq(device_id)), 15, "%d readings of %s" % (count, device_id))
    assert len(values) == len(set(values)), "a reading was stored twice"


def test_gateway_bridges_several_boards_and_survives_an_unplug(bench):
    bundles = [enrol(bench.data, "board-%d" % i, bench.tmp, "--via", "pi-1") for i in range(3)]
    boards = [bench.board("b%d" % i, bundle) for i, bundle in enumerate(bundles)]
    gateway = bench.gateway([board.serial_path for board in boards])
    for board in boards:
        board.start()
    ids = [bundle["device_id"] for bundle in bundles]
    wait_until(lambda: all(bench.online(i) for i in ids), 15, "every board online")
    wait_until(lambda: all(len(bench.seq(i)) >= 2 for i in ids), 10, "readings of every board")
    # The boards' console text reaches the gateway's log, one line at a time.
    wait_until(lambda: "/b1/tty] SmartX HIL node %s booting" % ids[1] in gateway.log(), 5,
               "console lines in the log")

    unplugged, others = boards[1], [boards[0], boards[2]]
    unplugged.serial.unplug(1500)
    wait_until(lambda: not bench.online(ids[1]), 5, "the hub to see the unplugged board leave")
    for _ in range(10):  # meanwhile the other boards stay online
        assert bench.online(ids[0]) and bench.online(ids[2])
        time.sleep(0.1)
    wait_until(lambda: bench.online(ids[1]), 15, "the replugged board back online")
    assert gateway.process.poll() is None, gateway.log()
    assert "port lost" in gateway.log()
    published = unplugged.stats().published
    assert_first_readings_complete(bench, ids[1], published)
    for board, device_id in zip(others, (ids[0], ids[2])):
        assert_first_readings_complete(bench, device_id, board.stats().published - 2)
    assert gateway.stop() == 0


def test_gateway_survives_a_hub_restart(bench):
    bundles = [enrol(bench.data, "board-%d" % i, bench.tmp, "--via", "pi-1") for i in range(2)]
    boards = [bench.board("b%d" % i, bundle) for i, bundle in enumerate(bundles)]
    gateway = bench.gateway([board.serial_path for board in boards])
    for board in boards:
        board.start()
    ids = [bundle["device_id"] for bundle in bundles]
    wait_until(lambda: all(bench.online(i) for i in ids), 15, "every board online")
    bench.stop_hub()
    time.sleep(1.5)  # boards queue readings; the gateway backs off from the missing hub
    bench.start_hub()
    wait_until(lambda: all(bench.online(i) for i in ids), 20, "every board back online")
    assert "cannot reach the hub" in gateway.log()
    for board, device_id in zip(boards, ids):
        assert_first_readings_complete(bench, device_id, board.stats().published - 2)
    assert gateway.process.poll() is None


def test_forged_and_misrouted_boards_behind_the_gateway_are_refused(bench):
    good = enrol(bench.data, "good", bench.tmp, "--via", "pi-1")
    forged = dict(enrol(bench.data, "forged", bench.tmp, "--via", "pi-1"))
    forged["secret_b64"] = "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWY="  # not its secret
    enrol(bench.data, "pi-2", bench.tmp, "--gateway")
    elsewhere = enrol(bench.data, "elsewhere", bench.tmp, "--via", "pi-2")
    direct = enrol(bench.data, "direct", bench.tmp)
    boards = {name: bench.board(name, bundle) for name, bundle in
              (("good", good), ("forged", forged), ("elsewhere", elsewhere), ("direct", direct))}
    bench.gateway([board.serial_path for board in boards.values()])
    for board in boards.values():
        board.start()
    wait_until(lambda: bench.online(good["device_id"]), 15, "the legitimate board online")
    boards["forged"].console.expect(r"refused: .*bad_credentials", timeout=15)
    boards["elsewhere"].console.expect(r"refused: .*not_authorised", timeout=15)
    boards["direct"].console.expect(r"refused: .*not_authorised", timeout=15)
    for bundle in (forged, elsewhere, direct):
        assert not bench.online(bundle["device_id"])
        assert bench.ctx.store.query_telemetry(bundle["device_id"]) == []
    stats = bench.hub.listener.stats
    assert stats.get("route_refusals", 0) >= 2
    assert stats.get("auth_failures", 0) >= 1


# Runs inside a private network namespace: only ``lo`` exists, and it carries the multicast
# route, so the announcement and the gateway's queries never reach a real network.
DISCOVERY_SCRIPT = textwrap.dedent("""
    import json, os, subprocess, sys, tempfile, time
    subprocess.run(["ip", "link", "set", "lo", "up", "multicast", "on"], check=True)
    subprocess.run(["ip", "route", "add", "224.0.0.0/4", "dev", "lo"], check=True)
    sys.path.insert(0, os.path.join(os.environ["ROOT"], "tests"))
    import test_gateway as t
    tmp = tempfile.mkdtemp()
    bench = t.Bench(tmp)
    bench.stop_hub()
    bench.hub = t.run_hub_in_thread(bench.ctx, device_port=bench.port, api=False,
                                    advertise=["lo"])
    if bench.hub.listener.client_ca_pem is None:
        bench.hub.listener.accept_gateways(bench.ctx.ca_cert_pem)
    bundle = t.enrol(bench.data, "board", tmp, "--via", "pi-1")
    board = bench.board("b0", bundle)
    gateway = bench.gateway([board.serial_path], "--discover", "--discover-interface",
                            "127.0.0.1", hub=False)
    board.start()
    deadline = time.monotonic() + 30
    while not bench.online(bundle["device_id"]) and time.monotonic() < deadline:
        time.sleep(0.1)
    online = bench.online(bundle["device_id"])
    log = gateway.log()
    bench.close()
    print(json.dumps({"online": online, "port": bench.port, "log": log}))
""")


def test_gateway_finds_the_hub_by_zeroconf_in_a_private_network():
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        pytest.fail("the discovery test needs unshare (util-linux) and ip (iproute2)")
    result = subprocess.run(["unshare", "--net", sys.executable, "-c", DISCOVERY_SCRIPT],
                            capture_output=True, text=True, timeout=90, cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=ROOT, ROOT=ROOT))
    if result.returncode != 0 and "Operation not permitted" in result.stderr:
        pytest.fail("cannot make a private network namespace here (unshare --net needs root"
                    " or user namespaces): %s" % result.stderr.strip())
    assert result.returncode == 0, result.stderr[-3000:]
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert "found hub" in outcome["log"] and ":%d" % outcome["port"] in outcome["log"], \
        outcome["log"]
    assert outcome["online"], outcome["log"]


def test_gateway_refuses_a_bundle_without_a_client_certificate(bench):
    board_bundle = os.path.join(bench.tmp, "plain.json")
    enrol(bench.data, "plain", bench.tmp)
    result = subprocess.run([sys.executable, GATEWAY, "--bundle", board_bundle, "--hub",
                             "127.0.0.1:%d" % bench.port], capture_output=True, text=True,
                            timeout=30, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))
    assert result.returncode == 1
    assert "not a gateway bundle" in result.stderr and "--gateway" in result.stderr
    assert "Traceback" not in result.stderr
