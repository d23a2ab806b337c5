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
"""

from __future__ import annotations

import argparse
import base64
import importlib
import inspect
import json
import os
import re
import secrets
import sys
from typing import Any, Optional, Sequence

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from smartx_hub import pki
from smartx_hub.bundle import BundleError, write_bundle
from smartx_hub.crypto import CryptoError
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


def _device_json(device: Device, online: Optional[bool] = None) -> dict:
    data = {"id": device.id, "name": device.name, "auth": device.auth,
            "enabled": device.enabled, "created_ms": device.created_ms,
            "last_seen_ms": device.last_seen_ms}
    if online is not None:
        data["online"] = online
    return data


def _find_device(store: SQLiteStore, ref: str) -> Device:
    device = store.get_device(ref) or store.get_device_by_name(ref)
    if device is None:
        raise CLIError("no device with id or name %r" % ref)
    return device


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
    """Enrol a device and write its credentials bundle."""
    auth = args.auth
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
        device = ctx.store.add_device(args.name, auth, public_pem, secret, wall_clock_ms())
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
            write_bundle(out, bundle)
        except BaseException:
            # No bundle, no device: an enrolment nobody can use must not linger.
            ctx.store.remove_device(device.id)
            raise
        key_source = "device" if args.public_key else "hub"
        ctx.store.add_audit("device.enrolled", actor="cli", source="local",
                            detail={"device_id": device.id, "name": device.name, "auth": auth,
                                    "key_source": key_source}, now_ms=wall_clock_ms())
    data = _device_json(device)
    data.update({"bundle": os.path.abspath(out), "key_source": key_source})
    emit(args, data, "\n".join([
        "Enrolled device %s (%s, %s)" % (device.id, device.name, auth),
        "  credentials bundle: %s" % os.path.abspath(out),
        "  it holds the device's %s: copy it onto the board, then delete it here"
        % ("secret" if auth == "hs256" else "private key" if private_pem else "hub CA and address"),
    ]))
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
    rows = [("ID", "NAME", "AUTH", "ENABLED", "LAST SEEN (ms)")]
    for d in devices:
        rows.append((d.id, d.name, d.auth, "yes" if d.enabled else "no",
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
    ctx = open_hub(args)
    try:
        result = server.serve(
            ctx, host=args.host,
            device_port=args.device_port if args.device_port is not None else ctx.device_port,
            api_port=args.api_port if args.api_port is not None else ctx.api_port,
            insecure_dev=args.insecure_dev, advertise=list(args.advertise))
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
    p.add_argument("--device-port", type=_port, metavar="N",
                   help="device listener port (default: from init)")
    p.add_argument("--api-port", type=_port, metavar="N", help="API port (default: from init)")
    p.add_argument("--insecure-dev", action="store_true",
                   help="also accept plaintext device connections (development only)")
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
    p.add_argument("--public-key", metavar="FILE",
                   help="register this PEM public key made on the device (its private key"
                   " never leaves the device)")
    p.add_argument("--out", metavar="FILE",
                   help="where to write the bundle (default NAME%s)" % BUNDLE_SUFFIX)
    p.set_defaults(func=cmd_device_add)
    p = device_commands.add_parser("list", parents=[common, json_flag], help="list devices",
                                   description="List enrolled devices.")
    p.set_defaults(func=cmd_device_list)
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
            OSError) as exc:
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
