"""The ``token`` and ``user`` commands of ``smartx-hub`` (registered by smartx_hub/cli.py).

Rules:
- ``token create`` prints the token once, alone on stdout (so ``$(smartx-hub token create ...)``
  captures it), and the "cannot be shown again" warning on stderr. Nothing else ever prints it.
- The command line acts as the named user (``--user``, or the only user if there is one) with
  that user's full scope: whoever can read the data directory owns the hub anyway.
- Errors: one line ``error: ...`` on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
import time
from typing import Any, Optional

from smartx_hub import tokens as tokens_mod
from smartx_hub.passwords import PasswordPolicyError, check_password_policy, hash_password
from smartx_hub.store import ConflictError, StoreError, User


class CommandError(Exception):
    """A user-facing failure of a command: printed as ``error: <message>``."""


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _when(ms: Optional[int]) -> str:
    if ms is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ms / 1000))


def _open_hub(args: argparse.Namespace) -> Any:
    from smartx_hub.state import load_hub  # imported late: --help must work without a hub

    return load_hub(args.data)


def _pick_user(ctx: Any, name: Optional[str]) -> User:
    if name:
        user = ctx.store.get_user_by_name(name)
        if user is None:
            raise CommandError("no user named %r (smartx-hub user list)" % name)
        return user
    users = ctx.store.list_users()
    if not users:
        raise CommandError("no user yet; create one with: smartx-hub user add NAME")
    if len(users) > 1:
        raise CommandError("several users exist; name one with --user")
    return users[0]


def _run(handler):
    def wrapped(args: argparse.Namespace) -> int:
        try:
            return handler(args) or 0
        except CommandError as exc:
            print("error: %s" % exc, file=sys.stderr)
        except (tokens_mod.TokenRequestError, tokens_mod.GrantError, PasswordPolicyError) as exc:
            print("error: %s" % exc, file=sys.stderr)
        except ConflictError as exc:
            print("error: %s" % exc, file=sys.stderr)
        except StoreError as exc:
            print("error: %s" % exc, file=sys.stderr)
        except Exception as exc:  # a hub-state error from load_hub, an OSError ...
            print("error: %s" % (str(exc) or type(exc).__name__), file=sys.stderr)
        return 1

    wrapped.__doc__ = handler.__doc__
    return wrapped


def _record_json(record: Any, now: int) -> dict:
    return {
        "id": record.id, "name": record.name, "user_id": record.user_id, "hint": record.hint,
        "scopes": list(record.scopes),
        "devices": None if record.devices is None else list(record.devices),
        "created_ms": record.created_ms, "expires_ms": record.expires_ms,
        "last_used_ms": record.last_used_ms, "revoked_ms": record.revoked_ms,
        "status": "revoked" if record.revoked_ms is not None
        else ("expired" if record.expires_ms <= now else "active"),
    }


@_run
def cmd_token_create(args: argparse.Namespace) -> int:
    """Create an API token and print it once."""
    lifetime = tokens_mod.parse_duration(args.expires) if args.expires else None
    with _open_hub(args) as ctx:
        user = _pick_user(ctx, args.user)
        now = _now_ms()
        device_ids = None
        if args.device:
            device_ids = []
            for ref in args.device:
                device = ctx.store.get_device(ref)
                if device is None and hasattr(ctx.store, "get_device_by_name"):
                    device = ctx.store.get_device_by_name(ref)
                if device is None:
                    raise CommandError("no device %r" % ref)
                device_ids.append(device.id)
        keys = tokens_mod.TokenKeys.from_context(ctx)
        token, record = tokens_mod.issue_token(keys, ctx.store, user, args.scope, device_ids,
                                               lifetime, args.name or "", now)
        ctx.store.add_audit("token.created", "cli:user:" + user.username, "local",
                            {"token": record.id, "scopes": record.scopes,
                             "devices": record.devices, "expires_ms": record.expires_ms}, now)
    if args.json:
        print(json.dumps(dict(_record_json(record, now), token=token)))
    else:
        print(token)
    print("This token is shown once and cannot be shown again; store it now. Id: %s, expires %s."
          % (record.id, _when(record.expires_ms)), file=sys.stderr)
    return 0


@_run
def cmd_token_list(args: argparse.Namespace) -> int:
    """List tokens (never the tokens themselves)."""
    with _open_hub(args) as ctx:
        users = {u.id: u.username for u in ctx.store.list_users()}
        user_id = None
        if args.user:
            user_id = _pick_user(ctx, args.user).id
        records = ctx.store.list_tokens(user_id)
    now = _now_ms()
    if args.json:
        print(json.dumps([dict(_record_json(r, now), user=users.get(r.user_id)) for r in records]))
        return 0
    rows = [("ID", "NAME", "USER", "HINT", "SCOPES", "DEVICES", "CREATED", "LAST USED", "EXPIRES",
             "STATUS")]
    for r in records:
        info = _record_json(r, now)
        rows.append((r.id, r.name or "-", users.get(r.user_id, r.user_id), "..." + r.hint,
                     ",".join(r.scopes), "all" if r.devices is None else ",".join(r.devices),
                     _when(r.created_ms), _when(r.last_used_ms), _when(r.expires_ms),
                     info["status"]))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(str(cell).ljust(widths[i]) for i, cell in enumerate(row)).rstrip())
    return 0


@_run
def cmd_token_revoke(args: argparse.Namespace) -> int:
    """Revoke one token, or all tokens (of one user with --user)."""
    if bool(args.all) == bool(args.id):
        raise CommandError("name a token id, or give --all")
    with _open_hub(args) as ctx:
        now = _now_ms()
        if args.id:
            record = ctx.store.get_token(args.id)
            if record is None:
                raise CommandError("no token %r" % args.id)
            if record.revoked_ms is None:
                ctx.store.revoke_token(record.id, now)
                ctx.store.add_audit("token.revoked", "cli", "local", {"token": record.id}, now)
            count = 1
        else:
            users = [_pick_user(ctx, args.user)] if args.user else ctx.store.list_users()
            count = 0
            for user in users:
                count += ctx.store.revoke_all_tokens(user.id, now)
                ctx.store.set_tokens_valid_after(user.id, now)
                ctx.store.add_audit("token.revoked_all", "cli", "local",
                                    {"user": user.username}, now)
    if args.json:
        print(json.dumps({"revoked": count}))
    else:
        print("revoked %d token%s" % (count, "" if count == 1 else "s"))
    return 0


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        line = sys.stdin.readline()
        return line[:-1] if line.endswith("\n") else line
    first = getpass.getpass("Password: ")
    check_password_policy(first)
    if getpass.getpass("Repeat password: ") != first:
        raise CommandError("the passwords differ")
    return first


@_run
def cmd_user_add(args: argparse.Namespace) -> int:
    """Create a dashboard account."""
    password = _read_password(args.password_stdin)
    password_hash = hash_password(password)
    with _open_hub(args) as ctx:
        now = _now_ms()
        user = ctx.store.add_user(args.name, password_hash, now)
        ctx.store.add_audit("user.added", "cli", "local", {"username": user.username}, now)
    if args.json:
        print(json.dumps({"id": user.id, "username": user.username, "created_ms": user.created_ms}))
    else:
        print("user %s created (%s)" % (user.username, user.id))
    return 0


@_run
def cmd_user_list(args: argparse.Namespace) -> int:
    """List dashboard accounts."""
    with _open_hub(args) as ctx:
        users = ctx.store.list_users()
    if args.json:
        print(json.dumps([{"id": u.id, "username": u.username, "created_ms": u.created_ms}
                          for u in users]))
        return 0
    for u in users:
        print("%s  %s  created %s" % (u.id, u.username, _when(u.created_ms)))
    return 0


def register(subparsers: Any, common_parent: argparse.ArgumentParser) -> None:
    """Add the ``token`` and ``user`` commands to the ``smartx-hub`` parser."""
    parents = [common_parent] if common_parent is not None else []
    scope_help = "one of: " + ", ".join(tokens_mod.SCOPES)

    token = subparsers.add_parser("token", help="create, list and revoke API tokens",
                                  description="API tokens for scripts (docs/api.md).")
    token_sub = token.add_subparsers(dest="token_command", metavar="COMMAND", required=True)

    create = token_sub.add_parser("create", parents=parents, help="create a token (shown once)")
    create.add_argument("--scope", action="append", required=True, choices=tokens_mod.SCOPES,
                        metavar="SCOPE", help="a scope to grant; repeat for more (%s)" % scope_help)
    create.add_argument("--device", action="append", metavar="ID",
                        help="limit the token to this device (id or name); repeat for more")
    create.add_argument("--expires", metavar="DURATION",
                        help="lifetime like 30d, 12h, 90m (default 90d, at most 365d)")
    create.add_argument("--name", default="", help="a label to recognise the token by")
    create.add_argument("--user", help="the account the token acts for (default: the only one)")
    create.add_argument("--json", action="store_true", help="print JSON")
    create.set_defaults(func=cmd_token_create)

    listing = token_sub.add_parser("list", parents=parents, help="list tokens (never the token)")
    listing.add_argument("--user", help="only this user's tokens")
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(func=cmd_token_list)

    revoke = token_sub.add_parser("revoke", parents=parents,
                                  help="revoke a token by id, or all with --all")
    revoke.add_argument("id", nargs="?", help="the token id (see token list)")
    revoke.add_argument("--all", action="store_true", help="revoke every token")
    revoke.add_argument("--user", help="with --all: only this user's tokens")
    revoke.add_argument("--json", action="store_true", help="print JSON")
    revoke.set_defaults(func=cmd_token_revoke)

    user = subparsers.add_parser("user", help="dashboard accounts",
                                 description="Dashboard accounts.")
    user_sub = user.add_subparsers(dest="user_command", metavar="COMMAND", required=True)
    add = user_sub.add_parser("add", parents=parents, help="create an account")
    add.add_argument("name", help="the username")
    add.add_argument("--password-stdin", action="store_true",
                     help="read the password from the first line of stdin (else prompt)")
    add.add_argument("--json", action="store_true", help="print JSON")
    add.set_defaults(func=cmd_user_add)
    users = user_sub.add_parser("list", parents=parents, help="list accounts")
    users.add_argument("--json", action="store_true", help="print JSON")
    users.set_defaults(func=cmd_user_list)
