"""``smartx-sim`` as a user runs it: a subprocess that enrols boards through the hub's command
line, runs them against a real hub, and stops cleanly on SIGINT."""

import os
import signal
import subprocess
import sys
import time

from sim_support import make_hub, start_hub, wait_until

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def smartx_sim(*args, **options):
    return subprocess.Popen([sys.executable, "-m", "firmware_sim", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **options)


def read_until(process, text, timeout):
    """Lines of stdout up to the first containing ``text``."""
    lines = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        if text in line:
            return lines
    raise AssertionError("no %r in smartx-sim's output: %s%s" % (
        text, "".join(lines), process.stderr.read() if process.poll() is not None else ""))


def test_smartx_sim_runs_a_fleet_and_stops_cleanly_on_sigint(tmp_path):
    data = make_hub(tmp_path)
    hub = start_hub(data)
    work = str(tmp_path / "work")
    process = smartx_sim("--hub-data", data, "--boards", "3", "--work", work, "--interval", "1",
                         "--hub", "127.0.0.1:%d" % hub.device_port)
    try:
        lines = read_until(process, "boards 3/3 online", 60)
        assert any("enrolled 3 boards" in line for line in lines)
        assert any("started 3 boards" in line for line in lines)
        wait_until(lambda: hub.live.count() == 3, 10, "three live sessions at the hub")
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    try:
        assert process.returncode == 0, err
        assert "stopping: flushing queues and closing sessions" in out
        final = [line for line in out.splitlines() if line.startswith("stopped.")]
        assert final and "queue 0" in final[0] and "0/3 online" in final[0]
        assert "Traceback" not in err
        wait_until(lambda: hub.live.count() == 0, 5, "the sessions closed")
        bundles = sorted(os.listdir(os.path.join(work, "bundles")))
        assert bundles == ["sim-%03d.smartx.json" % n for n in range(3)]
        # The same boards again from their bundles (no enrolment), for a fixed time.
        again = smartx_sim("--bundles", os.path.join(work, "bundles"), "--boards", "2",
                           "--work", work, "--hub", "127.0.0.1:%d" % hub.device_port,
                           "--duration", "2")
        out, err = again.communicate(timeout=60)
        assert again.returncode == 0, err
        assert "started 2 boards" in out and "stopped." in out
    finally:
        hub.stop()


def test_smartx_sim_reports_bad_usage_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "firmware_sim", "--boards", "2"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip().startswith("smartx-sim: error: give exactly one of")
    assert len(result.stderr.strip().splitlines()) == 1
    result = subprocess.run([sys.executable, "-m", "firmware_sim", "--hub-data",
                             str(tmp_path / "nothing")], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 1 and "no hub in" in result.stderr
    result = subprocess.run([sys.executable, "-m", "firmware_sim", "--bundles", str(tmp_path),
                             "--faults", "melt=0.5"], cwd=ROOT, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 1 and "unknown fault kind" in result.stderr
    result = subprocess.run([sys.executable, "-m", "firmware_sim", "--boards", "0"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
