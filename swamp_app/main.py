"""The main app's ASGI app: one AsyncMongoClient opened in the lifespan and closed after it."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from shared_contracts.lifecycle import CLIENT_CLOSE_SECONDS, within, workers_stop_seconds
from shared_contracts.mongo import make_client
from shared_contracts.names import SWAMP_CLUB_EVENTS, TELEMETRY_COMMANDS
from shared_contracts.observability import install_observability
from shared_contracts.openapi import install_openapi, operation_id
from shared_contracts.outages import install_outage_handling
from shared_contracts.queue.indexes import ensure_queue_indexes
from shared_contracts.service_metrics import MetricsScope
from shared_contracts.settings import load_settings
from swamp_app import admin, health
from swamp_app.api_keys.router import router as api_keys_router
from swamp_app.body_limit import BodySizeLimit
from swamp_app.collections import ensure_indexes
from swamp_app.errors import install_error_handlers
from swamp_app.runtime import AppRuntime
from swamp_app.scores.router import router as scores_router
from swamp_app.settings import AppSettings
from swamp_app.users.name_clock import ensure_name_clock
from swamp_app.users.router import router as users_router
from swamp_app.workers import AppWorkers


async def open_runtime(settings: AppSettings) -> AppRuntime:
    client = make_client(settings.mongodb_uri, app_name="swamp_app", **settings.client_options())
    runtime = AppRuntime(settings=settings, client=client)
    try:
        await ensure_indexes(runtime.db)
        await ensure_name_clock(runtime)
        await ensure_queue_indexes(
            client[settings.bus_db], done_retention_seconds=settings.queue_done_retention_seconds
        )
    except BaseException:
        await client.close()
        raise
    return runtime


def create_app(settings: AppSettings | None = None) -> FastAPI:
    settings = settings or load_settings(AppSettings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime = await open_runtime(settings)
        app.state.runtime = runtime
        workers = AppWorkers(runtime) if settings.run_workers else None
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
        title="swamp-club app", lifespan=lifespan, generate_unique_id_function=operation_id
    )
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)  # inside request ids
    install_outage_handling(app, request_db_timeout_seconds=settings.request_db_timeout_seconds)
    install_observability(
        app,
        metrics=MetricsScope(
            service="app",
            prefixes=("swamp_score_", "swamp_refresh_"),
            publishes_to=TELEMETRY_COMMANDS,
            consumes=SWAMP_CLUB_EVENTS,
        ),
    )
    app.include_router(health.router)
    app.include_router(users_router)
    app.include_router(api_keys_router)
    app.include_router(scores_router)
    app.include_router(admin.router)
    app.include_router(admin.queue_router)
    install_openapi(app)
    return app
