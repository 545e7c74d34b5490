"""`swamp-club events dead|retry|purge|adopt`: the events the ingest watcher set aside (SPEC
I11), and those an older release kept aside."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import typer
from pymongo.asynchronous.database import AsyncDatabase

from shared_contracts.mongo import make_client
from swamp_club.operator import EXIT_USAGE, fail, operator_settings, run_on_database
from telemetry_service.settings import TelemetrySettings

events_cli = typer.Typer(
    help="Events the ingest watcher set aside: list, retry, purge.", no_args_is_help=True
)
T = TypeVar("T")
JsonOption = typer.Option(False, "--json", help="Machine-readable output.")
AllOption = typer.Option(False, "--all", help="Every set-aside event.")


def on_telemetry(action: Callable[[AsyncDatabase[dict[str, Any]]], Awaitable[T]]) -> T:
    """Run ``action`` on telemetry's database, found as every operator command finds it."""
    settings = operator_settings(TelemetrySettings)

    async def main() -> T:
        client = make_client(
            settings.mongodb_uri, app_name="swamp-club-cli", **settings.client_options()
        )
        try:
            return await action(client[settings.telemetry_db])
        finally:
            await client.close()

    return run_on_database(main)


def chosen_ids(ids: list[str] | None, every: bool) -> list[str] | None:
    """Exactly one of: some ids, or --all (None)."""
    if bool(ids) == every:
        typer.secho("error: give event ids, or --all", err=True, fg=typer.colors.RED)
        raise typer.Exit(2)
    return None if every else list(ids or [])


def refuse_unknown(selected: list[str] | None, count: int) -> None:
    """Ids that are not set-aside events are a usage error, as malformed ids are for queue."""
    if selected is not None and count != len(set(selected)):
        missing = len(set(selected)) - count
        raise fail(f"{missing} of the ids given are not set-aside events", EXIT_USAGE)


@events_cli.command("dead")
def dead(
    limit: int = typer.Option(50, "--limit", min=1, max=10_000), as_json: bool = JsonOption
) -> None:
    """Set-aside events, newest first, with why."""
    from telemetry_service.processing.set_aside import count_set_aside, list_set_aside

    async def read(db: AsyncDatabase[dict[str, Any]]) -> tuple[int, list[dict[str, Any]]]:
        return await count_set_aside(db), await list_set_aside(db, limit=limit)

    total, rows = on_telemetry(read)
    if as_json:
        typer.echo(json.dumps({"setAside": total, "events": rows}, default=str))
        return
    for row in rows:
        typer.echo(
            f"{row['id']}  device {row['distinctId']}  received {row['receivedAt']}  "
            f"attempts {row['attempts']}  {row['lastError']}"
        )
    typer.echo(f"{total} event(s) set aside")


@events_cli.command("retry")
def retry(
    ids: list[str] | None = typer.Argument(None, help="Event ids (insert_id)."),
    every: bool = AllOption,
    as_json: bool = JsonOption,
) -> None:
    """Give set-aside events back to the watcher with a fresh attempt budget."""
    from telemetry_service.processing.set_aside import retry_set_aside

    selected = chosen_ids(ids, every)
    count = on_telemetry(lambda db: retry_set_aside(db, ids=selected))
    typer.echo(json.dumps({"retried": count}) if as_json else f"{count} event(s) retried")
    refuse_unknown(selected, count)


@events_cli.command("purge")
def purge(
    ids: list[str] | None = typer.Argument(None, help="Event ids (insert_id)."),
    every: bool = AllOption,
    as_json: bool = JsonOption,
) -> None:
    """Delete set-aside events for good (they were never counted)."""
    from telemetry_service.processing.set_aside import purge_set_aside

    selected = chosen_ids(ids, every)
    count = on_telemetry(lambda db: purge_set_aside(db, ids=selected))
    typer.echo(json.dumps({"purged": count}) if as_json else f"{count} event(s) purged")
    refuse_unknown(selected, count)


@events_cli.command("adopt")
def adopt(as_json: bool = JsonOption) -> None:
    """Move the events an older release kept aside into events_aside (a worker's start does
    it while that release's index is there; this reads every stored event)."""
    from telemetry_service.processing.aside import adopt_older_release

    count = on_telemetry(lambda db: adopt_older_release(db, look=True))
    typer.echo(json.dumps({"adopted": count}) if as_json else f"{count} event(s) adopted")
