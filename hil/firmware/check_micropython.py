# Runs under a real MicroPython interpreter (hil/test_firmware.py starts it through
# tests/micropython/run.mjs): boots the HIL node firmware, unchanged, against a stand-in
# `machine` module whose UART records what the firmware writes, and stops it once it has sent
# its Hello. Proves on MicroPython: the firmware parses and imports, loads its credentials,
# prints its banner, and opens a session in the serial framing; its console tap keeps "hil:"
# lines. Argument: the credentials bundle (JSON text). MicroPython subset.
import sys

BUNDLE = sys.argv[1]

with open("device.smartx.json", "w") as handle:
    handle.write(BUNDLE)


class Stop(Exception):
    pass


written = bytearray()


class UART:
    def __init__(self, uart_id, baudrate=115200):
        self.uart_id = uart_id

    def any(self):
        return 0

    def read(self, count=None):
        return None

    def write(self, data):
        written.extend(bytes(data))
        if b"\x00" in bytes(data)[1:] and len(data) > 8:
            raise Stop()  # a whole frame went out: the Hello
        return len(data)


class machine:
    UART = UART

    @staticmethod
    def reset():
        raise Stop()


sys.modules["machine"] = machine

source = open("hil/firmware/main.py").read()
try:
    exec(source, {"__name__": "__main__"})
    raise AssertionError("the firmware returned")
except Stop:
    pass

from smartx_device import messages
from smartx_device.framing import ConsoleText, SerialFramer

items = SerialFramer().feed(bytes(written))
frames = [item for item in items if not isinstance(item, ConsoleText)]
assert len(frames) == 1, items
hello = messages.decode_message(frames[0])
assert hello.TYPE == messages.HELLO
print("hello from %s" % hello.device_id)

# The console tap, on its own.
namespace = {"__name__": "tap"}
exec(source.rstrip()[:-len("main()")], namespace)
commands = []
tap = namespace["TapFramer"](1024, commands)
frame = SerialFramer().encode(b"\xa1\x00\x0a")
got = tap.feed(b"\x00hil:ping\n\x00" + frame + b"noise\n\x00")
assert commands == ["hil:ping"], commands
assert got[1] == b"\xa1\x00\x0a", got
print("tap ok")
