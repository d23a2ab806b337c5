"""The HIL bench: one hub, one gateway (the test host), and the boards named by ``--board``.

Rules (docs/hil.md):
- ``Lab.build`` makes the bench once per test session (per xdist worker): a hub in a temporary
  directory, a gateway enrolled on it (``device add --gateway``: a TLS client certificate), and
  for each ``--board`` a board enrolled ``--via`` that gateway, its backend, its port and its
  relay. Boards are provisioned and brought to READY lazily, by the first test that needs them.
- Board specs: ``sim`` is a simulated board; anything else is a pyserial URL (a device path,
  ``rfc2217://host:port``, ``socket://host:port``, ``loop://`` ...).
- Logs: each board's whole console goes to ``LOG_DIR/<board>.console.log``; the gateway's
  events to ``LOG_DIR/gateway.log``.
"""

from __future__ import annotations

import json
import os
import ssl
from typing import List, Optional

from smartx_hub.gateway_pki import gateway_client_tls_context

from hil.boards import HilBoard, SerialBackend, SimBackend
from hil.console import ConsoleBuffer
from hil.hub import HilHub
from hil.link import BoardPort
from hil.relay import BoardRelay

GATEWAY_NAME = "hil-gateway"
SIM = "sim"


def board_names(specs: List[str]) -> List[str]:
    """``sim0``, ``sim1`` for simulated boards; ``board0``, ... for real ones, by position."""
    return ["%s%d" % ("sim" if spec == SIM else "board", index) for index, spec in enumerate(specs)]


def is_sim(spec: str) -> bool:
    """Whether a ``--board`` value names a simulated board."""
    return spec == SIM


class HilGateway:
    """The test host as a gateway: its identity on the hub and one relay per board."""

    def __init__(self, hub: HilHub, directory: str, name: str = GATEWAY_NAME) -> None:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        self.hub = hub
        self.name = name
        self.bundle = hub.enrol_gateway(name)
        self.device_id: str = self.bundle["device_id"]
        self.cert_path = os.path.join(directory, "gateway.crt")
        self.key_path = os.path.join(directory, "gateway.key")
        for path, field in ((self.cert_path, "client_cert_pem"), (self.key_path, "client_key_pem")):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", encoding="ascii") as handle:
                handle.write(self.bundle[field])
        self.context: ssl.SSLContext = gateway_client_tls_context(
            hub.ca_pem, self.cert_path, self.key_path)
        self.log = ConsoleBuffer("gateway")
        self._log_file = open(os.path.join(directory, "gateway.log"), "a", encoding="utf-8")
        self.log.add_sink(self._write_log)
        self.relays: List[BoardRelay] = []

    def _write_log(self, text: str) -> None:
        self._log_file.write(text)
        self._log_file.flush()

    def say(self, text: str) -> None:
        """Add one line to the gateway's log."""
        self.log.feed(text.rstrip("\n") + "\n")

    def relay_for(self, port: BoardPort) -> BoardRelay:
        """A relay carrying ``port``'s board to the hub with this gateway's certificate."""
        relay = BoardRelay(port, self.hub.address, self.context, self.hub.server_name,
                           log=self.say)
        self.relays.append(relay)
        return relay

    def close(self) -> None:
        """Stop every relay."""
        for relay in self.relays:
            relay.stop()
        self._log_file.close()


class Lab:
    """The whole bench (see the module rules)."""

    def __init__(self, directory: str, specs: List[str], baudrate: int = 115200,
                 ready_timeout: float = 20.0) -> None:
        self.directory = directory
        self.specs = list(specs)
        self.baudrate = baudrate
        self.ready_timeout = ready_timeout
        self.log_dir = os.path.join(directory, "logs")
        os.makedirs(self.log_dir, exist_ok=True)
        self.hub: Optional[HilHub] = None
        self.gateway: Optional[HilGateway] = None
        self.boards: List[HilBoard] = []

    def build(self) -> "Lab":
        """Start the hub, enrol the gateway and the boards, open their ports."""
        self.hub = HilHub(os.path.join(self.directory, "hub")).start()
        self.gateway = HilGateway(self.hub, os.path.join(self.directory, "gateway"))
        for spec, name in zip(self.specs, board_names(self.specs)):
            bundle = self.hub.enrol("hil-" + name, auth="hs256", via=self.gateway.name)
            if is_sim(spec):
                backend = SimBackend(name, os.path.join(self.directory, "boards", name),
                                     self.baudrate)
            else:
                backend = SerialBackend(spec, open_timeout_s=self.ready_timeout)
            board = HilBoard(name, backend, bundle, self.hub, self.gateway.relay_for,
                             log=self.gateway.say,
                             console_log=os.path.join(self.log_dir, name + ".console.log"))
            self.boards.append(board)
        with open(os.path.join(self.log_dir, "bench.json"), "w", encoding="utf-8") as handle:
            json.dump({"hub_id": self.hub.ctx.hub_id, "gateway": self.gateway.device_id,
                       "boards": {b.name: {"spec": spec, "device_id": b.device_id}
                                  for b, spec in zip(self.boards, self.specs)}},
                      handle, indent=1)
        return self

    def close(self) -> None:
        """Tear the bench down: boards, gateway, hub."""
        for board in self.boards:
            try:
                board.close()
            except Exception:  # noqa: BLE001 - free the rest anyway
                pass
        if self.gateway is not None:
            self.gateway.close()
        if self.hub is not None:
            self.hub.close()
