"""``serve``: the device listener, the HTTPS API and discovery, in one asyncio loop.

Rules (docs/operations.md):
- ``HubServer`` is the programmatic form: ``await start()`` returns once both ports are bound
  (``device_port``/``api_port`` then hold the real ports, so port 0 works); ``await stop()`` is
  the graceful shutdown. ``serve`` wraps it for the command line; ``run_hub_in_thread`` runs one
  in a background thread for synchronous tests, the simulator and HIL fixtures.
- The API is uvicorn serving ``smartx_hub.api.create_app`` in the same loop, over HTTPS with the
  hub's server certificate and TLS profile (``HubContext.api_tls_context``).
- Shutdown order (SIGINT/SIGTERM): stop advertising, stop accepting devices, commit and ack what
  devices sent, Close(CLOSE_SHUTTING_DOWN) to every session, stop the API; exit status 0.
- Limits come from ``ListenerLimits`` defaults, overridden by ``"device_limits"`` in
  ``DATA/hub.json``, overridden by the ``limits`` argument.
- ``insecure_dev`` serves devices and the API without TLS, and says so loudly.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import signal
import socket
import sys
import threading
from typing import Any, Callable, Mapping, Optional, Sequence

from smartx_hub import api as api_module
from smartx_hub.discovery import Advertiser, interface_addresses
from smartx_hub.limits import ListenerLimits
from smartx_hub.listener import DeviceListener, wall_clock_ms
from smartx_hub.live import LiveSessions

log = logging.getLogger(__name__)

#: How long ``stop`` gives the API to finish requests in flight.
API_GRACE_S = 3.0


def limits_for(ctx: Any, overrides: Optional[Mapping[str, Any]] = None) -> ListenerLimits:
    """The hub's device limits: defaults, then ``device_limits`` of hub.json, then overrides."""
    limits = ListenerLimits.from_mapping((getattr(ctx, "config", None) or {}).get("device_limits"))
    return ListenerLimits.from_mapping(overrides, base=limits)


def raise_file_limit() -> int:
    """Raise the soft limit of open files to the hard limit (one per session); return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def _bind(host: str, port: int) -> socket.socket:
    info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, address = info[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(512)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class HubServer:
    """A running hub: device listener + API (+ discovery) on the current asyncio loop."""

    def __init__(self, ctx: Any, host: str = "127.0.0.1", device_port: Optional[int] = None,
                 api_port: Optional[int] = None, insecure_dev: bool = False,
                 advertise: Sequence[str] = (), limits: Optional[Mapping[str, Any]] = None,
                 clock: Callable[[], int] = wall_clock_ms, api: bool = True) -> None:
        self.ctx = ctx
        self.host = host
        self.device_port = ctx.device_port if device_port is None else device_port
        self.api_port = ctx.api_port if api_port is None else api_port
        self.insecure_dev = insecure_dev
        self.advertise = list(advertise)
        self.limits = limits_for(ctx, limits)
        self.clock = clock
        self.live = LiveSessions()
        # The hub CA also signs gateways' client certificates: the device port asks for one
        # (without requiring it) so a gateway can relay for the boards assigned to it.
        self.listener = DeviceListener(ctx.hub_id, ctx.store, self.live,
                                       None if insecure_dev else ctx.device_tls_context(),
                                       self.limits, clock,
                                       client_ca_pem=None if insecure_dev else ctx.ca_cert_pem)
        self._serve_api = api
        self._api_server: Any = None
        self._api_task: Optional[asyncio.Task] = None
        self._advertiser: Optional[Advertiser] = None
        self.started = False

    @property
    def api_url(self) -> Optional[str]:
        """Where the API answers (None without the API)."""
        if not self._serve_api:
            return None
        scheme = "http" if self.insecure_dev else "https"
        host = self.host if self.host not in ("0.0.0.0", "::", "") else self.ctx.hosts[0]
        if ":" in host:
            host = "[%s]" % host
        return "%s://%s:%d/" % (scheme, host, self.api_port)

    async def start(self) -> None:
        """Bind and start everything; return once devices and API clients can connect."""
        if self.insecure_dev:
            log.warning("--insecure-dev: devices connect WITHOUT TLS and the API is plain HTTP;"
                        " never use this outside development")
        self.device_port = await self.listener.start(self.host, self.device_port)
        try:
            if self._serve_api:
                await self._start_api()
            if self.advertise:
                addresses = interface_addresses(self.advertise)
                self._advertiser = Advertiser(self.ctx.hub_id, self.ctx.ca_fingerprint,
                                              self.device_port, addresses)
                await self._advertiser.start()
        except BaseException:
            await self.stop()
            raise
        self.started = True

    async def _start_api(self) -> None:
        app = api_module.create_app(self.ctx, self.live, clock=self.clock)
        sock = _bind(self.host, self.api_port)
        self.api_port = sock.getsockname()[1]
        server = api_module.build_server(app, self.ctx, self.host, self.api_port)
        if self.insecure_dev:
            server.config.ssl = None
        # The hub handles SIGINT/SIGTERM itself (see ``serve``); uvicorn must not take them.
        server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign]
        self._api_server = server
        self._api_task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
        while not server.started:
            if self._api_task.done():
                sock.close()
                error = self._api_task.exception() if not self._api_task.cancelled() else None
                raise RuntimeError("the API server did not start: %s" % (error,))
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        """Graceful shutdown in the order of the module rules. Idempotent."""
        if self._advertiser is not None:
            advertiser, self._advertiser = self._advertiser, None
            try:
                await advertiser.stop()
            except Exception:  # noqa: BLE001 - shutting down anyway
                log.exception("withdrawing the zeroconf announcement failed")
        await self.listener.stop()
        if self._api_task is not None:
            task, self._api_task = self._api_task, None
            self._api_server.should_exit = True
            try:
                await asyncio.wait_for(asyncio.shield(task), API_GRACE_S)
            except asyncio.TimeoutError:
                self._api_server.force_exit = True
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(task, 1.0)
            except Exception:  # noqa: BLE001 - the API failed; the hub still stops
                log.exception("the API server ended with an error")
        self.started = False


def _describe(server: HubServer) -> str:
    ctx = server.ctx
    host = server.host if server.host not in ("0.0.0.0", "::", "") else ctx.hosts[0]
    lines = [
        "SmartX hub %s" % ctx.hub_id,
        "  devices:        %s://%s:%d (listening on %s)" % (
            "tcp+plaintext" if server.insecure_dev else "tls", host, server.device_port,
            server.host),
        "  API:            %s" % server.api_url,
        "  CA fingerprint: %s" % ctx.ca_fingerprint,
    ]
    if server.advertise:
        lines.append("  advertised on:  %s" % ", ".join(server.advertise))
    return "\n".join(lines)


def serve(ctx: Any, host: str = "0.0.0.0", device_port: Optional[int] = None,
          api_port: Optional[int] = None, insecure_dev: bool = False,
          advertise: Sequence[str] = (), limits: Optional[Mapping[str, Any]] = None) -> int:
    """Run the hub until SIGINT or SIGTERM; return the exit status (0 after a clean stop)."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    raise_file_limit()

    async def main() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        # Before anything is announced: whoever reads the banner may signal at once.
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        server = HubServer(ctx, host, device_port, api_port, insecure_dev, advertise, limits)
        try:
            await server.start()
            print(_describe(server), flush=True)
            await stop.wait()
            log.info("signal received: shutting down")
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
            await server.stop()
        log.info("stopped")
        return 0

    return asyncio.run(main())


class HubThread:
    """A hub running in a background thread (``run_hub_in_thread``). ``stop`` it when done."""

    def __init__(self, ctx: Any, owns_ctx: bool, options: dict) -> None:
        self.ctx = ctx
        self._owns_ctx = owns_ctx
        self._options = options
        self._ready = threading.Event()
        self._error: Optional[BaseException] = None
        self.loop: Optional[asyncio.AbstractEventLoop] = None
        self.server: Optional[HubServer] = None
        self._stop: Optional[asyncio.Event] = None
        self._thread = threading.Thread(target=self._run, name="smartx-hub", daemon=True)

    @property
    def device_port(self) -> int:
        """The bound device port."""
        return self.server.device_port

    @property
    def api_port(self) -> int:
        """The bound API port."""
        return self.server.api_port

    @property
    def live(self) -> LiveSessions:
        """The hub's registry of live sessions."""
        return self.server.live

    @property
    def listener(self) -> DeviceListener:
        """The device listener (its ``stats`` count what happened)."""
        return self.server.listener

    def _start(self, timeout_s: float) -> "HubThread":
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise RuntimeError("the hub did not start within %.0f s" % timeout_s)
        if self._error is not None:
            self._thread.join(5)
            raise self._error
        return self

    def _run(self) -> None:
        async def main() -> None:
            self.loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            self.server = HubServer(self.ctx, **self._options)
            try:
                await self.server.start()
            except BaseException as exc:  # reported to the starting thread
                self._error = exc
                self._ready.set()
                return
            self._ready.set()
            await self._stop.wait()
            await self.server.stop()

        try:
            asyncio.run(main())
        except BaseException as exc:  # noqa: BLE001
            if not self._ready.is_set():
                self._error = exc
                self._ready.set()
            else:
                log.exception("the hub thread failed")

    def call(self, fn: Callable, *args: Any) -> Any:
        """Run ``fn(*args)`` on the hub's loop and return its result (for tests)."""
        future = asyncio.run_coroutine_threadsafe(_as_coroutine(fn, *args), self.loop)
        return future.result(10)

    def stop(self, timeout_s: float = 15.0) -> None:
        """Shut the hub down gracefully and wait for its thread. Idempotent."""
        if self.loop is not None and self._stop is not None and self._thread.is_alive():
            self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout_s)
        if self._owns_ctx and self.ctx is not None:
            self.ctx.close()
            self.ctx = None

    def __enter__(self) -> "HubThread":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()


async def _as_coroutine(fn: Callable, *args: Any) -> Any:
    return fn(*args)


def run_hub_in_thread(ctx_or_data_dir: Any, host: str = "127.0.0.1", device_port: int = 0,
                      api_port: int = 0, timeout_s: float = 30.0, **options: Any) -> HubThread:
    """Start a hub in a background thread and return once it listens.

    ``ctx_or_data_dir``: an open ``HubContext`` (left open on stop) or a data directory (opened
    here and closed on stop). ``options`` go to ``HubServer`` (``insecure_dev``, ``limits``,
    ``advertise``, ``clock``, ``api``)."""
    if isinstance(ctx_or_data_dir, (str, bytes)) or hasattr(ctx_or_data_dir, "__fspath__"):
        from smartx_hub.state import load_hub

        ctx, owns = load_hub(str(ctx_or_data_dir)), True
    else:
        ctx, owns = ctx_or_data_dir, False
    options.update(host=host, device_port=device_port, api_port=api_port)
    handle = HubThread(ctx, owns, options)
    try:
        return handle._start(timeout_s)
    except BaseException:
        if owns:
            ctx.close()
        raise


if __name__ == "__main__":  # pragma: no cover - use `python -m smartx_hub serve`
    sys.exit("run: python -m smartx_hub serve --data DIR")
