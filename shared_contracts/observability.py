"""Logs, request ids and HTTP metrics, the same way in both services.

Every log line carries the request id of the request it belongs to (``-`` outside requests):
JSON lines on stderr when it is not a terminal (production, containers), plain text when it is;
stdout stays for what a command prints, so scripts can parse it.
Keys and Authorization headers are never logged: nothing here logs headers at all.
"""

from __future__ import annotations

import contextvars
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

REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
REQUEST_ID_HEADER = "x-request-id"

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


def install_observability(app: FastAPI, *, service: str) -> None:
    """Request ids on every request and log line, HTTP metrics, and GET /metrics."""

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
            route = getattr(request.scope.get("route"), "path", "(unmatched)")
            HTTP_REQUESTS.labels(service, request.method, route, str(status)).inc()
            HTTP_SECONDS.labels(service, route).observe(time.perf_counter() - started)
            REQUEST_ID.reset(token)


async def metrics_response(update: Callable[[], Awaitable[None]] | None = None) -> Response:
    """Prometheus exposition; ``update`` refreshes gauges that are read from the database."""
    if update is not None:
        await update()
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


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
