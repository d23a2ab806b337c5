"""The ``machine`` module a simulated board's firmware imports: Pin, ADC, UART, RTC, WDT, Timer.

Rules (docs/simulator.md, "machine"):
- One module per board (``make_machine_module(board)``): its classes are subclasses of the
  ones here bound to that board, so two boards in one process never share a pin, an ADC or a
  UART.
- Every call first runs the board's check: a pending reset or power cut is raised there (as
  a private ``BaseException`` the firmware cannot catch with ``except Exception``), and due
  soft interrupts (Timer callbacks, pin IRQs, ``micropython.schedule``) run there, in the
  firmware's thread, as MicroPython runs them between bytecodes.
- ADC values come from the board's ``Sensor``: scripted (a list, or a function of board time)
  or seeded noise around a slow sine, so the same seed reads the same values.
- A UART is a byte channel: with a serial link it is wired to the pseudo-terminal; without
  one, tests talk to it through ``board.uart(id)``. It has MicroPython's API only (``any``,
  ``read`` returning None when nothing came, ``readline``, ``write``, ``deinit``), so the
  SDK's serial transport takes the code path it takes on a board.
- ``reset()``, ``soft_reset()``, ``deepsleep(ms)`` and a starved ``WDT`` restart the firmware
  with the flash kept; ``reset_cause()`` says which.
"""

from __future__ import annotations

import calendar
import hashlib
import math
import random
import threading
import time as _host_time
import types
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

from firmware_sim.clock import EPOCH_2000_UNIX_MS

PWRON_RESET = 1
HARD_RESET = 2
WDT_RESET = 3
DEEPSLEEP_RESET = 4
SOFT_RESET = 5
RESET_CAUSE_NAMES = {PWRON_RESET: "PWRON_RESET", HARD_RESET: "HARD_RESET",
                     WDT_RESET: "WDT_RESET", DEEPSLEEP_RESET: "DEEPSLEEP_RESET",
                     SOFT_RESET: "SOFT_RESET"}

#: The CPU frequency ``freq()`` reports until firmware sets another.
DEFAULT_FREQ_HZ = 240_000_000
#: Bytes a UART's receive buffer holds; more is dropped and counted (a UART overrun).
DEFAULT_UART_RXBUF = 65536


# -- sensor values --------------------------------------------------------------------------


class Sensor:
    """The values a board's ADC channels read.

    Per channel: ``script(channel, values)`` plays a list of raw 16-bit values (the last one
    repeats), or a function ``f(board_ms) -> 0..65535``; any other channel reads seeded noise:
    ``base + amplitude * sin(2 pi t / period)`` plus Gaussian noise, as fractions of full scale.
    """

    def __init__(self, seed: int = 0, base: float = 0.45, amplitude: float = 0.1,
                 period_s: float = 60.0, noise: float = 0.01) -> None:
        self.seed = seed
        self.base = base
        self.amplitude = amplitude
        self.period_s = period_s
        self.noise = noise
        self._scripts: Dict[Any, Any] = {}
        self._rngs: Dict[Any, random.Random] = {}
        self._lock = threading.Lock()

    def script(self, channel: Any, values: Union[Sequence[int], Callable[[float], int]]) -> None:
        """Make ``channel`` read ``values`` (a list played in order, or a function of ms)."""
        with self._lock:
            self._scripts[channel] = values if callable(values) else [list(values), 0]

    def read_u16(self, channel: Any, board_ms: float) -> int:
        """The next raw 16-bit reading of ``channel`` at board time ``board_ms``."""
        with self._lock:
            scripted = self._scripts.get(channel)
            if callable(scripted):
                return _clamp_u16(scripted(board_ms))
            if scripted is not None:
                values, index = scripted
                if not values:
                    return 0
                value = values[min(index, len(values) - 1)]
                scripted[1] = index + 1
                return _clamp_u16(value)
            rng = self._rngs.get(channel)
            if rng is None:
                digest = hashlib.sha256(("%s/%r" % (self.seed, channel)).encode()).digest()
                rng = self._rngs[channel] = random.Random(int.from_bytes(digest[:8], "big"))
            phase = 2.0 * math.pi * (board_ms / 1000.0) / self.period_s
            fraction = self.base + self.amplitude * math.sin(phase) + rng.gauss(0.0, self.noise)
            return _clamp_u16(int(fraction * 65535))


def _clamp_u16(value: Any) -> int:
    return max(0, min(65535, int(value)))


# -- pins -----------------------------------------------------------------------------------


class PinState:
    """What a pin is doing: its mode, level, and every level change (board ms, level)."""

    def __init__(self, pin_id: Any) -> None:
        self.id = pin_id
        self.mode = -1
        self.pull = -1
        self.value = 0
        self.history: List[tuple] = []
        self.irq: Optional[tuple] = None  # (handler, trigger, pin object)

    @property
    def toggles(self) -> int:
        """How many times the level changed."""
        return len(self.history)


class Pin:
    """``machine.Pin``: a GPIO whose level tests read (``board.pin(id)``) and drive."""

    IN = 0
    OUT = 1
    OPEN_DRAIN = 2
    ALT = 3
    PULL_UP = 1
    PULL_DOWN = 2
    IRQ_FALLING = 1
    IRQ_RISING = 2
    _board: Any = None

    def __init__(self, pin_id: Any, mode: int = -1, pull: int = -1, value: Optional[int] = None,
                 **_kwargs: Any) -> None:
        self._board._check()
        self._id = pin_id
        self._state = self._board.pin(pin_id)
        self.init(mode, pull, value)

    def init(self, mode: int = -1, pull: int = -1, value: Optional[int] = None,
             **_kwargs: Any) -> None:
        """Configure the pin."""
        if mode != -1:
            self._state.mode = mode
        if pull != -1:
            self._state.pull = pull
            if pull == self.PULL_UP and self._state.mode == self.IN:
                self._state.value = 1
        if value is not None:
            self._set(value)

    def _set(self, level: Any) -> None:
        level = 1 if level else 0
        if level != self._state.value:
            self._state.value = level
            self._state.history.append((self._board.clock.uptime_ms(), level))

    def value(self, level: Optional[int] = None) -> Optional[int]:
        """Read the level, or set it."""
        self._board._check()
        if level is None:
            return self._state.value
        self._set(level)
        return None

    __call__ = value

    def on(self) -> None:
        """Drive high."""
        self.value(1)

    def off(self) -> None:
        """Drive low."""
        self.value(0)

    def high(self) -> None:
        """Drive high (rp2/pyboard name)."""
        self.value(1)

    def low(self) -> None:
        """Drive low (rp2/pyboard name)."""
        self.value(0)

    def toggle(self) -> None:
        """Invert the level."""
        self.value(0 if self._state.value else 1)

    def mode(self, mode: Optional[int] = None) -> Optional[int]:
        """Get or set the mode."""
        if mode is None:
            return self._state.mode
        self._state.mode = mode
        return None

    def pull(self, pull: Optional[int] = None) -> Optional[int]:
        """Get or set the pull."""
        if pull is None:
            return self._state.pull
        self._state.pull = pull
        return None

    def irq(self, handler: Optional[Callable[[Any], None]] = None,
            trigger: int = IRQ_FALLING | IRQ_RISING, **_kwargs: Any) -> None:
        """Call ``handler(pin)`` (as a soft IRQ) when a test drives the level."""
        self._board._check()
        self._state.irq = (handler, trigger, self) if handler is not None else None

    def __repr__(self) -> str:
        return "Pin(%r)" % (self._id,)


# -- ADC ------------------------------------------------------------------------------------


class ADC:
    """``machine.ADC``: reads the board's ``Sensor`` for its channel."""

    ATTN_0DB = 0
    ATTN_2_5DB = 1
    ATTN_6DB = 2
    ATTN_11DB = 3
    WIDTH_9BIT = 0
    WIDTH_10BIT = 1
    WIDTH_11BIT = 2
    WIDTH_12BIT = 3
    _board: Any = None

    def __init__(self, source: Any, atten: Optional[int] = None, **_kwargs: Any) -> None:
        self._board._check()
        self.channel = source._id if isinstance(source, Pin) else source
        self._atten = atten if atten is not None else self.ATTN_0DB
        self._bits = 12

    def read_u16(self) -> int:
        """A 16-bit reading (0..65535)."""
        self._board._check()
        return self._board.sensor.read_u16(self.channel, self._board.clock.uptime_ms())

    def read(self) -> int:
        """A reading at the configured width (ESP32: 12 bits by default)."""
        return self.read_u16() >> (16 - self._bits)

    def read_uv(self) -> int:
        """The reading in microvolts (3.3 V full scale)."""
        return self.read_u16() * 3_300_000 // 65535

    def atten(self, value: int) -> None:
        """Set the attenuation (kept, not modelled)."""
        self._atten = value

    def width(self, value: int) -> None:
        """Set the width of ``read`` (9 to 12 bits)."""
        self._bits = 9 + max(0, min(3, value))


# -- UART -----------------------------------------------------------------------------------


class UARTChannel:
    """The wire behind a board's UART: bytes in (``feed``) and out (to a sink or a buffer)."""

    def __init__(self, uart_id: Any, rxbuf: int = DEFAULT_UART_RXBUF) -> None:
        self.id = uart_id
        self.rxbuf = rxbuf
        self.overruns = 0  # bytes dropped because the receive buffer was full
        self._cond = threading.Condition()
        self._rx = bytearray()
        self._tx = bytearray()  # what the board wrote, when no sink is attached
        self.sink: Optional[Callable[[bytes], None]] = None

    def feed(self, data: bytes) -> None:
        """Bytes arriving at the board (from the link or a test)."""
        with self._cond:
            room = self.rxbuf - len(self._rx)
            if len(data) > room:
                self.overruns += len(data) - max(room, 0)
                data = data[:max(room, 0)]
            self._rx.extend(data)
            self._cond.notify_all()

    def board_write(self, data: bytes) -> None:
        """Bytes the board sends."""
        sink = self.sink
        if sink is not None:
            sink(bytes(data))
            return
        with self._cond:
            self._tx.extend(data)
            self._cond.notify_all()

    # -- the host end for tests without a serial link --------------------------------------

    def host_write(self, data: bytes) -> None:
        """A test sends ``data`` to the board."""
        self.feed(data)

    def host_read(self, timeout: float = 0.0) -> bytes:
        """What the board wrote (waiting up to ``timeout`` s for something)."""
        deadline = _host_time.monotonic() + timeout
        with self._cond:
            while not self._tx:
                remaining = deadline - _host_time.monotonic()
                if remaining <= 0:
                    return b""
                self._cond.wait(remaining)
            data = bytes(self._tx)
            self._tx.clear()
            return data

    # -- the board end ---------------------------------------------------------------------

    def available(self) -> int:
        """Bytes waiting to be read by the board."""
        with self._cond:
            return len(self._rx)

    def take(self, count: Optional[int], timeout_s: float, check: Callable[[], None]) -> bytes:
        """Up to ``count`` bytes, waiting up to ``timeout_s`` for the first; b"" if none."""
        deadline = _host_time.monotonic() + max(0.0, timeout_s)
        with self._cond:
            while not self._rx:
                check()
                remaining = deadline - _host_time.monotonic()
                if remaining <= 0:
                    return b""
                self._cond.wait(min(remaining, 0.2))
            if count is None or count >= len(self._rx):
                data = bytes(self._rx)
                self._rx.clear()
            else:
                data = bytes(self._rx[:count])
                del self._rx[:count]
            return data

    def clear(self) -> None:
        """Drop unread input (a reset flushes the FIFO)."""
        with self._cond:
            self._rx.clear()


class UART:
    """``machine.UART`` on a simulated wire (MicroPython's API; see the module rules)."""

    INV_TX = 1
    INV_RX = 2
    RTS = 1
    CTS = 2
    _board: Any = None

    def __init__(self, uart_id: Any, baudrate: int = 115200, bits: int = 8, parity: Any = None,
                 stop: int = 1, timeout: int = 0, **kwargs: Any) -> None:
        self._board._check()
        self.id = uart_id
        self._channel: UARTChannel = self._board.uart(uart_id)
        self._enabled = True
        self._timeout_s = 0.0
        self.init(baudrate, bits, parity, stop, timeout=timeout, **kwargs)

    def init(self, baudrate: int = 115200, bits: int = 8, parity: Any = None, stop: int = 1,
             timeout: int = 0, **_kwargs: Any) -> None:
        """Configure the line (``timeout``: ms to wait for the first byte of a read)."""
        self.baudrate = baudrate
        self.bits = bits
        self.parity = parity
        self.stop = stop
        self._timeout_s = max(0, timeout) / 1000.0
        self._enabled = True

    def deinit(self) -> None:
        """Switch the UART off (writes are dropped until ``init``)."""
        self._enabled = False

    def any(self) -> int:
        """Bytes waiting."""
        self._board._check()
        return self._channel.available()

    def read(self, count: Optional[int] = None) -> Optional[bytes]:
        """Up to ``count`` bytes (all waiting if None) within the timeout; None if none came."""
        self._board._check()
        data = self._channel.take(count, self._timeout_s, self._board._check)
        return data or None

    def readinto(self, buffer: Any, count: Optional[int] = None) -> Optional[int]:
        """Read into ``buffer``; the count read, or None."""
        size = len(buffer) if count is None else min(count, len(buffer))
        data = self.read(size)
        if not data:
            return None
        buffer[:len(data)] = data
        return len(data)

    def readline(self) -> Optional[bytes]:
        """Bytes up to and including a newline (or what came within the timeout)."""
        self._board._check()
        line = bytearray()
        while not line.endswith(b"\n"):
            byte = self._channel.take(1, self._timeout_s, self._board._check)
            if not byte:
                break
            line.extend(byte)
        return bytes(line) or None

    def write(self, data: Any) -> int:
        """Send bytes; returns how many (all of them: the simulated FIFO never fills)."""
        self._board._check()
        if isinstance(data, str):
            data = data.encode("utf-8")
        data = bytes(data)
        if self._enabled:
            self._channel.board_write(data)
        return len(data)

    def flush(self) -> None:
        """Wait until everything is sent (it is: the channel takes writes whole)."""
        self._board._check()

    def txdone(self) -> bool:
        """True: the transmit buffer is empty."""
        return True

    def sendbreak(self) -> None:
        """Send a break (nothing on a simulated wire)."""


# -- RTC, WDT, Timer ------------------------------------------------------------------------


class RTC:
    """``machine.RTC``: the board clock's RTC, as MicroPython's 8-tuple."""

    _board: Any = None

    def __init__(self, _rtc_id: int = 0) -> None:
        self._board._check()

    def datetime(self, when: Optional[Sequence[int]] = None) -> Optional[tuple]:
        """Get ``(year, month, day, weekday, hours, minutes, seconds, subseconds)``, or set it."""
        self._board._check()
        clock = self._board.clock
        if when is None:
            unix_ms = clock.rtc_unix_ms()
            parts = _host_time.gmtime(unix_ms // 1000)
            return (parts.tm_year, parts.tm_mon, parts.tm_mday, parts.tm_wday, parts.tm_hour,
                    parts.tm_min, parts.tm_sec, (unix_ms % 1000) * 1000)
        year, month, day, _weekday, hours, minutes, seconds = tuple(when)[:7]
        subseconds = tuple(when)[7] if len(when) > 7 else 0
        seconds_since_unix = calendar.timegm((year, month, day, hours, minutes, seconds, 0, 0, 0))
        clock.set_rtc_unix_ms(seconds_since_unix * 1000 + subseconds // 1000)
        return None

    def init(self, when: Sequence[int]) -> None:
        """Set the time (pyboard-style ``init``)."""
        year, month, day, hours, minutes, seconds = tuple(when)[:6]
        self.datetime((year, month, day, 0, hours, minutes, seconds, 0))

    def now(self) -> tuple:
        """``(year, month, day, hours, minutes, seconds, subseconds, tzinfo)``."""
        year, month, day, _wd, hours, minutes, seconds, sub = self.datetime()  # type: ignore[misc]
        return (year, month, day, hours, minutes, seconds, sub, None)


class WDT:
    """``machine.WDT``: reset the board unless ``feed()`` comes within ``timeout`` ms."""

    _board: Any = None

    def __init__(self, id: int = 0, timeout: int = 5000) -> None:  # noqa: A002 - MicroPython's name
        self._board._check()
        self.timeout = max(1, int(timeout))
        self._board.arm_watchdog(self.timeout)

    def feed(self) -> None:
        """Restart the countdown."""
        self._board._check()
        self._board.arm_watchdog(self.timeout)


class Timer:
    """``machine.Timer``: periodic or one-shot callbacks, run as soft IRQs."""

    ONE_SHOT = 0
    PERIODIC = 1
    _board: Any = None

    def __init__(self, timer_id: int = -1, **kwargs: Any) -> None:
        self._board._check()
        self.id = timer_id
        self._entry: Optional[list] = None
        if kwargs:
            self.init(**kwargs)

    def init(self, mode: int = PERIODIC, period: int = -1, freq: float = -1.0,
             callback: Optional[Callable[[Any], None]] = None, **_kwargs: Any) -> None:
        """Start: every ``period`` ms (or ``freq`` Hz) call ``callback(timer)``."""
        self.deinit()
        if period < 0 and freq > 0:
            period = int(1000 / freq)
        if period < 0 or callback is None:
            return
        self._entry = self._board.add_timer(max(1, period), mode == self.PERIODIC, callback, self)

    def deinit(self) -> None:
        """Stop."""
        if self._entry is not None:
            self._board.remove_timer(self._entry)
            self._entry = None


# -- module-level functions -----------------------------------------------------------------


def make_machine_module(board: Any) -> types.ModuleType:
    """The ``machine`` module of ``board``: classes bound to it, and its functions."""
    module = types.ModuleType("machine", "MicroPython machine on simulated board %s" % board.name)
    for base in (Pin, ADC, UART, RTC, WDT, Timer):
        setattr(module, base.__name__, type(base.__name__, (base,), {"_board": board,
                                                                      "__module__": "machine"}))
    for name, value in RESET_CAUSE_NAMES.items():
        setattr(module, value, name)
    module.PIN_WAKE = 2
    module.TIMER_WAKE = 4

    def reset() -> None:
        """Reset the board now (the firmware restarts; the flash is kept)."""
        board.request_reset(SOFT_RESET, from_firmware=True)

    def soft_reset() -> None:
        """Restart the firmware (Ctrl-D)."""
        board.request_reset(SOFT_RESET, from_firmware=True)

    def reset_cause() -> int:
        """Why the firmware last started (PWRON_RESET, HARD_RESET, WDT_RESET, ...)."""
        board._check()
        return board.reset_cause

    def wake_reason() -> int:
        """TIMER_WAKE after a timed deep sleep, else 0."""
        return module.TIMER_WAKE if board.reset_cause == DEEPSLEEP_RESET else 0

    def unique_id() -> bytes:
        """Eight bytes that name this board (stable across resets and runs)."""
        board._check()
        return board.unique_id

    def freq(hz: Optional[int] = None) -> Optional[int]:
        """Get or set the CPU frequency."""
        board._check()
        if hz is None:
            return board.freq_hz
        board.freq_hz = int(hz)
        return None

    def idle() -> None:
        """Wait for the next interrupt (a millisecond here)."""
        board.clock.sleep_ms(1, board._check)

    def lightsleep(ms: Optional[int] = None) -> None:
        """Sleep ``ms`` with the RAM kept."""
        board.clock.sleep_ms(ms if ms is not None else 1000, board._check)

    def deepsleep(ms: Optional[int] = None) -> None:
        """Power down for ``ms``; the firmware restarts with DEEPSLEEP_RESET."""
        board.request_reset(DEEPSLEEP_RESET, off_ms=ms or 0, from_firmware=True)

    def disable_irq() -> int:
        """Soft IRQs are already deferred to the firmware's calls: nothing to do."""
        return 0

    def enable_irq(_state: int = 0) -> None:
        """See ``disable_irq``."""

    def time_pulse_us(_pin: Any, _level: int, timeout_us: int = 1000000) -> int:
        """No pulses on a simulated pin: times out (-2 as MicroPython)."""
        board.clock.sleep_ms(timeout_us / 1000.0, board._check)
        return -2

    for fn in (reset, soft_reset, reset_cause, wake_reason, unique_id, freq, idle, lightsleep,
               deepsleep, disable_irq, enable_irq, time_pulse_us):
        setattr(module, fn.__name__, fn)
    return module


def make_time_module(board: Any, name: str = "time") -> types.ModuleType:
    """The ``time``/``utime`` module of ``board``: MicroPython's ticks and sleeps on the board
    clock, the RTC from 2000-01-01; CPython's other names fall through to the host ``time``
    (the SDK runs its CPython code paths on a simulated board)."""
    from firmware_sim.clock import ticks_add, ticks_diff

    clock = board.clock
    check = board._check
    module = types.ModuleType(name, "MicroPython time on simulated board %s" % board.name)

    def ticks_ms() -> int:
        """Uptime ms, wrapping at 2**30."""
        check()
        return clock.ticks_ms()

    def ticks_us() -> int:
        """Uptime µs, wrapping at 2**30."""
        check()
        return clock.ticks_us()

    def ticks_cpu() -> int:
        """A fast counter (µs here)."""
        return ticks_us()

    def sleep_ms(ms: float) -> None:
        """Sleep ``ms`` of board time."""
        clock.sleep_ms(ms, check)

    def sleep_us(us: float) -> None:
        """Sleep ``us`` µs of board time."""
        clock.sleep_ms(us / 1000.0, check)

    def sleep(seconds: float) -> None:
        """Sleep ``seconds`` of board time."""
        clock.sleep_ms(seconds * 1000.0, check)

    def time() -> int:
        """Seconds since 2000-01-01 by the RTC."""
        check()
        return clock.rtc_seconds()

    def time_ns() -> int:
        """Nanoseconds since 2000-01-01 by the RTC."""
        check()
        return (clock.rtc_unix_ms() - EPOCH_2000_UNIX_MS) * 1_000_000

    def gmtime(seconds: Optional[float] = None) -> tuple:
        """``(year, month, mday, hour, minute, second, weekday, yearday)``; epoch 2000."""
        if seconds is None:
            seconds = time()
        parts = _host_time.gmtime(int(seconds) + EPOCH_2000_UNIX_MS // 1000)
        return (parts.tm_year, parts.tm_mon, parts.tm_mday, parts.tm_hour, parts.tm_min,
                parts.tm_sec, parts.tm_wday, parts.tm_yday)

    def mktime(when: Sequence[int]) -> int:
        """Seconds since 2000-01-01 of a ``gmtime``-style tuple."""
        values = tuple(when)[:6]
        return calendar.timegm(values + (0, 0, 0)) - EPOCH_2000_UNIX_MS // 1000

    def monotonic() -> float:
        """CPython name: board uptime in seconds."""
        check()
        return clock.uptime_ms() / 1000.0

    def monotonic_ns() -> int:
        """CPython name: board uptime in ns."""
        check()
        return int(clock.uptime_ms() * 1_000_000)

    for fn in (ticks_ms, ticks_us, ticks_cpu, sleep_ms, sleep_us, sleep, time, time_ns, gmtime,
               mktime, monotonic, monotonic_ns):
        setattr(module, fn.__name__, fn)
    module.ticks_add = ticks_add
    module.ticks_diff = ticks_diff
    module.localtime = gmtime
    module.perf_counter = monotonic

    def fallback(attribute: str) -> Any:
        return getattr(_host_time, attribute)

    module.__getattr__ = fallback  # type: ignore[attr-defined]
    return module
