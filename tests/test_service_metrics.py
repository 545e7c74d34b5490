"""Under `swamp-club up` both services share a process: each /metrics must still serve only its
own series, each labelled with its service, and routes by their template."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from swamp_app.main import create_app as create_main_app
from swamp_app.settings import AppSettings
from telemetry_service.main import create_app as create_telemetry_app
from telemetry_service.settings import TelemetrySettings
from tests.support import asgi_client
from tests.telemetry.conftest import cli_event


def series(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def test_each_service_serves_only_its_own_series(
    telemetry_settings: TelemetrySettings, app_settings: AppSettings
) -> None:
    telemetry_app = create_telemetry_app(telemetry_settings)
    main_app = create_main_app(app_settings)
    async with asgi_client(telemetry_app) as telemetry, asgi_client(main_app) as app:
        assert (await telemetry.post("/ingest", json=cli_event("metrics-dev"))).status_code == 202
        assert (await app.post("/v1/users", json={"username": "metrics-user"})).status_code == 201
        assert (await app.get("/docs")).status_code == 200
        assert (await telemetry.get("/openapi.json")).status_code == 200
        assert (await app.get("/no/such/route")).status_code == 404
        telemetry_series = series((await telemetry.get("/metrics")).text)
        app_series = series((await app.get("/metrics")).text)

    assert telemetry_series.keys().isdisjoint(app_series.keys())
    for own, scraped in (("telemetry", telemetry_series), ("app", app_series)):
        assert {dict(labels).get("service") for _, labels in scraped} == {own}
    names = {name for name, _ in telemetry_series}
    assert "swamp_ingest_events_total" in names
    assert not any(name.startswith(("swamp_score_", "swamp_refresh_")) for name in names)
    app_names = {name for name, _ in app_series}
    assert not any(name.startswith(("swamp_ingest_", "swamp_backfill_")) for name in app_names)
    # Each queue's depth is reported once: by the service that consumes it.
    depth = "swamp_queue_messages"
    assert label_values(telemetry_series, depth, "queue") == {"telemetry_commands"}
    assert label_values(app_series, depth, "queue") == {"swamp_club_events"}
    http = "swamp_http_requests_total"
    assert {"/ingest", "/openapi.json"} <= label_values(telemetry_series, http, "route")
    assert {"/v1/users", "/docs", "(unmatched)"} <= label_values(app_series, http, "route")


def label_values(
    scraped: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, label: str
) -> set[str]:
    return {dict(labels)[label] for sample, labels in scraped if sample == name}
