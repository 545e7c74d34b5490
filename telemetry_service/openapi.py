"""The telemetry service's OpenAPI additions: the body of POST /ingest.

The route reads its body by hand (a size limit while it streams, one error per bad event), so
FastAPI cannot see it; this documents what it accepts: one event as the bare object, or
``{"events": [...]}``.
"""

from __future__ import annotations

from typing import Any

from shared_contracts.openapi import component_schemas, install_openapi
from telemetry_service.ingest.schemas import CliEvent

EVENT_REF = {"$ref": "#/components/schemas/CliEvent"}


def install(app: Any, *, max_events: int) -> None:
    batch = {
        "title": "CliEventBatch",
        "type": "object",
        "required": ["events"],
        "properties": {
            # The limit as prose, not maxItems: more events is a 413 (too large), which a
            # schema violation would have to be a 400 or 422 to be honest about.
            "events": {
                "type": "array",
                "items": EVENT_REF,
                # No minItems: an empty batch is answered 202 {"accepted": 0} (nothing to store,
                # nothing lost), so the schema must not call it invalid.
                "description": f"At most {max_events} events (INGEST_MAX_EVENTS); more is 413. "
                "An empty list is accepted and stores nothing.",
            }
        },
    }

    def ingest_body(document: dict[str, Any]) -> None:
        # anyOf, not oneOf: an event with an "events" key matches both, and is taken as a batch.
        document["paths"]["/ingest"]["post"]["requestBody"] = {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {"anyOf": [EVENT_REF, {"$ref": "#/components/schemas/CliEventBatch"}]}
                }
            },
        }

    install_openapi(
        app,
        optional_key_operations=frozenset({"ingest"}),
        extra_schemas={**component_schemas(CliEvent), "CliEventBatch": batch},
        customize=ingest_body,
    )
