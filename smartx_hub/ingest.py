"""The telemetry committer: batches from every session, committed together, acked after.

Rules (docs/operations.md, "Telemetry path"):
- A session hands each Telemetry message to ``submit`` and sends its Ack only when the returned
  future resolves: the hub never acknowledges what is not committed.
- Group commit: batches that arrive while a commit runs go into the next one, which starts as
  soon as the running one ends. One commit takes at most ``max_batches``. SQLite pays one fsync
  per transaction, so this is what turns thousands of small messages into a few transactions.
- An idle committer waits ``max_delay_ms`` for company, unless a commit ended less than
  ``max_delay_ms`` ago: then the devices it acknowledged are answering, and a device with a
  full window of batches waits for every commit, so the delay would be added to each of its
  round trips (a third of one device's rate, measured: docs/performance.md). It commits then
  as soon as the batches read in the same turn of the loop are in.
- One writer thread: commits never overlap, so batches are committed in the order submitted.
- If a commit of several batches fails, each is retried alone so one bad batch (a device
  removed a moment ago, say) fails only its own future.
- The future's result is the store's answer: True for a new batch, False for a repeated
  ``(device_id, msg_id)`` (stored once, acknowledged again).
- ``flush`` commits everything submitted so far and returns when it is committed (shutdown).
Runs on one asyncio loop; only ``store.add_telemetry`` runs in the writer thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from typing import Optional

from smartx_hub.store import Store, TelemetryBatch

log = logging.getLogger(__name__)


class IngestCommitter:
    """Collects telemetry batches on the loop and commits them in groups on a writer thread."""

    def __init__(self, store: Store, executor: concurrent.futures.Executor,
                 max_batches: int = 1000, max_delay_ms: int = 2) -> None:
        self._store = store
        self._executor = executor
        self.max_batches = max(1, max_batches)
        self.max_delay_s = max(0, max_delay_ms) / 1000.0
        self._pending: list[tuple[TelemetryBatch, asyncio.Future]] = []
        self._timer: Optional[asyncio.Handle] = None
        self._running: Optional[asyncio.Future] = None
        self._idle = asyncio.Event()
        self._idle.set()
        self._last_end = float("-inf")  # loop time the last commit ended
        self.committed_batches = 0
        self.commits = 0

    def submit(self, batch: TelemetryBatch) -> asyncio.Future:
        """Queue ``batch``; the future resolves to True (new) or False (repeat) once committed."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending.append((batch, future))
        self._idle.clear()
        if self._running is None:
            if len(self._pending) >= self.max_batches or self.max_delay_s == 0:
                self._start(loop)
            elif self._timer is None:
                if loop.time() - self._last_end < self.max_delay_s:
                    # Busy (see the rules): go once this turn's batches are submitted.
                    self._timer = loop.call_soon(self._start, loop)
                else:
                    self._timer = loop.call_later(self.max_delay_s, self._start, loop)
        return future

    @property
    def pending(self) -> int:
        """Batches submitted and not yet committed."""
        return len(self._pending)

    async def flush(self) -> None:
        """Commit everything submitted so far; return once it is committed (or failed)."""
        if self._pending and self._running is None:
            self._start(asyncio.get_running_loop())
        await self._idle.wait()

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._running is not None or not self._pending:
            return
        group = self._pending[:self.max_batches]
        del self._pending[:self.max_batches]
        self._running = loop.run_in_executor(self._executor, self._commit, group)
        self._running.add_done_callback(lambda done: self._finished(loop, group, done))

    def _commit(self, group: list) -> list:
        """Writer thread: commit the group; on failure, each batch alone. Returns outcomes."""
        batches = [batch for batch, _ in group]
        try:
            outcomes = list(self._store.add_telemetry(batches))
            if len(outcomes) != len(batches):  # a store bug must not leave a future hanging
                raise RuntimeError("the store answered %d of %d batches"
                                   % (len(outcomes), len(batches)))
            return outcomes
        except Exception as exc:  # noqa: BLE001 - each batch gets its own verdict below
            if len(batches) == 1:
                return [exc]
            log.warning("a telemetry commit of %d batches failed (%s); retrying one by one",
                        len(batches), type(exc).__name__)
        outcomes: list = []
        for batch in batches:
            try:
                outcomes.append(bool(list(self._store.add_telemetry([batch]))[0]))
            except Exception as exc:  # noqa: BLE001 - reported on that batch's future
                outcomes.append(exc)
        return outcomes

    def _finished(self, loop: asyncio.AbstractEventLoop, group: list,
                  done: asyncio.Future) -> None:
        self._running = None
        self._last_end = loop.time()
        try:
            outcomes = done.result()
        except BaseException as exc:  # the executor itself failed (shut down, say)
            outcomes = [exc] * len(group)
        self.commits += 1
        for (_, future), outcome in zip(group, outcomes):
            if future.done():
                continue
            if isinstance(outcome, BaseException):
                future.set_exception(outcome)
                future.exception()  # retrieved: a session that went away must not warn
            else:
                future.set_result(bool(outcome))
                self.committed_batches += 1
        if self._pending:
            # Batches that came in during this commit have waited long enough: go now.
            self._start(loop)
        else:
            self._idle.set()
