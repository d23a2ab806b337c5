# SmartX HIL node: the firmware the hardware-in-the-loop suite runs, on a real MicroPython board
# and, unchanged, on a simulated one. Copy it as main.py next to the smartx_device package; the
# HIL plugin writes device.smartx.json (the credentials) and hil.json (the link) before a run.
#
# The board talks to the hub through a gateway over a serial link (docs/hil.md):
#   hil.json {"link": "uart", "uart": 0, "baudrate": 115200}  a UART (the simulator's default)
#   hil.json {"link": "stdio"}                               the USB/REPL port (real boards)
# Console text (print) and frames share the line; the serial framing keeps them apart.
#
# Stream "seq" carries [boot, n]: n counts up from 0 in each boot, so the hub can tell that
# nothing was lost or stored twice. Commands from the hub: echo, publish {"count", "size"},
# set_interval {"ms"}, reset. Console commands (a line between two 0x00 bytes, see
# hil/link.py send_line): hil:ping, hil:status, hil:pause, hil:resume, hil:reset, hil:repl.
# MicroPython subset: no f-strings, no annotations; % formatting.
import json

import machine

import smartx_device
from smartx_device.backoff import Backoff
from smartx_device.client import FATAL_ERRORS
from smartx_device.clock import monotonic_ms, sleep_ms
from smartx_device.framing import ConsoleText, SerialFramer
from smartx_device.transport import SerialTransport

BUNDLE = "device.smartx.json"
QUEUE = "queue.log"
CONFIG = "hil.json"
BOOTS = "boots.txt"
DEFAULT_INTERVAL_MS = 500
# Short waits: a test should not sit through a 60 s back-off or a 10 s ack timeout.
ACK_TIMEOUT_MS = 2000
HANDSHAKE_TIMEOUT_MS = 4000
BACKOFF_BASE_MS = 250
BACKOFF_CAP_MS = 2000
LOOP_MS = 50
# Silence on the line before a new session starts (a 64-byte frame takes 6 ms at 115200 baud).
QUIET_MS = 30
# After a refusal (disabled, unknown, bad credentials) ask again only this often: a hub backs
# off an address that fails often, and every board behind one gateway shares its address.
REFUSED_RETRY_MS = 3000
MAX_BULK_SIZE = 1024
MAX_PUBLISH_COUNT = 2000


def read_json(path, default):
    try:
        with open(path) as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return default


def next_boot():
    try:
        with open(BOOTS) as handle:
            boot = int(handle.read().strip() or "0") + 1
    except (OSError, ValueError):
        boot = 1
    with open(BOOTS, "w") as handle:
        handle.write("%d\n" % boot)
    return boot


class TapFramer(SerialFramer):
    """The SDK's serial framer, keeping the console lines the test host types ("hil:...")."""

    def __init__(self, max_frame_size, commands):
        super().__init__(max_frame_size)
        self.commands = commands

    def feed(self, data):
        items = super().feed(data)
        for item in items:
            if isinstance(item, ConsoleText):
                for line in item.text.split("\n"):
                    line = line.strip()
                    if line.startswith("hil:"):
                        self.commands.append(line)
        return items


class StdioPort:
    """The board's USB/REPL port as a byte stream (MicroPython only): what mpremote uses."""

    def __init__(self):
        import select
        import sys

        import micropython

        micropython.kbd_intr(-1)  # a frame may hold 0x03: it must not interrupt the firmware
        self._in = sys.stdin.buffer
        self._out = sys.stdout.buffer
        self._poll = select.poll()
        self._poll.register(sys.stdin, select.POLLIN)

    def any(self):
        # stdin cannot say how much waits, only that something does: a hint read() honours
        # (it stops as soon as nothing more is there).
        return 256 if self._poll.poll(0) else 0

    def read(self, count=None):
        data = bytearray()
        while (count is None or len(data) < count) and self._poll.poll(0):
            data.extend(self._in.read(1))
        return bytes(data) or None

    def write(self, data):
        self._out.write(data)
        return len(data)


class Link:
    """The transport the SDK gets for each connection: the one serial port, tapped."""

    def __init__(self, config, commands):
        self.commands = commands
        if config.get("link") == "stdio":
            self.port = StdioPort()
        else:
            self.port = machine.UART(config.get("uart", 0), config.get("baudrate", 115200))
        self.transport = SerialTransport(self.port)
        self.idle_framer = TapFramer(256, commands)

    def open(self):
        # Frames of an earlier session (a late Ack, a challenge meant for the board before its
        # reset) would derail the new handshake: wait until the line has been quiet a moment.
        self.poll(QUIET_MS)
        return self

    def poll(self, quiet_ms=0):
        """Read what waits on the line while no session does (console commands only)."""
        data = self.transport.recv(512, quiet_ms)
        while data:
            self.idle_framer.feed(data)
            data = self.transport.recv(512, quiet_ms)

    def say(self, text):
        """Print a console line and end it with 0x00: a gateway hands console text on when
        its chunk ends, and an idle board sends no frame that would end it."""
        print(text)
        try:
            self.transport.send(b"\x00")
        except Exception:  # the console line is out; the delimiter is a courtesy
            pass

    def make_framer(self, max_frame_size):
        return TapFramer(max_frame_size, self.commands)

    def send(self, data):
        self.transport.send(data)

    def recv(self, max_bytes, timeout_ms):
        return self.transport.recv(max_bytes, timeout_ms)

    def close(self):
        pass  # the port stays open for the next session


def main():
    config = read_json(CONFIG, {})
    boot = next_boot()
    commands = []
    link = Link(config, commands)
    client = smartx_device.Client.from_bundle(
        BUNDLE, queue_path=QUEUE, log=link.say, transport_factory=link.open,
        ack_timeout_ms=ACK_TIMEOUT_MS, handshake_timeout_ms=HANDSHAKE_TIMEOUT_MS,
        backoff=Backoff(base_ms=BACKOFF_BASE_MS, cap_ms=BACKOFF_CAP_MS))
    link.say("SmartX HIL node %s booting (boot %d)" % (client.device_id, boot))
    state = {"interval_ms": config.get("interval_ms", DEFAULT_INTERVAL_MS), "n": 0,
             "paused": False, "reset": False}

    def publish_seq():
        client.publish("seq", [boot, state["n"]])
        state["n"] += 1

    @client.command("echo")
    def echo(args):
        return {"echo": args, "boot": boot}

    @client.command("publish")
    def publish(args):
        count = args.get("count", 1)
        size = args.get("size", 0)
        if not isinstance(count, int) or not 1 <= count <= MAX_PUBLISH_COUNT:
            raise ValueError("count must be an integer from 1 to %d" % MAX_PUBLISH_COUNT)
        if not isinstance(size, int) or not 0 <= size <= MAX_BULK_SIZE:
            raise ValueError("size must be an integer from 0 to %d" % MAX_BULK_SIZE)
        if size:
            for index in range(count):
                client.publish("bulk", b"\x5a" * size)
        else:
            for index in range(count):
                publish_seq()
        return {"queued": count}

    @client.command("set_interval")
    def set_interval(args):
        ms = args.get("ms")
        if not isinstance(ms, int) or not 50 <= ms <= 3600000:
            raise ValueError("ms must be an integer from 50 to 3600000")
        state["interval_ms"] = ms
        return {"interval_ms": ms}

    @client.command("reset")
    def reset(args):
        state["reset"] = True  # after the result has gone out
        return {"resetting": True}

    def run_console(line):
        if line == "hil:ping":
            link.say("hil:pong boot=%d" % boot)
        elif line == "hil:status":
            link.say("hil:status boot=%d published=%d pending=%d online=%d"
                  % (boot, state["n"], client.queue.pending_readings, 1 if client.connected else 0))
        elif line == "hil:pause":
            state["paused"] = True
            link.say("hil:paused boot=%d published=%d" % (boot, state["n"]))
        elif line == "hil:resume":
            state["paused"] = False
            link.say("hil:resumed")
        elif line == "hil:reset":
            link.say("hil:resetting")
            machine.reset()
        elif line == "hil:repl":
            import micropython

            link.say("hil:repl")
            micropython.kbd_intr(3)
            raise SystemExit
        else:
            link.say("hil:unknown %s" % line)

    refused_until = 0
    try:
        client.connect()  # says "connected" through log=link.say
    except smartx_device.ClientError as error:
        link.say("not connected yet: %s" % error)
        if isinstance(error, FATAL_ERRORS):
            refused_until = monotonic_ms() + REFUSED_RETRY_MS
    last = None
    while True:
        now = monotonic_ms()
        if not state["paused"] and (last is None or now - last >= state["interval_ms"]):
            last = now
            publish_seq()
        if now >= refused_until:
            try:
                client.loop(LOOP_MS)
            except smartx_device.ClientError as error:
                # Refused (disabled, unknown, bad credentials): ask again later; an operator
                # may enable the device meanwhile. Readings wait in the queue on flash.
                link.say("refused: %s" % error)
                refused_until = monotonic_ms() + REFUSED_RETRY_MS
        if not client.connected:
            link.poll()
            sleep_ms(LOOP_MS)
        while commands:
            run_console(commands.pop(0))
        if state["reset"] and client.core.idle:
            link.say("hil:resetting")
            sleep_ms(100)
            machine.reset()


main()
