"""Hub discovery by zeroconf, inside a private network namespace (no mDNS leaves the test).

The test re-runs this file as a script under ``unshare --net``: loopback up with multicast, a
route for 224.0.0.0/4 on it, zeroconf bound to 127.0.0.1. There a real hub advertises itself
(``advertise=["lo"]``), a decoy announces another hub id, and a client whose bundle has no hub
address discovers the right hub, verifies TLS against its pinned CA and publishes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _namespace_available():
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return False
    probe = subprocess.run(["unshare", "--net", "true"], capture_output=True)
    return probe.returncode == 0


def test_discovery_finds_the_bundles_hub_in_a_private_namespace(tmp_path):
    assert _namespace_available(), "this test needs unshare --net (root or user namespaces)"
    script = ("ip link set lo up multicast on && ip route add 224.0.0.0/4 dev lo && "
              "exec %s %s --in-namespace %s" % (sys.executable, os.path.abspath(__file__),
                                                tmp_path))
    result = subprocess.run(["unshare", "--net", "sh", "-c", script], capture_output=True,
                            text=True, timeout=60, cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=ROOT))
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["found_port"] == report["hub_port"]
    assert report["decoy_ignored"] is True
    assert report["stored"] == [1, 2, 3]
    assert report["unknown_hub"] is None


def _in_namespace(workdir):
    """Runs inside the namespace: advertise, discover, connect, publish; print a JSON report."""
    import socket

    from zeroconf import IPVersion, ServiceInfo, Zeroconf

    import smartx_device
    from smartx_device.discovery import SERVICE_TYPE, discover_hub
    from smartx_hub import cli
    from smartx_hub.server import run_hub_in_thread
    from smartx_hub.state import init_hub

    # Refuse to run anywhere but a namespace with loopback alone: no mDNS on a real interface.
    interfaces = [name for _, name in socket.if_nameindex()]
    if interfaces != ["lo"]:
        raise SystemExit("not in a private network namespace: %s" % interfaces)
    data = os.path.join(workdir, "hub")
    init_hub(data).close()
    bundle_path = os.path.join(workdir, "node.smartx.json")
    assert cli.main(["device", "add", "node", "--data", data, "--out", bundle_path]) == 0
    bundle = json.load(open(bundle_path))
    del bundle["hub_host"], bundle["hub_port"]  # no address: the client must discover
    open(bundle_path, "w").write(json.dumps(bundle))

    decoy = Zeroconf(interfaces=["127.0.0.1"], ip_version=IPVersion.V4Only)
    decoy.register_service(ServiceInfo(
        SERVICE_TYPE, "hub_decoy0000000000.%s" % SERVICE_TYPE,
        addresses=[socket.inet_aton("127.0.0.1")], port=9,
        properties={"hub_id": "hub_decoy0000000000"}, server="decoy.local."))
    hub = run_hub_in_thread(data, api=False, advertise=["lo"])
    try:
        found = discover_hub(bundle["hub_id"], 10_000, ["127.0.0.1"])
        unknown = discover_hub("hub_nobody000000000", 1500, ["127.0.0.1"])
        client = smartx_device.Client.from_bundle(
            bundle_path, queue_path=os.path.join(workdir, "q.log"),
            discovery_interfaces=["127.0.0.1"], discovery_timeout_ms=10_000)
        assert client.discover
        client.connect()
        for value in (1, 2, 3):
            client.publish("temp", value)
        assert client.flush(5000)
        client.close()
        rows = hub.ctx.store.query_telemetry(bundle["device_id"], limit=10)
        print(json.dumps({"found_port": found.port, "hub_port": hub.device_port,
                          "decoy_ignored": found.name != "hub_decoy0000000000." + SERVICE_TYPE,
                          "stored": sorted(row.value for row in rows),
                          "unknown_hub": None if unknown is None else unknown.name}))
    finally:
        hub.stop()
        decoy.close()


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--in-namespace":
    _in_namespace(sys.argv[2])
