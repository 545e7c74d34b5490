"""Typed API errors and the one JSON error shape every response uses.

``{"error": {"code": ..., "message": ..., "details": [{"loc": ..., "msg": ..., "index"?: n}]}}``
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse


class ApiError(Exception):
    status_code = 400
    code = "bad_request"

    def __init__(self, message: str, *, details: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or []


class InvalidJson(ApiError):
    status_code, code = 400, "invalid_json"


class InvalidEvents(ApiError):
    status_code, code = 422, "invalid_events"


class PayloadTooLarge(ApiError):
    status_code, code = 413, "payload_too_large"


class Unauthorized(ApiError):
    status_code, code = 401, "unauthorized"


class NotFound(ApiError):
    status_code, code = 404, "not_found"


class InvalidQuery(ApiError):
    status_code, code = 422, "invalid_query"


def error_body(code: str, message: str, details: list[dict[str, Any]]) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "details": details}}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        body = error_body(exc.code, exc.message, exc.details)
        return JSONResponse(body, status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        details = [
            {"loc": ".".join(str(p) for p in e["loc"]), "msg": e["msg"]} for e in exc.errors()
        ]
        body = error_body("invalid_request", "the request is invalid", details)
        return JSONResponse(body, status_code=422)
