"""``smartx-sim``: run a fleet of simulated boards against a hub until Ctrl-C.

Contract:
- ``smartx-sim --hub-data DIR --boards N`` enrols N boards through ``smartx-hub device add``
  (bundles kept in ``WORK/bundles``, reused next time), or ``--bundles DIR`` takes existing
  bundles; then starts the boards (progress shown), and prints a one-line summary (boards
  online, readings acknowledged, queue depth), refreshed in place on a terminal; otherwise a
  line when it changes (at most one a second) and every five seconds.
- SIGINT (Ctrl-C) or SIGTERM: let queues drain, close every session, print the final summary,
  exit 0. ``--duration S`` stops the same way after S seconds.
- Errors: one line ``smartx-sim: error: ...`` on stderr, exit 1 (2 for bad usage). No traceback.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from typing import Optional, Sequence

from firmware_sim.faults import FaultPlan, FaultPlanError
from firmware_sim.fleet import (EnrolmentError, Fleet, board_names, default_script,
                                enrol_boards, parse_address, read_bundle_dir)

EXIT_ERROR = 1
EXIT_USAGE = 2
#: Seconds between summary lines when the output is not a terminal.
PLAIN_SUMMARY_EVERY_S = 5.0


class CLIError(Exception):
    """What the user sees as ``smartx-sim: error: <message>``."""


def build_parser() -> argparse.ArgumentParser:
    """The ``smartx-sim`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="smartx-sim",
        description="Run a fleet of simulated boards (each running a MicroPython firmware"
        " script) against a SmartX hub, until Ctrl-C.")
    source = parser.add_argument_group("where the boards' credentials come from")
    source.add_argument("--hub-data", metavar="DIR",
                        help="the hub's data directory: enrol the boards there with"
                        " smartx-hub device add")
    source.add_argument("--bundles", metavar="DIR",
                        help="use the credentials bundles (*.smartx.json) in DIR instead")
    parser.add_argument("--boards", type=_positive_int, metavar="N",
                        help="how many boards (default 8 with --hub-data; all bundles with"
                        " --bundles)")
    parser.add_argument("--script", metavar="FILE",
                        help="the firmware every board runs (default examples/sensor_node.py)")
    parser.add_argument("--interval", type=_positive_int, metavar="S",
                        help="whole seconds between readings (written to each board's"
                        " config.json, which examples/sensor_node.py reads)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed for sensor values and faults (default 0)")
    parser.add_argument("--work", metavar="DIR", default="smartx-sim-boards",
                        help="where the boards' flash folders live (default ./smartx-sim-boards)")
    parser.add_argument("--hub", metavar="HOST:PORT",
                        help="the hub's device address (default: the one in the bundles)")
    parser.add_argument("--prefix", default="sim-", help="board name prefix (default sim-)")
    parser.add_argument("--faults", metavar="SPEC",
                        help="fault plan on every board's TCP path, e.g. 'drop=0.01,"
                        "delay=0.05:ms=300' (see docs/simulator.md)")
    parser.add_argument("--duration", type=_positive_float, metavar="S",
                        help="stop after S seconds instead of waiting for Ctrl-C")
    parser.add_argument("--start-rate", type=_positive_float, default=40.0, metavar="N",
                        help="boards started per second (default 40)")
    parser.add_argument("--echo", action="store_true",
                        help="print every board's console output, prefixed by its name")
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("%r is not a whole number" % text) from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError("%r is not a number" % text) from None
    if not value > 0:
        raise argparse.ArgumentTypeError("must be more than 0")
    return value


class _Status:
    """Progress and summary output: one line rewritten in place on a terminal."""

    def __init__(self, stream=None) -> None:
        self.stream = stream or sys.stdout
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._last_plain = -PLAIN_SUMMARY_EVERY_S
        self._last_text = ""
        self._open_line = False
        self._lock = threading.Lock()

    def update(self, text: str, force: bool = False) -> None:
        """Show ``text`` as the status line (rate-limited when not a terminal)."""
        with self._lock:
            if self.tty:
                self.stream.write("\r\x1b[K" + text)
                self._open_line = True
            else:
                # A log, not a screen: a line when something changed (at most one a second),
                # and a heartbeat every PLAIN_SUMMARY_EVERY_S.
                now = time.monotonic()
                since = now - self._last_plain
                changed = text != self._last_text
                if not force and not (changed and since >= 1.0) \
                        and since < PLAIN_SUMMARY_EVERY_S:
                    return
                self._last_plain = now
                self._last_text = text
                self.stream.write(text + "\n")
            self.stream.flush()

    def line(self, text: str) -> None:
        """Print ``text`` as a line of its own (below the status line)."""
        with self._lock:
            if self._open_line:
                self.stream.write("\n")
                self._open_line = False
            self.stream.write(text + "\n")
            self.stream.flush()


def run(args: argparse.Namespace) -> int:
    """Run the fleet described by ``args``; returns the exit status."""
    if bool(args.hub_data) == bool(args.bundles):
        raise CLIError("give exactly one of --hub-data DIR (enrol boards) or --bundles DIR")
    script = args.script or default_script()
    if script is None or not os.path.isfile(script):
        raise CLIError("firmware script %s not found (give --script FILE)"
                       % (script or "examples/sensor_node.py"))
    hub = parse_address(args.hub) if args.hub else None
    faults = FaultPlan.from_spec(args.faults, args.seed) if args.faults else None
    status = _Status()
    work = os.path.abspath(args.work)

    if args.bundles:
        if not os.path.isdir(args.bundles):
            raise CLIError("no folder %s" % args.bundles)
        bundles = read_bundle_dir(args.bundles)
        if not bundles:
            raise CLIError("no *.smartx.json bundles in %s" % args.bundles)
        if args.boards:
            if args.boards > len(bundles):
                raise CLIError("%d boards asked for, %d bundles in %s"
                               % (args.boards, len(bundles), args.bundles))
            bundles = dict(list(bundles.items())[:args.boards])
    else:
        if not os.path.isfile(os.path.join(args.hub_data, "hub.json")):
            raise CLIError("no hub in %s (run: smartx-hub init --data %s)"
                           % (args.hub_data, args.hub_data))
        names = board_names(args.boards or 8, args.prefix)
        bundles = enrol_boards(args.hub_data, names, os.path.join(work, "bundles"),
                               progress=lambda done, total: status.update(
                                   "enrolling boards: %d/%d" % (done, total), force=True))
        status.line("enrolled %d boards (bundles in %s)" % (len(bundles),
                                                              os.path.join(work, "bundles")))

    def print_console(name: str, text: str) -> None:
        for line in text.splitlines():
            status.line("[%s] %s" % (name, line))

    echo = print_console if args.echo else None

    stop = threading.Event()

    def on_signal(signum, _frame) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    fleet = None
    try:
        fleet = Fleet(os.path.join(work, "boards"), script, bundles, hub=hub, seed=args.seed,
                      interval_s=args.interval, faults=faults, echo=echo)
        began = time.monotonic()
        started = [0]

        def progress(done: int, total: int) -> None:
            started[0] = done
            status.update("starting boards: %d/%d" % (done, total), force=done == total)
            if stop.is_set():
                raise KeyboardInterrupt

        try:
            fleet.start(progress, start_rate=args.start_rate)
        except KeyboardInterrupt:
            pass
        status.line("started %d boards running %s; Ctrl-C stops them"
                    % (started[0], os.path.basename(script)))
        deadline = began + args.duration if args.duration else None
        reported = set()
        while not stop.is_set():
            for board in fleet.boards:
                if board.state == "crashed" and (board.name, board.boots) not in reported:
                    reported.add((board.name, board.boots))
                    last = (board.crash or "").strip().splitlines()[-1:] or ["?"]
                    status.line("board %s crashed: %s (console: %s)" % (
                        board.name, last[0], os.path.join(board.directory, "console.log")))
            status.update(fleet.summary().line())
            if deadline is not None and time.monotonic() >= deadline:
                break
            stop.wait(0.5 if status.tty else 0.25)
        status.line("stopping: flushing queues and closing sessions ...")
        final = fleet.stop()
        fleet = None
        status.line("stopped. " + final.line())
        return 0
    finally:
        if fleet is not None:
            fleet.stop(flush_timeout=0)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The ``smartx-sim`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (CLIError, EnrolmentError, FaultPlanError, ValueError, OSError) as exc:
        print("smartx-sim: error: %s" % " ".join(str(exc).split()), file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("smartx-sim: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
