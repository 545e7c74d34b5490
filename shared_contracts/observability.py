"""Logs, request ids and HTTP metrics, the same way in both services.

Every log line carries the request id of the request it belongs to (``-`` outside requests):
JSON lines on stderr when it is not a terminal (production, containers), plain text when it is;
stdout stays for what a command prints, so scripts can parse it.
Keys and Authorization headers are never logged: nothing here logs headers at all.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, Protocol

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest
from starlette.routing import Match

from shared_contracts.request_context import REQUEST_ID
from shared_contracts.service_metrics import MetricsScope, service_registry

__all__ = ["REQUEST_ID", "configure_logging", "install_observability", "metrics_response"]

REQUEST_ID_HEADER = "x-request-id"
ACCESS_LOG = logging.getLogger("swamp.access")

HTTP_REQUESTS = Counter(
    "swamp_http_requests_total", "HTTP requests", ["service", "method", "route", "status"]
)
HTTP_SECONDS = Histogram("swamp_http_request_seconds", "HTTP request latency", ["service", "route"])


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "at": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "request_id": getattr(record, "request_id", "-"),
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            line.update(fields)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def configure_logging(level: int = logging.INFO) -> None:
    """Once per process (the CLI calls it). JSON unless a person is watching."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RequestIdFilter())
    if sys.stderr.isatty():
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s [%(request_id)s] %(name)s: %(message)s")
        )
    else:
        handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    sys.unraisablehook = log_unraisable


def log_unraisable(unraisable: Any) -> None:
    """An exception Python cannot raise (in a destructor, or in a coroutine closed when the
    event loop ends: a task still waiting on a dead database at shutdown) is logged like every
    other error, one line, instead of the interpreter's raw traceback on stderr."""
    exc = unraisable.exc_value
    where = unraisable.err_msg or "Exception ignored in"
    logging.getLogger("swamp.unraisable").error(
        "%s: %r", where, unraisable.object,
        exc_info=(type(exc), exc, unraisable.exc_traceback) if exc is not None else None,
    )  # fmt: skip


def route_template(request: Request) -> str:
    """The matched route's template (``/v1/users/{username}``), never the raw path. FastAPI's
    own routes put themselves in the scope; Starlette's (``/docs``, ``/openapi.json``) do not,
    so those are matched here the way the router matched them."""
    route = request.scope.get("route")
    if route is None:
        route = next(
            (r for r in request.app.router.routes if r.matches(request.scope)[0] is Match.FULL),
            None,
        )
    return str(getattr(route, "path", "(unmatched)"))


def install_observability(app: FastAPI, *, metrics: MetricsScope) -> None:
    """Request ids on every request and log line, HTTP metrics, and the service's own metrics
    registry for GET /metrics (``app.state.metrics_registry``)."""
    service = metrics.service
    app.state.metrics_registry = service_registry(metrics)

    @app.middleware("http")
    async def request_context(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        given = request.headers.get(REQUEST_ID_HEADER, "")
        request_id = given if 0 < len(given) <= 64 and given.isprintable() else uuid.uuid4().hex
        token = REQUEST_ID.set(request_id)
        started = time.perf_counter()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            response.headers[REQUEST_ID_HEADER] = request_id
            return response
        finally:
            route = route_template(request)
            seconds = time.perf_counter() - started
            HTTP_REQUESTS.labels(service, request.method, route, str(status)).inc()
            HTTP_SECONDS.labels(service, route).observe(seconds)
            # The one access line per request (uvicorn's own is off): no query string, no
            # headers, so neither keys nor tokens can reach the log.
            ACCESS_LOG.info(
                "%s %s %d %.1fms",
                request.method,
                request.url.path,
                status,
                seconds * 1000,
                extra={
                    "fields": {
                        "service": service,
                        "method": request.method,
                        "path": request.url.path,
                        "route": route,
                        "status": status,
                        "duration_ms": round(seconds * 1000, 1),
                    }
                },
            )
            REQUEST_ID.reset(token)


async def metrics_response(
    request: Request, update: Callable[[], Awaitable[None]] | None = None
) -> Response:
    """Prometheus exposition of this app's registry; ``update`` refreshes gauges that are read
    from the database."""
    if update is not None:
        await update()
    registry = request.app.state.metrics_registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


class Workers(Protocol):
    @property
    def alive(self) -> bool: ...


def readiness(workers: Workers | None, **report: Any) -> dict[str, Any] | JSONResponse:
    """The /readyz answer once the database answered: ``report`` plus the workers' state (off
    when this process does not run them). Dead workers make it a 503, so an orchestrator
    restarts the process instead of routing traffic to one that no longer processes anything."""
    state = "off" if workers is None else "alive" if workers.alive else "dead"
    body = {"status": "ready", "database": "ok", "workers": state, **report}
    if state == "dead":
        return JSONResponse({**body, "status": "unavailable"}, status_code=503)
    return body
