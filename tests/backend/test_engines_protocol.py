"""Every engine serves the same protocol, end to end through real processes: `python -m backend serve` with
ENGINE and BASE_MODEL naming a tiny model made outside the project; `/setup`, a drawn box and a batch answered
with valid predictions; corrections by webhook; a fine-tune that publishes a version naming its engine and
lineage; rollbacks across engines, each version served by the engine that made it."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from backend import registry
from backend.labelconfig import validate_prediction
from backend.settings import Settings
from tests.support import REPO, free_port
from tests.support.florence2_factory import save_tiny_florence2
from tests.support.hitl import DEMO_CONFIG, annotation_event, make_tasks
from tests.support.model_factory import make_tiny_checkpoint
from tests.support.processes import backend_env, start_serve
from tests.support.qwen3vl_factory import save_tiny_qwen3vl
from tests.support.redis_server import KEY_PREFIX
from tests.support.requests import CAPTURED_CONFIG, batch_body, batch_task, interactive_body

pytestmark = pytest.mark.slow

TINY_MODELS: dict[str, Callable[[Path], Path]] = {
    "gpt4roi": make_tiny_checkpoint,
    "florence-2": save_tiny_florence2,
    "qwen3-vl": save_tiny_qwen3vl,
}




def command(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def answered_by(client: httpx.Client, body: dict[str, Any], version: str, config: str) -> list[dict[str, Any]]:
    response = client.post("/predict", json=body)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    for prediction in results:
        assert prediction["model_version"] == version
        validate_prediction(config, prediction)
    return results


@pytest.mark.parametrize("engine", sorted(TINY_MODELS))
def test_an_engine_serves_from_its_base_model_to_a_fine_tuned_version_and_back(engine, base_env, fake_ls, tmp_path,
                                                                             redis_db):
    base = TINY_MODELS[engine](tmp_path / f"tiny-{engine}")
    env = backend_env(
        base_env, ENGINE=engine, BASE_MODEL=str(base), MODEL_DIR=str(tmp_path / "models"),
        DATA_DIR=str(tmp_path / "data"), LOCAL_FILES_DOCUMENT_ROOT=str(tmp_path / "images"),
        REDIS_KEY_PREFIX=f"{KEY_PREFIX}-{engine}", PORT=str(free_port()), HOST="127.0.0.1",
        FINETUNE_STEPS="2", FINETUNE_EVAL_FRACTION="0.3", FINETUNE_DEVICE="cpu", TRAIN_ON_UNCONFIRMED="true",
        MAX_NEW_TOKENS="4")
    settings = Settings.from_env(env)
    proc, client = start_serve(env, tmp_path / "serve.log")
    try:
        # The first version is the base model, named after its folder, recorded with its engine.
        assert client.post("/setup", json={"project": "1", "schema": CAPTURED_CONFIG}).json() == {
            "model_version": base.name}
        assert client.get("/versions").json()["engines"] == {base.name: engine}

        [drawn] = answered_by(client, interactive_body(f"{fake_ls.url}/img/red.png", labels=[]), base.name,
                              CAPTURED_CONFIG)
        assert {item["type"] for item in drawn["result"]} == {"rectanglelabels", "textarea", "choices"}
        tasks = [batch_task(11, f"{fake_ls.url}/img/red.png", "predictions"),
                 batch_task(12, f"{fake_ls.url}/img/blue.png", "annotations")]
        first, second = answered_by(client, batch_body(tasks), base.name, CAPTURED_CONFIG)
        assert len(first["result"]) == 6 and len(second["result"]) == 3

        # Corrections arrive by webhook; a fine-tune trains the same engine and names it.
        scenes = make_tasks(tmp_path / "images", "b", 1, 6, seed=3)
        for index, scene in enumerate(scenes):
            response = client.post("/webhook", json=annotation_event(scene, 100 + index, DEMO_CONFIG))
            assert response.status_code == 200, response.text
        # The stand-in Label Studio holds none of these annotations to confirm them with: trained unconfirmed.
        command({k: v for k, v in env.items() if not k.startswith("LABEL_STUDIO_")}, "backend/finetune.py")
        [tuned] = [name for name in registry.list_versions(settings) if name != base.name]
        assert tuned.endswith(f"-{engine}")  # the version Label Studio shows names the engine
        meta = registry.read_metadata(settings, tuned)
        assert (meta["engine"], meta["base_model"], meta["parent"]) == (engine, str(base), base.name)
        command(env, "-m", "backend", "promote", tuned)
        answered_by(client, interactive_body(f"{fake_ls.url}/img/red.png", labels=[]), tuned, CAPTURED_CONFIG)

        # Versions of the other engines, then this one again: each is served by the engine that made it.
        others = [name for name in TINY_MODELS if name != engine]
        for other in others:
            registry.import_checkpoint(settings, TINY_MODELS[other](tmp_path / f"tiny-{other}"), f"tiny-{other}",
                                       make_current=False, metadata={"engine": other})
        assert client.get("/versions").json()["engines"] == {
            base.name: engine, tuned: engine, **{f"tiny-{other}": other for other in others}}
        for version in (*(f"tiny-{other}" for other in others), base.name):
            command(env, "-m", "backend", "rollback", version)
            answered_by(client, interactive_body(f"{fake_ls.url}/img/blue.png", labels=[]), version,
                        CAPTURED_CONFIG)
            answered_by(client, batch_body(tasks), version, CAPTURED_CONFIG)
    finally:
        client.close()
        proc.stop()
