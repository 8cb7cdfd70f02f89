"""PostgreSQL databases of the tests' own: created empty for a test, dropped after it.

The server is `TEST_POSTGRES_URL` (default: the `postgres` database of 127.0.0.1:5432 as user `postgres`, as
on the CI machine); the tests create databases named `gpt4roi_test_<random>` there and drop only those. On a
machine without that server the PostgreSQL tests are skipped, except under CI, where they fail.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import pytest

SERVER_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def _admin() -> object:
    import psycopg

    try:
        return psycopg.connect(SERVER_URL, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        message = f"no PostgreSQL server for the tests at TEST_POSTGRES_URL={SERVER_URL}: {exc}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


@contextlib.contextmanager
def fresh_database() -> Iterator[str]:
    """The URL of a new, empty database, dropped (with its connections) afterwards."""
    name = f"gpt4roi_test_{uuid.uuid4().hex[:12]}"
    admin = _admin()
    with contextlib.closing(admin):
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            parts = urlsplit(SERVER_URL)
            yield urlunsplit(parts._replace(path=f"/{name}"))
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
