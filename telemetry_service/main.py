"""The telemetry ASGI app: one AsyncMongoClient opened in the lifespan and closed after it."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from shared_contracts.lifecycle import CLIENT_CLOSE_SECONDS, within, workers_stop_seconds
from shared_contracts.mongo import make_client
from shared_contracts.names import SWAMP_CLUB_EVENTS, TELEMETRY_COMMANDS
from shared_contracts.observability import install_observability
from shared_contracts.openapi import operation_id
from shared_contracts.outages import install_outage_handling
from shared_contracts.queue.indexes import ensure_queue_indexes
from shared_contracts.service_metrics import MetricsScope
from shared_contracts.settings import load_settings
from telemetry_service import admin, health, openapi
from telemetry_service.collections import ensure_indexes
from telemetry_service.errors import install_error_handlers
from telemetry_service.ingest.router import router as ingest_router
from telemetry_service.runtime import TelemetryRuntime
from telemetry_service.settings import TelemetrySettings
from telemetry_service.stats.router import router as stats_router
from telemetry_service.workers import TelemetryWorkers


async def open_runtime(settings: TelemetrySettings) -> TelemetryRuntime:
    client = make_client(
        settings.mongodb_uri, app_name="telemetry_service", **settings.client_options()
    )
    runtime = TelemetryRuntime(settings=settings, client=client)
    try:
        await ensure_indexes(runtime.db)
        await ensure_queue_indexes(
            runtime.bus, done_retention_seconds=settings.queue_done_retention_seconds
        )
    except BaseException:
        await client.close()
        raise
    return runtime


def create_app(settings: TelemetrySettings | None = None) -> FastAPI:
    settings = settings or load_settings(TelemetrySettings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime = await open_runtime(settings)
        app.state.runtime = runtime
        workers = TelemetryWorkers(runtime) if settings.run_workers else None
        app.state.workers = workers
        if workers:
            workers.start()
        try:
            yield
        finally:
            if workers:
                seconds = await workers_stop_seconds(runtime.client)
                await within(workers.stop(), seconds=seconds, what="stopping workers")
            await within(
                runtime.client.close(), seconds=CLIENT_CLOSE_SECONDS, what="closing the client"
            )

    app = FastAPI(
        title="swamp-club telemetry", lifespan=lifespan, generate_unique_id_function=operation_id
    )
    install_error_handlers(app)
    install_outage_handling(app, request_db_timeout_seconds=settings.request_db_timeout_seconds)
    install_observability(
        app,
        metrics=MetricsScope(
            service="telemetry",
            prefixes=("swamp_ingest_", "swamp_projection_", "swamp_backfill_"),
            publishes_to=SWAMP_CLUB_EVENTS,
            consumes=TELEMETRY_COMMANDS,
        ),
    )
    app.include_router(health.router)
    app.include_router(ingest_router)
    app.include_router(stats_router)
    app.include_router(admin.router)
    app.include_router(admin.queue_router)
    openapi.install(app, max_events=settings.max_events_per_request)
    return app
