"""One `swamp-club up` per data directory, and how the operator's commands find it.

`up` holds an exclusive ``flock`` on ``<data dir>/up.lock`` for as long as it runs: a second copy
on the same directory is refused at once, and the kernel drops the lock when the process dies, so
a crash never leaves a stale lock behind. Next to it, ``embedded-db.json`` says where the embedded
database listens; the operator's commands (`queue ...`, `telemetry verify`, `backfill --status`)
read it when ``MONGODB_URI`` is unset, and trust it only while the lock is held.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO

LOCK_FILE = "up.lock"
STATE_FILE = "embedded-db.json"


class InstanceError(Exception):
    """Another copy owns the data directory, or none is running; the message is one line."""


@contextlib.contextmanager
def exclusive(data_dir: Path) -> Iterator[None]:
    """Hold the data directory for this process, or raise InstanceError at once."""
    data_dir.mkdir(parents=True, exist_ok=True)
    lock: IO[str] = (data_dir / LOCK_FILE).open("a+")
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            owner = lock.read().strip() or "?"
            raise InstanceError(
                f"data directory {data_dir} is in use by another swamp-club up (pid {owner});"
                " stop it or set SWAMP_DATA_DIR to another directory"
            ) from None
        lock.seek(0)
        lock.truncate()
        lock.write(str(os.getpid()))
        lock.flush()
        try:
            yield
        finally:
            (data_dir / STATE_FILE).unlink(missing_ok=True)
    finally:
        lock.close()  # releases the flock


def write_state(data_dir: Path, *, uri: str, db_pid: int) -> None:
    """Called under ``exclusive``: where the embedded database of this data directory listens."""
    state = {"uri": uri, "pid": os.getpid(), "dbPid": db_pid}
    temporary = data_dir / f".{STATE_FILE}.tmp"
    temporary.write_text(json.dumps(state))
    temporary.replace(data_dir / STATE_FILE)  # readers never see half a file


def running_uri(data_dir: Path) -> str:
    """The embedded database of the `up` that holds ``data_dir``, or InstanceError."""
    state_path = data_dir / STATE_FILE
    lock_path = data_dir / LOCK_FILE
    if not lock_path.exists() or not state_path.exists():
        raise InstanceError(
            f"MONGODB_URI is unset and no swamp-club up is running with data in {data_dir}"
            " (start one with `make run`, set SWAMP_DATA_DIR, or set MONGODB_URI)"
        )
    with lock_path.open("r") as lock:
        try:
            # Getting a shared lock means nobody holds the exclusive one: the state is stale.
            fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            pass
        else:
            raise InstanceError(
                f"MONGODB_URI is unset and the swamp-club up that used {data_dir} has stopped"
                " (start it with `make run`, or set MONGODB_URI)"
            )
    try:
        uri = json.loads(state_path.read_text())["uri"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InstanceError(f"unreadable {state_path}: {exc}") from None
    if not isinstance(uri, str):
        raise InstanceError(f"unreadable {state_path}: no uri")
    return uri
