"""The one JSON error shape both services answer with, and the handlers that produce it.

``{"error": {"code": ..., "message": ..., "details": [{"loc": ..., "msg": ..., "index"?: n}]}}``
Services subclass ApiError with their own codes; FastAPI's validation errors use the same shape.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException
from starlette.routing import Match


class ApiError(Exception):
    status_code = 400
    code = "bad_request"

    def __init__(self, message: str, *, details: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or []


class Unauthorized(ApiError):
    status_code, code = 401, "unauthorized"


class NotFound(ApiError):
    status_code, code = 404, "not_found"


class Conflict(ApiError):
    status_code, code = 409, "conflict"


class ErrorDetail(BaseModel):
    loc: str
    msg: str
    index: int | None = None


class ErrorInfo(BaseModel):
    code: str
    message: str
    details: list[ErrorDetail]


class ErrorBody(BaseModel):
    """Every error response of both services."""

    error: ErrorInfo


_DESCRIPTIONS = {
    400: "Malformed request (invalid JSON, or HTTP the server refuses)",
    401: "Missing or invalid credentials (API key, or the admin token on /admin)",
    403: "The admin API is off (ADMIN_TOKEN is not set)",
    404: "Not found",
    409: "Conflict (the username is taken)",
    413: "Body or batch too large",
    422: "Invalid input; the details name each field",
    503: "Not ready",
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for a route's error statuses, all with the one error shape."""
    return {code: {"model": ErrorBody, "description": _DESCRIPTIONS[code]} for code in codes}


def _printable(value: Any) -> Any:
    """Error details echo field names from the request; a lone UTF-16 surrogate there would make
    the error response itself unencodable (a 500), so such characters are escaped."""
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, dict):
        return {_printable(k): _printable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_printable(v) for v in value]
    return value


def error_body(code: str, message: str, details: list[dict[str, Any]]) -> dict[str, Any]:
    body = {"code": code, "message": message, "details": details}
    return {"error": _printable(body)}


HTTP_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")


def allowed_methods(request: Request) -> list[str]:
    """Every method the path supports. Starlette's 405 names only the first route that matched
    the path, which is wrong when one path has several routes (PATCH and DELETE /v1/users/me).
    Asked through each route's public ``matches``, as the router itself would route them."""
    routes = request.app.router.routes
    return [
        method
        for method in HTTP_METHODS
        if any(route.matches({**request.scope, "method": method})[0] is Match.FULL
               for route in routes)
    ]  # fmt: skip


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        body = error_body(exc.code, exc.message, exc.details)
        headers = {"WWW-Authenticate": "Bearer"} if exc.status_code == 401 else None
        return JSONResponse(body, status_code=exc.status_code, headers=headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        # The framework's own errors (a body that is not JSON, an unknown route, a wrong
        # method) get the same shape as ours.
        body = error_body(f"http_{exc.status_code}", str(exc.detail), [])
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            headers["Allow"] = ", ".join(allowed_methods(request))
        return JSONResponse(body, status_code=exc.status_code, headers=headers or None)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        if broken := [e for e in exc.errors() if e.get("type") == "json_invalid"]:
            # A body that is not JSON is a 400 invalid_json in both services (telemetry parses
            # its body by hand and says so; FastAPI would call it a 422).
            reason = broken[0].get("ctx", {}).get("error", broken[0]["msg"])
            body = error_body("invalid_json", f"the body is not valid JSON: {reason}", [])
            return JSONResponse(body, status_code=400)
        details = [
            {"loc": ".".join(str(p) for p in e["loc"]), "msg": e["msg"]} for e in exc.errors()
        ]
        body = error_body("invalid_request", "the request is invalid", details)
        return JSONResponse(body, status_code=422)
