"""The database engine: migrations, and a writer thread that commits queued writes in groups, each caller
returning only once its own write is committed."""

from __future__ import annotations

import contextlib
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
from backend.store import SCHEMA_VERSION, Database


@pytest.fixture
def database(tmp_path: Path) -> Database:
    return Database(tmp_path / "db.sqlite3")


def add_event(action: str) -> Any:
    """A write that stores one event and returns its sequence number."""
    def work(db: sqlite3.Connection) -> int:
        return int(db.execute("INSERT INTO events (action, received_at, body) VALUES (?, ?, '{}')",
                              (action, time.time())).lastrowid)
    return work


def actions(database: Database) -> list[str]:
    return [row[0] for row in database.read().execute("SELECT action FROM events ORDER BY seq")]


# ---------------------------------------------------------------------- migrations
def test_a_new_database_gets_every_migration_once(tmp_path):
    Database(tmp_path / "db.sqlite3")
    with contextlib.closing(sqlite3.connect(tmp_path / "db.sqlite3")) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"events", "annotations", "samples", "predictions", "images", "finetune_runs"} <= tables
    Database(tmp_path / "db.sqlite3")  # opening again changes nothing


def test_a_database_written_before_versioning_keeps_its_rows(tmp_path):
    path = tmp_path / "db.sqlite3"
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.executescript(store_module.MIGRATIONS[0])
        db.execute("INSERT INTO events (action, received_at, body) VALUES ('OLD', 0, '{}')")
        db.commit()
    assert actions(Database(path)) == ["OLD"]


# ---------------------------------------------------------------------- the writer
@pytest.fixture
def held_writer(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[list[int], threading.Event]]:
    """Records the size of every committed group; the first group waits for the event, so that what is
    written meanwhile queues up behind it."""
    sizes: list[int] = []
    release = threading.Event()
    commit = store_module._commit_group

    def held(db: sqlite3.Connection, group: Any) -> Any:
        sizes.append(len(group))
        if len(sizes) == 1:
            release.wait(30)
        return commit(db, group)

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


def test_a_burst_of_writes_is_committed_in_one_transaction(database, held_writer):
    sizes, release = held_writer
    first = occupy_writer(database, sizes)
    threads, outcomes = burst(database, [add_event(f"E{i}") for i in range(20)])
    assert all(outcome is None for outcome in outcomes), "no call may return before its commit"
    release.set()
    for thread in [first, *threads]:
        thread.join(timeout=30)
    assert sizes == [1, 20]
    assert sorted(outcomes) == list(range(2, 22))
    assert len(actions(database)) == 21


def test_a_failing_write_in_a_group_is_undone_alone(database, held_writer):
    sizes, release = held_writer
    first = occupy_writer(database, sizes)

    def broken(db: sqlite3.Connection) -> None:
        add_event("HALF")(db)
        raise ValueError("malformed")

    threads, outcomes = burst(database, [add_event("A"), broken, add_event("B")])
    release.set()
    for thread in [first, *threads]:
        thread.join(timeout=30)
    assert sizes == [1, 3]
    assert isinstance(outcomes[1], ValueError)
    assert sorted(actions(database)) == ["A", "B", "FIRST"]


def test_a_failed_commit_fails_its_group_and_the_writer_goes_on(database, monkeypatch):
    commit = store_module._commit_group
    failures = iter([sqlite3.OperationalError("disk I/O error")])

    def failing_once(db: sqlite3.Connection, group: Any) -> Any:
        failure = next(failures, None)
        if failure is not None:
            raise failure
        return commit(db, group)

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
