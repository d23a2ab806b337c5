"""SmartX device SDK: what a firmware script imports (docs/device-sdk.md).

Public API:
- ``Client`` (blocking, CPython and MicroPython): ``Client.from_bundle(path, queue_path=...)``,
  ``@client.command(name)``, ``on_desired_state``, ``connect``, ``publish``, ``report_state``,
  ``loop``, ``flush``, ``run_forever``, ``close``; ``ack_timeout_ms`` resends an
  unacknowledged message on the same session. ``smartx_device.aio.AsyncClient`` is the
  asyncio flavour (CPython).
- Transports (``smartx_device.transport``): ``connect_tls``, ``SerialTransport(port)`` (a UART
  id, a port name or URL, or an open port), for ``transport_factory``.
- ``load_credentials(path, private_key_path=None)`` -> ``Credentials``.
- Errors, each carrying the hub's close ``reason``, ``detail`` and ``retry_after_ms``:
  ``ClientError`` > ``AuthError``, ``DeviceDisabledError``, ``HubUnreachableError``,
  ``CAMismatchError``, ``RateLimitedError``, ``TokenExpiredError``,
  ``VersionUnsupportedError``, ``ConnectionLostError``; ``CredentialError`` for a bad bundle or
  key, ``QueueError`` for an unusable queue file.
- Queue policies: ``KEEP_ALL``, ``KEEP_LATEST``, ``drop_older_than(ttl_ms)``, ``StreamPolicy``.
The protocol core (``cbor``, ``framing``, ``messages``, ``session``) is imported by module.
"""

from smartx_device.auth import CredentialError
from smartx_device.client import (AuthError, CAMismatchError, Client, ClientError,
                                  ConnectionLostError, DeviceDisabledError, HubUnreachableError,
                                  RateLimitedError, TokenExpiredError, VersionUnsupportedError)
from smartx_device.credentials import Credentials, load_credentials
from smartx_device.queue import (KEEP_ALL, KEEP_LATEST, QueueError, StreamPolicy,
                                 drop_older_than)

__version__ = "0.1.0"

__all__ = [
    "AuthError", "CAMismatchError", "Client", "ClientError", "ConnectionLostError",
    "CredentialError", "Credentials", "DeviceDisabledError", "HubUnreachableError",
    "KEEP_ALL", "KEEP_LATEST", "QueueError", "RateLimitedError", "StreamPolicy",
    "TokenExpiredError", "VersionUnsupportedError", "drop_older_than", "load_credentials",
    "__version__",
]
