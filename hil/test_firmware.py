"""The HIL node firmware on a real MicroPython interpreter (the WebAssembly port, through
tests/micropython/run.mjs): what a real board runs, checked beyond the simulator, which runs
the firmware on CPython. Node and the npm package are required (``make test`` installs them);
their absence fails, with the fix, rather than skipping."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from hil.hub import HilHub

ROOT = Path(__file__).resolve().parent.parent
RUNNER = ROOT / "tests" / "micropython" / "run.mjs"
PACKAGE = ROOT / "node_modules" / "@micropython" / "micropython-webassembly-pyscript"
# The SDK as a board imports it (docs/device-sdk.md, "MicroPython"), and the firmware.
BOARD_FILES = ["smartx_device/%s.py" % name for name in (
    "__init__", "_compat", "_utf8", "errors", "reasons", "cbor", "framing", "messages", "session", "jwt",
    "queue", "auth", "backoff", "client", "clock", "credentials", "transport")] + [
    "hil/firmware/main.py"]


@pytest.mark.sim_only
def test_firmware_boots_and_says_hello_on_micropython(tmp_path):
    node = shutil.which("node")
    if node is None or not (PACKAGE / "micropython.mjs").is_file():
        pytest.fail("this test needs Node.js and the npm package "
                    "@micropython/micropython-webassembly-pyscript: run `npm install` at the "
                    "repository root (`make test` does)")
    hub = HilHub(str(tmp_path / "hub"))
    try:
        bundle = hub.enrol("mp-board")
    finally:
        hub.close()
    result = subprocess.run(
        [node, str(RUNNER), "--module-dir", str(ROOT), "--modules", ",".join(BOARD_FILES),
         "--script", str(ROOT / "hil" / "firmware" / "check_micropython.py"), "--heap", "512k",
         "--", json.dumps(bundle)],
        capture_output=True, text=True, timeout=60, cwd=str(ROOT))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert "SmartX HIL node %s booting (boot 1)" % bundle["device_id"] in lines
    assert "hello from %s" % bundle["device_id"] in lines
    assert "tap ok" in lines
