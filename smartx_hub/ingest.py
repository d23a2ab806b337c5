"""The telemetry committer: batches from every session, committed together, acked after.

Rules (docs/operations.md, "Telemetry path"):
- A session hands each Telemetry message to ``submit`` and sends its Ack only when it hears of
  the commit: the hub never acknowledges what is not committed.
- What it hears: with a ``callback``, ``callback(batch, outcome)`` on the loop; without one, a
  future. The callbacks of one commit run in one turn of the loop, in the order submitted, and
  then ``after_commit()`` once: the listener writes the Acks that commit released there, in
  that same turn. No future per batch, no extra loop turns between the commit and the Acks
  (at one reading a message they were a good part of the loop's work: docs/performance.md).
- Group commit: batches that arrive while a commit runs go into the next one, which starts as
  soon as the running one ends, before its callbacks run (the writer commits while the loop
  writes Acks). One commit takes at most ``max_batches``. SQLite pays one fsync per
  transaction, so this is what turns thousands of small messages into a few transactions.
- An idle committer waits ``max_delay_ms`` for company, unless a commit ended less than
  ``max_delay_ms`` ago: then the devices it acknowledged are answering, and a device with a
  full window of batches waits for every commit, so the delay would be added to each of its
  round trips (a third of one device's rate, measured: docs/performance.md). It commits then
  as soon as the batches read in the same turn of the loop are in.
- One writer thread: commits never overlap, so batches are committed in the order submitted.
  The writer reports back with one ``call_soon_threadsafe``, not through a chained future.
- If a commit of several batches fails, each is retried alone so one bad batch (a device
  removed a moment ago, say) fails only its own future or callback.
- The outcome is the store's answer: True for a new batch, False for a repeated
  ``(device_id, msg_id)`` (stored once, acknowledged again); or the exception that failed it.
- ``flush`` commits everything submitted so far and returns when it is committed (shutdown).
Runs on one asyncio loop; only ``store.add_telemetry`` runs in the writer thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from typing import Any, Callable, Optional

from smartx_hub.store import Store, TelemetryBatch

log = logging.getLogger(__name__)

#: ``callback(batch, outcome)``: outcome True (new), False (repeat) or the exception.
CommitCallback = Callable[[TelemetryBatch, Any], None]


class IngestCommitter:
    """Collects telemetry batches on the loop and commits them in groups on a writer thread."""

    def __init__(self, store: Store, executor: concurrent.futures.Executor,
                 max_batches: int = 1000, max_delay_ms: int = 2,
                 after_commit: Optional[Callable[[], None]] = None) -> None:
        self._store = store
        self._executor = executor
        self.max_batches = max(1, max_batches)
        self.max_delay_s = max(0, max_delay_ms) / 1000.0
        self._after_commit = after_commit
        # (batch, callback or future), in the order submitted.
        self._pending: list[tuple[TelemetryBatch, Any]] = []
        self._timer: Optional[asyncio.Handle] = None
        self._running = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._last_end = float("-inf")  # loop time the last commit ended
        self.committed_batches = 0
        self.commits = 0

    def submit(self, batch: TelemetryBatch,
               callback: Optional[CommitCallback] = None) -> Optional[asyncio.Future]:
        """Queue ``batch``. Once committed (or failed), call ``callback(batch, outcome)`` on the
        loop; without a callback, return a future resolving to the outcome (True new, False
        repeat) or failing with the store's exception."""
        loop = asyncio.get_running_loop()
        future = None
        if callback is None:
            future = loop.create_future()
        self._pending.append((batch, callback or future))
        self._idle.clear()
        if not self._running:
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
        if self._pending and not self._running:
            self._start(asyncio.get_running_loop())
        await self._idle.wait()

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._running or not self._pending:
            return
        group = self._pending[:self.max_batches]
        del self._pending[:self.max_batches]
        self._running = True
        try:
            self._executor.submit(self._commit_and_report, loop, group)
        except RuntimeError as exc:  # the executor is shut down: fail the group, later
            loop.call_soon(self._finished, loop, group, [exc] * len(group))

    def _commit_and_report(self, loop: asyncio.AbstractEventLoop, group: list) -> None:
        """Writer thread: commit ``group``, then hand the outcomes to the loop."""
        try:
            outcomes = self._commit(group)
        except BaseException as exc:  # noqa: BLE001 - reported on every batch, never lost
            outcomes = [exc] * len(group)
        try:
            loop.call_soon_threadsafe(self._finished, loop, group, outcomes)
        except RuntimeError:
            pass  # the loop is closed: nobody waits for these any more

    def _commit(self, group: list) -> list:
        """Writer thread: commit the group; on failure, each batch alone. Returns outcomes."""
        batches = [batch for batch, _ in group]
        try:
            outcomes = list(self._store.add_telemetry(batches))
            if len(outcomes) != len(batches):  # a store bug must not leave a batch unanswered
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
            except Exception as exc:  # noqa: BLE001 - reported on that batch alone
                outcomes.append(exc)
        return outcomes

    def _finished(self, loop: asyncio.AbstractEventLoop, group: list, outcomes: list) -> None:
        self._running = False
        self._last_end = loop.time()
        self.commits += 1
        if self._pending:
            # Batches that came in during this commit have waited long enough: go now, so
            # that the writer works on them while this commit's callbacks and Acks run here.
            self._start(loop)
        for (batch, target), outcome in zip(group, outcomes):
            failed = isinstance(outcome, BaseException)
            if not failed:
                outcome = bool(outcome)
                self.committed_batches += 1
            if isinstance(target, asyncio.Future):
                if target.done():
                    continue
                if failed:
                    target.set_exception(outcome)
                    target.exception()  # retrieved: a caller that went away must not warn
                else:
                    target.set_result(outcome)
                continue
            try:
                target(batch, outcome)
            except Exception:  # noqa: BLE001 - one session's bug must not cost the others
                log.exception("a telemetry commit callback failed")
        if self._after_commit is not None:
            try:
                self._after_commit()
            except Exception:  # noqa: BLE001
                log.exception("the after-commit hook failed")
        if not self._running and not self._pending:
            self._idle.set()
