"""Shared test helpers for the hub: a hub in a temporary directory, enrolled devices, and a
minimal blocking device client built on the protocol core (real TLS, real sockets).

Nothing here fakes the hub: tests talk to a real listener over loopback TLS.
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import socket
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from smartx_device import messages as m
from smartx_device import session as core
from smartx_device.errors import RemoteProtocolError
from smartx_hub import pki
from smartx_hub.state import init_hub

TOKEN_TYP = "sx-device+jwt"
ALGORITHMS = {"es256": "ES256", "eddsa": "EdDSA", "hs256": "HS256"}


def make_hub(tmp_path: Any, name: str = "hub") -> Any:
    """A fresh hub (``HubContext``) in ``tmp_path/name``; close it when done."""
    return init_hub(os.path.join(str(tmp_path), name))


@dataclass
class Credentials:
    """What a device holds: its id, auth kind, and its private key or secret."""

    device_id: str
    auth: str
    private_key: Any = None
    secret: Optional[bytes] = None
    public_key_pem: Optional[bytes] = None

    @property
    def signing_key(self) -> Any:
        """The key PyJWT signs with for this device's algorithm."""
        return self.secret if self.auth == "hs256" else self.private_key


def enrol(store: Any, name: str, auth: str = "es256", now_ms: Optional[int] = None) -> Credentials:
    """Enrol a device directly in the store and return its credentials."""
    now_ms = now_ms if now_ms is not None else int(time.time() * 1000)
    if auth == "hs256":
        secret = os.urandom(32)
        device = store.add_device(name, auth, None, secret, now_ms)
        return Credentials(device.id, auth, secret=secret)
    key = ec.generate_private_key(ec.SECP256R1()) if auth == "es256" \
        else ed25519.Ed25519PrivateKey.generate()
    public_pem = pki.public_key_pem(key)
    device = store.add_device(name, auth, public_pem, None, now_ms)
    return Credentials(device.id, auth, private_key=key, public_key_pem=public_pem)


def b64url(data: bytes) -> str:
    """base64url without padding."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def device_token(creds: Credentials, challenge: m.AuthChallenge, key: Any = None,
                 algorithm: Optional[str] = None, headers: Optional[dict] = None,
                 **claim_overrides: Any) -> str:
    """The device JWT answering ``challenge`` (the contract's claims, in order), with optional
    overrides to make a wrong one: another key, algorithm, header, or claims (None drops one)."""
    iat = challenge.hub_time_ms // 1000
    claims = {"sub": creds.device_id, "aud": challenge.hub_id, "iat": iat, "exp": iat + 300,
              "nonce": b64url(challenge.nonce)}
    for name, value in claim_overrides.items():
        if value is None:
            claims.pop(name, None)
        else:
            claims[name] = value
    header = {"typ": TOKEN_TYP}
    header.update(headers or {})
    return jwt.encode(claims, key if key is not None else creds.signing_key,
                      algorithm=algorithm or ALGORITHMS[creds.auth], headers=header)


def unsigned_token(claims: dict, header: dict) -> str:
    """A JWS with ``alg: none`` and an empty signature, built by hand (PyJWT won't)."""
    import json

    def part(value: dict) -> str:
        return b64url(json.dumps(value, separators=(",", ":")).encode("utf-8"))

    return "%s.%s." % (part(header), part(claims))


class HubClosed(Exception):
    """The hub closed the session; ``event`` is the SessionClosed."""

    def __init__(self, event: core.SessionClosed) -> None:
        super().__init__("hub closed the session: reason %s" % event.reason)
        self.event = event


@dataclass
class DeviceClient:
    """A blocking device on the protocol core over TLS (or plaintext with ``ca_pem=None``)."""

    port: int
    ca_pem: Optional[bytes]
    host: str = "127.0.0.1"
    server_name: str = "localhost"
    source_ip: Optional[str] = None
    timeout: float = 5.0
    tls_context: Optional[ssl.SSLContext] = None
    sock: Any = None
    session: Any = None
    events: list = field(default_factory=list)
    challenge: Optional[m.AuthChallenge] = None
    accepted: Optional[m.Accepted] = None
    closed: Optional[core.SessionClosed] = None

    def connect(self) -> "DeviceClient":
        """Open TCP (and TLS); start a device session."""
        source = (self.source_ip, 0) if self.source_ip else None
        raw = socket.create_connection((self.host, self.port), timeout=self.timeout,
                                       source_address=source)
        if self.ca_pem is not None or self.tls_context is not None:
            context = self.tls_context or pki.client_tls_context(self.ca_pem)
            try:
                self.sock = context.wrap_socket(raw, server_hostname=self.server_name)
            except BaseException:
                raw.close()
                raise
        else:
            self.sock = raw
        self.session = core.DeviceSession(_now())
        return self

    def write(self, data: bytes) -> None:
        """Write raw bytes (for garbage and oversized-frame tests)."""
        self.sock.sendall(data)

    def send(self, message: m.Message) -> None:
        """Send one message through the core."""
        self.write(self.session.send(message, _now()))

    def read_events(self, timeout: Optional[float] = None) -> list:
        """Read once (up to ``timeout``) and return the events the bytes complete; [] on timeout.
        End of stream yields the core's SessionClosed."""
        self.sock.settimeout(self.timeout if timeout is None else timeout)
        try:
            data = self.sock.recv(65536)
        except socket.timeout:
            return []
        except (ConnectionError, ssl.SSLError, OSError):
            data = b""
        try:
            events = self.session.receive_data(data, _now())
        except RemoteProtocolError as exc:
            events = getattr(exc, "events", [])
        pending = self.session.data_to_send()
        if pending:
            try:
                self.sock.sendall(pending)
            except OSError:
                pass
        for event in events:
            if isinstance(event, core.SessionClosed) and self.closed is None:
                self.closed = event
        self.events.extend(events)
        return events

    def wait_for(self, predicate: Callable[[Any], bool], timeout: Optional[float] = None) -> Any:
        """Read until an event matching ``predicate`` arrives; ``HubClosed`` if the session ends
        first, ``TimeoutError`` if nothing comes in time."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        for event in list(self.events):
            if predicate(event):
                self.events.remove(event)
                return event
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no matching event in time")
            for event in self.read_events(remaining):
                if predicate(event):
                    self.events.remove(event)
                    return event
                if isinstance(event, core.SessionClosed):
                    raise HubClosed(event)

    def wait_closed(self, timeout: Optional[float] = None) -> core.SessionClosed:
        """Read until the session ends; return its SessionClosed."""
        if self.closed is not None:
            return self.closed
        return self.wait_for(lambda e: isinstance(e, core.SessionClosed), timeout)

    def hello(self, device_id: str) -> m.AuthChallenge:
        """Send Hello; return the hub's AuthChallenge."""
        self.write(self.session.start(device_id, _now()))
        event = self.wait_for(lambda e: isinstance(e, core.ChallengeReceived))
        self.challenge = event.message
        return self.challenge

    def authenticate(self, token: str) -> m.Accepted:
        """Answer the challenge; return Accepted (``HubClosed`` if refused)."""
        self.write(self.session.authenticate(token, _now()))
        event = self.wait_for(lambda e: isinstance(e, core.SessionEstablished))
        self.accepted = event.message
        return self.accepted

    def handshake(self, creds: Credentials, **token_options: Any) -> m.Accepted:
        """Hello, challenge, a token for it (see ``device_token`` options), Accepted."""
        challenge = self.hello(creds.device_id)
        return self.authenticate(device_token(creds, challenge, **token_options))

    def telemetry(self, msg_id: int, readings: list, timeout: Optional[float] = None) -> None:
        """Send one Telemetry batch and wait for its Ack."""
        self.send(m.Telemetry(msg_id=msg_id, readings=readings))
        self.wait_for(lambda e: isinstance(e, core.MessageReceived)
                      and isinstance(e.message, m.Ack) and e.message.msg_id == msg_id, timeout)

    def close(self) -> None:
        """Close the socket (no Close message: tests that want one send it)."""
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
            self.sock = None

    def __enter__(self) -> "DeviceClient":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


def connect_device(port: int, ca_pem: Optional[bytes], creds: Optional[Credentials] = None,
                   **options: Any) -> DeviceClient:
    """Connect (and, given ``creds``, verify) a device client."""
    client = DeviceClient(port, ca_pem, **options).connect()
    if creds is not None:
        try:
            client.handshake(creds)
        except BaseException:
            client.close()
            raise
    return client


def _now() -> int:
    return time.time_ns() // 1_000_000


def wait_until(predicate: Callable[[], Any], timeout: float = 5.0, interval: float = 0.02) -> Any:
    """Poll ``predicate`` until it is truthy (returned) or ``timeout`` passes (AssertionError)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError("condition not met within %.1f s" % timeout)
        time.sleep(interval)


@contextlib.contextmanager
def https_server(app, ctx, **uvicorn_options):
    """Serve ``app`` over HTTPS with the hub's certificate on an ephemeral loopback port, in
    a thread; yield its base URL. Stops the server on exit."""
    from smartx_hub.api import build_server

    server = build_server(app, ctx, "127.0.0.1", 0, **uvicorn_options)
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield "https://127.0.0.1:%d" % port
    finally:
        server.should_exit = True
        thread.join(15)


def start_serve(data_dir: str, device_port: int, api_port: int = 0,
                timeout: float = 30.0) -> subprocess.Popen:
    """``python -m smartx_hub serve`` on ``data_dir`` as a real subprocess (stdout and stderr
    piped, text), returned once its banner names the device port; the caller ends it."""
    process = subprocess.Popen(
        [sys.executable, "-m", "smartx_hub", "serve", "--data", data_dir, "--host", "127.0.0.1",
         "--device-port", str(device_port), "--api-port", str(api_port)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    banner = ""
    deadline = time.monotonic() + timeout
    while "CA fingerprint" not in banner and time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        banner += line
    if not re.search(r"tls://\S+:%d" % device_port, banner):
        process.kill()
        process.wait()
        raise AssertionError("serve did not start: %r" % banner)
    return process
