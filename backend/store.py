"""The backend's database: SQLite on one machine, PostgreSQL when several share it; one interface for both.

Everything the backend keeps about annotations, fine-tune runs and the current model version lives in one
database (`backend.schema` has its tables). The modules that own the tables (`backend.corrections`,
`backend.runs`, `backend.training_data`, `backend.registry`, …) write through `Database.write(work)` and
read through `Database.read()`, with the same SQL on both engines (`?` placeholders, `INSERT … ON CONFLICT`,
`RETURNING`); `Database.for_settings` picks the engine:

- **SQLite** (the default: `DATA_DIR/corrections.sqlite3`, WAL mode). Other processes on the machine
  (workers, fine-tunes) take turns through SQLite's lock. Not for network file systems: WAL needs one
  machine.
- **PostgreSQL** (`DATABASE_URL`), for several API replicas, workers and fine-tunes on several machines,
  each process with its own writer. Writes about the same thing take an advisory lock
  (`Database.serialize`), so two replicas storing the same annotation take turns instead of one failing on
  a unique key. Two replicas' groups can still wait for each other's locks; PostgreSQL then fails one of
  them (a deadlock), and its writer runs the whole group again.

Writes are serialized inside each process by one writer thread, which owns the write connection and commits
whatever is queued in one transaction (group commit): with 20 webhooks arriving together there is one commit
(one fsync) instead of 20, and no request thread waits for a lock its sibling holds. On PostgreSQL the group
goes out in pipeline mode: a statement whose result nobody reads yet does not wait for the server, so a
webhook costs the few round trips whose answers it needs instead of one per statement (the writer's round
trips were what bounded a replica's webhooks per second). A write that raises is undone alone: the group is
then run again with a savepoint per write, and whichever raises is rolled back to its own.

Either way a caller returns only once its write is committed, and the schema is migrated on open, once,
under a lock, by whichever process comes first. (Both engines live in this one module because they share
the writer and its contract; each adds only how it connects, begins, locks and migrates.)
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import queue
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any, ClassVar, Protocol, TypeVar
from urllib.parse import urlsplit

from backend.schema import MIGRATIONS, SCHEMA_VERSION, postgres_ddl, statements
from backend.settings import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")
DB_FILE = "corrections.sqlite3"
# A write waiting for the writer thread: what to run on its connection, and where its caller waits.
_Write = tuple[Callable[[Any], Any], Future[Any]]
# How often a group that lost a race with another process (a deadlock) is run again before its writes fail.
_GROUP_ATTEMPTS = 5


class StoreUnavailable(RuntimeError):
    """The database cannot be reached (the API answers 503: nothing was stored, the sender should retry)."""


class Cursor(Protocol):
    """What `execute` returns on either engine: rows by position or by column name."""

    rowcount: int

    def fetchone(self) -> Any: ...
    def fetchall(self) -> list[Any]: ...
    def __iter__(self) -> Iterator[Any]: ...


class Connection(Protocol):
    """What reads and `write` callbacks get: `execute` / `executemany` with `?` placeholders."""

    def execute(self, sql: str, parameters: Sequence[Any] = ..., /) -> Cursor: ...
    def executemany(self, sql: str, rows: Iterable[Sequence[Any]], /) -> Cursor: ...


class Database(ABC):
    """One database of the backend (see the module docstring)."""

    @classmethod
    def for_settings(cls, settings: Settings) -> Database:
        """The database the settings name (DATABASE_URL, or the SQLite file in DATA_DIR), one instance per
        database and process."""
        if settings.database_url:
            key = settings.database_url
            factory: Callable[[], Database] = lambda: PostgresDatabase(key)  # noqa: E731
        else:
            path = (Path(settings.data_dir) / DB_FILE).resolve()
            key, factory = str(path), lambda: SQLiteDatabase(path)
        with _databases_lock:
            database = _databases.get(key)
            if database is None:
                database = _databases[key] = factory()
            return database

    def __init__(self, name: str) -> None:
        self._name = name
        self._local = threading.local()
        self._writes: queue.SimpleQueue[_Write | None] | None = None
        self._writer_pid = 0
        self._writer_lock = threading.Lock()

    # ------------------------------------------------------------------ what each engine provides
    @abstractmethod
    def _connect(self) -> Any:
        """A new connection in autocommit mode (transactions are begun and ended explicitly)."""

    @abstractmethod
    def _begin(self, db: Any) -> None:
        """Begin the writer's transaction."""

    def _retryable(self, exc: Exception) -> bool:
        """Whether a failed group is run again as a whole (another process's transaction won a race)."""
        return False

    def _pipelined(self, db: Any) -> contextlib.AbstractContextManager[Any]:
        """Around a group: statements may be sent before the answers to earlier ones have come back."""
        return contextlib.nullcontext()

    @abstractmethod
    def read_settled(self, table: str, work: Callable[[Connection], T]) -> T:
        """Run the read `work` once every write already under way to `table` has committed, so that its
        rows are all the rows up to the newest sequence number it sees (a fine-tune's watermark relies on
        it: a row committed later must never get a smaller number)."""

    @abstractmethod
    def serialize(self, db: Connection, *keys: str) -> None:
        """Inside `write`: make other writes about any of `keys` wait for this one's commit, on every
        process sharing the database."""

    # ------------------------------------------------------------------ reads and writes
    def read(self) -> Connection:
        """This thread's connection, for reads (autocommit: each statement sees the latest commit)."""
        db = getattr(self._local, "db", None)
        if db is None or getattr(self._local, "pid", 0) != os.getpid() or _broken(db):
            db = self._local.db = self._connect()
            self._local.pid = os.getpid()
        return db

    def write(self, work: Callable[[Connection], T]) -> T:
        """Run `work` in the writer thread inside a transaction; returns its result once that is committed,
        or raises what `work` raised (its changes undone, the rest of its group committed)."""
        done: Future[T] = Future()
        with self._writer_lock:
            # A forked child inherits the queue but not the thread that serves it.
            if self._writes is None or self._writer_pid != os.getpid():
                self._writes, self._writer_pid = queue.SimpleQueue(), os.getpid()
                threading.Thread(target=self._write_loop, args=(self._writes,), daemon=True,
                                 name=f"store-writer:{self._name}").start()
            # Put under the lock, so nothing lands in a queue after close() has told its writer to stop.
            self._writes.put((work, done))
        return done.result()

    def _write_loop(self, writes: queue.SimpleQueue[_Write | None]) -> None:
        """The writer thread: everything queued while it commits goes into its next transaction."""
        db: Any = None
        while True:
            batch = [writes.get()]
            while not writes.empty():
                batch.append(writes.get_nowait())
            group = [item for item in batch if item is not None]
            if group:
                for attempt in range(1, _GROUP_ATTEMPTS + 1):
                    try:
                        if db is None or _broken(db):
                            db = self._connect()
                        outcomes = _commit_group(db, [work for work, _ in group], self._begin, self._retryable,
                                                 self._pipelined)
                        break
                    except Exception as exc:  # the transaction itself failed: nothing of the group is stored
                        if self._retryable(exc) and attempt < _GROUP_ATTEMPTS:
                            time.sleep(0.005 * attempt)
                            continue
                        outcomes = [(None, exc)] * len(group)
                        break
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


_databases: dict[str, Database] = {}
_databases_lock = threading.Lock()


def close_databases() -> None:
    """Close and forget every database this process opened through `Database.for_settings`."""
    with _databases_lock:
        databases = list(_databases.values())
        _databases.clear()
    for database in databases:
        database.close()


# ---------------------------------------------------------------------------------------------- SQLite
class SQLiteDatabase(Database):
    """One SQLite file in WAL mode, migrated on open."""

    def __init__(self, path: str | os.PathLike[str]):
        super().__init__(Path(path).name)
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _migrate_sqlite(self.read())

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit is on disk before the webhook is answered, even if the machine loses power.
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA busy_timeout=30000")
        return db

    def _begin(self, db: Any) -> None:
        # IMMEDIATE takes the write lock up front: another process's writer makes this one wait in the busy
        # timeout instead of failing to upgrade a read lock.
        db.execute("BEGIN IMMEDIATE")

    def read_settled(self, table: str, work: Callable[[Connection], T]) -> T:
        # One writer at a time: rows are committed in the order of their numbers already.
        return work(self.read())

    def serialize(self, db: Connection, *keys: str) -> None:
        pass  # SQLite commits one transaction at a time: every write is serialized already.


def _migrate_sqlite(db: sqlite3.Connection) -> None:
    if db.execute("PRAGMA user_version").fetchone()[0] >= SCHEMA_VERSION:
        return
    db.execute("BEGIN IMMEDIATE")
    try:
        # Read again under the write lock: another process may have migrated meanwhile.
        version = db.execute("PRAGMA user_version").fetchone()[0]
        for step in MIGRATIONS[version:]:
            for statement in statements(step):
                db.execute(statement)
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


def _commit_group(db: Any, group: Sequence[Callable[[Any], Any]], begin: Callable[[Any], None],
                  retryable: Callable[[Exception], bool],
                  pipelined: Callable[[Any], contextlib.AbstractContextManager[Any]]
                  ) -> list[tuple[Any, Exception | None]]:
    """Run every write of `group` in one transaction and commit once; returns (result, error) per write.

    The group runs whole first (pipelined where the engine can). Should a write raise, that transaction is
    undone and the group runs again with a savepoint per write, so that the one which raises is undone alone
    and the others are still committed (its error may surface in a later write's statement when pipelined,
    never in a savepoint's). An error `retryable` says is a lost race fails the whole transaction, to be run
    again."""
    try:
        with pipelined(db):
            begin(db)
            results = [work(db) for work in group]
            db.execute("COMMIT")
        return [(result, None) for result in results]
    except Exception as exc:
        _roll_back(db)
        if retryable(exc):
            raise
        if len(group) == 1:
            return [(None, exc)]
    except BaseException:
        _roll_back(db)
        raise
    return _commit_each(db, group, begin, retryable)


def _commit_each(db: Any, group: Sequence[Callable[[Any], Any]], begin: Callable[[Any], None],
                 retryable: Callable[[Exception], bool]) -> list[tuple[Any, Exception | None]]:
    """`_commit_group` with a savepoint per write: a write that raises is undone alone."""
    outcomes: list[tuple[Any, Exception | None]] = []
    begin(db)
    try:
        for work in group:
            db.execute("SAVEPOINT write")
            try:
                outcomes.append((work(db), None))
            except Exception as exc:
                if retryable(exc):
                    raise
                db.execute("ROLLBACK TO SAVEPOINT write")
                outcomes.append((None, exc))
            db.execute("RELEASE SAVEPOINT write")
        db.execute("COMMIT")
    except BaseException:
        _roll_back(db)
        raise
    return outcomes


def _roll_back(db: Any) -> None:
    # Some errors (disk full, I/O, a lost connection) have already ended the transaction.
    with contextlib.suppress(Exception):
        db.execute("ROLLBACK")


# ------------------------------------------------------------------------------------------ PostgreSQL
# The advisory lock every process takes to migrate the schema (any fixed 64-bit number of our own).
_MIGRATION_LOCK = 0x6770_7434_726F_6901


class PostgresDatabase(Database):
    """A PostgreSQL database, migrated on open (module docstring)."""

    def __init__(self, url: str):
        parts = urlsplit(url)
        # host:port/name, without credentials, for messages.
        self.where = f"{parts.hostname or 'localhost'}:{parts.port or 5432}{parts.path}"
        super().__init__(self.where)
        self.url = url
        self._reader: _PostgresConnection | None = None
        self._reader_pid = 0
        db = self._connect()
        try:
            _migrate_postgres(db.raw, self.where)
        finally:
            db.close()

    def _connect(self) -> _PostgresConnection:
        import psycopg

        try:
            raw = psycopg.connect(self.url, autocommit=True, row_factory=_row_factory, connect_timeout=10)
        except psycopg.OperationalError as exc:
            raise StoreUnavailable(f"the database at {self.where} (DATABASE_URL) does not answer: "
                                   f"{_first_line(exc)}") from None
        return _PostgresConnection(raw)

    def read(self) -> Connection:
        """The process's read connection, shared by its threads (psycopg connections are thread-safe, and
        results are fetched whole): one replica keeps two connections open, this one and the writer's."""
        with self._writer_lock:
            if self._reader is None or self._reader_pid != os.getpid() or self._reader.broken:
                self._reader, self._reader_pid = self._connect(), os.getpid()
            return self._reader

    def _begin(self, db: Any) -> None:
        db.execute("BEGIN")

    def _retryable(self, exc: Exception) -> bool:
        from psycopg import errors

        return isinstance(exc, (errors.DeadlockDetected, errors.SerializationFailure))

    def _pipelined(self, db: Any) -> contextlib.AbstractContextManager[Any]:
        return db.pipeline()

    def close(self) -> None:
        with self._writer_lock:
            reader, self._reader = self._reader, None
        if reader is not None and self._reader_pid == os.getpid():
            reader.close()
        super().close()

    def write(self, work: Callable[[Connection], T]) -> T:
        import psycopg

        try:
            return super().write(work)
        except psycopg.OperationalError as exc:
            raise StoreUnavailable(f"the database at {self.where} (DATABASE_URL) failed: {_first_line(exc)}") from None

    def read_settled(self, table: str, work: Callable[[Connection], T]) -> T:
        if not table.isidentifier():
            raise ValueError(f"not a table name: {table!r}")

        def settled(db: Connection) -> T:
            # SHARE waits for the transactions inserting into the table and holds new ones back until this
            # read ends; an insert draws its number only once it has the table, so none can come in below.
            db.execute(f"LOCK TABLE {table} IN SHARE MODE")
            return work(db)

        return self.write(settled)

    def serialize(self, db: Connection, *keys: str) -> None:
        # Sorted, so that two writes about the same keys never wait for each other in opposite orders.
        for key in sorted(set(keys)):
            db.execute("SELECT pg_advisory_xact_lock(?)", (_lock_id(key),))


class _PostgresConnection:
    """A psycopg connection that takes the store's SQL (`?` placeholders) and gives rows by position or name."""

    def __init__(self, raw: Any):
        self.raw = raw
        self._pipeline: Any = None

    @property
    def broken(self) -> bool:
        return bool(self.raw.closed or self.raw.broken)

    def close(self) -> None:
        self.raw.close()

    @contextlib.contextmanager
    def pipeline(self) -> Iterator[None]:
        """Pipeline mode for the block (`Database._pipelined`)."""
        with self.raw.pipeline() as pipeline:
            self._pipeline = pipeline
            try:
                yield
            finally:
                self._pipeline = None

    def execute(self, sql: str, parameters: Sequence[Any] = ()) -> Any:
        return self._answer(self.raw.execute(_postgres_sql(sql), tuple(parameters)))

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> Any:
        cursor = self.raw.cursor()
        cursor.executemany(_postgres_sql(sql), [tuple(row) for row in rows])
        return self._answer(cursor)

    def _answer(self, cursor: Any) -> Any:
        # psycopg fetches a pipelined statement's rows when they are read, but not its rowcount.
        return cursor if self._pipeline is None else _PipelinedCursor(cursor, self._pipeline)


class _PipelinedCursor:
    """A cursor of a statement sent in pipeline mode: reading `rowcount` waits for the server's answer."""

    def __init__(self, cursor: Any, pipeline: Any):
        self._cursor, self._pipeline = cursor, pipeline

    @property
    def rowcount(self) -> int:
        if self._cursor.rowcount < 0:
            self._pipeline.sync()
        return int(self._cursor.rowcount)

    def fetchone(self) -> Any:
        return self._cursor.fetchone()

    def fetchall(self) -> list[Any]:
        return self._cursor.fetchall()

    def __iter__(self) -> Iterator[Any]:
        return iter(self._cursor)


class _Row(tuple):
    """A result row: `row[0]` or `row["column"]`, like `sqlite3.Row`."""

    __slots__ = ()
    _index: ClassVar[dict[str, int]] = {}

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            return tuple.__getitem__(self, self._index[key])
        return tuple.__getitem__(self, key)


@functools.lru_cache(maxsize=256)
def _row_class(names: tuple[str, ...]) -> type[_Row]:
    return type("Row", (_Row,), {"__slots__": (), "_index": {name: i for i, name in enumerate(names)}})


def _row_factory(cursor: Any) -> Callable[[Sequence[Any]], _Row]:
    return _row_class(tuple(column.name for column in cursor.description or ()))


@functools.lru_cache(maxsize=512)
def _postgres_sql(sql: str) -> str:
    """`?` placeholders → psycopg's `%s` (outside quoted text), literal `%` doubled."""
    out, quoted = [], False
    for char in sql:
        if char == "'":
            quoted = not quoted
        if char == "%":
            out.append("%%")
        elif char == "?" and not quoted:
            out.append("%s")
        else:
            out.append(char)
    return "".join(out)


def _lock_id(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big", signed=True)


def _broken(db: Any) -> bool:
    """Whether a connection can no longer be used (PostgreSQL's, after the server closed it)."""
    return bool(getattr(db, "broken", False))


def _migrate_postgres(db: Any, where: str) -> None:
    with db.transaction():
        db.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        db.execute("CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL)")
        row = db.execute("SELECT version FROM schema_version").fetchone()
        version = int(row[0]) if row else 0
        if version >= SCHEMA_VERSION:
            return
        for step in MIGRATIONS[version:]:
            for statement in statements(step):
                db.execute(postgres_ddl(statement))
        db.execute("DELETE FROM schema_version")
        db.execute("INSERT INTO schema_version (version) VALUES (%s)", (SCHEMA_VERSION,))
    log.info("database at %s migrated from schema %d to %d", where, version, SCHEMA_VERSION)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
