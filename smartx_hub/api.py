"""The remote API under ``/api/v1`` and the ASGI app that also serves the dashboard.

Rules (docs/api.md):
- ``create_app(ctx, live, clock)`` is the one entry point; the app carries the shield
  (smartx_hub/shield.py) as its outermost middleware, so nothing reaches a route unscanned.
- Every route authenticates (``authenticate``: a Bearer token, or the dashboard session cookie
  plus its ``X-CSRF-Token`` header), then checks one scope, then the token's device limit, then
  that the device exists: a device-limited caller learns nothing about devices outside its limit.
- Every error is ``{"error": code, "detail": text}``: our own, FastAPI's validation errors,
  Starlette's 404/405, and unexpected exceptions (500, no detail).
- Routes are plain ``def``: FastAPI runs them in worker threads, so the store's blocking SQLite
  calls never stall the event loop the device listener shares with us.
- Nothing logs or returns a token except the one answer that creates it.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import logging
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Optional, Union

from fastapi import Depends, FastAPI, Path as PathParam, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from typing_extensions import TypeAliasType

from smartx_device import messages as wire
from smartx_device.errors import ProtocolError
from smartx_device.framing import DEFAULT_MAX_FRAME_SIZE
from smartx_device.reasons import CLOSE_DEVICE_DISABLED, CLOSE_REVOKED
from smartx_hub import tokens as tokens_mod
from smartx_hub.shield import (SCOPE_KEY, Shield, ShieldMiddleware, ShieldRules, load_rules,
                               retry_after_seconds)
from smartx_hub.store import (Command, ConflictError, Device, NotFoundError, Store, StoreError,
                             TokenRecord)
from smartx_hub.tokens import Principal, TokenError, TokenKeys, TokenVerifier

log = logging.getLogger("smartx_hub.api")

Clock = Callable[[], int]
API_PREFIX = "/api/v1"
MAX_ID_CHARS = 64
MAX_INT = 2 ** 53  # JSON-safe integers; larger ones would overflow SQLite's 64-bit columns too
ScopeName = Literal[tokens_mod.SCOPES]  # type: ignore[valid-type]
# What a device can receive (smartx_device/cbor.py): JSON values whose integers fit CBOR's
# 64-bit heads. A larger integer is still a JSON number and arrives as a float.
WireInt = Annotated[int, Field(ge=-(2 ** 64), le=2 ** 64 - 1)]
WireValue = TypeAliasType("WireValue", Union[None, bool, WireInt, float, str,  # type: ignore
                                             list["WireValue"], dict[str, "WireValue"]])
ID_PATTERN = r"^[A-Za-z0-9_-]+$"  # every id the hub makes; nothing the shield's rules refuse
STREAM_PATTERN = r"^[A-Za-z0-9_.:@+-]+$"

_STATUS_CODES = {
    400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
    405: "method_not_allowed", 406: "not_acceptable", 409: "conflict",
    413: "payload_too_large", 415: "unsupported_media_type", 422: "validation_error",
    429: "rate_limited", 431: "headers_too_large",
}


def wall_clock_ms() -> int:
    """The default clock: milliseconds since the Unix epoch."""
    return int(time.time() * 1000)


class ApiError(Exception):
    """An error answer: status, machine code and human detail (and optional headers)."""

    def __init__(self, status: int, code: str, detail: str,
                 headers: Optional[dict] = None) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.headers = headers or {}


def error_response(status: int, code: str, detail: str,
                   headers: Optional[dict] = None) -> JSONResponse:
    """The JSON error document with its status."""
    return JSONResponse({"error": code, "detail": detail}, status_code=status, headers=headers)


@dataclass
class ApiContext:
    """What every route needs: the hub, its live sessions, the clock and the shield."""

    hub: Any  # smartx_hub.state.HubContext
    live: Any  # smartx_hub.live.LiveSessions
    clock: Clock
    shield: Shield
    keys: TokenKeys
    verifier: TokenVerifier
    sessions: Any  # smartx_hub.dashboard.SessionStore

    @property
    def store(self) -> Store:
        """The hub's store."""
        return self.hub.store

    def audit(self, action: str, principal: Optional[Principal], request: Optional[Request],
              detail: dict, actor: Optional[str] = None) -> None:
        """Append one line to the audit log (actor, source address, time)."""
        who = actor or (principal.actor if principal is not None else "anonymous")
        self.store.add_audit(action, who, client_ip(request) if request else "local", detail,
                             self.clock())


def client_ip(request: Request) -> str:
    """The caller's address as the server saw it (no forwarding header is trusted)."""
    client = request.client
    return client.host if client and client.host else "unknown"


# -- models: what the OpenAPI document promises -----------------------------------------------

class ErrorOut(BaseModel):
    """Every error answer."""

    error: str
    detail: str


class DeviceOut(BaseModel):
    """A device as the API shows it (never its key or secret)."""

    id: str
    name: str
    auth: str
    enabled: bool
    online: bool
    created_ms: int
    last_seen_ms: Optional[int] = None


class DeviceList(BaseModel):
    """Devices the caller may see."""

    items: list[DeviceOut]


class ReadingOut(BaseModel):
    """One reading of a device's stream."""

    stream: str
    ts_ms: int
    value: Any = None
    received_ms: int
    msg_id: int


class TelemetryPage(BaseModel):
    """A page of readings, newest first; pass ``next_cursor`` as ``cursor`` for the next."""

    device_id: str
    items: list[ReadingOut]
    next_cursor: Optional[str] = None


class CommandIn(BaseModel):
    """A command to queue for a device."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")
    args: WireValue = None
    ttl_s: int = Field(default=300, ge=1, le=7 * 86400)


class CommandOut(BaseModel):
    """A queued command and what became of it."""

    id: str
    device_id: str
    name: str
    args: Any = None
    status: str
    created_ms: int
    expires_ms: int
    delivered_ms: Optional[int] = None
    completed_ms: Optional[int] = None
    result: Any = None
    error: Optional[str] = None


class CommandList(BaseModel):
    """A device's recent commands, newest first."""

    items: list[CommandOut]


class StateOut(BaseModel):
    """A device's desired and reported state."""

    device_id: str
    desired: dict[str, Any]
    desired_version: int
    desired_ms: Optional[int] = None
    reported: dict[str, Any]
    reported_ms: Optional[int] = None


class DesiredIn(BaseModel):
    """The new desired state (replaces the old one)."""

    model_config = ConfigDict(extra="forbid")
    desired: dict[Annotated[str, Field(min_length=1, max_length=wire.MAX_NAME_LENGTH)], WireValue]


class TokenIn(BaseModel):
    """A token request: least privilege, so scopes are required; no device list = all."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(default="", max_length=tokens_mod.MAX_TOKEN_NAME_CHARS,
                      pattern=r"^[^\x00-\x1f\x7f]*$")
    scopes: list[ScopeName] = Field(min_length=1, max_length=len(tokens_mod.SCOPES))
    devices: Optional[list[Annotated[str, Field(min_length=1, max_length=MAX_ID_CHARS,
                                                pattern=ID_PATTERN)]]] = Field(
        default=None, min_length=1, max_length=tokens_mod.MAX_TOKEN_DEVICES)
    expires_in_s: Optional[int] = Field(default=None, ge=tokens_mod.MIN_EXPIRY_MS // 1000,
                                        le=tokens_mod.MAX_EXPIRY_MS // 1000)


class TokenOut(BaseModel):
    """What the hub keeps of a token: never the token."""

    id: str
    name: str
    hint: str
    scopes: list[str]
    devices: Optional[list[str]] = None
    created_ms: int
    expires_ms: int
    last_used_ms: Optional[int] = None
    revoked_ms: Optional[int] = None
    status: Literal["active", "revoked", "expired"]


class TokenCreated(TokenOut):
    """The one answer that carries the token itself: shown once, never again."""

    token: str


class TokenList(BaseModel):
    """The caller's account's tokens, newest first."""

    items: list[TokenOut]


class RevokeAllOut(BaseModel):
    """How many live tokens "revoke all" ended."""

    revoked: int


class AuditOut(BaseModel):
    """One audit line."""

    id: int
    ts_ms: int
    action: str
    actor: str
    source: str
    detail: dict[str, Any]


class AuditPage(BaseModel):
    """Audit lines, newest first; pass ``next_cursor`` as ``cursor`` for older ones."""

    items: list[AuditOut]
    next_cursor: Optional[str] = None


class HealthOut(BaseModel):
    """Liveness."""

    status: str


# -- conversions ------------------------------------------------------------------------------

def jsonable(value: Any, depth: int = 0) -> Any:
    """Turn a stored value (CBOR may hold bytes, NaN, tuples, int keys) into plain JSON."""
    if depth > 64:
        return None
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, dict):
        return {str(k): jsonable(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v, depth + 1) for v in value]
    return str(value)


def check_deliverable(message: Any, what: str) -> None:
    """422 unless the protocol core can encode ``message`` into one device frame.

    The wire (smartx_device) is the one definition of what a device can receive: its CBOR
    subset (nesting depth, integer range, key types) and its frame size."""
    try:
        size = len(wire.encode_message(message))
    except ProtocolError as exc:
        raise ApiError(422, "validation_error",
                       "%s cannot be sent to a device: %s" % (what, exc)) from None
    if size > DEFAULT_MAX_FRAME_SIZE:
        raise ApiError(422, "validation_error", "%s is too large for one device frame "
                       "(%d > %d bytes)" % (what, size, DEFAULT_MAX_FRAME_SIZE))


def device_out(device: Device, live: Any) -> DeviceOut:
    """The API view of a device."""
    return DeviceOut(id=device.id, name=device.name, auth=device.auth, enabled=device.enabled,
                     online=bool(live.is_online(device.id)), created_ms=device.created_ms,
                     last_seen_ms=device.last_seen_ms)


def command_out(command: Command) -> CommandOut:
    """The API view of a command."""
    return CommandOut(id=command.id, device_id=command.device_id, name=command.name,
                      args=jsonable(command.args), status=command.status,
                      created_ms=command.created_ms, expires_ms=command.expires_ms,
                      delivered_ms=command.delivered_ms, completed_ms=command.completed_ms,
                      result=jsonable(command.result), error=command.error)


def token_status(record: TokenRecord, now_ms: int) -> str:
    """active, revoked or expired."""
    if record.revoked_ms is not None:
        return "revoked"
    if record.expires_ms <= now_ms:
        return "expired"
    return "active"


def token_out(record: TokenRecord, now_ms: int) -> dict:
    """The API view of a token record (never the token)."""
    return dict(id=record.id, name=record.name, hint=record.hint, scopes=list(record.scopes),
                devices=None if record.devices is None else list(record.devices),
                created_ms=record.created_ms, expires_ms=record.expires_ms,
                last_used_ms=record.last_used_ms, revoked_ms=record.revoked_ms,
                status=token_status(record, now_ms))


def encode_cursor(kind: str, number: int) -> str:
    """A pagination cursor: a kind letter and the position (see ``cursor_pattern``)."""
    return "%s%d" % (kind, number)


def cursor_pattern(kind: str) -> str:
    """The exact shape of a cursor of ``kind``, as the OpenAPI document states it."""
    return r"^%s[0-9]{1,16}$" % kind


def decode_cursor(kind: str, cursor: str) -> int:
    """The position inside a cursor of ``kind``; ``ApiError`` 400 if it is not one."""
    if not re.fullmatch(cursor_pattern(kind)[1:-1], cursor or ""):
        raise ApiError(400, "invalid_cursor", "cursor is not valid here")
    return int(cursor[1:])


def _csv_cell(value: Any) -> Any:
    # A cell starting with = + - @ is a formula to a spreadsheet: quote it (CSV injection).
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


# -- authentication and scopes ----------------------------------------------------------------

def get_api(request: Request) -> ApiContext:
    """The app's ``ApiContext``."""
    return request.app.state.api


def _unauthorized(code: str, detail: str) -> ApiError:
    # RFC 6750 3.1: no error code when credentials are simply missing or unusable.
    challenge = 'Bearer realm="smartx"'
    if code != "unauthorized":
        challenge += ', error="invalid_token"'
    return ApiError(401, code, detail, {"WWW-Authenticate": challenge})


def authenticate(request: Request, api: ApiContext = Depends(get_api)) -> Principal:
    """Verify the caller: a Bearer token, else the dashboard session cookie plus CSRF header."""
    now = api.clock()
    authorization = request.headers.get("authorization")
    if authorization is not None:
        scheme, _, credential = authorization.partition(" ")
        if scheme.lower() != "bearer" or not credential.strip():
            raise _unauthorized("unauthorized", "use Authorization: Bearer <token>")
        try:
            principal = api.verifier.verify(credential.strip(), now)
        except TokenError as exc:
            log.info("API token refused from %s: %s", client_ip(request), exc.detail)
            raise _unauthorized(exc.code, exc.detail) from None
        except StoreError:
            raise _unauthorized("invalid_token", "unknown token") from None
    else:
        session = api.sessions.get(request.cookies.get("sx_session"), now)
        if session is None:
            raise _unauthorized("unauthorized", "a Bearer token or a dashboard session is required")
        if not api.sessions.csrf_ok(session, request.headers.get("x-csrf-token")):
            raise ApiError(403, "csrf_failed", "missing or wrong X-CSRF-Token header")
        user = api.store.get_user(session.user_id)
        if user is None:
            api.sessions.drop(request.cookies.get("sx_session"))
            raise _unauthorized("unauthorized", "session ended")
        principal = tokens_mod.session_principal(user)
    state = request.scope.get(SCOPE_KEY)
    if state is not None:
        state.identity = principal.identity
    wait = api.shield.charge_account(principal.user_id)
    if wait:
        raise ApiError(429, "rate_limited", "too many requests for this account",
                       {"Retry-After": retry_after_seconds(wait)})
    return principal


def require(scope: str) -> Callable[..., Principal]:
    """A dependency: the verified caller, who must hold ``scope`` (else 403)."""

    def dependency(principal: Principal = Depends(authenticate)) -> Principal:
        if not principal.has_scope(scope):
            raise ApiError(403, "insufficient_scope", "this call needs the %s scope" % scope)
        return principal

    dependency.__name__ = "require_" + scope.replace(":", "_")
    return dependency


def device_for(api: ApiContext, principal: Principal, device_id: str) -> Device:
    """The device, if the caller's limit allows it (403) and it exists (404)."""
    if not principal.may_access_device(device_id):
        raise ApiError(403, "device_not_allowed", "this token is not valid for that device")
    device = api.store.get_device(device_id)
    if device is None:
        raise ApiError(404, "not_found", "no such device")
    return device


def _device_id() -> Any:
    # A fresh FieldInfo per parameter: FastAPI binds each one to its parameter's name.
    return PathParam(min_length=1, max_length=MAX_ID_CHARS, pattern=ID_PATTERN,
                     description="device id")


def _time_ms(description: str) -> Any:
    return Query(default=None, ge=0, le=MAX_INT, description=description)


# -- the app ----------------------------------------------------------------------------------

def create_app(ctx: Any, live: Any, clock: Optional[Clock] = None, *,
               rules: Optional[ShieldRules] = None) -> FastAPI:
    """The hub's ASGI app: API, dashboard, OpenAPI document, all behind the shield.

    ``clock`` returns milliseconds (default: the wall clock). ``rules`` defaults to the
    packaged shield rules overridden by ``<data dir>/shield_rules.toml`` if it exists.
    """
    from smartx_hub import dashboard  # the dashboard imports this module's helpers

    clock = clock or wall_clock_ms
    if rules is None:
        rules = load_rules(Path(ctx.data_dir) / "shield_rules.toml")
    shield = Shield(rules, clock)
    keys = TokenKeys.from_context(ctx)
    api = ApiContext(hub=ctx, live=live, clock=clock, shield=shield, keys=keys,
                     verifier=TokenVerifier(keys, ctx.store), sessions=dashboard.SessionStore())
    app = FastAPI(title="SmartX HUB API", version="1.0.0", docs_url=None, redoc_url=None,
                  openapi_url="/openapi.json",
                  description="Remote API of a SmartX hub. See docs/api.md.")
    app.state.api = api
    _install_error_handlers(app)
    _install_routes(app)
    dashboard.install(app)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    app.add_middleware(ShieldMiddleware, shield=shield)
    return app


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.detail, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _STATUS_CODES.get(exc.status_code, "error")
        detail = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
        return error_response(exc.status_code, code, detail, getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for error in exc.errors()[:5]:
            where = ".".join(str(p) for p in error.get("loc", ()) if p != "body") or "body"
            parts.append("%s: %s" % (where, error.get("msg", "invalid")))
        return error_response(422, "validation_error", "; ".join(parts)[:500] or "invalid request")

    @app.exception_handler(NotFoundError)
    async def _not_found(request: Request, exc: NotFoundError) -> JSONResponse:
        # A record vanished between our check and the write (a concurrent removal).
        return error_response(404, "not_found", "no such resource")

    @app.exception_handler(ConflictError)
    async def _conflict(request: Request, exc: ConflictError) -> JSONResponse:
        return error_response(409, "conflict", str(exc)[:200])

    @app.exception_handler(StoreError)
    async def _store_error(request: Request, exc: StoreError) -> JSONResponse:
        return error_response(422, "validation_error", str(exc)[:200])

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error on %s %s: %s", request.method, request.url.path,
                  type(exc).__name__)
        return error_response(500, "internal_error", "internal error")


def _install_routes(app: FastAPI) -> None:  # noqa: C901 - one list of routes reads best
    P = API_PREFIX

    @app.get("/healthz", response_model=HealthOut, tags=["health"])
    def healthz() -> HealthOut:
        """Liveness; needs no credentials."""
        return HealthOut(status="ok")

    # -- devices ------------------------------------------------------------------------------
    @app.get(P + "/devices", response_model=DeviceList, tags=["devices"])
    def list_devices(api: ApiContext = Depends(get_api),
                     principal: Principal = Depends(require("devices:read"))) -> DeviceList:
        """Devices the caller may see, with online status and last-seen time."""
        devices = [d for d in api.store.list_devices() if principal.may_access_device(d.id)]
        return DeviceList(items=[device_out(d, api.live) for d in devices])

    @app.get(P + "/devices/{device_id}", response_model=DeviceOut, tags=["devices"])
    def get_device(device_id: str = _device_id(), api: ApiContext = Depends(get_api),
                   principal: Principal = Depends(require("devices:read"))) -> DeviceOut:
        """One device."""
        return device_out(device_for(api, principal, device_id), api.live)

    def _set_enabled(api: ApiContext, principal: Principal, request: Request, device_id: str,
                     enabled: bool) -> DeviceOut:
        device = device_for(api, principal, device_id)
        api.store.set_device_enabled(device.id, enabled)
        if not enabled:
            api.live.kick(device.id, CLOSE_DEVICE_DISABLED, "disabled through the API")
        api.audit("device.enabled" if enabled else "device.disabled", principal, request,
                  {"device": device.id})
        device.enabled = enabled
        return device_out(device, api.live)

    @app.post(P + "/devices/{device_id}/disable", response_model=DeviceOut, tags=["devices"])
    def disable_device(request: Request, device_id: str = _device_id(),
                       api: ApiContext = Depends(get_api),
                       principal: Principal = Depends(require("devices:write"))) -> DeviceOut:
        """Refuse the device's sessions from now on, and end its live one."""
        return _set_enabled(api, principal, request, device_id, False)

    @app.post(P + "/devices/{device_id}/enable", response_model=DeviceOut, tags=["devices"])
    def enable_device(request: Request, device_id: str = _device_id(),
                      api: ApiContext = Depends(get_api),
                      principal: Principal = Depends(require("devices:write"))) -> DeviceOut:
        """Accept the device's sessions again."""
        return _set_enabled(api, principal, request, device_id, True)

    @app.delete(P + "/devices/{device_id}", status_code=204, response_class=Response,
                tags=["devices"])
    def remove_device(request: Request, device_id: str = _device_id(),
                      api: ApiContext = Depends(get_api),
                      principal: Principal = Depends(require("devices:write"))) -> Response:
        """Remove the device and its data; its live session ends."""
        device = device_for(api, principal, device_id)
        api.store.remove_device(device.id)
        api.live.kick(device.id, CLOSE_REVOKED, "removed through the API")
        api.audit("device.removed", principal, request, {"device": device.id})
        return Response(status_code=204)

    # -- telemetry ----------------------------------------------------------------------------
    @app.get(P + "/devices/{device_id}/telemetry", tags=["telemetry"],
             response_model=TelemetryPage,
             responses={200: {"content": {"text/csv": {"schema": {"type": "string"}}},
                              "description": "A page of readings (JSON or CSV; CSV carries "
                                             "the next cursor in X-Next-Cursor)"}})
    def telemetry(device_id: str = _device_id(), since: Optional[int] = _time_ms("oldest ts_ms (inclusive)"),
                  until: Optional[int] = _time_ms("newest ts_ms (inclusive)"),
                  stream: Optional[str] = Query(
                      default=None, min_length=1, max_length=64, pattern=STREAM_PATTERN,
                      description="only this stream (names of letters, digits and _.:@+-; "
                                  "read other streams unfiltered)"),
                  limit: int = Query(default=100, ge=1, le=1000),
                  cursor: Optional[str] = Query(default=None, pattern=cursor_pattern("r"),
                                                description="next_cursor of the previous page"),
                  format: Literal["json", "csv"] = Query(default="json"),
                  api: ApiContext = Depends(get_api),
                  principal: Principal = Depends(require("telemetry:read"))) -> Any:
        """Readings newest first, between ``since`` and ``until`` (ms), a page at a time."""
        device = device_for(api, principal, device_id)
        before = decode_cursor("r", cursor) if cursor is not None else None
        rows = api.store.query_telemetry(device.id, since_ms=since, until_ms=until, stream=stream,
                                         limit=limit + 1, before_seq=before)
        next_cursor = encode_cursor("r", rows[limit - 1].seq) if len(rows) > limit else None
        rows = rows[:limit]
        if format == "csv":
            buffer = io.StringIO()
            writer = csv.writer(buffer, lineterminator="\n")
            writer.writerow(["ts_ms", "stream", "value", "received_ms", "msg_id"])
            for r in rows:
                value = jsonable(r.value)
                cell = value if isinstance(value, (int, float, str)) and not isinstance(value, bool) \
                    else json.dumps(value)
                writer.writerow([r.ts_ms, _csv_cell(r.stream), _csv_cell(cell), r.received_ms,
                                 r.msg_id])
            headers = {"X-Next-Cursor": next_cursor} if next_cursor else {}
            return Response(buffer.getvalue(), media_type="text/csv; charset=utf-8",
                            headers=headers)
        return TelemetryPage(device_id=device.id, next_cursor=next_cursor, items=[
            ReadingOut(stream=r.stream, ts_ms=r.ts_ms, value=jsonable(r.value),
                       received_ms=r.received_ms, msg_id=r.msg_id) for r in rows])

    # -- commands -----------------------------------------------------------------------------
    @app.post(P + "/devices/{device_id}/commands", status_code=201, response_model=CommandOut,
              tags=["commands"])
    def send_command(request: Request, response: Response, body: CommandIn,
                     device_id: str = _device_id(), api: ApiContext = Depends(get_api),
                     principal: Principal = Depends(require("commands:write"))) -> CommandOut:
        """Queue a command; it is delivered when the device is (or comes) online."""
        device = device_for(api, principal, device_id)
        if not device.enabled:
            raise ApiError(409, "device_disabled", "the device is disabled")
        # The longest id the store makes stands in for the command's id.
        check_deliverable(wire.Command(command_id="c" * wire.MAX_ID_LENGTH, name=body.name,
                                       args=body.args, expires_ms=api.clock() + body.ttl_s * 1000),
                          "the command")
        command = api.store.add_command(device.id, body.name, body.args, body.ttl_s * 1000,
                                        api.clock())
        api.live.wake(device.id)
        api.audit("command.sent", principal, request,
                  {"device": device.id, "command": command.id, "name": command.name})
        response.headers["Location"] = "%s/devices/%s/commands/%s" % (P, device.id, command.id)
        return command_out(command)

    @app.get(P + "/devices/{device_id}/commands", response_model=CommandList, tags=["commands"])
    def list_commands(device_id: str = _device_id(), limit: int = Query(default=50, ge=1, le=100),
                      api: ApiContext = Depends(get_api),
                      principal: Principal = Depends(require("commands:read"))) -> CommandList:
        """The device's recent commands, newest first."""
        device = device_for(api, principal, device_id)
        return CommandList(items=[command_out(c) for c in api.store.list_commands(device.id, limit)])

    @app.get(P + "/devices/{device_id}/commands/{command_id}", response_model=CommandOut,
             tags=["commands"])
    def get_command(device_id: str = _device_id(),
                    command_id: str = PathParam(min_length=1, max_length=MAX_ID_CHARS,
                                                pattern=ID_PATTERN),
                    api: ApiContext = Depends(get_api),
                    principal: Principal = Depends(require("commands:read"))) -> CommandOut:
        """One command's status and result."""
        device = device_for(api, principal, device_id)
        command = api.store.get_command(command_id)
        if command is None or command.device_id != device.id:
            raise ApiError(404, "not_found", "no such command for this device")
        return command_out(command)

    # -- state --------------------------------------------------------------------------------
    def _state_out(state: Any) -> StateOut:
        return StateOut(device_id=state.device_id, desired=jsonable(state.desired or {}),
                        desired_version=state.desired_version, desired_ms=state.desired_ms,
                        reported=jsonable(state.reported or {}), reported_ms=state.reported_ms)

    @app.get(P + "/devices/{device_id}/state", response_model=StateOut, tags=["state"])
    def get_state(device_id: str = _device_id(), api: ApiContext = Depends(get_api),
                  principal: Principal = Depends(require("state:read"))) -> StateOut:
        """Desired and reported state."""
        device = device_for(api, principal, device_id)
        return _state_out(api.store.get_state(device.id))

    @app.put(P + "/devices/{device_id}/state/desired", response_model=StateOut, tags=["state"])
    def put_desired(request: Request, body: DesiredIn, device_id: str = _device_id(),
                    api: ApiContext = Depends(get_api),
                    principal: Principal = Depends(require("state:write"))) -> StateOut:
        """Replace the desired state; the device hears of it at once if online."""
        device = device_for(api, principal, device_id)
        check_deliverable(wire.DesiredState(version=2 ** 32, state=body.desired),
                          "the desired state")
        state = api.store.set_desired_state(device.id, body.desired, api.clock())
        api.live.wake(device.id)
        api.audit("state.desired_set", principal, request,
                  {"device": device.id, "version": state.desired_version})
        return _state_out(state)

    # -- tokens -------------------------------------------------------------------------------
    @app.get(P + "/tokens", response_model=TokenList, tags=["tokens"])
    def list_tokens(api: ApiContext = Depends(get_api),
                    principal: Principal = Depends(require("tokens:read"))) -> TokenList:
        """The caller's account's tokens (hint, scopes, times; never the token)."""
        now = api.clock()
        records = sorted(api.store.list_tokens(principal.user_id), key=lambda r: -r.created_ms)
        return TokenList(items=[TokenOut(**token_out(r, now)) for r in records])

    @app.post(P + "/tokens", status_code=201, response_model=TokenCreated, tags=["tokens"])
    def create_token(request: Request, response: Response, body: TokenIn,
                     api: ApiContext = Depends(get_api),
                     principal: Principal = Depends(require("tokens:write"))) -> TokenCreated:
        """Create a token, shown in this answer only. A token never grants more than its
        creator holds (scopes, devices, lifetime)."""
        user = api.store.get_user(principal.user_id)
        if user is None:
            raise _unauthorized("unauthorized", "account gone")
        expires_ms = None if body.expires_in_s is None else body.expires_in_s * 1000
        creator = principal if principal.token_id is not None else None
        try:
            token, record = tokens_mod.issue_token(
                api.keys, api.store, user, body.scopes, body.devices, expires_ms, body.name,
                api.clock(), creator=creator)
        except tokens_mod.GrantError as exc:
            raise ApiError(403, "scope_escalation", str(exc)) from None
        except tokens_mod.UnknownDeviceError as exc:
            raise ApiError(404, "not_found", str(exc)) from None
        except tokens_mod.TokenRequestError as exc:
            raise ApiError(422, "validation_error", str(exc)) from None
        api.audit("token.created", principal, request,
                  {"token": record.id, "scopes": record.scopes, "devices": record.devices,
                   "expires_ms": record.expires_ms})
        response.headers["Cache-Control"] = "no-store"
        return TokenCreated(token=token, **token_out(record, api.clock()))

    @app.delete(P + "/tokens/{token_id}", status_code=204, response_class=Response,
                tags=["tokens"])
    def revoke_token(request: Request,
                     token_id: str = PathParam(min_length=1, max_length=MAX_ID_CHARS,
                                               pattern=ID_PATTERN),
                     api: ApiContext = Depends(get_api),
                     principal: Principal = Depends(require("tokens:write"))) -> Response:
        """Revoke one of the account's tokens; effective on the next request."""
        record = api.store.get_token(token_id)
        if record is None or record.user_id != principal.user_id:
            raise ApiError(404, "not_found", "no such token")
        if record.revoked_ms is None:
            api.store.revoke_token(record.id, api.clock())
            api.audit("token.revoked", principal, request, {"token": record.id})
        return Response(status_code=204)

    @app.post(P + "/tokens/revoke-all", response_model=RevokeAllOut, tags=["tokens"])
    def revoke_all(request: Request, api: ApiContext = Depends(get_api),
                   principal: Principal = Depends(require("tokens:write"))) -> RevokeAllOut:
        """Revoke every token of the account (the calling token too)."""
        now = api.clock()
        count = api.store.revoke_all_tokens(principal.user_id, now)
        api.store.set_tokens_valid_after(principal.user_id, now)
        api.audit("token.revoked_all", principal, request, {"count": count})
        return RevokeAllOut(revoked=count)

    # -- audit --------------------------------------------------------------------------------
    @app.get(P + "/audit", response_model=AuditPage, tags=["audit"])
    def audit(limit: int = Query(default=100, ge=1, le=500),
              cursor: Optional[str] = Query(default=None, pattern=cursor_pattern("a"),
                                            description="next_cursor of the previous page"),
              api: ApiContext = Depends(get_api),
              principal: Principal = Depends(require("audit:read"))) -> AuditPage:
        """Audit lines, newest first."""
        before = decode_cursor("a", cursor) if cursor is not None else None
        entries = api.store.list_audit(limit=limit + 1, before_id=before)
        next_cursor = encode_cursor("a", entries[limit - 1].id) if len(entries) > limit else None
        return AuditPage(next_cursor=next_cursor, items=[
            AuditOut(id=e.id, ts_ms=e.ts_ms, action=e.action, actor=e.actor, source=e.source,
                     detail=jsonable(e.detail or {})) for e in entries[:limit]])


_ERROR_RESPONSES = {
    "400": "Malformed request, or refused by the shield's scanning rules",
    "401": "Missing, malformed, forged, expired or revoked credentials",
    "403": "Scope, device limit, CSRF, user agent or TLS version not allowed",
    "404": "No such resource",
    "409": "Conflicts with the resource's state",
    "413": "Request body too large",
    "422": "Request fails validation",
    "429": "Rate limited or temporarily blocked; see Retry-After",
    "431": "Request headers too large",
}


def _openapi(app: FastAPI) -> dict:
    """FastAPI's document, with our security schemes and error schema on every operation."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, description=app.description,
                         routes=app.routes)
    components = schema.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    schemas["Error"] = {
        "type": "object", "required": ["error", "detail"],
        "properties": {"error": {"type": "string"}, "detail": {"type": "string"}},
    }
    components["securitySchemes"] = {
        "bearerAuth": {"type": "http", "scheme": "bearer",
                       "bearerFormat": "sxh_ + JWT (ES256), sealed scope",
                       "description": "An API token from the dashboard or `smartx-hub token create`."},
        "sessionCookie": {"type": "apiKey", "in": "cookie", "name": "sx_session",
                          "description": "The dashboard session (full scope of the user); "
                                         "requires csrfHeader too."},
        "csrfHeader": {"type": "apiKey", "in": "header", "name": "X-CSRF-Token",
                       "description": "The session's CSRF token, from the dashboard page."},
    }
    error_content = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    for path, operations in schema.get("paths", {}).items():
        for method, operation in operations.items():
            responses = operation.setdefault("responses", {})
            codes = list(_ERROR_RESPONSES)
            if path.startswith(API_PREFIX):
                operation["security"] = [{"bearerAuth": []}, {"sessionCookie": [], "csrfHeader": []}]
            else:
                operation["security"] = []
                codes = ["400", "403", "413", "429", "431"]
            if method == "get" and path.startswith(API_PREFIX):
                responses.setdefault("304", {"description": "Not modified (If-None-Match matched "
                                                            "the caller's ETag)"})
            for code in codes:
                responses[code] = {"description": _ERROR_RESPONSES[code], "content": error_content}
    app.openapi_schema = schema
    return schema


def build_server(app: FastAPI, ctx: Any, host: str, port: int, **config: Any):
    """A ``uvicorn.Server`` for ``app`` over HTTPS with the hub's TLS context.

    No forwarding headers are trusted (the shield keys on the peer address), no Server header,
    and logging goes through the standard ``logging`` tree (``log_config=None``).
    """
    import uvicorn

    options = dict(host=host, port=port, log_config=None, proxy_headers=False,
                   server_header=False, date_header=True, timeout_keep_alive=5,
                   limit_concurrency=1000, h11_max_incomplete_event_size=16384)
    options.update(config)
    uv_config = uvicorn.Config(app, **options)
    uv_config.load()
    uv_config.ssl = ctx.api_tls_context()  # load() would build one from files; use the hub's
    return uvicorn.Server(uv_config)
