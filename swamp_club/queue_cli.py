"""`swamp-club queue ...` and `swamp-club contracts schema`: the operator's view of the bus."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import typer
from bson import ObjectId
from pymongo.asynchronous.database import AsyncDatabase

from shared_contracts.messages import json_schemas
from shared_contracts.mongo import make_client
from shared_contracts.names import QUEUE_COLLECTIONS
from shared_contracts.queue.admin import list_dead, purge_done, queue_stats, retry_dead
from shared_contracts.queue.engine import utcnow
from shared_contracts.settings import BusSettings
from swamp_club.operator import EXIT_USAGE, fail, operator_settings, run_on_database

queue_cli = typer.Typer(help="Inspect and repair the two work queues.", no_args_is_help=True)
contracts_cli = typer.Typer(help="The message contract between the services.", no_args_is_help=True)

T = TypeVar("T")
QueueOption = typer.Option(None, "--queue", "-q", help="One queue (default: both).")
JsonOption = typer.Option(False, "--json", help="Machine-readable output.")


def run_on_bus(action: Callable[[AsyncDatabase[dict[str, Any]]], Awaitable[T]]) -> T:
    settings = operator_settings(BusSettings)

    async def main() -> T:
        client = make_client(
            settings.mongodb_uri, app_name="swamp-club-cli", **settings.client_options()
        )
        try:
            return await action(client[settings.bus_db])
        finally:
            await client.close()

    return run_on_database(main)


def chosen(queue: str | None) -> tuple[str, ...]:
    if queue is None:
        return QUEUE_COLLECTIONS
    if queue not in QUEUE_COLLECTIONS:
        typer.secho(
            f"error: unknown queue {queue!r} (one of {', '.join(QUEUE_COLLECTIONS)})", err=True
        )
        raise typer.Exit(2)
    return (queue,)


def table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


@queue_cli.command("stats")
def stats(queue: str | None = QueueOption, as_json: bool = JsonOption) -> None:
    """Messages per status and type, oldest pending age, dead letters."""
    names = chosen(queue)

    async def collect(bus: AsyncDatabase[dict[str, Any]]) -> list[dict[str, Any]]:
        return [await queue_stats(bus[name], now=utcnow()) for name in names]

    results = run_on_bus(collect)
    if as_json:
        typer.echo(json.dumps(results, indent=2))
        return
    rows = [["queue", "pending", "active", "done", "dead", "oldest pending"]]
    for r in results:
        age = r["oldestPendingAgeSeconds"]
        counts = [str(r["byStatus"].get(s, 0)) for s in ("pending", "active", "done", "dead")]
        rows.append([r["queue"], *counts, "-" if age is None else f"{age:.1f}s"])
    typer.echo(table(rows))


@queue_cli.command("dead")
def dead(
    queue: str | None = QueueOption,
    type_: str | None = typer.Option(None, "--type", help="Only messages of this type."),
    limit: int = typer.Option(50, min=1, max=10_000),
    as_json: bool = JsonOption,
) -> None:
    """List dead messages with their last error, newest first."""
    names = chosen(queue)

    async def collect(bus: AsyncDatabase[dict[str, Any]]) -> list[dict[str, Any]]:
        found = []
        for name in names:
            found += [
                {"queue": name, **d} for d in await list_dead(bus[name], type_=type_, limit=limit)
            ]
        return found

    letters = run_on_bus(collect)
    if as_json:
        typer.echo(json.dumps(letters, indent=2, default=str))
        return
    rows = [["queue", "id", "type", "attempts", "last error"]]
    for d in letters:
        error = d.get("lastError") or {}
        summary = f"{error.get('type', '?')}: {error.get('message', '')}"[:100]
        rows.append(
            [d["queue"], str(d["_id"]), str(d.get("type")), str(d.get("attempts")), summary]
        )
    typer.echo(table(rows) if letters else "no dead messages")


@queue_cli.command("retry")
def retry(
    ids: list[str] = typer.Argument(None, help="Ids of dead messages to retry."),
    all_dead: bool = typer.Option(False, "--all-dead", help="Retry every dead message."),
    queue: str | None = QueueOption,
) -> None:
    """Return dead messages to pending with a fresh attempt budget."""
    if bool(ids) == all_dead:
        raise fail("give message ids or --all-dead (not both)", EXIT_USAGE)
    if malformed := [i for i in ids or [] if not ObjectId.is_valid(i)]:
        # Such an id can match nothing: "0 message(s)" and exit 0 would hide a typo.
        raise fail(f"not a message id: {malformed[0]!r} (24 hex digits)", EXIT_USAGE)
    names = chosen(queue)

    async def apply(bus: AsyncDatabase[dict[str, Any]]) -> int:
        return sum([await retry_dead(bus[n], ids=ids or None, now=utcnow()) for n in names])

    typer.echo(f"{run_on_bus(apply)} message(s) back to pending")


@queue_cli.command("purge")
def purge(
    done: bool = typer.Option(
        False, "--done", help="Delete done messages now (TTL does it anyway)."
    ),
    queue: str | None = QueueOption,
) -> None:
    """Delete finished messages."""
    if not done:
        typer.secho("error: say what to purge: --done", err=True)
        raise typer.Exit(2)
    names = chosen(queue)

    async def apply(bus: AsyncDatabase[dict[str, Any]]) -> int:
        return sum([await purge_done(bus[n]) for n in names])

    typer.echo(f"{run_on_bus(apply)} done message(s) deleted")


@contracts_cli.command("schema")
def schema() -> None:
    """Print the JSON Schema of every message, by queue and type."""
    typer.echo(json.dumps(json_schemas(), indent=2))
