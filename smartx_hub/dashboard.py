"""The dashboard at ``/``: login, devices, a device's telemetry chart, tokens, audit.

Rules (docs/api.md, "Dashboard"):
- Server-side sessions: the ``sx_session`` cookie (HttpOnly, Secure, SameSite=Strict, Path=/)
  holds 32 random bytes; the hub keeps only their SHA-256, so a memory dump of the session table
  names no live cookie. Sessions end after 30 idle minutes or 12 hours, and on logout.
- CSRF: each session has a synchronizer token, put in the page as a meta tag; every API call the
  pages make sends it as ``X-CSRF-Token``, the logout form as a field. Login itself is guarded
  by a double-submit cookie (``sx_login_csrf``), and SameSite=Strict on both cookies.
- Login is throttled per IP and per username (the shield's escalating blocks); an unknown
  username costs the same argon2 time as a wrong password.
- Pages are static HTML shells filled by ``static/app.js`` through the API (the session gives
  full scope); the only server-side values in a page are escaped, and the CSP forbids inline
  script, so nothing a device sends can run in the browser.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import html
import logging
import secrets
import threading
from collections import OrderedDict
from dataclasses import dataclass
from importlib import resources
from typing import Optional

from fastapi import FastAPI, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles

from smartx_hub.api import client_ip, get_api
from smartx_hub.passwords import burn_verify_time, hash_password, needs_rehash, verify_password
from smartx_hub.shield import retry_after_seconds

log = logging.getLogger("smartx_hub.dashboard")

SESSION_COOKIE = "sx_session"
LOGIN_CSRF_COOKIE = "sx_login_csrf"
SESSION_IDLE_MS = 30 * 60_000
SESSION_MAX_MS = 12 * 3_600_000
MAX_SESSIONS = 10_000
MAX_USERNAME_CHARS = 64


@dataclass
class Session:
    """One logged-in browser."""

    user_id: str
    csrf: str
    created_ms: int
    last_ms: int


def _key(cookie: str) -> str:
    return hashlib.sha256(cookie.encode("utf-8", "replace")).hexdigest()


class SessionStore:
    """Server-side sessions in memory, keyed by the hash of the cookie; thread-safe, bounded."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sessions: OrderedDict[str, Session] = OrderedDict()

    def create(self, user_id: str, now_ms: int) -> tuple[str, Session]:
        """Start a session; return the cookie value (shown to the browser only) and the session."""
        cookie = secrets.token_urlsafe(32)
        session = Session(user_id=user_id, csrf=secrets.token_urlsafe(32), created_ms=now_ms,
                          last_ms=now_ms)
        with self._lock:
            self._sessions[_key(cookie)] = session
            while len(self._sessions) > MAX_SESSIONS:
                self._sessions.popitem(last=False)
        return cookie, session

    def get(self, cookie: Optional[str], now_ms: int) -> Optional[Session]:
        """The live session of a cookie (and mark it used), or None."""
        if not cookie or len(cookie) > 128:
            return None
        key = _key(cookie)
        with self._lock:
            session = self._sessions.get(key)
            if session is None:
                return None
            if now_ms - session.last_ms > SESSION_IDLE_MS or now_ms - session.created_ms > SESSION_MAX_MS:
                del self._sessions[key]
                return None
            session.last_ms = now_ms
            self._sessions.move_to_end(key)
            return session

    def drop(self, cookie: Optional[str]) -> None:
        """End a session (logout)."""
        if cookie:
            with self._lock:
                self._sessions.pop(_key(cookie), None)

    def drop_user(self, user_id: str) -> int:
        """End every session of a user; return how many."""
        with self._lock:
            keys = [k for k, s in self._sessions.items() if s.user_id == user_id]
            for k in keys:
                del self._sessions[k]
        return len(keys)

    @staticmethod
    def csrf_ok(session: Session, presented: Optional[str]) -> bool:
        """Whether the presented CSRF token is the session's."""
        return bool(presented) and hmac.compare_digest(presented.encode("utf-8", "replace"),
                                                       session.csrf.encode("utf-8"))


@functools.lru_cache(maxsize=16)
def _template(name: str) -> str:
    return resources.files("smartx_hub").joinpath("templates", name).read_text("utf-8")


def render(template: str, **values: str) -> str:
    """Fill ``{{name}}`` placeholders of a packaged template with HTML-escaped values."""
    text = _template(template)
    for name, value in values.items():
        text = text.replace("{{%s}}" % name, html.escape(value, quote=True))
    return text


def _set_cookie(response: Response, name: str, value: str, max_age: Optional[int]) -> None:
    response.set_cookie(name, value, max_age=max_age, path="/", secure=True, httponly=True,
                        samesite="strict")


def _login_page(error: str = "", status: int = 200,
                headers: Optional[dict] = None) -> HTMLResponse:
    token = secrets.token_urlsafe(32)
    response = HTMLResponse(render("login.html", csrf=token, error=error,
                                   error_class="error" if error else "error hidden"),
                            status_code=status, headers=headers)
    _set_cookie(response, LOGIN_CSRF_COOKIE, token, 600)
    return response


def _page(request: Request, template: str, title: str, device_id: str = "") -> Response:
    """A signed-in page: ``layout.html`` (head, navigation, logout) around the page's body."""
    api = get_api(request)
    session = api.sessions.get(request.cookies.get(SESSION_COOKIE), api.clock())
    user = api.store.get_user(session.user_id) if session is not None else None
    if session is None or user is None:
        return RedirectResponse("/login", status_code=303)
    common = {"csrf": session.csrf, "username": user.username, "device_id": device_id}
    body = render(template, **common)
    layout = render("layout.html", title=title, page=template[:-len(".html")], **common)
    # The body's own placeholders are filled (and escaped) above; it is template text.
    return HTMLResponse(layout.replace("{{content}}", body))


def install(app: FastAPI) -> None:
    """Add the dashboard's pages, login/logout and static files to ``app``."""
    static_dir = resources.files("smartx_hub").joinpath("static")
    app.mount("/static", StaticFiles(directory=str(static_dir)), name="static")

    @app.get("/", include_in_schema=False)
    def devices_page(request: Request) -> Response:
        return _page(request, "devices.html", "Devices")

    @app.get("/devices/{device_id}", include_in_schema=False)
    def device_page(request: Request, device_id: str) -> Response:
        return _page(request, "device.html", "Device", device_id=device_id[:64])

    @app.get("/tokens", include_in_schema=False)
    def tokens_page(request: Request) -> Response:
        return _page(request, "tokens.html", "API tokens")

    @app.get("/audit", include_in_schema=False)
    def audit_page(request: Request) -> Response:
        return _page(request, "audit.html", "Audit log")

    @app.get("/login", include_in_schema=False)
    def login_form(request: Request) -> Response:
        api = get_api(request)
        if api.sessions.get(request.cookies.get(SESSION_COOKIE), api.clock()) is not None:
            return RedirectResponse("/", status_code=303)
        return _login_page()

    @app.post("/login", include_in_schema=False)
    def login(request: Request, username: str = Form(default="", max_length=256),
              password: str = Form(default="", max_length=2048),
              csrf: str = Form(default="", max_length=256)) -> Response:
        api = get_api(request)
        shield = api.shield
        now = api.clock()
        ip = client_ip(request)
        cookie_csrf = request.cookies.get(LOGIN_CSRF_COOKIE, "")
        if not csrf or not hmac.compare_digest(csrf.encode("utf-8", "replace"),
                                               cookie_csrf.encode("utf-8", "replace")):
            return _login_page("The form expired; please try again.", 403)
        user_key = "login:" + username.strip().lower()[:MAX_USERNAME_CHARS]
        wait = max(shield.login_ips.blocked_for(ip, now), shield.login_users.blocked_for(user_key, now))
        if wait:
            seconds = retry_after_seconds(wait)
            return _login_page("Too many attempts; try again in %s s." % seconds,
                               429, {"Retry-After": seconds})
        user = None
        if 0 < len(username) <= MAX_USERNAME_CHARS:
            user = api.store.get_user_by_name(username)
        if user is not None:
            ok = verify_password(user.password_hash, password)
        else:
            burn_verify_time(password)
            ok = False
        if not ok:
            shield.login_ips.record(ip, now)
            shield.login_users.record(user_key, now)
            api.audit("login.failed", None, request, {"username": username[:MAX_USERNAME_CHARS]},
                      actor="user:" + username[:MAX_USERNAME_CHARS])
            log.info("dashboard login failed from %s", ip)
            return _login_page("Wrong username or password.", 401)
        shield.login_users.clear(user_key)
        if needs_rehash(user.password_hash):
            api.store.set_user_password(user.id, hash_password(password))
        cookie, _session = api.sessions.create(user.id, now)
        api.audit("login.succeeded", None, request, {"username": user.username},
                  actor="user:" + user.username)
        response = RedirectResponse("/", status_code=303)
        _set_cookie(response, SESSION_COOKIE, cookie, SESSION_MAX_MS // 1000)
        response.delete_cookie(LOGIN_CSRF_COOKIE, path="/", secure=True, httponly=True,
                               samesite="strict")
        return response

    @app.post("/logout", include_in_schema=False)
    def logout(request: Request, csrf: str = Form(default="", max_length=256)) -> Response:
        api = get_api(request)
        cookie = request.cookies.get(SESSION_COOKIE)
        session = api.sessions.get(cookie, api.clock())
        if session is not None:
            if not api.sessions.csrf_ok(session, csrf):
                return HTMLResponse("CSRF check failed", status_code=403)
            user = api.store.get_user(session.user_id)
            api.sessions.drop(cookie)
            api.audit("logout", None, request, {},
                      actor="user:" + (user.username if user else session.user_id))
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/", secure=True, httponly=True,
                               samesite="strict")
        return response
