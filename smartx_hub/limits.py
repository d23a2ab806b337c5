"""Flood limits of the device port: token buckets, connection caps, auth-failure back-off.

Rules (docs/operations.md, "Flood limits"):
- Pure: nothing here reads a clock, sleeps, or does I/O. Every call that depends on time takes
  ``now_ms``; the listener passes its clock in, tests pass numbers.
- Not thread-safe on purpose: the device listener calls all of it from its one event loop.
- Every limit is a field of ``ListenerLimits`` with a documented default; the hub reads
  overrides from the ``"device_limits"`` object of ``DATA/hub.json`` and from ``serve`` flags.
- Memory is bounded: per-IP records exist only while an address has connections, a draining
  rate bucket or remembered failures, and ``ConnectionGate.prune`` forgets the rest.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from smartx_device.framing import DEFAULT_MAX_FRAME_SIZE, MAX_FRAME_SIZE_LIMIT


class LimitsConfigError(ValueError):
    """A limits setting is unknown or has a value of the wrong kind or range."""


@dataclass(frozen=True)
class ListenerLimits:
    """Every flood limit of the device port, with its default (times in milliseconds)."""

    #: TCP connections held at once, verified or not.
    max_connections: int = 20000
    #: Connections held at once from one IP address (a gateway's boards share one).
    max_connections_per_ip: int = 1000
    #: Connections not yet verified (TLS or device handshake in progress), in total and per IP:
    #: what a half-open or slow-handshake flood can occupy.
    max_unverified: int = 1024
    max_unverified_per_ip: int = 64
    #: New connections per second from one IP (token bucket: sustained rate, burst).
    connection_rate_per_ip: float = 50.0
    connection_burst_per_ip: int = 200
    #: From TCP accept to a finished TLS handshake.
    tls_handshake_timeout_ms: int = 10000
    #: From the finished TLS handshake to the device's first complete frame (its Hello).
    first_frame_timeout_ms: int = 5000
    #: From the finished TLS handshake to Accepted (the protocol core's handshake deadline).
    auth_timeout_ms: int = 15000
    #: Sent in Accepted: the device pings at this interval; the hub cuts a session it has heard
    #: nothing from for two intervals (the core's IDLE_INTERVALS), which is the idle timeout.
    keepalive_ms: int = 30000
    #: Largest frame payload accepted from a device (checked from the frame header).
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
    #: Frames per second from one device (token bucket); past it the session is closed with
    #: CLOSE_RATE_LIMITED and a retry-after.
    message_rate: float = 100.0
    message_burst: int = 400
    #: Auth failures from one IP before it is backed off; each further failure doubles the
    #: back-off from ``auth_backoff_base_ms`` up to ``auth_backoff_max_ms``. Failures are forgotten
    #: after ``auth_failure_forget_ms`` without one.
    auth_failures_before_backoff: int = 5
    auth_backoff_base_ms: int = 1000
    auth_backoff_max_ms: int = 300000
    auth_failure_forget_ms: int = 600000
    #: Bytes queued to a device that does not read before the hub drops it.
    max_write_buffer: int = 262144
    #: Telemetry batches of one session waiting for their commit before the hub stops reading
    #: from that device (back-pressure, not an error).
    max_inflight_batches: int = 64
    #: How often a connected device's ``last_seen`` is written to the store.
    touch_interval_ms: int = 60000
    #: Ingest committer: a commit takes at most this many batches, and waits at most this long
    #: for company when the store is idle.
    ingest_max_batches: int = 1000
    ingest_max_delay_ms: int = 2
    #: How often the hub looks for devices disabled or removed by another process.
    devices_poll_ms: int = 500

    @classmethod
    def from_mapping(cls, mapping: Optional[Mapping[str, Any]],
                     base: Optional["ListenerLimits"] = None) -> "ListenerLimits":
        """``base`` (or the defaults) with the settings in ``mapping`` applied, checked."""
        base = base or cls()
        if not mapping:
            return base
        if not isinstance(mapping, Mapping):
            raise LimitsConfigError("device_limits must be an object")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        changes = {}
        for name, value in mapping.items():
            field = fields.get(name)
            if field is None:
                raise LimitsConfigError("unknown device limit %r" % (name,))
            changes[name] = _check_value(name, field.type, value)
        limits = dataclasses.replace(base, **changes)
        limits.check()
        return limits

    def check(self) -> None:
        """Raise ``LimitsConfigError`` if the settings contradict each other."""
        if not 1 <= self.max_frame_size <= MAX_FRAME_SIZE_LIMIT:
            raise LimitsConfigError("max_frame_size must be 1..%d" % MAX_FRAME_SIZE_LIMIT)
        if self.keepalive_ms < 1000:
            raise LimitsConfigError("keepalive_ms must be at least 1000")
        if self.auth_backoff_max_ms < self.auth_backoff_base_ms:
            raise LimitsConfigError("auth_backoff_max_ms must be >= auth_backoff_base_ms")
        if self.message_burst < 1 or self.connection_burst_per_ip < 1:
            raise LimitsConfigError("bursts must be at least 1")


def _check_value(name: str, kind: Any, value: Any) -> Any:
    kind = kind if isinstance(kind, str) else getattr(kind, "__name__", str(kind))
    if isinstance(value, bool):
        raise LimitsConfigError("device limit %s must be a number" % name)
    if kind == "int":
        if not isinstance(value, int) or value < 0:
            raise LimitsConfigError("device limit %s must be a whole number >= 0" % name)
        return value
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise LimitsConfigError("device limit %s must be a number > 0" % name)
    return float(value)


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up; starts full."""

    __slots__ = ("_per_ms", "burst", "tokens", "updated_ms")

    def __init__(self, rate: float, burst: int, now_ms: int) -> None:
        self._per_ms = rate / 1000.0
        self.burst = float(burst)
        self.tokens = float(burst)
        self.updated_ms = now_ms

    def _refill(self, now_ms: int) -> None:
        elapsed = now_ms - self.updated_ms
        if elapsed > 0:
            self.tokens = min(self.burst, self.tokens + elapsed * self._per_ms)
            self.updated_ms = now_ms

    def take(self, now_ms: int, count: int = 1) -> int:
        """Spend ``count`` tokens: 0 if allowed; else nothing is spent and the result is the
        milliseconds until ``count`` tokens (at most a full burst) will be there."""
        self._refill(now_ms)
        if self.tokens >= count:
            self.tokens -= count
            return 0
        needed = min(float(count), self.burst) - self.tokens
        return max(1, math.ceil(needed / self._per_ms))

    def is_full(self, now_ms: int) -> bool:
        """Whether the bucket has refilled completely (so forgetting it changes nothing)."""
        self._refill(now_ms)
        return self.tokens >= self.burst


class _Address:
    """What the gate knows of one IP address."""

    __slots__ = ("connections", "unverified", "bucket", "failures", "last_failure_ms",
                 "blocked_until_ms")

    def __init__(self, limits: ListenerLimits, now_ms: int) -> None:
        self.connections = 0
        self.unverified = 0
        self.bucket = TokenBucket(limits.connection_rate_per_ip, limits.connection_burst_per_ip,
                                  now_ms)
        self.failures = 0
        self.last_failure_ms = 0
        self.blocked_until_ms = 0


# Why ``admit`` refused a connection (log and metrics labels).
REFUSED_TOTAL = "max_connections"
REFUSED_PER_IP = "max_connections_per_ip"
REFUSED_UNVERIFIED = "max_unverified"
REFUSED_UNVERIFIED_PER_IP = "max_unverified_per_ip"
REFUSED_RATE = "connection_rate_per_ip"
REFUSED_BACKOFF = "auth_backoff"


class ConnectionGate:
    """Admission control per IP: caps, connection rate, and auth-failure back-off.

    Lifecycle of one connection: ``admit`` (counts it as unverified), then ``verified`` once
    the device is accepted, and ``release`` when it ends (saying whether it was verified).
    """

    def __init__(self, limits: ListenerLimits) -> None:
        self.limits = limits
        self._addresses: dict[str, _Address] = {}
        self.connections = 0
        self.unverified = 0

    def admit(self, ip: str, now_ms: int) -> Optional[str]:
        """Count a new connection from ``ip``; or return why it is refused (nothing counted)."""
        limits = self.limits
        address = self._addresses.get(ip)
        if address is None:
            address = self._addresses[ip] = _Address(limits, now_ms)
        if address.blocked_until_ms > now_ms:
            return REFUSED_BACKOFF
        if self.connections >= limits.max_connections:
            return REFUSED_TOTAL
        if address.connections >= limits.max_connections_per_ip:
            return REFUSED_PER_IP
        if self.unverified >= limits.max_unverified:
            return REFUSED_UNVERIFIED
        if address.unverified >= limits.max_unverified_per_ip:
            return REFUSED_UNVERIFIED_PER_IP
        if address.bucket.take(now_ms):
            return REFUSED_RATE
        address.connections += 1
        address.unverified += 1
        self.connections += 1
        self.unverified += 1
        return None

    def verified(self, ip: str) -> None:
        """An admitted connection from ``ip`` is now a verified session."""
        address = self._addresses.get(ip)
        if address is not None and address.unverified > 0:
            address.unverified -= 1
            self.unverified -= 1

    def release(self, ip: str, was_verified: bool) -> None:
        """An admitted connection from ``ip`` ended."""
        address = self._addresses.get(ip)
        if address is None or address.connections <= 0:
            return
        address.connections -= 1
        self.connections -= 1
        if not was_verified and address.unverified > 0:
            address.unverified -= 1
            self.unverified -= 1

    def auth_failed(self, ip: str, now_ms: int) -> int:
        """Count an auth failure from ``ip``; return the back-off it starts (0: none yet)."""
        limits = self.limits
        address = self._addresses.get(ip)
        if address is None:
            address = self._addresses[ip] = _Address(limits, now_ms)
        if address.failures and now_ms - address.last_failure_ms >= limits.auth_failure_forget_ms:
            address.failures = 0
        address.failures += 1
        address.last_failure_ms = now_ms
        over = address.failures - limits.auth_failures_before_backoff
        if over < 0:
            return 0
        backoff = min(limits.auth_backoff_max_ms, limits.auth_backoff_base_ms * (2 ** min(over, 40)))
        address.blocked_until_ms = now_ms + backoff
        return backoff

    def blocked_for(self, ip: str, now_ms: int) -> int:
        """Milliseconds ``ip`` stays backed off (0: not)."""
        address = self._addresses.get(ip)
        if address is None:
            return 0
        return max(0, address.blocked_until_ms - now_ms)

    def connections_from(self, ip: str) -> int:
        """Connections held now from ``ip``."""
        address = self._addresses.get(ip)
        return 0 if address is None else address.connections

    def prune(self, now_ms: int) -> int:
        """Forget addresses that hold nothing worth remembering; return how many."""
        forget_ms = self.limits.auth_failure_forget_ms
        stale = [ip for ip, address in self._addresses.items()
                 if address.connections == 0 and address.blocked_until_ms <= now_ms
                 and (address.failures == 0 or now_ms - address.last_failure_ms >= forget_ms)
                 and address.bucket.is_full(now_ms)]
        for ip in stale:
            del self._addresses[ip]
        return len(stale)

    def __len__(self) -> int:
        return len(self._addresses)


class DeviceRates:
    """One message-rate bucket per device id, kept across reconnects while it matters."""

    def __init__(self, limits: ListenerLimits) -> None:
        self.limits = limits
        self._buckets: dict[str, TokenBucket] = {}

    def take(self, device_id: str, now_ms: int, count: int = 1) -> int:
        """Spend ``count`` messages of ``device_id``'s budget: 0, or the retry-after in ms."""
        bucket = self._buckets.get(device_id)
        if bucket is None:
            bucket = self._buckets[device_id] = TokenBucket(
                self.limits.message_rate, self.limits.message_burst, now_ms)
        return bucket.take(now_ms, count)

    def prune(self, now_ms: int, online: Any = ()) -> int:
        """Forget full buckets of devices not in ``online``; return how many."""
        stale = [device_id for device_id, bucket in self._buckets.items()
                 if device_id not in online and bucket.is_full(now_ms)]
        for device_id in stale:
            del self._buckets[device_id]
        return len(stale)

    def __len__(self) -> int:
        return len(self._buckets)
