# Runs under MicroPython (tests/micropython/run.mjs): how much heap the protocol core takes.
#
# Arguments: the core module files (smartx_device/cbor.py ...), imported in that order.
# Prints one line of JSON:
#   {"baseline": B,
#    "imports": {"smartx_device.cbor": {"allocated": A, "retained": R}, ...},
#    "imports_retained": sum of R, "imports_allocated_max": max of A,
#    "telemetry": {"message": .., "encode_message": .., "stream_frame": .., "serial_frame": ..,
#                  "stream_receive": .., "decode_message": .., "total": ..} or null,
#    "skipped": why telemetry was not measured, or null}
# "allocated" is every byte allocated while an operation ran (garbage included: the port does
# not collect inside a call, so nothing is freed mid-way), i.e. the heap the operation needs
# on top of what is live. "retained" is what stays live after a real collection: each phase
# is its own RUNNER_STEPS function and the runner collects between them.
import gc
import json
import sys

results = {
    "baseline": 0,
    "imports": {},
    "imports_retained": 0,
    "imports_allocated_max": 0,
    "telemetry": None,
    "skipped": None,
}
# Filled in before any measurement, so recording a number allocates nothing new
# (small ints are not heap objects; assigning an existing key does not grow the dict).
state = {"mark": 0, "live": 0, "module": None}
TELEMETRY_KEYS = ("message", "encode_message", "stream_frame", "serial_frame",
                  "stream_receive", "decode_message", "total")


def module_names():
    """The core modules named in the arguments, as dotted names, in order."""
    names = []
    for path in sys.argv[1:]:
        if path.startswith("smartx_device/") and path.endswith(".py"):
            names.append(path[:-3].replace("/", "."))
    return names


NAMES = module_names()
for _name in NAMES:
    results["imports"][_name] = {"allocated": 0, "retained": 0}
telemetry = {}
for _key in TELEMETRY_KEYS:
    telemetry[_key] = 0
workspace = {}


def start():
    """Ask for a collection; the next step starts on a clean heap."""
    if not hasattr(gc, "mem_alloc"):
        raise AssertionError("this interpreter has no gc.mem_alloc: run under MicroPython")
    gc.collect()


def close_previous():
    """At the start of a step: what the previous import left live after the collection."""
    live = gc.mem_alloc()
    if state["module"] is not None:
        results["imports"][state["module"]]["retained"] = live - state["live"]
    else:
        results["baseline"] = live
    state["live"] = live


def make_import_step(name):
    """A step that imports ``name`` and records what the import allocated."""

    def step():
        close_previous()
        mark = gc.mem_alloc()
        __import__(name)
        results["imports"][name]["allocated"] = gc.mem_alloc() - mark
        state["module"] = name
        gc.collect()

    return step


def after_imports():
    """Record the last import's retained heap and the totals; prepare the telemetry step."""
    close_previous()
    state["module"] = None
    total = 0
    largest = 0
    for name in NAMES:
        total += results["imports"][name]["retained"]
        largest = max(largest, results["imports"][name]["allocated"])
    results["imports_retained"] = total
    results["imports_allocated_max"] = largest
    if "smartx_device.messages" not in NAMES or "smartx_device.framing" not in NAMES:
        results["skipped"] = "smartx_device.messages or smartx_device.framing is not in the core yet"
        return
    from smartx_device import framing, messages

    # Framers and the reading exist before the measured step: a device keeps its framer for
    # the whole session, and the reading comes from the application.
    workspace["stream_out"] = framing.StreamFramer()
    workspace["serial_out"] = framing.SerialFramer()
    workspace["stream_in"] = framing.StreamFramer()
    workspace["readings"] = [("temp", 1700000000000, 21.5)]
    workspace["messages"] = messages
    gc.collect()


def measure_telemetry():
    """Allocation of each stage of sending and receiving one Telemetry message."""
    if results["skipped"]:
        return
    messages = workspace["messages"]
    start_mark = gc.mem_alloc()
    mark = start_mark
    message = messages.Telemetry(msg_id=1, readings=workspace["readings"])
    telemetry["message"] = gc.mem_alloc() - mark
    mark = gc.mem_alloc()
    payload = messages.encode_message(message)
    telemetry["encode_message"] = gc.mem_alloc() - mark
    mark = gc.mem_alloc()
    stream_wire = workspace["stream_out"].encode(payload)
    telemetry["stream_frame"] = gc.mem_alloc() - mark
    mark = gc.mem_alloc()
    serial_wire = workspace["serial_out"].encode(payload)
    telemetry["serial_frame"] = gc.mem_alloc() - mark
    mark = gc.mem_alloc()
    frames = workspace["stream_in"].feed(stream_wire)
    telemetry["stream_receive"] = gc.mem_alloc() - mark
    mark = gc.mem_alloc()
    decoded = messages.decode_message(frames[0])
    telemetry["decode_message"] = gc.mem_alloc() - mark
    telemetry["total"] = gc.mem_alloc() - start_mark
    if decoded != message or len(serial_wire) <= len(payload):
        raise AssertionError("the measured round trip is wrong: %r" % (decoded,))
    results["telemetry"] = telemetry


def report():
    """Print the results as one line of JSON (the last line of the output)."""
    if results["skipped"]:
        print("heap: telemetry not measured: %s" % results["skipped"])
    print(json.dumps(results))


RUNNER_STEPS = [start] + [make_import_step(name) for name in NAMES]
RUNNER_STEPS += [after_imports, measure_telemetry, report]

if not globals().get("_RUNNER_CALLS_STEPS"):  # run by hand (unix port): numbers include garbage
    for _step in RUNNER_STEPS:
        _step()
