"""A database outage, answered the same way by both services: 503 in our error shape, with
Retry-After, within a bounded time, and nothing of the driver's internals in the body.

Bounded by two things: the driver's timeouts (settings: server selection, connect, socket) and a
budget for all database work of one request (``pymongo.timeout``, client-side operation timeout:
it also ends ``with_transaction``'s retries, which would otherwise go on for 120 s).
"""

from __future__ import annotations

import logging
from typing import Any

import pymongo
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pymongo.errors import ConnectionFailure, ExecutionTimeout, PyMongoError
from starlette.types import ASGIApp, Receive, Scope, Send

from shared_contracts.api_errors import error_body

log = logging.getLogger(__name__)

#: Seconds a client should wait before trying again; the CLI re-sends anything not answered 202.
RETRY_AFTER_SECONDS = 5
#: /readyz answers within 2 s even when the database does not (compose's healthcheck gives 5 s).
READY_DB_TIMEOUT_SECONDS = 1.0
#: Error labels the driver puts on failures that a retry may cure.
TRANSIENT_LABELS = ("TransientTransactionError", "RetryableWriteError")


def is_outage(exc: BaseException) -> bool:
    """The database is unreachable, too slow, or mid-failover: nothing the request did wrong."""
    if isinstance(exc, ConnectionFailure | ExecutionTimeout):
        return True
    return isinstance(exc, PyMongoError) and any(exc.has_error_label(x) for x in TRANSIENT_LABELS)


def unavailable(message: str = "the database is unavailable; retry later") -> JSONResponse:
    return JSONResponse(
        error_body("database_unavailable", message, []),
        status_code=503,
        headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
    )


class RequestDbBudget:
    """Pure ASGI middleware: every database operation of one request shares one deadline.
    (Pure ASGI rather than @app.middleware: the deadline lives in a context variable, and this
    way the endpoint runs in the very context that set it.)"""

    def __init__(self, app: ASGIApp, *, seconds: float) -> None:
        self.app = app
        self.seconds = seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.seconds:
            await self.app(scope, receive, send)
            return
        with pymongo.timeout(self.seconds):
            await self.app(scope, receive, send)


def install_outage_handling(app: FastAPI, *, request_db_timeout_seconds: float) -> None:
    app.add_middleware(RequestDbBudget, seconds=request_db_timeout_seconds)

    async def database_error(request: Request, exc: Exception) -> JSONResponse:
        if is_outage(exc):
            # One line, no traceback: an outage is an operational state, not a bug.
            log.warning("database unavailable: %s: %s", type(exc).__name__, str(exc)[:200])
            return unavailable()
        log.error("database error", exc_info=exc)
        return internal_error_response()

    async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
        # Starlette logs the traceback itself after this handler answers.
        return internal_error_response()

    app.add_exception_handler(PyMongoError, database_error)
    app.add_exception_handler(Exception, unexpected_error)


def internal_error_response() -> JSONResponse:
    body: dict[str, Any] = error_body("internal_error", "internal server error", [])
    return JSONResponse(body, status_code=500)
