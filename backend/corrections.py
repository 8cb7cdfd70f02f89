"""The corrections store: webhook events and the region samples they carry, and what the model proposed.

`CorrectionsStore.record_event(event)` is what `/webhook` hands an event to; it returns once the event and
its samples are committed (`backend.store`: group commit, fsync), in milliseconds, and never trains:

- `ANNOTATION_CREATED` / `ANNOTATION_UPDATED` (and each annotation of `ANNOTATIONS_CREATED`): the
  annotation's samples (`backend.annotations`) replace whatever that annotation stored before. An
  annotation that contributes none (cancelled, empty) removes its earlier samples. An event older than
  what is stored (its `updated_at` before the stored one: a late or replayed delivery) changes nothing,
  and neither does any event about an annotation whose deletion Label Studio confirmed. An `updated_at`
  later than the moment the event arrived is taken as that moment: a date in the future cannot freeze an
  annotation against the deliveries that follow.
- `ANNOTATIONS_DELETED` (ids only, at most `MAX_DELETED_PER_EVENT` of them; the rest are dropped with a
  warning): the stored annotations among them are withheld (`regions` no longer returns them) until Label
  Studio confirms the deletion (`backend.confirmation`: its API answers 404), and only then removed and
  their ids refused for good. A deletion Label Studio contradicts (it still holds the annotation) is
  dropped, and the annotation comes back as it was. An id beyond the cap is no loss: an annotation Label
  Studio no longer holds is never trained on anyway.
- every event, whatever its action, is also kept in the `events` table (the project's secrets redacted)
  for EVENT_RETENTION_DAYS; what the workers recorded as proposals, for PROPOSAL_RETENTION_DAYS.

Whether an annotation is what Label Studio holds is checked later, when a fine-tune selects its data
(`backend.confirmation`); each annotation row keeps the outcome (`confirmation`).

What the model proposed for a region comes from the annotation itself when Label Studio filled it from a
prediction (`annotation.prediction`), and otherwise from the `predictions` table, which the worker fills as
it predicts (`record_job_output`), keyed by task id and region id: Label Studio keeps a prediction's region
ids when an annotator accepts and edits it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import time
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

from backend.annotations import (
    ANNOTATION_ACTIONS,
    AnnotationError,
    AnnotationSamples,
    CorrectedRegion,
    int_or_none,
    redacted,
    samples_from_annotation,
)
from backend.labelconfig import FillPlan, Region, predicted_fields
from backend.payloads import PayloadError, parse_payload
from backend.settings import Settings
from backend.store import Connection, Cursor, Database

# Events and proposals past their retention are pruned by a write at most this often per process, at most
# this many rows per table at a time (old rows go in steps, and each commit stays short).
_PRUNE_INTERVAL_S = 60.0
_PRUNE_STEP = 1000
# When each database was last pruned by this process (stores are made per request, the database is shared).
_pruned_at: weakref.WeakKeyDictionary[Database, float] = weakref.WeakKeyDictionary()
# The most annotation ids one ANNOTATIONS_DELETED event may ask to withhold (Label Studio's bulk deletions
# send one event per action; each id costs a lookup in the event's transaction).
MAX_DELETED_PER_EVENT = 10_000
# Regions of annotations whose deletion waits for Label Studio's word are not handed out.
_NOT_WITHHELD = "NOT EXISTS (SELECT 1 FROM deletion_requests d WHERE d.annotation_id = {column})"

log = logging.getLogger(__name__)


class CorrectionsStore:
    """The corrections tables of one database (see the module docstring)."""

    def __init__(self, database: Database, event_retention_days: float = 90.0,
                 proposal_retention_days: float = 180.0):
        self.database = database
        self.event_retention_s = event_retention_days * 86_400
        self.proposal_retention_s = proposal_retention_days * 86_400

    @classmethod
    def for_settings(cls, settings: Settings) -> CorrectionsStore:
        """The store of `settings.data_dir`."""
        return cls(Database.for_settings(settings), settings.event_retention_days, settings.proposal_retention_days)

    # ------------------------------------------------------------------ events
    def record_event(self, event: Mapping[str, Any]) -> dict[str, Any]:
        """Store one webhook event and what it implies, in one transaction; returns a short summary
        (`action`, `samples` stored, `deleted` for deletions). A malformed annotation raises
        `AnnotationError` and stores nothing."""
        action = str(event.get("action"))
        body = json.dumps(redacted(event), ensure_ascii=False, separators=(",", ":"), default=str)
        annotation = event.get("annotation") if isinstance(event.get("annotation"), Mapping) else None
        annotation_id = int_or_none(annotation.get("id")) if annotation else None
        received = time.time()
        contributions: list[tuple[int, AnnotationSamples | None, str | None]] = []
        if action in ANNOTATION_ACTIONS and annotation is not None:
            contributions.append(_contribution(event, annotation, received))
        elif action == "ANNOTATIONS_CREATED":
            contributions += [_contribution(event, item, received) for item in event.get("annotations") or []
                              if isinstance(item, Mapping) and "result" in item]
        deleted_ids: list[int] = []
        dropped = 0
        if action == "ANNOTATIONS_DELETED":
            listed = event.get("annotations") if isinstance(event.get("annotations"), list) else []
            deleted_ids = list(dict.fromkeys(i for i in (int_or_none(item.get("id")) for item in listed
                                                         if isinstance(item, Mapping)) if i is not None))
            if len(deleted_ids) > MAX_DELETED_PER_EVENT:
                dropped = len(deleted_ids) - MAX_DELETED_PER_EVENT
                deleted_ids = deleted_ids[:MAX_DELETED_PER_EVENT]
                log.warning("an ANNOTATIONS_DELETED event listed %d annotations; the %d past the first %d were "
                            "dropped (Label Studio's word decides whether they are trained on)",
                            len(deleted_ids) + dropped, dropped, MAX_DELETED_PER_EVENT)

        def store(db: Connection) -> dict[str, Any]:
            summary: dict[str, Any] = {"action": action, "samples": 0}
            now = time.time()
            # Two replicas storing events about the same annotation take turns (see backend.store).
            self.database.serialize(db, *(f"annotation:{i}" for i, _, _ in contributions),
                                    *(f"annotation:{i}" for i in deleted_ids))
            # Every question is asked before the first answer is read: on PostgreSQL's pipeline they share
            # one round trip (`backend.store`).
            inserted = db.execute(
                "INSERT INTO events (action, received_at, annotation_id, body) VALUES (?, ?, ?, ?) RETURNING seq",
                (action, now, annotation_id, body))
            asked = [(_standing(db, contributed_id), _ask_proposed(db, samples))
                     for contributed_id, samples, _ in contributions]
            event_seq = int(inserted.fetchone()[0])
            written: dict[int, str | None] = {}  # annotation id → updated_at, of what this event stored
            for (contributed_id, samples, updated_at), (standing, proposed) in zip(contributions, asked, strict=True):
                deleted, stored_at, stored = standing.fetchone()
                ignored = _superseded(bool(deleted), written.get(contributed_id, stored_at), updated_at)
                if ignored is not None:
                    summary.setdefault("ignored", []).append(f"annotation {contributed_id}: {ignored}")
                    continue
                if stored or contributed_id in written:
                    _delete(db, [contributed_id])
                written[contributed_id] = updated_at
                if samples is not None:
                    summary["samples"] += _insert(db, samples, event_seq, _proposed(samples, proposed))
                else:
                    # Nothing to learn from (cancelled, emptied), but its time stops older deliveries.
                    db.execute("INSERT INTO annotations (annotation_id, updated_at, ground_truth, event_seq) "
                               "VALUES (?, ?, 0, ?)", (contributed_id, updated_at, event_seq))
            if action == "ANNOTATIONS_DELETED":
                summary["deleted"] = _request_deletion(db, deleted_ids, event_seq, now)
                if dropped:
                    summary["dropped"] = dropped
            if now - _pruned_at.get(self.database, float("-inf")) >= _PRUNE_INTERVAL_S:
                self._prune(db, now)
                _pruned_at[self.database] = now
            return summary

        return self.database.write(store)

    # ------------------------------------------------------------------ predictions
    def record_predictions(self, task_id: Any, model_version: str,
                           fields_by_region: Mapping[str, Mapping[str, Any]]) -> int:
        """Remember what `model_version` proposed for regions of a task (replacing an earlier record):
        per region `caption` (text or None), `choices` (control name → chosen values), `label` (or None)."""
        if task_id is None or not fields_by_region:
            return 0
        now = time.time()
        rows = [(str(task_id), str(region_id), model_version, json.dumps(_check_fields(fields)), now)
                for region_id, fields in fields_by_region.items()]
        self.database.write(lambda db: db.executemany(
            "INSERT INTO predictions (task_id, region_id, model_version, fields, created_at) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (task_id, region_id, model_version) DO UPDATE SET fields = excluded.fields, "
            "created_at = excluded.created_at", rows))
        return len(rows)

    def record_job_output(self, payload: Mapping[str, Any], output: Mapping[str, Any]) -> int:
        """Remember every region a worker job proposed (the worker calls it after each job); returns how many."""
        if "error" in output or not output.get("regions") or payload.get("task_id") is None:
            return 0
        try:
            plan, regions, keep_drawn = parse_payload(payload)
        except PayloadError:
            return 0
        proposed = [Region.from_json(data) for data in output.get("proposed") or ()]
        fields = {region.id: predicted_fields(plan, region, answer, keep_drawn)
                  for region, answer in zip(regions + proposed, output["regions"], strict=False)}
        # A proposed region is remembered with where it was proposed (`backend.proposal_stats`).
        for region, answer in zip(proposed, output["regions"][len(regions):], strict=False):
            fields[region.id]["proposal"] = {"box": list(region.box()), "label": region.labels[0] if region.labels
                                             else None, "score": answer.get("proposal_score")}
        return self.record_predictions(payload["task_id"], str(output.get("model_version")), fields)

    def recorded_proposals(self) -> dict[str, dict[str, dict[str, dict[str, Any]]]]:
        """Task id → model version → region id → recorded fields (with their `created_at`), for the tasks
        whose jobs proposed regions (`backend.proposal_stats`)."""
        rows = self.database.read().execute(
            "SELECT task_id, region_id, model_version, fields, created_at FROM predictions WHERE task_id IN "
            "(SELECT DISTINCT task_id FROM predictions WHERE fields LIKE ?)", ('%"proposal"%',)).fetchall()
        found: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}
        for row in rows:
            fields = {**json.loads(row["fields"]), "created_at": float(row["created_at"])}
            found.setdefault(row["task_id"], {}).setdefault(row["model_version"], {})[row["region_id"]] = fields
        return found

    # ------------------------------------------------------------------ reading
    def regions(self, since_seq: int = 0, model_version: str | None = None) -> list[CorrectedRegion]:
        """Stored regions with `seq > since_seq` (optionally only those predicted by `model_version`),
        oldest first, but none of an annotation whose deletion waits for Label Studio's word; every region
        committed later has a larger `seq` (`Database.read_settled`)."""
        query = ("SELECT s.*, a.plan AS plan, a.ground_truth AS ground_truth, a.event_seq AS event_seq, "
                 "a.confirmation AS confirmation "
                 "FROM samples s LEFT JOIN annotations a ON a.annotation_id = s.annotation_id WHERE s.seq > ? "
                 "AND " + _NOT_WITHHELD.format(column="s.annotation_id"))
        params: list[Any] = [since_seq]
        if model_version is not None:
            query += " AND s.predicted_version = ?"
            params.append(model_version)
        rows = self.database.read_settled(
            "samples", lambda db: db.execute(query + " ORDER BY s.seq", params).fetchall())
        plans: dict[str, FillPlan] = {}
        return [_region_from_row(row, plans) for row in rows]

    def count_regions(self, since_seq: int = 0) -> int:
        """How many stored regions have `seq > since_seq`."""
        row = self.database.read().execute(
            "SELECT COUNT(*) FROM samples WHERE seq > ? AND " + _NOT_WITHHELD.format(column="samples.annotation_id"),
            (since_seq,)).fetchone()
        return int(row[0])

    def confirmation_mark(self) -> tuple[int, float]:
        """Changes whenever an annotation's confirmation does (how many have one, and the latest time)."""
        row = self.database.read().execute(
            "SELECT COUNT(confirmation), COALESCE(MAX(confirmed_at), 0) FROM annotations").fetchone()
        return int(row[0]), float(row[1])

    def max_seq(self) -> int:
        """The newest region's sequence number (0 when empty)."""
        return int(self.database.read().execute("SELECT COALESCE(MAX(seq), 0) FROM samples").fetchone()[0])

    def events(self, action: str | None = None) -> list[dict[str, Any]]:
        """Stored webhook events (optionally of one action), oldest first."""
        query, params = "SELECT body FROM events", ()
        if action is not None:
            query, params = query + " WHERE action = ?", (action,)
        return [json.loads(row[0]) for row in self.database.read().execute(query + " ORDER BY seq", params)]

    def annotation_ids(self) -> set[int]:
        """Ids of the annotations that have stored regions."""
        return {int(row[0]) for row in self.database.read().execute(
            "SELECT DISTINCT annotation_id FROM samples WHERE " + _NOT_WITHHELD.format(column="samples.annotation_id"))}


    def _prune(self, db: Connection, now: float) -> None:
        # A few rows per write keeps each commit short; the tables shrink to their retention over time.
        db.execute("DELETE FROM events WHERE seq IN (SELECT seq FROM events WHERE received_at < ? ORDER BY seq "
                   "LIMIT ?)", (now - self.event_retention_s, _PRUNE_STEP))
        db.execute("DELETE FROM predictions WHERE (task_id, region_id, model_version) IN (SELECT task_id, "
                   "region_id, model_version FROM predictions WHERE created_at < ? LIMIT ?)",
                   (now - self.proposal_retention_s, _PRUNE_STEP))


def _contribution(event: Mapping[str, Any], annotation: Mapping[str, Any],
                  received: float) -> tuple[int, AnnotationSamples | None, str | None]:
    samples = samples_from_annotation(event, annotation)
    annotation_id = int_or_none(annotation.get("id"))
    assert annotation_id is not None  # samples_from_annotation refuses annotations without one
    updated_at = annotation.get("updated_at")
    clamped = clamp_updated_at(updated_at if isinstance(updated_at, str) else None, received)
    if samples is not None and samples.updated_at != clamped:
        samples = dataclasses.replace(samples, updated_at=clamped)
    return annotation_id, samples, clamped


def clamp_updated_at(updated_at: str | None, received: float) -> str | None:
    """An annotation's `updated_at`, or the moment its event arrived (`received`, a Unix time) where it says
    later: nobody edits an annotation after Label Studio sent it."""
    moment = _instant(updated_at)
    if moment is None or moment.timestamp() <= received:
        return updated_at
    return dt.datetime.fromtimestamp(received, dt.UTC).isoformat()


def _request_deletion(db: Connection, annotation_ids: Sequence[int], event_seq: int, now: float) -> int:
    """Withhold the stored annotations among `annotation_ids` until Label Studio confirms their deletion;
    returns how many of their regions are withheld."""
    if not annotation_ids:
        return 0
    db.executemany("INSERT INTO deletion_requests (annotation_id, event_seq, requested_at) SELECT annotation_id, "
                   "?, ? FROM annotations WHERE annotation_id = ? ON CONFLICT (annotation_id) DO NOTHING",
                   [(event_seq, now, i) for i in annotation_ids])
    withheld = 0
    for start in range(0, len(annotation_ids), 500):
        chunk = list(annotation_ids[start:start + 500])
        marks = ", ".join("?" for _ in chunk)
        withheld += int(db.execute(f"SELECT COUNT(*) FROM samples WHERE annotation_id IN ({marks})",
                                   chunk).fetchone()[0])
    return withheld


def _standing(db: Connection, annotation_id: int) -> Cursor:
    """Ask whether an annotation was deleted, when what is stored of it was updated, and whether anything of
    it is stored at all (one row)."""
    return db.execute("SELECT (SELECT 1 FROM deleted_annotations WHERE annotation_id = ?) AS deleted, "
                      "(SELECT updated_at FROM annotations WHERE annotation_id = ?) AS updated_at, "
                      "EXISTS (SELECT 1 FROM annotations WHERE annotation_id = ?) "
                      "OR EXISTS (SELECT 1 FROM samples WHERE annotation_id = ?) AS stored",
                      (annotation_id,) * 4)


def _superseded(deleted: bool, stored_at: str | None, updated_at: str | None) -> str | None:
    """Why an event about an annotation must change nothing: the annotation was deleted, or what is stored
    (updated at `stored_at`) is newer. None when it applies."""
    if deleted:
        return "deleted earlier"
    stored, incoming = _instant(stored_at), _instant(updated_at)
    if stored is not None and incoming is not None and incoming < stored:
        return f"older ({updated_at}) than what is stored ({stored_at})"
    return None


def _instant(text: str | None) -> dt.datetime | None:
    if not text:
        return None
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)


def _insert(db: Connection, annotation: AnnotationSamples, event_seq: int,
            proposed: dict[str, tuple[dict[str, Any], str | None]]) -> int:
    now = time.time()
    rows = []
    for sample in annotation.samples:
        predicted, version = proposed.get(sample.region_id, (None, None))
        rows.append((annotation.annotation_id, annotation.task_id, sample.region_id, annotation.image,
                     json.dumps(sample.region.to_json()), json.dumps(list(sample.region.box())), sample.caption,
                     json.dumps(sample.choices), sample.label, None if predicted is None else json.dumps(predicted),
                     version, now))
    db.execute(
        "INSERT INTO annotations (annotation_id, task_id, project_id, image, updated_at, ground_truth, plan, "
        "event_seq) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (annotation.annotation_id, annotation.task_id, annotation.project_id, annotation.image,
         annotation.updated_at, int(annotation.ground_truth),
         None if annotation.plan is None else json.dumps(annotation.plan.to_json()), event_seq))
    db.executemany(
        "INSERT INTO samples (annotation_id, task_id, region_id, image, region, box, caption, choices, label, "
        "predicted, predicted_version, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
    return len(rows)


def _ask_proposed(db: Connection, annotation: AnnotationSamples | None) -> Cursor | None:
    """Ask what the model proposed for the task's regions, unless the annotation says what was shown."""
    if annotation is None or annotation.shown is not None or annotation.task_id is None:
        return None
    return db.execute("SELECT region_id, model_version, fields FROM predictions WHERE task_id = ? "
                      "ORDER BY created_at", (annotation.task_id,))


def _proposed(annotation: AnnotationSamples, asked: Cursor | None) -> dict[str, tuple[dict[str, Any], str | None]]:
    """Region id → (fields the model proposed, its version) for an annotation's regions."""
    if annotation.shown is not None:
        return {rid: (fields, annotation.shown_version) for rid, fields in annotation.shown.items()}
    if asked is None:
        return {}
    # The newest prediction of each region is the one the annotator saw.
    return {row["region_id"]: (json.loads(row["fields"]), row["model_version"]) for row in asked.fetchall()}


def _delete(db: Connection, annotation_ids: Sequence[int]) -> list[Cursor]:
    """Delete annotations and their samples; returns the samples' deletions, whose `rowcount`s say how many
    went (read only where needed: on PostgreSQL reading one waits for the server)."""
    deletions = []
    for annotation_id in annotation_ids:
        deletions.append(db.execute("DELETE FROM samples WHERE annotation_id = ?", (annotation_id,)))
        db.execute("DELETE FROM annotations WHERE annotation_id = ?", (annotation_id,))
    return deletions


def _check_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    caption = fields.get("caption")
    choices = fields.get("choices") or {}
    label = fields.get("label")
    if caption is not None and not isinstance(caption, str):
        raise AnnotationError(f"a predicted caption must be text or None, got {type(caption).__name__}")
    if not isinstance(choices, Mapping) or not all(isinstance(v, list) for v in choices.values()):
        raise AnnotationError("predicted choices must map control names to lists of values")
    if label is not None and not isinstance(label, str):
        raise AnnotationError(f"a predicted label must be text or None, got {type(label).__name__}")
    checked = {"caption": caption, "choices": {str(k): [str(x) for x in v] for k, v in choices.items()},
               "label": label}
    proposal = fields.get("proposal")
    if proposal is not None:
        box = proposal.get("box") if isinstance(proposal, Mapping) else None
        if not isinstance(box, list) or len(box) != 4 or not all(isinstance(c, int | float) for c in box):
            raise AnnotationError("a proposed region's box must be four numbers")
        checked["proposal"] = {"box": [float(c) for c in box], "label": proposal.get("label"),
                               "score": proposal.get("score")}
    return checked


def _region_from_row(row: Any, plans: dict[str, FillPlan]) -> CorrectedRegion:
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
        ground_truth=bool(row["ground_truth"]), event_seq=int(row["event_seq"] or 0),
        confirmation=row["confirmation"])
