"""What the operator's commands (`queue ...`, `telemetry verify`, `telemetry backfill`) share:
find the database, fail in one line when it does not answer, and the exit codes for both.

With MONGODB_URI unset they use the embedded database of the `swamp-club up` running on
SWAMP_DATA_DIR (its state file, see swamp_club.instance), not a guessed localhost:27017.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import typer
from pydantic_settings import BaseSettings
from pymongo.errors import PyMongoError

from shared_contracts.settings import SettingsError, load_settings
from swamp_club.instance import InstanceError, running_uri
from swamp_club.settings import LauncherSettings

S = TypeVar("S", bound=BaseSettings)
T = TypeVar("T")

EXIT_USAGE = 2
EXIT_DATABASE = 3


def fail(message: str, code: int) -> typer.Exit:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    return typer.Exit(code)


def operator_settings(cls: type[S]) -> S:
    """``cls`` from the environment, its MONGODB_URI found as described above."""
    try:
        launcher = load_settings(LauncherSettings)
        # An operator waits 3 s for the database, not the services' 30 s.
        overrides = {
            "MONGODB_SERVER_SELECTION_TIMEOUT_MS": os.environ.get(
                "MONGODB_SERVER_SELECTION_TIMEOUT_MS", "3000"
            )
        }
        if launcher.mongodb_uri is None:
            overrides["MONGODB_URI"] = running_uri(launcher.data_dir.resolve())
        return load_settings(cls, **overrides)
    except SettingsError as exc:
        raise fail(str(exc), EXIT_USAGE) from None
    except InstanceError as exc:
        raise fail(str(exc), EXIT_DATABASE) from None


def run_on_database(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run ``main`` (which opens the client); a database that does not answer within the
    settings' timeouts is one line and exit 3, never the driver's 280-line traceback."""
    try:
        return asyncio.run(main())
    except PyMongoError as exc:
        reason = str(exc).split(", Timeout:")[0].split(" (configured timeouts")[0][:200]
        raise fail(
            f"database unavailable ({type(exc).__name__}: {reason})", EXIT_DATABASE
        ) from None
