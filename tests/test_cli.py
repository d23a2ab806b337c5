"""``smartx-hub`` as a real subprocess (init, device, keys), plus the hub state it manages
(smartx_hub/state.py): refusing re-init, crash-safe key rotation, the serve hand-off."""

from __future__ import annotations

import base64
import json
import os
import queue
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import types

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from smartx_hub import cli, gateway_pki, pki, state
from smartx_hub.bundle import BundleError, read_bundle, validate_bundle, write_bundle
from smartx_hub.crypto import Keyring, SealError, generate_master_key, load_master_key, write_master_key
from smartx_hub.limits import ListenerLimits
from smartx_hub.pki import ca_fingerprint
from smartx_hub.sqlite_store import SQLiteStore
from smartx_hub.store import TelemetryBatch

CONSOLE_SCRIPT = os.path.join(os.path.dirname(sys.executable), "smartx-hub")


def run(*argv, cwd, env_extra=None, script=False):
    """Run the CLI; return (exit status, stdout, stderr)."""
    env = {k: v for k, v in os.environ.items() if k != cli.DATA_ENV}
    env.update(env_extra or {})
    command = [CONSOLE_SCRIPT] if script else [sys.executable, "-m", "smartx_hub"]
    proc = subprocess.run(command + [str(a) for a in argv], cwd=str(cwd), env=env,
                          capture_output=True, text=True, timeout=60)
    return proc.returncode, proc.stdout, proc.stderr


def assert_one_line_error(code, out, err, expected_code=1, contains=""):
    assert code == expected_code, (code, out, err)
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    assert contains.lower() in lines[0].lower(), err


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """One hub made by `smartx-hub init`, shared by the tests that only add to it."""
    work = tmp_path_factory.mktemp("cli")
    data = work / "data"
    code, out, err = run("init", "--data", data, "--json", cwd=work, script=True)
    assert code == 0, err
    info = json.loads(out)
    return types.SimpleNamespace(work=work, data=data, info=info)


def test_init_output_and_files(hub):
    info = hub.info
    assert info["hub_id"].startswith("hub_") and info["data_dir"] == str(hub.data)
    with open(hub.data / "ca.pem", "rb") as handle:
        assert info["ca_fingerprint"] == ca_fingerprint(handle.read())
    assert (info["hosts"], info["device_port"], info["api_port"]) == \
        (["localhost", "127.0.0.1"], 7883, 8443)
    for name in ("master.key", "ca.key", "server.key", "hub.db"):
        assert stat.S_IMODE(os.stat(hub.data / name).st_mode) == 0o600, name
    config = json.loads((hub.data / "hub.json").read_text())
    assert config["hub_id"] == info["hub_id"]


def test_init_text_output_and_options(tmp_path):
    code, out, err = run("init", "--data", tmp_path / "d", "--host", "hub.lan", "--host",
                         "10.1.2.3", "--device-port", "9000", "--api-port", "9001", cwd=tmp_path)
    assert code == 0, err
    assert "sha256:" in out and "hub.lan, 10.1.2.3" in out and "9000" in out
    with state.load_hub(str(tmp_path / "d")) as ctx:
        assert (ctx.hosts, ctx.device_port, ctx.api_port) == (["hub.lan", "10.1.2.3"], 9000, 9001)
        assert ctx.ca_fingerprint in out


def test_reinit_is_refused_and_changes_nothing(hub):
    before = {name: (hub.data / name).read_bytes() for name in ("hub.json", "master.key", "ca.pem")}
    code, out, err = run("init", "--data", hub.data, cwd=hub.work)
    assert_one_line_error(code, out, err, contains="already holds a hub")
    assert {name: (hub.data / name).read_bytes() for name in before} == before


def test_failed_init_leaves_nothing_behind(tmp_path):
    code, out, err = run("init", "--data", tmp_path / "d", "--host", "not a host!", cwd=tmp_path)
    assert_one_line_error(code, out, err, contains="not a host")
    assert not (tmp_path / "d").exists() or os.listdir(tmp_path / "d") == []
    code, out, err = run("init", "--data", tmp_path / "d", "--device-port", "99999", cwd=tmp_path)
    assert_one_line_error(code, out, err, expected_code=2, contains="65535")


def test_partial_hub_files_block_init(tmp_path):
    (tmp_path / "d").mkdir()
    write_master_key(str(tmp_path / "d" / "master.key"), generate_master_key())
    code, out, err = run("init", "--data", tmp_path / "d", cwd=tmp_path)
    assert_one_line_error(code, out, err, contains="master.key")


def check_bundle(bundle_path, hub, name, auth):
    assert stat.S_IMODE(os.stat(bundle_path).st_mode) == 0o600
    bundle = read_bundle(str(bundle_path))
    assert (bundle["name"], bundle["auth"], bundle["hub_id"]) == (name, auth, hub.info["hub_id"])
    assert bundle["ca_fingerprint"] == hub.info["ca_fingerprint"]
    assert (bundle["hub_host"], bundle["hub_port"], bundle["server_name"]) == \
        ("localhost", 7883, "localhost")
    assert list(json.loads(bundle_path.read_text())) == [
        k for k in ("version", "device_id", "name", "hub_id", "auth", "secret_b64",
                    "private_key_pem", "client_cert_pem", "client_key_pem", "ca_pem",
                    "ca_fingerprint", "hub_host", "hub_port", "server_name") if k in bundle]
    return bundle


@pytest.mark.parametrize("auth", ["es256", "eddsa", "hs256"])
def test_device_add_each_auth(hub, auth):
    name = "sensor-" + auth
    argv = ["device", "add", name, "--data", hub.data, "--json"]
    if auth != "es256":  # es256 is the default
        argv += ["--auth", auth]
    code, out, err = run(*argv, cwd=hub.work)
    assert code == 0, err
    result = json.loads(out)
    assert (result["name"], result["auth"], result["enabled"]) == (name, auth, True)
    assert (result["kind"], result["gateway_id"]) == ("device", None)
    bundle_path = hub.work / (name + ".smartx.json")
    assert result["bundle"] == str(bundle_path)
    bundle = check_bundle(bundle_path, hub, name, auth)
    with state.load_hub(str(hub.data)) as ctx:
        device = ctx.store.get_device(result["id"])
        audit = [e for e in ctx.store.list_audit(limit=50) if e.action == "device.enrolled"
                 and e.detail["device_id"] == device.id]
    assert len(audit) == 1 and audit[0].actor == "cli" and audit[0].source == "local"
    if auth == "hs256":
        assert "private_key_pem" not in bundle
        assert base64.b64decode(bundle["secret_b64"]) == device.secret
        assert len(device.secret) == 32 and device.public_key_pem is None
    else:
        assert "secret_b64" not in bundle
        assert "client_cert_pem" not in bundle and "client_key_pem" not in bundle
        key = serialization.load_pem_private_key(bundle["private_key_pem"].encode(), None)
        expected = ec.EllipticCurvePrivateKey if auth == "es256" else ed25519.Ed25519PrivateKey
        assert isinstance(key, expected)
        public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
        assert device.public_key_pem == public and device.secret is None
        assert "-----BEGIN PRIVATE KEY-----" not in out + err  # never printed


def test_device_add_with_public_key(hub):
    device_key = ed25519.Ed25519PrivateKey.generate()
    public = device_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo)
    (hub.work / "dev.pub").write_bytes(public)
    out_path = hub.work / "custom" / "board.json"
    out_path.parent.mkdir()
    code, out, err = run("device", "add", "own-key", "--auth", "eddsa", "--public-key", "dev.pub",
                         "--out", out_path, "--data", hub.data, cwd=hub.work)
    assert code == 0, err
    assert "Enrolled device dev_" in out
    bundle = check_bundle(out_path, hub, "own-key", "eddsa")
    assert "private_key_pem" not in bundle and "secret_b64" not in bundle
    with state.load_hub(str(hub.data)) as ctx:
        assert ctx.store.get_device(bundle["device_id"]).public_key_pem == public


def test_device_add_refusals(hub):
    ec_public = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    (hub.work / "ec.pub").write_bytes(ec_public)
    private = ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())
    (hub.work / "ed.key").write_bytes(private)
    (hub.work / "taken.smartx.json").write_text("{}")
    cases = [
        (["r1", "--auth", "eddsa", "--public-key", "ec.pub"], "Ed25519", 1),
        (["r2", "--public-key", "ed.key"], "private key", 1),
        (["r3", "--auth", "hs256", "--public-key", "ec.pub"], "hs256", 1),
        (["r4", "--public-key", "missing.pub"], "cannot read", 1),
        (["taken"], "already exists", 1),
    ]
    for extra, message, exit_code in cases:
        code, out, err = run("device", "add", *extra, "--data", hub.data, cwd=hub.work)
        assert_one_line_error(code, out, err, expected_code=exit_code, contains=message)
    assert (hub.work / "taken.smartx.json").read_text() == "{}"
    with state.load_hub(str(hub.data)) as ctx:
        names = {d.name for d in ctx.store.list_devices()}
    assert not names & {"r1", "r2", "r3", "r4", "r5", "taken"}


def test_duplicate_name_is_refused(hub):
    code, _, err = run("device", "add", "dup", "--data", hub.data, cwd=hub.work)
    assert code == 0, err
    original = (hub.work / "dup.smartx.json").read_bytes()
    code, out, err = run("device", "add", "dup", "--out", "dup2.json", "--data", hub.data,
                         cwd=hub.work)
    assert_one_line_error(code, out, err, contains="already exists")
    assert not (hub.work / "dup2.json").exists()
    assert (hub.work / "dup.smartx.json").read_bytes() == original


def test_list_disable_enable_remove(hub):
    code, out, err = run("device", "add", "lamp", "--data", hub.data, "--json", cwd=hub.work)
    assert code == 0, err
    lamp = json.loads(out)["id"]
    code, out, err = run("device", "list", "--json", "--data", hub.data, cwd=hub.work)
    assert code == 0, err
    listed = {d["id"]: d for d in json.loads(out)}
    assert listed[lamp]["name"] == "lamp" and listed[lamp]["enabled"] is True
    assert set(listed[lamp]) == {"id", "name", "auth", "enabled", "created_ms", "last_seen_ms",
                                 "kind", "gateway_id"}
    code, out, _ = run("device", "list", "--data", hub.data, cwd=hub.work)
    assert code == 0 and lamp in out
    assert out.splitlines()[0].split()[:5] == ["ID", "NAME", "KIND", "VIA", "AUTH"]

    # A running hub holds the store open: it must see the CLI's change through devices_version.
    with state.load_hub(str(hub.data)) as running:
        version = running.store.get_meta("devices_version")
        code, out, err = run("device", "disable", lamp, "--json", "--data", hub.data, cwd=hub.work)
        assert code == 0, err
        assert json.loads(out) == {"id": lamp, "name": "lamp", "enabled": False}
        assert running.store.get_meta("devices_version") != version
        assert running.store.get_device(lamp).enabled is False
        code, out, err = run("device", "enable", "lamp", "--data", hub.data, cwd=hub.work)
        assert code == 0 and "Enabled device %s" % lamp in out, err
        assert running.store.get_device(lamp).enabled is True
        running.store.add_telemetry([TelemetryBatch(lamp, 1, [("t", 1, 1)], 1)])
        code, out, err = run("device", "remove", lamp, "--json", "--data", hub.data, cwd=hub.work)
        assert code == 0, err
        assert json.loads(out)["removed"] is True
        assert running.store.get_device(lamp) is None
        assert running.store.query_telemetry(lamp) == []
        actions = [e.action for e in running.store.list_audit(limit=100)
                   if e.detail.get("device_id") == lamp]
    assert actions == ["device.removed", "device.enabled", "device.disabled", "device.enrolled"]
    for action in ("disable", "enable", "remove"):
        code, out, err = run("device", action, lamp, "--data", hub.data, cwd=hub.work)
        assert_one_line_error(code, out, err, contains="no device")


def test_missing_hub_is_one_line_error(tmp_path):
    code, out, err = run("device", "list", "--data", tmp_path / "nothing", cwd=tmp_path)
    assert_one_line_error(code, out, err, contains="no hub")
    code, out, err = run("frobnicate", cwd=tmp_path)
    assert_one_line_error(code, out, err, expected_code=2, contains="invalid choice")


def test_usage_errors_are_one_line(tmp_path, capsys):
    """Parse errors, in-process (the same ``main`` the subprocesses above run)."""
    cases = [
        (["device"], "required"),
        (["device", "disable"], "required"),
        (["init", "--device-port", "x"], "not a port"),
        (["device", "add", "x", "--auth", "rsa"], "invalid choice"),
        (["device", "list", "--bogus"], "unrecognized"),
        ([], "required"),
    ]
    for argv, message in cases:
        assert cli.main(argv) == 2
        captured = capsys.readouterr()
        assert_one_line_error(2, captured.out, captured.err, expected_code=2, contains=message)


def test_data_dir_defaults_to_the_environment(hub, tmp_path):
    code, out, err = run("device", "list", "--json", cwd=tmp_path,
                         env_extra={cli.DATA_ENV: str(hub.data)})
    assert code == 0, err
    assert isinstance(json.loads(out), list)
    code, out, err = run("device", "list", cwd=tmp_path)  # ./smartx-data: none here
    assert_one_line_error(code, out, err, contains="smartx-data")


def test_help_everywhere(capsys):
    commands = [[], ["init"], ["serve"], ["device"], ["device", "add"], ["device", "list"],
                ["device", "assign"], ["device", "disable"], ["device", "enable"],
                ["device", "remove"], ["keys"], ["keys", "rotate"]]
    for argv in commands:
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv + ["--help"])
        assert exit_info.value.code == 0
        assert "usage: smartx-hub" in capsys.readouterr().out
    for argv in (["init"], ["device", "add"], ["device", "list"], ["device", "assign"],
                 ["keys", "rotate"]):
        with pytest.raises(SystemExit):
            cli.main(argv + ["--help"])
        assert "--json" in capsys.readouterr().out


def test_console_script_help(tmp_path):
    code, out, err = run("device", "add", "--help", cwd=tmp_path, script=True)
    assert code == 0 and "--public-key" in out and err == ""


def test_group_readable_master_key_is_refused(tmp_path):
    assert run("init", "--data", tmp_path / "d", cwd=tmp_path)[0] == 0
    os.chmod(tmp_path / "d" / "master.key", 0o640)
    code, out, err = run("device", "list", "--data", tmp_path / "d", cwd=tmp_path)
    assert_one_line_error(code, out, err, contains="chmod 600")


# -- key rotation ------------------------------------------------------------------------


def test_keys_rotate(tmp_path):
    data = tmp_path / "d"
    assert run("init", "--data", data, cwd=tmp_path)[0] == 0
    assert run("device", "add", "h", "--auth", "hs256", "--data", data, cwd=tmp_path)[0] == 0
    with state.load_hub(str(data)) as ctx:
        dev = ctx.store.list_devices()[0]
        ctx.store.add_telemetry([TelemetryBatch(dev.id, 1, [("t", 1, {"v": 21.5})], 1)])
        token_key = ctx.token_signing_key.private_numbers()
        scope_key = ctx.scope_key
        ca_key = ctx.load_ca_key().private_numbers()
        # Rotation needs the hub to itself: a running hub makes it fail, cleanly.
        code, out, err = run("keys", "rotate", "--data", data, cwd=tmp_path)
        assert_one_line_error(code, out, err, contains="in use")
    old_key = load_master_key(str(data / "master.key"))
    code, out, err = run("keys", "rotate", "--json", "--data", data, cwd=tmp_path)
    assert code == 0, err
    result = json.loads(out)
    assert result["data_keys"] >= 5 and result["kept_old"] is None
    assert result["old_key_id"] != result["new_key_id"]
    new_key = load_master_key(str(data / "master.key"))
    assert new_key != old_key
    assert sorted(p for p in os.listdir(data) if p.startswith("master.key")) == ["master.key"]
    with state.load_hub(str(data)) as ctx:
        assert ctx.store.get_device(dev.id).secret == dev.secret
        assert ctx.store.query_telemetry(dev.id)[0].value == {"v": 21.5}
        assert ctx.token_signing_key.private_numbers() == token_key
        assert ctx.scope_key == scope_key
        assert ctx.load_ca_key().private_numbers() == ca_key
        assert ctx.keyring.master_key_id == result["new_key_id"]
        assert [e.action for e in ctx.store.list_audit(limit=1)] == ["keys.rotated"]
    with pytest.raises(SealError):
        SQLiteStore(str(data / "hub.db"), Keyring(old_key))
    code, out, err = run("keys", "rotate", "--keep-old", "--data", data, cwd=tmp_path)
    assert code == 0, err
    kept = [p for p in os.listdir(data) if p.startswith("master.key.old-")]
    assert len(kept) == 1 and kept[0] in out
    assert load_master_key(str(data / kept[0])) == new_key


def test_rotation_interrupted_after_commit_is_finished_on_load(tmp_path):
    data = str(tmp_path / "d")
    with state.init_hub(data) as ctx:
        dev = ctx.store.add_device("h", "hs256", None, b"s" * 32, 1)
        new_key = generate_master_key()
        # Steps 1-3 of the rotation, then a "crash" before the rename.
        write_master_key(os.path.join(data, state.NEW_MASTER_KEY_FILE), new_key)
        ctx.store.rotate_master_key(new_key)
    with state.load_hub(data) as ctx:
        assert ctx.store.get_device(dev.id).secret == b"s" * 32
    assert load_master_key(os.path.join(data, "master.key")) == new_key
    assert not os.path.exists(os.path.join(data, state.NEW_MASTER_KEY_FILE))


def test_rotation_interrupted_before_commit_keeps_the_old_key(tmp_path):
    data = str(tmp_path / "d")
    with state.init_hub(data) as ctx:
        dev = ctx.store.add_device("h", "hs256", None, b"s" * 32, 1)
    old_key = load_master_key(os.path.join(data, "master.key"))
    write_master_key(os.path.join(data, state.NEW_MASTER_KEY_FILE), generate_master_key())
    with state.load_hub(data) as ctx:
        assert ctx.store.get_device(dev.id).secret == b"s" * 32
    assert load_master_key(os.path.join(data, "master.key")) == old_key
    assert not os.path.exists(os.path.join(data, state.NEW_MASTER_KEY_FILE))


def test_wrong_master_key_is_a_clear_error(tmp_path):
    data = str(tmp_path / "d")
    state.init_hub(data).close()
    write_master_key(os.path.join(data, "master.key"), generate_master_key())
    with pytest.raises(state.HubStateError, match="does not open"):
        state.load_hub(data)
    code, out, err = run("device", "list", "--data", data, cwd=tmp_path)
    assert_one_line_error(code, out, err, contains="does not open")


# -- the hub context ---------------------------------------------------------------------


def test_hub_context_keys(tmp_path):
    with state.init_hub(str(tmp_path / "d"), now_ms=5) as ctx:
        hub_id, kid = ctx.hub_id, ctx.token_key_id
        assert hub_id.startswith("hub_") and len(ctx.scope_key) == 32
        assert isinstance(ctx.token_signing_key, ec.EllipticCurvePrivateKey)
        assert ctx.token_public_key.public_numbers() == \
            ctx.token_signing_key.public_key().public_numbers()
        assert ctx.config["hub_id"] == hub_id and ctx.store.get_meta("hub_id") == hub_id
        assert ctx.store.get_meta("token_key_id") == kid
        raw_db = (tmp_path / "d" / "hub.db").read_bytes() + \
            (tmp_path / "d" / "hub.db-wal").read_bytes()
        secret = ctx.token_signing_key.private_numbers().private_value.to_bytes(32, "big")
        assert secret not in raw_db and ctx.scope_key not in raw_db
    with state.load_hub(str(tmp_path / "d")) as again:
        assert (again.hub_id, again.token_key_id) == (hub_id, kid)


def test_init_refuses_existing_hub_in_process(tmp_path):
    state.init_hub(str(tmp_path / "d")).close()
    with pytest.raises(state.HubExistsError):
        state.init_hub(str(tmp_path / "d"))


# -- serve hand-off ----------------------------------------------------------------------


def test_serve_without_server_module_is_a_clear_error(hub, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "smartx_hub.server", None)  # makes the import fail
    assert cli.main(["serve", "--data", str(hub.data)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "smartx_hub.server" in err


def fake_server(monkeypatch):
    """Replace smartx_hub.server by a module whose serve records its arguments."""
    calls = []
    fake = types.ModuleType("smartx_hub.server")

    async def serve(ctx, *, host, device_port, api_port, insecure_dev, advertise, limits):
        calls.append((ctx.hub_id, host, device_port, api_port, insecure_dev, advertise, limits))
        return 0

    fake.serve = serve
    monkeypatch.setitem(sys.modules, "smartx_hub.server", fake)
    return calls


def test_serve_calls_the_server_with_the_context(hub, monkeypatch):
    calls = fake_server(monkeypatch)
    assert cli.main(["serve", "--data", str(hub.data), "--host", "127.0.0.1", "--api-port",
                     "9443", "--insecure-dev", "--advertise", "lo"]) == 0
    assert calls == [(hub.info["hub_id"], "127.0.0.1", 7883, 9443, True, ["lo"], {})]


def test_serve_passes_limits_and_port_zero(hub, monkeypatch):
    calls = fake_server(monkeypatch)
    assert cli.main(["serve", "--data", str(hub.data), "--device-port", "0", "--api-port", "0",
                     "--limit", "max_connections_per_ip=3", "--limit", " message_rate = 2.5",
                     "--limit", "keepalive_ms=1000", "--limit", "max_frame_size=1_024"]) == 0
    limits = calls[0][-1]
    assert calls[0][2:4] == (0, 0)
    assert limits == {"max_connections_per_ip": 3, "message_rate": 2.5, "keepalive_ms": 1000,
                      "max_frame_size": 1024}
    assert type(limits["max_connections_per_ip"]) is int and type(limits["message_rate"]) is float
    assert ListenerLimits.from_mapping(limits).max_connections_per_ip == 3  # what serve does


def test_serve_usage_errors_are_one_line(hub, monkeypatch, capsys):
    calls = fake_server(monkeypatch)
    cases = [
        (["--limit", "bogus=1"], "unknown limit 'bogus'"),
        (["--limit", "max_connections"], "KEY=VALUE"),
        (["--limit", "=5"], "KEY=VALUE"),
        (["--limit", "max_connections=many"], "whole number"),
        (["--limit", "max_connections=2.5"], "whole number"),
        (["--limit", "message_rate=fast"], "a number"),
        (["--limit", "max_connections=-1"], ">= 0"),
        (["--limit", "message_rate=0"], "> 0"),
        (["--limit", "message_rate=nan"], "> 0"),
        (["--limit", "keepalive_ms=10"], "at least 1000"),
        (["--limit", "auth_backoff_base_ms=400000"], "auth_backoff_max_ms"),
        (["--limit", "max_connections=1", "--limit", "max_connections=2"], "given twice"),
        (["--device-port", "-1"], "0 for any free port"),
        (["--api-port", "70000"], "65535"),
        (["--device-port", "9000", "--api-port", "9000"], "must differ"),
    ]
    for extra, message in cases:
        assert cli.main(["serve", "--data", str(hub.data)] + extra) == 2, extra
        captured = capsys.readouterr()
        assert_one_line_error(2, captured.out, captured.err, expected_code=2, contains=message)
    # Both limits together are consistent; one alone was not.
    assert cli.main(["serve", "--data", str(hub.data), "--limit", "auth_backoff_base_ms=400000",
                     "--limit", "auth_backoff_max_ms=500000"]) == 0
    assert len(calls) == 1


def read_banner(proc, deadline_s=30.0):
    """The lines serve prints once it listens (up to the CA fingerprint), within the deadline."""
    lines: "queue.Queue[str]" = queue.Queue()
    # A thread, not select(): the text stream buffers ahead, so the fd can look idle with a
    # whole banner already read into the buffer.
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    seen = []
    deadline = time.monotonic() + deadline_s
    while not any("CA fingerprint" in line for line in seen):
        try:
            seen.append(lines.get(timeout=max(0.0, deadline - time.monotonic())))
        except queue.Empty:
            raise AssertionError("no banner from serve: %r" % seen) from None
    return "".join(seen)


def start_serve(data, *extra):
    """``smartx-hub serve`` on any free ports as a subprocess; its stderr goes to a file."""
    env = {k: v for k, v in os.environ.items() if k != cli.DATA_ENV}
    err_path = data.parent / "serve.err"
    with open(err_path, "w") as err_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "smartx_hub", "serve", "--data", str(data), "--host",
             "127.0.0.1", "--device-port", "0", "--api-port", "0"] + list(extra),
            stdout=subprocess.PIPE, stderr=err_file, text=True, env=env)
    proc.err_path = err_path
    return proc


def stop_serve(proc):
    """SIGTERM, as an operator would; returns (exit status, stderr)."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise
    return proc.returncode, proc.err_path.read_text()


def dropped(sock) -> bool:
    """Whether the peer closed the connection (without sending anything)."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_serve_on_any_free_port_prints_the_bound_ports(tmp_path):
    data = tmp_path / "d"
    state.init_hub(str(data)).close()
    proc = start_serve(data, "--limit", "max_connections_per_ip=1")
    try:
        banner = read_banner(proc)
        device_port = int(re.search(r"devices: +tls://127\.0\.0\.1:(\d+) ", banner).group(1))
        api_port = int(re.search(r"API: +https://127\.0\.0\.1:(\d+)/", banner).group(1))
        assert 0 < device_port < 65536 and 0 < api_port < 65536 and device_port != api_port
        with state.load_hub(str(data)) as ctx:
            client = ctx.client_tls_context()
            fingerprint = ctx.ca_fingerprint
        assert fingerprint in banner
        # Both printed ports answer TLS with this hub's certificate.
        for port in (api_port, device_port):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
                with client.wrap_socket(raw, server_hostname="localhost") as tls:
                    assert tls.version() in ("TLSv1.2", "TLSv1.3")
                    # --limit reached the listener: one connection per address, so while this
                    # one is open a second is dropped at accept.
                    if port == device_port:
                        with socket.create_connection(("127.0.0.1", port), timeout=5) as second:
                            assert dropped(second)
    finally:
        code, err = stop_serve(proc)
    assert code == 0, err
    assert "Traceback" not in err


def test_serve_insecure_dev_warns_and_serves_plaintext(tmp_path):
    data = tmp_path / "d"
    state.init_hub(str(data)).close()
    proc = start_serve(data, "--insecure-dev")
    try:
        banner = read_banner(proc)
        device_port = int(re.search(r"tcp\+plaintext://127\.0\.0\.1:(\d+) ", banner).group(1))
        api_port = int(re.search(r"API: +http://127\.0\.0\.1:(\d+)/", banner).group(1))
        with socket.create_connection(("127.0.0.1", api_port), timeout=5) as raw:
            raw.sendall(b"GET /openapi.json HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert raw.recv(12).startswith(b"HTTP/1.1 ")  # plain HTTP, no TLS
        assert device_port > 0
    finally:
        code, err = stop_serve(proc)
    assert code == 0, err
    warning = [line for line in err.splitlines() if "WARNING" in line and "insecure-dev" in line]
    assert warning and "WITHOUT TLS" in warning[0]


# -- bundle ------------------------------------------------------------------------------


def test_bundle_validation(hub, tmp_path, cli_in):
    # Its own device: under xdist, the test that enrols "sensor-hs256" may run elsewhere.
    code, _, err = cli_in("device", "add", "bundle-hs", "--auth", "hs256")
    assert code == 0, err
    good = read_bundle(str(hub.work / "bundle-hs.smartx.json"))
    bad_cases = [
        {**good, "extra": 1},
        {k: v for k, v in good.items() if k != "ca_pem"},
        {**good, "version": 2},
        {**good, "version": True},
        {**good, "hub_port": 0},
        {**good, "hub_port": "7883"},
        {**good, "hub_host": None},
        {**good, "server_name": ""},
        {**good, "auth": "rs256"},
        {**good, "device_id": "dev_UPPER"},
        {**good, "secret_b64": "not base64!"},
        {**good, "secret_b64": base64.b64encode(b"short").decode()},
        {**good, "ca_fingerprint": "sha256:" + "0" * 64},
        {**good, "private_key_pem": "x"},
        {**good, "auth": "es256"},  # es256 with a shared secret
    ]
    for bundle in bad_cases:
        with pytest.raises(BundleError):
            validate_bundle(bundle)
    with pytest.raises(BundleError):
        validate_bundle([good])
    assert validate_bundle({**good, "hub_host": ""})  # empty: the device discovers the hub
    path = tmp_path / "b.json"
    write_bundle(str(path), good)
    assert read_bundle(str(path)) == good
    with pytest.raises(BundleError, match="already exists"):
        write_bundle(str(path), good)
    os.chmod(path, 0o644)
    write_bundle(str(path), good, overwrite=True)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    path.write_text("{not json")
    with pytest.raises(BundleError):
        read_bundle(str(path))
    with pytest.raises(BundleError):
        read_bundle(str(tmp_path / "missing.json"))


# -- gateways ----------------------------------------------------------------------------


@pytest.fixture
def cli_in(hub, monkeypatch, capsys):
    """Run ``cli.main`` in this process from the hub's work folder (the subprocess runs above
    cover the process boundary); returns (exit status, stdout, stderr) like ``run``."""
    monkeypatch.chdir(hub.work)
    monkeypatch.delenv(cli.DATA_ENV, raising=False)

    def call(*argv):
        code = cli.main([str(a) for a in argv] + ["--data", str(hub.data)])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return call


def test_gateway_enrolment_and_assignment(hub, cli_in):
    code, out, err = run("device", "add", "pi-gw", "--gateway", "--json", "--data", hub.data,
                         cwd=hub.work)
    assert code == 0, err
    gateway = json.loads(out)
    assert (gateway["kind"], gateway["gateway_id"]) == ("gateway", None)
    bundle = check_bundle(hub.work / "pi-gw.smartx.json", hub, "pi-gw", "es256")
    assert "BEGIN PRIVATE KEY" not in out + err
    # The certificate names the gateway, was issued by the hub's CA, and fits its key.
    assert gateway_pki.gateway_id_from_cert(bundle["client_cert_pem"], bundle["ca_pem"]) == \
        gateway["id"]
    cert = x509.load_pem_x509_certificate(bundle["client_cert_pem"].encode())
    client_key = serialization.load_pem_private_key(bundle["client_key_pem"].encode(), None)
    assert gateway_pki.key_matches_cert(client_key, cert)
    assert bundle["client_key_pem"] != bundle["private_key_pem"]  # TLS key apart from JWT key

    # A board behind it, by the gateway's name; another moved to it and back.
    code, out, err = run("device", "add", "board-1", "--via", "pi-gw", "--auth", "hs256",
                         "--json", "--data", hub.data, cwd=hub.work)
    assert code == 0, err
    board = json.loads(out)
    assert (board["kind"], board["gateway_id"]) == ("device", gateway["id"])
    board_bundle = check_bundle(hub.work / "board-1.smartx.json", hub, "board-1", "hs256")
    assert "client_cert_pem" not in board_bundle  # a board gets no certificate
    code, out, err = cli_in("device", "add", "board-2", "--json")
    assert code == 0, err
    board2 = json.loads(out)["id"]
    code, out, err = run("device", "assign", "board-2", "--via", gateway["id"], "--json",
                         "--data", hub.data, cwd=hub.work)
    assert code == 0, err
    assert json.loads(out) == {"id": board2, "name": "board-2", "gateway_id": gateway["id"]}

    code, out, err = cli_in("device", "list")
    assert code == 0, err
    rows = {line.split()[1]: line.split() for line in out.splitlines()[1:]}
    assert rows["pi-gw"][2:4] == ["gateway", "-"]
    assert rows["board-1"][2:4] == ["device", "pi-gw"]
    code, out, err = cli_in("device", "list", "--json")
    listed = {d["name"]: d for d in json.loads(out)}
    assert listed["board-2"]["gateway_id"] == gateway["id"]

    # A gateway with boards cannot be removed; once they connect directly, it can.
    code, out, err = run("device", "remove", "pi-gw", "--data", hub.data, cwd=hub.work)
    assert_one_line_error(code, out, err, contains="still relays for board-1, board-2")
    for name in ("board-1", "board-2"):
        code, out, err = cli_in("device", "assign", name, "--direct")
        assert code == 0 and "now connects directly" in out, err
    with state.load_hub(str(hub.data)) as ctx:
        assert ctx.store.get_device(board["id"]).gateway_id is None
        audit = [(e.action, e.detail) for e in ctx.store.list_audit(limit=100)
                 if e.detail.get("device_id") in (gateway["id"], board["id"], board2)]
    assert ("device.assigned", {"device_id": board2, "name": "board-2",
                                "gateway_id": gateway["id"], "previous_gateway_id": None}) in audit
    enrolled = [d for a, d in audit if a == "device.enrolled" and d["device_id"] == board["id"]]
    assert enrolled[0]["gateway_id"] == gateway["id"] and enrolled[0]["kind"] == "device"
    code, out, err = cli_in("device", "remove", "pi-gw")
    assert code == 0, err


def test_gateway_refusals(hub, cli_in):
    assert cli_in("device", "add", "gw-r", "--gateway")[0] == 0
    assert cli_in("device", "add", "plain-r")[0] == 0
    cases = [
        (["device", "add", "x1", "--gateway", "--via", "gw-r"], "exclude each other", 2),
        (["device", "add", "x2", "--via", "plain-r"], "not a gateway", 1),
        (["device", "add", "x3", "--via", "nowhere"], "no gateway", 1),
        (["device", "assign", "plain-r", "--via", "plain-r"], "not a gateway", 1),
        (["device", "assign", "gw-r", "--via", "gw-r"], "gateways connect directly", 1),
        (["device", "assign", "gw-r", "--direct"], "gateways connect directly", 1),
        (["device", "assign", "missing", "--direct"], "no device", 1),
        (["device", "assign", "plain-r"], "required", 2),
        (["device", "assign", "plain-r", "--direct", "--via", "gw-r"], "not allowed", 2),
    ]
    for argv, message, exit_code in cases:
        assert_one_line_error(*cli_in(*argv), expected_code=exit_code, contains=message)
    with state.load_hub(str(hub.data)) as ctx:
        names = {d.name for d in ctx.store.list_devices()}
        assert ctx.store.get_device_by_name("plain-r").gateway_id is None
    assert not names & {"x1", "x2", "x3"}
    assert not any((hub.work / ("%s.smartx.json" % n)).exists() for n in ("x1", "x2", "x3"))


def test_gateway_bundle_validation(hub, cli_in):
    code, out, err = cli_in("device", "add", "gw-b", "--gateway", "--auth", "eddsa")
    assert code == 0, err
    good = read_bundle(str(hub.work / "gw-b.smartx.json"))
    with state.load_hub(str(hub.data)) as ctx:
        ca_key = ctx.load_ca_key()
        ca_cert = x509.load_pem_x509_certificate(ctx.ca_cert_pem)
    other_key, other_cert = gateway_pki.create_gateway_cert(ca_key, ca_cert, "dev_" + "q" * 16, 1)
    stranger_ca_key, stranger_ca = pki.create_ca("hub_" + "z" * 16, 1)
    _, stranger_cert = gateway_pki.create_gateway_cert(stranger_ca_key, stranger_ca,
                                                       good["device_id"], 1)
    server_cert_pem = (hub.data / "server.pem").read_text()
    server_key_pem = (hub.data / "server.key").read_text()
    pem = lambda cert: pki.cert_pem(cert).decode()  # noqa: E731
    bad_cases = {
        "certificate without key": {k: v for k, v in good.items() if k != "client_key_pem"},
        "key without certificate": {k: v for k, v in good.items() if k != "client_cert_pem"},
        "another gateway's certificate": {
            **good, "client_cert_pem": pem(other_cert),
            "client_key_pem": pki.private_key_pem(other_key).decode()},
        "a stranger CA's certificate": {**good, "client_cert_pem": pem(stranger_cert)},
        "the server certificate": {**good, "client_cert_pem": server_cert_pem,
                                   "client_key_pem": server_key_pem},
        "a key that is not the certificate's": {**good, "client_key_pem": pki.private_key_pem(
            pki.generate_key()).decode()},
        "an Ed25519 key": {**good, "client_key_pem": good["private_key_pem"]},
        "garbage certificate": {**good, "client_cert_pem": "-----BEGIN CERTIFICATE-----\nx\n"},
        "garbage key": {**good, "client_key_pem": "key"},
        "empty certificate": {**good, "client_cert_pem": ""},
        "not text": {**good, "client_cert_pem": 5},
        "non-ASCII": {**good, "client_key_pem": "\u00e9"},
    }
    for reason, bundle in bad_cases.items():
        with pytest.raises(BundleError):
            validate_bundle(bundle)
            pytest.fail("accepted " + reason)
    assert validate_bundle(dict(good)) == good
    # The device SDK reads a gateway's bundle too (it skips the certificate fields).
    from smartx_device.credentials import Credentials
    assert Credentials(good).device_id == good["device_id"]
