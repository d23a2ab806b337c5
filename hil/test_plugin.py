"""The HIL plugin itself (hil/plugin.py), run on inner pytest sessions (``pytester``): a broken
board is reported once and then skipped, markers skip with their reason, and each test's
console output is attached to its report."""

from __future__ import annotations

import socket

pytest_plugins = ["pytester"]


def closed_port() -> int:
    """A loopback TCP port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_board_that_never_gets_ready_is_reported_once_then_skipped(pytester):
    pytester.makepyfile(test_inner="""
        def test_first(board):
            pass

        def test_second(board):
            pass

        def test_hub_still_works(hub):
            assert hub.running
    """)
    url = "socket://127.0.0.1:%d" % closed_port()
    result = pytester.runpytest("--board", url, "--hil-ready-timeout", "1", "-rA",
                                "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, errors=1, skipped=1)
    text = result.stdout.str()
    assert "board board0 (%s) is broken: it did not reach READY" % url in text
    assert "cannot open %s" % url in text
    assert "board board0 is broken (reported in test_inner.py::test_first)" in text
    assert "smartx-hil: broken boards" in text


def test_markers_skip_with_their_reason(pytester):
    pytester.makepyfile(test_inner="""
        import pytest

        @pytest.mark.sim_only
        def test_sim_only():
            pass

        @pytest.mark.hardware_only
        def test_hardware_only():
            pass

        @pytest.mark.boards(2)
        def test_two_boards():
            pass
    """)
    simulated = pytester.runpytest("-rs", "-p", "no:cacheprovider")
    simulated.assert_outcomes(passed=1, skipped=2)  # sim_only runs
    assert "hardware-only: needs real boards" in simulated.stdout.str()
    assert "needs 2 boards; --board gave 1" in simulated.stdout.str()
    mixed = pytester.runpytest("--board", "/dev/ttyUSB7", "--board", "sim", "-rs",
                               "-p", "no:cacheprovider")
    mixed.assert_outcomes(passed=1, skipped=2)  # boards(2) runs
    assert "sim-only: needs simulated boards, and this run has /dev/ttyUSB7" \
        in mixed.stdout.str()
    assert "hardware-only: needs real boards (--board /dev/ttyUSB0 ...), and this run has 1" \
        " simulated" in mixed.stdout.str()
    one = pytester.runpytest("--board", "sim", "-rs", "-p", "no:cacheprovider",
                             "-k", "two_boards")
    one.assert_outcomes(skipped=1)
    assert "needs 2 boards; --board gave 1" in one.stdout.str()


def test_each_test_gets_its_console_log_in_the_report(pytester, tmp_path):
    pytester.makepyfile(test_inner="""
        def test_quiet(board):
            pass

        def test_talks_then_fails(board):
            board.send_line("hil:ping")
            board.expect("hil:pong", timeout=10)
            assert False, "on purpose"
    """)
    logs = tmp_path / "logs"
    reprec = pytester.inline_run("--hil-log-dir", str(logs), "-p", "no:cacheprovider")
    reports = [r for r in reprec.getreports("pytest_runtest_logreport") if r.when == "call"]
    assert [r.outcome for r in reports] == ["passed", "failed"]
    quiet, failed = reports
    # The first test's setup booted the board: its section shows the boot.
    assert "booting (boot 1)" in dict(quiet.sections)["Captured console sim0 call"]
    console = dict(failed.sections)["Captured console sim0 call"]
    assert "hil:pong boot=1" in console
    assert "booting" not in console  # only what the board printed during this test
    assert "hil:ping" not in console  # input is not output
    assert "hub connection 1 opened" in dict(quiet.sections)["Captured gateway log call"]
    properties = dict(failed.user_properties)
    with open(properties["log:console sim0"], encoding="utf-8") as handle:
        assert handle.read() == console
    with open(properties["console_log:sim0"], encoding="utf-8") as handle:
        whole = handle.read()  # the whole session's console
    assert "SmartX HIL node" in whole and "hil:pong" in whole
