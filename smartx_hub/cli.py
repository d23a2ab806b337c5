"""``smartx-hub``: the hub's command line (init, serve, device, keys; token and user via cli_api).

Contract for every command (and for ``smartx_hub.cli_api``, which adds ``token`` and ``user``):
- ``register(subparsers, common_parent)`` adds parsers built with ``parents=[common_parent]``
  (which gives ``--data``) and ``set_defaults(func=handler)``; ``handler(args)`` returns an exit
  code (or None for 0) and raises a typed error (``CLIError``, ``StoreError``, ``HubStateError``,
  ...) on failure. ``main`` turns any error into one line ``error: <reason>`` on stderr and a
  non-zero exit: 1 for a failed command, 2 for bad usage. No traceback reaches the user
  (set ``SMARTX_HUB_DEBUG=1`` to see one).
- ``--json`` on commands that list or create prints one JSON document on stdout and nothing else.
- State-changing device commands write an audit line (actor "cli", source "local").
- Gateways (docs/security.md, "Gateways"): ``device add NAME --gateway`` enrols a gateway and
  puts its TLS client certificate in its bundle; ``device add BOARD --via GATEWAY`` and
  ``device assign BOARD --via GATEWAY | --direct`` say which gateway may relay for a board.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import importlib
import inspect
import json
import os
import re
import secrets
import sys
from typing import Any, Optional, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from smartx_hub import gateway_pki, pki
from smartx_hub.bundle import BundleError, write_bundle
from smartx_hub.crypto import CryptoError
from smartx_hub.limits import LimitsConfigError, ListenerLimits
from smartx_hub.sqlite_store import SQLiteStore
from smartx_hub.state import (
    DEFAULT_API_PORT,
    DEFAULT_DEVICE_PORT,
    HubContext,
    HubStateError,
    init_hub,
    load_hub,
    rotate_master_key,
    wall_clock_ms,
)
from smartx_hub.store import Device, StoreError

DATA_ENV = "SMARTX_HUB_DATA"
DEFAULT_DATA_DIR = "smartx-data"
DEBUG_ENV = "SMARTX_HUB_DEBUG"
BUNDLE_SUFFIX = ".smartx.json"
HS256_SECRET_BYTES = 32
MAX_PUBLIC_KEY_FILE = 16 * 1024
EXIT_ERROR = 1
EXIT_USAGE = 2

_SAFE_FILENAME = re.compile(r"[^A-Za-z0-9._-]")


class CLIError(Exception):
    """A command cannot do what was asked; the message is the one line the user sees."""


class UsageError(CLIError):
    """The command line itself is wrong (exit status 2)."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad usage as one ``error:`` line instead of usage + message."""

    def error(self, message: str) -> None:  # type: ignore[override]
        """Raise ``UsageError`` (main prints it as one line, exit status 2)."""
        raise UsageError("%s (see %s --help)" % (message, self.prog))


def default_data_dir() -> str:
    """``$SMARTX_HUB_DATA``, else ``./smartx-data``."""
    return os.environ.get(DATA_ENV) or DEFAULT_DATA_DIR


def emit(args: argparse.Namespace, data: Any, text: str) -> None:
    """Print ``data`` as JSON when ``--json`` was given, else the human text."""
    if getattr(args, "json", False):
        print(json.dumps(data, indent=2, sort_keys=True))
    else:
        print(text)


def open_hub(args: argparse.Namespace) -> HubContext:
    """Open the hub named by ``--data`` (close it when done)."""
    return load_hub(args.data)


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("%r is not a port number" % text) from None
    if not 0 < value < 65536:
        raise argparse.ArgumentTypeError("port %d is outside 1..65535" % value)
    return value


def _listen_port(text: str) -> int:
    """A port to listen on: 1..65535, or 0 for any free port (serve prints the one it got)."""
    if text.strip() == "0":
        return 0
    try:
        return _port(text)
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError("%s (or 0 for any free port)" % exc) from None


_LIMIT_FIELDS = {f.name: f for f in dataclasses.fields(ListenerLimits)}


def _limit_setting(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` for ``serve --limit``: KEY a ``ListenerLimits`` field, VALUE of its kind
    (a whole number, or any number for the two rates)."""
    key, sep, raw = text.partition("=")
    key, raw = key.strip(), raw.strip()
    if not sep or not key or not raw:
        raise argparse.ArgumentTypeError("expected KEY=VALUE, not %r" % text)
    field = _LIMIT_FIELDS.get(key)
    if field is None:
        raise argparse.ArgumentTypeError("unknown limit %r (one of: %s)"
                                         % (key, ", ".join(sorted(_LIMIT_FIELDS))))
    whole = field.type in (int, "int")
    try:
        value: Any = int(raw) if whole else float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError("limit %s needs %s, not %r" % (
            key, "a whole number" if whole else "a number", raw)) from None
    return key, value  # ranges and cross-checks: _limits_mapping, once all are known


def _limits_mapping(settings: Sequence[tuple[str, Any]]) -> dict[str, Any]:
    """The ``--limit`` settings as the mapping ``serve(limits=...)`` takes; each key once, and
    checked (ranges, settings that contradict each other) as hub.json's settings are."""
    limits: dict[str, Any] = {}
    for key, value in settings:
        if key in limits:
            raise UsageError("--limit %s is given twice" % key)
        limits[key] = value
    try:
        ListenerLimits.from_mapping(limits)  # settings that contradict each other
    except LimitsConfigError as exc:
        raise UsageError(str(exc)) from None
    return limits


def _device_json(device: Device, online: Optional[bool] = None) -> dict:
    data = {"id": device.id, "name": device.name, "auth": device.auth,
            "enabled": device.enabled, "created_ms": device.created_ms,
            "last_seen_ms": device.last_seen_ms, "kind": device.kind,
            "gateway_id": device.gateway_id}
    if online is not None:
        data["online"] = online
    return data


def _find_device(store: SQLiteStore, ref: str) -> Device:
    device = store.get_device(ref) or store.get_device_by_name(ref)
    if device is None:
        raise CLIError("no device with id or name %r" % ref)
    return device


def _find_gateway(store: SQLiteStore, ref: str) -> Device:
    gateway = store.get_device(ref) or store.get_device_by_name(ref)
    if gateway is None:
        raise CLIError("no gateway with id or name %r" % ref)
    if gateway.kind != "gateway":
        raise CLIError("%s (%s) is not a gateway (enrol one with: device add NAME --gateway)"
                       % (gateway.id, gateway.name))
    return gateway


def _issue_gateway_cert(ctx: HubContext, device_id: str) -> tuple[str, str]:
    """A new client key and certificate for gateway ``device_id``, as PEM text."""
    ca_cert = x509.load_pem_x509_certificate(ctx.ca_cert_pem)
    key, cert = gateway_pki.create_gateway_cert(ctx.load_ca_key(), ca_cert, device_id,
                                                wall_clock_ms())
    return pki.cert_pem(cert).decode("ascii"), pki.private_key_pem(key).decode("ascii")


# -- init ---------------------------------------------------------------------------------


def cmd_init(args: argparse.Namespace) -> int:
    """Create a hub: keys, CA, server certificate, database."""
    ctx = init_hub(args.data, hosts=args.host, device_port=args.device_port,
                   api_port=args.api_port)
    try:
        ctx.store.add_audit("hub.initialised", actor="cli", source="local",
                            detail={"hub_id": ctx.hub_id, "hosts": ctx.hosts},
                            now_ms=wall_clock_ms())
        data = {"hub_id": ctx.hub_id, "data_dir": ctx.data_dir,
                "ca_fingerprint": ctx.ca_fingerprint, "ca_cert": ctx.ca_cert_path,
                "master_key": ctx.master_key_path, "database": ctx.store.path,
                "hosts": ctx.hosts, "device_port": ctx.device_port, "api_port": ctx.api_port}
        emit(args, data, "\n".join([
            "Initialised hub %s in %s" % (ctx.hub_id, ctx.data_dir),
            "  CA fingerprint: %s" % ctx.ca_fingerprint,
            "  CA certificate: %s  (devices pin this CA)" % ctx.ca_cert_path,
            "  master key:     %s  (mode 0600; back it up apart from the database)"
            % ctx.master_key_path,
            "  database:       %s" % ctx.store.path,
            "  server names:   %s" % ", ".join(ctx.hosts),
            "  ports:          devices %d, API %d" % (ctx.device_port, ctx.api_port),
            "Next: smartx-hub device add NAME --data %s, then smartx-hub serve --data %s"
            % (ctx.data_dir, ctx.data_dir),
        ]))
    finally:
        ctx.close()
    return 0


# -- device -------------------------------------------------------------------------------


def _read_public_key(path: str, auth: str) -> bytes:
    """Load a device-made public key and check it fits ``auth``; return it as SPKI PEM."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_PUBLIC_KEY_FILE + 1)
    except OSError as exc:
        raise CLIError("cannot read public key %s: %s" % (path, exc.strerror)) from None
    if b"PRIVATE KEY" in data:
        raise CLIError("%s holds a private key: pass the device's public key only" % path)
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError):
        raise CLIError("%s is not a PEM public key" % path) from None
    if auth == "es256" and not (isinstance(key, ec.EllipticCurvePublicKey)
                                and isinstance(key.curve, ec.SECP256R1)):
        raise CLIError("an es256 device needs a P-256 public key; %s is not one" % path)
    if auth == "eddsa" and not isinstance(key, ed25519.Ed25519PublicKey):
        raise CLIError("an eddsa device needs an Ed25519 public key; %s is not one" % path)
    return pki.public_key_pem(key)


def cmd_device_add(args: argparse.Namespace) -> int:
    """Enrol a device (or a gateway) and write its credentials bundle."""
    auth = args.auth
    kind = "gateway" if args.gateway else "device"
    if args.gateway and args.via:
        raise UsageError("--gateway and --via exclude each other: a gateway connects directly")
    out = args.out or (_SAFE_FILENAME.sub("_", args.name) + BUNDLE_SUFFIX)
    if os.path.lexists(out):
        raise CLIError("%s already exists; not overwriting it (choose another --out)" % out)
    private_pem: Optional[str] = None
    public_pem: Optional[bytes] = None
    secret: Optional[bytes] = None
    if args.public_key:
        if auth == "hs256":
            raise CLIError("--public-key needs --auth es256 or eddsa (hs256 uses a shared secret)")
        public_pem = _read_public_key(args.public_key, auth)
    elif auth == "hs256":
        secret = secrets.token_bytes(HS256_SECRET_BYTES)
    else:
        key = (ec.generate_private_key(ec.SECP256R1()) if auth == "es256"
               else ed25519.Ed25519PrivateKey.generate())
        private_pem = pki.private_key_pem(key).decode("ascii")
        public_pem = pki.public_key_pem(key)
    with open_hub(args) as ctx:
        gateway = _find_gateway(ctx.store, args.via) if args.via else None
        device = ctx.store.add_device(args.name, auth, public_pem, secret, wall_clock_ms(),
                                      kind=kind,
                                      gateway_id=gateway.id if gateway is not None else None)
        bundle: dict[str, Any] = {
            "version": 1, "device_id": device.id, "name": device.name, "hub_id": ctx.hub_id,
            "auth": auth, "ca_pem": ctx.ca_cert_pem.decode("ascii"),
            "ca_fingerprint": ctx.ca_fingerprint, "hub_host": ctx.hosts[0],
            "hub_port": ctx.device_port, "server_name": ctx.hosts[0]}
        if secret is not None:
            bundle["secret_b64"] = base64.b64encode(secret).decode("ascii")
        if private_pem is not None:
            bundle["private_key_pem"] = private_pem
        try:
            if kind == "gateway":
                bundle["client_cert_pem"], bundle["client_key_pem"] = \
                    _issue_gateway_cert(ctx, device.id)
            write_bundle(out, bundle)
        except BaseException:
            # No bundle, no device: an enrolment nobody can use must not linger.
            ctx.store.remove_device(device.id)
            raise
        key_source = "device" if args.public_key else "hub"
        ctx.store.add_audit("device.enrolled", actor="cli", source="local",
                            detail={"device_id": device.id, "name": device.name, "auth": auth,
                                    "key_source": key_source, "kind": kind,
                                    "gateway_id": device.gateway_id}, now_ms=wall_clock_ms())
    data = _device_json(device)
    data.update({"bundle": os.path.abspath(out), "key_source": key_source})
    held = ("secret" if auth == "hs256" else "private key" if private_pem
            else "hub CA and address")
    lines = ["Enrolled %s %s (%s, %s)" % (kind, device.id, device.name, auth),
             "  credentials bundle: %s" % os.path.abspath(out)]
    if kind == "gateway":
        lines.append("  it holds the gateway's %s and its TLS client key: copy it onto the"
                     " gateway, then delete it here" % held)
        lines.append("  assign boards to it with: smartx-hub device add BOARD --via %s"
                     % device.name)
    else:
        lines.append("  it holds the device's %s: copy it onto the board, then delete it here"
                     % held)
        if gateway is not None:
            lines.append("  accepted only through gateway %s (%s)" % (gateway.id, gateway.name))
    emit(args, data, "\n".join(lines))
    return 0


def cmd_device_list(args: argparse.Namespace) -> int:
    """List enrolled devices."""
    with open_hub(args) as ctx:
        devices = ctx.store.list_devices()
    if getattr(args, "json", False):
        emit(args, [_device_json(d) for d in devices], "")
        return 0
    if not devices:
        print("No devices enrolled.")
        return 0
    names = {d.id: d.name for d in devices}
    rows = [("ID", "NAME", "KIND", "VIA", "AUTH", "ENABLED", "LAST SEEN (ms)")]
    for d in devices:
        rows.append((d.id, d.name, d.kind,
                     "-" if d.gateway_id is None else names.get(d.gateway_id, d.gateway_id),
                     d.auth, "yes" if d.enabled else "no",
                     "-" if d.last_seen_ms is None else str(d.last_seen_ms)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())
    return 0


def _set_enabled(args: argparse.Namespace, enabled: bool) -> int:
    with open_hub(args) as ctx:
        device = _find_device(ctx.store, args.id)
        # Bumps meta "devices_version": a running hub polls it and ends the session.
        ctx.store.set_device_enabled(device.id, enabled)
        ctx.store.add_audit("device.enabled" if enabled else "device.disabled", actor="cli",
                            source="local", detail={"device_id": device.id, "name": device.name},
                            now_ms=wall_clock_ms())
    emit(args, {"id": device.id, "name": device.name, "enabled": enabled},
         "%s device %s (%s)" % ("Enabled" if enabled else "Disabled", device.id, device.name))
    return 0


def cmd_device_disable(args: argparse.Namespace) -> int:
    """Refuse the device from now on (a live session ends within a second)."""
    return _set_enabled(args, False)


def cmd_device_enable(args: argparse.Namespace) -> int:
    """Accept the device again."""
    return _set_enabled(args, True)


def cmd_device_assign(args: argparse.Namespace) -> int:
    """Say which gateway may relay for a board (``--direct``: none, it connects itself)."""
    with open_hub(args) as ctx:
        device = _find_device(ctx.store, args.id)
        if device.kind == "gateway":
            raise CLIError("%s (%s) is a gateway: gateways connect directly"
                           % (device.id, device.name))
        gateway = None if args.direct else _find_gateway(ctx.store, args.via)
        # Bumps meta "devices_version": a running hub re-checks the sessions relayed for it.
        ctx.store.set_device_gateway(device.id, gateway.id if gateway is not None else None)
        ctx.store.add_audit("device.assigned", actor="cli", source="local",
                            detail={"device_id": device.id, "name": device.name,
                                    "gateway_id": gateway.id if gateway is not None else None,
                                    "previous_gateway_id": device.gateway_id},
                            now_ms=wall_clock_ms())
    data = {"id": device.id, "name": device.name,
            "gateway_id": gateway.id if gateway is not None else None}
    text = ("Device %s (%s) now connects directly" % (device.id, device.name) if gateway is None
            else "Device %s (%s) is now accepted only through gateway %s (%s)"
            % (device.id, device.name, gateway.id, gateway.name))
    emit(args, data, text)
    return 0


def cmd_device_remove(args: argparse.Namespace) -> int:
    """Delete the device with its telemetry, commands and state."""
    with open_hub(args) as ctx:
        device = _find_device(ctx.store, args.id)
        ctx.store.remove_device(device.id)
        ctx.store.add_audit("device.removed", actor="cli", source="local",
                            detail={"device_id": device.id, "name": device.name},
                            now_ms=wall_clock_ms())
    emit(args, {"id": device.id, "name": device.name, "removed": True},
         "Removed device %s (%s) with its telemetry, commands and state" % (device.id, device.name))
    return 0


# -- keys ---------------------------------------------------------------------------------


def cmd_keys_rotate(args: argparse.Namespace) -> int:
    """Replace the master key and rewrap every data key."""
    result = rotate_master_key(args.data, keep_old=args.keep_old)
    with open_hub(args) as ctx:
        ctx.store.add_audit("keys.rotated", actor="cli", source="local",
                            detail={"old_key_id": result["old_key_id"],
                                    "new_key_id": result["new_key_id"],
                                    "data_keys": result["data_keys"]}, now_ms=wall_clock_ms())
    lines = ["Rotated the master key (%s -> %s); %d data keys rewrapped"
             % (result["old_key_id"], result["new_key_id"], result["data_keys"])]
    if result["kept_old"]:
        lines.append("  the previous key is kept in %s: it opens only database backups made"
                     " before now; delete it once none is needed" % result["kept_old"])
    emit(args, result, "\n".join(lines))
    return 0


# -- serve --------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the device listener and the API until SIGINT/SIGTERM."""
    try:
        server = importlib.import_module("smartx_hub.server")
    except ImportError as exc:
        if exc.name == "smartx_hub.server":
            raise CLIError("the hub server (smartx_hub.server) is not part of this build") from None
        raise CLIError("cannot load the hub server: %s" % exc) from None
    limits = _limits_mapping(args.limit)
    ctx = open_hub(args)
    try:
        device_port = args.device_port if args.device_port is not None else ctx.device_port
        api_port = args.api_port if args.api_port is not None else ctx.api_port
        if device_port == api_port and device_port != 0:
            raise UsageError("the device port and the API port must differ (both are %d)"
                             % device_port)
        result = server.serve(
            ctx, host=args.host, device_port=device_port, api_port=api_port,
            insecure_dev=args.insecure_dev, advertise=list(args.advertise), limits=limits)
        if inspect.iscoroutine(result):
            import asyncio  # only serve needs it; the other commands start faster without

            result = asyncio.run(result)
    finally:
        ctx.close()
    return result if isinstance(result, int) else 0


# -- the parser ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The full ``smartx-hub`` parser (including cli_api's commands when that module exists)."""
    common = _Parser(add_help=False)
    common.add_argument("--data", metavar="DIR", default=default_data_dir(),
                        help="the hub's data directory (default: $%s or ./%s)"
                        % (DATA_ENV, DEFAULT_DATA_DIR))
    json_flag = _Parser(add_help=False)
    json_flag.add_argument("--json", action="store_true", help="print JSON for scripts")

    parser = _Parser(prog="smartx-hub", description="SmartX HUB: the reference hub.")
    parser.add_argument("--version", action="version", version="smartx-hub 0.1.0")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = commands.add_parser("init", parents=[common, json_flag], help="create a new hub",
                            description="Create the hub's keys, CA, server certificate and"
                            " database in --data; refuses to overwrite an existing hub.")
    p.add_argument("--host", action="append", metavar="H",
                   help="a DNS name or IP address devices use to reach the hub (repeatable;"
                   " default: localhost and 127.0.0.1)")
    p.add_argument("--device-port", type=_port, default=DEFAULT_DEVICE_PORT, metavar="N",
                   help="device listener port (default %d)" % DEFAULT_DEVICE_PORT)
    p.add_argument("--api-port", type=_port, default=DEFAULT_API_PORT, metavar="N",
                   help="HTTPS API port (default %d)" % DEFAULT_API_PORT)
    p.set_defaults(func=cmd_init)

    p = commands.add_parser("serve", parents=[common], help="run the hub",
                            description="Run the TLS device listener and the HTTPS API.")
    p.add_argument("--host", default="0.0.0.0",
                   help="address to listen on (default 0.0.0.0: every interface)")
    p.add_argument("--device-port", type=_listen_port, metavar="N",
                   help="device listener port (default: from init; 0: any free port, printed"
                   " when serving)")
    p.add_argument("--api-port", type=_listen_port, metavar="N",
                   help="API port (default: from init; 0: any free port, printed when serving)")
    p.add_argument("--limit", action="append", default=[], type=_limit_setting,
                   metavar="KEY=VALUE",
                   help="override a device-port flood limit for this run (repeatable; KEY is a"
                   " setting of docs/operations.md \"Flood limits\", e.g. message_rate=20);"
                   " applied over hub.json's device_limits")
    p.add_argument("--insecure-dev", action="store_true",
                   help="DEVELOPMENT ONLY: serve the device port and the API in plaintext"
                   " (TCP and HTTP) instead of TLS; logs a loud warning. Never on a network"
                   " you do not control")
    p.add_argument("--advertise", action="append", default=[], metavar="IFACE",
                   help="announce the hub by zeroconf on this interface (repeatable)")
    p.set_defaults(func=cmd_serve)

    device = commands.add_parser("device", help="enrol and manage devices",
                                 description="Enrol and manage devices.")
    device_commands = device.add_subparsers(dest="device_command", metavar="ACTION",
                                            required=True)
    p = device_commands.add_parser("add", parents=[common, json_flag], help="enrol a device",
                                   description="Enrol a device and write its credentials bundle"
                                   " (mode 0600) for the board.")
    p.add_argument("name", metavar="NAME", help="a unique device name")
    p.add_argument("--auth", choices=("es256", "eddsa", "hs256"), default="es256",
                   help="how the device signs its session token (default es256)")
    p.add_argument("--gateway", action="store_true",
                   help="enrol a gateway (e.g. a Raspberry Pi bridging serial boards): its"
                   " bundle also holds a TLS client certificate from the hub CA")
    p.add_argument("--via", metavar="GATEWAY",
                   help="the gateway (id or name) this board is behind: only that gateway may"
                   " relay its session, which the hub still verifies end to end")
    p.add_argument("--public-key", metavar="FILE",
                   help="register this PEM public key made on the device (its private key"
                   " never leaves the device)")
    p.add_argument("--out", metavar="FILE",
                   help="where to write the bundle (default NAME%s)" % BUNDLE_SUFFIX)
    p.set_defaults(func=cmd_device_add)
    p = device_commands.add_parser("list", parents=[common, json_flag], help="list devices",
                                   description="List enrolled devices.")
    p.set_defaults(func=cmd_device_list)
    p = device_commands.add_parser("assign", parents=[common, json_flag],
                                   help="set the gateway a board is behind",
                                   description="Set which gateway may relay for a board, or"
                                   " let it connect directly. A live session on the old path"
                                   " is re-checked by a running hub.")
    p.add_argument("id", metavar="ID", help="the board's device id (or its name)")
    path = p.add_mutually_exclusive_group(required=True)
    path.add_argument("--via", metavar="GATEWAY", help="the gateway (id or name)")
    path.add_argument("--direct", action="store_true",
                      help="no gateway: the board connects to the hub itself")
    p.set_defaults(func=cmd_device_assign)
    for action, func, text in (
            ("disable", cmd_device_disable, "refuse a device (ends its live session)"),
            ("enable", cmd_device_enable, "accept a disabled device again"),
            ("remove", cmd_device_remove, "delete a device with its data")):
        p = device_commands.add_parser(action, parents=[common, json_flag], help=text,
                                       description=text[0].upper() + text[1:] + ".")
        p.add_argument("id", metavar="ID", help="the device id (or its name)")
        p.set_defaults(func=func)

    keys = commands.add_parser("keys", help="manage the master key",
                               description="Manage the master key.")
    keys_commands = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    p = keys_commands.add_parser("rotate", parents=[common, json_flag],
                                 help="replace the master key",
                                 description="Generate a new master key and rewrap every data"
                                 " key under it, losing nothing if interrupted. Stop `serve`"
                                 " first.")
    p.add_argument("--keep-old", action="store_true",
                   help="keep the previous key as master.key.old-<time> (to open older"
                   " database backups)")
    p.set_defaults(func=cmd_keys_rotate)

    try:
        cli_api = importlib.import_module("smartx_hub.cli_api")
    except ModuleNotFoundError as exc:
        if exc.name != "smartx_hub.cli_api":  # a missing dependency of cli_api is a real error
            raise
    else:
        cli_api.register(commands, common)
    return parser


def _one_line(text: str) -> str:
    return " ".join(str(text).split()) or "unknown error"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; return the exit status."""
    debug = bool(os.environ.get(DEBUG_ENV))
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        result = args.func(args)
        return 0 if result is None else int(result)
    except UsageError as exc:
        print("error: %s" % _one_line(str(exc)), file=sys.stderr)
        return EXIT_USAGE
    except (CLIError, StoreError, CryptoError, HubStateError, BundleError, pki.PKIError,
            LimitsConfigError, OSError) as exc:
        if debug:
            raise
        print("error: %s" % _one_line(str(exc)), file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # last resort: the contract is one line, never a traceback
        if debug:
            raise
        print("error: unexpected %s: %s" % (type(exc).__name__, _one_line(str(exc))),
              file=sys.stderr)
        return EXIT_ERROR
