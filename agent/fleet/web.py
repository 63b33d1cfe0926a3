"""The fleet page's routes: operator-token login, security headers (CSP), HTML and JSON reads."""

from __future__ import annotations

import html
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict
from typing import Any
from urllib.parse import parse_qs, quote

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.datastructures import MutableHeaders

from agent.errors import EdgeAgentError
from agent.fleet import page
from agent.fleet.repo import utc_now
from agent.fleet.rollout import list_states
from agent.fleet.status import render_chart_svg, rollout_status
from agent.fleet.store import TelemetryStore
from agent.fleet.tokens import device_for_token

COOKIE = "edge_agent_operator"
MAX_FORM_BYTES = 4096
# Nothing runs on the page and nothing comes from elsewhere: styles from our own
# stylesheet, images only as data: (the favicon), forms only back to this server.
CSP = (
    "default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


class SecurityHeaders:
    """ASGI middleware: the CSP and friends on every response, no-store on HTML.

    Plain ASGI rather than BaseHTTPMiddleware, so the ingest routes' streamed bodies pass
    through untouched."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for key, value in SECURITY_HEADERS.items():
                    headers.setdefault(key, value)
                if headers.get("content-type", "").startswith("text/html"):
                    headers["Cache-Control"] = "no-store"
            await send(message)

        await self.app(scope, receive, send_with_headers)


def operator_of(request: Request, operators: Mapping[str, str]) -> str | None:
    """The operator a request is from: `Authorization: Bearer <operator token>` or the login
    cookie. Device tokens are not in `operators`, so they never read the fleet."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return device_for_token(operators, token.strip())
    cookie = request.cookies.get(COOKIE, "")
    return device_for_token(operators, cookie) if cookie else None


def _safe_next(value: str) -> str:
    # Only paths on this server: "//evil.example" and "https://..." would leave the site.
    if not value.startswith("/") or value.startswith("//") or "\\" in value:
        return "/"
    return value


def install_fleet_pages(
    app: FastAPI,
    store: TelemetryStore,
    repo_dir: Any,
    operators: Mapping[str, str],
    chart_points: int,
) -> Callable[[Request], JSONResponse | None]:
    """Add the page routes to app; returns the check the JSON read endpoints call
    (None when the request is from an operator, else the 401 to answer)."""

    app.add_middleware(SecurityHeaders)

    def api_guard(request: Request) -> JSONResponse | None:
        if operator_of(request, operators) is not None:
            return None
        return JSONResponse(
            {"error": "operator token required (Authorization: Bearer <operator token>)"},
            status_code=401,
            headers={"WWW-Authenticate": 'Bearer realm="edge-agent fleet"'},
        )

    def login_redirect(request: Request) -> Response | None:
        if operator_of(request, operators) is not None:
            return None
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"/login?next={quote(target, safe='')}", status_code=303)

    _add_login_routes(app, operators)
    _add_page_routes(app, store, repo_dir, chart_points, login_redirect)

    @app.get("/api/devices")
    def api_devices(request: Request) -> JSONResponse:
        if (denied := api_guard(request)) is not None:
            return denied
        flt = page.DeviceFilter.from_query(dict(request.query_params))
        rows = page.filter_and_sort(page.device_rows(store), flt)
        return JSONResponse({"devices": [asdict(r) for r in rows]})

    return api_guard


def _add_login_routes(app: FastAPI, operators: Mapping[str, str]) -> None:
    """The stylesheet, and the login form that turns an operator token into a cookie."""

    @app.get("/static/fleet.css")
    def fleet_css() -> Response:
        return Response(
            page.FLEET_CSS, media_type="text/css", headers={"Cache-Control": "max-age=3600"}
        )

    @app.get("/login", response_class=HTMLResponse)
    def login_form(next: str = "/") -> HTMLResponse:
        return HTMLResponse(page.render_login(_safe_next(next)))

    @app.post("/login")
    async def login(request: Request) -> Response:
        body = await request.body()
        if len(body) > MAX_FORM_BYTES:
            return HTMLResponse(page.render_login("/", "form too large"), status_code=413)
        form = parse_qs(body.decode("utf-8", "replace"))
        token = (form.get("token") or [""])[0].strip()
        next_path = _safe_next((form.get("next") or ["/"])[0])
        if device_for_token(operators, token) is None:
            return HTMLResponse(
                page.render_login(next_path, "unknown operator token"), status_code=401
            )
        response = RedirectResponse(next_path, status_code=303)
        # HttpOnly: no script can read it (there is none, but a future bug cannot either);
        # SameSite=Strict: no other site can make the browser send it. Behind the TLS proxy
        # the docs ask for, the browser also gets it only over HTTPS when the proxy marks
        # it Secure.
        response.set_cookie(COOKIE, token, httponly=True, samesite="strict", path="/")
        return response

    @app.post("/logout")
    def logout() -> Response:
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(COOKIE, path="/")
        return response


def _add_page_routes(
    app: FastAPI,
    store: TelemetryStore,
    repo_dir: Any,
    chart_points: int,
    login_redirect: Callable[[Request], Response | None],
) -> None:
    """The HTML pages: the overview, one device, one rollout (login first)."""

    def statuses() -> list[dict[str, Any]]:
        now = utc_now()
        return [rollout_status(s, store, now) for s in list_states(repo_dir)]

    @app.get("/", response_class=HTMLResponse)
    def overview(request: Request) -> Response:
        if (redirect := login_redirect(request)) is not None:
            return redirect
        sts = statuses()
        now_ns = time.time_ns()
        charts = []
        for st in sts:
            times, series = store.version_timeline(st["package"], chart_points, now_ns)
            charts.append(render_chart_svg(times, series, f"{st['package']} versions over time"))
        flt = page.DeviceFilter.from_query(dict(request.query_params))
        return HTMLResponse(page.render_overview(sts, charts, page.device_rows(store), flt))

    @app.get("/fleet/devices/{device_id:path}", response_class=HTMLResponse)
    def device_page(request: Request, device_id: str) -> Response:
        if (redirect := login_redirect(request)) is not None:
            return redirect
        text = page.render_device_page(store, device_id)
        if text is None:
            return HTMLResponse(
                page.page("not found", f"<p>No device {html.escape(device_id)} has reported.</p>"),
                status_code=404,
            )
        return HTMLResponse(text)

    @app.get("/fleet/rollouts/{channel}", response_class=HTMLResponse)
    def rollout_page(request: Request, channel: str) -> Response:
        if (redirect := login_redirect(request)) is not None:
            return redirect
        now = utc_now()
        for state in list_states(repo_dir):
            if state.channel == channel:
                try:
                    status = rollout_status(state, store, now)
                except EdgeAgentError as exc:
                    return HTMLResponse(page.page("error", f"<p>{html.escape(str(exc))}</p>"), 503)
                return HTMLResponse(page.render_rollout_page(state, status, store, now))
        return HTMLResponse(
            page.page("not found", f"<p>No rollout for channel {html.escape(channel)}.</p>"),
            status_code=404,
        )
