# Runs under MicroPython (tests/micropython/run.mjs) and CPython: the protocol core against
# the shared test vectors, on the interpreter boards run.
#
# Arguments: the core module files to import (smartx_device/cbor.py ...); none means every
# .py file in smartx_device/. Each section runs only if its vector file exists, and then its
# module must import. Prints one line per section and "MICROPYTHON CORE OK" at the end; any
# disagreement is printed and raises AssertionError (non-zero exit).
# Written in the MicroPython subset itself: no f-strings, % formatting, no CPython-only names.
import json
import os
import struct
import sys
from binascii import unhexlify

VECTOR_DIR = "tests/vectors"
SESSION_SCRIPT = "tests/micropython/session_exchange.py"
# Printed per failure, at most, so a broken codec does not flood the log.
MAX_REPORTED = 20


def exists(path):
    """True if ``path`` exists (MicroPython has no os.path)."""
    try:
        os.stat(path)
        return True
    except OSError:
        return False


def load_vectors(name):
    """Return the parsed vector file ``name`` or None if it does not exist."""
    path = VECTOR_DIR + "/" + name
    if not exists(path):
        return None
    with open(path) as handle:
        return json.loads(handle.read())


def print_exception(error):
    """Print a traceback on either interpreter."""
    if hasattr(sys, "print_exception"):
        sys.print_exception(error)
    else:  # CPython
        import traceback

        traceback.print_exception(type(error), error, error.__traceback__)


class Failures:
    """Collects disagreements of one section; ``done`` raises if there were any."""

    def __init__(self, section):
        self.section = section
        self.items = []

    def add(self, name, text):
        self.items.append(name)
        if len(self.items) <= MAX_REPORTED:
            print("FAIL %s: %s: %s" % (self.section, name, text))

    def done(self, count, what):
        if self.items:
            raise AssertionError("%s: %d of %d %s failed" % (self.section, len(self.items), count, what))
        print("%s: %d %s ok" % (self.section, count, what))


def same(a, b):
    """Deep equality that also compares types (1 vs 1.0 vs True), float bits (-0.0) and NaN."""
    if type(a) is not type(b):
        return False
    if type(a) is float:
        if a != a or b != b:
            return a != a and b != b
        return struct.pack(">d", a) == struct.pack(">d", b)
    if type(a) in (list, tuple):
        if len(a) != len(b):
            return False
        for i in range(len(a)):
            if not same(a[i], b[i]):
                return False
        return True
    if type(a) is dict:
        if len(a) != len(b):
            return False
        for key in a:
            found = False
            for other in b:  # the key of the same type: {1: x} and {True: x} differ
                if type(other) is type(key) and other == key:
                    found = True
                    break
            if not found or not same(a[key], b[other]):
                return False
        return True
    return a == b


def error_class(name):
    """The class ``name`` of smartx_device.errors; a vector naming another is itself wrong."""
    from smartx_device import errors

    cls = getattr(errors, name, None)
    if cls is None:
        raise AssertionError("vectors name %s, which smartx_device.errors does not define" % name)
    return cls


def raised_by(call, *args):
    """Return (result, None) or (None, exception) of call(*args)."""
    try:
        return call(*args), None
    except Exception as error:  # any escape is judged by the caller, including bugs
        return None, error


# ---------------------------------------------------------------------------------------------


def module_name(path):
    """smartx_device/cbor.py -> smartx_device.cbor"""
    name = path[:-3] if path.endswith(".py") else path
    return name.replace("/", ".")


def core_modules():
    """The modules to import: the arguments, or every module of smartx_device/ here."""
    if len(sys.argv) > 1:
        return [module_name(path) for path in sys.argv[1:] if path.startswith("smartx_device/")]
    return sorted("smartx_device." + name[:-3] for name in os.listdir("smartx_device")
                  if name.endswith(".py") and name != "__init__.py")


def check_imports():
    """Every core module imports; a failure prints its traceback."""
    failures = Failures("import")
    names = core_modules()
    for name in names:
        module, error = raised_by(__import__, name)
        if error is not None:
            print_exception(error)
            failures.add(name, "%s: %s" % (type(error).__name__, error))
        elif name not in sys.modules:
            failures.add(name, "not in sys.modules after import")
    failures.done(len(names), "modules")


def check_cbor():
    """cbor.json: decode equals the value (or raises the named error); canonical ones re-encode."""
    data = load_vectors("cbor.json")
    if data is None:
        print("cbor: no %s/cbor.json, section skipped" % VECTOR_DIR)
        return
    from smartx_device import cbor

    failures = Failures("cbor")
    for vector in data["vectors"]:
        name = vector["name"]
        encoded = unhexlify(vector["hex"])
        decoded, error = raised_by(cbor.loads, encoded)
        if vector.get("error"):
            expected = error_class(vector["error"])
            if error is None:
                failures.add(name, "decoded to %r, expected %s" % (decoded, vector["error"]))
            elif not isinstance(error, expected):
                failures.add(name, "raised %s (%s), expected %s"
                             % (type(error).__name__, error, vector["error"]))
            continue
        value = eval(vector["value"])
        if error is not None:
            failures.add(name, "raised %s: %s" % (type(error).__name__, error))
        elif not same(decoded, value):
            failures.add(name, "decoded to %r, expected %r" % (decoded, value))
        if vector.get("canonical"):
            again, error = raised_by(cbor.dumps, value)
            if error is not None:
                failures.add(name, "dumps raised %s: %s" % (type(error).__name__, error))
            elif again != encoded:
                failures.add(name, "dumps gave %s, expected %s" % (again.hex(), vector["hex"]))
    failures.done(len(data["vectors"]), "vectors")


def items_of(items):
    """Framer output as comparable pairs: ("frame", bytes) or ("console", bytes)."""
    from smartx_device.framing import ConsoleText

    out = []
    for item in items:
        if isinstance(item, ConsoleText):
            out.append(("console", item.data))
        elif isinstance(item, bytes):
            out.append(("frame", item))
        else:
            out.append(("unexpected %s" % type(item).__name__, item))
    return out


def run_stream(max_frame_size, pieces):
    """Feed pieces then end of stream; return (payloads, error or None)."""
    from smartx_device.framing import StreamFramer

    framer = StreamFramer(max_frame_size)
    frames = []
    try:
        for piece in pieces:
            frames += framer.feed(piece)
        frames += framer.feed(b"")
    except Exception as error:  # judged by the caller
        return frames, error
    return frames, None


def bytewise(wire):
    """The wire as one-byte pieces: the hardest split a reader can see."""
    return [wire[i:i + 1] for i in range(len(wire))]


def check_framing():
    """framing.json: stream and serial vectors, fed whole and one byte at a time."""
    data = load_vectors("framing.json")
    if data is None:
        print("framing: no %s/framing.json, section skipped" % VECTOR_DIR)
        return
    from smartx_device.framing import SerialFramer, StreamFramer

    failures = Failures("framing")
    count = 0
    for vector in data.get("stream", []):
        count += 1
        name = "stream: " + vector["name"]
        wire = unhexlify(vector["wire"])
        payloads = [unhexlify(p) for p in vector["payloads"]]
        expected = vector.get("error")
        for how, pieces in (("whole", [wire]), ("byte by byte", bytewise(wire))):
            frames, error = run_stream(vector["max_frame_size"], pieces)
            if frames != payloads:
                failures.add(name, "%s: frames %r, expected %r" % (how, frames, payloads))
            if expected is None and error is not None:
                failures.add(name, "%s: raised %s: %s" % (how, type(error).__name__, error))
            elif expected is not None and (error is None or type(error).__name__ != expected):
                failures.add(name, "%s: raised %r, expected %s" % (how, error, expected))
        if expected is None:
            framer = StreamFramer(vector["max_frame_size"])
            encoded, error = raised_by(lambda: b"".join([framer.encode(p) for p in payloads]))
            if error is not None or encoded != wire:
                failures.add(name, "encode gave %r (%r)" % (encoded, error))
    for vector in data.get("serial", []):
        count += 1
        name = "serial: " + vector["name"]
        wire = unhexlify(vector["wire"])
        expected = []
        for item in vector["items"]:
            if "frame" in item:
                expected.append(("frame", unhexlify(item["frame"])))
            else:
                expected.append(("console", unhexlify(item["console"])))
        for how, pieces in (("whole", [wire]), ("byte by byte", bytewise(wire))):
            framer = SerialFramer()
            got = []
            try:
                for piece in pieces:
                    got += framer.feed(piece)
                got += framer.feed(b"")
            except Exception as error:  # SerialFramer must never raise on input
                failures.add(name, "%s: raised %s: %s" % (how, type(error).__name__, error))
                continue
            got = items_of(got)
            if got != expected:
                failures.add(name, "%s: items %r, expected %r" % (how, got, expected))
            if framer.corrupt != vector["corrupt"]:
                failures.add(name, "%s: corrupt %d, expected %d" % (how, framer.corrupt, vector["corrupt"]))
    failures.done(count, "vectors")


def check_messages():
    """messages.json: decode gives the named class and re-encodes to the same bytes."""
    data = load_vectors("messages.json")
    if data is None:
        print("messages: no %s/messages.json, section skipped" % VECTOR_DIR)
        return
    from smartx_device import cbor, messages

    failures = Failures("messages")
    for vector in data["messages"]:
        name = vector["name"]
        encoded = unhexlify(vector["hex"])
        message, error = raised_by(messages.decode_message, encoded)
        if error is not None:
            failures.add(name, "decode raised %s: %s" % (type(error).__name__, error))
            continue
        if type(message).__name__ != vector["type"]:
            failures.add(name, "decoded a %s, expected %s" % (type(message).__name__, vector["type"]))
        again, error = raised_by(messages.encode_message, message)
        if error is not None or again != encoded:
            failures.add(name, "re-encoded to %r (%r)" % (again, error))
        if vector.get("value") is not None and not same(cbor.loads(encoded), eval(vector["value"])):
            failures.add(name, "the CBOR map is not %s" % vector["value"])
    invalid = data.get("invalid", [])
    for vector in invalid:
        name = "invalid: " + vector["name"]
        message, error = raised_by(messages.decode_message, unhexlify(vector["hex"]))
        expected = error_class(vector["error"])
        if error is None:
            failures.add(name, "decoded to %r, expected %s" % (message, vector["error"]))
        elif not isinstance(error, expected):
            failures.add(name, "raised %s (%s), expected %s" % (type(error).__name__, error, vector["error"]))
    failures.done(len(data["messages"]) + len(invalid), "vectors")


def check_session():
    """Run session_exchange.py (a device and a hub session in memory) if it exists."""
    if not exists(SESSION_SCRIPT):
        print("session: no %s, section skipped" % SESSION_SCRIPT)
        return
    with open(SESSION_SCRIPT) as handle:
        source = handle.read()
    exec(compile(source, SESSION_SCRIPT, "exec"), {"__name__": "__main__"})


def finish():
    """Reached only when every earlier step passed."""
    print("MICROPYTHON CORE OK")


RUNNER_STEPS = [check_imports, check_cbor, check_framing, check_messages, check_session, finish]

if not globals().get("_RUNNER_CALLS_STEPS"):  # run by hand: no runner calls the steps
    for step in RUNNER_STEPS:
        step()
