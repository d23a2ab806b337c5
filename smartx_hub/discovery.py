"""Zeroconf advertisement of the hub: ``_smartx._tcp.local.`` on the interfaces a user names.

Rules (docs/operations.md, "Discovery"):
- Nothing is announced unless ``serve --advertise IFACE`` names interfaces; zeroconf is then
  bound to those interfaces' IPv4 addresses only, never to every interface.
- The service points at the device port; its TXT record carries ``hub_id``, ``proto`` (the
  protocol version) and ``ca_fingerprint`` (``sha256:<hex>``, as in bundles and the CLI).
- Discovery is never trust: a device that finds a hub this way still verifies TLS against the
  CA it pinned, and the fingerprint only lets a person or a tool check it is the expected hub.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import ifaddr
from zeroconf import IPVersion, ServiceStateChange
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from smartx_device.messages import PROTOCOL_VERSION

log = logging.getLogger(__name__)

SERVICE_TYPE = "_smartx._tcp.local."
TXT_HUB_ID = "hub_id"
TXT_PROTOCOL = "proto"
TXT_CA_FINGERPRINT = "ca_fingerprint"


class DiscoveryError(Exception):
    """An interface to advertise on is unknown or has no IPv4 address."""


def interface_addresses(names: Iterable[str]) -> list[str]:
    """The IPv4 addresses of the named network interfaces (``DiscoveryError`` if one has none)."""
    adapters = {adapter.name: adapter for adapter in ifaddr.get_adapters()}
    addresses: list[str] = []
    for name in names:
        adapter = adapters.get(name)
        if adapter is None:
            raise DiscoveryError("no network interface named %r (have: %s)"
                                 % (name, ", ".join(sorted(adapters)) or "none"))
        found = [ip.ip for ip in adapter.ips if isinstance(ip.ip, str)]
        if not found:
            raise DiscoveryError("interface %r has no IPv4 address to advertise on" % name)
        for address in found:
            if address not in addresses:
                addresses.append(address)
    return addresses


def service_name(hub_id: str) -> str:
    """The hub's zeroconf instance name."""
    return "%s.%s" % (hub_id, SERVICE_TYPE)


def service_info(hub_id: str, ca_fingerprint: str, port: int,
                 addresses: Sequence[str]) -> AsyncServiceInfo:
    """The ServiceInfo the hub registers: its device port on ``addresses``, with the TXT record."""
    return AsyncServiceInfo(
        SERVICE_TYPE, service_name(hub_id),
        addresses=[socket.inet_aton(address) for address in addresses], port=port,
        properties={TXT_HUB_ID: hub_id, TXT_PROTOCOL: str(PROTOCOL_VERSION),
                    TXT_CA_FINGERPRINT: ca_fingerprint},
        server="%s.local." % hub_id)


class Advertiser:
    """Announces one hub on the given interface addresses until ``stop``."""

    def __init__(self, hub_id: str, ca_fingerprint: str, port: int,
                 addresses: Sequence[str]) -> None:
        if not addresses:
            raise DiscoveryError("nothing to advertise on: name at least one interface")
        for address in addresses:
            ipaddress.IPv4Address(address)  # ValueError for anything else
        self.addresses = list(addresses)
        self.info = service_info(hub_id, ca_fingerprint, port, self.addresses)
        self._zeroconf: Optional[AsyncZeroconf] = None

    async def start(self) -> None:
        """Bind zeroconf to the addresses and register the service."""
        self._zeroconf = AsyncZeroconf(interfaces=self.addresses, ip_version=IPVersion.V4Only)
        await self._zeroconf.async_register_service(self.info)
        log.info("advertising %s on %s", self.info.name, ", ".join(self.addresses))

    async def stop(self) -> None:
        """Withdraw the announcement (goodbye packets) and close zeroconf."""
        zeroconf, self._zeroconf = self._zeroconf, None
        if zeroconf is None:
            return
        try:
            await zeroconf.async_unregister_service(self.info)
        finally:
            await zeroconf.async_close()


@dataclass(frozen=True)
class HubAnnouncement:
    """A hub seen on the network: where its device port is and what its TXT record says."""

    name: str
    addresses: tuple
    port: int
    hub_id: Optional[str]
    protocol: Optional[str]
    ca_fingerprint: Optional[str]


def _text(properties: dict, key: str) -> Optional[str]:
    value = properties.get(key.encode("ascii"))
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return None


async def browse(addresses: Sequence[str], timeout_s: float = 3.0,
                 wanted: int = 1) -> list[HubAnnouncement]:
    """Look for hubs from the given local addresses for up to ``timeout_s`` (stops early once
    ``wanted`` are found). For tools and tests; the device SDK has its own finder."""
    import asyncio

    found: dict[str, HubAnnouncement] = {}
    names: asyncio.Queue = asyncio.Queue()
    zeroconf = AsyncZeroconf(interfaces=list(addresses), ip_version=IPVersion.V4Only)

    def on_change(zeroconf, service_type, name, state_change):  # zeroconf's handler signature
        if state_change in (ServiceStateChange.Added, ServiceStateChange.Updated):
            names.put_nowait(name)

    browser = AsyncServiceBrowser(zeroconf.zeroconf, [SERVICE_TYPE], handlers=[on_change])
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    try:
        while len(found) < wanted:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                name = await asyncio.wait_for(names.get(), remaining)
            except asyncio.TimeoutError:
                break
            info = AsyncServiceInfo(SERVICE_TYPE, name)
            if not await info.async_request(zeroconf.zeroconf, int(max(remaining, 0.1) * 1000)):
                continue
            properties = info.properties or {}
            found[name] = HubAnnouncement(
                name=name, addresses=tuple(info.parsed_addresses()), port=info.port or 0,
                hub_id=_text(properties, TXT_HUB_ID), protocol=_text(properties, TXT_PROTOCOL),
                ca_fingerprint=_text(properties, TXT_CA_FINGERPRINT))
    finally:
        await browser.async_cancel()
        await zeroconf.async_close()
    return list(found.values())
