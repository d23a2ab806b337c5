"""Zeroconf advertisement, tested inside a private network namespace so that no multicast
packet reaches the machine's network: the test re-runs a small script under ``unshare --net``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from smartx_device.messages import PROTOCOL_VERSION
from smartx_hub import discovery

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs inside the namespace: only ``lo`` exists there, and it carries the multicast route.
SCRIPT = textwrap.dedent("""
    import asyncio, json, subprocess, sys, tempfile
    subprocess.run(["ip", "link", "set", "lo", "up", "multicast", "on"], check=True)
    subprocess.run(["ip", "route", "add", "224.0.0.0/4", "dev", "lo"], check=True)
    from smartx_hub import discovery
    from smartx_hub.server import run_hub_in_thread
    from smartx_hub.state import init_hub

    ctx = init_hub(tempfile.mkdtemp() + "/hub")
    hub = run_hub_in_thread(ctx, advertise=["lo"], api=False)
    try:
        found = asyncio.run(discovery.browse(["127.0.0.1"], timeout_s=8.0))
    finally:
        hub.stop()
        ctx.close()
    print(json.dumps({"hub_id": ctx.hub_id, "fingerprint": ctx.ca_fingerprint,
                      "port": hub.device_port, "found": [a.__dict__ for a in found]}))
""")


def run_in_private_network(script: str) -> dict:
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        pytest.fail("discovery tests need unshare (util-linux) and ip (iproute2)")
    result = subprocess.run(["unshare", "--net", sys.executable, "-c", script],
                            capture_output=True, text=True, timeout=60, cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=ROOT))
    if result.returncode != 0 and "unshare" in result.stderr and "Operation not permitted" \
            in result.stderr:
        pytest.fail("cannot make a private network namespace here (unshare --net needs root"
                    " or user namespaces): %s" % result.stderr.strip())
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_serve_advertise_announces_the_device_port_with_its_txt_record():
    outcome = run_in_private_network(SCRIPT)
    assert len(outcome["found"]) == 1
    hub = outcome["found"][0]
    assert hub["name"] == "%s._smartx._tcp.local." % outcome["hub_id"]
    assert hub["hub_id"] == outcome["hub_id"]
    assert hub["protocol"] == str(PROTOCOL_VERSION)
    assert hub["ca_fingerprint"] == outcome["fingerprint"]
    assert hub["port"] == outcome["port"] and hub["addresses"] == ["127.0.0.1"]


def test_service_info_carries_the_txt_record_and_nothing_is_bound():
    info = discovery.service_info("hub_x", "sha256:00", 1234, ["192.0.2.7"])
    assert info.type == discovery.SERVICE_TYPE == "_smartx._tcp.local."
    assert info.properties == {b"hub_id": b"hub_x", b"proto": str(PROTOCOL_VERSION).encode(),
                               b"ca_fingerprint": b"sha256:00"}
    assert info.port == 1234 and info.parsed_addresses() == ["192.0.2.7"]


def test_unknown_interfaces_and_empty_lists_are_refused():
    with pytest.raises(discovery.DiscoveryError):
        discovery.interface_addresses(["no-such-interface0"])
    with pytest.raises(discovery.DiscoveryError):
        discovery.Advertiser("hub_x", "sha256:00", 1, [])
