"""The backend's database: one SQLite file in WAL mode, its schema and migrations, and a writer thread that
commits queued writes in groups.

Everything the backend keeps about annotations lives in `DATA_DIR/corrections.sqlite3` (`Database`); the
modules that own its tables (`backend.corrections`, `backend.runs`, `backend.training_data`) write through
`Database.write` and read through `Database.read`.

Writes are serialized inside each process by one writer thread per file, which owns the write connection
and commits whatever is queued in one transaction (group commit): with 20 webhooks arriving together there
is one fsync instead of 20, and no thread ever sleeps in SQLite's busy handler waiting for a sibling. Each
caller still returns only after its own change is committed, and a write that raises is undone alone (its
own savepoint) while the rest of its group commits. Other processes (workers, fine-tunes) writing the
same file take turns with this one through SQLite's lock and busy timeout.

The schema is versioned (`PRAGMA user_version`); `MIGRATIONS[n]` brings a database from version `n` to
`n + 1`, and every process opening the file applies what is missing, under SQLite's write lock, so two
processes starting together migrate once. `DATA_DIR` must be shared by the API and the workers (one
machine or one volume); SQLite in WAL mode lets several processes read and write it, not a network file
system.
"""

from __future__ import annotations

import os
import queue
import sqlite3
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

from backend.settings import Settings

T = TypeVar("T")
# A write waiting for the writer thread: what to run on its connection, and where its caller waits.
_Write = tuple[Callable[[sqlite3.Connection], Any], Future[Any]]

DB_FILE = "corrections.sqlite3"

# Plain SQL with no SQLite-only types, so that another database can take the same tables.
MIGRATIONS: tuple[str, ...] = (
    # 0 → 1: the tables as first released.
    """
    CREATE TABLE IF NOT EXISTS events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        action TEXT NOT NULL,
        received_at REAL NOT NULL,
        annotation_id INTEGER,
        body TEXT NOT NULL
    );
    CREATE TABLE IF NOT EXISTS annotations (
        annotation_id INTEGER PRIMARY KEY,
        task_id TEXT,
        project_id TEXT,
        image TEXT,
        updated_at TEXT,
        ground_truth INTEGER NOT NULL,
        plan TEXT,
        event_seq INTEGER NOT NULL
    );
    CREATE TABLE IF NOT EXISTS samples (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        annotation_id INTEGER NOT NULL,
        task_id TEXT,
        region_id TEXT NOT NULL,
        image TEXT NOT NULL,
        region TEXT NOT NULL,
        box TEXT NOT NULL,
        caption TEXT,
        choices TEXT NOT NULL,
        label TEXT,
        predicted TEXT,
        predicted_version TEXT,
        created_at REAL NOT NULL,
        UNIQUE (annotation_id, region_id)
    );
    CREATE INDEX IF NOT EXISTS samples_by_task ON samples (task_id);
    CREATE INDEX IF NOT EXISTS samples_by_version ON samples (predicted_version);
    CREATE TABLE IF NOT EXISTS predictions (
        task_id TEXT NOT NULL,
        region_id TEXT NOT NULL,
        model_version TEXT NOT NULL,
        fields TEXT NOT NULL,
        created_at REAL NOT NULL,
        PRIMARY KEY (task_id, region_id, model_version)
    );
    CREATE TABLE IF NOT EXISTS images (
        reference TEXT PRIMARY KEY,
        sha256 TEXT NOT NULL,
        path TEXT NOT NULL,
        width INTEGER NOT NULL,
        height INTEGER NOT NULL,
        fetched_at REAL NOT NULL
    );
    CREATE TABLE IF NOT EXISTS finetune_runs (
        run_id INTEGER PRIMARY KEY AUTOINCREMENT,
        started_at REAL NOT NULL,
        finished_at REAL,
        heartbeat_at REAL,
        status TEXT NOT NULL,
        trigger_name TEXT,
        parent TEXT,
        candidate TEXT,
        watermark INTEGER,
        message TEXT,
        details TEXT
    );
    """,
    # 1 → 2: annotations confirmed with Label Studio, deletions remembered, time indexes for retention, and
    # the projects `connect` linked to this backend.
    """
    ALTER TABLE annotations ADD COLUMN confirmation TEXT;
    ALTER TABLE annotations ADD COLUMN confirmed_at REAL;
    CREATE TABLE IF NOT EXISTS deleted_annotations (
        annotation_id INTEGER PRIMARY KEY,
        deleted_at REAL NOT NULL
    );
    CREATE INDEX IF NOT EXISTS events_by_time ON events (received_at);
    CREATE INDEX IF NOT EXISTS predictions_by_time ON predictions (created_at);
    CREATE TABLE IF NOT EXISTS connected_projects (
        project_id INTEGER PRIMARY KEY,
        label_studio_url TEXT NOT NULL,
        connected_at REAL NOT NULL
    );
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)


class Database:
    """One SQLite file: a read connection per thread, one writer thread, migrations applied on open."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._writes: queue.SimpleQueue[_Write | None] | None = None
        self._writer_pid = 0
        self._writer_lock = threading.Lock()
        _migrate(self.read())

    @classmethod
    def for_settings(cls, settings: Settings) -> Database:
        """The database of `settings.data_dir`, one instance per file and process."""
        path = (Path(settings.data_dir) / DB_FILE).resolve()
        with _databases_lock:
            database = _databases.get(path)
            if database is None:
                database = _databases[path] = cls(path)
            return database

    # ------------------------------------------------------------------ connections
    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=True)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit is on disk before the webhook is answered, even if the machine loses power.
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA busy_timeout=30000")
        return db

    def read(self) -> sqlite3.Connection:
        """This thread's connection, for reads (autocommit: each statement sees the latest commit)."""
        db = getattr(self._local, "db", None)
        if db is None:
            db = self._local.db = self._open()
        return db

    def write(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run `work` in the writer thread inside a transaction; returns its result once that is committed,
        or raises what `work` raised (its changes undone, the rest of its group committed)."""
        done: Future[T] = Future()
        with self._writer_lock:
            # A forked child inherits the queue but not the thread that serves it.
            if self._writes is None or self._writer_pid != os.getpid():
                self._writes, self._writer_pid = queue.SimpleQueue(), os.getpid()
                threading.Thread(target=self._write_loop, args=(self._writes,), daemon=True,
                                 name=f"store-writer:{self.path.name}").start()
            # Put under the lock, so nothing lands in a queue after close() has told its writer to stop.
            self._writes.put((work, done))
        return done.result()

    def _write_loop(self, writes: queue.SimpleQueue[_Write | None]) -> None:
        """The writer thread: everything queued while it commits goes into its next transaction."""
        db: sqlite3.Connection | None = None
        while True:
            batch = [writes.get()]
            while not writes.empty():
                batch.append(writes.get_nowait())
            group = [item for item in batch if item is not None]
            if group:
                try:
                    if db is None:
                        db = self._open()
                    outcomes = _commit_group(db, [work for work, _ in group])
                except Exception as exc:  # the transaction itself failed: nothing of the group is stored
                    outcomes = [(None, exc)] * len(group)
                for (_, done), (result, error) in zip(group, outcomes, strict=True):
                    if error is None:
                        done.set_result(result)
                    else:
                        done.set_exception(error)
            if len(group) < len(batch):  # close() was called
                if db is not None:
                    db.close()
                return

    def close(self) -> None:
        """Close this thread's connection and stop the writer (the next write starts a new one)."""
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None
        with self._writer_lock:
            if self._writes is not None and self._writer_pid == os.getpid():
                self._writes.put(None)
            self._writes = None


_databases: dict[Path, Database] = {}
_databases_lock = threading.Lock()


def _migrate(db: sqlite3.Connection) -> None:
    if db.execute("PRAGMA user_version").fetchone()[0] >= SCHEMA_VERSION:
        return
    db.execute("BEGIN IMMEDIATE")
    try:
        # Read again under the write lock: another process may have migrated meanwhile.
        version = db.execute("PRAGMA user_version").fetchone()[0]
        for step in MIGRATIONS[version:]:
            for statement in (s.strip() for s in step.split(";")):
                if statement:
                    db.execute(statement)
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


def _commit_group(db: sqlite3.Connection, group: Sequence[Callable[[sqlite3.Connection], Any]]
                  ) -> list[tuple[Any, Exception | None]]:
    """Run every write of `group` in one transaction and commit once; returns (result, error) per write.

    Each write runs in its own savepoint, so one that raises (a malformed event) is undone alone and the
    others are still committed. IMMEDIATE takes the write lock up front: another process's writer makes
    this one wait in the busy timeout instead of failing to upgrade a read lock."""
    outcomes: list[tuple[Any, Exception | None]] = []
    db.execute("BEGIN IMMEDIATE")
    try:
        for work in group:
            db.execute("SAVEPOINT write")
            try:
                outcomes.append((work(db), None))
            except Exception as exc:
                db.execute("ROLLBACK TO write")
                outcomes.append((None, exc))
            db.execute("RELEASE write")
        db.execute("COMMIT")
    except BaseException:
        # Some errors (disk full, I/O) have already ended the transaction.
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    return outcomes
