"""Where the hub's time goes during ingest: py-spy on a running hub, summed per thread.

    .venv/bin/pip install py-spy      # a profiler, not a dependency of the hub
    .venv/bin/python benchmarks/profile_hub.py [--devices 10] [--per-message 16] [--seconds 5]

Starts a hub as ``benchmarks/run.py`` does, has a device worker pipeline Telemetry at it, and
samples every thread of the hub process (``py-spy record --idle --threads``, raw stacks) for
``--seconds``. Prints, per thread, the share of wall time it was idle (waiting for work in
``select`` or on its executor queue) and where the rest went, by stage of the telemetry path,
and the functions with the most samples. docs/performance.md quotes its output.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import ROOT  # noqa: E402
from hub_bench import Hub  # noqa: E402

# (stage, substrings of a stack, any of which puts a sample in it); the first match wins.
STAGES = [
    ("idle", ("_worker (concurrent/futures/thread.py:81)", "EpollSelector.select")),
    ("store: seal the batch (CBOR, AAD, AES-GCM)", ("seal_many", "Keyring.seal")),
    ("store: COMMIT (fsync)", ("SQLiteStore._tx",)),
    ("store: INSERT rows and indexes", ("SQLiteStore.add_telemetry",)),
    ("wire: decode and check messages (CBOR)", ("decode_message",)),
    ("listener: Acks (encode, TLS, socket)", ("_flush_acks", "flush_acks")),
    ("listener: TLS read, framing, session", ("_read_plaintext", "_feed")),
    ("ingest: hand-off between loop and writer", ("ingest.py", "ThreadPoolExecutor.submit",
                                                  "call_soon_threadsafe", "_write_to_self")),
    ("listener: selector and accept", ("_poll",)),
    ("asyncio loop", ("asyncio/",)),
]


def stage_of(stack: str) -> str:
    """The telemetry-path stage a sampled stack belongs to."""
    leaf = stack.rsplit(";", 1)[-1]
    for name, needles in STAGES:
        if name == "idle":
            if any(needle in leaf for needle in needles):
                return name
        elif any(needle in stack for needle in needles):
            return name
    return "other"


def summarise(raw_path: str, top: int = 8) -> str:
    """Per thread: busy share, stages, most sampled functions."""
    per_thread = collections.defaultdict(collections.Counter)
    leaves = collections.defaultdict(collections.Counter)
    for line in open(raw_path):
        stack, _, count = line.rstrip().rpartition(" ")
        if not stack:
            continue
        frames = stack.split(";")
        thread = frames[0].split(": ", 1)[-1]
        per_thread[thread][stage_of(stack)] += int(count)
        leaves[thread][frames[-1]] += int(count)
    lines = []
    for thread, stages in sorted(per_thread.items(), key=lambda item: -sum(item[1].values())):
        total = sum(stages.values())
        busy = total - stages.get("idle", 0)
        if busy < 0.02 * total:
            continue
        lines.append("%s: busy %.0f%% of the time" % (thread, 100.0 * busy / total))
        for stage, count in stages.most_common():
            if stage != "idle":
                lines.append("    %5.1f%%  %s" % (100.0 * count / total, stage))
        lines.append("  most sampled functions:")
        for leaf, count in leaves[thread].most_common(top + 1):
            if stage_of(leaf) != "idle":
                lines.append("    %5.1f%%  %s" % (100.0 * count / total, leaf))
    return "\n".join(lines)


def main() -> None:
    """Profile a hub under ingest and print the summary."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=10)
    parser.add_argument("--per-message", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--raw", help="also keep py-spy's raw stacks in this file")
    args = parser.parse_args()
    spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    if not os.access(spy, os.X_OK):
        raise SystemExit("py-spy is not installed: %s -m pip install py-spy" % sys.executable)
    with tempfile.TemporaryDirectory(prefix="smartx-profile-") as workdir:
        hub = Hub(workdir, {"hs256": args.devices})
        hub.start()
        try:
            worker = hub.worker("readings", hub.devices["hs256"], per_message=args.per_message,
                                window=args.window, duration=args.seconds + 1.0)
            raw = args.raw or os.path.join(workdir, "stacks.txt")
            recorder = subprocess.Popen(
                [spy, "record", "--pid", str(hub.pid), "--duration", str(int(args.seconds)),
                 "--rate", "200", "--format", "raw", "--output", raw, "--threads", "--idle",
                 "--nonblocking"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                cwd=ROOT)
            result = worker.ask("run")
            recorder.wait(timeout=60)
            worker.close()
        finally:
            hub.stop()
        print("%d devices, %d reading(s) a message, window %d: %.0f readings/s while sampled"
              % (args.devices, args.per_message, args.window,
                 result["count"] / result["seconds"]))
        print(summarise(raw))


if __name__ == "__main__":
    main()
