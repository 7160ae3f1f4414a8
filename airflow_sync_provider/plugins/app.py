"""The "Sync status" pages: a FastAPI app the api-server mounts at ``/sync-status`` (see :mod:`.status_plugin`).

Server-rendered HTML (Jinja2 templates shipped in this package, inline SVG charts, no JavaScript,
no CDN) and one JSON endpoint.  Read-only.  Every request is authenticated as the rest of the
Airflow UI is (the ``_token`` cookie or a bearer token, through the api-server's auth manager) and
shows only the syncs of DAGs the user may read (:mod:`.access`).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape

from airflow_sync_provider.core.status import SyncStatus
from airflow_sync_provider.plugins.access import user_access, visible
from airflow_sync_provider.plugins.charts import COLOURS, latency_chart, rows_chart
from airflow_sync_provider.plugins.targets import configured_conn_ids, read_detail, read_target
from airflow_sync_provider.plugins.urls import URL_PREFIX, detail_path

TEMPLATES = Path(__file__).parent / "templates"


async def _current_user(request: Request) -> Any:
    """The signed-in user, resolved exactly as the api-server's own routes resolve it."""
    from airflow.api_fastapi.core_api.security import bearer_scheme, get_user

    return await get_user(request, None, await bearer_scheme(request))


UserDep = Annotated[Any, Depends(_current_user)]


def _duration(value: dt.timedelta | float | None) -> str:
    """``3 d 4 h``, ``12 min 5 s``, ``0.4 s``: two units at most."""
    if value is None:
        return "-"
    seconds = value.total_seconds() if isinstance(value, dt.timedelta) else float(value)
    if seconds < 0:
        return "-" + _duration(-seconds)
    if seconds < 60:
        return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60), ("s", 1)):
        if seconds >= size:
            parts.append(f"{int(seconds // size)} {unit}")
            seconds %= size
        if len(parts) == 2:
            break
    return " ".join(parts)


def _bytes(value: int | None) -> str:
    if value is None:
        return "-"
    size = float(value)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if size < 1024 or unit == "TB":
            return f"{size:,.0f} {unit}" if unit == "B" else f"{size:,.1f} {unit}"
        size /= 1024
    return f"{value} B"


def _when(value: dt.datetime | None) -> str:
    return value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if value else "-"


def health(status: SyncStatus) -> str:
    """``failed`` (the last run or gate failed, or an unrepaired reconciliation differs), ``warning``
    (rows quarantined, watermark held back, slot missing), else ``ok``."""
    if (status.last_run and status.last_run.status == "gate_failed") or (status.gate and not status.gate.success):
        return "failed"
    if status.reconciliation and status.reconciliation.result == "differences":
        return "failed"
    if status.quarantine_open or status.held_back or (status.slot is not None and not status.slot.exists):
        return "warning"
    return "ok"


def _environment() -> Environment:
    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(["html"]))
    env.filters.update(duration=_duration, bytes=_bytes, when=_when)
    env.globals.update(health=health, detail_path=detail_path, colours=COLOURS)
    return env


_templates = _environment()


def _page(request: Request, template: str, **values: Any) -> HTMLResponse:
    root = request.scope.get("root_path", "") or ""
    html = _templates.get_template(template).render(root=root, **values)
    return HTMLResponse(html, headers={"Cache-Control": "no-store"})


def create_app() -> FastAPI:
    """The status app (one per api-server process)."""
    app = FastAPI(title="Sync status", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(HTTPException)
    async def _unauthenticated(request: Request, error: HTTPException) -> Response:
        """Pages send a signed-out browser to Airflow's login (and back); the JSON API answers 401."""
        if error.status_code in (401, 403) and not request.url.path.startswith(f"{URL_PREFIX}/api"):
            from airflow.api_fastapi.app import get_auth_manager

            return RedirectResponse(get_auth_manager().get_url_login(next_url=str(request.url)), status_code=303)
        return JSONResponse({"detail": error.detail}, status_code=error.status_code)

    @app.get("/", response_class=HTMLResponse)
    def overview(request: Request, user: UserDep) -> HTMLResponse:
        reports = [read_target(conn_id) for conn_id in configured_conn_ids()]
        access = user_access(user, {d for r in reports for s in r.statuses for d in s.dag_ids})
        shown = [(r, visible(r.statuses, access)) for r in reports]
        return _page(
            request,
            "overview.html",
            reports=shown,
            configured=bool(reports),
            user=getattr(user, "get_name", lambda: "")(),
        )

    @app.get("/syncs/{conn_id}/{schema}/{sync_id:path}", response_class=HTMLResponse)
    def detail(
        request: Request,
        user: UserDep,
        conn_id: str,
        schema: str,
        sync_id: str,
        days: Annotated[int, Query(ge=1, le=366)] = 7,
    ) -> HTMLResponse:
        if conn_id not in configured_conn_ids():
            raise HTTPException(404, "not a configured status connection")
        since = dt.datetime.now(dt.UTC) - dt.timedelta(days=days)
        status, history, error = read_detail(conn_id, schema, sync_id, since)
        if status is None and error is None:
            raise HTTPException(404, "no such sync")
        if status is not None and not user_access(user, status.dag_ids).allows(status):
            raise HTTPException(404, "no such sync")  # the same answer as for a sync that does not exist
        return _page(
            request,
            "detail.html",
            conn_id=conn_id,
            status=status,
            history=history,
            error=error,
            days=days,
            rows_svg=rows_chart(history.runs) if history else "",
            latency_svg=latency_chart(history.runs) if history else "",
        )

    @app.get("/api/syncs")
    def syncs_json(user: UserDep) -> JSONResponse:
        """The overview as JSON (the same access rules): ``[{"conn_id": ..., "syncs": [...], "error": ...}]``."""
        reports = [read_target(conn_id) for conn_id in configured_conn_ids()]
        access = user_access(user, {d for r in reports for s in r.statuses for d in s.dag_ids})
        body = [
            {
                "conn_id": r.conn_id,
                "error": r.error,
                "syncs": [dataclasses.asdict(s) for s in visible(r.statuses, access)],
            }
            for r in reports
        ]
        return JSONResponse(json.loads(json.dumps(body, default=str)))

    return app


__all__ = ["create_app", "health"]
