"""Fine-tune the current model version on annotators' corrections; promote the result only if it is not worse.

    python backend/finetune.py [--min-new N] [--steps N] [--device DEV]    (cron-able; settings from env)
    python -m backend finetune [same options]
    python -m backend finetune-worker      (serves the fine-tune queue: START_TRAINING, every N corrections)

One run, under a lock in Redis (`<prefix>:finetune:lock`, FINETUNE_LOCK_TTL, renewed while the run lives and
released when it ends, however it ends), so two fine-tunes never run at once:

1. **Data.** Corrected regions stored since the last finished run are the *new* ones; with fewer than
   `--min-new` (FINETUNE_MIN_NEW) the run does nothing. Only corrections Label Studio's API confirms are
   trained on (`backend.confirmation`; TRAIN_ON_UNCONFIRMED for a backend without its credentials). Tasks
   are split by a hash of their id: a fixed share (FINETUNE_EVAL_FRACTION) is held out for evaluation, the
   rest trains. The training set is the new
   regions plus a replay sample of earlier ones (FINETUNE_REPLAY_RATIO per new region) and, when
   FINETUNE_BASE_DATA names the first model's training set, records drawn from it (FINETUNE_BASE_RATIO per
   new record), against forgetting. Images are fetched once into DATA_DIR's content-addressed cache.
2. **Training.** The current version's engine (`model.engine`) fine-tunes itself with LoRA, on the parts it
   chooses (GPT4RoI: the language model plus the full region module and projector; Florence-2: the language
   model's attention); FINETUNE_STEPS steps but at least one pass over the data (a large backlog is never cut
   short), or FINETUNE_EPOCHS passes.
3. **Evaluation.** The candidate (reloaded from what was written) and the current version answer the
   held-out regions exactly as the worker would (same questions, same choice selection); each proposed
   field is compared with the annotator's final value (`backend.acceptance`). With FINETUNE_BASE_EVAL,
   both also answer that set of earlier concepts.
4. **Promotion rule.** The decision rests only on evaluation sets this run's own corrections cannot have
   written: the held-out corrections that were stored before the run's new ones, and FINETUNE_BASE_EVAL.
   The candidate becomes current when its accuracy on the first is at least the current version's minus
   FINETUNE_MAX_REGRESSION (default 0: "not worse") and on the second at least the current version's
   minus FINETUNE_MAX_FORGETTING. With neither (a first fine-tune without FINETUNE_BASE_EVAL) the candidate
   is kept, `awaiting review`, for `python -m backend promote VERSION`. The held-out part of the run's own
   corrections is measured and reported beside (`fresh_candidate`, `fresh_parent`).
5. **Versions.** The candidate is written as an immutable folder `MODEL_DIR/v<NNNN>-<UTC time>/`: the merged
   `save_pretrained` checkpoint, the LoRA adapter alone (`lora/`), and `version.json` (its engine and base
   model, inherited from the parent; parent, data counts, metrics of both, decision, time, training config
   and loss). A rejected candidate is deleted unless FINETUNE_KEEP_REJECTED. Workers load the new current
   version before their next job; `/setup` answers it at once. `python -m backend versions` lists versions
   and the last run, `python -m backend rollback VERSION` moves the pointer back.

Every run is recorded in the corrections store (`finetune_runs`): promoted, rejected, awaiting review,
failed (with the reason: bad data, unreachable images, an exception in training) or interrupted (killed:
detected by its stale heartbeat at the next run). A failed run leaves the current version serving and its corrections
count as new for the next run.

The module reads as one run, top to bottom (lock, data, training, evaluation, decision, publication), the
way a training script does; the pieces it calls live in `training_data`, `confirmation`, `describe`,
`acceptance`, `registry` and `runs`.

Hardware. Weights are trained in fp32 and, on CUDA, the training loop runs under bf16 autocast (standard
mixed precision); GPT4RoI-7B (over a billion parameters) also gets gradient checkpointing.
For the 7B that is 27 GB of fp32 weights plus small LoRA/region-module gradients and optimizer state and
checkpointed bf16 activations, which should fit one 80 GB GPU; the merged version is stored in the dtype
of its parent's checkpoint (fp16 for a converted 7B). What was actually run: the CPU path, with the demo and
tiny models (tests and `bench/hitl_bench.py`); the CUDA path, and so the 7B memory estimate, have not been
run by this project yet. Several GPUs: one fine-tune uses
one device (FINETUNE_DEVICE, e.g. `cuda:1` beside a worker on `cuda:0`). The training loop does not wrap the
model for data parallelism, so `torchrun`/`accelerate launch` would start independent, competing runs (the
lock lets only one proceed); spreading one fine-tune over several GPUs needs each engine's training loop
to be prepared with `accelerate.Accelerator` first, which has not been done.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import enum
import logging
import random
import shutil
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from redis.exceptions import LockError

from backend import registry
from backend.acceptance import AcceptanceStats, same_answer
from backend.annotations import CorrectedRegion
from backend.calibration import Observation, calibration_report, fit, observe
from backend.confirmation import Confirmation, confirm, usable
from backend.connect import follow_version
from backend.corrections import CorrectionsStore
from backend.describe import describe, load_engine, release_memory, resolve_device
from backend.jobs import (
    FINETUNE_FUNCTION,
    PointerBusy,
    QueueUnavailable,
    connect,
    lock_token,
    pointer_lock,
    restricted_job_class,
)
from backend.labelconfig import predicted_fields
from backend.proposal_stats import Recorded, proposal_outcomes
from backend.runs import FinetuneRuns, RunStatus
from backend.settings import Settings, load_for_command
from backend.training_data import LocalImage, local_images, split_held_out, training_examples

log = logging.getLogger("backend.finetune")

LOCK_KEY = "finetune:lock"


class FinetuneError(RuntimeError):
    """A fine-tune that cannot go on; the message says why (it is recorded as the run's reason)."""


class Verdict(enum.StrEnum):
    """How one call of `run_finetune` ended."""

    PROMOTED = "promoted"
    REJECTED = "rejected"
    AWAITING_REVIEW = "awaiting review"
    SKIPPED = "skipped"
    BUSY = "busy"
    FAILED = "failed"


@dataclass(frozen=True)
class FinetuneOptions:
    """What a run may override; everything else comes from the settings."""

    min_new: int | None = None
    steps: int | None = None
    device: str | None = None
    trigger: str = "manual"
    seed: int = 0


@dataclass
class FinetuneOutcome:
    """How a run ended, in words (`message`) and as a `Verdict`."""

    status: Verdict
    message: str
    run_id: int | None = None
    parent: str | None = None
    candidate: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """False only for a failed run."""
        return self.status is not Verdict.FAILED

    def to_json(self) -> dict[str, Any]:
        """Plain JSON (the RQ job's result)."""
        return {**dataclasses.asdict(self), "status": self.status.value}


# ---------------------------------------------------------------------- lock
def finetune_lock(connection: redis.Redis, settings: Settings) -> redis.lock.Lock:
    """The Redis lock that lets one fine-tune (or promotion, or rollback) run at a time: it expires after
    FINETUNE_LOCK_TTL unless its owner extends it, and only its owner can release it."""
    return connection.lock(f"{settings.key_prefix}:{LOCK_KEY}", timeout=settings.finetune_lock_ttl,
                           thread_local=False)


def lock_holder(connection: redis.Redis, settings: Settings) -> str | None:
    """Who holds the fine-tune lock now (host, pid and a random tag), if anyone."""
    value = connection.get(f"{settings.key_prefix}:{LOCK_KEY}")
    return value.decode() if isinstance(value, bytes) else value


class _Heartbeat:
    """Extends the lock and the run's heartbeat from a side thread while the run works."""

    def __init__(self, lock: redis.lock.Lock, runs: FinetuneRuns, run_id: int, ttl: int):
        self.lock = lock
        self.runs = runs
        self.run_id = run_id
        self.ttl = ttl
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="finetune-heartbeat", daemon=True)

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    def _beat(self) -> None:
        while not self._stop.wait(max(1.0, self.ttl / 3)):
            try:
                self.lock.extend(self.ttl, replace_ttl=True)
            except LockError:
                self.lost.set()
            except Exception:
                log.warning("fine-tune lock renewal failed", exc_info=True)
            try:
                self.runs.heartbeat(self.run_id)
            except Exception:
                log.warning("fine-tune heartbeat failed", exc_info=True)


# ---------------------------------------------------------------------- queue
def run_job(options: Mapping[str, Any]) -> dict[str, Any]:
    """RQ job function (`backend.jobs.FINETUNE_FUNCTION`): one run with settings from the environment. A
    failed run raises, so RQ lists the job as failed too; the reason is also in the run record."""
    settings = Settings.from_env()
    known = {f.name for f in dataclasses.fields(FinetuneOptions)}
    outcome = run_finetune(settings, FinetuneOptions(**{k: v for k, v in options.items() if k in known}))
    if not outcome.ok:
        raise FinetuneError(outcome.message)
    return outcome.to_json()


def run_finetune_worker(settings: Settings, *, burst: bool = False, name: str | None = None) -> None:
    """Serve the fine-tune queue. RQ's forking worker runs every job in a fresh child process, so the
    memory of one fine-tune is given back before the next; this process itself never imports torch."""
    from rq import Queue, Worker
    from rq.serializers import JSONSerializer

    connection = connect(settings.effective_redis_url, settings)
    queue = Queue(settings.finetune_queue_name, connection=connection, serializer=JSONSerializer)
    worker = Worker([queue], connection=connection, serializer=JSONSerializer, name=name,
                    job_class=restricted_job_class(FINETUNE_FUNCTION))
    log.info("fine-tune worker %s listening on %s", worker.name, queue.name)
    worker.work(burst=burst, logging_level=settings.log_level.upper())


# ---------------------------------------------------------------------- one run
def run_finetune(settings: Settings, options: FinetuneOptions | None = None,
                 connection: redis.Redis | None = None) -> FinetuneOutcome:
    """One fine-tune run (see the module docstring); never raises for a failed run, it reports it."""
    options = options or FinetuneOptions()
    store = CorrectionsStore.for_settings(settings)
    runs = FinetuneRuns.for_settings(settings)
    connection = connection or connect(settings.effective_redis_url, settings)
    lock = finetune_lock(connection, settings)
    if not lock.acquire(blocking=False, token=lock_token()):
        return FinetuneOutcome(Verdict.BUSY, f"another fine-tune is running ({lock.name} held by "
                               f"{lock_holder(connection, settings)}); nothing done")
    run_id: int | None = None
    parent: str | None = None
    seen: int | None = None
    try:
        # Holding the lock, any run still marked running is one that died without recording its end.
        runs.mark_abandoned(0)
        registry.discard_staging(settings)
        parent = registry.current_version(settings)
        watermark = runs.watermark()
        regions = store.regions()
        new = sum(r.seq > watermark for r in regions)
        min_new = options.min_new or settings.finetune_min_new
        if new < min_new:
            return FinetuneOutcome(Verdict.SKIPPED, f"{new} new corrected region(s), fewer than {min_new}; "
                                   "nothing done", parent=parent)
        seen = store.max_seq()
        run_id = runs.start(options.trigger, parent)
        log.info("fine-tune run %s from %s: %d new corrected regions (%s)", run_id, parent, new, options.trigger)
        with _Heartbeat(lock, runs, run_id, settings.finetune_lock_ttl) as beat:
            outcome = _run(settings, options, parent, regions, store.recorded_proposals(), watermark, beat,
                           connection)
        outcome.run_id = run_id
        runs.finish(run_id, RunStatus(outcome.status.value), outcome.message, candidate=outcome.candidate,
                    watermark=max((r.seq for r in regions), default=watermark), details=outcome.details)
        log.info("fine-tune run %s %s: %s", run_id, outcome.status, outcome.message)
        return outcome
    except (Exception, KeyboardInterrupt, SystemExit) as exc:
        interrupted = isinstance(exc, (KeyboardInterrupt, SystemExit))
        message = _failure_message(exc)
        if interrupted:
            log.error("fine-tune run %s interrupted: %s", run_id, message)
        else:
            log.error("fine-tune run %s failed: %s", run_id, message, exc_info=not isinstance(exc, FinetuneError))
        if run_id is not None:
            runs.finish(run_id, RunStatus.INTERRUPTED if interrupted else RunStatus.FAILED, message, watermark=seen)
        if interrupted:
            raise
        return FinetuneOutcome(Verdict.FAILED, message, run_id=run_id, parent=parent)
    finally:
        with contextlib.suppress(Exception):
            registry.discard_staging(settings)
        with contextlib.suppress(LockError, redis.RedisError):
            lock.release()


def _run(settings: Settings, options: FinetuneOptions, parent: str, regions: Sequence[CorrectedRegion],
         proposals: Recorded, watermark: int, beat: _Heartbeat, connection: redis.Redis) -> FinetuneOutcome:
    started = time.perf_counter()
    parent_path = registry.checkpoint_path(settings, parent)
    confirmations = confirm(settings, regions)
    trusted = usable(settings, regions, confirmations)
    kept = {id(r) for r in trusted}
    left_out = Counter(str(confirmations.get(r.annotation_id, Confirmation.UNCHECKED)) for r in regions
                       if id(r) not in kept)
    if left_out:
        log.warning("%d corrected region(s) left out of the fine-tune, not confirmed by Label Studio: %s%s",
                    sum(left_out.values()), dict(left_out),
                    "" if settings.label_studio_api_key else " (set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY, or "
                    "TRAIN_ON_UNCONFIRMED)")
    train_side, held_out = split_held_out(trusted, settings.finetune_eval_fraction)
    new_train = [r for r in train_side if r.seq > watermark]
    if not new_train:
        raise FinetuneError(f"none of the {sum(r.seq > watermark for r in regions)} new corrected regions can be "
                            f"trained on: {_why_none(left_out, held_out, watermark)}")
    earlier = [r for r in train_side if r.seq <= watermark]
    rng = random.Random(f"{options.seed}:{watermark}:{len(regions)}")
    replay = rng.sample(earlier, min(len(earlier), round(settings.finetune_replay_ratio * len(new_train))))
    # The gate decides on corrections held out before this run, which its own corrections cannot write;
    # the held-out part of the new ones is measured and reported.
    evaluable = [r for r in held_out if r.plan is not None]
    frozen = [r for r in evaluable if r.seq <= watermark][-settings.finetune_eval_max:]
    fresh = [r for r in evaluable if r.seq > watermark][-settings.finetune_eval_max:]

    images, failed = local_images(settings, [(r.image, r.task_id) for r in [*new_train, *replay, *frozen, *fresh]])
    for reason in list(failed.values())[:5]:
        log.warning("image left out of the fine-tune: %s", reason)
    new_records = training_examples(new_train, images)
    if not new_records:
        reasons = "; ".join(list(failed.values())[:3]) or "the new corrections have no caption, choice or label"
        raise FinetuneError(f"no usable training record among {len(new_train)} new corrected regions: {reasons}")
    records = new_records + training_examples(replay, images)
    base = _base_records(settings, round(settings.finetune_base_ratio * len(new_records)), rng)
    frozen = [r for r in frozen if r.image in images]
    fresh = [r for r in fresh if r.image in images]
    data = {"new_regions": len(new_train), "replay_regions": len(replay), "base_records": len(base),
            "train_records": len(records) + len(base), "eval_regions": len(frozen), "fresh_eval_regions": len(fresh),
            "eval_tasks": len({r.task_id for r in frozen}), "images_unavailable": len(failed),
            "unconfirmed_regions": dict(left_out), "watermark": max((r.seq for r in regions), default=watermark)}
    log.info("fine-tune data: %s", data)

    from model.engine import FinetuneConfig

    try:
        device = resolve_device(options.device or settings.finetune_device)
    except RuntimeError as exc:
        raise FinetuneError(f"FINETUNE_DEVICE: {exc}") from None
    # fp32 weights (mixed precision on CUDA); the engine stores the result in its parent's dtype.
    engine = load_engine(parent_path, device, "float32", options=settings.engine_option_values)
    lineage = _lineage(settings, parent, engine)
    config = FinetuneConfig(
        learning_rate=settings.finetune_learning_rate, epochs=settings.finetune_epochs,
        max_steps=options.steps or settings.finetune_steps or None, lora_rank=settings.finetune_lora_rank,
        seed=options.seed, region_lr_scale=settings.finetune_region_lr_scale)
    result = engine.finetune(records, config, records=base)
    log.info("trained %s %d steps in %.1f s, loss %.3f -> %.3f", lineage["engine"], result.steps, result.seconds,
             result.first_loss, result.last_loss)
    name = registry.next_version_name(settings, engine=lineage["engine"])
    staging = registry.staging_dir(settings, name)
    engine.save_pretrained(staging)
    del engine
    release_memory()

    metrics: dict[str, Any] = {}
    observed: list[tuple[list[Observation], bool]] = []
    for key, held in (("", frozen), ("fresh_", fresh)):
        if held:
            candidate = _evaluate(settings, staging, held, images, device)
            metrics[f"{key}candidate"] = candidate.stats.to_json()
            metrics[f"{key}parent"] = _evaluate(settings, parent_path, held, images, device).stats.to_json()
            observed += candidate.regions
    metrics.update(_base_eval(settings, staging, parent_path, device))
    # The candidate's confidences, calibrated on what annotators kept of the held-out corrections; the
    # workers read them from the version folder. The proposer is not trained: every confirmed annotation of
    # a task it proposed for tells how far its scores can be trusted.
    found = [Observation("proposal", score, matched) for score, matched in proposal_outcomes(trusted, proposals)]
    calibration = fit([*(o for observations, _ in observed for o in observations), *found])
    calibration.save(staging)
    verdict, reason = decide(settings, metrics)
    if beat.lost.is_set():
        raise FinetuneError("the fine-tune lock expired during the run (FINETUNE_LOCK_TTL too short, or Redis "
                            "was unreachable); the candidate is discarded so that two runs never publish")
    metadata = {
        **lineage,
        "parent": parent,
        "promoted": verdict is Verdict.PROMOTED,
        "verdict": verdict.value,
        "decision": reason,
        "trigger": options.trigger,
        "data": data,
        "metrics": metrics,
        "calibration": calibration_report(calibration, observed, cross_fit=True),
        "training": {**result.settings, "steps": result.steps, "seconds": round(result.seconds, 2),
                     "first_loss": result.first_loss, "last_loss": result.last_loss, "device": str(device)},
        "wall_seconds": round(time.perf_counter() - started, 2),
    }
    details = {"data": data, "metrics": metrics, "wall_seconds": metadata["wall_seconds"],
               "train_seconds": round(result.seconds, 2)}
    if verdict is not Verdict.REJECTED or settings.finetune_keep_rejected:
        registry.publish(settings, staging, name, metadata)
    if verdict is Verdict.PROMOTED:
        try:
            # Only over the version this run started from: a rollback meanwhile wins. Under the pointer lock, so
            # that a person's move and this one, each with its Label Studio update, take turns.
            with pointer_lock(connection, settings, f"the promotion of {name}"):
                registry.set_current(settings, name, reason=f"fine-tune from {parent}: {reason}", expected=parent)
                follow_version(settings, name)
        except (registry.PointerMoved, PointerBusy, QueueUnavailable) as exc:
            return FinetuneOutcome(Verdict.AWAITING_REVIEW, f"{name} kept, not made current: {exc}",
                                   parent=parent, candidate=name, details=details)
        return FinetuneOutcome(verdict, f"{name} promoted: {reason}", parent=parent, candidate=name,
                               details=details)
    if verdict is Verdict.AWAITING_REVIEW:
        return FinetuneOutcome(verdict, f"{name} kept for review ({reason}); `python -m backend promote {name}` "
                               "makes it current", parent=parent, candidate=name, details=details)
    shutil.rmtree(staging, ignore_errors=True)
    kept = " (kept, not current)" if settings.finetune_keep_rejected else ""
    return FinetuneOutcome(verdict, f"{name} not promoted{kept}: {reason}", parent=parent, candidate=name,
                           details=details)


def _why_none(left_out: Mapping[str, int], held_out: Sequence[CorrectedRegion], watermark: int) -> str:
    reasons = []
    if left_out:
        reasons.append(f"not confirmed by Label Studio: {dict(left_out)}")
    held = sum(r.seq > watermark for r in held_out)
    if held:
        reasons.append(f"{held} belong to held-out tasks")
    return "; ".join(reasons) or "nothing new"


def decide(settings: Settings, metrics: Mapping[str, Any]) -> tuple[Verdict, str]:
    """The promotion rule (see the module docstring): promoted, rejected, or awaiting review when no trusted
    evaluation set exists; with the reason in words."""
    reasons = []
    verdict = Verdict.PROMOTED
    candidate, parent = (metrics.get(k, {}).get("field_accuracy_overall") for k in ("candidate", "parent"))
    if candidate is not None and parent is not None:
        if candidate < parent - settings.finetune_max_regression:
            verdict = Verdict.REJECTED
        reasons.append(f"held-out field accuracy {candidate:.3f} vs {parent:.3f} "
                       f"(allowed drop {settings.finetune_max_regression:g})")
    if "base_candidate" in metrics:
        if metrics["base_candidate"] < metrics["base_parent"] - settings.finetune_max_forgetting:
            verdict = Verdict.REJECTED
        reasons.append(f"earlier concepts {metrics['base_candidate']:.3f} vs {metrics['base_parent']:.3f} "
                       f"(allowed drop {settings.finetune_max_forgetting:g})")
    if not reasons:
        fresh = metrics.get("fresh_candidate", {}).get("field_accuracy_overall")
        seen = "" if fresh is None else (f"; on this run's own held-out corrections {fresh:.3f} vs "
                                         f"{metrics['fresh_parent']['field_accuracy_overall']:.3f}")
        return Verdict.AWAITING_REVIEW, ("no evaluation set this run's corrections could not have written "
                                         "(FINETUNE_BASE_EVAL, or corrections held out before it)" + seen)
    return verdict, "; ".join(reasons)


# ---------------------------------------------------------------------- model side
def _lineage(settings: Settings, parent: str, engine: Any) -> dict[str, str]:
    """The engine and base model a new version inherits from its parent (a parent registered without them,
    by hand or by an earlier release, is its own base)."""
    known = registry.read_metadata(settings, parent)
    return {"engine": str(known.get("engine") or engine.name), "base_model": str(known.get("base_model") or parent)}


@dataclass
class _Evaluation:
    """A checkpoint's answers on held-out regions: acceptance figures, and per region its fields' raw
    confidences with what the annotator kept (`backend.calibration.observe`) and whether all were kept."""

    stats: AcceptanceStats = field(default_factory=AcceptanceStats)
    regions: list[tuple[list[Observation], bool]] = field(default_factory=list)


def _evaluate(settings: Settings, checkpoint: Path, regions: Sequence[CorrectedRegion],
              images: Mapping[str, LocalImage], device: Any) -> _Evaluation:
    """Ask a checkpoint about held-out regions as the worker would and compare with the final values."""
    from PIL import Image

    engine = load_engine(checkpoint, device, options=settings.engine_option_values)
    evaluation = _Evaluation()
    groups: dict[tuple[str, Any], list[CorrectedRegion]] = {}
    for region in regions:
        groups.setdefault((region.image, region.plan), []).append(region)
    for (reference, plan), group in groups.items():
        if plan is None:
            continue
        with Image.open(images[reference][0]) as opened:
            image = opened.convert("RGB")
        answers = describe(engine, image, plan, [r.region for r in group], False, settings.max_new_tokens)
        for region, answer in zip(group, answers, strict=True):
            kept = evaluation.stats.add(predicted_fields(plan, region.region, answer, keep_drawn_label=False),
                                        region.final)
            evaluation.regions.append((observe(kept, answer["confidence"]), bool(kept) and all(kept.values())))
    del engine
    release_memory()
    return evaluation


def _base_eval(settings: Settings, candidate: Path, parent: Path, device: Any) -> dict[str, Any]:
    if not settings.finetune_base_eval:
        return {}
    from model.data_format import read_jsonl
    from model.evaluate import predict

    samples = read_jsonl(settings.finetune_base_eval)
    samples = random.Random(0).sample(samples, min(len(samples), settings.finetune_eval_max))
    scores = {}
    for key, path in (("base_candidate", candidate), ("base_parent", parent)):
        answers = predict(load_engine(path, device, options=settings.engine_option_values), samples,
                          progress=False)
        truth = [s.conversations[1]["value"] for s in samples]
        scores[key] = sum(same_answer(a, t) for a, t in zip(answers, truth, strict=True)) / len(samples)
        release_memory()
    scores["base_records"] = len(samples)
    return scores


def _base_records(settings: Settings, count: int, rng: random.Random) -> list[Any]:
    if not settings.finetune_base_data or count <= 0:
        return []
    from model.data_format import read_jsonl

    samples = read_jsonl(settings.finetune_base_data)
    return rng.sample(samples, min(count, len(samples)))


def _failure_message(exc: BaseException) -> str:
    if isinstance(exc, FinetuneError):
        return str(exc)
    if isinstance(exc, (KeyboardInterrupt, SystemExit)):
        return "interrupted by a signal before it finished; the current version keeps serving"
    return f"{type(exc).__name__}: {exc}"


# ---------------------------------------------------------------------- command line
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `finetune.py` (shared with `python -m backend finetune`)."""
    parser.add_argument("--min-new", type=int, default=None,
                        help="fewest new corrected regions needed to train (default: FINETUNE_MIN_NEW)")
    parser.add_argument("--steps", type=int, default=None,
                        help="optimizer steps, at least one pass (default: FINETUNE_STEPS, or FINETUNE_EPOCHS passes)")
    parser.add_argument("--device", default=None, help="torch device (default: FINETUNE_DEVICE)")
    parser.add_argument("--trigger", default="manual", help="what started the run, recorded with it")
    parser.add_argument("--seed", type=int, default=0, help="seed of the replay sample and of training")


def run_from_args(settings: Settings, args: argparse.Namespace) -> int:
    """Run once from parsed arguments; prints the outcome; exit code 0 unless the run failed."""
    for name in ("min_new", "steps"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            print(f"--{name.replace('_', '-')} must be positive, got {value}", file=sys.stderr)
            return 2
    options = FinetuneOptions(min_new=args.min_new, steps=args.steps, device=args.device, trigger=args.trigger,
                              seed=args.seed)
    outcome = run_finetune(settings, options)
    print(f"{outcome.status}: {outcome.message}")
    return 0 if outcome.ok else 1


def main(argv: list[str] | None = None) -> int:
    """`python backend/finetune.py`: one run with settings from the environment."""
    parser = argparse.ArgumentParser(
        prog="finetune.py", description=__doc__.splitlines()[0],
        epilog="Settings (MODEL_DIR, DATA_DIR, REDIS_URL, FINETUNE_*) come from the environment; "
               "`python -m backend settings` lists them.")
    add_arguments(parser)
    args = parser.parse_args(argv)
    settings = load_for_command()
    try:
        with _terminate_as_interrupt():
            return run_from_args(settings, args)
    except KeyboardInterrupt:
        print("interrupted: the run is recorded as interrupted and the current version keeps serving",
              file=sys.stderr)
        return 130


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    # SIGTERM (cron's timeout, `docker stop`) unwinds like Ctrl-C: the run is recorded and the lock released.
    def handler(signum: int, frame: Any) -> None:
        if _in_finalizer(frame):
            # Python prints and drops an exception raised inside `__del__` (a garbage collection can run one at
            # any moment), and the run would go on: raise it a moment later, outside, from SIGALRM.
            signal.setitimer(signal.ITIMER_REAL, 0.05)
            return
        raise KeyboardInterrupt(f"signal {signal.SIGTERM.value}")

    previous = signal.signal(signal.SIGTERM, handler)
    previous_alarm = signal.signal(signal.SIGALRM, handler)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous_alarm)
        signal.signal(signal.SIGTERM, previous)


def _in_finalizer(frame: Any) -> bool:
    """Whether the interrupted code runs inside an object's `__del__`."""
    while frame is not None:
        if frame.f_code.co_name == "__del__":
            return True
        frame = frame.f_back
    return False


if __name__ == "__main__":
    sys.exit(main())
