"""The hub the HIL suite runs against: a real SmartX hub on loopback with a temporary data dir.

Rules (docs/hil.md, "The hub fixture"):
- ``HilHub`` is ``smartx-hub init`` in a fresh directory and ``run_hub_in_thread`` on
  127.0.0.1 with an ephemeral device port. ``stop()``/``start()`` restart it on the same port
  (the gateway keeps relaying to the same address), with everything it stored kept.
- Enrolment goes through the hub's own command line (``smartx_hub.cli.main``, in-process):
  ``enrol(name, via=...)`` and ``enrol_gateway(name)`` return the credentials bundle (a dict)
  exactly as ``smartx-hub device add`` writes it for a user.
- Queries and commands go through the store and the live-session registry, as the REST API
  does (the API is not started: nothing in the HIL suite needs HTTP).
- The HIL hub raises ``auth_failures_before_backoff``: every board behind the gateway shares
  one address, and the suite refuses devices on purpose.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import time
from typing import Any, Dict, List, Optional

from smartx_hub import cli as hub_cli
from smartx_hub.server import HubThread, run_hub_in_thread
from smartx_hub.state import HubContext, init_hub, wall_clock_ms
from smartx_hub.store import Command, Device, Reading

#: Device-port limits for the HIL hub (docs/operations.md, "Flood limits").
HIL_LIMITS = {"auth_failures_before_backoff": 1000}
COMMAND_TTL_MS = 60_000
PAGE = 1000


class HubCommandError(Exception):
    """The hub's command line refused a request; the message is its one-line reason."""


class HilHub:
    """A hub in ``data_dir`` (created here), started with ``start()`` (see the module rules)."""

    def __init__(self, data_dir: str, limits: Optional[Dict[str, Any]] = None) -> None:
        self.data_dir = os.path.abspath(data_dir)
        self.ctx: HubContext = init_hub(self.data_dir)
        self.limits = dict(HIL_LIMITS)
        self.limits.update(limits or {})
        self.thread: Optional[HubThread] = None
        self.device_port = 0
        self.starts = 0
        self._bundles = os.path.join(self.data_dir, "bundles")
        os.makedirs(self._bundles, mode=0o700, exist_ok=True)

    # -- running ---------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """True while the hub serves."""
        return self.thread is not None

    @property
    def address(self) -> tuple:
        """``(host, device_port)`` for gateways."""
        return ("127.0.0.1", self.device_port)

    @property
    def ca_pem(self) -> bytes:
        """The hub CA certificate (PEM) that devices and gateways pin."""
        return self.ctx.ca_cert_pem

    @property
    def server_name(self) -> str:
        """The name the hub's certificate carries (what TLS clients check)."""
        return self.ctx.hosts[0]

    def start(self) -> "HilHub":
        """Serve devices (on the same port as before, after a ``stop``)."""
        if self.thread is not None:
            return self
        self.thread = run_hub_in_thread(self.ctx, host="127.0.0.1", device_port=self.device_port,
                                        api=False, limits=self.limits)
        self.device_port = self.thread.device_port
        _accept_gateway_certificates(self.thread, self.ctx)
        self.starts += 1
        return self

    def stop(self) -> None:
        """Shut the hub down gracefully (sessions get ``shutting_down``); state is kept."""
        thread, self.thread = self.thread, None
        if thread is not None:
            thread.stop()

    def close(self) -> None:
        """Stop and close the data directory."""
        self.stop()
        self.ctx.close()

    # -- enrolment -------------------------------------------------------------------------

    def cli(self, *argv: str) -> Any:
        """Run ``smartx-hub ARGV --data DIR --json`` in-process; return its JSON output."""
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = hub_cli.main(list(argv) + ["--data", self.data_dir, "--json"])
        if status != 0:
            raise HubCommandError("smartx-hub %s: %s" % (" ".join(argv),
                                                         err.getvalue().strip() or status))
        text = out.getvalue().strip()
        return json.loads(text) if text else None

    def enrol(self, name: str, auth: str = "hs256", via: Optional[str] = None) -> dict:
        """Enrol a board (behind gateway ``via``, a name or id) and return its bundle."""
        path = os.path.join(self._bundles, name + ".smartx.json")
        argv = ["device", "add", name, "--auth", auth, "--out", path]
        if via is not None:
            argv += ["--via", via]
        self.cli(*argv)
        with open(path, "r", encoding="utf-8") as handle:
            return json.load(handle)

    def enrol_gateway(self, name: str) -> dict:
        """Enrol a gateway and return its bundle (with its TLS client certificate)."""
        path = os.path.join(self._bundles, name + ".smartx.json")
        self.cli("device", "add", name, "--gateway", "--auth", "es256", "--out", path)
        with open(path, "r", encoding="utf-8") as handle:
            return json.load(handle)

    def disable(self, device_id: str) -> None:
        """``smartx-hub device disable``: a live session ends within a second."""
        self.cli("device", "disable", device_id)

    def enable(self, device_id: str) -> None:
        """``smartx-hub device enable``."""
        self.cli("device", "enable", device_id)

    def device(self, device_id: str) -> Optional[Device]:
        """The device's record (None if it is not enrolled)."""
        return self.ctx.store.get_device(device_id)

    # -- what the hub knows ----------------------------------------------------------------

    def is_online(self, device_id: str) -> bool:
        """Whether the device has a verified live session now."""
        return self.thread is not None and self.thread.live.is_online(device_id)

    def wait_online(self, device_id: str, timeout: float = 10.0) -> bool:
        """Wait until the device is online; False if it is not within ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while not self.is_online(device_id):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        return True

    def readings(self, device_id: str, stream: Optional[str] = None) -> List[Reading]:
        """Every stored reading of the device (optionally one stream), oldest first."""
        out: List[Reading] = []
        before: Optional[int] = None
        while True:
            page = self.ctx.store.query_telemetry(device_id, stream=stream, limit=PAGE,
                                                  before_seq=before)
            out.extend(page)
            if len(page) < PAGE:
                break
            before = page[-1].seq
        out.sort(key=lambda reading: reading.seq)
        return out

    def send_command(self, device_id: str, name: str, args: Any = None,
                     ttl_ms: int = COMMAND_TTL_MS) -> Command:
        """Queue a command for the device and wake its session, as the API does."""
        command = self.ctx.store.add_command(device_id, name, args, ttl_ms, wall_clock_ms())
        if self.thread is not None:
            self.thread.live.wake(device_id)
        return command

    def wait_command(self, command_id: str, timeout: float = 10.0) -> Command:
        """Wait until the command has a result (succeeded, failed or expired); return it."""
        deadline = time.monotonic() + timeout
        while True:
            command = self.ctx.store.get_command(command_id)
            if command is not None and command.status in ("succeeded", "failed", "expired"):
                return command
            if time.monotonic() >= deadline:
                raise TimeoutError("command %s is still %s after %.1f s" % (
                    command_id, command.status if command else "missing", timeout))
            time.sleep(0.02)

    def stats(self) -> Dict[str, int]:
        """The device listener's counters (connections, sessions, auth_failures, ...)."""
        return dict(self.thread.listener.stats) if self.thread is not None else {}


def _accept_gateway_certificates(thread: HubThread, ctx: HubContext) -> None:
    """Make sure the running listener reads gateway client certificates.

    ``HubServer`` passes the hub CA to its listener; a server that does not (see docs/hil.md)
    gets it here, before any device connects."""
    listener = thread.listener
    if listener.client_ca_pem is None:
        listener.accept_gateways(ctx.ca_cert_pem)
