# Runs under MicroPython (and CPython): the device SDK's board-side parts.
# 1. The HS256 signer against tokens PyJWT made (tests/vectors/jwt.json).
# 2. The offline queue's on-flash format: append, reopen, replay, seal, ack, compact, torn tail.
# 3. The client core for one publish over an in-memory hub session, with the heap it takes.
# Raises on any disagreement; prints one summary line.
import gc
import json
import os

import smartx_device  # the package imports every MicroPython-facing module
from smartx_device import jwt as small_jwt
from smartx_device import messages as m
from smartx_device import queue as q
from smartx_device.auth import Signer
from smartx_device.client import ClientCore
from smartx_device.session import HubSession

VECTOR_PATHS = ("tests/vectors/jwt.json", "vectors/jwt.json", "jwt.json")


def unhex(text):
    return bytes([int(text[i:i + 2], 16) for i in range(0, len(text), 2)])


def exists(path):
    try:
        os.stat(path)
        return True
    except OSError:
        return False


def remove(path):
    if exists(path):
        os.remove(path)


def check_jwt():
    data = None
    for path in VECTOR_PATHS:
        if exists(path):
            with open(path) as handle:
                data = json.loads(handle.read())
            break
    if data is None:
        raise AssertionError("jwt.json not found in %s" % (VECTOR_PATHS,))
    for vector in data["vectors"]:
        token = small_jwt.device_token(unhex(vector["secret_hex"]), vector["device_id"],
                                       vector["hub_id"], vector["hub_time_ms"],
                                       unhex(vector["nonce_hex"]))
        if token != vector["token"]:
            raise AssertionError("jwt vector %s: %s != %s" % (vector["name"], token,
                                                              vector["token"]))
    return len(data["vectors"])


def resolve(monotonic_ms, this_boot):
    return 1764430000000 + monotonic_ms


def check_queue(path):
    remove(path)
    remove(path + ".tmp")
    queue = q.OfflineQueue(path, max_bytes=4096)
    start = queue.file_bytes
    for i in range(10):
        queue.append("temp", 20 + i, 1764430000000 + i)
    per_reading = (queue.file_bytes - start) // 10
    queue.append("led", "on", None, 1234)  # time unknown: stamped when sent
    msg_id, readings = queue.seal(resolve, 4)
    if [r[2] for r in readings] != [20, 21, 22, 23]:
        raise AssertionError("sealed the wrong readings: %r" % (readings,))
    queue.close()
    queue = q.OfflineQueue(path, max_bytes=4096)  # reboot
    if queue.sealed_ids() != [msg_id] or queue.batch(msg_id, resolve) != readings:
        raise AssertionError("a sealed batch changed across a reboot")
    if queue.pending_readings != 11 or not queue.ack(msg_id):
        raise AssertionError("replay lost readings")
    second, rest = queue.seal(resolve)
    if second <= msg_id or rest[-1] != ["led", 1764430001234, "on"]:
        raise AssertionError("replay out of order or the relative stamp is wrong: %r" % (rest,))
    queue.ack(second)
    for i in range(300):  # past the bound: the oldest go, counted
        queue.append("temp", i, 1764430000000 + i)
        if queue.file_bytes > 4096:
            raise AssertionError("the queue passed its bound")
    if queue.dropped == 0 or queue.compactions == 0:
        raise AssertionError("bound or compaction never acted")
    while True:  # the hub comes back: everything goes out and is acknowledged
        sealed = queue.seal(resolve)
        if sealed is None:
            break
        queue.ack(sealed[0])
    for i in range(3):
        queue.append("temp", i, 1764430000000 + i)
    kept = queue.pending_readings
    queue.close()
    with open(path, "rb") as handle:  # power cut in the middle of one more record
        whole = handle.read()
    queue = q.OfflineQueue(path, max_bytes=4096)
    queue.append("temp", "torn", 1)
    queue.close()
    with open(path, "rb") as handle:
        grown = handle.read()
    with open(path, "wb") as handle:
        handle.write(grown[:len(whole) + 5])
    queue = q.OfflineQueue(path, max_bytes=4096)
    if not queue.recovered_tail or queue.pending_readings != kept:
        raise AssertionError("a torn tail was not cut off cleanly")
    queue.close()
    remove(path)
    return per_reading


def check_client_core(path):
    remove(path)
    secret = b"0123456789abcdef0123456789abcdef"
    core = ClientCore("dev_0123456789abcdef", Signer("hs256", secret), q.OfflineQueue(path))
    hub = HubSession(0)
    hub.receive_data(core.begin(None, 0), 0)
    core.receive(hub.challenge(b"0123456789abcdef", "hub_0123456789abcdef", 1764430000000), 0)
    token = hub.receive_data(core.data_to_send(0), 0)[0].message.token
    if token != small_jwt.device_token(secret, "dev_0123456789abcdef", "hub_0123456789abcdef",
                                       1764430000000, b"0123456789abcdef"):
        raise AssertionError("the client core answered with the wrong token")
    core.receive(hub.accept("ses_1", 1764430000000), 0)
    # Heap one publish takes: everything allocated from the append to the Telemetry bytes,
    # with the collector off so nothing is reclaimed mid-way (the peak need, not the net).
    gc.collect()
    gc.disable()
    mark = gc.mem_alloc() if hasattr(gc, "mem_alloc") else 0
    core.queue.append("temp", 21.5, None, 10)
    wire = core.data_to_send(10)
    per_publish = (gc.mem_alloc() - mark) if hasattr(gc, "mem_alloc") else 0
    gc.enable()
    events = hub.receive_data(wire, 10)
    telemetry = events[0].message
    if telemetry.readings != [["temp", 1764430000010, 21.5]]:
        raise AssertionError("telemetry wrong: %r" % (telemetry,))
    core.receive(hub.send(m.Ack(msg_id=telemetry.msg_id), 10), 10)
    if not core.idle:
        raise AssertionError("the ack was not recorded")
    core.queue.close()
    remove(path)
    return per_publish


vectors = check_jwt()
per_reading = check_queue("sxq_check.log")
per_publish = check_client_core("sxq_core.log")
print("sdk: jwt %d vectors ok; queue ok (%d bytes per reading on flash); client core ok "
      "(%d heap bytes allocated by one publish)" % (vectors, per_reading, per_publish))
