"""firmware_sim: simulated boards that run the same firmware scripts as real ones.

Public API (docs/simulator.md):
- ``Board(name, script, directory=..., bundle=..., hub=..., serial=..., faults=...)``: one board
  running ``main.py`` from its flash in its own thread, with its own ``machine``, ``time``,
  ``os`` and SDK copy; ``start``, ``reset``, ``power_cycle``, ``stop``, ``close``, ``stats``,
  ``console.expect``, ``pin``, ``drive_pin``, ``uart``, ``flash``, ``clock``, ``serial_path``.
- ``BoardClock``: board time (``advance``, ``skew``); ``ticks_add``, ``ticks_diff``.
- ``Console``/``ConsoleOutput``/``ConsoleTimeout``; ``Flash``; ``Sensor`` (scripted or seeded ADC values).
- ``SerialLink``: a board's UART on a pseudo-terminal; ``SerialBridge``: one serial board relayed
  to the hub over TLS; ``FaultProxy``: the TCP path with faults.
- ``FaultPlan`` (seeded drop, corrupt, truncate, duplicate, delay, disconnect, power_cycle,
  clock_skew), ``FaultEvent``, ``LinkCounters``.
- ``Fleet``, ``FleetSummary``, ``enrol_boards``, ``board_names``: many boards against one hub;
  ``smartx-sim`` (``firmware_sim.cli:main``) is its command line.
This package imports ``smartx_device`` and never ``smartx_hub``.
"""

from firmware_sim.board import (BUNDLE_NAME, Board, BoardError, BoardStats)
from firmware_sim.bridge import SerialBridge
from firmware_sim.clock import TICKS_PERIOD, BoardClock, ticks_add, ticks_diff
from firmware_sim.console import Console, ConsoleOutput, ConsoleTimeout
from firmware_sim.faults import (FAULT_KINDS, FaultEvent, FaultPlan, FaultPlanError, FaultRule,
                                 LinkCounters)
from firmware_sim.flash import Flash
from firmware_sim.fleet import (EnrolmentError, Fleet, FleetSummary, board_names,
                                enrol_boards, read_bundle_dir)
from firmware_sim.machine import (DEEPSLEEP_RESET, HARD_RESET, PWRON_RESET, SOFT_RESET,
                                  WDT_RESET, PinState, Sensor, UARTChannel)
from firmware_sim.proxy import FaultProxy
from firmware_sim.serial_link import SerialLink

__all__ = [
    "BUNDLE_NAME", "Board", "BoardClock", "BoardError", "BoardStats", "Console",
    "ConsoleOutput", "ConsoleTimeout", "DEEPSLEEP_RESET", "EnrolmentError", "FAULT_KINDS", "FaultEvent",
    "FaultPlan", "FaultPlanError", "FaultProxy", "FaultRule", "Flash", "Fleet", "FleetSummary",
    "HARD_RESET", "LinkCounters", "PWRON_RESET", "PinState", "SOFT_RESET", "Sensor",
    "SerialBridge", "SerialLink", "TICKS_PERIOD", "UARTChannel", "WDT_RESET", "board_names",
    "enrol_boards", "read_bundle_dir", "ticks_add", "ticks_diff",
]
