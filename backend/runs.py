"""The fine-tune run ledger: every fine-tune attempt, how it ended, and what it trained on.

A run is `running` while it works (its heartbeat refreshed by the fine-tune), then `promoted`, `rejected`,
`awaiting review` (its candidate kept for `python -m backend promote`), `failed` or `interrupted` (killed:
found with a stale heartbeat by the next run). Its `watermark` is the
newest corrected region it trained on, so "new corrections" are those after the last finished run.
"""

from __future__ import annotations

import enum
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from backend.settings import Settings
from backend.store import Database


class RunStatus(enum.StrEnum):
    """How far a fine-tune run got."""

    RUNNING = "running"
    PROMOTED = "promoted"
    REJECTED = "rejected"
    AWAITING_REVIEW = "awaiting review"
    FAILED = "failed"
    INTERRUPTED = "interrupted"


@dataclass(frozen=True)
class FinetuneRun:
    """One fine-tune attempt, as recorded."""

    run_id: int
    status: RunStatus
    started_at: float
    finished_at: float | None
    heartbeat_at: float | None
    trigger: str | None
    parent: str | None
    candidate: str | None
    watermark: int | None
    message: str | None
    details: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        """One line for the terminal."""
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(self.finished_at or self.started_at))
        parts = [f"run {self.run_id} {self.status} at {when} UTC", f"from {self.parent}"]
        if self.candidate:
            parts.append(f"candidate {self.candidate}")
        if self.message:
            parts.append(self.message)
        return "; ".join(parts)


class FinetuneRuns:
    """The `finetune_runs` table of one database."""

    def __init__(self, database: Database):
        self.database = database

    @classmethod
    def for_settings(cls, settings: Settings) -> FinetuneRuns:
        """The ledger of `settings.data_dir`."""
        return cls(Database.for_settings(settings))

    def start(self, trigger: str, parent: str) -> int:
        """Record that a fine-tune started; returns its run id."""
        now = time.time()
        return self.database.write(lambda db: int(db.execute(
            "INSERT INTO finetune_runs (started_at, heartbeat_at, status, trigger_name, parent) VALUES (?, ?, ?, ?, ?) "
            "RETURNING run_id", (now, now, RunStatus.RUNNING.value, trigger, parent)).fetchone()[0]))

    def heartbeat(self, run_id: int) -> None:
        """Mark a running fine-tune as alive."""
        self.database.write(lambda db: db.execute("UPDATE finetune_runs SET heartbeat_at = ? WHERE run_id = ?",
                                                  (time.time(), run_id)))

    def finish(self, run_id: int, status: RunStatus, message: str, *, candidate: str | None = None,
               watermark: int | None = None, details: Mapping[str, Any] | None = None) -> None:
        """Record how a fine-tune ended."""
        status = RunStatus(status)
        if status is RunStatus.RUNNING:
            raise ValueError("a finished run is promoted, rejected, failed or interrupted, not running")
        row = (status.value, time.time(), message, candidate, watermark,
               json.dumps(dict(details or {}), default=str), run_id)
        self.database.write(lambda db: db.execute(
            "UPDATE finetune_runs SET status = ?, finished_at = ?, message = ?, candidate = ?, watermark = ?, "
            "details = ? WHERE run_id = ?", row))

    def mark_abandoned(self, stale_after: float) -> int:
        """Runs still marked running without a heartbeat for `stale_after` seconds were killed: mark them
        interrupted. Returns how many."""
        cutoff = time.time() - stale_after
        return self.database.write(lambda db: db.execute(
            "UPDATE finetune_runs SET status = ?, finished_at = ?, message = "
            "'interrupted: the process stopped without finishing (killed, or the machine went down)' "
            "WHERE status = ? AND COALESCE(heartbeat_at, started_at) < ?",
            (RunStatus.INTERRUPTED.value, time.time(), RunStatus.RUNNING.value, cutoff)).rowcount)

    def runs(self, limit: int = 20) -> list[FinetuneRun]:
        """The latest fine-tune runs, newest first."""
        rows = self.database.read().execute("SELECT * FROM finetune_runs ORDER BY run_id DESC LIMIT ?", (limit,))
        return [_run_from_row(row) for row in rows]

    def last(self) -> FinetuneRun | None:
        """The latest fine-tune run."""
        runs = self.runs(1)
        return runs[0] if runs else None

    def watermark(self, *, attempted: bool = False) -> int:
        """The newest region sequence number a finished (promoted or rejected) fine-tune has trained on:
        regions after it are the "new" corrections. With `attempted`, failed runs count too (automatic
        triggers wait for fresh corrections after a failure instead of failing again on the same data)."""
        statuses = [RunStatus.PROMOTED, RunStatus.REJECTED, RunStatus.AWAITING_REVIEW] + (
            [RunStatus.FAILED] if attempted else [])
        marks = ", ".join("?" for _ in statuses)
        row = self.database.read().execute(
            f"SELECT COALESCE(MAX(watermark), 0) FROM finetune_runs WHERE status IN ({marks})",
            [s.value for s in statuses]).fetchone()
        return int(row[0])

    def new_regions(self, *, attempted: bool = False) -> int:
        """Corrected regions stored since the last finished fine-tune (see `watermark`)."""
        row = self.database.read().execute("SELECT COUNT(*) FROM samples WHERE seq > ?",
                                           (self.watermark(attempted=attempted),)).fetchone()
        return int(row[0])


def _run_from_row(row: Any) -> FinetuneRun:
    return FinetuneRun(
        run_id=int(row["run_id"]), status=RunStatus(row["status"]), started_at=float(row["started_at"]),
        finished_at=row["finished_at"], heartbeat_at=row["heartbeat_at"], trigger=row["trigger_name"],
        parent=row["parent"], candidate=row["candidate"], watermark=row["watermark"], message=row["message"],
        details=json.loads(row["details"]) if row["details"] else {})
