"""Session fixtures: real Redis, real processes, real HTTP.

- Redis: the session's own server (`tests.support.redis_server`), or the one `REDIS_URL` names; each test
  that asks for `redis_db` starts with none of the session's keys but those of its running workers.
- A tiny random GPT4RoI checkpoint registered as version `tiny-1` in a temporary MODEL_DIR.
- `fake_ls`: a stand-in for Label Studio's REST API and file routes (`tests.support.fake_labelstudio`).
- `worker` / `api`: `python -m backend worker` and `python -m backend serve-api` subprocesses on that Redis.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from backend.store import close_databases
from tests.support import WEBHOOK_SECRET, redis_server
from tests.support.fake_labelstudio import LS_TOKEN, FakeLabelStudio, running_fake_labelstudio
from tests.support.model_factory import MODEL_VERSION
from tests.support.postgres import fresh_database
from tests.support.processes import Api, Process, backend_env, start_api, start_worker
from tests.support.redis_server import KEY_PREFIX, REDIS_URL


def pytest_sessionstart(session: pytest.Session) -> None:
    redis_server.SESSION.start()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if redis_server.SESSION.external:
        connection = redis.Redis.from_url(REDIS_URL)
        redis_server.clean(connection, keep_workers=False)
        connection.close()
    redis_server.SESSION.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """DATABASE_URL for a test of the store, which runs once per engine: "" (SQLite under DATA_DIR) and a
    PostgreSQL database of its own (`tests.support.postgres`)."""
    if request.param == "sqlite":
        yield ""
        return
    with fresh_database() as url:
        yield url
        close_databases()


@pytest.fixture(scope="session")
def fake_ls() -> Iterator[FakeLabelStudio]:
    """A running stand-in Label Studio with a few images."""
    with running_fake_labelstudio() as ls:
        yield ls


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A MODEL_DIR whose current version `tiny-1` is a random tiny checkpoint."""
    from tests.support.model_factory import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("models")
    make_tiny_checkpoint(root / MODEL_VERSION)
    (root / "current").write_text(MODEL_VERSION + "\n")
    return root


@pytest.fixture(scope="session")
def tiny_checkpoint(model_dir: Path) -> Path:
    """The session's tiny random checkpoint (read it, link it; never write into it)."""
    return model_dir / MODEL_VERSION


@pytest.fixture
def redis_db() -> Iterator[redis.Redis]:
    """The session's Redis, holding none of the session's keys at the start of the test (but its workers')."""
    connection = redis.Redis.from_url(REDIS_URL)
    try:
        connection.ping()
    except redis.ConnectionError as exc:
        pytest.fail(f"the tests' Redis at {REDIS_URL} does not answer: {exc}")
    redis_server.clean(connection)
    yield connection
    connection.close()


@pytest.fixture(scope="session")
def base_env(model_dir: Path, fake_ls: FakeLabelStudio, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Settings shared by the session's API and worker."""
    return {
        "REDIS_URL": REDIS_URL,
        "REDIS_KEY_PREFIX": KEY_PREFIX,
        "MODEL_DIR": str(model_dir),
        "DATA_DIR": str(tmp_path_factory.mktemp("data")),
        "LABEL_STUDIO_URL": fake_ls.url,
        "LABEL_STUDIO_API_KEY": LS_TOKEN,
        "DEVICE": "cpu",
        "MAX_NEW_TOKENS": "6",
        "WORKER_HEARTBEAT_TTL": "3",
        "WORKER_MAINTENANCE_INTERVAL": "1",
        "LOG_LEVEL": "WARNING",
        "WEBHOOK_SECRET": WEBHOOK_SECRET,
    }


@pytest.fixture(scope="session")
def worker(base_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    """One model worker for the whole session."""
    proc = start_worker(backend_env(base_env), tmp_path_factory.mktemp("logs") / "worker.log",
                        f"{KEY_PREFIX}-session-worker")
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def api(base_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    """The API for the whole session (default settings plus the test environment)."""
    server = start_api(backend_env(base_env), tmp_path_factory.mktemp("logs") / "api.log")
    yield server
    server.stop()
