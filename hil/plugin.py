"""The SmartX hardware-in-the-loop pytest plugin (registered through the ``pytest11`` entry point).

Adds the ``--board`` option: ``sim`` (the default) runs the HIL suite against simulated boards;
a pyserial URL (``/dev/ttyUSB0``, ``rfc2217://host:port``, ``socket://host:port``) runs it
against real boards.
"""

from __future__ import annotations


def pytest_addoption(parser):
    """Register the SmartX HIL option group."""
    group = parser.getgroup("smartx-hil", "SmartX hardware-in-the-loop")
    group.addoption("--board", action="append", default=None, metavar="sim|URL",
                    help="board to test: 'sim' (default) or a pyserial URL; repeat for several boards")
