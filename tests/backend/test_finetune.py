"""Fine-tuning on corrections with a tiny random model: data, training, evaluation, promotion, failures, triggers.

The tiny model learns nothing useful in two steps; these tests check the plumbing and the rules around it
(what is trained on, what is compared, what is published, what happens when something goes wrong). The
learning itself is measured with the demo model in `tests/backend/test_hitl.py` and `bench/hitl_bench.py`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from backend import finetune, registry
from backend.acceptance import AcceptanceStats
from backend.corrections import CorrectionsStore
from backend.describe import describe, load_engine
from backend.finetune import FinetuneOptions, Verdict, decide, finetune_lock, lock_holder, run_finetune
from backend.labelconfig import FillPlan
from backend.runs import FinetuneRuns, RunStatus
from backend.settings import Settings
from backend.store import DB_FILE, SQLiteDatabase
from backend.training_data import is_held_out
from tests.support import REPO, WEBHOOK_SECRET, capture, wait_until
from tests.support.hitl import DEMO_CONFIG, SceneTask, annotation_event, make_tasks
from tests.support.processes import backend_env, start_api
from tests.support.redis_server import KEY_PREFIX, REDIS_URL

pytestmark = pytest.mark.slow
BASE = "tiny-0"


@pytest.fixture
def env(tmp_path: Path, tiny_checkpoint: Path, redis_db: redis.Redis) -> dict[str, str]:
    """The environment of a fine-tune: a registry whose current version is the tiny model, fast settings."""
    settings = Settings.from_env({}, model_dir=tmp_path / "models", data_dir=tmp_path / "data")
    registry.import_checkpoint(settings, tiny_checkpoint, BASE, symlink=True)
    return {
        "MODEL_DIR": str(tmp_path / "models"), "DATA_DIR": str(tmp_path / "data"),
        "LOCAL_FILES_DOCUMENT_ROOT": str(tmp_path / "images"), "REDIS_URL": REDIS_URL,
        "REDIS_KEY_PREFIX": KEY_PREFIX, "MAX_NEW_TOKENS": "4", "FINETUNE_STEPS": "2",
        "FINETUNE_LEARNING_RATE": "1e-2", "FINETUNE_EVAL_FRACTION": "0.3", "FINETUNE_DEVICE": "cpu",
        "LOG_LEVEL": "WARNING",
        # No Label Studio here to confirm annotations with (tests/security/test_training_data.py has one).
        "TRAIN_ON_UNCONFIRMED": "true", "WEBHOOK_SECRET": WEBHOOK_SECRET,
    }


def settings_of(env: dict[str, str], **overrides: Any) -> Settings:
    return Settings.from_env(env, **overrides)


def annotate(settings: Settings, tasks: list[SceneTask], first_id: int = 100) -> None:
    for i, task in enumerate(tasks):
        CorrectionsStore.for_settings(settings).record_event(annotation_event(task, first_id + i, DEMO_CONFIG))


def lock_key() -> str:
    return f"{KEY_PREFIX}:finetune:lock"


# ---------------------------------------------------------------------- the rule
def stats(right: int, total: int) -> AcceptanceStats:
    item = AcceptanceStats()
    item.regions, item.fields = total, {"label": [right, total]}
    return item


def figures(right: int, total: int) -> dict[str, Any]:
    item = AcceptanceStats()
    item.regions, item.fields = total, {"label": [right, total]}
    return item.to_json()


def test_the_promotion_rule_rests_on_sets_the_run_could_not_write():
    settings = Settings.from_env({}, finetune_max_regression=0.05, finetune_max_forgetting=0.01)

    def verdict(**metrics: Any) -> Verdict:
        return decide(settings, metrics)[0]

    assert verdict(candidate=figures(8, 10), parent=figures(8, 10)) is Verdict.PROMOTED
    assert verdict(candidate=figures(76, 100), parent=figures(80, 100)) is Verdict.PROMOTED
    rejected, reason = decide(settings, {"candidate": figures(70, 100), "parent": figures(80, 100)})
    assert rejected is Verdict.REJECTED and "0.700 vs 0.800" in reason and "allowed drop 0.05" in reason
    assert verdict(candidate=figures(9, 10), parent=figures(5, 10), base_candidate=0.80,
                   base_parent=0.82) is Verdict.REJECTED
    assert verdict(base_candidate=0.815, base_parent=0.82) is Verdict.PROMOTED
    # The run's own held-out corrections alone decide nothing: whoever wrote them could steer the gate.
    waiting, reason = decide(settings, {"fresh_candidate": figures(10, 10), "fresh_parent": figures(0, 10)})
    assert waiting is Verdict.AWAITING_REVIEW and "1.000 vs 0.000" in reason


# ---------------------------------------------------------------------- a whole run
def test_a_first_run_trains_publishes_and_waits_for_review_then_the_next_promotes(env, tmp_path):
    settings = settings_of(env, finetune_max_regression=1.0)  # promote whatever the scores: the plumbing is tested
    tasks = make_tasks(tmp_path / "images", "b", 1, 6, seed=11)
    annotate(settings, tasks)
    store = CorrectionsStore.for_settings(settings)
    regions = store.regions()

    outcome = run_finetune(settings, FinetuneOptions(trigger="test"))

    # No evaluation set existed before this run's corrections: the candidate is kept for a person.
    assert outcome.status is Verdict.AWAITING_REVIEW, outcome.message
    name = outcome.candidate
    assert f"python -m backend promote {name}" in outcome.message
    assert registry.current_version(settings) == BASE and registry.list_versions(settings) == [BASE, name]
    meta = registry.read_metadata(settings, name)
    assert meta["parent"] == BASE and meta["promoted"] is False and meta["verdict"] == "awaiting review"
    # A version names the engine that made it and the base model it descends from.
    assert meta["engine"] == "gpt4roi" and meta["base_model"] == BASE
    held = [r for r in regions if is_held_out(r.task_id, 0.3)]
    assert meta["data"]["fresh_eval_regions"] == len(held) > 0 and meta["data"]["eval_regions"] == 0
    assert meta["data"]["new_regions"] == len(regions) - len(held)
    assert meta["data"]["train_records"] == 5 * meta["data"]["new_regions"]  # caption, label, 3 choices
    for side in ("fresh_candidate", "fresh_parent"):
        assert meta["metrics"][side]["regions"] == len(held)
        assert set(meta["metrics"][side]["field_accuracy"]) == {"caption", "label", "color", "size", "texture"}
    assert meta["training"]["steps"] == 2 and meta["training"]["trainable"] == "lora"
    folder = registry.checkpoint_path(settings, name)
    assert (folder / "lora" / "adapter" / "adapter_config.json").is_file()
    # The candidate's confidences travel with it, with how reliable they were on the held-out corrections.
    assert (folder / "calibration.json").is_file()
    assert meta["calibration"]["regions"] == len(held)
    assert meta["calibration"]["calibrated"]["all"]["fields"] == 5 * len(held)
    assert 0.0 <= meta["calibration"]["calibrated"]["all"]["ece"] <= 1.0
    assert not any(p.name.startswith(".staging-") for p in Path(settings.model_dir).iterdir())

    # The published checkpoint is what the worker loads, and training changed it.
    from safetensors.torch import load_file

    from model.engine import load_engine

    assert load_engine(folder).name == "gpt4roi"
    tuned, base = load_file(folder / "model.safetensors"), load_file(registry.checkpoint_path(settings, BASE)
                                                                     / "model.safetensors")
    changed = [k for k in base if not (tuned[k] == base[k]).all()]
    assert any(k.startswith("spi_module.") for k in changed) and any("language_model" in k for k in changed)

    [run] = FinetuneRuns.for_settings(settings).runs()
    assert (run.status, run.parent, run.candidate, run.watermark) == (RunStatus.AWAITING_REVIEW, BASE, name,
                                                                      store.max_seq())
    assert redis.Redis.from_url(REDIS_URL).get(lock_key()) is None
    again = run_finetune(settings, FinetuneOptions())
    assert again.status == "skipped" and "0 new corrected region(s)" in again.message

    # A person promotes it; the next run has the first run's held-out corrections to decide on.
    promoted = subprocess.run([sys.executable, "-m", "backend", "promote", name], cwd=REPO, env=backend_env(env),
                              capture_output=True, text=True, timeout=120)
    assert promoted.returncode == 0 and registry.current_version(settings) == name, promoted.stderr
    annotate(settings, make_tasks(tmp_path / "images", "c", 100, 6, seed=21), first_id=500)
    second = run_finetune(settings, FinetuneOptions())
    assert second.status is Verdict.PROMOTED, second.message
    meta = registry.read_metadata(settings, second.candidate)
    assert meta["data"]["eval_regions"] == len(held) and meta["metrics"]["candidate"]["regions"] == len(held)
    assert registry.current_version(settings) == second.candidate
    # A fine-tune of a fine-tune inherits the lineage.
    assert (meta["parent"], meta["engine"], meta["base_model"]) == (name, "gpt4roi", BASE)


def test_a_rollback_during_a_run_is_not_undone_by_its_promotion(env, tmp_path, monkeypatch):
    settings = settings_of(env, finetune_max_regression=1.0)
    registry.import_checkpoint(settings, registry.checkpoint_path(settings, BASE), "other", symlink=True,
                               make_current=False)
    annotate(settings, make_tasks(tmp_path / "images", "b", 1, 6, seed=23))
    real_decide = finetune.decide

    def rollback_meanwhile(settings_: Settings, metrics: Any) -> Any:
        registry.rollback(settings_, "other")  # an operator, while the run evaluates
        return Verdict.PROMOTED, "forced for the test"

    monkeypatch.setattr(finetune, "decide", rollback_meanwhile)
    outcome = run_finetune(settings, FinetuneOptions())
    assert outcome.status is Verdict.AWAITING_REVIEW and "became other" in outcome.message
    assert registry.current_version(settings) == "other"
    assert real_decide is not rollback_meanwhile


def test_a_candidate_worse_than_the_current_version_is_not_promoted(env, tmp_path):
    """Held-out annotations, stored before the run, that agree with everything the current version proposes:
    any change is worse."""
    settings = settings_of(env, finetune_eval_fraction=0.5, finetune_keep_rejected=True)
    tasks = make_tasks(tmp_path / "images", "b", 1, 6, seed=12)
    plan = FillPlan.from_label_config(DEMO_CONFIG)
    engine = load_engine(registry.checkpoint_path(settings, BASE), "cpu")
    for i, task in enumerate(tasks):
        event = annotation_event(task, 200 + i, DEMO_CONFIG)
        if is_held_out(str(task.task_id), 0.5):
            event["annotation"]["result"] = accepted_as_proposed(engine, settings, plan, task, tmp_path / "images")
        CorrectionsStore.for_settings(settings).record_event(event)
    assert any(is_held_out(str(t.task_id), 0.5) for t in tasks)
    assert run_finetune(settings, FinetuneOptions()).status is Verdict.AWAITING_REVIEW
    annotate(settings, [t for t in make_tasks(tmp_path / "images", "c", 100, 8, seed=22)
                        if not is_held_out(str(t.task_id), 0.5)], first_id=600)

    outcome = run_finetune(settings, FinetuneOptions())

    assert outcome.status == "rejected", outcome.message
    assert "held-out field accuracy" in outcome.message and "vs 1.000" in outcome.message
    assert registry.current_version(settings) == BASE
    kept = registry.read_metadata(settings, outcome.candidate)
    assert kept["promoted"] is False and kept["metrics"]["parent"]["acceptance_rate"] == 1.0
    assert FinetuneRuns.for_settings(settings).watermark() > 0


def accepted_as_proposed(engine: Any, settings: Settings, plan: FillPlan, task: SceneTask,
                         images: Path) -> list[dict[str, Any]]:
    """An annotation result holding exactly what the worker proposes for the task's boxes."""
    from PIL import Image

    from backend.labelconfig import build_prediction, regions_from_task
    from tests.support.hitl import task_json

    regions = regions_from_task(plan, task_json(task))
    with Image.open(task.image_path(images)) as opened:
        image = opened.convert("RGB")
    answers = describe(engine, image, plan, regions, False, settings.max_new_tokens)
    return build_prediction(plan, regions, answers, BASE, image_size=image.size)["result"]


# ---------------------------------------------------------------------- failures
def test_unreachable_images_fail_the_run_and_keep_the_current_version(env, tmp_path):
    settings = settings_of(env)
    tasks = make_tasks(tmp_path / "images", "b", 1, 4, seed=13)
    annotate(settings, tasks)
    for task in tasks:
        task.image_path(tmp_path / "images").unlink()

    outcome = run_finetune(settings, FinetuneOptions())

    assert outcome.status == "failed"
    assert "no usable training record" in outcome.message and "no such file" in outcome.message
    assert registry.current_version(settings) == BASE and registry.list_versions(settings) == [BASE]
    assert redis.Redis.from_url(REDIS_URL).get(lock_key()) is None
    runs = FinetuneRuns.for_settings(settings)
    assert runs.last().status is RunStatus.FAILED and runs.watermark() == 0  # still new for the next run
    listed = subprocess.run([sys.executable, "-m", "backend", "versions"], cwd=REPO, env=backend_env(env),
                            capture_output=True, text=True, timeout=120)
    assert "last fine-tune: run 1 failed" in listed.stdout and "no usable training record" in listed.stdout


def test_bad_base_data_fails_the_run_with_the_file_and_line(env, tmp_path):
    bad = tmp_path / "base.jsonl"
    bad.write_text('{"id": "a"}\n')
    settings = settings_of(env, finetune_base_data=str(bad))
    annotate(settings, make_tasks(tmp_path / "images", "b", 1, 4, seed=14))

    outcome = run_finetune(settings, FinetuneOptions())

    assert outcome.status == "failed" and f"{bad}:1: missing field(s)" in outcome.message
    assert registry.current_version(settings) == BASE
    assert redis.Redis.from_url(REDIS_URL).get(lock_key()) is None


def test_a_second_run_waits_for_the_lock(env, tmp_path):
    settings = settings_of(env)
    annotate(settings, make_tasks(tmp_path / "images", "b", 1, 2, seed=15))
    connection = redis.Redis.from_url(REDIS_URL)
    holder = finetune_lock(connection, settings)
    assert holder.acquire(blocking=False, token="someone-else:1")
    try:
        outcome = run_finetune(settings, FinetuneOptions())
        assert outcome.status is Verdict.BUSY and "someone-else:1" in outcome.message
        assert FinetuneRuns.for_settings(settings).runs() == []
    finally:
        holder.release()
    assert lock_holder(connection, settings) is None


def start_script(env: dict[str, str], log: Path) -> subprocess.Popen:
    """`python backend/finetune.py` as cron would start it: from another folder, without PYTHONPATH."""
    script_env = backend_env(env)
    script_env.pop("PYTHONPATH", None)
    with open(log, "wb") as handle:
        return subprocess.Popen([sys.executable, str(REPO / "backend" / "finetune.py"), "--trigger", "cron"],
                                cwd="/", env=script_env, stdout=handle, stderr=subprocess.STDOUT)


def wait_for_training(env: dict[str, str], process: subprocess.Popen, log: Path) -> None:
    runs = FinetuneRuns(SQLiteDatabase(Path(env["DATA_DIR"]) / DB_FILE))

    def running() -> bool:
        if process.poll() is not None:
            pytest.fail(f"finetune.py exited early:\n{log.read_text()}")
        return any(r.status is RunStatus.RUNNING for r in runs.runs())

    wait_until(running, 120, "the fine-tune to start")
    time.sleep(2)  # inside training by now


def test_an_interrupted_run_leaves_the_current_version_and_says_why(env, tmp_path):
    env = {**env, "FINETUNE_STEPS": "1000", "FINETUNE_LOCK_TTL": "3"}
    settings = settings_of(env)
    annotate(settings, make_tasks(tmp_path / "images", "b", 1, 4, seed=16))
    store = FinetuneRuns.for_settings(settings)

    # SIGTERM (docker stop, a cron timeout): recorded at once, lock released.
    process = start_script(env, tmp_path / "term.log")
    wait_for_training(env, process, tmp_path / "term.log")
    os.kill(process.pid, signal.SIGTERM)
    assert process.wait(timeout=60) == 130, (tmp_path / "term.log").read_text()
    first = store.runs()[0]
    assert first.status == "interrupted" and "interrupted by a signal" in first.message
    assert redis.Redis.from_url(REDIS_URL).get(lock_key()) is None
    assert registry.current_version(settings) == BASE and registry.list_versions(settings) == [BASE]

    # SIGKILL: nothing can be recorded; the lock expires and the next run records what happened.
    process = start_script(env, tmp_path / "kill.log")
    wait_for_training(env, process, tmp_path / "kill.log")
    process.kill()
    process.wait(timeout=30)
    assert registry.current_version(settings) == BASE and registry.list_versions(settings) == [BASE]
    wait_until(lambda: redis.Redis.from_url(REDIS_URL).get(lock_key()) is None, 10, "the lock to expire")
    after = run_finetune(settings_of({**env, "FINETUNE_STEPS": "1", "FINETUNE_MAX_REGRESSION": "1"}),
                         FinetuneOptions())
    assert after.status is Verdict.AWAITING_REVIEW, after.message
    statuses = [r.status for r in store.runs()]
    assert statuses == ["awaiting review", "interrupted", "interrupted"]
    assert "process stopped without finishing" in store.runs()[1].message


def test_a_sigterm_that_lands_in_a_finalizer_still_interrupts_the_run():
    """A garbage collection can run an object's `__del__` whenever; Python drops an exception raised there, so
    a SIGTERM handled inside one must still end the run, a moment later."""
    from backend.finetune import _terminate_as_interrupt

    class SignalledWhileCollected:
        def __del__(self) -> None:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.01)  # the handler runs here, inside `__del__`

    deadline = time.monotonic() + 5
    with pytest.raises(KeyboardInterrupt, match="signal 15"), _terminate_as_interrupt():
        SignalledWhileCollected()
        while time.monotonic() < deadline:  # the run going on
            time.sleep(0.01)
    assert time.monotonic() < deadline, "the SIGTERM was lost in the finalizer"


# ---------------------------------------------------------------------- START_TRAINING through the backend
def test_start_training_webhook_queues_a_job_the_finetune_worker_runs(env, tmp_path):
    from model.demo.synthetic import generate_dataset

    # A fixed evaluation set of earlier concepts lets the first fine-tune promote by itself.
    base_eval = generate_dataset(tmp_path / "base", 3, 5, "base", exclude_shapes=["cross"], tasks=("attribute",))
    env = {**env, "FINETUNE_STEPS": "1", "FINETUNE_MAX_REGRESSION": "1", "FINETUNE_BASE_EVAL": str(base_eval),
           "FINETUNE_MAX_FORGETTING": "1"}
    tasks = make_tasks(tmp_path / "images", "b", 1, 4, seed=17)
    api = start_api(backend_env(env), tmp_path / "api.log")
    try:
        for i, task in enumerate(tasks):
            assert api.client.post("/webhook", json=annotation_event(task, 300 + i, DEMO_CONFIG)).status_code == 200
        started = time.perf_counter()
        answer = api.client.post("/webhook", json=capture("11")["request"]["json"])
        assert answer.status_code == 200 and time.perf_counter() - started < 1.0
        assert api.client.post("/setup", json={}).json()["model_version"] == BASE

        worker = subprocess.run([sys.executable, "-m", "backend", "finetune-worker", "--burst"], cwd=REPO,
                                env=backend_env(env), capture_output=True, text=True, timeout=600)
        assert worker.returncode == 0, worker.stdout + worker.stderr

        new = registry.current_version(settings_of(env))
        assert new.startswith("v0001-")
        assert api.client.post("/setup", json={}).json()["model_version"] == new
        assert new in api.client.get("/versions").json()["versions"]
        last = FinetuneRuns.for_settings(settings_of(env)).last()
        assert (last.status, last.trigger) == ("promoted", "START_TRAINING")
    finally:
        api.stop()


def test_the_script_runs_from_anywhere_with_settings_from_the_environment(env, tmp_path):
    script_env = backend_env(env)
    script_env.pop("PYTHONPATH", None)
    script = [sys.executable, str(REPO / "backend" / "finetune.py")]
    helped = subprocess.run([*script, "--help"], cwd="/", env=script_env, capture_output=True, text=True, timeout=60)
    assert helped.returncode == 0 and "--min-new" in helped.stdout and "FINETUNE_" in helped.stdout

    annotate(settings_of(env), make_tasks(tmp_path / "images", "b", 1, 2, seed=19))
    cron = subprocess.run([*script, "--min-new", "50"], cwd="/", env=script_env, capture_output=True, text=True,
                          timeout=120)
    assert cron.returncode == 0, cron.stderr
    assert cron.stdout.startswith("skipped: ") and "fewer than 50" in cron.stdout
    bad = subprocess.run([*script, "--min-new", "0"], cwd="/", env=script_env, capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 2 and "--min-new must be positive" in bad.stderr
    broken = subprocess.run(script, cwd="/", env={**script_env, "FINETUNE_EVAL_FRACTION": "1.5"},
                            capture_output=True, text=True, timeout=60)
    assert broken.returncode == 2 and "FINETUNE_EVAL_FRACTION must be in [0, 1)" in broken.stderr
