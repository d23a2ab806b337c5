"""What every benchmark part shares: process metrics, ports, worker processes, medians.

Rules:
- A figure is a median over rounds; a comparison is the median of the per-round ratios, each
  ratio taken from two measurements made back to back in the same round.
- Server cost is read from ``/proc/PID/stat`` (user + system time of every thread of the server
  process) and ``/proc/PID/status`` (VmRSS), never estimated.
- Workers are separate processes speaking one JSON object per line on stdout and taking one
  command per line on stdin, so a measurement starts only once every client is connected and
  ends before any of them disconnects.
"""

from __future__ import annotations

import json
import os
import resource
import socket
import statistics
import subprocess
import sys
from typing import Any, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (bound then released: good enough on a quiet loopback)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_kb(pid: int) -> int:
    """Resident set size of ``pid`` in KiB."""
    with open("/proc/%d/status" % pid) as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS for pid %d" % pid)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time used so far by every thread of ``pid``."""
    with open("/proc/%d/stat" % pid) as handle:
        text = handle.read()
    # The command name (field 2) may hold spaces: fields after it start past the last ')'.
    fields = text[text.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime (fields 14, 15)


def raise_nofile(wanted: Optional[int] = None) -> int:
    """Raise this process's soft RLIMIT_NOFILE to ``wanted`` (default: the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if wanted is None else min(max(wanted, soft), hard)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return target
    except (ValueError, OSError):
        return soft


def set_asyncio_nodelay(enabled: bool) -> None:
    """asyncio sets TCP_NODELAY on every TCP transport; with ``enabled`` False, make it not.

    The hub cannot be configured either way, so the benchmark starts it through a launcher that
    calls this first: both servers and both load generators then run with the same setting."""
    if enabled:
        return
    import asyncio.base_events

    asyncio.base_events._set_nodelay = lambda sock: None  # type: ignore[attr-defined]


def median(values: list) -> float:
    """The median of ``values`` (NaN if there are none)."""
    return statistics.median(values) if values else float("nan")


class Worker:
    """A benchmark worker process: JSON lines out, one command line in per step."""

    def __init__(self, args: list, env: Optional[dict] = None, cwd: str = ROOT) -> None:
        self.process = subprocess.Popen([sys.executable] + args, stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, cwd=cwd, env=env)
        self.pid = self.process.pid

    def read(self, timeout_hint: str = "") -> dict:
        """The next JSON line the worker prints (RuntimeError if it exits instead)."""
        line = self.process.stdout.readline()
        if not line:
            code = self.process.wait(timeout=30)
            raise RuntimeError("benchmark worker %s exited (%s) %s" % (self.process.args[1:3],
                                                                       code, timeout_hint))
        return json.loads(line)

    def send(self, command: str) -> None:
        """Send one command line."""
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()

    def ask(self, command: str) -> dict:
        """Send a command and return the worker's answer."""
        self.send(command)
        return self.read(command)

    def close(self, timeout: float = 120) -> None:
        """Tell the worker to quit and wait for it (killed if it will not go)."""
        if self.process.poll() is None:
            try:
                self.send("quit")
                self.process.wait(timeout=timeout)
            except (BrokenPipeError, subprocess.TimeoutExpired, OSError):
                self.process.kill()
                self.process.wait()
        for stream in (self.process.stdin, self.process.stdout):
            try:
                stream.close()
            except OSError:
                pass


def worker_io():
    """For a worker: (emit(obj), next_command()) over stdout/stdin."""
    def emit(obj: Any) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    def next_command() -> str:
        line = sys.stdin.readline()
        return line.strip() if line else "quit"

    return emit, next_command
