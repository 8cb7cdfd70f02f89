"""The database engines: migrations; on SQLite a writer thread that commits queued writes in groups, each
caller returning only once its own write is committed; on PostgreSQL, replicas that take turns."""

from __future__ import annotations

import contextlib
import copy
import os
import signal
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from backend import store as store_module
from backend.corrections import CorrectionsStore
from backend.schema import MIGRATIONS
from backend.settings import Settings
from backend.store import SCHEMA_VERSION, Database, PostgresDatabase, SQLiteDatabase, StoreUnavailable
from tests.support import capture, free_port
from tests.support.postgres import fresh_database


@pytest.fixture
def database(tmp_path: Path) -> Database:
    return SQLiteDatabase(tmp_path / "db.sqlite3")


@pytest.fixture
def any_database(tmp_path: Path, database_url: str) -> Database:
    """The database of each engine in turn (the test runs on SQLite and on PostgreSQL)."""
    return Database.for_settings(Settings.from_env({}, data_dir=tmp_path, database_url=database_url))


def add_event(action: str) -> Any:
    """A write that stores one event and returns its sequence number."""
    def work(db: Any) -> int:
        return int(db.execute("INSERT INTO events (action, received_at, body) VALUES (?, ?, '{}') RETURNING seq",
                              (action, time.time())).fetchone()[0])
    return work


def actions(database: Database) -> list[str]:
    return [row[0] for row in database.read().execute("SELECT action FROM events ORDER BY seq")]


# ---------------------------------------------------------------------- migrations
def test_a_new_database_gets_every_migration_once(tmp_path):
    SQLiteDatabase(tmp_path / "db.sqlite3")
    with contextlib.closing(sqlite3.connect(tmp_path / "db.sqlite3")) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"events", "annotations", "samples", "predictions", "images", "finetune_runs"} <= tables
    SQLiteDatabase(tmp_path / "db.sqlite3")  # opening again changes nothing


def test_a_database_written_before_versioning_keeps_its_rows(tmp_path):
    path = tmp_path / "db.sqlite3"
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.executescript(MIGRATIONS[0])
        db.execute("INSERT INTO events (action, received_at, body) VALUES ('OLD', 0, '{}')")
        db.commit()
    assert actions(SQLiteDatabase(path)) == ["OLD"]


# ---------------------------------------------------------------------- the writer
@pytest.fixture
def held_writer(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[list[int], threading.Event]]:
    """Records the size of every committed group; the first group waits for the event, so that what is
    written meanwhile queues up behind it."""
    sizes: list[int] = []
    release = threading.Event()
    commit = store_module._commit_group

    def held(db: sqlite3.Connection, group: Any, *engine: Any) -> Any:
        sizes.append(len(group))
        if len(sizes) == 1:
            release.wait(30)
        return commit(db, group, *engine)

    monkeypatch.setattr(store_module, "_commit_group", held)
    yield sizes, release
    release.set()


def burst(database: Database, works: list[Any]) -> tuple[list[threading.Thread], list[Any]]:
    """Run each write from its own thread and return once all of them wait for the held writer: the
    threads, and the list where each call's result or error will be."""
    outcomes: list[Any] = [None] * len(works)

    def send(index: int) -> None:
        try:
            outcomes[index] = database.write(works[index])
        except Exception as exc:
            outcomes[index] = exc

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(works))]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 30
    while database._writes is None or database._writes.qsize() < len(works):
        assert time.monotonic() < deadline, "the burst never reached the writer"
        time.sleep(0.01)
    return threads, outcomes


def occupy_writer(database: Database, sizes: list[int]) -> threading.Thread:
    """Send one write and wait until the (held) writer has taken it, so later ones queue up behind it."""
    first = threading.Thread(target=database.write, args=(add_event("FIRST"),))
    first.start()
    while not sizes:
        time.sleep(0.01)
    return first


def test_a_burst_of_writes_is_committed_in_one_transaction(any_database, held_writer):
    sizes, release = held_writer
    first = occupy_writer(any_database, sizes)
    threads, outcomes = burst(any_database, [add_event(f"E{i}") for i in range(20)])
    assert all(outcome is None for outcome in outcomes), "no call may return before its commit"
    release.set()
    for thread in [first, *threads]:
        thread.join(timeout=30)
    assert sizes == [1, 20]
    assert sorted(outcomes) == list(range(2, 22))
    assert len(actions(any_database)) == 21


@pytest.mark.parametrize("failure", ["raises", "breaks a constraint"])
def test_a_failing_write_in_a_group_is_undone_alone(any_database, held_writer, failure):
    # A statement the database refuses may only be answered while a later write waits for its own answer
    # (PostgreSQL's pipeline): the error still belongs to the write that sent it.
    sizes, release = held_writer
    first = occupy_writer(any_database, sizes)

    def broken(db: Any) -> None:
        add_event("HALF")(db)
        if failure == "raises":
            raise ValueError("malformed")
        db.execute("INSERT INTO events (action, received_at, body) VALUES (NULL, 0, '{}')")

    threads, outcomes = burst(any_database, [add_event("A"), broken, add_event("B")])
    release.set()
    for thread in [first, *threads]:
        thread.join(timeout=30)
    assert sizes == [1, 3]
    assert isinstance(outcomes[1], ValueError if failure == "raises" else Exception)
    assert "NULL" in str(outcomes[1]).upper() or failure == "raises"
    assert isinstance(outcomes[0], int) and isinstance(outcomes[2], int)
    rows = any_database.read().execute("SELECT seq, action FROM events ORDER BY seq").fetchall()
    assert sorted(row[1] for row in rows) == ["A", "B", "FIRST"]
    assert {row[1]: row[0] for row in rows}["B"] == outcomes[2]


def test_a_failed_commit_fails_its_group_and_the_writer_goes_on(database, monkeypatch):
    commit = store_module._commit_group
    failures = iter([sqlite3.OperationalError("disk I/O error")])

    def failing_once(db: sqlite3.Connection, group: Any, *engine: Any) -> Any:
        failure = next(failures, None)
        if failure is not None:
            raise failure
        return commit(db, group, *engine)

    monkeypatch.setattr(store_module, "_commit_group", failing_once)
    with pytest.raises(sqlite3.OperationalError, match="disk I/O error"):
        database.write(add_event("LOST"))
    database.write(add_event("KEPT"))
    assert actions(database) == ["KEPT"]


def test_a_closed_database_starts_a_new_writer(database):
    database.write(add_event("BEFORE"))
    database.close()
    database.write(add_event("AFTER"))
    assert actions(database) == ["BEFORE", "AFTER"]


def test_a_forked_child_writes_through_its_own_writer(database):
    # The fine-tune worker forks a child per job; the parent's writer thread does not exist there.
    database.write(add_event("PARENT"))
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        stored = None
        try:
            database.write(add_event("CHILD"))
            with contextlib.closing(sqlite3.connect(database.path)) as fresh:
                stored = fresh.execute("SELECT 1 FROM events WHERE action = 'CHILD'").fetchone()
        finally:
            os._exit(0 if stored else 1)
    deadline = time.monotonic() + 30
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0:
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the child's write never returned")
        time.sleep(0.05)
    assert os.waitstatus_to_exitcode(done[1]) == 0
    assert actions(database) == ["PARENT", "CHILD"]


# ---------------------------------------------------------------------- PostgreSQL
def test_every_engine_commits_each_write_and_undoes_a_failing_one_alone(tmp_path, database_url):
    database = Database.for_settings(Settings.from_env({}, data_dir=tmp_path, database_url=database_url))

    def broken(db: Any) -> None:
        add_event("HALF")(db)
        raise ValueError("malformed")

    first = database.write(add_event("A"))
    with pytest.raises(ValueError, match="malformed"):
        database.write(broken)
    second = database.write(add_event("B"))
    assert second > first
    assert actions(database) == ["A", "B"]
    row = database.read().execute("SELECT action, seq FROM events WHERE seq = ?", (second,)).fetchone()
    assert (row["action"], row[1]) == ("B", second)


def test_postgres_is_migrated_once_when_processes_start_together():
    with fresh_database() as url:
        errors: list[BaseException] = []

        def open_one() -> None:
            try:
                PostgresDatabase(url).close()
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=open_one) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert errors == []
        import psycopg

        with psycopg.connect(url) as db:
            assert db.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
            tables = {row[0] for row in db.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
        assert {"events", "annotations", "samples", "predictions", "images", "finetune_runs", "model_pointer"} <= tables


def test_an_unreachable_postgres_is_a_clear_error_without_the_password():
    url = f"postgresql://backend:s3cret@127.0.0.1:{free_port()}/corrections"
    answer = r"127\.0\.0\.1:\d+/corrections \(DATABASE_URL\) does not answer"
    with pytest.raises(StoreUnavailable, match=answer) as info:
        PostgresDatabase(url)
    assert "s3cret" not in str(info.value)


def test_replicas_storing_the_same_annotation_take_turns(tmp_path):
    """Two processes' pools (two API replicas) store deliveries of one annotation at once: every delivery
    is committed or knowingly ignored as older, none fails on a unique key, and the newest one wins."""
    with fresh_database() as url:
        replicas = [CorrectionsStore(PostgresDatabase(url)), CorrectionsStore(PostgresDatabase(url))]
        errors: list[BaseException] = []

        def deliver(store: CorrectionsStore, minutes: range) -> None:
            for minute in minutes:
                body = copy.deepcopy(capture("10")["request"]["json"])
                body["annotation"]["id"] = 7
                body["annotation"]["updated_at"] = f"2026-12-02T10:{minute:02d}:00Z"
                try:
                    store.record_event(body)
                except BaseException as exc:  # pragma: no cover - reported below
                    errors.append(exc)

        threads = [threading.Thread(target=deliver, args=(replicas[i % 2], range(i, 40, 4))) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert errors == []
        rows = replicas[0].database.read().execute("SELECT updated_at FROM annotations WHERE annotation_id = 7")
        assert [row[0] for row in rows] == ["2026-12-02T10:39:00Z"]
        assert len(replicas[1].events()) == 40
        for replica in replicas:
            replica.database.close()


def test_a_settled_read_waits_for_writes_under_way_so_no_row_comes_in_below_it():
    with fresh_database() as url:
        database = PostgresDatabase(url)
        import psycopg

        with psycopg.connect(url) as slow:  # a replica's transaction that has drawn its number, not committed
            slow.execute("INSERT INTO events (action, received_at, body) VALUES ('SLOW', 0, '{}')")
            seen: list[list[str]] = []
            reader = threading.Thread(target=lambda: seen.append(database.read_settled(
                "events", lambda db: [row["action"] for row in db.execute("SELECT action FROM events")])))
            reader.start()
            reader.join(timeout=1)
            assert reader.is_alive() and not seen, "the read did not wait for the write under way"
            slow.commit()
        reader.join(timeout=30)
        assert seen == [["SLOW"]]
        database.close()


def test_a_group_that_lost_a_deadlock_to_another_replica_is_run_again_whole():
    from psycopg import errors

    with fresh_database() as url:
        database = PostgresDatabase(url)
        lost = iter([errors.DeadlockDetected("deadlock detected")])

        def loses_once(db: Any) -> int:
            seq = add_event("RETRIED")(db)
            failure = next(lost, None)
            if failure is not None:
                raise failure  # PostgreSQL chose this transaction as the deadlock's victim
            return seq

        assert database.write(loses_once) > 0
        assert actions(database) == ["RETRIED"]  # the first attempt's row was rolled back with its group
        database.close()
