"""Annotators' corrections: Label Studio webhooks turned into region samples, kept in SQLite (WAL mode).

`record_event(settings, event)` is what `/webhook` calls (through `backend.webhooks.store_event`); it
returns once the event and its samples are committed, in milliseconds, and never trains:

- `ANNOTATION_CREATED` / `ANNOTATION_UPDATED`: the annotation's result is grouped by region id into one
  sample per rectangle: image reference (the task's data URL), the rectangle (Label Studio's percent
  geometry, its normalized xyxy box and the original image size), the final caption, choices and label,
  and what the model had proposed for that region (see below) with its model version. The same annotation
  sent again replaces its samples. Cancelled (skipped) annotations and empty results store no sample
  (and remove the samples of an earlier version of that annotation).
- `ANNOTATIONS_DELETED` (ids only): the samples of those annotations are removed.
- `START_TRAINING`, and with FINETUNE_EVERY_N > 0 every N new corrected regions: a fine-tune job is queued
  (`backend.finetune.request_finetune`); a Redis outage there is logged, the event is still stored.
- every event, whatever its action, is also kept verbatim in the `events` table.

What the model proposed comes from the annotation's `prediction` when Label Studio filled it with a
prediction result, and otherwise from the `predictions` table, which the worker fills as it predicts
(`record_job_output`, or `record_prediction` for one region), keyed by task id and region id: Label
Studio keeps a prediction's region ids when an annotator accepts and edits it.

Writes are serialized inside each process by one writer thread per store, which owns the write connection
and commits whatever is queued in one transaction (group commit): with 20 webhooks arriving together there
is one fsync instead of 20, and no thread ever sleeps in SQLite's busy handler waiting for a sibling. Each
caller still returns only after its own change is committed. Other processes (workers, fine-tunes) writing
the same file take turns with this one through SQLite's lock and busy timeout.

The schema is plain SQL (six small tables, no SQLite-only types), so another database could replace this
file.
`DATA_DIR` must be shared by the API and the workers (one machine or one volume); SQLite in WAL mode
lets several processes read and write it, not a network file system.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from backend.labelconfig import (
    ConfigError,
    FillPlan,
    Region,
    TaskError,
    regions_from_context,
    select_choices,
    wants_label,
)
from backend.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")
# A write waiting for the writer thread: what to run on its connection, and where its caller waits.
_Write = tuple[Callable[[sqlite3.Connection], Any], Future[Any]]

DB_FILE = "corrections.sqlite3"
IMAGE_CACHE_DIR = "image-cache"
ANNOTATION_ACTIONS = frozenset({"ANNOTATION_CREATED", "ANNOTATION_UPDATED"})
RUN_STATES = ("running", "promoted", "rejected", "failed", "interrupted")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    action TEXT NOT NULL,
    received_at REAL NOT NULL,
    annotation_id INTEGER,
    body TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS annotations (
    annotation_id INTEGER PRIMARY KEY,
    task_id TEXT,
    project_id TEXT,
    image TEXT,
    updated_at TEXT,
    ground_truth INTEGER NOT NULL,
    plan TEXT,
    event_seq INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS samples (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    annotation_id INTEGER NOT NULL,
    task_id TEXT,
    region_id TEXT NOT NULL,
    image TEXT NOT NULL,
    region TEXT NOT NULL,
    box TEXT NOT NULL,
    caption TEXT,
    choices TEXT NOT NULL,
    label TEXT,
    predicted TEXT,
    predicted_version TEXT,
    created_at REAL NOT NULL,
    UNIQUE (annotation_id, region_id)
);
CREATE INDEX IF NOT EXISTS samples_by_task ON samples (task_id);
CREATE INDEX IF NOT EXISTS samples_by_version ON samples (predicted_version);
CREATE TABLE IF NOT EXISTS predictions (
    task_id TEXT NOT NULL,
    region_id TEXT NOT NULL,
    model_version TEXT NOT NULL,
    fields TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (task_id, region_id, model_version)
);
CREATE TABLE IF NOT EXISTS images (
    reference TEXT PRIMARY KEY,
    sha256 TEXT NOT NULL,
    path TEXT NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    fetched_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS finetune_runs (
    run_id INTEGER PRIMARY KEY AUTOINCREMENT,
    started_at REAL NOT NULL,
    finished_at REAL,
    heartbeat_at REAL,
    status TEXT NOT NULL,
    trigger_name TEXT,
    parent TEXT,
    candidate TEXT,
    watermark INTEGER,
    message TEXT,
    details TEXT
);
"""


class CorrectionsError(ValueError):
    """An event or a stored sample that cannot be used; the message says which and why."""


# ---------------------------------------------------------------------- records
@dataclass(frozen=True)
class CorrectedRegion:
    """One region of a submitted annotation: where it is, what the annotator kept, what the model said.

    `caption`, `choices` (control name → chosen values) and `label` are the annotation's final values;
    `predicted` holds the same keys for what the model proposed (None when no prediction is known), a key
    being absent (or None) where the model proposed nothing for that field.
    """

    seq: int
    annotation_id: int
    task_id: str | None
    region_id: str
    image: str
    region: Region
    box: tuple[float, float, float, float]
    caption: str | None
    choices: dict[str, list[str]]
    label: str | None
    predicted: dict[str, Any] | None
    predicted_version: str | None
    created_at: float
    plan: FillPlan | None = None
    ground_truth: bool = False

    @property
    def final(self) -> dict[str, Any]:
        """The annotator's values in the shape of `predicted`."""
        return {"caption": self.caption, "choices": self.choices, "label": self.label}


@dataclass(frozen=True)
class FinetuneRun:
    """One fine-tune attempt, as recorded in the store."""

    run_id: int
    status: str
    started_at: float
    finished_at: float | None
    heartbeat_at: float | None
    trigger: str | None
    parent: str | None
    candidate: str | None
    watermark: int | None
    message: str | None
    details: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        """One line for the terminal."""
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(self.finished_at or self.started_at))
        parts = [f"run {self.run_id} {self.status} at {when} UTC", f"from {self.parent}"]
        if self.candidate:
            parts.append(f"candidate {self.candidate}")
        if self.message:
            parts.append(self.message)
        return "; ".join(parts)


# ---------------------------------------------------------------------- parsing
def parse_annotation_regions(result: Sequence[Any], plan: FillPlan | None) -> dict[str, dict[str, Any]]:
    """Group a Label Studio result (annotation or prediction) by region id.

    Returns region id → `{"region": Region | None, "caption", "choices", "label"}`. Rectangles are read
    with `backend.labelconfig`; per-region TextArea and Choices items are matched to them by id. With a
    fill plan only its controls count; without one every textarea and choices item does.
    """
    if not isinstance(result, Sequence) or isinstance(result, (str, bytes)):
        raise CorrectionsError("an annotation's 'result' must be a list of result items")
    rectangles = regions_from_context(plan, {"result": list(result)}) if plan else _any_rectangles(result)
    fields: dict[str, dict[str, Any]] = {}
    for region in rectangles:
        label = region.labels[0] if region.labels else None
        fields[region.id] = {"region": _plain(region), "caption": None, "choices": {}, "label": label}
    captions = set(plan.captions) if plan else None
    choice_controls = {c.name for c in plan.choices} if plan else None
    for item in result:
        if not isinstance(item, Mapping) or item.get("id") is None:
            continue
        entry = fields.setdefault(str(item["id"]), {"region": None, "caption": None, "choices": {}, "label": None})
        value = item.get("value") if isinstance(item.get("value"), Mapping) else {}
        kind = str(item.get("type", "")).lower()
        name = str(item.get("from_name", ""))
        if kind == "textarea" and (captions is None or name in captions):
            texts = [str(t).strip() for t in value.get("text") or [] if str(t).strip()]
            if texts and entry["caption"] is None:
                entry["caption"] = " ".join(texts)
        elif kind == "choices" and (choice_controls is None or name in choice_controls):
            picked = [str(c) for c in value.get("choices") or []]
            if picked:
                entry["choices"][name] = picked
    return fields


def _any_rectangles(result: Sequence[Any]) -> list[Region]:
    # Without a labeling config, any rectangle of any image is a region.
    names = {str(item.get("to_name")) for item in result if isinstance(item, Mapping)
             and str(item.get("type", "")).lower() in ("rectangle", "rectanglelabels")}
    regions: list[Region] = []
    for name in sorted(names):
        plan = FillPlan(image=name, image_key=None, image_constant=None, rectangle="", rectangle_type="rectangle",
                        labels=(), captions=(), choices=())
        regions += regions_from_context(plan, {"result": [i for i in result if isinstance(i, Mapping)
                                                          and str(i.get("to_name")) == name]})
    return regions


def _plain(region: Region) -> Region:
    return dataclasses.replace(region, drawn=None)


def predicted_fields(plan: FillPlan, region: Region, answer: Mapping[str, Any],
                     keep_drawn_label: bool = True) -> dict[str, Any]:
    """What a worker answer proposes for one region, chosen exactly as the prediction sent to Label Studio
    chooses it (`select_choices`): caption, choices per control, label (None when not proposed)."""
    caption = answer.get("caption") if plan.captions else None
    choices: dict[str, list[str]] = {}
    distributions = answer.get("choices") or {}
    for control in plan.choices:
        distribution = distributions.get(control.name)
        if distribution:
            choices[control.name] = select_choices(distribution, control.multiple)
    label = None
    label_distribution = answer.get("label")
    if label_distribution and wants_label(plan, region, keep_drawn_label):
        label = select_choices(label_distribution, multiple=False)[0]
    return {"caption": caption, "choices": choices, "label": label}


# ---------------------------------------------------------------------- the store
class CorrectionsStore:
    """The SQLite file `DATA_DIR/corrections.sqlite3`: WAL, fsync on commit; a read connection per thread and
    one writer thread (see the module docstring)."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._writes: queue.SimpleQueue[_Write | None] | None = None
        self._writer_pid = 0
        self._writer_lock = threading.Lock()
        # executescript manages its own transaction; CREATE … IF NOT EXISTS is safe from many processes.
        self._connection().executescript(_SCHEMA)

    @classmethod
    def for_settings(cls, settings: Settings) -> CorrectionsStore:
        """The store of `settings.data_dir`, one instance per file and process."""
        path = (Path(settings.data_dir) / DB_FILE).resolve()
        with _stores_lock:
            store = _stores.get(path)
            if store is None:
                store = _stores[path] = cls(path)
            return store

    # ------------------------------------------------------------------ connections
    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=True)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit is on disk before the webhook is answered, even if the machine loses power.
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA busy_timeout=30000")
        return db

    def _connection(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = self._local.db = self._open()
        return db

    def _write(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run `work` in the writer thread inside a transaction; returns its result once that is committed,
        or raises what `work` raised (its changes undone, the rest of its group committed)."""
        done: Future[T] = Future()
        with self._writer_lock:
            # A forked child inherits the queue but not the thread that serves it.
            if self._writes is None or self._writer_pid != os.getpid():
                self._writes, self._writer_pid = queue.SimpleQueue(), os.getpid()
                threading.Thread(target=self._write_loop, args=(self._writes,), daemon=True,
                                 name=f"corrections-writer:{self.path.name}").start()
            # Put under the lock, so nothing lands in a queue after close() has told its writer to stop.
            self._writes.put((work, done))
        return done.result()

    def _write_loop(self, writes: queue.SimpleQueue[_Write | None]) -> None:
        """The writer thread: everything queued while it commits goes into its next transaction."""
        db: sqlite3.Connection | None = None
        while True:
            batch = [writes.get()]
            while not writes.empty():
                batch.append(writes.get_nowait())
            group = [item for item in batch if item is not None]
            if group:
                try:
                    if db is None:
                        db = self._open()
                    outcomes = _commit_group(db, [work for work, _ in group])
                except Exception as exc:  # the transaction itself failed: nothing of the group is stored
                    outcomes = [(None, exc)] * len(group)
                for (_, done), (result, error) in zip(group, outcomes, strict=True):
                    if error is None:
                        done.set_result(result)
                    else:
                        done.set_exception(error)
            if len(group) < len(batch):  # close() was called
                if db is not None:
                    db.close()
                return

    def close(self) -> None:
        """Close this thread's connection and stop the writer (the next write starts a new one)."""
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None
        with self._writer_lock:
            if self._writes is not None and self._writer_pid == os.getpid():
                self._writes.put(None)
            self._writes = None

    # ------------------------------------------------------------------ events
    def record_event(self, event: Mapping[str, Any]) -> dict[str, Any]:
        """Store one webhook event and what it implies, in one transaction; returns a short summary."""
        action = str(event.get("action"))
        body = json.dumps(_redacted(event), ensure_ascii=False, separators=(",", ":"), default=str)
        annotation = event.get("annotation") if isinstance(event.get("annotation"), Mapping) else None
        annotation_id = _int_or_none(annotation.get("id")) if annotation else None

        def store(db: sqlite3.Connection) -> dict[str, Any]:
            summary: dict[str, Any] = {"action": action, "samples": 0}
            cursor = db.execute("INSERT INTO events (action, received_at, annotation_id, body) VALUES (?, ?, ?, ?)",
                                (action, time.time(), annotation_id, body))
            event_seq = int(cursor.lastrowid or 0)
            if action in ANNOTATION_ACTIONS and annotation is not None:
                summary["samples"] = self._store_annotation(db, event, annotation, event_seq)
            elif action == "ANNOTATIONS_CREATED":
                for item in event.get("annotations") or []:
                    if isinstance(item, Mapping) and "result" in item:
                        summary["samples"] += self._store_annotation(db, event, item, event_seq)
            elif action == "ANNOTATIONS_DELETED":
                ids = [_int_or_none(item.get("id")) for item in event.get("annotations") or []
                       if isinstance(item, Mapping)]
                summary["deleted"] = self._delete(db, [i for i in ids if i is not None])
            return summary

        return self._write(store)

    def _store_annotation(self, db: sqlite3.Connection, event: Mapping[str, Any], annotation: Mapping[str, Any],
                          event_seq: int) -> int:
        annotation_id = _int_or_none(annotation.get("id"))
        if annotation_id is None:
            raise CorrectionsError("the annotation has no integer 'id'")
        self._delete(db, [annotation_id])
        result = annotation.get("result") or []
        if annotation.get("was_cancelled") or not result:
            return 0
        project = event.get("project") if isinstance(event.get("project"), Mapping) else {}
        task = event.get("task") if isinstance(event.get("task"), Mapping) else {}
        task_id = _text_or_none(task.get("id") if task else annotation.get("task"))
        plan = _plan(project.get("label_config"))
        image = _image_reference(plan, task)
        if image is None:
            log.warning("annotation %s of task %s: no image reference in the task data; not stored",
                        annotation_id, task_id)
            return 0
        regions = parse_annotation_regions(result, plan)
        proposed = self._proposed(db, annotation, task_id, plan)
        rows = []
        now = time.time()
        for region_id, entry in regions.items():
            region = entry["region"]
            if region is None:
                continue
            predicted, version = proposed.get(region_id, (None, None))
            rows.append((annotation_id, task_id, region_id, image, json.dumps(region.to_json()),
                         json.dumps(list(region.box())), entry["caption"], json.dumps(entry["choices"]),
                         entry["label"], None if predicted is None else json.dumps(predicted), version, now))
        if not rows:
            return 0
        db.execute(
            "INSERT INTO annotations (annotation_id, task_id, project_id, image, updated_at, ground_truth, plan, "
            "event_seq) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (annotation_id, task_id, _text_or_none(project.get("id") or annotation.get("project")), image,
             _text_or_none(annotation.get("updated_at")), int(bool(annotation.get("ground_truth"))),
             None if plan is None else json.dumps(plan.to_json()), event_seq))
        db.executemany(
            "INSERT INTO samples (annotation_id, task_id, region_id, image, region, box, caption, choices, label, "
            "predicted, predicted_version, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
        return len(rows)

    def _proposed(self, db: sqlite3.Connection, annotation: Mapping[str, Any], task_id: str | None,
                  plan: FillPlan | None) -> dict[str, tuple[dict[str, Any], str | None]]:
        """Region id → (fields the model proposed, its version) for the annotation's task."""
        shown = annotation.get("prediction")
        if isinstance(shown, Mapping) and isinstance(shown.get("result"), list) and shown["result"]:
            version = _text_or_none(shown.get("model_version"))
            parsed = parse_annotation_regions(shown["result"], plan)
            return {rid: ({k: e[k] for k in ("caption", "choices", "label")}, version) for rid, e in parsed.items()}
        if task_id is None:
            return {}
        rows = db.execute("SELECT region_id, model_version, fields FROM predictions WHERE task_id = ? "
                          "ORDER BY created_at", (task_id,)).fetchall()
        # The newest prediction of each region is the one the annotator saw.
        return {row["region_id"]: (json.loads(row["fields"]), row["model_version"]) for row in rows}

    def _delete(self, db: sqlite3.Connection, annotation_ids: Sequence[int]) -> int:
        removed = 0
        for annotation_id in annotation_ids:
            removed += db.execute("DELETE FROM samples WHERE annotation_id = ?", (annotation_id,)).rowcount
            db.execute("DELETE FROM annotations WHERE annotation_id = ?", (annotation_id,))
        return removed

    # ------------------------------------------------------------------ predictions
    def record_predictions(self, task_id: Any, model_version: str,
                           fields_by_region: Mapping[str, Mapping[str, Any]]) -> int:
        """Remember what `model_version` proposed for regions of a task (replacing an earlier record)."""
        if task_id is None or not fields_by_region:
            return 0
        now = time.time()
        rows = [(str(task_id), str(region_id), model_version, json.dumps(_check_fields(fields)), now)
                for region_id, fields in fields_by_region.items()]
        self._write(lambda db: db.executemany("INSERT OR REPLACE INTO predictions (task_id, region_id, model_version, "
                                              "fields, created_at) VALUES (?, ?, ?, ?, ?)", rows))
        return len(rows)

    # ------------------------------------------------------------------ reading
    def regions(self, since_seq: int = 0, model_version: str | None = None) -> list[CorrectedRegion]:
        """Stored regions with `seq > since_seq` (optionally only those predicted by `model_version`),
        oldest first."""
        query = ("SELECT s.*, a.plan AS plan, a.ground_truth AS ground_truth FROM samples s "
                 "LEFT JOIN annotations a ON a.annotation_id = s.annotation_id WHERE s.seq > ?")
        params: list[Any] = [since_seq]
        if model_version is not None:
            query += " AND s.predicted_version = ?"
            params.append(model_version)
        rows = self._connection().execute(query + " ORDER BY s.seq", params).fetchall()
        plans: dict[str, FillPlan] = {}
        return [_region_from_row(row, plans) for row in rows]

    def count_regions(self, since_seq: int = 0) -> int:
        """How many stored regions have `seq > since_seq`."""
        row = self._connection().execute("SELECT COUNT(*) FROM samples WHERE seq > ?", (since_seq,)).fetchone()
        return int(row[0])

    def max_seq(self) -> int:
        """The newest region's sequence number (0 when empty)."""
        row = self._connection().execute("SELECT COALESCE(MAX(seq), 0) FROM samples").fetchone()
        return int(row[0])

    def events(self, action: str | None = None) -> list[dict[str, Any]]:
        """Stored webhook events (optionally of one action), oldest first."""
        query, params = "SELECT body FROM events", ()
        if action is not None:
            query, params = query + " WHERE action = ?", (action,)
        return [json.loads(row[0]) for row in self._connection().execute(query + " ORDER BY seq", params)]

    def annotation_ids(self) -> set[int]:
        """Ids of the annotations that have stored regions."""
        return {int(row[0]) for row in self._connection().execute("SELECT annotation_id FROM annotations")}

    # ------------------------------------------------------------------ images
    def cached_image(self, reference: str) -> tuple[Path, int, int] | None:
        """The local copy of an image reference: (path, width, height), if fetched before and still there."""
        row = self._connection().execute("SELECT path, width, height FROM images WHERE reference = ?",
                                         (reference,)).fetchone()
        if row is None or not Path(row["path"]).is_file():
            return None
        return Path(row["path"]), int(row["width"]), int(row["height"])

    def remember_image(self, reference: str, sha256: str, path: Path, width: int, height: int) -> None:
        """Record where an image reference's local copy is."""
        self._write(lambda db: db.execute(
            "INSERT OR REPLACE INTO images (reference, sha256, path, width, height, fetched_at) "
            "VALUES (?, ?, ?, ?, ?, ?)", (reference, sha256, str(path), width, height, time.time())))

    # ------------------------------------------------------------------ fine-tune runs
    def start_run(self, trigger: str, parent: str) -> int:
        """Record that a fine-tune started; returns its run id."""
        now = time.time()
        return self._write(lambda db: int(db.execute(
            "INSERT INTO finetune_runs (started_at, heartbeat_at, status, trigger_name, parent) "
            "VALUES (?, ?, 'running', ?, ?)", (now, now, trigger, parent)).lastrowid or 0))

    def heartbeat_run(self, run_id: int) -> None:
        """Mark a running fine-tune as alive."""
        self._write(lambda db: db.execute("UPDATE finetune_runs SET heartbeat_at = ? WHERE run_id = ?",
                                          (time.time(), run_id)))

    def finish_run(self, run_id: int, status: str, message: str, *, candidate: str | None = None,
                   watermark: int | None = None, details: Mapping[str, Any] | None = None) -> None:
        """Record how a fine-tune ended (`promoted`, `rejected`, `failed` or `interrupted`)."""
        if status not in RUN_STATES or status == "running":
            raise ValueError(f"a finished run is promoted, rejected, failed or interrupted, not {status!r}")
        row = (status, time.time(), message, candidate, watermark, json.dumps(dict(details or {}), default=str),
               run_id)
        self._write(lambda db: db.execute("UPDATE finetune_runs SET status = ?, finished_at = ?, message = ?, "
                                          "candidate = ?, watermark = ?, details = ? WHERE run_id = ?", row))

    def mark_abandoned_runs(self, stale_after: float) -> int:
        """Runs still marked running without a heartbeat for `stale_after` seconds were killed: mark them
        interrupted. Returns how many."""
        cutoff = time.time() - stale_after
        return self._write(lambda db: db.execute(
            "UPDATE finetune_runs SET status = 'interrupted', finished_at = ?, message = "
            "'interrupted: the process stopped without finishing (killed, or the machine went down)' "
            "WHERE status = 'running' AND COALESCE(heartbeat_at, started_at) < ?", (time.time(), cutoff)).rowcount)

    def runs(self, limit: int = 20) -> list[FinetuneRun]:
        """The latest fine-tune runs, newest first."""
        rows = self._connection().execute("SELECT * FROM finetune_runs ORDER BY run_id DESC LIMIT ?", (limit,))
        return [_run_from_row(row) for row in rows]

    def last_run(self) -> FinetuneRun | None:
        """The latest fine-tune run (what `python -m backend versions` shows as last_finetune)."""
        runs = self.runs(1)
        return runs[0] if runs else None

    def watermark(self, *, attempted: bool = False) -> int:
        """The newest region sequence number a finished (promoted or rejected) fine-tune has trained on:
        regions after it are the "new" corrections. With `attempted`, failed runs count too (automatic
        triggers wait for fresh corrections after a failure instead of failing again on the same data)."""
        statuses = ("promoted", "rejected", "failed") if attempted else ("promoted", "rejected")
        marks = ", ".join("?" for _ in statuses)
        row = self._connection().execute(
            f"SELECT COALESCE(MAX(watermark), 0) FROM finetune_runs WHERE status IN ({marks})", statuses
        ).fetchone()
        return int(row[0])

    def new_regions(self, *, attempted: bool = False) -> int:
        """Corrected regions stored since the last finished fine-tune (see `watermark`)."""
        return self.count_regions(self.watermark(attempted=attempted))


_stores: dict[Path, CorrectionsStore] = {}
_stores_lock = threading.Lock()


def _commit_group(db: sqlite3.Connection, group: Sequence[Callable[[sqlite3.Connection], Any]]
                  ) -> list[tuple[Any, Exception | None]]:
    """Run every write of `group` in one transaction and commit once; returns (result, error) per write.

    Each write runs in its own savepoint, so one that raises (a malformed event) is undone alone and the
    others are still committed. IMMEDIATE takes the write lock up front: another process's writer makes
    this one wait in the busy timeout instead of failing to upgrade a read lock."""
    outcomes: list[tuple[Any, Exception | None]] = []
    db.execute("BEGIN IMMEDIATE")
    try:
        for work in group:
            db.execute("SAVEPOINT write")
            try:
                outcomes.append((work(db), None))
            except Exception as exc:
                db.execute("ROLLBACK TO write")
                outcomes.append((None, exc))
            db.execute("RELEASE write")
        db.execute("COMMIT")
    except BaseException:
        # Some errors (disk full, I/O) have already ended the transaction.
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    return outcomes


# ---------------------------------------------------------------------- module-level API
def record_event(settings: Settings, event: dict[str, Any]) -> dict[str, Any]:
    """Store a webhook event durably (the `/webhook` hand-off) and queue a fine-tune when it asks for one.

    Returns once the commit is on disk; the fine-tune itself runs in a `finetune-worker`.
    """
    store = CorrectionsStore.for_settings(settings)
    summary = store.record_event(event)
    action = summary["action"]
    trigger = None
    min_new = settings.finetune_min_new
    if action == "START_TRAINING":
        trigger = "START_TRAINING"
    elif (summary.get("samples") and settings.finetune_every_n
          and store.new_regions(attempted=True) >= settings.finetune_every_n):
        trigger, min_new = f"every {settings.finetune_every_n} corrections", settings.finetune_every_n
    if trigger is not None:
        from backend.finetune import request_finetune

        try:
            summary["finetune"] = request_finetune(settings, trigger=trigger, min_new=min_new)
        except Exception as exc:
            # The event is stored; the next trigger (or cron) starts the fine-tune.
            log.warning("could not queue a fine-tune (%s): %s", trigger, exc)
            summary["finetune"] = f"not queued: {exc}"
    return summary


def record_prediction(settings: Settings, task_id: Any, region_id: str, model_version: str,
                      fields: Mapping[str, Any]) -> None:
    """Remember what `model_version` proposed for one region of a task: `fields` holds `caption` (text or
    None), `choices` (control name → chosen values) and `label` (or None)."""
    CorrectionsStore.for_settings(settings).record_predictions(task_id, model_version, {region_id: fields})


def record_job_output(settings: Settings, payload: Mapping[str, Any], output: Mapping[str, Any]) -> int:
    """Remember every region a worker job proposed (called by the worker after each job); returns how many."""
    from backend.payloads import PayloadError, parse_payload

    if "error" in output or not output.get("regions") or payload.get("task_id") is None:
        return 0
    try:
        plan, regions, keep_drawn = parse_payload(payload)
    except PayloadError:
        return 0
    fields = {region.id: predicted_fields(plan, region, answer, keep_drawn)
              for region, answer in zip(regions, output["regions"], strict=False)}
    store = CorrectionsStore.for_settings(settings)
    return store.record_predictions(payload["task_id"], str(output.get("model_version")), fields)


# ---------------------------------------------------------------------- images for training
def local_images(settings: Settings, references: Iterable[tuple[str, str | None]],
                 loader: Any = None) -> tuple[dict[str, tuple[Path, int, int]], dict[str, str]]:
    """Local copies of task images for training: reference → (path, width, height), and reference → error
    for those that could not be fetched.

    Images are fetched with `backend.images.ImageLoader` (the worker's rules: tokens, limits, SSRF guard),
    decoded (EXIF orientation applied, as the annotator saw them) and written once as PNG to
    `DATA_DIR/image-cache/<sha256 of the fetched bytes>.png`.
    """
    from backend.images import ImageError, ImageLoader, decode_image

    store = CorrectionsStore.for_settings(settings)
    cache = Path(settings.data_dir) / IMAGE_CACHE_DIR
    cache.mkdir(parents=True, exist_ok=True)
    found: dict[str, tuple[Path, int, int]] = {}
    failed: dict[str, str] = {}
    owned = loader is None
    loader = loader or ImageLoader(settings)
    try:
        for reference, task_id in references:
            if reference in found or reference in failed:
                continue
            known = store.cached_image(reference)
            if known is not None:
                found[reference] = known
                continue
            try:
                data = loader.fetch(reference, _int_or_none(task_id))
                digest = hashlib.sha256(data).hexdigest()
                path = cache / f"{digest}.png"
                if not path.is_file():
                    image = decode_image(data, settings.max_image_pixels, reference)
                    tmp = path.with_suffix(f".{os.getpid()}.tmp")
                    image.save(tmp, format="PNG")
                    tmp.replace(path)
                    size = image.size
                else:
                    from PIL import Image

                    with Image.open(path) as image:
                        size = image.size
                store.remember_image(reference, digest, path, size[0], size[1])
                found[reference] = (path, size[0], size[1])
            except ImageError as exc:
                failed[reference] = str(exc)
    finally:
        if owned:
            loader.close()
    return found, failed


def training_records(regions: Sequence[CorrectedRegion], images: Mapping[str, tuple[Path, int, int]]) -> list[Any]:
    """The regions as training records (`model.data_format.RegionSample`), one question per field:
    the caption → `caption_question()`, each Choices control → `attribute_question(<control name>)` (one
    record per chosen value), the RectangleLabels label → `attribute_question("category")`. Regions whose
    image is missing from `images` are left out."""
    from model.data_format import RegionSample
    from model.prompts import attribute_question, caption_question

    records: list[RegionSample] = []
    for item in regions:
        local = images.get(item.image)
        if local is None:
            continue
        path, width, height = local
        x1, y1, x2, y2 = item.box
        box = (x1 * width, y1 * height, x2 * width, y2 * height)
        base_meta = {"source": "correction", "annotation_id": item.annotation_id, "task_id": item.task_id,
                     "region_id": item.region_id, "seq": item.seq}
        questions: list[tuple[str, str, str, dict[str, Any]]] = []
        if item.caption:
            questions.append(("caption", caption_question(), item.caption, {"task": "caption"}))
        for control, values in sorted(item.choices.items()):
            for value in values:
                questions.append((f"{control}-{value}", attribute_question(control), value,
                                  {"task": "attribute", "attribute": control}))
        if item.label:
            questions.append(("category", attribute_question("category"), item.label,
                              {"task": "attribute", "attribute": "category"}))
        for key, question, answer, meta in questions:
            records.append(RegionSample(
                id=f"ann{item.annotation_id}-{item.region_id}-{key}", image=str(path), width=width, height=height,
                boxes=[box], conversations=[{"from": "human", "value": question}, {"from": "gpt", "value": answer}],
                meta={**base_meta, **meta}))
    return records


def is_held_out(task_id: str | None, fraction: float) -> bool:
    """Whether a task belongs to the evaluation slice: a hash of its id, so the split never changes and
    every region of a task (one image) is on the same side."""
    if fraction <= 0 or task_id is None:
        return False
    digest = hashlib.sha256(f"heldout:{task_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def split_held_out(regions: Sequence[CorrectedRegion], fraction: float) -> tuple[list[CorrectedRegion],
                                                                                  list[CorrectedRegion]]:
    """(training side, held-out side). With at least two tasks and `fraction > 0`, at least one task is
    held out (the one whose hash is smallest), so a comparison is always possible."""
    held = [r for r in regions if is_held_out(r.task_id, fraction)]
    tasks = {r.task_id for r in regions}
    if not held and fraction > 0 and len(tasks) >= 2:
        first = min(tasks, key=lambda t: hashlib.sha256(f"heldout:{t}".encode()).digest())
        held = [r for r in regions if r.task_id == first]
    held_ids = {id(r) for r in held}
    return [r for r in regions if id(r) not in held_ids], held


# ---------------------------------------------------------------------- helpers
def _plan(label_config: Any) -> FillPlan | None:
    if not isinstance(label_config, str) or not label_config.strip():
        return None
    try:
        return FillPlan.from_label_config(label_config)
    except ConfigError as exc:
        log.warning("corrections stored without a fill plan: %s", exc)
        return None


def _image_reference(plan: FillPlan | None, task: Mapping[str, Any]) -> str | None:
    if plan is not None:
        with contextlib.suppress(TaskError):
            return plan.image_reference(task)
    data = task.get("data") if isinstance(task, Mapping) else None
    if not isinstance(data, Mapping):
        return None
    values = [v.strip() for v in data.values() if isinstance(v, str) and v.strip()]
    image = data.get("image")
    if isinstance(image, str) and image.strip():
        return image.strip()
    return values[0] if len(values) == 1 else None


def _check_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    caption = fields.get("caption")
    choices = fields.get("choices") or {}
    label = fields.get("label")
    if caption is not None and not isinstance(caption, str):
        raise CorrectionsError(f"a predicted caption must be text or None, got {type(caption).__name__}")
    if not isinstance(choices, Mapping) or not all(isinstance(v, list) for v in choices.values()):
        raise CorrectionsError("predicted choices must map control names to lists of values")
    if label is not None and not isinstance(label, str):
        raise CorrectionsError(f"a predicted label must be text or None, got {type(label).__name__}")
    return {"caption": caption, "choices": {str(k): [str(x) for x in v] for k, v in choices.items()}, "label": label}


def _region_from_row(row: sqlite3.Row, plans: dict[str, FillPlan]) -> CorrectedRegion:
    plan = None
    if row["plan"]:
        plan = plans.get(row["plan"])
        if plan is None:
            plan = plans[row["plan"]] = FillPlan.from_json(json.loads(row["plan"]))
    x1, y1, x2, y2 = json.loads(row["box"])
    return CorrectedRegion(
        seq=int(row["seq"]), annotation_id=int(row["annotation_id"]), task_id=row["task_id"],
        region_id=row["region_id"], image=row["image"], region=Region.from_json(json.loads(row["region"])),
        box=(float(x1), float(y1), float(x2), float(y2)), caption=row["caption"], choices=json.loads(row["choices"]),
        label=row["label"], predicted=json.loads(row["predicted"]) if row["predicted"] else None,
        predicted_version=row["predicted_version"], created_at=float(row["created_at"]), plan=plan,
        ground_truth=bool(row["ground_truth"]))


def _run_from_row(row: sqlite3.Row) -> FinetuneRun:
    return FinetuneRun(
        run_id=int(row["run_id"]), status=row["status"], started_at=float(row["started_at"]),
        finished_at=row["finished_at"], heartbeat_at=row["heartbeat_at"], trigger=row["trigger_name"],
        parent=row["parent"], candidate=row["candidate"], watermark=row["watermark"], message=row["message"],
        details=json.loads(row["details"]) if row["details"] else {})


def _redacted(event: Mapping[str, Any]) -> dict[str, Any]:
    # The project object carries its share token and task-data credentials; the store never needs them.
    project = event.get("project")
    if not isinstance(project, Mapping) or not any(key in project for key in _PROJECT_SECRETS):
        return dict(event)
    clean = {k: ("***" if k in _PROJECT_SECRETS and v else v) for k, v in project.items()}
    return {**event, "project": clean}


_PROJECT_SECRETS = frozenset({"token", "task_data_login", "task_data_password"})


def _int_or_none(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _text_or_none(value: Any) -> str | None:
    return None if value is None else str(value)
