"""The API figure: requests/s on a telemetry read with a token check, and without one.

Rules:
- Two server processes on the same hub data directory, each the hub's own ASGI app
  (``create_app``) behind uvicorn over HTTPS with the hub's TLS context (``build_server``): one
  as shipped, one with the ``authenticate`` dependency overridden to return a fixed principal
  (FastAPI's ``dependency_overrides``). Everything else (shield, routing, store reads,
  decryption, JSON) is the same code.
- The shield's request rates are raised through ``<data dir>/shield_rules.toml``: the load
  generator is one address and one token.
- The load generator is an asyncio HTTP/1.1 client on keep-alive TLS connections sending the
  same request, with the same ``Authorization`` header, to both; the two servers are measured
  alternately, round by round.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import ssl
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import Worker, free_port, worker_io  # noqa: E402

THIS = os.path.abspath(__file__)
SHIELD_OVERRIDE = """# Written by benchmarks/api_bench.py: one client, one address, one token
[rates]
ip = { rate = 1000000.0, burst = 1000000 }
token = { rate = 1000000.0, burst = 1000000 }
account = { rate = 1000000.0, burst = 1000000 }
"""


def prepare(data_dir: str, device_id: str, readings: int = 1000) -> str:
    """Relax the shield's rates, store ``readings`` readings for ``device_id`` and return a
    ``telemetry:read`` token for it (the hub's own issue path)."""
    from smartx_hub import tokens
    from smartx_hub.state import load_hub
    from smartx_hub.store import TelemetryBatch

    with open(os.path.join(data_dir, "shield_rules.toml"), "w") as handle:
        handle.write(SHIELD_OVERRIDE)
    ctx = load_hub(data_dir)
    try:
        now = int(time.time() * 1000)
        batches = [TelemetryBatch(device_id, 4_000_000_000 + index,
                                  [("temp", now - readings + index, 21.37 + index % 10)],
                                  now) for index in range(readings)]
        ctx.store.add_telemetry(batches)
        user = ctx.store.add_user("bench", "not-a-password-hash", now)
        keys = tokens.TokenKeys.from_context(ctx)
        token, _ = tokens.issue_token(keys, ctx.store, user, ["telemetry:read"], None,
                                      None, "bench", now)
        return token
    finally:
        ctx.close()


# -- server (worker process) -------------------------------------------------------------


def serve(args: argparse.Namespace) -> None:
    """Worker: serve the hub's API app (token checked or not) on ``--port``."""
    import logging

    from smartx_hub import api, tokens
    from smartx_hub.live import LiveSessions
    from smartx_hub.state import load_hub

    logging.basicConfig(level=logging.WARNING)
    emit, _ = worker_io()
    ctx = load_hub(args.data)
    app = api.create_app(ctx, LiveSessions())
    if not args.auth:
        fixed = tokens.Principal(user_id="usr_bench", username="bench",
                                 scopes=tokens.ALL_SCOPES, devices=None)
        app.dependency_overrides[api.authenticate] = lambda: fixed
    server = api.build_server(app, ctx, "127.0.0.1", args.port, access_log=False,
                              log_level="warning")

    async def main() -> None:
        task = asyncio.create_task(server.serve())
        while not server.started:
            await asyncio.sleep(0.02)
        emit({"ready": args.port})
        await task

    asyncio.run(main())
    ctx.close()


# -- load generator (worker process) ------------------------------------------------------


async def _one_connection(port: int, context: ssl.SSLContext, request: bytes,
                          stop_at: float, counts: list) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context,
                                                   server_hostname="localhost")
    try:
        while time.monotonic() < stop_at:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
            if status != 200:
                raise RuntimeError("the API answered %d" % status)
            counts[0] += 1
    finally:
        writer.close()


def load(args: argparse.Namespace) -> None:
    """Worker: send the telemetry request on keep-alive connections, one run a command."""
    from smartx_hub.pki import client_tls_context

    emit, next_command = worker_io()
    with open(args.ca, "rb") as handle:
        context = client_tls_context(handle.read())
    request = ("GET /api/v1/devices/%s/telemetry?limit=%d HTTP/1.1\r\nHost: localhost\r\n"
               "Authorization: Bearer %s\r\nAccept: application/json\r\n\r\n"
               % (args.device, args.limit, args.token)).encode()
    emit({"ready": True})
    while True:
        command = next_command()
        if command == "quit":
            break
        port = int(command.split()[1])
        counts = [0]
        started = time.monotonic()
        stop_at = started + args.duration

        async def run() -> None:
            await asyncio.gather(*(_one_connection(port, context, request, stop_at, counts)
                                   for _ in range(args.connections)))

        asyncio.run(run())
        emit({"count": counts[0], "seconds": time.monotonic() - started})


class ApiServers:
    """The two API servers (token checked, not checked) and a load generator per page size."""

    def __init__(self, data_dir: str, ca_path: str, device_id: str, duration: float,
                 connections: int = 8, limits: tuple = (100, 1)) -> None:
        token = prepare(data_dir, device_id)
        self.servers = {}
        self.loads = {}
        self.connections = connections
        try:
            for auth in (True, False):
                port = free_port()
                worker = Worker([THIS, "--serve", "--data", data_dir, "--port", str(port),
                                 "--auth", str(int(auth))])
                self.servers[auth] = (port, worker)
                worker.read("while starting the API")
            for limit in limits:
                self.loads[limit] = Worker([THIS, "--load", "--ca", ca_path, "--device",
                                            device_id, "--token", token, "--duration",
                                            str(duration), "--connections", str(connections),
                                            "--limit", str(limit)])
                self.loads[limit].read("while starting the API load generator")
        except BaseException:
            self.close()
            raise

    def port(self, auth: bool) -> int:
        """The port of the server with (``auth``) or without the token check."""
        return self.servers[auth][0]

    def pid(self, auth: bool) -> int:
        """The pid of that server (its CPU is measured)."""
        return self.servers[auth][1].pid

    def close(self) -> None:
        """Stop the load generators and both servers."""
        for load in self.loads.values():
            load.close()
        for _, worker in self.servers.values():
            worker.process.terminate()
            worker.close(timeout=20)


def main() -> None:
    """Entry point of the API workers (internal)."""
    parser = argparse.ArgumentParser(description="API benchmark workers (internal)")
    parser.add_argument("--serve", action="store_true")
    parser.add_argument("--load", action="store_true")
    parser.add_argument("--data")
    parser.add_argument("--port", type=int)
    parser.add_argument("--auth", type=int, default=1)
    parser.add_argument("--ca")
    parser.add_argument("--device")
    parser.add_argument("--token")
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--limit", type=int, default=100)
    args = parser.parse_args()
    if args.serve:
        serve(args)
    else:
        load(args)


if __name__ == "__main__":
    main()
