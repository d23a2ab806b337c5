# Runs under MicroPython (tests/micropython/run.mjs): heap the device side allocates.
#
# Arguments: "core" or "sdk", then the module files given to the runner.
#   core: imports the wire core (bare packages), then sends Telemetry through a DeviceSession.
#   sdk:  imports what a board's firmware loads to publish (the package, its client,
#         credentials and transports), then publishes through the client core: queue append
#         (on flash), seal, encode, frame.
# Prints one line of JSON. "allocated" is every byte allocated while the operation ran: this
# port collects only between top-level calls, so nothing is freed mid-way and the figure is the
# heap the operation needs on top of what is live. "retained" is what stays live after a real
# collection (each phase is its own RUNNER_STEPS function; the runner collects between them).
# MicroPython subset: no f-strings, no annotations.
import gc
import json
import sys

MODE = sys.argv[1] if len(sys.argv) > 1 else "core"
CORE = ("smartx_device._compat", "smartx_device.errors", "smartx_device.reasons",
        "smartx_device.cbor", "smartx_device.framing", "smartx_device.messages",
        "smartx_device.session")
SDK = ("smartx_device", "smartx_device.client", "smartx_device.credentials",
       "smartx_device.transport")
PUBLISH_ROUNDS = 5
TS = 1764430000000

results = {"mode": MODE, "baseline": 0, "import_allocated": 0, "import_retained": 0,
           "one": [], "batch16": [], "wire_one": 0, "wire_batch16": 0}
state = {"mark": 0}
work = {}


def start():
    """Step: ask for a collection before anything is measured."""
    if not hasattr(gc, "mem_alloc"):
        raise AssertionError("no gc.mem_alloc: run under MicroPython")
    gc.collect()


def do_import():
    """Step: import the modules; record what the import allocated."""
    results["baseline"] = gc.mem_alloc()
    mark = gc.mem_alloc()
    if MODE == "core":
        for name in CORE:
            __import__(name)
    else:
        # What a board's firmware loads to publish: the package loads its names lazily, so
        # name the modules Client.from_bundle(...).connect() brings in.
        for name in SDK:
            __import__(name)
    results["import_allocated"] = gc.mem_alloc() - mark
    gc.collect()


def after_import():
    """Step: record what the import left live; set up a connected session."""
    results["import_retained"] = gc.mem_alloc() - results["baseline"]
    from smartx_device import session as core_session

    if MODE == "core":
        hub = core_session.HubSession(0)
        device = core_session.DeviceSession(0)
        hub.receive_data(device.start("dev_0123456789abcdef", 0), 0)
        device.receive_data(hub.challenge(b"0123456789abcdef", "hub_0123456789abcdef", TS), 0)
        hub.receive_data(device.authenticate("a.b.c", 0), 0)
        device.receive_data(hub.accept("ses_1", TS), 0)
        from smartx_device import messages

        work["device"] = device
        work["messages"] = messages
        work["one"] = [["temp", TS, 21.37]]
        work["batch16"] = [["temp", TS + i, 21.37 + i] for i in range(16)]
    else:
        from smartx_device import queue as q
        from smartx_device.auth import Signer
        from smartx_device.client import ClientCore

        try:
            import os
            os.remove("bench_queue.log")
        except OSError:
            pass
        secret = b"0123456789abcdef0123456789abcdef"
        client = ClientCore("dev_0123456789abcdef", Signer("hs256", secret),
                            q.OfflineQueue("bench_queue.log", max_bytes=65536))
        hub = core_session.HubSession(0)
        hub.receive_data(client.begin(None, 0), 0)
        client.receive(hub.challenge(b"0123456789abcdef", "hub_0123456789abcdef", TS), 0)
        hub.receive_data(client.data_to_send(0), 0)
        client.receive(hub.accept("ses_1", TS), 0)
        work["client"] = client
        work["hub"] = hub
        from smartx_device import messages

        work["messages"] = messages
    gc.collect()


def make_send(count):
    """One measured step: send a Telemetry of ``count`` readings (core) or publish ``count``
    readings and send their batch (sdk)."""

    def step():
        key = "one" if count == 1 else "batch16"
        if MODE == "core":
            device = work["device"]
            readings = work[key]
            mark = gc.mem_alloc()
            wire = device.send(work["messages"].Telemetry(msg_id=7, readings=readings), 10)
            used = gc.mem_alloc() - mark
        else:
            client = work["client"]
            mark = gc.mem_alloc()
            for index in range(count):
                client.queue.append("temp", 21.37 + index, TS + index, 10)
            wire = client.data_to_send(10)
            used = gc.mem_alloc() - mark
            # The hub acknowledges: the next step starts with nothing in flight.
            events = work["hub"].receive_data(wire, 10)
            message = events[0].message
            if len(message.readings) != count:
                raise AssertionError("sent %d readings, not %d" % (len(message.readings), count))
            client.receive(work["hub"].send(work["messages"].Ack(msg_id=message.msg_id), 10), 10)
        results[key].append(used)
        results["wire_" + key] = len(wire)
        gc.collect()

    return step


def report():
    """Step: print the results as one JSON line."""
    print(json.dumps(results))


RUNNER_STEPS = [start, do_import, after_import]
for _ in range(PUBLISH_ROUNDS):
    RUNNER_STEPS.append(make_send(1))
    RUNNER_STEPS.append(make_send(16))
RUNNER_STEPS.append(report)

if not globals().get("_RUNNER_CALLS_STEPS"):
    for _step in RUNNER_STEPS:
        _step()
