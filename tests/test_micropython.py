"""The protocol core on a real MicroPython interpreter (docs/micropython.md).

MicroPython 1.27, compiled to WebAssembly (npm package @micropython/micropython-webassembly-pyscript),
runs under Node through ``tests/micropython/run.mjs``. The tests here run the check scripts of
``tests/micropython/`` in it and prove the harness can fail. Node and the package are required:
CI must prove MicroPython, so their absence fails (with the command that fixes it), never skips.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RUNNER = ROOT / "tests" / "micropython" / "run.mjs"
PACKAGE_ENTRY = ROOT / "node_modules" / "@micropython" / "micropython-webassembly-pyscript" / "micropython.mjs"
VECTORS = ROOT / "tests" / "vectors"
SESSION_SCRIPT = "tests/micropython/session_exchange.py"

# The protocol core: what must import and pass its vectors under MicroPython. Listed in
# dependency order; a file not written yet is left out, so the proof grows with the core.
CORE_MODULES = [
    "smartx_device/_compat.py",
    "smartx_device/_utf8.py",
    "smartx_device/errors.py",
    "smartx_device/reasons.py",
    "smartx_device/cbor.py",
    "smartx_device/framing.py",
    "smartx_device/messages.py",
    "smartx_device/session.py",
    "smartx_device/jwt.py",
    "smartx_device/queue.py",
]
# The core without jwt and queue: the part the 64 KiB budget below is about.
WIRE_CORE = {
    "smartx_device._compat", "smartx_device._utf8", "smartx_device.errors", "smartx_device.reasons",
    "smartx_device.cbor",
    "smartx_device.framing", "smartx_device.messages", "smartx_device.session",
}
# The board-facing SDK (docs/device-sdk.md, "MicroPython"): the package as a board imports it.
SDK_MODULES = CORE_MODULES + [
    "smartx_device/__init__.py",
    "smartx_device/auth.py",
    "smartx_device/backoff.py",
    "smartx_device/client.py",
    "smartx_device/clock.py",
    "smartx_device/credentials.py",
    "smartx_device/transport.py",
]

# Heap budgets (bytes), checked by test_heap_budget. Deterministic numbers: see docs/micropython.md.
BOARD_HEAP = 192 * 1024  # a Raspberry Pi Pico's MicroPython heap: the whole heap.py run fits it
WIRE_CORE_RETAINED_MAX = 64 * 1024  # live after importing the wire core from source
CORE_RETAINED_MAX = 96 * 1024  # live after importing every core module (jwt, queue included)
IMPORT_ALLOCATED_MAX = 48 * 1024  # allocated while importing any one module (compile included)
TELEMETRY_ALLOCATED_MAX = 4 * 1024  # one Telemetry: build, encode, frame twice, receive, decode

RUN_TIMEOUT = 60


def existing(paths: list[str]) -> list[str]:
    """The paths (relative to the repository root) that are files in this checkout."""
    return [path for path in paths if (ROOT / path).is_file()]


@pytest.fixture(scope="module")
def node() -> str:
    """The node binary, after checking the MicroPython package is installed."""
    binary = shutil.which("node")
    if binary is None:
        pytest.fail("node is not on PATH: install Node.js (18+) and run `npm install` at the "
                    "repository root; the MicroPython proof cannot run without it")
    if not PACKAGE_ENTRY.is_file():
        pytest.fail("the npm package @micropython/micropython-webassembly-pyscript is missing: "
                    "run `npm install` at the repository root (`make test` does)")
    return binary


def run_micropython(node: str, script: Path | str, modules: list[str], *options: str,
                    args: list[str] | tuple[str, ...] = (), module_dir: Path = ROOT,
                    json_out: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``script`` under MicroPython with ``modules`` (relative to module_dir) in its filesystem."""
    command = [node, str(RUNNER), "--module-dir", str(module_dir), "--script", str(script)]
    if modules:
        command += ["--modules", ",".join(modules)]
    if json_out is not None:
        command += ["--json-out", str(json_out)]
    command += list(options)
    if args:
        command += ["--", *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=RUN_TIMEOUT)


def vector_counts(vector_dir: Path) -> dict[str, int]:
    """How many vectors check_core.py must report per section, counted here on CPython."""
    counts = {}
    if (vector_dir / "cbor.json").is_file():
        counts["cbor"] = len(json.loads((vector_dir / "cbor.json").read_text())["vectors"])
    if (vector_dir / "framing.json").is_file():
        data = json.loads((vector_dir / "framing.json").read_text())
        counts["framing"] = len(data.get("stream", [])) + len(data.get("serial", []))
    if (vector_dir / "messages.json").is_file():
        data = json.loads((vector_dir / "messages.json").read_text())
        counts["messages"] = len(data["messages"]) + len(data.get("invalid", []))
    return counts


def run_check_core(node: str, *options: str) -> subprocess.CompletedProcess:
    """Run check_core.py on every core module that exists (and the session exchange)."""
    modules = existing(CORE_MODULES)
    shipped = modules + existing([SESSION_SCRIPT])
    # --bare-packages: the core must import on its own, without the client the package
    # __init__ pulls in (a gateway or the hub uses only the core).
    return run_micropython(node, "tests/micropython/check_core.py", shipped, "--bare-packages",
                           *options, args=modules)


# ---------------------------------------------------------------------------------------------
# The proofs


def test_core_passes_its_vectors_under_micropython(node):
    modules = existing(CORE_MODULES)
    assert modules[:3] == CORE_MODULES[:3], "the core's first modules are missing from the checkout"
    result = run_check_core(node)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[-1] == "MICROPYTHON CORE OK", result.stdout
    assert "import: %d modules ok" % len(modules) in lines
    # Every vector on disk was checked by MicroPython, none silently dropped.
    for section, count in vector_counts(VECTORS).items():
        assert "%s: %d vectors ok" % (section, count) in lines, result.stdout
    if (ROOT / SESSION_SCRIPT).is_file():
        assert any(line.startswith("session: exchange ok") for line in lines), result.stdout


def test_sdk_passes_under_micropython_with_the_real_package(node):
    # check_sdk.py imports the package as a board does: the repository's __init__, which
    # pulls in the client, so every board-facing module must import under MicroPython.
    script = ROOT / "tests" / "micropython" / "check_sdk.py"
    assert script.is_file(), "tests/micropython/check_sdk.py is gone: update this test"
    modules = existing(SDK_MODULES)
    assert "smartx_device/client.py" in modules
    result = run_micropython(node, script, modules)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("sdk: jwt "), result.stdout


def test_heap_budget(node, tmp_path):
    modules = existing(CORE_MODULES)
    summary_path = tmp_path / "summary.json"
    result = run_micropython(node, "tests/micropython/heap.py", modules, "--bare-packages",
                             "--heap", str(BOARD_HEAP), "--max-heap", str(BOARD_HEAP),
                             args=modules, json_out=summary_path)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout.splitlines()[-1])
    summary = json.loads(summary_path.read_text())
    # The GC heap never had to grow past a small board's: imports and a round trip fit.
    assert 0 < summary["heap"]["total"] <= BOARD_HEAP
    imports = report["imports"]
    assert sorted(imports) == sorted(m[:-3].replace("/", ".") for m in modules)
    for name, numbers in imports.items():
        assert 0 < numbers["retained"] <= numbers["allocated"] <= IMPORT_ALLOCATED_MAX, (name, numbers)
    wire = sum(numbers["retained"] for name, numbers in imports.items() if name in WIRE_CORE)
    assert 0 < wire < WIRE_CORE_RETAINED_MAX, report
    assert report["imports_retained"] == sum(n["retained"] for n in imports.values())
    assert 0 < report["imports_retained"] < CORE_RETAINED_MAX, report
    if "smartx_device/messages.py" in modules and "smartx_device/framing.py" in modules:
        telemetry = report["telemetry"]
        assert telemetry is not None, report
        parts = [value for key, value in telemetry.items() if key != "total"]
        assert all(value > 0 for value in parts), telemetry
        assert telemetry["total"] == sum(parts), telemetry  # reading the counter allocates nothing
        assert telemetry["total"] < TELEMETRY_ALLOCATED_MAX, telemetry
    else:
        assert report["telemetry"] is None and report["skipped"], report


# ---------------------------------------------------------------------------------------------
# The harness can fail


def write_probe(tmp_path: Path, module_source: str, script_source: str) -> Path:
    """Write package ``probe`` with module ``bad`` and a script; return the script's path."""
    (tmp_path / "probe").mkdir()
    (tmp_path / "probe" / "bad.py").write_text(module_source)
    script = tmp_path / "script.py"
    script.write_text(script_source)
    return script


@pytest.mark.parametrize(
    ("module_source", "error"),
    [
        ("import dataclasses\n", "ImportError"),  # a CPython module boards do not have
        ("def f(a, /, b):\n    return a\n", "SyntaxError"),  # positional-only parameters
        ("class E(ValueError, KeyError):\n    pass\n", "TypeError"),  # two built-in bases
    ],
    ids=["missing-module", "positional-only", "two-builtin-bases"],
)
def test_a_module_micropython_cannot_run_fails_the_run(node, tmp_path, module_source, error):
    script = write_probe(tmp_path, module_source, "import probe.bad\nprint('imported')\n")
    result = run_micropython(node, script, ["probe/bad.py"], module_dir=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "imported" not in result.stdout
    assert error in result.stderr, result.stderr


def test_a_raising_script_fails_with_its_traceback(node, tmp_path):
    script = tmp_path / "raises.py"
    script.write_text("print('before')\n\ndef check():\n    raise AssertionError('vector 7 differs')\n\ncheck()\n")
    summary_path = tmp_path / "summary.json"
    result = run_micropython(node, script, [], json_out=summary_path)
    assert result.returncode == 1
    assert result.stdout == "before\n"
    assert 'File "raises.py", line 4, in check' in result.stderr
    assert "AssertionError: vector 7 differs" in result.stderr
    summary = json.loads(summary_path.read_text())
    assert summary["ok"] is False and summary["error"]["type"] == "AssertionError"


def test_a_failing_step_fails_the_run(node, tmp_path):
    script = tmp_path / "steps.py"
    script.write_text("def one():\n    print('one')\n\ndef two():\n    raise ValueError('two')\n\n"
                      "def three():\n    print('three')\n\nRUNNER_STEPS = [one, two, three]\n")
    result = run_micropython(node, script, [])
    assert result.returncode == 1
    assert result.stdout == "one\n"  # the run stops at the failing step
    assert "ValueError: two" in result.stderr


def test_frozen_library_modules_are_hidden_as_on_a_board(node, tmp_path):
    # The port freezes parts of micropython-lib (hmac, abc, base64, ...) that a board's
    # firmware does not carry; by default the runner hides them so the core cannot lean on them.
    script = tmp_path / "uses_hmac.py"
    script.write_text("import hmac\nprint('hmac available')\n")
    hidden = run_micropython(node, script, [])
    assert hidden.returncode == 1 and "ImportError" in hidden.stderr
    shown = run_micropython(node, script, [], "--frozen-lib")
    assert shown.returncode == 0 and shown.stdout == "hmac available\n", shown.stderr


def test_max_heap_fails_a_script_that_outgrows_it(node, tmp_path):
    script = tmp_path / "hungry.py"
    script.write_text("keep = [bytearray(1024) for _ in range(512)]\nprint(len(keep))\n")
    result = run_micropython(node, script, [], "--heap", "128k", "--max-heap", "128k")
    assert result.returncode == 3, result.stdout + result.stderr
    assert "past --max-heap" in result.stderr
    roomy = run_micropython(node, script, [], "--heap", "1m", "--max-heap", "1m")
    assert roomy.returncode == 0 and roomy.stdout == "512\n", roomy.stderr


def corrupt_cbor(data: dict) -> str:
    """Change the expected value of an integer vector; return the vector's name."""
    vector = next(v for v in data["vectors"] if v["canonical"] and (v["value"] or "").isdigit())
    vector["value"] = str(int(vector["value"]) + 1)
    return vector["name"]


def corrupt_framing(data: dict) -> str:
    """Change one byte of a good stream vector's expected payload; return its name."""
    vector = next(v for v in data["stream"] if not v["error"])
    vector["payloads"][0] = vector["payloads"][0][:-2] + ("00" if vector["payloads"][0][-2:] != "00" else "01")
    return vector["name"]


def corrupt_messages(data: dict) -> str:
    """Change the expected class of the first message vector; return its name."""
    vector = data["messages"][0]
    vector["type"] = "Ack" if vector["type"] != "Ack" else "Ping"
    return vector["name"]


@pytest.mark.parametrize(
    ("file_name", "corrupt"),
    [("cbor.json", corrupt_cbor), ("framing.json", corrupt_framing), ("messages.json", corrupt_messages)],
    ids=["cbor", "framing", "messages"],
)
def test_check_core_fails_on_a_wrong_vector(node, tmp_path, file_name, corrupt):
    # Each section really compares: one wrong expectation turns the run red and is named.
    vectors = tmp_path / "vectors"
    shutil.copytree(VECTORS, vectors)
    data = json.loads((vectors / file_name).read_text())
    name = corrupt(data)
    (vectors / file_name).write_text(json.dumps(data))
    result = run_check_core(node, "--vectors", str(vectors))
    assert result.returncode == 1, result.stdout
    assert "MICROPYTHON CORE OK" not in result.stdout
    section = file_name[:-5]
    assert any(line.startswith("FAIL %s: " % section) and name in line
               for line in result.stdout.splitlines()), result.stdout


def test_check_core_fails_when_a_core_module_does_not_import(node, tmp_path):
    # A copy of the core whose last module uses syntax MicroPython lacks.
    modules = existing(CORE_MODULES)
    for module in modules:
        (tmp_path / module).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / module, tmp_path / module)
    broken = modules[-1]
    with open(tmp_path / broken, "a") as handle:
        handle.write("\n\ndef _only_cpython(value, /):\n    return value\n")
    script = ROOT / "tests" / "micropython" / "check_core.py"
    result = run_micropython(node, script, modules, "--bare-packages", args=modules, module_dir=tmp_path)
    assert result.returncode == 1, result.stdout
    name = broken[:-3].replace("/", ".")
    assert "FAIL import: %s: SyntaxError" % name in result.stdout, result.stdout
    assert "MICROPYTHON CORE OK" not in result.stdout


def test_runner_without_the_package_says_to_run_npm_install(node, tmp_path):
    # A copy of the runner outside the repository finds no node_modules above it.
    runner = tmp_path / "run.mjs"
    shutil.copy(RUNNER, runner)
    script = tmp_path / "script.py"
    script.write_text("print('unreachable')\n")
    result = subprocess.run([node, str(runner), "--module-dir", str(tmp_path), "--script", str(script)],
                            capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert result.returncode == 2
    assert "npm install" in result.stderr
    assert result.stdout == ""


def test_runner_refuses_bad_arguments(node, tmp_path):
    script = tmp_path / "script.py"
    script.write_text("print('unreachable')\n")
    for options, message in [
        (["--modules", "../escape.py"], "without '..'"),
        (["--modules", "missing.py"], "no such file"),
        (["--heap", "lots"], "--heap takes a byte count"),
        (["--bogus"], "unknown argument"),
    ]:
        result = run_micropython(node, script, [], *options, module_dir=tmp_path)
        assert result.returncode == 2, (options, result.stderr)
        assert message in result.stderr, (options, result.stderr)
        assert "unreachable" not in result.stdout
