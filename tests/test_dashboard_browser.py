"""The dashboard in a real headless Chromium (Debian's ``chromium``, driven by Playwright).

The hub is real (init_hub in tmp_path, SQLite, argon2 password) and served by uvicorn over
HTTPS on 127.0.0.1 with the hub's own certificate. Chromium trusts that certificate by its
public key (``--ignore-certificate-errors-spki-list``), not by ignoring TLS errors.
The script: log in, create a token for one device's telemetry, read it once, use it with
httpx (200), revoke it in the page, see the API refuse it (401), see the chart drawn.
"""

from __future__ import annotations

import base64
import hashlib
import os
import time

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from smartx_hub import passwords
from smartx_hub.api import create_app
from smartx_hub.live import LiveSessions
from smartx_hub.state import init_hub
from smartx_hub.store import TelemetryBatch

from hubtools import https_server

CHROMIUM = "/usr/bin/chromium"
PASSWORD = "correct horse battery staple"
SERIES_RGB = (0x1F, 0x77, 0xB4)  # the chart's first series colour (static/chart.js)


def spki_pin(cert_path: str) -> str:
    """base64 SHA-256 of the certificate's SubjectPublicKeyInfo, as Chromium's flag wants it."""
    with open(cert_path, "rb") as handle:
        cert = x509.load_pem_x509_certificate(handle.read())
    der = cert.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(der).digest()).decode("ascii")




def test_dashboard_token_lifecycle_and_chart(tmp_path):
    if not os.path.exists(CHROMIUM):
        pytest.fail("Debian's chromium is required at %s for the dashboard test "
                    "(apt-get install chromium)" % CHROMIUM)
    from playwright.sync_api import sync_playwright

    now = int(time.time() * 1000)
    hub = init_hub(str(tmp_path / "hub"), now_ms=now)
    hub.store.add_user("alice", passwords.hash_password(PASSWORD), now)
    device = hub.store.add_device("greenhouse", "hs256", None, b"g" * 32, now)
    other = hub.store.add_device("garage", "hs256", None, b"h" * 32, now)
    hub.store.add_telemetry([TelemetryBatch(device.id, i, [
        ("temp", now - (40 - i) * 1000, 18.0 + (i % 7) * 0.8),
        ("humidity", now - (40 - i) * 1000, 40.0 + (i % 5))], now) for i in range(40)])
    app = create_app(hub, LiveSessions())
    api_tls = hub.client_tls_context()

    with https_server(app, hub) as base, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run",
            "--ignore-certificate-errors-spki-list=" + spki_pin(hub.server_cert_path)])
        try:
            page = browser.new_context().new_page()
            page.set_default_timeout(15_000)
            dialogs = []

            def accept(dialog):
                dialogs.append(dialog.message)
                dialog.accept()
            page.on("dialog", accept)

            # Log in.
            page.goto(base + "/")
            assert page.url == base + "/login"
            page.fill("#login-username", "alice")
            page.fill("#login-password", PASSWORD)
            page.click("#login-submit")
            page.wait_for_url(base + "/")
            page.wait_for_selector("#devices-table tbody tr >> text=greenhouse")

            # Create a token: telemetry:read, limited to the greenhouse.
            page.goto(base + "/tokens")
            page.fill("#token-name", "curl test")
            page.check('input[name=scope][value="telemetry:read"]')
            page.check("#token-limit-devices")
            page.wait_for_selector('#token-devices option[value="%s"]' % device.id, state="attached")
            page.select_option("#token-devices", [device.id])
            page.click("#token-create")
            page.wait_for_selector("#new-token", state="visible")
            token = page.input_value("#new-token-value")
            assert token.startswith("sxh_")
            assert "cannot be shown again" in page.inner_text("#new-token")

            # Use it against the API from outside the browser.
            with httpx.Client(base_url=base, verify=api_tls, timeout=10) as api:
                headers = {"Authorization": "Bearer " + token}
                r = api.get("/api/v1/devices/%s/telemetry" % device.id, headers=headers)
                assert r.status_code == 200 and len(r.json()["items"]) == 80
                assert api.get("/api/v1/devices/%s/telemetry" % other.id,
                               headers=headers).status_code == 403
                assert api.get("/api/v1/devices", headers=headers).status_code == 403

                # Shown once: after "Done", and after a reload, the page no longer has it.
                page.click("#new-token-done")
                assert page.input_value("#new-token-value") == ""
                page.reload()
                row = page.wait_for_selector('tr[data-status="active"] >> text=curl test')
                assert token not in page.content()
                assert ("…" + token[-4:]) in row.evaluate("r => r.closest('tr').innerText")

                # Revoke it in the page; the API refuses it on the next request.
                token_row = page.locator('tr[data-status="active"]', has_text="curl test")
                token_id = token_row.get_attribute("data-token-id")
                token_row.locator("button.revoke").click()
                page.wait_for_selector('tr[data-token-id="%s"][data-status="revoked"]' % token_id)
                assert dialogs and "Revoke" in dialogs[-1]
                r = api.get("/api/v1/devices/%s/telemetry" % device.id, headers=headers)
                assert r.status_code == 401 and r.json()["error"] == "token_revoked"

            # The device page draws its telemetry chart.
            page.goto(base + "/devices/" + device.id)
            page.wait_for_function(
                "() => Number(document.getElementById('chart').dataset.points || 0) > 0")
            assert page.get_attribute("#chart", "data-points") == "80"
            coloured = page.evaluate("""([r, g, b]) => {
                const canvas = document.getElementById('chart');
                const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
                let hits = 0;
                for (let i = 0; i < data.length; i += 4) {
                    if (data[i + 3] > 200 && Math.abs(data[i] - r) < 24 && Math.abs(data[i + 1] - g) < 24
                        && Math.abs(data[i + 2] - b) < 24) { hits += 1; }
                }
                return hits;
            }""", list(SERIES_RGB))
            assert coloured > 100, "the chart's series line is not drawn (%d pixels)" % coloured
            assert "humidity" in page.inner_text("#chart-legend")
        finally:
            browser.close()
    hub.close()
