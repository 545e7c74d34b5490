"""The ASGI app: one AsyncMongoClient opened in the lifespan and closed after it."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from shared_contracts.mongo import make_client
from shared_contracts.queue.indexes import ensure_queue_indexes
from shared_contracts.settings import load_settings
from swamp_app import health
from swamp_app.runtime import AppRuntime
from swamp_app.settings import AppSettings


def create_app(settings: AppSettings | None = None) -> FastAPI:
    settings = settings or load_settings(AppSettings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        client = make_client(settings.mongodb_uri, app_name="swamp_app")
        app.state.runtime = AppRuntime(settings=settings, client=client)
        try:
            await ensure_queue_indexes(
                client[settings.bus_db],
                done_retention_seconds=settings.queue_done_retention_seconds,
            )
            yield
        finally:
            await client.close()

    app = FastAPI(title="swamp-club app", lifespan=lifespan)
    app.include_router(health.router)
    return app
