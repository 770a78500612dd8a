"""The run database as a file: its schema and version, and creating and opening it.

``orchestrator.store`` is what the master and the views do with an open
database; this module is how one comes to be open: the DDL (``SCHEMA``, and
``OUTBOX_DDL`` for the notification outbox), ``PRAGMA user_version`` checks, the
writer's pragmas (WAL, ``synchronous=NORMAL``), and the errors that say, in one
line, why a file cannot be used (``StoreError``) or written (``StoreUnwritable``).
"""

from __future__ import annotations

import errno
import os
import sqlite3
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import orjson

from orchestrator.errors import OrchError

__all__ = [
    "OUTBOX_DDL",
    "SCHEMA_VERSION",
    "RunRow",
    "StoreError",
    "StoreUnwritable",
    "configure_writer",
    "create_db",
    "disk_reason",
    "one_line",
    "open_db",
]

#: Bumped on any incompatible schema change; stored in ``PRAGMA user_version``.
SCHEMA_VERSION = 1

_BUSY_TIMEOUT_MS = 5000
#: Keep the WAL file from staying huge after a burst (bytes).
_JOURNAL_SIZE_LIMIT_BYTES = 16 * 1024 * 1024


class StoreError(OrchError):
    """Raised when a run's database cannot be opened or has an unknown schema."""


class StoreUnwritable(StoreError):
    """Raised by ``commit`` when the disk refuses the run's state (full, I/O error).

    Nothing staged is lost: the store keeps every write since the last good
    commit and ``commit`` replays them all on its next call, so the caller
    retries by calling it again. ``reason`` is the cause in plain words
    ("No space left on device").
    """

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


#: SQLite primary result codes that mean the disk, not the data: SQLITE_IOERR, SQLITE_FULL.
_SQLITE_IOERR, _SQLITE_FULL = 10, 13


def disk_reason(exc: sqlite3.Error) -> str | None:
    """The cause in plain words when ``exc`` is a disk problem, else None."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is None:
        text = str(exc)
        code = _SQLITE_FULL if "full" in text else _SQLITE_IOERR if "I/O" in text else None
    if code is not None and code & 0xFF == _SQLITE_FULL:
        return os.strerror(errno.ENOSPC)
    if code is not None and code & 0xFF == _SQLITE_IOERR:
        return f"disk I/O error ({one_line(exc)})"
    return None


@dataclass(frozen=True, slots=True)
class RunRow:
    """What ``Store.create`` records about a new run."""

    id: str
    name: str
    task_json: dict[str, Any]
    source: str
    shard_count: int
    started_at: float
    jobs: int | None


# Column sets used to validate set_run/set_shard kwargs are read back from this
# schema (PRAGMA table_info) when a store is opened, so they cannot drift apart.
SCHEMA = """
CREATE TABLE run (
  id TEXT NOT NULL, name TEXT NOT NULL, task_json BLOB NOT NULL, source TEXT NOT NULL,
  shard_count INTEGER NOT NULL, state TEXT NOT NULL, exit_code INTEGER,
  started_at REAL NOT NULL, ended_at REAL, master_pid INTEGER, master_create_time REAL,
  endpoint TEXT, control TEXT, jobs INTEGER
);
CREATE TABLE shards (
  idx INTEGER PRIMARY KEY, id TEXT UNIQUE NOT NULL, record BLOB NOT NULL, line INTEGER,
  state TEXT NOT NULL DEFAULT 'pending', attempts INTEGER NOT NULL DEFAULT 0,
  pid INTEGER, pgid INTEGER, pid_create_time REAL,
  exit_code INTEGER, signal INTEGER, reason TEXT, last_error TEXT,
  started_at REAL, ended_at REAL, done INTEGER, total INTEGER,
  checkpoint BLOB, checkpoint_done INTEGER, checkpoint_at REAL,
  heartbeat_at REAL, updated_at REAL, start_done INTEGER, rss_bytes INTEGER, message TEXT,
  node TEXT
);
CREATE TABLE attempts (
  shard_idx INTEGER NOT NULL, attempt INTEGER NOT NULL,
  pid INTEGER, pgid INTEGER, create_time REAL, started_at REAL, ended_at REAL,
  exit_code INTEGER, signal INTEGER, reason TEXT,
  PRIMARY KEY (shard_idx, attempt)
);
CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL)
"""
# The notification outbox (orchestrator/notify): the master appends rows in the commit of
# the state change that caused them; the deliverer process claims, sends and marks them.
# Created by every writer open, so a run created by an older orch gains it on resume.
OUTBOX_DDL = """
CREATE TABLE IF NOT EXISTS outbox (
  id INTEGER PRIMARY KEY AUTOINCREMENT, channel TEXT NOT NULL, event TEXT NOT NULL,
  body BLOB NOT NULL, created_at REAL NOT NULL, next_at REAL NOT NULL,
  attempts INTEGER NOT NULL DEFAULT 0, claimed_by TEXT, claim_until REAL,
  delivered_at REAL, given_up_at REAL, last_error TEXT, answer TEXT
)
"""
# Built after the bulk insert (faster than maintaining it row by row).
INDEXES = "CREATE INDEX shards_state ON shards (state)"


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def connect(path: str, mode: str) -> sqlite3.Connection:
    uri = Path(path).absolute().as_uri() + f"?mode={mode}"
    # isolation_level=None: we issue BEGIN/COMMIT ourselves, nothing implicit.
    conn = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=_BUSY_TIMEOUT_MS / 1000)
    conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
    return conn


def remove_db_files(path: str) -> None:
    for suffix in ("", "-wal", "-shm", "-journal"):
        try:
            os.unlink(path + suffix)
        except FileNotFoundError:
            pass


def create_db(
    path: str, run: RunRow, shards: Iterable[tuple[str, Mapping[str, Any], int]]
) -> sqlite3.Connection:
    """Create a run database with its run row and every shard, in one transaction.

    Fails with ``StoreError`` if ``path`` exists. If anything fails, the file
    is removed again; a kill mid-create leaves a file that ``open_db`` refuses
    as interrupted. Either way there is never a half-recorded run.
    """
    try:
        # O_EXCL claims the path atomically: two creates cannot share it.
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        raise StoreError(f"{path}: a run database already exists") from None
    except OSError as exc:
        raise StoreError(f"{path}: cannot create run database: {one_line(exc)}") from None
    conn: sqlite3.Connection | None = None
    try:
        conn = connect(path, "rw")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("BEGIN IMMEDIATE")
        for ddl in SCHEMA.split(";"):
            conn.execute(ddl)
        conn.execute(
            "INSERT INTO run (id, name, task_json, source, shard_count, state, started_at,"
            " jobs) VALUES (:id, :name, :task_json, :source, :shard_count, 'pending',"
            " :started_at, :jobs)",
            asdict(run) | {"task_json": orjson.dumps(run.task_json)},
        )
        cur = conn.executemany(
            "INSERT INTO shards (idx, id, record, line) VALUES (?, ?, ?, ?)",
            (
                (idx, sid, orjson.dumps(rec if type(rec) is dict else dict(rec)), line)
                for idx, (sid, rec, line) in enumerate(shards)
            ),
        )
        if cur.rowcount != run.shard_count:
            raise ValueError(
                f"RunRow.shard_count is {run.shard_count} but {cur.rowcount} shards were given"
            )
        conn.execute(INDEXES)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
        configure_writer(conn)
        return conn
    except BaseException as exc:
        if conn is not None:
            conn.close()
        remove_db_files(path)
        if isinstance(exc, sqlite3.IntegrityError):
            raise StoreError(f"{path}: {one_line(exc)}") from None
        if isinstance(exc, sqlite3.Error):
            raise StoreError(f"{path}: cannot create run database: {one_line(exc)}") from None
        raise


def open_db(path: str, *, readonly: bool = False) -> sqlite3.Connection:
    """Open an existing run database; the writer (resume) or a read-only view."""
    if not os.path.isfile(path):
        raise StoreError(f"{path}: no run database there")
    conn: sqlite3.Connection | None = None
    try:
        conn = connect(path, "ro" if readonly else "rw")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version == 0:
            raise StoreError(f"{path}: not an orch run database (or its creation was interrupted)")
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{path}: run database has schema version {version}, newer than this"
                f" orch understands ({SCHEMA_VERSION}); upgrade orch"
            )
        (rows,) = conn.execute("SELECT count(*) FROM run").fetchone()
        if rows != 1:
            raise StoreError(f"{path}: run database has {rows} run rows, expected 1")
        if not readonly:
            configure_writer(conn)
        return conn
    except (StoreError, sqlite3.Error) as exc:
        if conn is not None:
            conn.close()
        if isinstance(exc, StoreError):
            raise
        raise StoreError(f"{path}: cannot open run database: {one_line(exc)}") from None


def configure_writer(conn: sqlite3.Connection) -> None:
    """WAL, ``synchronous=NORMAL``, a bounded WAL file, and the outbox table."""
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute(f"PRAGMA journal_size_limit = {_JOURNAL_SIZE_LIMIT_BYTES}")
    conn.execute(OUTBOX_DDL)
