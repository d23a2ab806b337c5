"""The asyncio device client (CPython): the same shape as ``Client``, awaitable.

A thin loop around ``client.ClientCore`` (docs/device-sdk.md, "Client"): one background task
reads, writes what the core says, runs its timer and reconnects with back-off; ``publish``
stores on flash and wakes that task. Command handlers may be plain functions or coroutines.

    async with AsyncClient.from_bundle("device.smartx.json", queue_path="queue.log") as client:
        await client.publish("temp", 21.5)
        await client.flush()
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any, Callable, Optional

from smartx_device import backoff as backoff_module
from smartx_device import clock as clock_module
from smartx_device import messages as m
from smartx_device import reasons as r
from smartx_device.auth import Signer
from smartx_device.client import (DEFAULT_ACK_TIMEOUT_MS, FATAL_ERRORS, RECV_SIZE, SOFTWARE,
                                  CAMismatchError, ClientCore, ClientError,
                                  ConnectionLostError, HubUnreachableError, error_for_close)
from smartx_device.credentials import Credentials, load_credentials
from smartx_device.framing import DEFAULT_MAX_FRAME_SIZE, StreamFramer
from smartx_device.queue import OfflineQueue
from smartx_device.transport import CertificateError, client_ssl_context


class _AsyncCore(ClientCore):
    """ClientCore whose command handlers may be coroutines (run as tasks)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.wake: Optional[Callable[[], None]] = None
        self._tasks: set = set()

    def dispatch(self, command: m.Command, now_ms: int) -> Optional[m.CommandResult]:
        result = super().dispatch(command, now_ms)
        if result is not None and result.ok and asyncio.iscoroutine(result.result):
            task = asyncio.ensure_future(self._finish(command, result.result))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return None
        return result

    async def _finish(self, command: m.Command, coroutine: Any) -> None:
        try:
            value = await coroutine
            result = m.CommandResult(command_id=command.command_id, ok=True, result=value)
        except Exception as error:  # a failing handler gives an error result, not a crash
            self._note_handler_error("command %s" % command.name, error)
            result = m.CommandResult(command_id=command.command_id, ok=False,
                                     error=("%s: %s" % (type(error).__name__, error))[:256])
        self.command_done(result)
        if self.wake is not None:
            self.wake()


class AsyncClient:
    """The asyncio SmartX device client; see ``smartx_device.Client`` for the semantics."""

    def __init__(self, credentials: Credentials, queue_path: str = "smartx-queue.log",
                 host: Optional[str] = None, port: Optional[int] = None,
                 backoff: Optional[backoff_module.Backoff] = None,
                 queue_options: Optional[dict] = None, handshake_timeout_ms: int = 10000,
                 connect_timeout_ms: int = 10000, max_in_flight: int = 4,
                 software: str = SOFTWARE,
                 ack_timeout_ms: Optional[int] = DEFAULT_ACK_TIMEOUT_MS) -> None:
        self.credentials = credentials
        self.device_id = credentials.device_id
        self.host = host or credentials.hub_host
        self.port = port or credentials.hub_port
        self.handshake_timeout_ms = handshake_timeout_ms
        self.connect_timeout_ms = connect_timeout_ms
        self.backoff = backoff or backoff_module.Backoff()
        options = dict(queue_options or {})
        options.setdefault("monotonic_now", clock_module.monotonic_ms())
        self.queue = OfflineQueue(queue_path, **options)
        signer = Signer(credentials.auth, credentials.secret, credentials.private_key_pem)
        self.core = _AsyncCore(self.device_id, signer, self.queue, clock_module.WallClock(),
                               software, max_in_flight=max_in_flight,
                               ack_timeout_ms=ack_timeout_ms)
        self.core.wake = self._wake
        self._reader: Optional[asyncio.StreamReader] = None
        self._writer: Optional[asyncio.StreamWriter] = None
        self._task: Optional[asyncio.Task] = None
        # Made on first use inside the running loop (on 3.9 an Event binds to a loop when made).
        self._wakeup_event: Optional[asyncio.Event] = None
        self._progress_event: Optional[asyncio.Event] = None
        self._fatal: Optional[BaseException] = None
        self.last_error: Optional[BaseException] = None
        self.connections = 0
        self.closed = False

    @classmethod
    def from_bundle(cls, path: str, queue_path: str = "smartx-queue.log",
                    private_key_path: Optional[str] = None, **options: Any) -> "AsyncClient":
        """Load the credentials bundle at ``path`` and build a client."""
        return cls(load_credentials(path, private_key_path), queue_path, **options)

    # -- registration ----------------------------------------------------------------------

    def command(self, name: str) -> Callable:
        """Decorator registering ``fn(args)`` (plain or ``async``) for the command ``name``."""
        def register(handler: Callable) -> Callable:
            self.core.handlers[name] = handler
            return handler
        return register

    def on_desired_state(self, handler: Callable[[dict], Any]) -> Callable:
        """Register ``handler(state)`` for desired-state changes."""
        self.core.desired_state_handler = handler
        return handler

    @property
    def _wakeup(self) -> asyncio.Event:
        if self._wakeup_event is None:
            self._wakeup_event = asyncio.Event()
        return self._wakeup_event

    @property
    def _progress(self) -> asyncio.Event:
        if self._progress_event is None:
            self._progress_event = asyncio.Event()
        return self._progress_event

    @property
    def connected(self) -> bool:
        """True while a verified session is up."""
        return self._writer is not None and self.core.established

    # -- connecting ------------------------------------------------------------------------

    async def _open(self) -> None:
        try:
            context = client_ssl_context(self.credentials.ca_pem)
        except CertificateError as error:
            raise CAMismatchError(str(error)) from None
        try:
            self._reader, self._writer = await asyncio.wait_for(
                asyncio.open_connection(self.host, self.port, ssl=context,
                                        server_hostname=self.credentials.server_name or self.host),
                self.connect_timeout_ms / 1000)
        except ssl.SSLCertVerificationError as error:
            raise CAMismatchError("the hub's certificate does not verify against the pinned "
                                  "CA: %s" % (error.verify_message or error)) from None
        except (OSError, asyncio.TimeoutError) as error:
            raise HubUnreachableError("cannot reach %s:%s: %s"
                                      % (self.host, self.port, error or "timed out")) from None

    async def _connect_once(self) -> None:
        await self._drop()
        await self._open()
        now = clock_module.monotonic_ms()
        try:
            await self._write(self.core.begin(StreamFramer(DEFAULT_MAX_FRAME_SIZE), now,
                                               self.handshake_timeout_ms))
            while not self.core.established:
                if self.core.close_event is not None:
                    await self._write(self.core.data_to_send(clock_module.monotonic_ms()))
                    raise error_for_close(self.core.close_event)
                await self._read_once()
                await self._write(self.core.data_to_send(clock_module.monotonic_ms()))
        except (OSError, ConnectionError) as error:
            raise HubUnreachableError("the link failed during the handshake: %s" % error) from None
        except ClientError:
            await self._drop()
            raise
        self.connections += 1
        self.backoff.reset()
        self.last_error = None

    async def connect(self) -> None:
        """Open a verified session (one attempt) and start the background loop; raises a
        ClientError saying why not."""
        if self.closed:
            raise ConnectionLostError("the client is closed")
        await self._connect_once()
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._run())
        self._wake()

    async def _drop(self) -> None:
        writer, self._writer, self._reader = self._writer, None, None
        if writer is not None:
            writer.close()
            try:
                await asyncio.wait_for(writer.wait_closed(), 1)
            except (OSError, asyncio.TimeoutError, ssl.SSLError):
                pass

    async def _write(self, data: bytes) -> None:
        if data and self._writer is not None:
            self._writer.write(data)
            await self._writer.drain()

    async def _read_once(self) -> None:
        """Wait for bytes, the session timer or a wake-up; feed the core."""
        timer = self.core.next_timer()
        now = clock_module.monotonic_ms()
        timeout = None if timer is None else max(0, timer - now) / 1000
        read = asyncio.ensure_future(self._reader.read(RECV_SIZE))
        woken = asyncio.ensure_future(self._wakeup.wait())
        done, _ = await asyncio.wait({read, woken}, timeout=timeout,
                                     return_when=asyncio.FIRST_COMPLETED)
        woken.cancel()
        self._wakeup.clear()
        if read in done:
            try:
                data = read.result()
            except (OSError, ConnectionError, ssl.SSLError):
                data = b""
            self.core.receive(data, clock_module.monotonic_ms())
        else:
            read.cancel()
            try:
                # A cancelled StreamReader.read keeps its buffered bytes for the next read.
                await read
            except (asyncio.CancelledError, OSError, ConnectionError, ssl.SSLError):
                pass
        self.core.handle_timer(clock_module.monotonic_ms())

    def _wake(self) -> None:
        self._wakeup.set()

    # -- the background loop ---------------------------------------------------------------

    async def _run(self) -> None:
        while not self.closed:
            if self._writer is None:
                try:
                    await self._connect_once()
                except FATAL_ERRORS as error:
                    self._fatal = error
                    self._progress.set()
                    return
                except ClientError as error:
                    self.last_error = error
                    delay = self.backoff.next_delay(error.retry_after_ms)
                    await asyncio.sleep(delay / 1000)
                    continue
            try:
                await self._write(self.core.data_to_send(clock_module.monotonic_ms()))
                await self._read_once()
                await self._write(self.core.data_to_send(clock_module.monotonic_ms()))
            except (OSError, ConnectionError, ssl.SSLError) as error:
                self.core.link_lost(clock_module.monotonic_ms())
                if self.core.close_event is None:
                    self.last_error = ConnectionLostError(str(error))
            self._progress.set()
            if self.core.close_event is not None:
                error = error_for_close(self.core.close_event)
                self.last_error = error
                await self._drop()
                if isinstance(error, FATAL_ERRORS):
                    self._fatal = error
                    return
                delay = self.backoff.next_delay(error.retry_after_ms)
                await asyncio.sleep(delay / 1000)

    # -- the user's API --------------------------------------------------------------------

    async def publish(self, stream: str, value: Any, ts_ms: Optional[int] = None) -> int:
        """Store a reading on flash; return its queue sequence number. Sent in the background."""
        now = clock_module.monotonic_ms()
        if ts_ms is None:
            ts_ms = self.core.wall.from_monotonic(now)
        seq = self.queue.append(stream, value, ts_ms, now)
        self._wake()
        return seq

    async def report_state(self, state: dict) -> int:
        """Report the device's state; returns its msg_id."""
        msg_id = self.core.report_state(state)
        self._wake()
        return msg_id

    async def flush(self, timeout_ms: int = 10000) -> bool:
        """Wait until every queued reading and the state are acknowledged (True) or the time
        is up (False). Raises the fatal error that stopped the loop, if one did."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_ms / 1000
        while not self.core.idle:
            if self._fatal is not None:
                raise self._fatal
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            self._progress.clear()
            self._wake()
            try:
                await asyncio.wait_for(self._progress.wait(), min(remaining, 0.05))
            except asyncio.TimeoutError:
                pass
        return True

    async def run_forever(self) -> None:
        """Run until closed; raises the fatal error (bad credentials, CA mismatch, ...) that
        ends the loop."""
        if self._task is None:
            self._task = asyncio.ensure_future(self._run())
        await self._task
        if self._fatal is not None:
            raise self._fatal

    async def close(self) -> None:
        """Say goodbye, stop the loop, close the link and the queue file."""
        if self.closed:
            return
        self.closed = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        if self._writer is not None:
            try:
                await self._write(self.core.close(r.CLOSE_NORMAL, "device closing",
                                                  clock_module.monotonic_ms()))
            except (OSError, ConnectionError, ssl.SSLError):
                pass
        await self._drop()
        self.queue.close()

    async def __aenter__(self) -> "AsyncClient":
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()
