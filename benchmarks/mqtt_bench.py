"""The other side of the benchmark: Mosquitto with a TLS listener, and its load generators.

Rules:
- Mosquitto is Debian's ``mosquitto`` package, installed with apt-get when it is missing, and
  started here on a loopback port with a config written for the run: a TLS listener with the
  hub's own server certificate and key (same key type, same TLS versions and suites), anonymous
  clients, ``max_connections -1``, no persistence, ``set_tcp_nodelay`` as the run asks. It gets
  its own RLIMIT_NOFILE, raised to the hard limit.
- Ingest is fed by paho-mqtt (the reference Python MQTT client) at QoS 1: the same readings as
  JSON, the same number per message, the same window of unacknowledged messages per client as
  our devices keep; a reading counts when its PUBACK arrives. Many clients share one worker
  process through paho's external-loop API (``on_socket_*`` callbacks and a selector).
- Connects and idle connections use asyncio TLS streams (as our device workers do) and a
  hand-made MQTT 3.1.1 CONNECT, so both sides' clients pay the same TLS stack.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import selectors
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import time
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (Worker, free_port, raise_nofile, set_asyncio_nodelay,  # noqa: E402
                    worker_io)

THIS = os.path.abspath(__file__)
MOSQUITTO_PATHS = ("/usr/sbin/mosquitto", "/usr/bin/mosquitto")


def mosquitto_binary() -> Optional[str]:
    """Path of the mosquitto broker, or None."""
    found = shutil.which("mosquitto")
    if found:
        return found
    for path in MOSQUITTO_PATHS:
        if os.access(path, os.X_OK):
            return path
    return None


def ensure_mosquitto(log=print) -> str:
    """Return the broker's path, installing Debian's package first if it is missing."""
    binary = mosquitto_binary()
    if binary:
        return binary
    log("mosquitto is missing: apt-get update && apt-get install -y mosquitto")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update"], check=True, env=env, stdout=subprocess.DEVNULL)
    subprocess.run(["apt-get", "install", "-y", "mosquitto"], check=True, env=env,
                   stdout=subprocess.DEVNULL)
    binary = mosquitto_binary()
    if not binary:
        raise RuntimeError("apt-get installed mosquitto but no broker binary was found")
    return binary


def mosquitto_version(binary: str) -> str:
    """The broker's version line."""
    out = subprocess.run([binary, "-h"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        if "version" in line:
            return line.strip()
    return "mosquitto"


def _raise_own_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class Mosquitto:
    """One broker process with a TLS listener on 127.0.0.1."""

    def __init__(self, workdir: str, cert_path: str, key_path: str, ca_path: str) -> None:
        self.binary = ensure_mosquitto()
        self.workdir = workdir
        self.cert_path, self.key_path, self.ca_path = cert_path, key_path, ca_path
        self.process: Optional[subprocess.Popen] = None
        self.port: Optional[int] = None
        self.nodelay = True

    @property
    def pid(self) -> int:
        """The broker's pid."""
        return self.process.pid

    def start(self, nodelay: bool = True) -> None:
        """Write the config and start the broker; return once it accepts."""
        self.nodelay = nodelay
        self.port = free_port()
        config = os.path.join(self.workdir, "mosquitto-%d.conf" % self.port)
        lines = [
            # Run as root: it must read the hub's key file (mode 0600), as the hub does.
            "user root",
            "per_listener_settings false",
            "allow_anonymous true",
            "max_connections -1",
            "set_tcp_nodelay %s" % ("true" if nodelay else "false"),
            "persistence false",
            "log_dest stderr",
            "log_type error",
            "listener %d 127.0.0.1" % self.port,
            "cafile %s" % self.ca_path,
            "certfile %s" % self.cert_path,
            "keyfile %s" % self.key_path,
        ]
        with open(config, "w") as handle:
            handle.write("\n".join(lines) + "\n")
        self.process = subprocess.Popen([self.binary, "-c", config], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, preexec_fn=_raise_own_nofile)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("mosquitto did not start (config %s)" % config)
                time.sleep(0.05)

    def stop(self) -> None:
        """SIGTERM the broker and wait."""
        process, self.process = self.process, None
        if process is None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def worker(self, mode: str, **options) -> Worker:
        """Start a client worker (``publish``, ``connects`` or ``idle``); ready on return."""
        command = [THIS, "--client", mode, "--port", str(self.port), "--ca", self.ca_path,
                   "--nodelay", str(int(self.nodelay))]
        for name, value in options.items():
            command += ["--" + name.replace("_", "-"), str(value)]
        worker = Worker(command)
        worker.read("while connecting MQTT clients")
        return worker


# -- MQTT 3.1.1 by hand (connects and idle connections) ----------------------------------


def _remaining_length(length: int) -> bytes:
    out = bytearray()
    while True:
        byte = length % 128
        length //= 128
        out.append(byte | 0x80 if length else byte)
        if not length:
            return bytes(out)


def connect_packet(client_id: str, keepalive_s: int) -> bytes:
    """An MQTT 3.1.1 CONNECT with a clean session (spec 3.1)."""
    ident = client_id.encode()
    body = (b"\x00\x04MQTT\x04\x02" + struct.pack(">H", keepalive_s)
            + struct.pack(">H", len(ident)) + ident)
    return b"\x10" + _remaining_length(len(body)) + body


async def mqtt_connect(port: int, context: ssl.SSLContext, client_id: str,
                       keepalive_s: int = 0):
    """TLS + CONNECT + CONNACK; returns (reader, writer)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context,
                                                   server_hostname="localhost")
    writer.write(connect_packet(client_id, keepalive_s))
    connack = await reader.readexactly(4)
    if connack[0] != 0x20 or connack[3] != 0:
        writer.close()
        raise ConnectionError("CONNACK refused: %r" % connack)
    return reader, writer


async def run_connects(port: int, context, duration: float, concurrency: int) -> dict:
    """TLS + CONNECT/CONNACK, ``concurrency`` at a time, for ``duration`` s."""
    done = failures = 0
    deadline = time.monotonic() + duration
    prefix = "c%d-" % os.getpid()

    async def worker(index: int) -> None:
        nonlocal done, failures
        serial = 0
        while time.monotonic() < deadline:
            serial += 1
            writer = None
            try:
                _, writer = await mqtt_connect(port, context, "%s%d-%d" % (prefix, index, serial))
                done += 1
            except (ConnectionError, OSError, ssl.SSLError, asyncio.IncompleteReadError):
                failures += 1
            finally:
                if writer is not None:
                    writer.close()

    started = time.monotonic()
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return {"count": done, "failures": failures, "seconds": time.monotonic() - started}


def asyncio_worker(args: argparse.Namespace, context: ssl.SSLContext) -> None:
    """Worker for ``connects`` and ``idle`` (asyncio TLS streams)."""
    emit, next_command = worker_io()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        held = []
        if args.mode == "idle":
            prefix = "i%d-" % os.getpid()
            for start in range(0, args.count, 64):
                held.extend(await asyncio.gather(*(
                    mqtt_connect(args.port, context, "%s%d" % (prefix, index))
                    for index in range(start, min(start + 64, args.count)))))
        emit({"ready": len(held)})
        while True:
            command = await loop.run_in_executor(None, next_command)
            if command == "quit":
                break
            if args.mode == "connects":
                emit(await run_connects(args.port, context, args.duration, args.concurrency))
            else:
                emit({"held": len(held)})
        for _, writer in held:
            writer.close()
        await asyncio.sleep(0.05)

    asyncio.run(main())


# -- paho-mqtt publishers (ingest) -----------------------------------------------------------


class PahoFleet:
    """Many paho clients on one selector (paho's external-loop API)."""

    def __init__(self, args: argparse.Namespace, context: ssl.SSLContext) -> None:
        import paho.mqtt.client as mqtt

        self.mqtt = mqtt
        self.selector = selectors.DefaultSelector()
        self.per_message = args.per_message
        self.window = args.window
        self.sending = False
        self.acked = 0
        self.in_flight = {}
        self.topics = {}
        self.connected = 0
        self.clients = []
        for index in range(args.count):
            client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                                 client_id="p%d-%d" % (os.getpid(), index),
                                 protocol=mqtt.MQTTv311, clean_session=True)
            client.tls_set_context(context)
            client.max_inflight_messages_set(args.window)
            client.max_queued_messages_set(0)
            client.on_connect = self._on_connect
            client.on_publish = self._on_publish
            client.on_socket_open = self._on_open
            client.on_socket_close = self._on_close
            client.on_socket_register_write = self._register_write
            client.on_socket_unregister_write = self._unregister_write
            self.topics[client] = "smartx/dev_%016x/telemetry" % index
            self.in_flight[client] = 0
            self.clients.append(client)
        self.nodelay = bool(args.nodelay)

    # paho callbacks
    def _on_open(self, client, userdata, sock) -> None:
        if self.nodelay:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.selector.register(sock, selectors.EVENT_READ, client)

    def _on_close(self, client, userdata, sock) -> None:
        try:
            self.selector.unregister(sock)
        except (KeyError, ValueError):
            pass

    def _register_write(self, client, userdata, sock) -> None:
        self.selector.modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, client)

    def _unregister_write(self, client, userdata, sock) -> None:
        try:
            self.selector.modify(sock, selectors.EVENT_READ, client)
        except (KeyError, ValueError):
            pass

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            raise ConnectionError("CONNACK refused: %s" % reason_code)
        self.connected += 1

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        self.acked += self.per_message
        self.in_flight[client] -= 1
        if self.sending:
            self._publish(client)

    def _publish(self, client) -> None:
        stamp = time.time_ns() // 1_000_000
        readings = [["temp", stamp, 21.37 + index] for index in range(self.per_message)]
        client.publish(self.topics[client], json.dumps(readings, separators=(",", ":")),
                       qos=1)
        self.in_flight[client] += 1

    # the loop
    def pump(self, until, timeout: float = 60.0) -> None:
        """Run the selector loop until ``until()`` is true."""
        deadline = time.monotonic() + timeout
        last_misc = time.monotonic()
        while not until():
            now = time.monotonic()
            if now > deadline:
                raise TimeoutError("MQTT clients did not finish in time")
            for key, mask in self.selector.select(0.05):
                client = key.data
                if mask & selectors.EVENT_READ:
                    client.loop_read()
                    sock = client.socket()
                    # Records already decrypted wait in the SSL object: select cannot see them.
                    while sock is not None and sock.pending():
                        client.loop_read()
                        sock = client.socket()
                if mask & selectors.EVENT_WRITE:
                    client.loop_write()
            if now - last_misc > 1.0:
                last_misc = now
                for client in self.clients:
                    client.loop_misc()

    def connect(self) -> None:
        """Connect every client (TCP and TLS blocking, CONNACK by the loop)."""
        for client in self.clients:
            client.connect("127.0.0.1", int(self.port), keepalive=600)
        self.pump(lambda: self.connected == len(self.clients))

    def run(self, duration: float) -> dict:
        """Publish for ``duration`` s with the window full, then drain."""
        self.acked = 0
        self.sending = True
        started = time.monotonic()
        for client in self.clients:
            for _ in range(self.window):
                self._publish(client)
        stop_at = started + duration
        self.pump(lambda: time.monotonic() >= stop_at, timeout=duration + 60)
        self.sending = False
        self.pump(lambda: not any(self.in_flight.values()))
        return {"count": self.acked, "seconds": time.monotonic() - started, "failures": 0}

    def close(self) -> None:
        """Disconnect every client."""
        for client in self.clients:
            client.disconnect()
        self.pump(lambda: all(c.socket() is None for c in self.clients), timeout=10)


def publish_worker(args: argparse.Namespace, context: ssl.SSLContext) -> None:
    """Worker for ``publish``: paho clients, one run a command."""
    emit, next_command = worker_io()
    fleet = PahoFleet(args, context)
    fleet.port = args.port
    fleet.connect()
    emit({"ready": len(fleet.clients)})
    while True:
        command = next_command()
        if command == "quit":
            break
        emit(fleet.run(args.duration))
    try:
        fleet.close()
    except TimeoutError:
        pass


def main() -> None:
    """Entry point of the Mosquitto load generators (internal)."""
    parser = argparse.ArgumentParser(description="Mosquitto load generators (internal)")
    parser.add_argument("--client", dest="mode", required=True,
                        choices=["publish", "connects", "idle"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ca", required=True)
    parser.add_argument("--nodelay", type=int, default=1)
    parser.add_argument("--count", type=int, default=1)
    parser.add_argument("--per-message", type=int, default=1)
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    raise_nofile()
    set_asyncio_nodelay(bool(args.nodelay))
    from smartx_hub.pki import client_tls_context

    with open(args.ca, "rb") as handle:
        context = client_tls_context(handle.read())
    if args.mode == "publish":
        publish_worker(args, context)
    else:
        asyncio_worker(args, context)


if __name__ == "__main__":
    main()
