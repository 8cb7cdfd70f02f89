"""The human-in-the-loop simulation: synthetic scenes as Label Studio tasks, a simulated annotator, and the
whole loop through the real backend (pre-annotate, correct, fine-tune, pre-annotate again).

`bench/hitl_bench.py` runs it at full size and prints its figures; `tests/backend/test_hitl.py` runs it
smaller; the corrections and fine-tune tests use its task and webhook builders.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from backend.acceptance import compare_fields
from backend.annotations import parse_annotation_regions
from backend.labelconfig import FillPlan
from backend.webhooks import SECRET_HEADER
from model.demo.synthetic import ObjectSpec, image_seed, make_image
from tests.support import REPO, WEBHOOK_SECRET, free_port

LABEL_CONFIG_FILE = REPO / "labelstudio_config" / "demo_shapes.xml"
DEMO_CONFIG = LABEL_CONFIG_FILE.read_text(encoding="utf-8")
NEW_SHAPE = "cross"
CHOICE_CONTROLS = ("color", "size", "texture")
PROJECT_ID = 1
# Which pre-annotated scenes the annotator corrects: the first ones (as they come), a random sample of them,
# or those with the lowest task score (active learning: the Data Manager sorted by prediction score).
Selection = Literal["first", "random", "uncertain"]


# ---------------------------------------------------------------------- Label Studio-shaped data
@dataclass(frozen=True)
class SceneTask:
    """A Label Studio task made from a synthetic scene, with the scene's ground truth."""

    task_id: int
    reference: str
    width: int
    height: int
    objects: tuple[ObjectSpec, ...]

    def region_id(self, index: int) -> str:
        """The id of object `index`'s region (shared by the detector box, the prediction and the annotation)."""
        return f"t{self.task_id}-r{index + 1}"

    def image_path(self, root: Path) -> Path:
        """Where `make_tasks(root, …)` saved the scene's image (its reference names it under `root`)."""
        return root / self.reference.split("?d=", 1)[1]


def make_tasks(root: Path, batch: str, first_id: int, count: int, seed: int,
               cross_every: int | None = None) -> list[SceneTask]:
    """`count` scenes saved under `root/batch/`. By default every other scene contains at least one cross (the
    others are as drawn); with `cross_every` k, one scene in k does and the others contain none: a new
    concept as a team meets it, rarely."""
    (root / batch).mkdir(parents=True, exist_ok=True)
    tasks = []
    for index in range(count):
        attempt = 0
        while True:
            image, objects = make_image(image_seed(seed, index * 1000 + attempt))
            has_cross = any(o.shape == NEW_SHAPE for o in objects)
            if cross_every is None and (index % 2 or has_cross):
                break
            if cross_every is not None and has_cross == (index % cross_every == 0):
                break
            attempt += 1
        name = f"{batch}/{first_id + index:06d}.png"
        image.save(root / name)
        tasks.append(SceneTask(first_id + index, f"/data/local-files/?d={name}", image.width, image.height,
                               tuple(objects)))
    return tasks


def _geometry(obj: ObjectSpec, task: SceneTask) -> dict[str, float]:
    x1, y1, x2, y2 = obj.box
    return {"x": 100 * x1 / task.width, "y": 100 * y1 / task.height, "width": 100 * (x2 - x1) / task.width,
            "height": 100 * (y2 - y1) / task.height, "rotation": 0}


def _item(task: SceneTask, index: int, from_name: str, kind: str, value: dict[str, Any]) -> dict[str, Any]:
    return {"id": task.region_id(index), "from_name": from_name, "to_name": "image", "type": kind,
            "origin": "manual", "original_width": task.width, "original_height": task.height,
            "image_rotation": 0, "value": {**_geometry(task.objects[index], task), **value}}


def task_json(task: SceneTask) -> dict[str, Any]:
    """The task as Label Studio sends it to `/predict`: data plus a detector's unlabeled boxes."""
    boxes = [_item(task, i, "bbox", "rectanglelabels", {}) for i in range(len(task.objects))]
    return {"id": task.task_id, "data": {"image": task.reference}, "annotations": [],
            "predictions": [{"model_version": "detector", "result": boxes, "score": 1.0}]}


def ground_truth_result(task: SceneTask) -> list[dict[str, Any]]:
    """What a careful annotator submits: per region the label, the caption and the three attributes."""
    result = []
    for index, obj in enumerate(task.objects):
        result.append(_item(task, index, "bbox", "rectanglelabels", {"rectanglelabels": [obj.shape]}))
        result.append(_item(task, index, "caption", "textarea", {"text": [obj.caption]}))
        for control in CHOICE_CONTROLS:
            result.append(_item(task, index, control, "choices", {"choices": [getattr(obj, control)]}))
    return result


def annotation_event(task: SceneTask, annotation_id: int, label_config: str,
                     action: str = "ANNOTATION_CREATED") -> dict[str, Any]:
    """An annotation webhook with the keys Label Studio 1.23 sends (see the `09_*` capture)."""
    now = time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime())
    annotation = {
        "id": annotation_id, "result": ground_truth_result(task), "was_cancelled": False, "ground_truth": False,
        "created_at": now, "updated_at": now, "draft_created_at": None, "lead_time": 7.5, "prediction": {},
        "result_count": len(task.objects), "unique_id": f"hitl-{annotation_id}", "import_id": None,
        "last_action": None, "bulk_created": False, "task": task.task_id, "project": PROJECT_ID, "completed_by": 1,
        "updated_by": 1, "parent_prediction": None, "parent_annotation": None, "last_created_by": None,
    }
    return {
        "action": action,
        "annotation": annotation,
        "task": {"id": task.task_id, "data": {"image": task.reference}, "meta": {}, "is_labeled": True,
                 "project": PROJECT_ID},
        "project": {"id": PROJECT_ID, "title": "hitl-bench", "label_config": label_config, "model_version": ""},
    }


def region_outcomes(task: SceneTask, prediction: Mapping[str, Any],
                    plan: FillPlan) -> list[tuple[str, dict[str, bool]]]:
    """For each object: its shape and, per proposed field, whether the proposal equals the ground truth."""
    proposed = parse_annotation_regions(prediction.get("result") or [], plan)
    truth = parse_annotation_regions(ground_truth_result(task), plan)
    outcomes = []
    for index, obj in enumerate(task.objects):
        region_id = task.region_id(index)
        fields = proposed.get(region_id)
        if fields is None:
            outcomes.append((obj.shape, {"region": False}))
            continue
        outcomes.append((obj.shape, compare_fields(fields, truth[region_id])))
    return outcomes


@dataclass
class Acceptance:
    """Regions accepted unchanged, split into the new concept and the old ones."""

    new: list[bool] = field(default_factory=list)
    old: list[bool] = field(default_factory=list)
    fields: dict[str, list[bool]] = field(default_factory=dict)

    def add(self, shape: str, kept: Mapping[str, bool]) -> None:
        """Count one region."""
        accepted = bool(kept) and all(kept.values())
        (self.new if shape == NEW_SHAPE else self.old).append(accepted)
        for name, ok in kept.items():
            self.fields.setdefault(f"{'new' if shape == NEW_SHAPE else 'old'} {name}", []).append(ok)

    @staticmethod
    def rate(values: Sequence[bool]) -> float:
        """Share of True (NaN when empty)."""
        return sum(values) / len(values) if values else float("nan")

    def to_json(self) -> dict[str, Any]:
        """Rates and counts."""
        return {"new_concept": self.rate(self.new), "new_regions": len(self.new),
                "old_concepts": self.rate(self.old), "old_regions": len(self.old),
                "fields": {name: self.rate(v) for name, v in sorted(self.fields.items())}}


# ---------------------------------------------------------------------- processes
class Backend:
    """`serve-api` and one `worker` as subprocesses, and an HTTP client for the API."""

    def __init__(self, env: Mapping[str, str], logs: Path):
        import httpx

        self.env = dict(env)
        self.logs = logs
        self.port = free_port()
        self.env.update({"PORT": str(self.port), "HOST": "127.0.0.1"})
        self.processes: list[subprocess.Popen] = []
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=900,
                                   headers={SECRET_HEADER: self.env["WEBHOOK_SECRET"]})

    def _start(self, args: list[str], log_name: str) -> subprocess.Popen:
        self.logs.mkdir(parents=True, exist_ok=True)
        with open(self.logs / log_name, "ab") as log:
            process = subprocess.Popen([sys.executable, "-m", "backend", *args], cwd=REPO, env=self.env, stdout=log,
                                       stderr=subprocess.STDOUT)
        self.processes.append(process)
        return process

    def start(self, timeout: float = 180) -> None:
        """Start both processes; return once the API answers and the worker has loaded the model."""
        import httpx
        import redis

        api = self._start(["serve-api"], "api.log")
        worker = self._start(["worker", "--name", f"hitl-{os.getpid()}"], "worker.log")
        connection = redis.Redis.from_url(self.env["REDIS_URL"])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for process, name in ((api, "api.log"), (worker, "worker.log")):
                if process.poll() is not None:
                    raise RuntimeError(f"{name[:-4]} exited:\n{self.tail(name)}")
            with contextlib.suppress(httpx.HTTPError):
                if self.client.get("/health").status_code == 200 and connection.exists(f"rq:worker:hitl-{os.getpid()}"):
                    return
            time.sleep(0.2)
        raise RuntimeError(f"the backend did not start within {timeout:.0f} s:\n{self.tail('worker.log')}")

    def tail(self, name: str, lines: int = 30) -> str:
        """The end of a process log."""
        path = self.logs / name
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def stop(self) -> None:
        """Stop both processes."""
        self.client.close()
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()

    def model_version(self) -> str:
        """What `/setup` answers."""
        response = self.client.post("/setup", json={"project": f"{PROJECT_ID}.1", "schema": ""})
        response.raise_for_status()
        return response.json()["model_version"]

    def predict(self, tasks: Sequence[SceneTask], label_config: str, chunk: int = 8) -> list[dict[str, Any]]:
        """Pre-annotations of `tasks`, `chunk` tasks per `/predict` (as Label Studio's "Retrieve Predictions")."""
        predictions = []
        for start in range(0, len(tasks), chunk):
            part = tasks[start:start + chunk]
            body = {"tasks": [task_json(t) for t in part], "label_config": label_config,
                    "project": f"{PROJECT_ID}.1", "params": {"login": None, "password": None, "context": None}}
            response = self.client.post("/predict", json=body)
            if response.status_code != 200:
                raise RuntimeError(f"/predict answered {response.status_code}: {response.text[:500]}")
            results = response.json()["results"]
            missing = [t.task_id for t, r in zip(part, results, strict=True) if "result" not in r]
            if missing:
                raise RuntimeError(f"no prediction for tasks {missing}: {results[0].get('detail')}")
            predictions += results
        return predictions

    def webhook(self, event: Mapping[str, Any]) -> float:
        """Post one webhook; returns how long the answer took (seconds)."""
        started = time.perf_counter()
        response = self.client.post("/webhook", json=event)
        if response.status_code != 200:
            raise RuntimeError(f"/webhook answered {response.status_code}: {response.text[:500]}")
        return time.perf_counter() - started


def choose_scenes(predictions: Sequence[Mapping[str, Any]], count: int, selection: Selection,
                  seed: int) -> list[int]:
    """Indexes of the `count` pre-annotated scenes to correct, in the order they are corrected."""
    if selection == "first":
        return list(range(min(count, len(predictions))))
    if selection == "random":
        return random.Random(seed).sample(range(len(predictions)), min(count, len(predictions)))
    if selection == "uncertain":
        return sorted(range(len(predictions)), key=lambda i: (predictions[i]["score"], i))[:count]
    raise ValueError(f"selection must be first, random or uncertain, got {selection!r}")


# ---------------------------------------------------------------------- the loop
@dataclass
class LoopResult:
    """What one run of the loop measured."""

    base_version: str
    new_version: str
    selection: Selection
    corrected: list[SceneTask]
    before: Acceptance
    after: Acceptance
    finetune_seconds: float
    finetune_output: str
    webhook_seconds_max: float
    predict_seconds: dict[str, float]
    report: str

    def summary(self) -> dict[str, Any]:
        """Plain JSON of the figures."""
        return {"base_version": self.base_version, "new_version": self.new_version, "selection": self.selection,
                "corrected_scenes": len(self.corrected),
                "corrected_new_regions": sum(o.shape == NEW_SHAPE for t in self.corrected for o in t.objects),
                "before": self.before.to_json(), "after": self.after.to_json(),
                "finetune_seconds": round(self.finetune_seconds, 1),
                "webhook_seconds_max": round(self.webhook_seconds_max, 3),
                "predict_seconds": {k: round(v, 1) for k, v in self.predict_seconds.items()}}


def finetune_env(steps: int | None, base_data: Path | None, base_eval: Path | None) -> dict[str, str]:
    """What the loop sets beyond `backend/settings.py`'s FINETUNE_* defaults, which are the loop's own: the
    simulation has no Label Studio to confirm corrections with (TRAIN_ON_UNCONFIRMED), it replays the demo's
    kind of base data (FINETUNE_BASE_DATA), and the gate decides on a fixed set of the old shapes
    (FINETUNE_BASE_EVAL), the only set its own corrections cannot write."""
    env = {"TRAIN_ON_UNCONFIRMED": "true", "FINETUNE_DEVICE": "cpu"}
    if steps is not None:
        env["FINETUNE_STEPS"] = str(steps)
    if base_data is not None:
        env["FINETUNE_BASE_DATA"] = str(base_data)
    if base_eval is not None:
        env["FINETUNE_BASE_EVAL"] = str(base_eval)
    return env


def run_loop(workdir: Path, redis_url: str, *, before: int, after: int, steps: int | None, base_images: int = 120,
             checkpoint: Path | None = None, key_prefix: str = "hitl", extra_env: Mapping[str, str] | None = None,
             seed: int = 0, selection: Selection = "first", pool: int | None = None,
             cross_every: int | None = None, log: Any = print) -> LoopResult:
    """The whole loop (see the module docstring) in `workdir`; returns what it measured.

    `pool` scenes (default: `before`) are pre-annotated first and `before` of them, chosen by `selection`,
    are corrected; `cross_every` k draws the pool with a cross in one scene in k (`make_tasks`). `seed` draws
    the scenes, the base data and the fine-tune's own randomness; seed 0 is the bench's historical draw."""
    from model.demo import HELD_OUT_SHAPE, ensure_demo_checkpoint
    from model.demo.synthetic import generate_dataset

    if HELD_OUT_SHAPE != NEW_SHAPE:
        raise RuntimeError(f"the demo model holds back {HELD_OUT_SHAPE!r}, the bench expects {NEW_SHAPE!r}")
    checkpoint = checkpoint or ensure_demo_checkpoint()
    label_config = DEMO_CONFIG
    plan = FillPlan.from_label_config(label_config)
    images = workdir / "images"
    model_dir = workdir / "models"
    model_dir.mkdir(parents=True, exist_ok=True)
    base_version = "demo"
    (model_dir / base_version).symlink_to(checkpoint.resolve(), target_is_directory=True)
    (model_dir / "current").write_text(base_version + "\n")
    base_data = base_eval = None
    if base_images:
        base_data = generate_dataset(workdir / "base", base_images, 4242 + seed, "base", exclude_shapes=[NEW_SHAPE],
                                     tasks=("caption", "attribute"))
        base_eval = generate_dataset(workdir / "base-eval", max(8, base_images // 4), 4343 + seed, "base-eval",
                                     exclude_shapes=[NEW_SHAPE], tasks=("caption", "attribute"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LABEL_STUDIO_", "BASIC_AUTH_", "FINETUNE_"))}
    env.update({
        "REDIS_URL": redis_url, "REDIS_KEY_PREFIX": key_prefix, "MODEL_DIR": str(model_dir),
        "DATA_DIR": str(workdir / "data"), "LOCAL_FILES_DOCUMENT_ROOT": str(images), "DEVICE": "cpu",
        "BATCH_PREDICT_DEADLINE": "900", "INTERACTIVE_TIMEOUT": "300", "BATCH_JOB_TIMEOUT": "900",
        "LOG_LEVEL": "WARNING", "WEBHOOK_SECRET": WEBHOOK_SECRET,
        **finetune_env(steps, base_data, base_eval), **(extra_env or {}),
    })
    pool = pool or before
    log(f"[hitl] seed {seed}: {before} of {pool} scenes corrected ({selection}), {after} after; "
        f"demo checkpoint {checkpoint}")
    first = make_tasks(images, "before", 1, pool, seed=7001 + 100 * seed, cross_every=cross_every)
    second = make_tasks(images, "after", 10_001, after, seed=7002 + 100 * seed)
    backend = Backend(env, workdir / "logs")
    timings: dict[str, float] = {}

    def pre_annotate(phase: str, tasks: Sequence[SceneTask], version: str) -> tuple[Acceptance, list[dict]]:
        """Pre-annotate `tasks` through the API and judge them as the simulated annotator would."""
        started = time.perf_counter()
        predictions = backend.predict(tasks, label_config)
        timings[f"predict_{phase}"] = time.perf_counter() - started
        acceptance = _acceptance(tasks, predictions, version, plan)
        log(f"[hitl] {phase} ({version}): {json.dumps(acceptance.to_json())}")
        return acceptance, predictions

    try:
        backend.start()
        version = backend.model_version()
        acceptance_before, predictions = pre_annotate("before", first, version)
        corrected = [first[i] for i in choose_scenes(predictions, before, selection, seed)]
        webhook_max = max(backend.webhook(annotation_event(task, 100 + i, label_config))
                          for i, task in enumerate(corrected))

        started = time.perf_counter()
        finetune = subprocess.run([sys.executable, str(REPO / "backend" / "finetune.py"), "--min-new", "1",
                                   "--trigger", "hitl-bench", "--seed", str(seed)],
                                  cwd=REPO, env=env, capture_output=True, text=True)
        finetune_seconds = time.perf_counter() - started
        output = (finetune.stdout + finetune.stderr).strip()
        verdict = finetune.stdout.strip().splitlines()[-1:] or ["(no output)"]
        log(f"[hitl] finetune.py exit {finetune.returncode} in {finetune_seconds:.0f} s: {verdict[0]}")
        new_version = backend.model_version()
        acceptance_after, _ = pre_annotate("after", second, new_version)
        for i, task in enumerate(second):
            webhook_max = max(webhook_max, backend.webhook(annotation_event(task, 10_000 + i, label_config)))
        report = subprocess.run([sys.executable, "-m", "backend", "report", "--png", str(workdir / "acceptance.png")],
                                cwd=REPO, env=env, capture_output=True, text=True)
        versions = subprocess.run([sys.executable, "-m", "backend", "versions"], cwd=REPO, env=env,
                                  capture_output=True, text=True)
    finally:
        backend.stop()
    return LoopResult(version, new_version, selection, corrected, acceptance_before, acceptance_after,
                      finetune_seconds, output,
                      webhook_max, timings, (versions.stdout + "\n" + report.stdout + report.stderr).strip())


def _acceptance(tasks: Sequence[SceneTask], predictions: Sequence[Mapping[str, Any]], version: str,
                plan: FillPlan) -> Acceptance:
    acceptance = Acceptance()
    for task, prediction in zip(tasks, predictions, strict=True):
        if prediction.get("model_version") != version:
            raise RuntimeError(f"prediction of version {prediction.get('model_version')!r}, /setup says {version!r}")
        for shape, kept in region_outcomes(task, prediction, plan):
            acceptance.add(shape, kept)
    return acceptance
