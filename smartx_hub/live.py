"""The registry of live device sessions, shared by the device listener and the API.

Invariants:
- At most one live session per device id: registering a newer one returns the older,
  which the caller closes with ``CLOSE_REPLACED``.
- Every method may be called from any thread. Calls into a session handle are handed
  to the event loop that owns it, so a session is only ever touched by its own loop.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Optional, Protocol


class SessionHandle(Protocol):
    """What the listener exposes of one live session."""

    device_id: str
    loop: asyncio.AbstractEventLoop

    def close(self, reason: int, detail: str) -> None:
        """Send Close with the reason and end the session (runs on ``loop``)."""

    def wake(self) -> None:
        """Look again for queued commands and desired-state changes (runs on ``loop``)."""


class LiveSessions:
    """Thread-safe map from device id to its one live session."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sessions: dict[str, SessionHandle] = {}
        self._wakes = 0

    def register(self, handle: SessionHandle) -> Optional[SessionHandle]:
        """Make ``handle`` the device's live session; return the session it replaces."""
        with self._lock:
            older = self._sessions.get(handle.device_id)
            self._sessions[handle.device_id] = handle
        return older

    def unregister(self, handle: SessionHandle) -> None:
        """Forget ``handle`` if it is still the device's live session."""
        with self._lock:
            if self._sessions.get(handle.device_id) is handle:
                del self._sessions[handle.device_id]

    def is_online(self, device_id: str) -> bool:
        """Whether the device has a verified live session now."""
        with self._lock:
            return device_id in self._sessions

    def online_ids(self) -> set[str]:
        """The ids of every device online now."""
        with self._lock:
            return set(self._sessions)

    def count(self) -> int:
        """How many sessions are live."""
        with self._lock:
            return len(self._sessions)

    def kick(self, device_id: str, reason: int, detail: str) -> bool:
        """Close the device's live session with ``reason``; False if it had none."""
        handle = self._get(device_id)
        if handle is None:
            return False
        _call_on_loop(handle.loop, handle.close, reason, detail)
        return True

    def wake(self, device_id: str) -> bool:
        """Tell the device's live session that commands or desired state are waiting; False if
        it has none. Counted either way (``wakes``)."""
        with self._lock:
            self._wakes += 1
            handle = self._sessions.get(device_id)
        if handle is None:
            return False
        _call_on_loop(handle.loop, handle.wake)
        return True

    def wakes(self) -> int:
        """How many times ``wake`` has been called, for any device, with or without a session.

        A session that looks for its pending work before it is registered reads this before
        looking and again once registered: a change means a wake may have found no session to
        tell, so it looks once more."""
        with self._lock:
            return self._wakes

    def all_handles(self) -> list[SessionHandle]:
        """A snapshot of every live session (for shutdown)."""
        with self._lock:
            return list(self._sessions.values())

    def _get(self, device_id: str) -> Optional[SessionHandle]:
        with self._lock:
            return self._sessions.get(device_id)


def _call_on_loop(loop: asyncio.AbstractEventLoop, fn, *args) -> None:
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        fn(*args)
    else:
        loop.call_soon_threadsafe(fn, *args)
