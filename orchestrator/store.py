"""The run's state database: one SQLite file per run, written by the master only.

* One writer, many readers: the master writes; ``orch status`` reads at any
  time, live or after the run. WAL mode lets readers see the last committed
  state without blocking the writer or being blocked by it.
* Never corrupted by a kill (promise 7): every change is inside a transaction,
  visible only at ``COMMIT``; WAL frames are checksummed, so a kill at any
  instant (mid-statement, mid-commit, mid-checkpoint) leaves the old or the new
  state and the next connection replays or discards the WAL tail.
* ``synchronous=NORMAL``: ``commit()`` returns once the WAL frames are handed
  to the OS, so a commit survives a SIGKILL of the master. There is no fsync
  per commit: an OS crash or power loss may lose the last few commits, but
  never corrupts. The master commits a shard's ``done`` before acting on it.
* Group commit: mutating methods only stage SQL (cached prepared statements)
  in one open transaction; the master calls ``commit()`` once per loop
  iteration, so a burst of progress messages costs one WAL write.
* Readers open with ``?mode=ro``: that works while the master is live and
  after it is gone, even after a SIGKILL left a hot WAL. If ``-wal``/``-shm``
  are missing, SQLite creates them, which needs write access to the run
  directory (it is the user's own, mode 0700). Readers never keep a
  transaction open between calls, so they never hold back WAL checkpoints.
* The schema version is ``PRAGMA user_version``; a database from a newer orch
  is refused with ``StoreError`` rather than misread.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Collection, Iterable, Iterator, Mapping
from typing import Any

import orjson

from orchestrator.storefile import (
    OUTBOX_DDL,
    SCHEMA_VERSION,
    RunRow,
    StoreError,
    StoreUnwritable,
    create_db,
    disk_reason,
    one_line,
    open_db,
)

#: The file's schema and errors live in ``orchestrator.storefile``; importers of the
#: store find them here too.
__all__ = ["OUTBOX_DDL", "SCHEMA_VERSION", "RunRow", "Store", "StoreError", "StoreUnwritable"]


def _encode_json(value: Any) -> bytes | None:
    """orjson-encode ``value``; ``None`` is stored as SQL NULL.

    ``bytes`` are taken as JSON the caller already encoded (e.g. a checkpoint
    as it arrived on the wire) and are only validated, not re-encoded.
    """
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray, memoryview)):
        raw = bytes(value)
        orjson.loads(raw)  # reject garbage before it reaches every reader
        return raw
    return orjson.dumps(value)


def _decode_json(raw: bytes | None) -> Any:
    return None if raw is None else orjson.loads(raw)


def _rows(cursor: sqlite3.Cursor) -> list[dict[str, Any]]:
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def _decode_shard(row: dict[str, Any]) -> dict[str, Any]:
    row["record"] = _decode_json(row["record"])
    row["checkpoint"] = _decode_json(row["checkpoint"])
    return row


class Store:
    """A run's state database: the master's writer or a read-only view.

    Use ``Store.create`` (new run) or ``Store.open`` (resume, or
    ``readonly=True`` for ``orch status``); never the constructor directly.
    """

    def __init__(self, conn: sqlite3.Connection, path: str, *, readonly: bool) -> None:
        self._conn = conn
        self.path = path
        self.readonly = readonly
        self._dirty = False
        #: Every write since the last good commit, to replay after a disk failure:
        #: (sql, params, executemany).
        self._journal: list[tuple[str, Any, bool]] = []
        #: Set when a write failed on the disk: later writes wait in the journal.
        self._failing: str | None = None
        self._update_sql: dict[tuple[str, ...], str] = {}
        self._settable = {
            table: frozenset(row[1] for row in conn.execute(f"PRAGMA table_info({table})")) - fixed
            for table, fixed in (("run", {"id"}), ("shards", {"idx", "id", "record", "line"}))
        }

    # --- opening and closing ---

    @classmethod
    def create(
        cls,
        path: str,
        run: RunRow,
        shards: Iterable[tuple[str, Mapping[str, Any], int]],
    ) -> Store:
        """Create a run database with its run row and every shard (``storefile.create_db``)."""
        return cls(create_db(path, run, shards), path, readonly=False)

    @classmethod
    def open(cls, path: str, *, readonly: bool = False) -> Store:
        """Open an existing run database; the writer (resume) or a read-only view."""
        return cls(open_db(path, readonly=readonly), path, readonly=readonly)

    def close(self) -> None:
        """Close the connection; anything staged and not committed is rolled back."""
        self._conn.close()
        self._dirty = False
        self._journal.clear()

    # --- writer: staged in one open transaction until commit() ---

    def _begin(self) -> None:
        if self.readonly:
            raise RuntimeError(f"{self.path}: store was opened read-only")
        try:
            self._conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            raise StoreError(f"{self.path}: cannot write: {one_line(exc)}") from None
        self._dirty = True

    def _write(self, sql: str, params: Any, many: bool = False) -> int:
        """Stage one statement; its changed row count, or -1 while the disk is failing.

        A disk failure here (a page cache spill) is not raised: the statement
        waits in the journal, and ``commit`` replays the journal or raises
        ``StoreUnwritable``. The caller's in-memory state stays consistent.
        """
        if many:
            params = list(params)
        self._journal.append((sql, params, many))
        if self._failing is not None:
            self._dirty = True
            return -1
        if not self._dirty:
            self._begin()
        try:
            if many:
                return self._conn.executemany(sql, params).rowcount
            return self._conn.execute(sql, params).rowcount
        except sqlite3.OperationalError as exc:
            reason = disk_reason(exc)
            if reason is None:
                raise StoreError(f"{self.path}: cannot write: {one_line(exc)}") from None
            self._failing = reason
            return -1

    def set_run(self, **fields: Any) -> None:
        """Stage an update of the run row (any column except ``id``)."""
        if "task_json" in fields:
            fields["task_json"] = orjson.dumps(fields["task_json"])
        self._stage_update("run", fields)

    def set_shard(self, idx: int, **fields: Any) -> None:
        """Stage an update of one shard (any column except idx/id/record/line).

        ``checkpoint`` is orjson-encoded here; pass it only when it changed.
        """
        if "checkpoint" in fields:
            fields["checkpoint"] = _encode_json(fields["checkpoint"])
        if self._stage_update("shards", fields, idx) == 0:
            raise ValueError(f"no shard with idx {idx}")

    def _stage_update(self, table: str, fields: dict[str, Any], *idx: int) -> int:
        """Stage ``UPDATE table SET fields`` (of shard ``idx``); return the rows changed."""
        if not fields:
            return -1
        key = (table, *fields)
        sql = self._update_sql.get(key)
        if sql is None:  # first use of this column set: validate it and prepare the SQL
            unknown = sorted(set(fields) - self._settable[table])
            if unknown:
                raise ValueError(
                    f"{table}: cannot set column(s) {', '.join(unknown)};"
                    f" settable: {', '.join(sorted(self._settable[table]))}"
                )
            sql = f"UPDATE {table} SET " + ", ".join(f"{c} = ?" for c in fields)
            sql = self._update_sql[key] = sql + (" WHERE idx = ?" if idx else "")
        return self._write(sql, (*fields.values(), *idx))

    def attempt_started(
        self,
        idx: int,
        attempt: int,
        *,
        pid: int | None,
        pgid: int | None,
        create_time: float | None,
        started_at: float,
    ) -> None:
        """Stage a new attempt row; (idx, attempt) must be new."""
        self._write(
            "INSERT INTO attempts (shard_idx, attempt, pid, pgid, create_time, started_at)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (idx, attempt, pid, pgid, create_time, started_at),
        )

    def reopen_attempt(self, idx: int, attempt: int) -> None:
        """A resumed master took the attempt back alive: it has not ended after all."""
        if not self._dirty:
            self._begin()
        self._conn.execute(
            "UPDATE attempts SET ended_at = NULL, reason = NULL"
            " WHERE shard_idx = ? AND attempt = ?",
            (idx, attempt),
        )

    def attempt_ended(
        self,
        idx: int,
        attempt: int,
        *,
        ended_at: float,
        exit_code: int | None,
        signal: int | None,
        reason: str | None,
    ) -> None:
        """Stage the end of an attempt recorded by ``attempt_started``."""
        changed = self._write(
            "UPDATE attempts SET ended_at = ?, exit_code = ?, signal = ?, reason = ?"
            " WHERE shard_idx = ? AND attempt = ?",
            (ended_at, exit_code, signal, reason, idx, attempt),
        )
        if changed == 0:
            raise ValueError(f"no attempt {attempt} of shard idx {idx} was started")

    def set_progress_many(self, rows: Iterable[tuple[Any, ...]]) -> None:
        """Stage many progress updates at once: ``(done, total, heartbeat_at, rss_bytes, idx)``.

        One ``executemany`` for the master's periodic flush of every shard that
        reported since the last one.
        """
        self._write(
            "UPDATE shards SET done = ?, total = ?, heartbeat_at = ?, rss_bytes = ? WHERE idx = ?",
            rows,
            many=True,
        )

    def attempt_identity(self, idx: int, attempt: int, create_time: float) -> None:
        """Stage the start time (/proc ticks) of an attempt's process, read after its spawn."""
        self._write(
            "UPDATE attempts SET create_time = ? WHERE shard_idx = ? AND attempt = ?",
            (create_time, idx, attempt),
        )
        self._write(
            "UPDATE shards SET pid_create_time = ? WHERE idx = ? AND attempts = ?",
            (create_time, idx, attempt),
        )

    def add_counter(self, name: str, delta: int) -> None:
        """Stage ``counters[name] += delta`` (created at 0 if new)."""
        self._write(
            "INSERT INTO counters (name, value) VALUES (?, ?)"
            " ON CONFLICT (name) DO UPDATE SET value = value + excluded.value",
            (name, delta),
        )

    def add_notification(
        self, channel: str, event: str, body: Mapping[str, Any], created_at: float
    ) -> None:
        """Stage an outbox row (due at once); it commits with the state change that caused it."""
        self._write(
            "INSERT INTO outbox (channel, event, body, created_at, next_at) VALUES (?, ?, ?, ?, ?)",
            (channel, event, orjson.dumps(body), created_at, created_at),
        )

    def commit(self) -> None:
        """Make everything staged durable in one transaction (no-op if nothing is).

        When the disk refuses (full, I/O error) it raises ``StoreUnwritable``
        and keeps everything staged: call it again to retry. A retry rolls back
        whatever SQLite kept of the failed transaction and replays the journal,
        so it commits exactly the writes staged since the last good commit.
        """
        if not self._dirty:
            return
        if self._failing is None:
            try:
                self._conn.execute("COMMIT")
            except sqlite3.OperationalError as exc:
                reason = disk_reason(exc)
                if reason is None:
                    raise StoreError(f"{self.path}: cannot commit: {one_line(exc)}") from None
                self._failing = reason
            else:
                self._committed()
                return
        self._replay()

    def _replay(self) -> None:
        conn = self._conn
        try:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            conn.execute("BEGIN IMMEDIATE")
            for sql, params, many in self._journal:
                if many:
                    conn.executemany(sql, params)
                else:
                    conn.execute(sql, params)
            conn.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            reason = disk_reason(exc) or one_line(exc)
            self._failing = reason
            try:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass  # the next replay starts with a rollback again
            raise StoreUnwritable(self.path, reason) from None
        self._committed()

    def _committed(self) -> None:
        self._journal.clear()
        self._failing = None
        self._dirty = False

    @property
    def failing(self) -> str | None:
        """Why the disk refused the last write (None while writes succeed)."""
        return self._failing

    @property
    def dirty(self) -> bool:
        """True when something was staged since the last commit."""
        return self._dirty

    # --- readers: plain JSON-friendly dicts; the writer sees its staged state ---

    def _query(self, sql: str, params: tuple[Any, ...] = ()) -> sqlite3.Cursor:
        try:
            return self._conn.execute(sql, params)
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{self.path}: cannot read: {one_line(exc)}") from None

    def run(self) -> dict[str, Any]:
        """The run row, ``task_json`` decoded."""
        (row,) = _rows(self._query("SELECT * FROM run"))
        row["task_json"] = _decode_json(row["task_json"])
        return row

    def shards(self, *, states: Collection[str] | None = None) -> list[dict[str, Any]]:
        """All shards (or those in ``states``) ordered by idx, record/checkpoint decoded."""
        if states is None:
            cur = self._query("SELECT * FROM shards ORDER BY idx")
        else:
            states = tuple(states)
            if not states:
                return []
            marks = ", ".join("?" * len(states))
            cur = self._query(f"SELECT * FROM shards WHERE state IN ({marks}) ORDER BY idx", states)
        return [_decode_shard(row) for row in _rows(cur)]

    def resume_rows(self) -> Iterator[tuple[Any, ...]]:
        """What a master needs per shard, lean and streamed (100,000 shards, little memory):
        ``(idx, id, state, attempts, reason, done, total, checkpoint, checkpoint_done,
        has_checkpoint)``, checkpoint decoded (``has_checkpoint`` tells a stored JSON
        ``null`` from no checkpoint), ordered by idx."""
        cur = self._query(
            "SELECT idx, id, state, attempts, reason, done, total, checkpoint, checkpoint_done "
            "FROM shards ORDER BY idx"
        )
        for row in cur:
            cp = row[7]
            yield (*row[:7], orjson.loads(cp) if cp is not None else None, row[8], cp is not None)

    def shard(self, key: str | int) -> dict[str, Any] | None:
        """One shard by id (``str``) or idx (``int``); None if there is none."""
        column = "id" if isinstance(key, str) else "idx"
        rows = _rows(self._query(f"SELECT * FROM shards WHERE {column} = ?", (key,)))
        return _decode_shard(rows[0]) if rows else None

    def attempts(self, idx: int) -> list[dict[str, Any]]:
        """Every attempt of shard ``idx``, oldest first."""
        return _rows(
            self._query("SELECT * FROM attempts WHERE shard_idx = ? ORDER BY attempt", (idx,))
        )

    def counts(self) -> dict[str, int]:
        """Shard state -> number of shards in it (states with no shard are absent)."""
        return dict(self._query("SELECT state, count(*) FROM shards GROUP BY state").fetchall())

    def counters(self) -> dict[str, int]:
        """Every counter the master added to (e.g. dropped_garbage, dropped_stale)."""
        return dict(self._query("SELECT name, value FROM counters ORDER BY name").fetchall())

    def progress_totals(self) -> tuple[int, int | None]:
        """(sum of done, sum of total); total is None while an unfinished shard has no total.

        Unfinished means pending, running, stopping or backoff: a shard that has
        not reported its total yet makes the run's total unknown, not smaller.
        """
        done, total, unknown = self._query(
            "SELECT coalesce(sum(done), 0), sum(total),"
            " coalesce(sum(state IN ('pending', 'running', 'stopping', 'backoff')"
            " AND total IS NULL), 0) FROM shards"
        ).fetchone()
        return int(done), (None if unknown or total is None else int(total))
