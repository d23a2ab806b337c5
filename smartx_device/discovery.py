"""Finding the hub on the LAN with zeroconf (CPython only): for bundles with no hub address.

Rules (docs/device-sdk.md, "Discovery"):
- Browse ``_smartx._tcp.local.`` and take the first hub whose TXT ``hub_id`` is the bundle's
  hub id; announcements of other hubs are ignored.
- Discovery is never trust: it only yields an address. The client then verifies TLS against
  the CA pinned in the bundle, exactly as for a configured address, so a rogue announcement
  gets a ``CAMismatchError``, not a session.
- ``interfaces`` limits where the queries go (zeroconf's choice of all interfaces by default;
  tests pass ``["127.0.0.1"]`` inside a private network namespace).
"""

from __future__ import annotations

import queue
import time
from typing import Optional, Sequence

SERVICE_TYPE = "_smartx._tcp.local."
TXT_HUB_ID = b"hub_id"
TXT_CA_FINGERPRINT = b"ca_fingerprint"
DEFAULT_TIMEOUT_MS = 5000


class FoundHub:
    """A hub that answered: ``host`` (an IPv4 address), ``port``, and its TXT record's
    ``ca_fingerprint`` (informational: TLS verification is what counts)."""

    def __init__(self, host: str, port: int, ca_fingerprint: Optional[str], name: str) -> None:
        self.host = host
        self.port = port
        self.ca_fingerprint = ca_fingerprint
        self.name = name

    def __repr__(self) -> str:
        return "FoundHub(%r, %r, %r)" % (self.name, self.host, self.port)


def discover_hub(hub_id: str, timeout_ms: int = DEFAULT_TIMEOUT_MS,
                 interfaces: Optional[Sequence[str]] = None) -> Optional[FoundHub]:
    """Browse for up to ``timeout_ms``; return the hub announcing ``hub_id``, or None."""
    from zeroconf import (InterfaceChoice, IPVersion, ServiceBrowser, ServiceStateChange,
                          Zeroconf)

    names: "queue.Queue[str]" = queue.Queue()

    def on_change(zeroconf, service_type, name, state_change):  # zeroconf's keyword protocol
        if state_change in (ServiceStateChange.Added, ServiceStateChange.Updated):
            names.put(name)

    zeroconf = Zeroconf(interfaces=list(interfaces) if interfaces else InterfaceChoice.All,
                        ip_version=IPVersion.V4Only)
    browser = ServiceBrowser(zeroconf, SERVICE_TYPE, handlers=[on_change])
    deadline = time.monotonic() + timeout_ms / 1000
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            try:
                name = names.get(timeout=remaining)
            except queue.Empty:
                return None
            info = zeroconf.get_service_info(SERVICE_TYPE, name,
                                             timeout=int(max(remaining, 0.2) * 1000))
            if info is None or not info.port:
                continue
            properties = info.properties or {}
            announced = properties.get(TXT_HUB_ID)
            if announced is None or announced.decode("utf-8", "replace") != hub_id:
                continue
            addresses = info.parsed_addresses(IPVersion.V4Only)
            if not addresses:
                continue
            fingerprint = properties.get(TXT_CA_FINGERPRINT)
            return FoundHub(addresses[0], info.port,
                            fingerprint.decode("ascii", "replace") if fingerprint else None, name)
    finally:
        browser.cancel()
        zeroconf.close()
