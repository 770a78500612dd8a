"""The outbox table seen from the deliverer: claim due rows, mark them, count what is left.

The master is the store's main writer and keeps its write transactions short
(one per loop iteration). The deliverer is a second writer: each of its
writes is one tiny ``BEGIN IMMEDIATE`` transaction, and both sides wait on
SQLite's busy timeout, so neither fails when they meet; the master waits at
most the length of one of these few-row updates.

Claiming is a lease: a row is taken by writing ``claimed_by``/``claim_until``
only where no live lease exists, inside one immediate transaction, so two
deliverers (a second one started after a master restart, or by ``orch
serve``) can never send the same row at the same time. Marking a row
delivered is conditional on still holding its lease. A deliverer killed
between the receiver's answer and the mark sends that one row again after its
lease runs out: delivery is once per accepted row except across that instant
(webhook bodies carry ``notification_id`` so a receiver can drop the repeat).
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from orchestrator.storefile import OUTBOX_DDL

__all__ = ["Outbox", "OutboxRow"]

_BUSY_TIMEOUT_MS = 10_000


@dataclass(frozen=True, slots=True)
class OutboxRow:
    """One accepted notification: where it goes and the facts it carries."""

    id: int
    channel: str
    event: str
    body: dict[str, Any]
    created_at: float
    attempts: int


class Outbox:
    """The ``outbox`` table of one run's ``state.db``, opened read-write by the deliverer."""

    def __init__(self, path: str) -> None:
        uri = Path(path).absolute().as_uri() + "?mode=rw"
        self._conn = sqlite3.connect(
            uri, uri=True, isolation_level=None, timeout=_BUSY_TIMEOUT_MS / 1000
        )
        self._conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
        exists = self._conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'outbox'"
        ).fetchone()
        if not exists:  # a run whose master has not opened it as a writer since orch had outboxes
            self._conn.execute(OUTBOX_DDL)
        self.path = path

    def close(self) -> None:
        self._conn.close()

    def _write(self, sql: str, params: tuple[Any, ...]) -> int:
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            count = self._conn.execute(sql, params).rowcount
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")
        return count

    def claim(self, owner: str, now: float, lease_s: float, limit: int = 20) -> list[OutboxRow]:
        """Take up to ``limit`` due rows no live lease holds, oldest first."""
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            rows = self._conn.execute(
                "SELECT id, channel, event, body, created_at, attempts FROM outbox"
                " WHERE delivered_at IS NULL AND given_up_at IS NULL AND next_at <= ?"
                " AND (claim_until IS NULL OR claim_until < ?) ORDER BY id LIMIT ?",
                (now, now, limit),
            ).fetchall()
            self._conn.executemany(
                "UPDATE outbox SET claimed_by = ?, claim_until = ? WHERE id = ?",
                [(owner, now + lease_s, row[0]) for row in rows],
            )
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")
        return [
            OutboxRow(
                id=r[0],
                channel=r[1],
                event=r[2],
                body=orjson.loads(r[3]),
                created_at=r[4],
                attempts=r[5],
            )
            for r in rows
        ]

    def delivered(self, row_id: int, owner: str, now: float, answer: str) -> bool:
        """Mark a claimed row delivered; False when the lease was lost meanwhile."""
        return (
            self._write(
                "UPDATE outbox SET delivered_at = ?, answer = ?, attempts = attempts + 1,"
                " claimed_by = NULL, claim_until = NULL WHERE id = ? AND claimed_by = ?",
                (now, answer, row_id, owner),
            )
            == 1
        )

    def retry(
        self, row_id: int, owner: str, next_at: float, error: str, *, count: bool = True
    ) -> bool:
        """Put a claimed row back, due at ``next_at``; ``count`` False for a rate-limit wait."""
        return (
            self._write(
                "UPDATE outbox SET next_at = ?, last_error = ?, attempts = attempts + ?,"
                " claimed_by = NULL, claim_until = NULL WHERE id = ? AND claimed_by = ?",
                (next_at, error, 1 if count else 0, row_id, owner),
            )
            == 1
        )

    def give_up(self, row_id: int, owner: str, now: float, error: str) -> bool:
        """Mark a claimed row finally failed."""
        return (
            self._write(
                "UPDATE outbox SET given_up_at = ?, last_error = ?, attempts = attempts + 1,"
                " claimed_by = NULL, claim_until = NULL WHERE id = ? AND claimed_by = ?",
                (now, error, row_id, owner),
            )
            == 1
        )

    def pending(self) -> int:
        """Rows neither delivered nor given up (due now or later, claimed or not)."""
        (count,) = self._conn.execute(
            "SELECT count(*) FROM outbox WHERE delivered_at IS NULL AND given_up_at IS NULL"
        ).fetchone()
        return int(count)

    def next_due(self) -> float | None:
        """When the earliest pending row may next be tried (its lease end if claimed)."""
        (due,) = self._conn.execute(
            "SELECT min(max(next_at, coalesce(claim_until, 0))) FROM outbox"
            " WHERE delivered_at IS NULL AND given_up_at IS NULL"
        ).fetchone()
        return None if due is None else float(due)

    def rows(self) -> list[dict[str, Any]]:
        """Every row (tests, diagnostics), body decoded."""
        cur = self._conn.execute("SELECT * FROM outbox ORDER BY id")
        names = [d[0] for d in cur.description]
        out = []
        for row in cur.fetchall():
            item = dict(zip(names, row, strict=True))
            item["body"] = orjson.loads(item["body"])
            out.append(item)
        return out
