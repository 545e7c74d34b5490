"""Keys are resolved when events are applied, never at the door (I10): /ingest never answers
401, a fresh key works at once, a revoked or long-unknown key counts as no key."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from prometheus_client import REGISTRY

from shared_contracts import mongo
from shared_contracts.keys import api_key_hash as key_hash
from shared_contracts.messages import ApiKeyIssued, ApiKeyRevoked, UserRegistered
from telemetry_service.collections import EVENTS, EVENTS_ASIDE
from telemetry_service.consumers.commands import command_consumer
from telemetry_service.processing.watcher import IngestWatcher
from telemetry_service.runtime import TelemetryRuntime
from tests.support import applied_event_ids
from tests.telemetry.conftest import Telemetry, cli_event


def resolutions(outcome: str) -> float:
    value = REGISTRY.get_sample_value("swamp_ingest_key_resolutions_total", {"outcome": outcome})
    return value or 0.0


def with_grace(runtime: TelemetryRuntime, seconds: float) -> IngestWatcher:
    settings = runtime.settings.model_copy(update={"key_resolve_grace_seconds": seconds})
    return IngestWatcher(TelemetryRuntime(settings=settings, client=runtime.client))


async def test_a_key_the_app_just_returned_is_accepted_and_waits_for_its_user(
    telemetry: Telemetry,
) -> None:
    """Sequence 6 of issue 14: 19 of 20 fresh users used to get 401 on their first send."""
    user_id, key = await telemetry.register("fresh", drain=False)  # commands not applied yet
    waiting_before = resolutions("waiting")
    response = await telemetry.post({"events": [cli_event("f-dev"), cli_event("f-dev")]}, key)
    assert response.status_code == 202
    other = await telemetry.post(cli_event("anon-dev"))  # an unrelated event is not held back
    assert other.status_code == 202

    await telemetry.watcher.drain()  # before the commands: the fresh key is not known yet
    assert resolutions("waiting") >= waiting_before + 2
    anonymous = await telemetry.device("anon-dev")
    assert anonymous.json()["anonymous"]["invocations"] == 1
    pending = await telemetry.runtime.db[EVENTS_ASIDE].count_documents({"processed": False})
    assert pending == 2
    waiting = await telemetry.runtime.db[EVENTS_ASIDE].find({"processed": False}).to_list()
    assert all(e["attempts"] == 0 for e in waiting)  # waiting is not failing

    await command_consumer(telemetry.runtime).drain()
    await mongo.update_many(
        telemetry.runtime.db[EVENTS_ASIDE], {}, {"$set": {"leaseUntil": datetime.now(UTC)}}
    )
    await telemetry.watcher.drain()
    stats = await telemetry.stats("fresh")
    assert (stats["userId"], stats["totalInvocations"]) == (user_id, 2)


async def test_a_key_still_unknown_after_the_grace_period_counts_as_no_key(
    telemetry: Telemetry,
) -> None:
    _, owner_key = await telemetry.register("owner")
    await telemetry.post(cli_event("laptop"), owner_key)
    await telemetry.drain()
    unknown_before = resolutions("unknown")
    assert (await telemetry.post(cli_event("laptop"), "swamp_never-issued")).status_code == 202
    await with_grace(telemetry.runtime, 0).drain()
    assert resolutions("unknown") == unknown_before + 1
    # The device's anonymous event: it counts for the device's owner (I3).
    assert (await telemetry.stats("owner"))["totalInvocations"] == 2
    (event,) = await telemetry.runtime.db[EVENTS].find({"unattributed": "unknown"}).to_list()
    assert event["_id"] in await applied_event_ids(telemetry.runtime.db)
    assert "swamp_never-issued" not in str(event)  # only the hash is stored


async def test_a_revoked_key_counts_as_no_key_even_for_events_sent_before_the_revoke(
    telemetry: Telemetry,
) -> None:
    carol, key = await telemetry.register("carol")
    await telemetry.post(cli_event("c-dev"), key)
    await telemetry.drain()
    # Sent while the key was valid, applied after the revoke: resolved when applied (I10).
    assert (await telemetry.post(cli_event("c-dev"), key)).status_code == 202
    await telemetry.runtime.commands.publish(ApiKeyRevoked(keyHash=key_hash(key)))
    await telemetry.drain()
    assert (await telemetry.post(cli_event("c-dev"), key)).status_code == 202
    await telemetry.drain()
    device = (await telemetry.device("c-dev")).json()
    assert device["users"][carol]["invocations"] == 1
    assert device["anonymous"]["invocations"] == 2
    # Carol owns the device, so its anonymous events still count for her.
    assert (await telemetry.stats("carol"))["totalInvocations"] == 3
    assert await telemetry.runtime.db[EVENTS].count_documents({"unattributed": "revoked"}) == 2


async def test_a_malformed_authorization_header_is_no_key_not_a_401(telemetry: Telemetry) -> None:
    response = await telemetry.http.post(
        "/ingest", json=cli_event("m-dev"), headers={"Authorization": "Basic Zm9vOmJhcg=="}
    )
    assert response.status_code == 202
    await telemetry.drain()
    device = (await telemetry.device("m-dev")).json()
    assert device["anonymous"]["invocations"] == 1


async def test_a_key_learned_before_its_user_binds_devices_on_registration(
    telemetry: Telemetry,
) -> None:
    """The user's events are applied under its userId before telemetry knows its name."""
    user_id, key = "u-late", "swamp_late-key"
    await telemetry.runtime.commands.publish(ApiKeyIssued(userId=user_id, keyHash=key_hash(key)))
    await telemetry.drain()
    await telemetry.post(cli_event("late-dev"), key)
    await telemetry.drain()
    assert await telemetry.stats_status("judy") == 404
    await telemetry.runtime.commands.publish(
        UserRegistered(userId=user_id, username="judy", seq=telemetry.tick())
    )
    await telemetry.drain()
    stats = await telemetry.stats("judy")
    assert (stats["userId"], stats["totalInvocations"]) == (user_id, 1)


async def test_events_waiting_for_a_key_are_retried_after_the_retry_interval(
    telemetry: Telemetry,
) -> None:
    await telemetry.post(cli_event("w-dev"), "swamp_issued-later")
    await telemetry.watcher.drain()
    (event,) = await telemetry.runtime.db[EVENTS_ASIDE].find().to_list()
    retry = timedelta(seconds=telemetry.runtime.settings.key_resolve_retry_seconds)
    assert event["leaseUntil"] - datetime.now(UTC) <= retry
    assert "claimToken" not in event
