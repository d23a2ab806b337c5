"""A fleet of simulated boards against one hub: enrol them, start them, watch them, stop them.

Rules (docs/simulator.md, "Fleets"):
- Enrolment goes through the hub's own command line (``python -m smartx_hub device add NAME
  --auth hs256 --data DIR --out FILE --json``), a few at a time; the simulator never imports the
  hub. A board whose bundle already exists in the bundle folder is not enrolled again, so a
  fleet restarted on the same folders is the same fleet (same ids, same flash, same queue).
- Each board lives in ``DIRECTORY/NAME/`` (its flash, console log, tty). The firmware is copied
  to the flash as ``main.py`` on every start (a deploy); an ``interval_s`` is written to the
  flash as ``config.json`` (whole seconds), which examples/sensor_node.py reads at boot.
- Boards start a few at a time (``start_rate`` per second), inside the hub's default per-IP
  connection limits, so a large fleet does not look like a flood.
- ``stop()`` lets the queues drain (bounded by ``flush_timeout``), then powers every board off
  at once; each board's SDK client sends its Close.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from firmware_sim.board import Board, BoardStats
from firmware_sim.faults import FaultPlan

#: Subprocesses ``enrol_boards`` runs at once.
ENROL_PARALLEL = 4
#: Boards started per second by default (the hub admits 50 new connections/s per IP).
DEFAULT_START_RATE = 40.0
_NAME_OK = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class EnrolmentError(Exception):
    """The hub's command line refused to enrol a board (its one-line error is the message)."""


@dataclass
class FleetSummary:
    """The fleet at one moment."""

    boards: int
    running: int
    online: int
    published: int
    acknowledged: int
    queue_depth: int
    boots: int
    crashed: int

    def line(self) -> str:
        """One status line: boards online, readings acknowledged, queue depth."""
        text = "boards %d/%d online | readings %d acknowledged of %d | queue %d" % (
            self.online, self.boards, self.acknowledged, self.published, self.queue_depth)
        if self.crashed:
            text += " | %d crashed" % self.crashed
        return text


def board_names(count: int, prefix: str = "sim-") -> List[str]:
    """``sim-000``, ``sim-001``, ... (at least three digits)."""
    width = max(3, len(str(max(0, count - 1))))
    return ["%s%0*d" % (prefix, width, index) for index in range(count)]


def hub_command() -> List[str]:
    """How to run ``smartx-hub``: this interpreter's ``-m smartx_hub``."""
    return [sys.executable, "-m", "smartx_hub"]


def enrol_boards(hub_data: str, names: Sequence[str], bundle_dir: str, auth: str = "hs256",
                 command: Optional[Sequence[str]] = None,
                 progress: Optional[Callable[[int, int], None]] = None,
                 parallel: int = ENROL_PARALLEL) -> Dict[str, str]:
    """Enrol ``names`` on the hub in ``hub_data`` through its command line; return name ->
    bundle path. Bundles already in ``bundle_dir`` are reused. ``EnrolmentError`` on refusal."""
    for name in names:
        if not _NAME_OK.match(name):
            raise EnrolmentError("board name %r is not usable (letters, digits, . _ -)" % name)
    os.makedirs(bundle_dir, exist_ok=True)
    base = list(command or hub_command())
    paths = {name: os.path.join(bundle_dir, name + ".smartx.json") for name in names}
    todo = [name for name in names if not os.path.exists(paths[name])]
    done = len(names) - len(todo)
    if progress is not None:
        progress(done, len(names))

    def enrol(name: str) -> str:
        argv = base + ["device", "add", name, "--auth", auth, "--data", hub_data,
                       "--out", paths[name], "--json"]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            message = (result.stderr.strip().splitlines() or ["exit status %d"
                                                              % result.returncode])[-1]
            raise EnrolmentError("enrolling %s: %s" % (name, message))
        return name

    with concurrent.futures.ThreadPoolExecutor(max(1, parallel)) as pool:
        for future in concurrent.futures.as_completed([pool.submit(enrol, n) for n in todo]):
            future.result()
            done += 1
            if progress is not None:
                progress(done, len(names))
    return paths


def read_bundle_dir(bundle_dir: str) -> Dict[str, str]:
    """name -> path of every ``*.smartx.json`` bundle in a folder (sorted by name)."""
    found = {}
    for entry in sorted(os.listdir(bundle_dir)):
        if entry.endswith(".smartx.json"):
            found[entry[:-len(".smartx.json")]] = os.path.join(bundle_dir, entry)
    return found


class Fleet:
    """Boards running one firmware against one hub (see the module rules).

    ``bundles``: name -> credentials bundle path. ``hub``: (host, port) to use instead of the
    bundles' address. ``faults``: a plan forked per board (TCP path). ``board_options`` go to
    each ``Board``.
    """

    def __init__(self, directory: str, script: str, bundles: Dict[str, str],
                 hub: Optional[Tuple[str, int]] = None, seed: int = 0,
                 interval_s: Optional[float] = None, faults: Optional[FaultPlan] = None,
                 echo: Optional[Callable[[str, str], None]] = None,
                 **board_options: Any) -> None:
        self.directory = os.path.abspath(directory)
        self.script = script
        self.hub = hub
        self.seed = seed
        self.interval_s = interval_s
        self.boards: List[Board] = []
        os.makedirs(self.directory, exist_ok=True)
        for name, bundle in bundles.items():
            files = {}
            if interval_s is not None:
                # sensor_node.py takes whole seconds (1..3600) from config.json.
                files["config.json"] = json.dumps({"interval_s": max(1, int(round(interval_s)))})
            board_echo = None
            if echo is not None:
                board_echo = _board_echo(echo, name)
            board = Board(name, script, directory=os.path.join(self.directory, name),
                          bundle=bundle, hub=hub, seed=seed,
                          faults=faults.fork(name) if faults is not None else None,
                          files=files, echo=board_echo, **board_options)
            self.boards.append(board)

    def __len__(self) -> int:
        return len(self.boards)

    def board(self, name: str) -> Board:
        """The board called ``name``."""
        for board in self.boards:
            if board.name == name:
                return board
        raise KeyError(name)

    def start(self, progress: Optional[Callable[[int, int], None]] = None,
              start_rate: float = DEFAULT_START_RATE) -> "Fleet":
        """Power the boards on, ``start_rate`` per second; ``progress(started, total)``."""
        interval = 1.0 / start_rate if start_rate > 0 else 0.0
        began = time.monotonic()
        for index, board in enumerate(self.boards):
            due = began + index * interval
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            board.start()
            if progress is not None:
                progress(index + 1, len(self.boards))
        return self

    def summary(self) -> FleetSummary:
        """Counts over every board now."""
        stats: List[BoardStats] = [board.stats() for board in self.boards]
        return FleetSummary(
            boards=len(stats), running=sum(1 for s in stats if s.state == "running"),
            online=sum(1 for s in stats if s.online), published=sum(s.published for s in stats),
            acknowledged=sum(s.acknowledged for s in stats),
            queue_depth=sum(s.queue_depth for s in stats), boots=sum(s.boots for s in stats),
            crashed=sum(1 for s in stats if s.state == "crashed"))

    def wait(self, predicate: Callable[[FleetSummary], bool], timeout: float) -> FleetSummary:
        """Poll the summary until ``predicate`` holds; ``TimeoutError`` after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while True:
            summary = self.summary()
            if predicate(summary):
                return summary
            if time.monotonic() >= deadline:
                raise TimeoutError("fleet: condition not met within %.0f s (%s)"
                                   % (timeout, summary.line()))
            time.sleep(0.05)

    def stop(self, flush_timeout: float = 5.0, timeout: float = 15.0) -> FleetSummary:
        """Let queues drain (up to ``flush_timeout`` s), power every board off with a clean
        Close, free their links; return the final summary."""
        deadline = time.monotonic() + flush_timeout
        while time.monotonic() < deadline:
            summary = self.summary()
            if summary.queue_depth == 0 or summary.online == 0:
                break
            time.sleep(0.05)
        for board in self.boards:
            board.request_stop(graceful=True)
        for board in self.boards:
            board.join(timeout)
        final = self.summary()
        for board in self.boards:
            board.close()
        return final

    def __enter__(self) -> "Fleet":
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()


def _board_echo(echo: Callable[[str, str], None], name: str) -> Callable[[str], None]:
    def forward(text: str) -> None:
        echo(name, text)
    return forward


def parse_address(text: str) -> Tuple[str, int]:
    """``"HOST:PORT"`` -> (host, port); ValueError if it is not one."""
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("expected HOST:PORT, got %r" % text)
    return host.strip("[]"), int(port)


def default_script() -> Optional[str]:
    """``examples/sensor_node.py`` from the working directory or the source tree, if there."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for candidate in (os.path.join("examples", "sensor_node.py"),
                      os.path.join(here, "examples", "sensor_node.py")):
        if os.path.isfile(candidate):
            return candidate
    return None

