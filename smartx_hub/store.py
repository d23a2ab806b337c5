"""The hub's store interface: every persistent fact of the hub goes through ``Store``.

Rules:
- No SQL outside a store implementation. ``SQLiteStore`` (smartx_hub/sqlite_store.py) is the
  embedded default; a server database implements the same class later.
- Secrets, telemetry values, command arguments and results, and device state are sealed
  (AES-256-GCM, see smartx_hub/crypto.py) by the implementation before they reach the
  database and opened on the way out: callers see plaintext records, the file never does.
- Times are integer milliseconds since the Unix epoch, passed in by the caller (``now_ms``):
  the store reads no clock, so tests control time.
- A method that names a missing record raises ``NotFoundError``; a uniqueness clash raises
  ``ConflictError``. Both derive from ``StoreError``.
- Gateways (docs/security.md, "Gateways"): a device record of kind ``"gateway"`` relays for
  the boards whose ``gateway_id`` names it. Only a gateway can be named there, a gateway itself
  has none, and a gateway that still has boards cannot be removed (``ConflictError``).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence


class StoreError(Exception):
    """Base of the store's errors."""


class NotFoundError(StoreError):
    """The named record does not exist."""


class ConflictError(StoreError):
    """The record clashes with an existing one (a taken name, say)."""


DEVICE_KINDS = ("device", "gateway")


@dataclass
class Device:
    """An enrolled device. ``secret`` is the opened HS256 secret (None for key-based auth).

    ``kind`` is "device" (a board) or "gateway" (relays for boards); ``gateway_id`` is the
    gateway a board is assigned to (None: the board connects directly)."""

    id: str
    name: str
    auth: str  # "es256" | "eddsa" | "hs256"
    public_key_pem: Optional[bytes]
    secret: Optional[bytes]
    enabled: bool
    created_ms: int
    last_seen_ms: Optional[int] = None
    kind: str = "device"
    gateway_id: Optional[str] = None


@dataclass
class Reading:
    """One stored reading of a device's stream."""

    device_id: str
    msg_id: int
    stream: str
    ts_ms: int
    value: Any
    received_ms: int
    seq: int = 0  # store-assigned, increasing; the pagination cursor


@dataclass
class TelemetryBatch:
    """A device's telemetry message as the hub received it: committed as one unit."""

    device_id: str
    msg_id: int
    readings: Sequence[tuple]  # (stream, ts_ms, value)
    received_ms: int


@dataclass
class Command:
    """A command queued for a device, and what became of it."""

    id: str
    device_id: str
    name: str
    args: Any
    status: str  # "queued" | "delivered" | "succeeded" | "failed" | "expired"
    created_ms: int
    expires_ms: int
    delivered_ms: Optional[int] = None
    completed_ms: Optional[int] = None
    result: Any = None
    error: Optional[str] = None


@dataclass
class DeviceState:
    """Desired state (set by users) and reported state (sent by the device)."""

    device_id: str
    desired: dict = field(default_factory=dict)
    desired_version: int = 0
    desired_ms: Optional[int] = None
    reported: dict = field(default_factory=dict)
    reported_ms: Optional[int] = None


@dataclass
class TokenRecord:
    """What the hub keeps of an API token: never the token itself, only its hash and a hint."""

    id: str  # the JWT's jti
    user_id: str
    name: str
    token_hash: str  # hex SHA-256 of the whole token string
    hint: str  # the last few characters, to recognise it in a list
    scopes: list  # ["telemetry:read", ...]
    devices: Optional[list]  # None: every device
    created_ms: int
    expires_ms: int
    last_used_ms: Optional[int] = None
    revoked_ms: Optional[int] = None


@dataclass
class User:
    """A dashboard account."""

    id: str
    username: str
    password_hash: str
    created_ms: int
    tokens_valid_after_ms: int = 0  # "revoke all": tokens issued before this are dead


@dataclass
class AuditEntry:
    """One line of the audit log."""

    id: int
    ts_ms: int
    action: str
    actor: str
    source: str
    detail: dict


class Store(abc.ABC):
    """Everything the hub persists. Implementations must be safe to call from several threads."""

    # -- lifecycle and metadata -------------------------------------------------
    @abc.abstractmethod
    def close(self) -> None: ...

    @abc.abstractmethod
    def get_meta(self, key: str) -> Optional[str]: ...

    @abc.abstractmethod
    def set_meta(self, key: str, value: str) -> None: ...

    # -- devices ----------------------------------------------------------------
    @abc.abstractmethod
    def add_device(self, name: str, auth: str, public_key_pem: Optional[bytes],
                   secret: Optional[bytes], now_ms: int, kind: str = "device",
                   gateway_id: Optional[str] = None) -> Device:
        """Enrol a device of ``kind``, assigned to ``gateway_id`` (a board only)."""

    @abc.abstractmethod
    def get_device(self, device_id: str) -> Optional[Device]: ...

    @abc.abstractmethod
    def list_devices(self) -> list[Device]: ...

    @abc.abstractmethod
    def set_device_enabled(self, device_id: str, enabled: bool) -> None: ...

    @abc.abstractmethod
    def remove_device(self, device_id: str) -> None: ...

    @abc.abstractmethod
    def set_device_gateway(self, device_id: str, gateway_id: Optional[str]) -> None:
        """Assign a board to a gateway (None: the board connects directly)."""

    @abc.abstractmethod
    def touch_device(self, device_id: str, last_seen_ms: int) -> None: ...

    @abc.abstractmethod
    def touch_devices(self, last_seen: dict[str, int]) -> None:
        """Record many last-seen times in one transaction: unknown ids are skipped, and a
        device's ``last_seen_ms`` never moves backwards."""

    # -- telemetry --------------------------------------------------------------
    @abc.abstractmethod
    def add_telemetry(self, batches: Sequence[TelemetryBatch]) -> list[bool]:
        """Commit every batch in one transaction; True for a new batch, False for a repeated
        (device_id, msg_id), which stores nothing. Returns only after the commit."""

    @abc.abstractmethod
    def query_telemetry(self, device_id: str, since_ms: Optional[int] = None,
                        until_ms: Optional[int] = None, stream: Optional[str] = None,
                        limit: int = 100, before_seq: Optional[int] = None) -> list[Reading]:
        """Readings newest first (by ts_ms, then seq); ``before_seq`` continues a page."""

    # -- commands ---------------------------------------------------------------
    @abc.abstractmethod
    def add_command(self, device_id: str, name: str, args: Any, ttl_ms: int,
                    now_ms: int) -> Command: ...

    @abc.abstractmethod
    def get_command(self, command_id: str) -> Optional[Command]: ...

    @abc.abstractmethod
    def list_commands(self, device_id: str, limit: int = 100) -> list[Command]: ...

    @abc.abstractmethod
    def pending_commands(self, device_id: str, now_ms: int) -> list[Command]:
        """Queued (not yet delivered) commands still alive at now_ms, oldest first;
        marks those past their expiry as "expired"."""

    @abc.abstractmethod
    def mark_command_delivered(self, command_id: str, now_ms: int) -> None: ...

    @abc.abstractmethod
    def set_command_result(self, command_id: str, ok: bool, result: Any,
                           error: Optional[str], now_ms: int) -> None: ...

    # -- device state -----------------------------------------------------------
    @abc.abstractmethod
    def get_state(self, device_id: str) -> DeviceState: ...

    @abc.abstractmethod
    def set_desired_state(self, device_id: str, desired: dict, now_ms: int) -> DeviceState:
        """Replace the desired state and bump its version."""

    @abc.abstractmethod
    def set_reported_state(self, device_id: str, reported: dict, now_ms: int) -> None: ...

    # -- users ------------------------------------------------------------------
    @abc.abstractmethod
    def add_user(self, username: str, password_hash: str, now_ms: int) -> User: ...

    @abc.abstractmethod
    def get_user(self, user_id: str) -> Optional[User]: ...

    @abc.abstractmethod
    def get_user_by_name(self, username: str) -> Optional[User]: ...

    @abc.abstractmethod
    def list_users(self) -> list[User]: ...

    @abc.abstractmethod
    def set_user_password(self, user_id: str, password_hash: str) -> None: ...

    @abc.abstractmethod
    def set_tokens_valid_after(self, user_id: str, now_ms: int) -> None: ...

    # -- API tokens -------------------------------------------------------------
    @abc.abstractmethod
    def add_token(self, record: TokenRecord) -> None: ...

    @abc.abstractmethod
    def get_token(self, token_id: str) -> Optional[TokenRecord]: ...

    @abc.abstractmethod
    def list_tokens(self, user_id: Optional[str] = None) -> list[TokenRecord]: ...

    @abc.abstractmethod
    def revoke_token(self, token_id: str, now_ms: int) -> None: ...

    @abc.abstractmethod
    def revoke_all_tokens(self, user_id: str, now_ms: int) -> int:
        """Revoke every live token of the user; returns how many."""

    @abc.abstractmethod
    def touch_token(self, token_id: str, now_ms: int) -> None: ...

    # -- audit ------------------------------------------------------------------
    @abc.abstractmethod
    def add_audit(self, action: str, actor: str, source: str, detail: dict,
                  now_ms: int) -> None: ...

    @abc.abstractmethod
    def list_audit(self, limit: int = 100, before_id: Optional[int] = None) -> list[AuditEntry]: ...

    # -- keys -------------------------------------------------------------------
    @abc.abstractmethod
    def rotate_master_key(self, new_master_key: bytes) -> None:
        """Rewrap every data key under the new master key, in one transaction."""
