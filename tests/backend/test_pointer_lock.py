"""Moves of the current model version take turns: a person's `rollback` / `promote` and a fine-tune's
promotion each hold the pointer lock (in Redis) while they move the pointer and tell Label Studio. A person's
move waits for one in progress, and gives up after a while saying who holds the lock; without Redis it goes
ahead, with a warning."""

from __future__ import annotations

import functools
import io
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from backend import finetune, registry
from backend.corrections import CorrectionsStore
from backend.finetune import FinetuneOptions, Verdict, run_finetune
from backend.jobs import POINTER_LOCK_KEY, pointer_lock
from backend.report import make_current
from backend.settings import Settings
from tests.support import free_port
from tests.support.hitl import DEMO_CONFIG, annotation_event, make_tasks
from tests.support.redis_server import KEY_PREFIX, REDIS_URL

BASE = "tiny-0"


@pytest.fixture
def settings(tmp_path: Path, tiny_checkpoint: Path, redis_db: redis.Redis) -> Settings:
    """A registry with two versions, `tiny-0` current and `other`, on the tests' Redis; fast fine-tunes."""
    settings = Settings.from_env(
        {}, model_dir=tmp_path / "models", data_dir=tmp_path / "data", redis_url=REDIS_URL, key_prefix=KEY_PREFIX,
        local_files_document_root=str(tmp_path / "images"), max_new_tokens=4, finetune_steps=2,
        finetune_eval_fraction=0.3, finetune_device="cpu", train_on_unconfirmed=True)
    registry.import_checkpoint(settings, tiny_checkpoint, BASE, symlink=True)
    registry.import_checkpoint(settings, tiny_checkpoint, "other", symlink=True, make_current=False)
    return settings


def held_by(settings: Settings, who: str) -> redis.lock.Lock:
    """The pointer lock, taken as `who` would take it."""
    lock = redis.Redis.from_url(REDIS_URL).lock(f"{KEY_PREFIX}:{POINTER_LOCK_KEY}", timeout=60)
    assert lock.acquire(blocking=False, token=who)
    return lock


def test_a_rollback_waits_for_a_promotion_in_progress_then_moves(settings):
    promoted = threading.Event()

    def promotion() -> None:  # a fine-tune promoting `other`, slowly telling Label Studio
        with pointer_lock(redis.Redis.from_url(REDIS_URL), settings, "the promotion of other"):
            promoted.set()
            registry.set_current(settings, "other", reason="fine-tune")
            time.sleep(1.0)

    promoting = threading.Thread(target=promotion)
    promoting.start()
    promoted.wait(10)
    out = io.StringIO()
    code = make_current(settings, BASE, "rollback", out=out, wait=30)
    promoting.join()

    assert code == 0, out.getvalue()
    assert "the promotion of other" in out.getvalue() and "waiting up to 30s" in out.getvalue()
    assert [move["version"] for move in registry.history(settings)][-2:] == ["other", BASE]
    assert registry.current_version(settings) == BASE


def test_a_rollback_gives_up_when_the_lock_stays_held_and_says_who_holds_it(settings, capsys):
    lock = held_by(settings, "the promotion of v0007 (gpu-host:4242:abcd)")
    try:
        code = make_current(settings, "other", "rollback", out=io.StringIO(), wait=0.5)
    finally:
        lock.release()

    message = capsys.readouterr().err
    assert code == 1
    assert "other was not made current" in message and "v0007 (gpu-host:4242:abcd)" in message
    assert "try again" in message
    assert registry.current_version(settings) == BASE


def test_without_redis_a_person_can_still_roll_back_and_is_warned(settings, capsys):
    unreachable = Settings.from_env({}, model_dir=settings.model_dir, data_dir=settings.data_dir,
                                    redis_url=f"redis://127.0.0.1:{free_port()}/0", redis_socket_timeout=0.5)
    assert make_current(unreachable, "other", "rollback", out=io.StringIO()) == 0
    assert "does not wait for a fine-tune" in capsys.readouterr().err
    assert registry.current_version(settings) == "other"


@pytest.mark.slow
def test_a_fine_tune_does_not_promote_while_a_person_moves_the_pointer(settings, tmp_path, monkeypatch):
    for i, task in enumerate(make_tasks(tmp_path / "images", "b", 1, 2, seed=51)):
        CorrectionsStore.for_settings(settings).record_event(annotation_event(task, 100 + i, DEMO_CONFIG))
    held: list[redis.lock.Lock] = []

    def promote_while_a_person_rolls_back(settings_: Settings, metrics: Any) -> Any:
        held.append(held_by(settings, "a rollback to other by a person (laptop:1:beef)"))
        return Verdict.PROMOTED, "forced for the test"

    monkeypatch.setattr(finetune, "decide", promote_while_a_person_rolls_back)
    monkeypatch.setattr(finetune, "pointer_lock", functools.partial(pointer_lock, wait=0.5))
    try:
        outcome = run_finetune(settings, FinetuneOptions())
    finally:
        for lock in held:
            lock.release()

    assert outcome.status is Verdict.AWAITING_REVIEW, outcome.message
    assert "not made current" in outcome.message and "laptop:1:beef" in outcome.message
    assert registry.current_version(settings) == BASE
