"""The SmartX hardware-in-the-loop pytest plugin (registered through the ``pytest11`` entry point).

Options (group "smartx-hil"): ``--board sim|URL`` (repeatable; default one ``sim``), where URL
is what pyserial opens (``/dev/ttyUSB0``, ``rfc2217://host:port``, ``socket://host:port``);
``--board-baud``, ``--hil-seed``, ``--hil-ready-timeout``, ``--hil-log-dir``.

Fixtures (docs/hil.md has the API of each object):
- ``hil_lab`` (session): the bench (hil/lab.py), built on first use.
- ``hub``: the running ``HilHub``; a test may stop it, the fixture restarts it afterwards.
- ``gateway``: the ``HilGateway`` (the test host, enrolled as a gateway, relaying each board).
- ``board`` / ``boards``: READY ``HilBoard`` objects (the first / all of them).
- ``fault_plan``: a seeded ``firmware_sim.FaultPlan`` already on the first board's link (the
  simulated wire, or the gateway's end for a real board); add rules to it in the test.

Markers: ``sim_only`` and ``hardware_only`` skip with the reason when the boards do not fit;
``boards(n)`` skips a test that needs more boards than ``--board`` gave.

Reporting: each test gets its boards' console output and the gateway's log (from its setup to
its end) as report sections, written to files too (``user_properties`` name them). A board that
cannot reach READY is reported once, as an error of the first test that needs it, with the
reason; every later test that needs it is skipped saying so.
"""

from __future__ import annotations

import os
import re
import zlib
from typing import Any, Dict, List, Optional

import pytest

from hil.lab import Lab, board_names, is_sim

_BOARDS_KEY = pytest.StashKey[list]()  # (board, console mark) of the boards a test used
_GATEWAY_KEY = pytest.StashKey[tuple]()  # (gateway, log mark)
_LAB_KEY = pytest.StashKey[Lab]()


def pytest_addoption(parser: pytest.Parser) -> None:
    """Register the SmartX HIL option group."""
    group = parser.getgroup("smartx-hil", "SmartX hardware-in-the-loop")
    group.addoption("--board", action="append", default=None, metavar="sim|URL",
                    help="board to test: 'sim' (default) or a pyserial URL such as /dev/ttyUSB0,"
                         " rfc2217://host:port, socket://host:port; repeat for several boards")
    group.addoption("--board-baud", type=int, default=115200, metavar="BAUD",
                    help="line rate of the boards' serial links (default 115200)")
    group.addoption("--hil-seed", type=int, default=0, metavar="N",
                    help="base seed of fault plans (each test mixes in its own id)")
    group.addoption("--hil-ready-timeout", type=float, default=20.0, metavar="S",
                    help="seconds a board gets to come online before it is reported broken")
    group.addoption("--hil-log-dir", default=None, metavar="DIR",
                    help="where console and gateway logs go (default: pytest's temp dir)")


def board_specs(config: pytest.Config) -> List[str]:
    """The ``--board`` values, or ``["sim"]``."""
    return list(config.getoption("board") or ["sim"])


def pytest_configure(config: pytest.Config) -> None:
    """Register the markers; refuse to share real boards between xdist workers."""
    config.addinivalue_line("markers", "sim_only: needs simulated boards (--board sim)")
    config.addinivalue_line("markers", "hardware_only: needs real boards (--board URL)")
    config.addinivalue_line("markers", "boards(n): needs at least n boards (--board given n times)")
    specs = board_specs(config)
    workers = getattr(config.option, "numprocesses", None)
    if workers and any(not is_sim(spec) for spec in specs):
        raise pytest.UsageError("real boards cannot be shared by xdist workers: run the HIL "
                                "suite with -n 0 when --board names a port")


def pytest_report_header(config: pytest.Config) -> str:
    """Say which boards the run uses."""
    specs = board_specs(config)
    return "smartx-hil: boards %s" % ", ".join(
        "%s=%s" % (name, spec) for name, spec in zip(board_names(specs), specs))


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Skip tests whose markers the configured boards do not satisfy, saying why."""
    specs = board_specs(item.config)
    sims = [spec for spec in specs if is_sim(spec)]
    if item.get_closest_marker("sim_only") and len(sims) != len(specs):
        pytest.skip("sim-only: needs simulated boards, and this run has %s"
                    % ", ".join(spec for spec in specs if not is_sim(spec)))
    if item.get_closest_marker("hardware_only") and sims:
        pytest.skip("hardware-only: needs real boards (--board /dev/ttyUSB0 ...), and this run "
                    "has %d simulated" % len(sims))
    marker = item.get_closest_marker("boards")
    if marker is not None:
        needed = int(marker.args[0]) if marker.args else 1
        if len(specs) < needed:
            pytest.skip("needs %d boards; --board gave %d" % (needed, len(specs)))


# -- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def hil_lab(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The bench: hub, gateway, boards (built once, torn down at the end of the session)."""
    config = request.config
    directory = config.getoption("hil_log_dir")
    if directory:
        directory = os.path.abspath(directory)
        worker = os.environ.get("PYTEST_XDIST_WORKER")
        if worker:
            directory = os.path.join(directory, worker)
        os.makedirs(directory, exist_ok=True)
        import tempfile

        directory = tempfile.mkdtemp(prefix="hil-", dir=directory)
    else:
        directory = str(tmp_path_factory.mktemp("hil"))
    lab = Lab(directory, board_specs(config), config.getoption("board_baud"),
              config.getoption("hil_ready_timeout"))
    config.stash[_LAB_KEY] = lab
    try:
        lab.build()
        yield lab
    finally:
        lab.close()


@pytest.fixture
def hub(hil_lab: Lab) -> Any:
    """The running hub; restarted after the test if the test stopped it."""
    hil_lab.hub.start()
    yield hil_lab.hub
    hil_lab.hub.start()


@pytest.fixture
def gateway(request: pytest.FixtureRequest, hil_lab: Lab, hub: Any) -> Any:
    """The test host's gateway (relays, identity, log); its log is attached to the report."""
    request.node.stash[_GATEWAY_KEY] = (hil_lab.gateway, hil_lab.gateway.log.mark())
    return hil_lab.gateway


def _ready(request: pytest.FixtureRequest, lab: Lab, board: Any) -> Any:
    used = request.node.stash.setdefault(_BOARDS_KEY, [])
    used.append((board, board.console.mark()))
    request.node.user_properties.append(
        ("console_log:%s" % board.name, os.path.join(lab.log_dir, board.name + ".console.log")))
    board.ensure_ready(request.config.getoption("hil_ready_timeout"))
    if board.broken is not None:
        if not board.broken_reported:
            board.broken_reported = request.node.nodeid
            pytest.fail("board %s (%s) is broken: it did not reach READY: %s"
                        % (board.name, board.backend.url, board.broken), pytrace=False)
        pytest.skip("board %s is broken (reported in %s): %s" % (
            board.name, board.broken_reported, board.broken.splitlines()[0]))
    board.console.skip_to_end()
    return board


@pytest.fixture
def boards(request: pytest.FixtureRequest, hil_lab: Lab, hub: Any, gateway: Any) -> List[Any]:
    """Every board, each READY (a broken one skips the test, see the module docs)."""
    ready = [_ready(request, hil_lab, board) for board in hil_lab.boards]
    yield ready
    for board in ready:
        board.remove_faults()


@pytest.fixture
def board(request: pytest.FixtureRequest, hil_lab: Lab, hub: Any, gateway: Any) -> Any:
    """The first board, READY."""
    first = _ready(request, hil_lab, hil_lab.boards[0])
    yield first
    first.remove_faults()


@pytest.fixture
def fault_plan(request: pytest.FixtureRequest, board: Any) -> Any:
    """A seeded fault plan on the first board's link, removed after the test."""
    from firmware_sim.faults import FaultPlan

    seed = request.config.getoption("hil_seed") ^ zlib.crc32(request.node.nodeid.encode())
    plan = FaultPlan(seed)
    board.install_faults(plan)
    yield plan
    board.remove_faults()
    events = ["%s frame %d: %s" % (e.direction, e.frame, e.kind) for e in plan.sequence()]
    request.node.add_report_section("teardown", "fault plan (seed %d)" % seed,
                                    "\n".join(events) or "no fault fired")


# -- reporting -------------------------------------------------------------------------------


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Any:
    """Attach each used board's console (and the gateway's log) since the test began."""
    if call.when in ("call", "setup"):
        sections: Dict[str, str] = {}
        for board, mark in item.stash.get(_BOARDS_KEY, []):
            sections["console %s" % board.name] = board.console.since(mark)
        gateway = item.stash.get(_GATEWAY_KEY, None)
        if gateway is not None:
            sections["gateway log"] = gateway[0].log.since(gateway[1])
        if call.when == "call" or call.excinfo is not None:
            for key, text in sections.items():
                if text:
                    item.add_report_section(call.when, key, text)
            _write_test_logs(item, sections)
    yield


def _write_test_logs(item: pytest.Item, sections: Dict[str, str]) -> None:
    lab: Optional[Lab] = item.config.stash.get(_LAB_KEY, None)
    if lab is None or not sections:
        return
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", item.nodeid)[-150:]
    directory = os.path.join(lab.log_dir, "tests", safe)
    os.makedirs(directory, exist_ok=True)
    for key, text in sections.items():
        path = os.path.join(directory, key.replace(" ", "-") + ".log")
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(text)
        if ("log:" + key, path) not in item.user_properties:
            item.user_properties.append(("log:" + key, path))


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    """List broken boards with their reasons, and where the logs are."""
    lab: Optional[Lab] = config.stash.get(_LAB_KEY, None)
    if lab is None:
        return
    broken = [board for board in lab.boards if board.broken is not None]
    if broken:
        terminalreporter.section("smartx-hil: broken boards", red=True)
        for board in broken:
            terminalreporter.line("%s (%s): %s" % (board.name, board.backend.url,
                                                   board.broken.splitlines()[0]))
    terminalreporter.line("smartx-hil: logs in %s" % lab.log_dir)
