"""The demo (``make demo``) as a smoke test: it prints the dashboard address, a login and a token;
the login opens the dashboard and the token reads the fleet's telemetry through the API."""

import os
import re
import ssl
import subprocess
import sys
import time

import httpx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_demo_prints_a_working_login_and_token_and_exits_cleanly(tmp_path):
    data = str(tmp_path / "demo-data")
    process = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "examples", "demo.py"), "--data", data,
         "--boards", "3", "--seconds", "10", "--api-port", "0", "--interval", "1"],
        cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    output = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            output.append(line)
            if "First reading stored" in line or "no reading reached" in line:
                break
        text = "".join(output)
        assert "First reading stored" in text, text + (process.stderr.read()
                                                      if process.poll() is not None else "")
        url = re.search(r"Dashboard:\s+(https://127\.0\.0\.1:\d+)/", text).group(1)
        password = re.search(r"log in as demo / (\S+)\)", text).group(1)
        token = re.search(r"export TOKEN=(\S+)", text).group(1)
        ca_path = re.search(r"the CA is (\S+)", text).group(1)
        assert os.path.isfile(ca_path)

        headers = {"Authorization": "Bearer " + token}
        trust = ssl.create_default_context(cafile=ca_path)  # the hub's own CA, nothing else
        with httpx.Client(base_url=url, verify=trust, headers=headers, timeout=10) as api:
            devices = api.get("/api/v1/devices").json()["items"]
            assert sorted(d["name"] for d in devices) == ["sim-000", "sim-001", "sim-002"]
            readings = []
            for device in devices:
                page = api.get("/api/v1/devices/%s/telemetry" % device["id"]).json()
                readings.extend(page["items"])
            assert readings and {r["stream"] for r in readings} == {"adc"}
            # The token is read-only: it cannot send commands.
            refused = api.post("/api/v1/devices/%s/commands" % devices[0]["id"],
                               json={"name": "blink", "args": {"times": 1}})
            assert refused.status_code == 403

        with httpx.Client(base_url=url, verify=trust, timeout=10) as browser:
            form = browser.get("/login")
            csrf = re.search(r'name="csrf" value="([^"]+)"', form.text).group(1)
            logged_in = browser.post("/login", data={"username": "demo", "password": password,
                                                     "csrf": csrf})
            assert logged_in.status_code == 303 and logged_in.headers["location"] == "/"
            page = browser.get("/")
            assert page.status_code == 200 and "demo" in page.text  # the dashboard, signed in

        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, err
    assert "hub stopped" in out and "Traceback" not in err
    assert os.path.isfile(os.path.join(data, "demo.json"))
