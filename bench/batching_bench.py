"""Batching across jobs against one job at a time, side by side in one run: real processes, real HTTP.

    python bench/batching_bench.py [--model-dir DIR] [--tasks 32] [--boxes 4] [--annotators 8] [--rounds 6]
                                   [--repeats 2] [--budget 32] [--device cpu] [--json results.json]

Starts a private redis-server, an image server and the API, then, for each worker configuration in turn
(BATCH_MAX_REGIONS=1, the one-job worker, and BATCH_MAX_REGIONS=--budget), a fresh worker, and measures:

(a) a pre-annotation of `--tasks` tasks with `--boxes` boxes each, one `/predict` call as Label Studio's
    "Retrieve predictions" makes it: tasks/s (target: batched >= 2x the one-job worker);
(b) `--annotators` annotators drawing boxes at once, each on an image of their own, `--rounds` boxes each:
    p50 and p90 latency (target: batched p50 not worse than the one-job worker's).

Configurations alternate `--repeats` times so a noisy machine affects both alike; every figure is the median
over repeats, and the batch sizes the worker actually reached are read from the jobs' results. The model is
the shipped demo checkpoint unless `--model-dir` names another.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from bench.backend_bench import (
    Redis,
    box,
    image_server,
    interactive_body,
    percentile,
    register_existing,
    summary,
    timed_post,
    wait_for,
)
from tests.support import REPO, WEBHOOK_SECRET, free_port


def prelabel_body(image_base: str, first_image: int, tasks: int, boxes: int, round_id: int) -> dict[str, Any]:
    """A multi-task /predict whose tasks' boxes come from a detector's prediction."""
    body = interactive_body(f"{image_base}/img/0.png", box(0))
    body["params"]["context"] = None
    body["tasks"] = []
    for index in range(tasks):
        task = copy.deepcopy(interactive_body(f"{image_base}/img/{first_image + index}.png", box(0))["tasks"][0])
        task["id"] = round_id * 100_000 + index
        regions = [interactive_body("x", box(index + k))["params"]["context"]["result"][0] for k in range(boxes)]
        for k, item in enumerate(regions):
            item["id"] = f"b{round_id}-{index}-{k}"
        task["predictions"] = [{"model_version": "detector", "result": regions}]
        task["annotations"] = []
        body["tasks"].append(task)
    return body


def batch_sizes(connection: Any) -> list[int]:
    """The `batch.jobs` of every job result in Redis (then forgotten, for the next measurement)."""
    from rq.results import Result
    from rq.serializers import JSONSerializer

    sizes = []
    keys = list(connection.scan_iter("rq:results:*", count=1000))
    for key in keys:
        for entry_id, fields in connection.xrange(key):
            result = Result.restore(key.decode().rsplit(":", 1)[1], entry_id.decode(), fields,
                                    connection=connection, serializer=JSONSerializer)
            value = result.return_value
            if isinstance(value, dict) and "batch" in value:
                sizes.append(int(value["batch"]["jobs"]))
    if keys:
        connection.delete(*keys)
    return sizes


def measure_prelabel(client: httpx.Client, connection: Any, image_base: str, args: argparse.Namespace,
                     round_id: int) -> dict[str, Any]:
    body = prelabel_body(image_base, 0, args.tasks, args.boxes, round_id)
    started = time.perf_counter()
    response = client.post("/predict", json=body)
    elapsed = time.perf_counter() - started
    response.raise_for_status()
    answered = [r for r in response.json()["results"] if r.get("result")]
    if len(answered) != args.tasks:
        raise SystemExit(f"the pre-annotation answered {len(answered)} of {args.tasks} tasks: {response.text[:300]}")
    return {"tasks_per_s": args.tasks / elapsed, "seconds": elapsed, "batches": batch_sizes(connection)}


def measure_annotators(api_url: str, connection: Any, image_base: str, args: argparse.Namespace,
                       round_id: int) -> dict[str, Any]:
    first_image = args.tasks  # images the pre-annotation did not touch
    clients = [httpx.Client(base_url=api_url, timeout=120) for _ in range(args.annotators)]

    def annotator(index: int) -> list[float]:
        image = f"{image_base}/img/{first_image + index}.png"
        times = []
        for turn in range(args.rounds):
            body = interactive_body(image, box(round_id * 31 + index * 7 + turn), region_id=f"D{round_id}-{turn}")
            times.append(timed_post(clients[index], "/predict", body))
        return times

    with ThreadPoolExecutor(max_workers=args.annotators) as pool:
        latencies = [t for own in pool.map(annotator, range(args.annotators)) for t in own]
    for client in clients:
        client.close()
    return {**summary(latencies), "batches": batch_sizes(connection)}


def start_worker(env: dict[str, str], budget: int, log: Path, connection: Any, name: str) -> subprocess.Popen:
    with open(log, "ab") as out:
        worker = subprocess.Popen([sys.executable, "-m", "backend", "worker", "--name", name],
                                  env={**env, "BATCH_MAX_REGIONS": str(budget)}, cwd=REPO, stdout=out,
                                  stderr=subprocess.STDOUT)
    wait_for(lambda: connection.exists(f"rq:worker:{name}"), 300, f"worker {name} to load its model")
    return worker


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, help="a checkpoint folder (default: the shipped demo model)")
    parser.add_argument("--tasks", type=int, default=32)
    parser.add_argument("--boxes", type=int, default=4)
    parser.add_argument("--annotators", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=6, help="boxes each annotator draws")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--budget", type=int, default=32, help="BATCH_MAX_REGIONS of the batching worker")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)

    if args.model_dir is None:
        from model.demo import ensure_demo_checkpoint

        args.model_dir = ensure_demo_checkpoint(progress=False)
    work = Path(tempfile.mkdtemp(prefix="batching-bench-"))
    models = work / "models"
    models.mkdir()
    register_existing(models, args.model_dir)
    images, image_base = image_server(args.tasks + args.annotators)
    redis_server = Redis(work)
    api_port = free_port()
    env = {**os.environ, "REDIS_URL": redis_server.url, "MODEL_DIR": str(models), "DATA_DIR": str(work / "data"),
           "DEVICE": args.device, "LOG_LEVEL": "WARNING", "REDIS_KEY_PREFIX": "bench",
           "ALLOWED_IMAGE_HOSTS": image_base.split("://", 1)[1], "MAX_NEW_TOKENS": str(args.max_new_tokens),
           "PORT": str(api_port), "HOST": "127.0.0.1", "WEBHOOK_SECRET": WEBHOOK_SECRET,
           # The whole pre-annotation is answered in the one /predict call, however slow the worker.
           "BATCH_PREDICT_DEADLINE": "3000", "INTERACTIVE_TIMEOUT": "600"}
    for name in ("LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY", "BASIC_AUTH_USER", "BASIC_AUTH_PASS"):
        env.pop(name, None)
    log = work / "processes.log"
    with open(log, "wb") as out:
        api = subprocess.Popen([sys.executable, "-m", "backend", "serve-api"], env=env, cwd=REPO, stdout=out,
                               stderr=subprocess.STDOUT)
    api_url = f"http://127.0.0.1:{api_port}"
    client = httpx.Client(base_url=api_url, timeout=3600)
    modes = {"one job at a time": 1, f"batched (BATCH_MAX_REGIONS={args.budget})": args.budget}
    runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in modes}
    try:
        import redis

        connection = redis.Redis.from_url(redis_server.url)
        wait_for(lambda: client.get("/health").status_code == 200, 120, "the API")
        round_id = 0
        for repeat in range(args.repeats):
            for mode, budget in modes.items():
                round_id += 1
                worker = start_worker(env, budget, log, connection, f"bench-{round_id}")
                try:
                    prelabel = measure_prelabel(client, connection, image_base, args, round_id)
                    drawing = measure_annotators(api_url, connection, image_base, args, round_id)
                finally:
                    stop(worker)
                runs[mode].append({"prelabel": prelabel, "annotators": drawing})
                print(f"[{repeat + 1}/{args.repeats}] {mode}: pre-annotation {prelabel['tasks_per_s']:.2f} tasks/s, "
                      f"annotators p50 {drawing['p50_ms']:.0f} ms", flush=True)
    finally:
        client.close()
        stop(api)
        redis_server.stop()
        images.shutdown()

    results = {"setup": {"model": str(args.model_dir), "device": args.device, "tasks": args.tasks,
                         "boxes": args.boxes, "annotators": args.annotators, "rounds": args.rounds,
                         "repeats": args.repeats, "max_new_tokens": args.max_new_tokens,
                         "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
                                    f"Python {platform.python_version()}"},
               "modes": {mode: summarize(mode_runs) for mode, mode_runs in runs.items()}}
    one, batched = (results["modes"][mode] for mode in modes)
    results["ratios"] = {
        "prelabel_tasks_per_s": round(batched["prelabel_tasks_per_s"] / one["prelabel_tasks_per_s"], 2),
        "annotators_p50": round(batched["annotators_p50_ms"] / one["annotators_p50_ms"], 2)}
    report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    return 0


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    prelabel_batches = [size for run in runs for size in run["prelabel"]["batches"]]
    drawing_batches = [size for run in runs for size in run["annotators"]["batches"]]
    return {
        "prelabel_tasks_per_s": round(statistics.median(r["prelabel"]["tasks_per_s"] for r in runs), 3),
        "annotators_p50_ms": round(statistics.median(r["annotators"]["p50_ms"] for r in runs), 1),
        "annotators_p90_ms": round(statistics.median(r["annotators"]["p90_ms"] for r in runs), 1),
        "prelabel_jobs_per_batch": {"p50": percentile(prelabel_batches, 50), "max": max(prelabel_batches)},
        "annotator_jobs_per_batch": {"p50": percentile(drawing_batches, 50), "max": max(drawing_batches)},
    }


def report(results: dict[str, Any]) -> None:
    setup = results["setup"]
    print(f"\n{setup['model']} on {setup['device']}, {setup['max_new_tokens']} new tokens; {setup['machine']}")
    print(f"(a) pre-annotation of {setup['tasks']} tasks x {setup['boxes']} boxes; (b) {setup['annotators']} "
          f"annotators x {setup['rounds']} boxes; medians of {setup['repeats']} repeats")
    print(f"  {'worker':<38} {'(a) tasks/s':>12} {'jobs/batch':>11} {'(b) p50 ms':>11} {'p90 ms':>8} "
          f"{'jobs/batch':>11}")
    for mode, row in results["modes"].items():
        print(f"  {mode:<38} {row['prelabel_tasks_per_s']:12.2f} {row['prelabel_jobs_per_batch']['p50']:>5} "
              f"(<={row['prelabel_jobs_per_batch']['max']:>2}) {row['annotators_p50_ms']:11.0f} "
              f"{row['annotators_p90_ms']:8.0f} {row['annotator_jobs_per_batch']['p50']:>5} "
              f"(<={row['annotator_jobs_per_batch']['max']:>2})")
    ratios = results["ratios"]
    print(f"  batched / one job: (a) {ratios['prelabel_tasks_per_s']:.2f}x tasks/s (target >= 2x), "
          f"(b) p50 {ratios['annotators_p50']:.2f}x (target <= 1x)")


if __name__ == "__main__":
    raise SystemExit(main())
