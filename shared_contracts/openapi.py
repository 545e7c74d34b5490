"""OpenAPI that a person can use from /docs and a generator can use as is.

FastAPI's defaults gave generated operationIds (``get_user_v1_users__username__get``), no
security schemes (no Authorize button), ``HTTPValidationError`` for 422s whose real body is our
error shape, and nothing for a body a route reads by hand (``POST /ingest``). Both services
call :func:`install_openapi`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute
from pydantic import BaseModel

from shared_contracts.api_errors import ErrorBody

#: The API key as the swamp CLI sends it, or (builds before March 2026) as a Bearer token.
API_KEY_SCHEMES: dict[str, dict[str, Any]] = {
    "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"},
    "bearerApiKey": {
        "type": "http",
        "scheme": "bearer",
        "description": "The same API key as `Authorization: Bearer <key>`.",
    },
}
ADMIN_SCHEME: dict[str, dict[str, Any]] = {
    "adminToken": {
        "type": "http",
        "scheme": "bearer",
        "description": "`Authorization: Bearer <ADMIN_TOKEN>` on /admin endpoints.",
    }
}
CREDENTIAL_HEADERS = {"authorization", "x-api-key"}
ERROR_REF = {"$ref": "#/components/schemas/ErrorBody"}
UNAVAILABLE = {
    "description": "The database is unavailable; retry after Retry-After seconds",
    "headers": {"Retry-After": {"schema": {"type": "integer"}}},
    "content": {"application/json": {"schema": ERROR_REF}},
}


def component_schemas(model: type[BaseModel]) -> dict[str, Any]:
    """A model's JSON Schema and the models it uses, as components/schemas entries."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    return {**schema.pop("$defs", {}), model.__name__: schema}


def operation_id(route: APIRoute) -> str:
    """The endpoint function's name: short, stable, unique per service (a test checks)."""
    return route.name


def install_openapi(
    app: FastAPI,
    *,
    optional_key_operations: frozenset[str] = frozenset(),
    extra_schemas: dict[str, Any] | None = None,
    customize: Callable[[dict[str, Any]], None] | None = None,
) -> None:
    """Replace ``app.openapi`` with the corrected document. ``optional_key_operations``: the
    operationIds where an API key is optional (anonymous use allowed); ``customize`` edits the
    document last (a service's own additions)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        document = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        components = document.setdefault("components", {})
        schemas = components.setdefault("schemas", {})
        schemas.update(component_schemas(ErrorBody))
        schemas.update(extra_schemas or {})
        for name in ("HTTPValidationError", "ValidationError"):
            schemas.pop(name, None)
        components["securitySchemes"] = {**API_KEY_SCHEMES, **ADMIN_SCHEME}
        for path, operations in document.get("paths", {}).items():
            for operation in operations.values():
                secure(operation, path=path, optional=optional_key_operations)
                if operation.get("operationId") != "healthz":  # everything else may need the DB
                    operation["responses"].setdefault("503", UNAVAILABLE)
                for response in operation.get("responses", {}).values():
                    for media in response.get("content", {}).values():
                        if "HTTPValidationError" in str(media.get("schema")):
                            media["schema"] = ERROR_REF
        if customize is not None:
            customize(document)
        app.openapi_schema = document
        return document

    app.openapi = openapi  # type: ignore[method-assign]


def secure(operation: dict[str, Any], *, path: str, optional: frozenset[str]) -> None:
    """Credentials as security requirements, not as header parameters."""
    parameters = operation.get("parameters", [])
    headers = {
        p["name"].lower() for p in parameters if p.get("in") == "header"
    } & CREDENTIAL_HEADERS
    operation["parameters"] = [
        p for p in parameters if not (p.get("in") == "header" and p["name"].lower() in headers)
    ]
    if not operation["parameters"]:
        del operation["parameters"]
    if path.startswith("/admin"):
        operation["security"] = [{"adminToken": []}]
    elif headers or operation.get("operationId") in optional:
        operation["security"] = [{"apiKey": []}, {"bearerApiKey": []}]
        if operation.get("operationId") in optional:
            operation["security"].append({})  # anonymous is allowed too
