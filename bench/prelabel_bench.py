"""`python -m backend prelabel` on a real Label Studio against the worker alone, side by side in one run.

    python bench/prelabel_bench.py [--tasks 120] [--large] [--boxes 4] [--max-new-tokens 16] [--device cpu]
                                   [--model-dir DIR] [--json results.json]

Starts a private redis-server, a stock Label Studio 1.23.2 (the end-to-end tests' harness: its own venv,
a copy of its pristine data, a personal access token), one worker and the API, then for each project size
(`--tasks`, and 1,000 with `--large`):

1. the worker alone: `bench/batching_bench.py`'s pre-annotation, one multi-task `/predict` of that many tasks
   with `--boxes` boxes each, images from a local image server, nothing pushed: tasks/s;
2. `prelabel`: a project of that many uploaded scenes (three or four objects each) whose detector boxes were
   imported as predictions, pre-labelled by `python -m backend prelabel --project ID` from its start to its
   exit, every prediction pushed to Label Studio: tasks/s, and how its jobs' time splits (model, image
   downloads, pushes) from their results; the rest is listing, queueing and RQ.

It prints both figures and their ratio (target: the worker alone at most 2x prelabel's tasks/s). The model is
the shipped demo checkpoint unless `--model-dir` names another. Report the machine with the numbers.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx

from bench.backend_bench import Redis, image_server, register_existing, wait_for
from bench.batching_bench import measure_prelabel, start_worker, stop
from tests.support import REPO, WEBHOOK_SECRET, free_port

CONFIG_NAME = "demo_shapes.xml"
LARGE = 1000
UPLOAD_CHUNK = 40  # files per import request, as a user drops them a folder at a time


def scenes(count: int, seed: int) -> list[tuple[bytes, list[Any], tuple[int, int]]]:
    """PNG bytes, objects and size of `count` scenes with three or four objects."""
    from model.demo.synthetic import HELD_OUT_SHAPE, image_seed, make_image

    made = []
    for index in range(count):
        image, objects = make_image(image_seed(seed, index), min_objects=3, max_objects=4,
                                    exclude_shapes=[HELD_OUT_SHAPE])
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        made.append((buffer.getvalue(), objects, image.size))
    return made


def detector_result(objects: list[Any], size: tuple[int, int], prefix: str) -> list[dict[str, Any]]:
    """A detector's boxes as Label Studio stores rectanglelabels regions."""
    width, height = size
    items = []
    for k, obj in enumerate(objects):
        x1, y1, x2, y2 = obj.box
        items.append({"id": f"{prefix}{k}", "from_name": "bbox", "to_name": "image", "type": "rectanglelabels",
                      "original_width": width, "original_height": height, "image_rotation": 0,
                      "value": {"x": 100 * x1 / width, "y": 100 * y1 / height, "width": 100 * (x2 - x1) / width,
                                "height": 100 * (y2 - y1) / height, "rotation": 0, "rectanglelabels": ["square"]}})
    return items


def make_project(ls_client: Any, tasks: int, seed: int) -> int:
    """A project of `tasks` uploaded scenes with their detector boxes imported as predictions."""
    project = ls_client.create_project_from_config(CONFIG_NAME, title=f"prelabel bench, {tasks} tasks")["id"]
    made = scenes(tasks, seed)
    task_ids: list[int] = []
    for start in range(0, tasks, UPLOAD_CHUNK):
        task_ids += ls_client.upload_images(project, {f"bench-{seed}-{i:05d}.png": data for i, (data, _, _)
                                                      in enumerate(made[start:start + UPLOAD_CHUNK], start)})
    predictions = [{"task": task_id, "model_version": "detector", "score": 0.9,
                    "result": detector_result(objects, size, f"Det{i:05d}")}
                   for i, (task_id, (_, objects, size)) in enumerate(zip(task_ids, made, strict=True))]
    for start in range(0, tasks, 200):
        ls_client.request("POST", f"/api/projects/{project}/import/predictions",
                          json_body=predictions[start:start + 200])
    ls_client.update_project(project, model_version="detector")
    return project


def job_breakdown(connection: Any) -> dict[str, Any]:
    """From the results of the jobs run since the last call (then forgotten): jobs per batch, and the seconds
    spent in the model, downloading images and pushing predictions, each job counted for its share."""
    from rq.results import Result
    from rq.serializers import JSONSerializer

    sizes: list[int] = []
    model_s = fetch_s = push_s = 0.0
    keys = list(connection.scan_iter("rq:results:*", count=1000))
    for key in keys:
        for entry_id, fields in connection.xrange(key):
            result = Result.restore(key.decode().rsplit(":", 1)[1], entry_id.decode(), fields,
                                    connection=connection, serializer=JSONSerializer)
            value = result.return_value
            if isinstance(value, dict) and "batch" in value:
                jobs = int(value["batch"]["jobs"])
                sizes.append(jobs)
                model_s += value["timing"]["model_ms"] / 1000 / jobs
                fetch_s += value["timing"]["fetch_ms"] / 1000
                push_s += value["timing"].get("push_ms", 0.0) / 1000
    if keys:
        connection.delete(*keys)
    return {"jobs_per_batch_p50": statistics.median(sizes) if sizes else 0, "model_s": round(model_s, 2),
            "fetch_s": round(fetch_s, 2), "push_s": round(push_s, 2)}


def run_prelabel(env: dict[str, str], project: int, tasks: int, timeout: float) -> dict[str, Any]:
    """`python -m backend prelabel --project ID` from its start to its exit; its summary's figures."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "backend", "prelabel", "--project", str(project)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=timeout)
    elapsed = time.perf_counter() - started
    figures = {name: int(value) for name, value in
               re.findall(r"(enqueued|pushed|still running|failed): (\d+)", done.stdout)}
    if done.returncode != 0 or figures.get("pushed") != tasks:
        raise SystemExit(f"prelabel of {tasks} tasks: rc {done.returncode}\n{done.stdout}\n{done.stderr[-3000:]}")
    return {"tasks_per_s": tasks / elapsed, "seconds": elapsed, **figures}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, help="a checkpoint folder (default: the shipped demo model)")
    parser.add_argument("--tasks", type=int, default=120)
    parser.add_argument("--large", action="store_true", help=f"also a project of {LARGE:,} tasks")
    parser.add_argument("--boxes", type=int, default=4, help="boxes per task of the worker-alone measurement")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)

    from tests.e2e.labelstudio import LabelStudioClient, LabelStudioServer, ensure_labelstudio, fresh_data_dir

    if args.model_dir is None:
        from model.demo import ensure_demo_checkpoint

        args.model_dir = ensure_demo_checkpoint(progress=False)
    sizes = [args.tasks] + ([LARGE] if args.large else [])
    work = Path(tempfile.mkdtemp(prefix="prelabel-bench-"))
    models = work / "models"
    models.mkdir()
    register_existing(models, args.model_dir)
    venv = ensure_labelstudio()
    labelstudio = LabelStudioServer(venv=venv, data_dir=work / "ls-data", log_path=work / "labelstudio.log",
                                    credentials=fresh_data_dir(venv, work / "ls-data"))
    labelstudio.start()
    images, image_base = image_server(max(sizes))
    redis_server = Redis(work)
    api_port = free_port()
    env = {**os.environ, "REDIS_URL": redis_server.url, "MODEL_DIR": str(models), "DATA_DIR": str(work / "data"),
           "DEVICE": args.device, "LOG_LEVEL": "WARNING", "REDIS_KEY_PREFIX": f"bench-{secrets.token_hex(3)}",
           "ALLOWED_IMAGE_HOSTS": image_base.split("://", 1)[1], "MAX_NEW_TOKENS": str(args.max_new_tokens),
           "PORT": str(api_port), "HOST": "127.0.0.1", "WEBHOOK_SECRET": WEBHOOK_SECRET,
           "BATCH_PREDICT_DEADLINE": "3000", "INTERACTIVE_TIMEOUT": "600",
           "LABEL_STUDIO_URL": labelstudio.url, "LABEL_STUDIO_API_KEY": labelstudio.token}
    for name in ("BASIC_AUTH_USER", "BASIC_AUTH_PASS"):
        env.pop(name, None)
    log = work / "processes.log"
    with open(log, "wb") as out:
        api = subprocess.Popen([sys.executable, "-m", "backend", "serve-api"], env=env, cwd=REPO, stdout=out,
                               stderr=subprocess.STDOUT)
    client = httpx.Client(base_url=f"http://127.0.0.1:{api_port}", timeout=3600)
    rows: list[dict[str, Any]] = []
    worker = None
    try:
        import redis

        connection = redis.Redis.from_url(redis_server.url)
        wait_for(lambda: client.get("/health").status_code == 200, 120, "the API")
        projects = {}
        with LabelStudioClient(labelstudio.url, labelstudio.token) as ls_client:
            for index, tasks in enumerate(sizes):
                started = time.perf_counter()
                projects[tasks] = make_project(ls_client, tasks, 8080 + index)
                print(f"project of {tasks} tasks made in {time.perf_counter() - started:.0f} s", flush=True)
        worker = start_worker(env, 32, log, connection, "prelabel-bench")
        # One /predict before measuring, so that neither figure pays for the model's first call.
        measure_prelabel(client, connection, image_base, SimpleNamespace(tasks=2, boxes=args.boxes), 99)
        job_breakdown(connection)
        for round_id, tasks in enumerate(sizes, 1):
            alone = measure_prelabel(client, connection, image_base, SimpleNamespace(tasks=tasks, boxes=args.boxes),
                                     round_id)
            print(f"{tasks} tasks, the worker alone: {alone['tasks_per_s']:.2f} tasks/s", flush=True)
            job_breakdown(connection)
            prelabel = run_prelabel(env, projects[tasks], tasks, timeout=max(600.0, 4.0 * tasks))
            breakdown = job_breakdown(connection)
            print(f"{tasks} tasks, prelabel: {prelabel['tasks_per_s']:.2f} tasks/s", flush=True)
            rows.append({"tasks": tasks, "worker_alone_tasks_per_s": round(alone["tasks_per_s"], 2),
                         "worker_alone_jobs_per_batch_p50": statistics.median(alone["batches"]),
                         "prelabel_tasks_per_s": round(prelabel["tasks_per_s"], 2),
                         "prelabel_seconds": round(prelabel["seconds"], 1), **breakdown,
                         "ratio": round(alone["tasks_per_s"] / prelabel["tasks_per_s"], 2)})
    finally:
        if worker is not None:
            stop(worker)
        client.close()
        stop(api)
        redis_server.stop()
        images.shutdown()
        labelstudio.stop()

    results = {"setup": {"model": str(args.model_dir), "device": args.device, "boxes": args.boxes,
                         "max_new_tokens": args.max_new_tokens, "label_studio": "1.23.2",
                         "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
                                    f"Python {platform.python_version()}"},
               "rows": rows}
    report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    return 0


def report(results: dict[str, Any]) -> None:
    setup = results["setup"]
    print(f"\n{setup['model']} on {setup['device']}, {setup['max_new_tokens']} new tokens, Label Studio "
          f"{setup['label_studio']}; {setup['machine']}")
    print(f"  {'tasks':>6} {'worker alone':>13} {'prelabel':>9} {'ratio':>6} {'prelabel s':>11} {'model s':>8} "
          f"{'images s':>9} {'pushes s':>9} {'jobs/batch':>11}")
    for row in results["rows"]:
        print(f"  {row['tasks']:>6} {row['worker_alone_tasks_per_s']:>13.2f} {row['prelabel_tasks_per_s']:>9.2f} "
              f"{row['ratio']:>5.2f}x {row['prelabel_seconds']:>11.1f} {row['model_s']:>8.1f} "
              f"{row['fetch_s']:>9.1f} {row['push_s']:>9.1f} {row['jobs_per_batch_p50']:>11}")
    print("  tasks/s; ratio: the worker alone over prelabel (target <= 2x); model, images and pushes: seconds of "
          "the prelabel's jobs spent in the model, downloading images and pushing predictions")


if __name__ == "__main__":
    raise SystemExit(main())
