"""A simulated board: runs a firmware script (``main.py`` on its flash) in its own thread, with
its own ``machine``, ``time`` and ``os``, its own copy of the SDK, a console and a flash folder.

Rules (docs/simulator.md, "Boards"):
- Life cycle: ``start()`` powers on (cold boot), ``reset()`` presses RESET, ``power_cycle()``
  cuts the power (for ``off_ms``), ``stop()`` powers off (by default gracefully: the stopped
  firmware's SDK clients send their Close), ``close()`` frees the board's link, proxy and
  console log. The flash survives all of them.
- A boot runs ``/boot.py`` (if present) then ``/main.py`` with fresh modules (see
  ``_importer``). When the script ends or raises, the board stays up (the REPL on a real board:
  ``state`` "exited" or "crashed", traceback on the console) until reset, unless
  ``restart_on_crash`` restarts it.
- A reset requested from outside the firmware's thread takes effect at the firmware's next
  call into a shim (``time``, ``machine``, UART, console input), where a private
  ``BaseException`` unwinds it; a blocked socket read returns within its own timeout (the
  SDK's loop waits at most about a second).
- A reset or power cut closes every file the firmware left open; its network sockets go
  silent (held open, never read, then closed after ``LIMBO_S``), so the hub sees a board that
  vanished and later reconnected, as with a real board. ``stop()`` closes them at once.
- Stats (``stats()``: online, readings published and acknowledged, queue depth, connections)
  are read from the board's own copy of the SDK: the board observes the ``Client`` and
  ``OfflineQueue`` objects its firmware makes, without changing what they do.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import os
import socket as _host_socket
import ssl as _host_ssl
import sys as _host_sys
import threading
import time
import traceback
import types
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Union

from firmware_sim import machine as machine_module
from firmware_sim._importer import BoardImporter, compile_file
from firmware_sim.clock import BoardClock
from firmware_sim.console import Console
from firmware_sim.flash import Flash
from firmware_sim.machine import (DEEPSLEEP_RESET, HARD_RESET, PWRON_RESET, RESET_CAUSE_NAMES,
                                  SOFT_RESET, WDT_RESET, PinState, Sensor, UARTChannel)

#: Where the SDK's firmware looks for its credentials bundle (a path on the board's flash).
BUNDLE_NAME = "device.smartx.json"
#: The firmware a board runs at boot, and the optional script before it.
MAIN_SCRIPT = "main.py"
BOOT_SCRIPT = "boot.py"
#: Seconds a power-cut board's sockets stay open (silent) before they are closed: longer than
#: the hub's default idle timeout, so the hub notices the vanished board on its own.
LIMBO_S = 75.0
#: Host modules a board imports under MicroPython's ``u`` names.
_ALIASES = {"ubinascii": "binascii", "uhashlib": "hashlib", "ujson": "json", "ustruct": "struct",
            "uselect": "select", "uerrno": "errno", "uio": "io", "ucollections": "collections",
            "urandom": "random", "ure": "re", "uzlib": "zlib", "uheapq": "heapq",
            "uasyncio": "asyncio", "uctypes": "ctypes"}

STATES = ("off", "booting", "running", "exited", "crashed")


class _BoardReset(BaseException):
    """Unwinds a board's firmware on reset or power cut (not an ``Exception``: firmware that
    catches ``Exception`` must not swallow its own reset)."""


class BoardError(Exception):
    """A board cannot do what was asked (bad configuration, not running)."""


@dataclass
class BoardStats:
    """What a board's SDK client reports (zeros for firmware that makes no client)."""

    name: str
    state: str
    online: bool
    published: int
    acknowledged: int
    queue_depth: int
    connections: int
    boots: int


class Board:
    """One simulated board (see the module rules).

    ``script``: the firmware file, copied to the flash as ``/main.py``. ``directory``: the
    board's folder (``flash/``, ``console.log``, ``tty``). ``bundle`` (path or dict) is
    written to the flash as ``/device.smartx.json``, its hub address replaced by ``hub``
    (``(host, port)``) or by the fault proxy's when ``faults`` is given. ``serial=True`` wires
    the board's UART to a pseudo-terminal (``serial_path``) and its console with it; the
    ``faults`` plan then acts on that link instead of a TCP proxy.
    """

    def __init__(self, name: str, script: Optional[str] = None, *, directory: str,
                 bundle: Union[str, dict, None] = None, hub: Optional[tuple] = None,
                 serial: bool = False, serial_uarts: Iterable[Any] = (0, 1),
                 serial_baudrate: Optional[int] = 115200, faults: Any = None,
                 clock: Optional[BoardClock] = None, sensor: Optional[Sensor] = None,
                 seed: int = 0, files: Optional[Dict[str, Any]] = None,
                 isolate: Iterable[str] = ("smartx_device",), restart_on_crash: bool = False,
                 console_log: bool = True, echo: Optional[Callable[[str], None]] = None,
                 freq_hz: int = machine_module.DEFAULT_FREQ_HZ) -> None:
        self.name = name
        self.directory = os.path.abspath(directory)
        os.makedirs(self.directory, exist_ok=True)
        self.flash = Flash(os.path.join(self.directory, "flash"))
        self.clock = clock if clock is not None else BoardClock()
        self.sensor = sensor if sensor is not None else Sensor(seed=_seed_for(seed, name))
        self.console = Console(name, os.path.join(self.directory, "console.log")
                               if console_log else None)
        if echo is not None:
            self.console.add_sink(echo)
        self.unique_id = hashlib.sha256(("smartx-sim/" + name).encode()).digest()[:8]
        self.freq_hz = freq_hz
        self.isolate = tuple(isolate)
        self.restart_on_crash = restart_on_crash
        self.hub = tuple(hub) if hub is not None else None
        self.faults = faults
        self.state = "off"
        self.boots = 0
        self.reset_cause = PWRON_RESET
        self.crash: Optional[str] = None  # traceback text of the last crash
        self.published = 0
        self.acknowledged = 0
        self.clients: List[Any] = []
        self._bundle = bundle
        self._pins: Dict[Any, PinState] = {}
        self._uarts: Dict[Any, UARTChannel] = {}
        self._cond = threading.Condition()
        self._pending: Optional[tuple] = None  # (cause, off_ms) or ("off", 0)
        self._thread: Optional[threading.Thread] = None
        self._thread_ident: Optional[int] = None
        self._timers: List[list] = []
        self._soft_calls: List[tuple] = []
        self._soft_active = False
        self._wdt_deadline: Optional[float] = None
        self._sockets: "weakref.WeakSet[Any]" = weakref.WeakSet()
        self._graceful = False
        self._closing_clients = False
        self._limbo: List[tuple] = []
        self._closed = False
        self.machine = machine_module.make_machine_module(self)
        self.serial = None
        self.proxy = None
        self.serial_uarts = tuple(serial_uarts)
        if serial:
            from firmware_sim.serial_link import SerialLink

            self.serial = SerialLink(name=name, faults=faults, baudrate=serial_baudrate,
                                     link_path=os.path.join(self.directory, "tty"))
            self.serial.attach(self._serial_channel())
            self.console.add_sink(self.serial.board_console)
        if faults is not None:
            faults.bind_board(self)
        if script is not None:
            with open(script, "rb") as handle:
                self.flash.write_file(MAIN_SCRIPT, handle.read())
        for path, data in (files or {}).items():
            self.flash.write_file(path, data)

    def __repr__(self) -> str:
        return "<Board %s %s boots=%d>" % (self.name, self.state, self.boots)

    # -- wiring ----------------------------------------------------------------------------

    @property
    def serial_path(self) -> Optional[str]:
        """The path pyserial opens for this board's serial link (stable across replugs)."""
        return self.serial.path if self.serial is not None else None

    def _serial_channel(self) -> UARTChannel:
        channel = UARTChannel("serial")
        for uart_id in self.serial_uarts:
            self._uarts[uart_id] = channel
        return channel

    def uart(self, uart_id: Any) -> UARTChannel:
        """The wire behind ``machine.UART(uart_id)`` (tests use its host end)."""
        channel = self._uarts.get(uart_id)
        if channel is None:
            channel = self._uarts[uart_id] = UARTChannel(uart_id)
        return channel

    def pin(self, pin_id: Any) -> PinState:
        """The state of pin ``pin_id`` (made on first use)."""
        state = self._pins.get(pin_id)
        if state is None:
            state = self._pins[pin_id] = PinState(pin_id)
        return state

    def drive_pin(self, pin_id: Any, level: int) -> None:
        """Set an input pin's level from outside (a button); its IRQ handler runs as a soft IRQ."""
        state = self.pin(pin_id)
        level = 1 if level else 0
        if level == state.value:
            return
        state.value = level
        state.history.append((self.clock.uptime_ms(), level))
        if state.irq is not None:
            handler, trigger, pin = state.irq
            edge = machine_module.Pin.IRQ_RISING if level else machine_module.Pin.IRQ_FALLING
            if trigger & edge:
                self.schedule(handler, pin)

    def install_bundle(self, bundle: Union[str, dict], host: Optional[str] = None,
                       port: Optional[int] = None, path: str = BUNDLE_NAME) -> dict:
        """Write a credentials bundle to the flash, pointing it at ``host:port`` if given."""
        if isinstance(bundle, dict):
            data = dict(bundle)
        else:
            with open(bundle, "r", encoding="utf-8") as handle:
                data = json.load(handle)
        if host is not None or port is not None:
            # The TLS name stays the hub's (the certificate names it), the address changes.
            data.setdefault("server_name", data.get("hub_host") or "localhost")
            if not data.get("server_name"):
                data["server_name"] = data.get("hub_host") or "localhost"
        if host is not None:
            data["hub_host"] = host
        if port is not None:
            data["hub_port"] = int(port)
        self.flash.write_file(path, json.dumps(data, indent=1))
        return data

    def _hub_from_bundle(self) -> Optional[tuple]:
        bundle = self._bundle
        if isinstance(bundle, str):
            with open(bundle, "r", encoding="utf-8") as handle:
                bundle = json.load(handle)
        if isinstance(bundle, dict) and bundle.get("hub_port"):
            return (bundle.get("hub_host") or "127.0.0.1", int(bundle["hub_port"]))
        return None

    def _prepare_network(self) -> None:
        """Start the fault proxy if this board needs one, and point its bundle at the hub."""
        target = self.hub or self._hub_from_bundle()
        if self.faults is not None and self.serial is None and self.proxy is None:
            if target is None:
                raise BoardError("board %s: faults on the TCP path need hub=(host, port) or a"
                                 " bundle naming the hub" % self.name)
            from firmware_sim.proxy import FaultProxy

            self.proxy = FaultProxy(target, faults=self.faults, name=self.name).start()
        if self._bundle is not None:
            if self.proxy is not None:
                self.install_bundle(self._bundle, self.proxy.host, self.proxy.port)
            elif self.hub is not None:
                self.install_bundle(self._bundle, self.hub[0], self.hub[1])
            else:
                self.install_bundle(self._bundle)
            self._bundle = None  # written once; firmware may change it afterwards

    # -- life cycle ------------------------------------------------------------------------

    def start(self) -> "Board":
        """Power on (a cold boot); returns at once, the firmware runs in the board's thread."""
        if self._closed:
            raise BoardError("board %s is closed" % self.name)
        if self._thread is not None and self._thread.is_alive():
            return self
        self._prepare_network()
        with self._cond:
            self._pending = None
        self._thread = threading.Thread(target=self._main, name="board-%s" % self.name,
                                        daemon=True)
        self._thread.start()
        return self

    @property
    def running(self) -> bool:
        """True while the board is powered (its thread alive)."""
        return self._thread is not None and self._thread.is_alive()

    def request_reset(self, cause: int = HARD_RESET, off_ms: float = 0,
                      from_firmware: bool = False) -> None:
        """Ask for a reset (``cause`` a machine reset cause); the firmware stops at its next
        shim call. From the firmware's own thread, raise at once."""
        with self._cond:
            if self._pending is None or self._pending[0] != "off":
                self._pending = (cause, float(off_ms))
            self._cond.notify_all()
        self.clock.wake()
        if from_firmware:
            raise _BoardReset()

    def reset(self, wait: bool = True, timeout: float = 10.0) -> None:
        """Press RESET: the firmware restarts with the flash and the RTC kept."""
        self._restart(HARD_RESET, 0, wait, timeout)

    def power_cycle(self, off_ms: float = 0, wait: bool = True, timeout: float = 10.0) -> None:
        """Cut the power for ``off_ms``, then boot cold (flash kept; RAM, RTC and sockets lost)."""
        self._restart(PWRON_RESET, off_ms, wait, timeout)

    def _restart(self, cause: int, off_ms: float, wait: bool, timeout: float) -> None:
        if not self.running:
            raise BoardError("board %s is not powered" % self.name)
        boots = self.boots
        self.request_reset(cause, off_ms)
        if wait:
            self.wait_for(lambda: self.boots > boots or not self.running, timeout,
                          "board %s to boot again" % self.name)

    def stop(self, timeout: float = 10.0, graceful: bool = True) -> None:
        """Power off and wait for the firmware's thread to end. ``graceful``: once the
        firmware has stopped, its SDK clients say goodbye to the hub (``Client.close``: a
        Close message, the queue file closed), as a board that shuts down cleanly."""
        self.request_stop(graceful)
        self.join(timeout)

    def request_stop(self, graceful: bool = True) -> None:
        """Ask the board to power off without waiting (``join`` waits): fleets stop all
        their boards at once this way."""
        if self._thread is None:
            return
        with self._cond:
            self._pending = ("off", 0.0)
            self._graceful = graceful
            self._cond.notify_all()
        self.clock.wake()

    def join(self, timeout: float = 10.0) -> None:
        """Wait for a stopping board's thread to end."""
        thread = self._thread
        if thread is None:
            return
        thread.join(timeout)
        if thread.is_alive():
            raise BoardError("board %s did not stop within %.0f s (firmware stuck outside"
                             " the shims?)" % (self.name, timeout))
        self._thread = None
        self._release_limbo(everything=True)

    def close(self) -> None:
        """Power off and free the serial link, the proxy and the console log."""
        if self._closed:
            return
        self.stop()
        self._closed = True
        if self.serial is not None:
            self.serial.close()
        if self.proxy is not None:
            self.proxy.stop()
        self.console.close()

    def __enter__(self) -> "Board":
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def wait_for(self, predicate: Callable[[], Any], timeout: float = 10.0,
                 what: str = "condition") -> Any:
        """Poll ``predicate`` until truthy (returned); ``TimeoutError`` after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() >= deadline:
                raise TimeoutError("timed out after %.1f s waiting for %s" % (timeout, what))
            time.sleep(0.02)

    # -- the board's thread ----------------------------------------------------------------

    def _main(self) -> None:
        self._thread_ident = threading.get_ident()
        cause = PWRON_RESET
        while True:
            self._boot(cause)
            with self._cond:
                while self._pending is None:
                    if self.restart_on_crash and self.state == "crashed":
                        self._pending = (SOFT_RESET, 1000.0)
                        break
                    self._cond.wait()
                request, off_ms = self._pending
                self._pending = None
            if request == "off":
                self.state = "off"
                return
            cause = request
            if off_ms > 0:
                self.state = "off"
                if self._off_wait(off_ms):
                    self.state = "off"
                    return

    def _off_wait(self, off_ms: float) -> bool:
        """Stay unpowered for ``off_ms`` of real time; True if told to stay off."""
        deadline = time.monotonic() + off_ms / 1000.0
        with self._cond:
            while True:
                if self._pending is not None and self._pending[0] == "off":
                    self._pending = None
                    return True
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)

    def _boot(self, cause: int) -> None:
        self.state = "booting"
        self.reset_cause = cause
        self.boots += 1
        self.crash = None
        self.clients = []
        self._timers = []
        self._soft_calls = []
        self._wdt_deadline = None
        self.clock.max_wait_s = None
        self.clock.boot(cold=cause in (PWRON_RESET, DEEPSLEEP_RESET))
        for state in self._pins.values():
            state.mode, state.irq = -1, None
        for channel in set(self._uarts.values()):
            channel.clear()
        importer = self._make_importer()
        self.state = "running"
        try:
            for script in (BOOT_SCRIPT, MAIN_SCRIPT):
                host = self.flash.host_path(script)
                if not os.path.isfile(host):
                    if script == MAIN_SCRIPT:
                        self.console.write("no %s on the flash: nothing to run\n" % script)
                    continue
                namespace = {"__name__": "__main__", "__file__": "/" + script,
                             "__builtins__": importer.builtins}
                exec(compile_file(host), namespace)
            self.state = "exited"
        except _BoardReset:
            self.state = "booting"
        except SystemExit:
            self.state = "exited"
        except BaseException as exc:  # the firmware crashed: print it as the REPL would
            text = format_firmware_exception(exc)
            self.crash = text
            self.console.write(text)
            self.state = "crashed"
        finally:
            stopping = self._pending is not None and self._pending[0] == "off"
            if stopping and self._graceful:
                self._close_clients()
            # A reset or power cut sends nothing on the network (the board's TCP stack is
            # gone); only powering the board off for good closes its sockets.
            self._power_down_io(silent=self._pending is not None and not stopping)

    def _close_clients(self) -> None:
        """A clean shutdown: each SDK client of the stopped firmware sends its Close."""
        self._closing_clients = True
        try:
            for client in self.clients:
                try:
                    client.close()
                except Exception:  # the session may be half-open or already gone
                    pass
        finally:
            self._closing_clients = False

    def _power_down_io(self, silent: bool) -> None:
        """Close what the firmware left open; a power cut leaves sockets silent in limbo."""
        self.flash.close_all()
        self._release_limbo()
        sockets = [sock for sock in list(self._sockets) if sock.fileno() != -1]
        self._sockets = weakref.WeakSet()
        if silent:
            now = time.monotonic()
            self._limbo.extend((now, sock) for sock in sockets)
        else:
            for sock in sockets:
                _close_quietly(sock)

    def _release_limbo(self, everything: bool = False) -> None:
        now = time.monotonic()
        keep = []
        for since, sock in self._limbo:
            if everything or now - since >= LIMBO_S:
                _close_quietly(sock)
            else:
                keep.append((since, sock))
        self._limbo = keep

    # -- what the shims call ---------------------------------------------------------------

    def _check(self) -> None:
        """Every shim call starts here: raise a pending reset; run due soft IRQs."""
        if self._pending is not None and not self._closing_clients:
            raise _BoardReset()
        if self._wdt_deadline is not None and self.clock.uptime_ms() >= self._wdt_deadline:
            self._wdt_deadline = None
            self.request_reset(WDT_RESET, from_firmware=True)
        if (self._timers or self._soft_calls) and not self._soft_active \
                and threading.get_ident() == self._thread_ident:
            self._run_soft()

    def _run_soft(self) -> None:
        self._soft_active = True
        try:
            now = self.clock.uptime_ms()
            for entry in list(self._timers):
                due, period, periodic, callback, timer = entry
                if now >= due:
                    if periodic:
                        entry[0] = due + period if due + period > now else now + period
                    elif entry in self._timers:
                        self._timers.remove(entry)
                    self._soft_call(callback, timer)
            while self._soft_calls:
                callback, argument = self._soft_calls.pop(0)
                self._soft_call(callback, argument)
        finally:
            self._soft_active = False

    def _soft_call(self, callback: Callable[[Any], Any], argument: Any) -> None:
        try:
            callback(argument)
        except _BoardReset:
            raise
        except Exception as exc:  # MicroPython reports and carries on
            self.console.write("Uncaught exception in IRQ callback handler\n"
                               + format_firmware_exception(exc))

    def schedule(self, callback: Callable[[Any], Any], argument: Any = None) -> None:
        """Run ``callback(argument)`` in the firmware's thread at its next shim call."""
        self._soft_calls.append((callback, argument))
        self.clock.wake()

    def add_timer(self, period_ms: int, periodic: bool, callback: Callable[[Any], Any],
                  timer: Any) -> list:
        """Arm a ``machine.Timer``; returns its entry."""
        entry = [self.clock.uptime_ms() + period_ms, period_ms, periodic, callback, timer]
        self._timers.append(entry)
        # Sleeps must wake often enough for timers to fire on time.
        self.clock.max_wait_s = 0.005
        return entry

    def remove_timer(self, entry: list) -> None:
        """Disarm a timer."""
        if entry in self._timers:
            self._timers.remove(entry)
        if not self._timers:
            self.clock.max_wait_s = None

    def arm_watchdog(self, timeout_ms: int) -> None:
        """(Re)start the watchdog countdown."""
        self._wdt_deadline = self.clock.uptime_ms() + timeout_ms

    def track_socket(self, sock: Any) -> None:
        """Remember a socket the firmware opened (closed or silenced when it stops)."""
        self._sockets.add(sock)

    # -- the firmware's environment --------------------------------------------------------

    def _make_importer(self) -> BoardImporter:
        board_builtins = dict(builtins.__dict__)
        stdout = _ConsoleStream(self, "stdout")
        importer = BoardImporter({}, self.flash.root, self.isolate, board_builtins,
                                 on_load=self._observe_module)
        shims = self._make_shims(importer, stdout)
        importer.shims = shims

        def board_print(*args: Any, sep: Optional[str] = " ", end: Optional[str] = "\n",
                        file: Any = None, flush: bool = False) -> None:
            text = (" " if sep is None else sep).join(str(arg) for arg in args)
            text += "\n" if end is None else end
            if file is None or file is stdout or file is _host_sys.stdout \
                    or file is _host_sys.stderr:
                self._check()
                self.console.write(text)
            else:
                file.write(text)

        def board_input(prompt: str = "") -> str:
            self.console.write(prompt)
            return self.console.read_input(self._check).rstrip("\r\n")

        board_builtins.update(__import__=importer, open=self.flash.open, print=board_print,
                              input=board_input)
        return importer

    def _make_shims(self, importer: BoardImporter, stdout: "_ConsoleStream") -> Dict[str, Any]:
        time_module = machine_module.make_time_module(self, "time")
        os_module = self.flash.os_module("os", "SmartX simulated board %s" % self.name)
        sys_module = _make_sys_module(self, importer, stdout)
        shims: Dict[str, Any] = {
            "machine": self.machine, "umachine": self.machine,
            "time": time_module, "utime": time_module,
            "os": os_module, "uos": os_module,
            "sys": sys_module, "usys": sys_module,
            "micropython": _make_micropython_module(self),
            "gc": _make_gc_module(),
            "network": _make_network_module(self),
            "socket": _make_socket_module(self), "usocket": None,
            "ssl": _make_ssl_module(self), "ussl": None,
        }
        shims["usocket"] = shims["socket"]
        shims["ussl"] = shims["ssl"]
        for alias, host_name in _ALIASES.items():
            try:
                shims[alias] = __import__(host_name)
            except ImportError:  # e.g. ctypes missing: the alias is simply absent
                pass
        return shims

    def _observe_module(self, module: types.ModuleType) -> None:
        """Watch the board's own SDK objects for ``stats`` (behaviour unchanged)."""
        board = self
        if module.__name__.endswith(".client") and isinstance(getattr(module, "Client", None),
                                                              type):
            cls = module.Client
            original_init = cls.__init__

            def observed_init(client: Any, *args: Any, **kwargs: Any) -> None:
                original_init(client, *args, **kwargs)
                board.clients.append(client)

            cls.__init__ = observed_init
        elif module.__name__.endswith(".queue") and isinstance(
                getattr(module, "OfflineQueue", None), type):
            cls = module.OfflineQueue
            original_append, original_ack = cls.append, cls.ack

            def observed_append(queue: Any, *args: Any, **kwargs: Any) -> Any:
                result = original_append(queue, *args, **kwargs)
                board.published += 1
                return result

            def observed_ack(queue: Any, *args: Any, **kwargs: Any) -> Any:
                before = queue.pending_readings
                result = original_ack(queue, *args, **kwargs)
                board.acknowledged += max(0, before - queue.pending_readings)
                return result

            cls.append = observed_append
            cls.ack = observed_ack

    # -- observation -----------------------------------------------------------------------

    def stats(self) -> BoardStats:
        """The board's SDK figures now (see ``BoardStats``)."""
        online = False
        depth = 0
        connections = 0
        for client in list(self.clients):
            try:
                online = online or bool(client.connected)
                depth += int(client.queue.pending_readings)
                connections += int(getattr(client, "connections", 0))
            except Exception:  # read from another thread mid-update: skip this sample
                continue
        return BoardStats(self.name, self.state, online and self.state == "running",
                          self.published, self.acknowledged, depth, connections, self.boots)

    @property
    def reset_cause_name(self) -> str:
        """The last reset cause as MicroPython names it."""
        return RESET_CAUSE_NAMES.get(self.reset_cause, str(self.reset_cause))


# -- helpers -------------------------------------------------------------------------------


_SIMULATOR_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def format_firmware_exception(exc: BaseException) -> str:
    """A traceback as the board's console shows it: the firmware's and the SDK's frames,
    without the simulator's own (its importer and boot loop are not on a real board)."""
    frames = [frame for frame in traceback.extract_tb(exc.__traceback__)
              if not frame.filename.startswith(_SIMULATOR_DIR)]
    lines = ["Traceback (most recent call last):\n"] if frames else []
    lines.extend(traceback.format_list(frames))
    lines.extend(traceback.format_exception_only(type(exc), exc))
    return "".join(lines)


def _seed_for(seed: int, name: str) -> int:
    """A per-board seed: the same fleet seed and board name give the same sensor values."""
    digest = hashlib.sha256(("%s/%s" % (seed, name)).encode()).digest()
    return int.from_bytes(digest[:8], "big")


def _close_quietly(sock: Any) -> None:
    try:
        sock.close()
    except OSError:
        pass


class _ConsoleStream:
    """``sys.stdout``/``sys.stderr`` of a board: text to the console, ``buffer`` for bytes."""

    def __init__(self, board: Board, name: str) -> None:
        self._board = board
        self.name = name
        self.buffer = _ConsoleBuffer(board)

    def write(self, text: str) -> int:
        """Print ``text`` on the board's console."""
        self._board._check()
        self._board.console.write(text)
        return len(text)

    def flush(self) -> None:
        """Nothing is buffered."""


class _ConsoleBuffer:
    """Raw bytes to the console wire (the serial link when there is one)."""

    def __init__(self, board: Board) -> None:
        self._board = board

    def write(self, data: bytes) -> int:
        """Send raw bytes on the console wire."""
        self._board._check()
        link = self._board.serial
        if link is not None:
            link.board_write(bytes(data))
        else:
            self._board.console.write(bytes(data).decode("utf-8", "replace"))
        return len(data)

    def flush(self) -> None:
        """Nothing is buffered."""


class _ConsoleInput:
    """``sys.stdin`` of a board: what ``console.send`` typed."""

    def __init__(self, board: Board) -> None:
        self._board = board

    def readline(self) -> str:
        """A line typed at the console (blocks until one comes)."""
        return self._board.console.read_input(self._board._check)

    def read(self, count: int = -1) -> str:
        """What was typed (blocks until something comes)."""
        return self._board.console.read_input(self._board._check, line=False)


def _make_sys_module(board: Board, importer: BoardImporter, stdout: _ConsoleStream
                     ) -> types.ModuleType:
    module = types.ModuleType("sys", "sys on simulated board %s" % board.name)
    module.modules = importer.modules
    module.stdout = stdout
    module.stderr = _ConsoleStream(board, "stderr")
    module.stdin = _ConsoleInput(board)
    module.argv = []
    module.path = ["", "/lib"]

    def print_exception(exc: BaseException, file: Any = None) -> None:
        """MicroPython's way to print a traceback."""
        (file or stdout).write(format_firmware_exception(exc))

    def exit(code: Any = 0) -> None:  # noqa: A001 - MicroPython's name
        """End the firmware (the board stays up, as at the REPL)."""
        raise SystemExit(code)

    module.print_exception = print_exception
    module.exit = exit

    def fallback(attribute: str) -> Any:
        # The SDK runs its CPython code paths on the simulator: implementation, version, ...
        return getattr(_host_sys, attribute)

    module.__getattr__ = fallback  # type: ignore[attr-defined]
    return module


def _make_micropython_module(board: Board) -> types.ModuleType:
    module = types.ModuleType("micropython", "micropython on simulated board %s" % board.name)

    def const(value: Any) -> Any:
        """A compile-time constant on a board; the value itself here."""
        return value

    def identity(fn: Any) -> Any:
        return fn

    def schedule(callback: Callable[[Any], Any], argument: Any) -> None:
        """Run ``callback(argument)`` soon in the firmware's thread."""
        board.schedule(callback, argument)

    def mem_info(*_args: Any) -> None:
        board.console.write("stack: 2048 out of 15360\nGC: total: 111168, used: 20000,"
                            " free: 91168\n")

    module.const = const
    module.native = identity
    module.viper = identity
    module.asm_thumb = identity
    module.schedule = schedule
    module.mem_info = mem_info
    module.qstr_info = lambda *args: None
    module.stack_use = lambda: 2048
    module.heap_lock = lambda: 0
    module.heap_unlock = lambda: 0
    module.kbd_intr = lambda char: None
    module.alloc_emergency_exception_buf = lambda size: None
    module.opt_level = lambda *args: 0
    return module


def _make_gc_module() -> types.ModuleType:
    module = types.ModuleType("gc", "MicroPython gc on a simulated board")
    # CPython collects on its own; a board-wide gc.collect() per loop turn of 200 boards
    # would only burn the host's CPU.
    module.collect = lambda: None
    module.enable = lambda: None
    module.disable = lambda: None
    module.isenabled = lambda: True
    module.mem_free = lambda: 91168
    module.mem_alloc = lambda: 20000
    module.threshold = lambda *args: -1
    return module


def _make_network_module(board: Board) -> types.ModuleType:
    module = types.ModuleType("network", "network on simulated board %s" % board.name)

    class WLAN:
        """A Wi-Fi interface that is always in range (the host's loopback)."""

        def __init__(self, interface: int = 0) -> None:
            self._active = False
            self._connected = False

        def active(self, value: Optional[bool] = None) -> Optional[bool]:
            if value is None:
                return self._active
            self._active = bool(value)
            return None

        def connect(self, ssid: Optional[str] = None, key: Optional[str] = None,
                    **_kwargs: Any) -> None:
            board._check()
            self._active = True
            self._connected = True

        def disconnect(self) -> None:
            self._connected = False

        def isconnected(self) -> bool:
            board._check()
            return self._connected

        def status(self, *_args: Any) -> int:
            return 1010 if self._connected else 1000

        def ifconfig(self, *_args: Any) -> tuple:
            return ("127.0.0.1", "255.0.0.0", "127.0.0.1", "127.0.0.1")

        def config(self, *args: Any, **_kwargs: Any) -> Any:
            if args and args[0] == "mac":
                return board.unique_id[:6]
            return None

    module.WLAN = WLAN
    module.STA_IF = 0
    module.AP_IF = 1
    module.STAT_IDLE = 1000
    module.STAT_GOT_IP = 1010
    module.hostname = lambda *args: board.name
    return module


def _make_socket_module(board: Board) -> types.ModuleType:
    module = types.ModuleType("socket", "the host socket module, tracking board %s's sockets"
                              % board.name)
    module.__dict__.update({key: value for key, value in vars(_host_socket).items()
                            if not key.startswith("__")})

    class BoardSocket(_host_socket.socket):
        """A host socket the board remembers (closed or silenced when the board stops)."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            board.track_socket(self)

    def create_connection(*args: Any, **kwargs: Any) -> Any:
        sock = _host_socket.create_connection(*args, **kwargs)
        board.track_socket(sock)
        return sock

    module.socket = BoardSocket
    module.create_connection = create_connection
    return module


def _make_ssl_module(board: Board) -> types.ModuleType:
    module = types.ModuleType("ssl", "the host ssl module, tracking board %s's TLS sockets"
                              % board.name)
    module.__dict__.update({key: value for key, value in vars(_host_ssl).items()
                            if not key.startswith("__")})

    class BoardSSLContext(_host_ssl.SSLContext):
        """SSLContext whose sockets the board remembers."""

        def wrap_socket(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
            sock = super().wrap_socket(*args, **kwargs)
            board.track_socket(sock)
            return sock

    module.SSLContext = BoardSSLContext
    return module
