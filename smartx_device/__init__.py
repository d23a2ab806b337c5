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

# Names load on first use (PEP 562 module __getattr__, which MicroPython also has): a board
# that imports only the protocol core (``import smartx_device.cbor``) runs this file too, and
# importing the whole client here would cost it about 100 KiB of heap for nothing.
_LAZY = {
    "CredentialError": "smartx_device.auth",
    "AuthError": "smartx_device.client", "CAMismatchError": "smartx_device.client",
    "Client": "smartx_device.client", "ClientError": "smartx_device.client",
    "ConnectionLostError": "smartx_device.client", "DeviceDisabledError": "smartx_device.client",
    "HubUnreachableError": "smartx_device.client", "RateLimitedError": "smartx_device.client",
    "TokenExpiredError": "smartx_device.client",
    "VersionUnsupportedError": "smartx_device.client",
    "Credentials": "smartx_device.credentials", "load_credentials": "smartx_device.credentials",
    "KEEP_ALL": "smartx_device.queue", "KEEP_LATEST": "smartx_device.queue",
    "QueueError": "smartx_device.queue", "StreamPolicy": "smartx_device.queue",
    "drop_older_than": "smartx_device.queue",
}


def __getattr__(name):
    """Import a public name's module the first time the name is used."""
    module = _LAZY.get(name)
    if module is None:
        if name.startswith("__"):
            raise AttributeError("module 'smartx_device' has no attribute '%s'" % name)
        # MicroPython asks this hook for ``from smartx_device import jwt`` before it looks for
        # a submodule: import it, and the import binds it here.
        try:
            __import__("smartx_device." + name)
        except ImportError:
            raise AttributeError("module 'smartx_device' has no attribute '%s'" % name)
        value = globals().get(name)
        if value is None:
            raise AttributeError("module 'smartx_device' has no attribute '%s'" % name)
        return value
    value = getattr(__import__(module, None, None, [name]), name)
    globals()[name] = value
    return value


__version__ = "0.1.0"

__all__ = [
    "AuthError", "CAMismatchError", "Client", "ClientError", "ConnectionLostError",
    "CredentialError", "Credentials", "DeviceDisabledError", "HubUnreachableError",
    "KEEP_ALL", "KEEP_LATEST", "QueueError", "RateLimitedError", "StreamPolicy",
    "TokenExpiredError", "VersionUnsupportedError", "drop_older_than", "load_credentials",
    "__version__",
]
