"""Both OpenAPI documents are usable as published: chosen operationIds, security schemes, the
body of POST /ingest, our error shape for every error; malformed JSON answered alike."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi import FastAPI

from swamp_app.main import create_app as create_main_app
from swamp_app.settings import AppSettings
from telemetry_service.main import create_app as create_telemetry_app
from telemetry_service.settings import TelemetrySettings
from tests.support import asgi_client

ERROR_REF = "#/components/schemas/ErrorBody"


def apps() -> list[FastAPI]:
    return [create_telemetry_app(TelemetrySettings()), create_main_app(AppSettings())]


def operations(document: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (method, path, operation)
        for path, methods in document["paths"].items()
        for method, operation in methods.items()
    ]


@pytest.mark.parametrize("app", apps(), ids=["telemetry", "app"])
def test_operation_ids_are_chosen_names_and_errors_use_our_shape(app: FastAPI) -> None:
    document = app.openapi()
    ids = [operation["operationId"] for _, _, operation in operations(document)]
    assert len(ids) == len(set(ids))
    assert all(i.isidentifier() and "__" not in i and not i.endswith("_get") for i in ids), ids
    assert "HTTPValidationError" not in json.dumps(document)
    for method, path, operation in operations(document):
        for status, response in operation["responses"].items():
            if status.startswith(("4", "5")):
                schema = response["content"]["application/json"]["schema"]
                assert schema == {"$ref": ERROR_REF}, (method, path, status)
    schemes = document["components"]["securitySchemes"]
    assert schemes["apiKey"] == {"type": "apiKey", "in": "header", "name": "x-api-key"}
    assert schemes["adminToken"]["scheme"] == "bearer"
    for _, path, operation in operations(document):
        if path.startswith("/admin"):
            assert operation["security"] == [{"adminToken": []}]


def test_the_chosen_names_and_the_security_of_each_service() -> None:
    telemetry, app = (a.openapi() for a in apps())
    ingest = telemetry["paths"]["/ingest"]["post"]
    assert ingest["operationId"] == "ingest"
    # The key is optional at /ingest: anonymous events are accepted.
    assert ingest["security"] == [{"apiKey": []}, {"bearerApiKey": []}, {}]
    body = ingest["requestBody"]["content"]["application/json"]["schema"]
    assert body == {
        "anyOf": [
            {"$ref": "#/components/schemas/CliEvent"},
            {"$ref": "#/components/schemas/CliEventBatch"},
        ]
    }
    schemas = telemetry["components"]["schemas"]
    assert {"event", "distinct_id", "properties"} <= set(schemas["CliEvent"]["required"])
    assert "At most 1000 events" in schemas["CliEventBatch"]["properties"]["events"]["description"]
    get_user = app["paths"]["/v1/users/{username}"]["get"]
    assert get_user["operationId"] == "get_user"
    assert "security" not in get_user
    rename = app["paths"]["/v1/users/me"]["patch"]
    assert rename["security"] == [{"apiKey": []}, {"bearerApiKey": []}]
    # The key is a security scheme, not a header parameter to fill in by hand.
    assert "parameters" not in rename


async def test_malformed_json_is_answered_alike_by_both_services(
    telemetry_settings: TelemetrySettings, app_settings: AppSettings
) -> None:
    headers = {"content-type": "application/json"}
    answers = []
    async with (
        asgi_client(create_telemetry_app(telemetry_settings)) as telemetry,
        asgi_client(create_main_app(app_settings)) as app,
    ):
        for client, path in ((telemetry, "/ingest"), (app, "/v1/users")):
            response = await client.post(path, content=b'{"event": ', headers=headers)
            answers.append((response.status_code, response.json()["error"]["code"]))
            assert response.json()["error"]["message"].startswith("the body is not valid JSON")
    assert answers == [(400, "invalid_json"), (400, "invalid_json")]
