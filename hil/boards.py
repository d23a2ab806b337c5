"""Boards as the HIL suite sees them: one interface over a simulated board and a real one.

Rules (docs/hil.md, "The board fixture"), in labgrid's terms:
- A *backend* is what exists: ``SimBackend`` (a firmware_sim board whose UART sits on a
  pseudo-terminal) or ``SerialBackend`` (a real board at a pyserial URL). It knows how to put
  files on the board, boot it, reset it and, where it can, cut its power.
- The *drivers* are the same for both: ``BoardPort`` reads the port (console and frames) and
  ``BoardRelay`` carries the frames to the hub. A test never learns which backend it has,
  except through the ``sim_only``/``hardware_only`` markers and ``can_power_cycle``.
- ``HilBoard.ensure_ready`` is the strategy: it brings the board to READY (running the HIL
  firmware, verified by the hub, which lists it online) or marks it broken with the reason.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Union

from firmware_sim import Board as SimBoard
from firmware_sim.faults import FaultPlan

from hil.console import ConsoleBuffer, Expected
from hil.link import BoardPort, RelativePlan
from hil.relay import BoardRelay

#: The firmware the suite runs (copied to the board as ``main.py``).
FIRMWARE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "firmware", "main.py")
BUNDLE_PATH = "device.smartx.json"
CONFIG_PATH = "hil.json"
BANNER = r"SmartX HIL node (\S+) booting \(boot (\d+)\)"
READY_TIMEOUT_S = 20.0


class BackendUnsupported(Exception):
    """The backend cannot do this (power-cycle a board that has no controllable supply)."""


class SimBackend:
    """A simulated board behind a serial link (a pty), paced at ``baudrate``."""

    kind = "sim"
    can_power_cycle = True

    def __init__(self, name: str, directory: str, baudrate: Optional[int] = 115200) -> None:
        self.board = SimBoard(name, None, directory=directory, serial=True,
                              serial_baudrate=baudrate)
        self.url = self.board.serial_path
        self.link_config = {"link": "uart", "uart": 0, "baudrate": baudrate or 115200}

    @property
    def running(self) -> bool:
        """True while the simulated board is powered."""
        return self.board.running

    def install(self, port: BoardPort, files: Dict[str, bytes]) -> None:
        """Write files onto the board's flash (takes effect at the next boot)."""
        for path, data in files.items():
            self.board.flash.write_file(path, data)

    def boot(self, port: BoardPort) -> None:
        """Power on, or press RESET if it is on."""
        if self.board.running:
            self.board.reset(wait=False)
        else:
            self.board.start()

    def reset(self, port: BoardPort) -> None:
        """Press RESET (the flash, and so the offline queue, is kept)."""
        self.boot(port)

    def power_cycle(self, port: BoardPort, off_ms: float) -> None:
        """Cut the power for ``off_ms``, then boot cold."""
        if not self.board.running:
            self.board.start()
            return
        self.board.power_cycle(off_ms=off_ms, wait=False)

    def unplug(self, duration_s: Optional[float] = None) -> None:
        """Pull the board's USB cable (its pty goes); back after ``duration_s`` if given."""
        self.board.serial.unplug(None if duration_s is None else duration_s * 1000)

    def replug(self) -> None:
        """Plug the cable back in (a new pty behind the same path)."""
        self.board.serial.replug()

    def install_faults(self, plan: Optional[FaultPlan]) -> None:
        """Apply ``plan`` on the simulated wire itself, frame numbers counted from now."""
        link = self.board.serial
        if plan is None:
            link.faults = None
            return
        plan.bind_board(self.board)
        offsets = {d: link.counters.by_direction[d]["frames"] for d in ("up", "down")}
        link.faults = RelativePlan(plan, offsets, plan.apply_board_fault)

    @property
    def link_counters(self) -> Any:
        """The simulated wire's ``LinkCounters``."""
        return self.board.serial.counters

    def close(self) -> None:
        """Power off and free the link."""
        self.board.close()


class SerialBackend:
    """A real MicroPython board at a pyserial URL, provisioned over its raw REPL."""

    kind = "serial"
    can_power_cycle = False

    def __init__(self, url: str, open_timeout_s: float = 10.0) -> None:
        self.url = url
        self.open_timeout_s = open_timeout_s
        self.link_config = {"link": "stdio"}
        self._booted = False

    @property
    def running(self) -> bool:
        """A real board is assumed powered once it has been booted by the suite."""
        return self._booted

    def install(self, port: BoardPort, files: Dict[str, bytes]) -> None:
        """Write files over the raw REPL (the board soft-resets afterwards)."""
        from hil.rawrepl import install_files

        if not port.wait_open(self.open_timeout_s):
            raise BackendUnsupported("cannot open %s: %s" % (self.url, port.last_error))
        install_files(port, files, reset=True)
        self._booted = True

    def boot(self, port: BoardPort) -> None:
        """A board just provisioned has booted; otherwise reset it."""
        if not self._booted:
            self.reset(port)

    def reset(self, port: BoardPort) -> None:
        """Ask the HIL firmware to reset (``machine.reset()``); at a bare REPL, Ctrl-D."""
        port.send_line("hil:reset")
        port.write(b"\x04")
        self._booted = True

    def power_cycle(self, port: BoardPort, off_ms: float) -> None:
        """Not possible without a controllable supply."""
        raise BackendUnsupported("%s has no controllable power supply" % self.url)

    def unplug(self, duration_s: Optional[float] = None) -> None:
        """Not possible without a controllable USB hub."""
        raise BackendUnsupported("%s cannot be unplugged by the test host" % self.url)

    def replug(self) -> None:
        """See ``unplug``."""
        raise BackendUnsupported("%s cannot be replugged by the test host" % self.url)

    def install_faults(self, plan: Optional[FaultPlan]) -> None:
        """A real wire takes no plan: faults go on the gateway's side (``HilBoard``)."""
        raise BackendUnsupported("a real wire cannot inject faults")

    link_counters = None

    def close(self) -> None:
        """Nothing to free: the board stays as it is."""


Backend = Union[SimBackend, SerialBackend]


class HilBoard:
    """One board under test: backend, console, port, relay (see the module rules)."""

    def __init__(self, name: str, backend: Backend, bundle: dict, hub: Any,
                 relay_factory: Callable[[BoardPort], BoardRelay],
                 log: Optional[Callable[[str], None]] = None,
                 console_log: Optional[str] = None) -> None:
        self.name = name
        self.backend = backend
        self.bundle = bundle
        self.device_id: str = bundle["device_id"]
        self.hub = hub
        self.console = ConsoleBuffer(name)
        self._console_file = None
        if console_log is not None:
            self._console_file = open(console_log, "a", encoding="utf-8")
            self.console.add_sink(self._write_log)
        self.port = BoardPort(backend.url, name, self.console, log=log)
        self.relay = relay_factory(self.port)
        self.broken: Optional[str] = None
        self.broken_reported = False
        self.boot_count: Optional[int] = None
        self.provisioned = False
        self.port.start()

    def __repr__(self) -> str:
        return "<HilBoard %s %s %s>" % (self.name, self.backend.kind, self.backend.url)

    def _write_log(self, text: str) -> None:
        if self._console_file is not None:
            self._console_file.write(text)
            self._console_file.flush()

    # -- what tests use --------------------------------------------------------------------

    @property
    def kind(self) -> str:
        """``sim`` or ``serial``."""
        return self.backend.kind

    @property
    def can_power_cycle(self) -> bool:
        """Whether ``power_cycle`` works on this backend."""
        return self.backend.can_power_cycle

    def expect(self, pattern: str, timeout: float = 10.0) -> Expected:
        """Wait for ``pattern`` on the console after the previous match (see hil/console.py)."""
        return self.console.expect(pattern, timeout)

    def write(self, data: Union[bytes, str]) -> None:
        """Write raw bytes (or text) to the board's port."""
        self.port.write(data.encode("utf-8") if isinstance(data, str) else data)

    def send_line(self, text: str) -> None:
        """Type a console line the firmware reads whole (``hil:...`` commands)."""
        self.port.send_line(text)

    def reset(self) -> None:
        """Press RESET; the next ``expect`` sees only what the board prints after it."""
        self.console.skip_to_end()
        self.backend.reset(self.port)

    def power_cycle(self, off_ms: float = 200) -> None:
        """Cut the power for ``off_ms`` (``BackendUnsupported`` on boards without a switch)."""
        self.console.skip_to_end()
        self.backend.power_cycle(self.port, off_ms)

    def load_firmware(self, source: Union[str, bytes], reset: bool = True) -> None:
        """Put a firmware script on the board as ``main.py`` (a path or the source itself)."""
        if isinstance(source, str) and os.path.isfile(source):
            with open(source, "rb") as handle:
                source = handle.read()
        data = source.encode("utf-8") if isinstance(source, str) else source
        self.console.skip_to_end()
        self.backend.install(self.port, {"main.py": data})
        if reset:
            self.backend.boot(self.port)

    def provision(self, firmware: str = FIRMWARE, extra_config: Optional[dict] = None) -> None:
        """Put the HIL firmware, the board's credentials and its link settings on it, boot it."""
        config = dict(self.backend.link_config)
        config.update(extra_config or {})
        with open(firmware, "rb") as handle:
            files = {"main.py": handle.read(),
                     BUNDLE_PATH: json.dumps(self.bundle, indent=1).encode("utf-8"),
                     CONFIG_PATH: json.dumps(config).encode("utf-8")}
        self.console.skip_to_end()
        self.backend.install(self.port, files)
        self.backend.boot(self.port)
        self.provisioned = True

    def status(self, timeout: float = 5.0) -> Dict[str, int]:
        """Ask the firmware (``hil:status``) for boot, published, pending, online."""
        self.send_line("hil:status")
        found = self.expect(r"hil:status ((?:\w+=\d+ ?)+)", timeout)
        return {key: int(value) for key, value in re.findall(r"(\w+)=(\d+)", found.group(1))}

    @contextlib.contextmanager
    def paused(self, timeout: float = 10.0) -> Iterator[Dict[str, int]]:
        """Stop the firmware's periodic readings inside the block; yields ``{"boot",
        "published"}``: the "seq" readings of this boot are exactly 0 .. published-1."""
        self.send_line("hil:pause")
        found = self.expect(r"hil:paused boot=(\d+) published=(\d+)", timeout)
        try:
            yield {"boot": int(found.group(1)), "published": int(found.group(2))}
        finally:
            try:
                self.send_line("hil:resume")
            except Exception:  # noqa: BLE001 - the next test's ensure_ready copes with it
                pass

    def seq_values(self, boot: int) -> List[int]:
        """The ``n`` of every "seq" reading of ``boot`` the hub stored, in store order."""
        return [r.value[1] for r in self.hub.readings(self.device_id, "seq")
                if isinstance(r.value, list) and r.value[0] == boot]

    def wait_all_stored(self, boot: int, published: int, timeout: float = 15.0) -> List[int]:
        """Wait until the hub holds readings 0 .. published-1 of ``boot``; return what it
        holds (the caller asserts on it: complete, each once, in order)."""
        deadline = time.monotonic() + timeout
        while True:
            values = self.seq_values(boot)
            if len(set(values)) >= published or time.monotonic() >= deadline:
                return values
            time.sleep(0.1)

    def install_faults(self, plan: Optional[FaultPlan], where: str = "auto") -> None:
        """Put a fault plan on the board's link: ``wire`` (the simulated line itself),
        ``gateway`` (the test host's end, any backend), or ``auto`` (wire if simulated)."""
        if where == "auto":
            where = "wire" if self.backend.kind == "sim" else "gateway"
        if where == "wire":
            self.backend.install_faults(plan)
        elif where == "gateway":
            self.port.install_faults(plan, self._board_fault)
        else:
            raise ValueError("where is auto, wire or gateway, not %r" % where)

    def remove_faults(self) -> None:
        """Take every fault plan off the link."""
        self.port.install_faults(None)
        if self.backend.kind == "sim":
            self.backend.install_faults(None)

    def _board_fault(self, event: Any) -> bool:
        if event.kind == "power_cycle" and self.can_power_cycle:
            self.backend.power_cycle(self.port, event.param("off_ms"))
            return True
        return False

    @property
    def link_counters(self) -> Any:
        """The wire's counters (simulated boards) or the gateway side's (real ones)."""
        counters = self.backend.link_counters
        return counters if counters is not None else self.port.counters

    # -- the strategy: bring the board to READY --------------------------------------------

    def is_ready(self) -> bool:
        """READY: the hub lists the board online."""
        return self.hub.is_online(self.device_id)

    def ensure_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        """Bring the board to READY, or set ``broken`` to why it cannot be."""
        if self.broken is not None or self.is_ready():
            return
        try:
            device = self.hub.device(self.device_id)
            if device is not None and not device.enabled:
                self.hub.enable(self.device_id)
            mark = self.console.mark()
            if not self.provisioned:
                self.provision()
            elif not self.backend.running:
                self.backend.boot(self.port)
            elif not self.hub.wait_online(self.device_id, 3.0):
                self.reset()  # stuck after an earlier test: start it over
                mark = self.console.mark()
            if not self.hub.wait_online(self.device_id, timeout):
                banner = self.console.wait_for_text(BANNER, mark, 0)
                raise TimeoutError("not online at the hub %.0f s after %s%s" % (
                    timeout, "boot" if banner else "provisioning",
                    "" if banner else " (no boot banner on the console)"))
        except Exception as exc:  # noqa: BLE001 - whatever failed, the board is not usable
            tail = self.console.text[-1500:]
            self.broken = "%s: %s%s%s" % (
                type(exc).__name__, exc,
                "; port: %s" % self.port.last_error if self.port.last_error else "",
                "; gateway: %s" % self.relay.errors[-1] if self.relay.errors else "")
            if tail:
                self.broken += "\nconsole (its end):\n" + tail

    def close(self) -> None:
        """Stop relaying and reading, free the backend and the log."""
        self.relay.stop()
        self.port.stop()
        self.backend.close()
        if self._console_file is not None:
            self._console_file.close()
            self._console_file = None
