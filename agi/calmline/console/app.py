"""The console's web application: Starlette routes over the store, behind a login.

Every route but /login needs the signed session cookie of a supervisor whose account still
exists; a browser without one is sent to /login, any other client gets 401. Every response
carries a Content-Security-Policy that allows only this site's own script and stylesheet, so
even text that slipped past the escaping could not run.
"""

from __future__ import annotations

import asyncio
import base64
import csv
import hashlib
import io
import json
import re
import secrets
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote

from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup, escape
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from calmline.audit.history import CallerHistory
from calmline.audit.store import AuditStore, stamp
from calmline.config import Config
from calmline.console import queries as q
from calmline.console.accounts import Accounts
from calmline.store import Database

HERE = Path(__file__).parent
COOKIE = "calmline_console"
LIVE_WINDOW = timedelta(minutes=30)
LIVE_POLL = 0.5  # seconds between looks at the store for new escalations
MAX_FORM = 4096
_UNPRINTABLE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
LOGIN_CSS = (HERE / "static" / "login.css").read_text()
_LOGIN_CSS_HASH = base64.b64encode(hashlib.sha256(LOGIN_CSS.encode()).digest()).decode()
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
LOGIN_CSP = CSP.replace("style-src 'self'", f"style-src 'sha256-{_LOGIN_CSS_HASH}'")
HEADERS = [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer"),
           (b"x-frame-options", b"DENY"), (b"cross-origin-opener-policy", b"same-origin")]


def visible(value: Any) -> Markup:
    """Text from the trail as HTML: escaped, controls and bidi overrides shown as \\uXXXX."""
    text = "" if value is None else str(value)
    return escape(_UNPRINTABLE.sub(lambda m: f"\\u{ord(m.group()):04x}", text))


def csv_cell(value: Any) -> str:
    """A CSV cell no spreadsheet runs as a formula (OWASP: a leading ' before = + - @ tab CR);
    a plain phone number such as +4930111 stays as it is."""
    text = _UNPRINTABLE.sub(lambda m: f"\\u{ord(m.group()):04x}", "" if value is None else str(value))
    if text[:1] in ("=", "+", "-", "@", "\t", "\r") and not re.fullmatch(r"\+?[0-9 ]{1,32}", text):
        return "'" + text
    return text


class Guard:
    """Security headers on every response; a login in front of every route but /login."""

    PUBLIC = ("/login", "/logout")

    def __init__(self, app: Any, console: Console):
        self.app = app
        self.console = console

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        csp = LOGIN_CSP if path == "/login" else CSP

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", [])
                           if k.lower() not in (b"content-security-policy", b"server")]
                headers += [(b"content-security-policy", csp.encode()), *HEADERS]
                if not any(k.lower() == b"cache-control" for k, _ in headers):
                    headers.append((b"cache-control", b"no-store"))
                message = {**message, "headers": headers}
            await send(message)

        if path not in self.PUBLIC and not await self.console.signed_in(scope["session"]):
            request = Request(scope)
            if "text/html" in request.headers.get("accept", ""):
                target = path + ("?" + scope["query_string"].decode("latin-1") if scope["query_string"] else "")
                response: Response = RedirectResponse("/login?next=" + quote(target, safe=""), status_code=303)
            else:
                response = PlainTextResponse("login required\n", status_code=401,
                                             headers={"www-authenticate": 'FormLogin realm="calmline"'})
            return await response(scope, receive, send_with_headers)
        await self.app(scope, receive, send_with_headers)


class Console:
    """The console's state: its config, store, accounts, audit and templates."""

    def __init__(self, cfg: Config, db: Database, audit: AuditStore | None):
        self.cfg = cfg
        self.console = cfg.console
        self.zone = cfg.console.zone()
        self.db = db
        self.audit = audit
        self.accounts = Accounts(db, lockout_after=cfg.console.lockout_after,
                                 lockout_minutes=cfg.console.lockout_minutes)
        self.history = CallerHistory(db)
        self.templates = Environment(loader=FileSystemLoader(HERE / "templates"),
                                     autoescape=select_autoescape(default=True, default_for_string=True))
        self.templates.filters["visible"] = visible
        self.templates.filters["local"] = self.local
        self.templates.filters["endpoint"] = q.endpoint
        self.templates.globals.update(KIND_LABELS=q.KIND_LABELS, KINDS=q.KINDS, OUTCOMES=q.OUTCOMES,
                                      MAIL_STATUSES=q.MAIL_STATUSES, zone=str(self.zone), kind_group=q.kind_group)

    # --- helpers ---------------------------------------------------------------------------

    def local(self, ts: Any, seconds: bool = True) -> str:
        """A stored UTC time in the console's zone."""
        if not ts:
            return ""
        try:
            moment = datetime.fromisoformat(str(ts))
        except ValueError:
            return str(ts)
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=timezone.utc)
        return moment.astimezone(self.zone).strftime("%Y-%m-%d %H:%M:%S" if seconds else "%Y-%m-%d %H:%M")

    def record(self, level: str, event: dict[str, Any]) -> None:
        if self.audit is not None:
            self.audit.submit(stamp(level, event))

    async def signed_in(self, session: dict) -> bool:
        user, at = session.get("user"), session.get("at")
        if not isinstance(user, str) or not isinstance(at, (int, float)):
            return False
        if time.time() - at > self.console.session_hours * 3600:
            session.clear()
            return False
        if not await asyncio.to_thread(self.accounts.exists, user):
            session.clear()  # the account was removed: its cookies go with it
            return False
        return True

    def page(self, request: Request, template: str, status: int = 200, **context: Any) -> HTMLResponse:
        body = self.templates.get_template(template).render(
            user=request.session.get("user"), csrf=request.session.get("csrf", ""), path=request.url.path,
            **context)
        return HTMLResponse(body, status_code=status)

    async def read(self, fn: Any, *args: Any) -> Any:
        """Run a query function on a connection of its own, off the event loop."""
        def run() -> Any:
            conn = self.db.connect()
            try:
                return fn(conn, *args)
            finally:
                conn.close()
        return await asyncio.to_thread(run)

    def filters(self, request: Request, default_days: int | None = 30) -> q.Filters:
        return q.Filters.parse(request.query_params, self.zone, default_days=default_days)

    # --- login -----------------------------------------------------------------------------

    async def login_form(self, request: Request) -> Response:
        if await self.signed_in(request.session):
            return RedirectResponse(_next(request.query_params.get("next")), status_code=303)
        request.session["csrf"] = secrets.token_urlsafe(24)
        return self.page(request, "login.html", next=_next(request.query_params.get("next")), error="",
                         css=LOGIN_CSS)

    async def login(self, request: Request) -> Response:
        body = await _small_body(request)
        form = {k: v[0] for k, v in parse_qs(body.decode("utf-8", "replace"), max_num_fields=10).items()}
        expected = request.session.get("csrf")
        name, password = form.get("username", "")[:64], form.get("password", "")[:1024]
        target = _next(form.get("next"))
        client = request.client.host if request.client else ""
        if not expected or not secrets.compare_digest(str(expected), form.get("csrf", "")):
            request.session["csrf"] = secrets.token_urlsafe(24)
            return self.page(request, "login.html", status=400, next=target, css=LOGIN_CSS,
                             error="The form expired; please log in again.")
        verdict = await asyncio.to_thread(self.accounts.login, name, password)
        if verdict.ok:
            request.session.clear()
            request.session.update(user=name, at=time.time(), csrf=secrets.token_urlsafe(24))
            self.record("info", {"event": "console_login", "outcome": "ok", "supervisor": name, "client": client})
            return RedirectResponse(target, status_code=303)
        self.record("warning", {"event": "console_login_failed", "outcome": "locked" if verdict.locked_for
                                and verdict.failures >= self.console.lockout_after else "refused",
                                "supervisor": name, "client": client, "failures": verdict.failures})
        # Each failure in a row answers later than the one before (up to 5 s).
        await asyncio.sleep(min(5.0, 0.25 * 2 ** min(verdict.failures, 5)))
        request.session["csrf"] = secrets.token_urlsafe(24)
        error = "Wrong name or password."
        if verdict.locked_for:
            error = (f"Too many failed logins for this name: it is locked for "
                     f"{max(1, round(verdict.locked_for / 60))} more minute(s).")
        return self.page(request, "login.html", status=401, next=target, error=error, css=LOGIN_CSS)

    async def logout(self, request: Request) -> Response:
        body = await _small_body(request)
        form = {k: v[0] for k, v in parse_qs(body.decode("utf-8", "replace"), max_num_fields=10).items()}
        if secrets.compare_digest(str(request.session.get("csrf", "")), form.get("csrf", "")):
            self.record("info", {"event": "console_logout", "supervisor": request.session.get("user")})
            request.session.clear()
        return RedirectResponse("/login", status_code=303)

    # --- pages -----------------------------------------------------------------------------

    async def home(self, request: Request) -> Response:
        return RedirectResponse("/calls", status_code=303)

    async def calls(self, request: Request) -> Response:
        filters = self.filters(request)
        size = self.console.page_size

        def read(conn: Any) -> tuple[int, list[q.CallRow]]:
            return q.count_calls(conn, filters, self.zone), q.calls_page(conn, filters, self.zone, size)

        total, rows = await self.read(read)
        pages = max(1, -(-total // size))
        return self.page(request, "calls.html", filters=filters, total=total, rows=rows, pages=pages,
                         first=(filters.page - 1) * size + 1 if rows else 0,
                         last=(filters.page - 1) * size + len(rows))

    async def calls_csv(self, request: Request) -> Response:
        filters = self.filters(request)
        zone = self.zone
        local = self.local

        def rows() -> Iterator[str]:
            out = io.StringIO()
            writer = csv.writer(out)
            writer.writerow([f"started ({zone})", "last escalation", "linkedid", "caller number", "caller name",
                             "agents", "escalations", "outcome", "callback mail", "caller mail"])
            yield out.getvalue()
            out.seek(0)
            out.truncate()
            conn = self.db.connect()
            try:
                for call in q.iter_calls(conn, filters, zone):
                    writer.writerow([csv_cell(v) for v in (
                        local(call.started), local(call.last), call.linkedid, call.caller_number, call.caller_name,
                        " ".join(call.agents), " > ".join(q.KIND_LABELS[e.kind] for e in call.escalations),
                        call.outcome, call.mail, call.caller_mail)])
                    if out.tell() >= 65536:
                        yield out.getvalue()
                        out.seek(0)
                        out.truncate()
                yield out.getvalue()
            finally:
                conn.close()

        stamp_ = datetime.now(self.zone).strftime("%Y%m%d-%H%M")
        self.record("info", {"event": "console_export", "supervisor": request.session.get("user"),
                             "filters": filters.query()})
        return StreamingResponse(rows(), media_type="text/csv; charset=utf-8", headers={
            "content-disposition": f'attachment; filename="calmline-calls-{stamp_}.csv"'})

    async def call(self, request: Request) -> Response:
        linkedid = request.path_params["linkedid"]
        detail = await self.read(q.call_detail, linkedid)
        if detail is None:
            return self.page(request, "missing.html", status=404, linkedid=linkedid)
        self.record("info", {"event": "console_call_viewed", "supervisor": request.session.get("user"),
                             "linkedid": linkedid, "caller_number": detail.caller_number,
                             "client": request.client.host if request.client else ""})
        return self.page(request, "call.html", call=detail)

    async def agents(self, request: Request) -> Response:
        filters = self.filters(request)
        rows = await self.read(q.agents, filters, self.zone)
        return self.page(request, "agents.html", filters=filters, rows=rows)

    async def callers(self, request: Request) -> Response:
        filters = self.filters(request)
        try:
            minimum = max(1, min(int(request.query_params.get("min") or 3), 100000))
        except ValueError:
            minimum = 3
        since, until = filters.bounds(self.zone)
        repeat, withheld = await asyncio.to_thread(self.history.callers, since, until, minimum=minimum, limit=200)
        return self.page(request, "callers.html", filters=filters, rows=repeat, withheld=withheld, minimum=minimum)

    async def trends(self, request: Request) -> Response:
        filters = self.filters(request, default_days=90)
        data = await self.read(q.trends, filters, self.zone)
        return self.page(request, "trends.html", filters=filters, chart=_day_chart(data, self.local),
                         heat=_heat_map(data.heat), markers=data.markers)

    async def live(self, request: Request) -> Response:
        return self.page(request, "live.html")

    async def live_stream(self, request: Request) -> Response:
        async def events() -> Any:
            conn = await asyncio.to_thread(self.db.connect)
            try:
                since = datetime.now(timezone.utc) - LIVE_WINDOW
                items, last_id = await asyncio.to_thread(q.live_since, conn, since)
                yield _sse(self._live(items), "snapshot")
                quiet = 0.0
                while not await request.is_disconnected():
                    await asyncio.sleep(LIVE_POLL)
                    items, last_id = await asyncio.to_thread(q.live_after, conn, last_id)
                    if items:
                        yield _sse(self._live(items), "update")
                        quiet = 0.0
                    else:
                        quiet += LIVE_POLL
                        if quiet >= 15:
                            yield ": still here\n\n"
                            quiet = 0.0
            finally:
                await asyncio.to_thread(conn.close)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"cache-control": "no-store", "x-accel-buffering": "no"})

    def _live(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{**item, "at": self.local(item["ts"]), "kind_label": q.KIND_LABELS.get(item["kind"], item["kind"]),
                 "href": "/calls/" + quote(item["linkedid"], safe="")} for item in items]


def _sse(items: list[dict[str, Any]], name: str) -> str:
    return f"event: {name}\ndata: {json.dumps(items, ensure_ascii=True)}\n\n"


def _next(value: str | None) -> str:
    """Where to go after logging in: a path on this site only."""
    if value and value.startswith("/") and not value.startswith("//") and "\\" not in value:
        return value
    return "/calls"


async def _small_body(request: Request) -> bytes:
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM:
            break
    return body[:MAX_FORM]


def _day_chart(data: q.Trends, local: Any) -> dict[str, Any]:
    """Stacked bars per day as SVG geometry (the template draws them)."""
    width, height, left, bottom, top = 1000, 260, 40, 30, 10
    days = data.days
    peak = max((sum(c.values()) for _, c in days), default=0) or 1
    plot_h = height - bottom - top
    slot = (width - left) / max(1, len(days))
    bars, labels = [], []
    index_of = {day: i for i, (day, _) in enumerate(days)}
    every = max(1, len(days) // 12)
    for i, (day, counts) in enumerate(days):
        y = top + plot_h
        for kind in q.KINDS:
            if counts[kind]:
                h = counts[kind] / peak * plot_h
                y -= h
                bars.append({"x": round(left + i * slot + slot * 0.1, 1), "y": round(y, 1),
                             "w": round(max(slot * 0.8, 1), 1), "h": round(h, 1), "kind": kind,
                             "title": f"{day.isoformat()}: {counts[kind]} {q.KIND_LABELS[kind]}"})
        if i % every == 0:
            labels.append({"x": round(left + i * slot + slot / 2, 1), "text": day.strftime("%b %d")})
    markers = []
    for marker in data.markers:
        day = datetime.fromisoformat(local(marker["at"])).date() if marker["at"] else None
        if day in index_of:
            markers.append({"x": round(left + index_of[day] * slot + slot / 2, 1),
                            "title": f"{local(marker['at'])}: {marker['event'].replace('_', ' ')} with config "
                                     f"{marker['fingerprint']}"})
    return {"width": width, "height": height, "bars": bars, "labels": labels, "markers": markers,
            "peak": peak, "top": top, "base": top + plot_h, "left": left,
            "totals": {k: sum(c[k] for _, c in days) for k in q.KINDS}}


def _heat_map(heat: list[list[int]]) -> dict[str, Any]:
    peak = max((v for row in heat for v in row), default=0) or 1
    names = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]
    cells = [{"x": 40 + h * 38, "y": 20 + d * 30, "v": heat[d][h], "o": round(0.06 + 0.94 * heat[d][h] / peak, 3)
              if heat[d][h] else 0, "title": f"{names[d]} {h:02d}:00-{h:02d}:59: {heat[d][h]}"}
             for d in range(7) for h in range(24)]
    return {"cells": cells, "days": [{"y": 20 + d * 30 + 19, "name": n} for d, n in enumerate(names)],
            "hours": [{"x": 40 + h * 38 + 19, "h": h} for h in range(0, 24, 3)], "peak": peak}


def create_app(cfg: Config, db: Database, secret: str, audit: AuditStore | None = None) -> Starlette:
    console = Console(cfg, db, audit)
    routes = [
        Route("/login", console.login_form, methods=["GET"]),
        Route("/login", console.login, methods=["POST"]),
        Route("/logout", console.logout, methods=["POST"]),
        Route("/", console.home),
        Route("/calls", console.calls),
        Route("/calls.csv", console.calls_csv),
        Route("/calls/{linkedid:path}", console.call),
        Route("/agents", console.agents),
        Route("/callers", console.callers),
        Route("/trends", console.trends),
        Route("/live", console.live),
        Route("/live/stream", console.live_stream),
        Mount("/static", app=StaticFiles(directory=HERE / "static"), name="static"),
    ]
    middleware = [
        Middleware(SessionMiddleware, secret_key=secret, session_cookie=COOKIE,
                   max_age=int(cfg.console.session_hours * 3600), same_site="strict",
                   https_only=cfg.console.secure_cookie),
        Middleware(Guard, console=console),
    ]
    app = Starlette(routes=routes, middleware=middleware)
    app.state.console = console
    return app
