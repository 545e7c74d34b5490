"""Fixtures: one database server per test session, fresh databases per test.

Without MONGODB_URI the embedded server (SecantusDB) runs as a separate process for the
session; with it, every test runs against that deployment (a replica set) instead.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from pymongo import AsyncMongoClient

from shared_contracts.mongo import make_client
from swamp_app.settings import AppSettings
from swamp_club.embedded_db import EmbeddedDb
from telemetry_service.settings import TelemetrySettings
from tests.support import DbNames


@pytest.fixture(scope="session")
def mongo_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if uri := os.environ.get("MONGODB_URI"):
        yield uri
        return
    log = tmp_path_factory.mktemp("embedded-db") / "server.log"
    with EmbeddedDb(log_path=log) as db:
        yield db.uri


@pytest.fixture(scope="session")
async def mongo_client(mongo_uri: str) -> AsyncIterator[AsyncMongoClient[dict[str, Any]]]:
    client = make_client(mongo_uri, app_name="swamp-club-tests")
    yield client
    await client.close()


@pytest.fixture
async def db_names(mongo_client: AsyncMongoClient[dict[str, Any]]) -> AsyncIterator[DbNames]:
    names = DbNames.unique()
    yield names
    for name in names.all():
        await mongo_client.drop_database(name)


@pytest.fixture
def telemetry_settings(mongo_uri: str, db_names: DbNames) -> TelemetrySettings:
    return TelemetrySettings(
        MONGODB_URI=mongo_uri, TELEMETRY_DB=db_names.telemetry, BUS_DB=db_names.bus
    )


@pytest.fixture
def app_settings(mongo_uri: str, db_names: DbNames) -> AppSettings:
    return AppSettings(MONGODB_URI=mongo_uri, APP_DB=db_names.app, BUS_DB=db_names.bus)
