"""Corrections confirmed with Label Studio before they become training data.

A webhook says that an annotation exists and what it holds, and anyone who reaches `/webhook` with the
secret (or a leaked one) could say so. Before a fine-tune trains on an annotation it asks Label Studio's API
for it, with the backend's own token, and trains on it only when Label Studio has it, on the same task (and
the same project, when the webhook named one), not cancelled, with the regions, captions, choices and labels
the store holds, and when the rest of what a fine-tune reads from the webhook is Label Studio's too: the
image reference (from `GET /api/tasks/{id}`) and the project's labeling config (`GET /api/projects/{id}`),
through which the regions were read. The outcome is kept with the content it was asked about (the event
that stored it, `annotations.event_seq`): a delivery arriving while Label Studio is asked is another event,
stays unasked, and is asked about by the next fine-tune; each stored content is asked about once.

Deletions are Label Studio's word too: the annotations an `ANNOTATIONS_DELETED` event names are withheld
(`backend.corrections`) and asked about here; those Label Studio no longer has (404) are removed and their
ids refused for good, and those it still holds come back.

Without Label Studio credentials nothing can be confirmed: such corrections are counted as unchecked,
visibly (`versions`, `report`, `/metrics`, the fine-tune's log), and trained on only with
TRAIN_ON_UNCONFIRMED.
"""

from __future__ import annotations

import base64
import enum
import json
import logging
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import parse_qs, urlsplit

from backend.annotations import AnnotationError, CorrectedRegion, image_reference, parse_annotation_regions, plan_of
from backend.labelconfig import FillPlan
from backend.labelstudio import LabelStudioClient, LabelStudioError
from backend.settings import Settings
from backend.store import Database

log = logging.getLogger(__name__)


class Confirmation(enum.StrEnum):
    """What Label Studio said about a stored annotation."""

    CONFIRMED = "confirmed"
    MISSING = "missing"  # Label Studio has no such annotation (forged, or deleted since)
    FOREIGN = "foreign"  # it belongs to another task or project than the webhook said
    CANCELLED = "cancelled"
    CHANGED = "changed"  # it holds something else than the store (a forged or stale delivery)
    UNCHECKED = "unchecked"  # not asked: no credentials, or Label Studio did not answer
    DELETING = "deleting"  # an event said it was deleted, and Label Studio could not be asked yet


def confirm(settings: Settings, regions: Sequence[CorrectedRegion],
            client: LabelStudioClient | None = None) -> dict[int, Confirmation]:
    """Annotation id → what Label Studio says of it, for every annotation the regions come from; asks Label
    Studio about those not confirmed before, and keeps the answers."""
    database = Database.for_settings(settings)
    by_annotation: dict[int, list[CorrectedRegion]] = {}
    for region in regions:
        by_annotation.setdefault(region.annotation_id, []).append(region)
    # The content each annotation's regions came from: an answer kept for other content does not count.
    asked_about = {a: rs[0].event_seq for a, rs in by_annotation.items()}
    stored = _stored(database, by_annotation)
    known = {a: state for a, (state, _, seq) in stored.items() if state is not None and seq == asked_about[a]}
    projects = {a: project for a, (_, project, _) in stored.items() if project is not None}
    pending = [a for a in by_annotation if known.get(a) in (None, Confirmation.UNCHECKED)]
    deletions = requested_deletions(database)
    if pending or deletions:
        owned = client is None
        try:
            if client is None and settings.label_studio_url and settings.label_studio_api_key:
                client = LabelStudioClient(settings)
            asker = None if client is None else _Asker(client)
            answers = {a: _ask(asker, a, by_annotation[a], projects.get(a)) for a in pending}
            settled = _settle(database, asker, deletions)
        finally:
            if owned and client is not None:
                client.close()
        _keep(database, {a: (state, asked_about[a]) for a, state in answers.items()})
        known.update(answers)
        for annotation_id in set(deletions) - settled:
            if annotation_id in known:
                known[annotation_id] = Confirmation.DELETING
    return known


def usable(settings: Settings, regions: Sequence[CorrectedRegion], outcome: Mapping[int, Confirmation]
           ) -> list[CorrectedRegion]:
    """The regions a fine-tune may train on: those of confirmed annotations (all, with TRAIN_ON_UNCONFIRMED,
    except those Label Studio contradicted)."""
    if settings.train_on_unconfirmed:
        allowed = {Confirmation.CONFIRMED, Confirmation.UNCHECKED}
    else:
        allowed = {Confirmation.CONFIRMED}
    return [r for r in regions if outcome.get(r.annotation_id) in allowed]


def counted(settings: Settings, regions: Sequence[CorrectedRegion]
            ) -> tuple[list[CorrectedRegion], list[CorrectedRegion]]:
    """Stored regions split by the answers kept so far (nothing is asked): those statistics count, which a
    fine-tune may train on (confirmed; with TRAIN_ON_UNCONFIRMED also those not yet asked or unchecked), and
    the rest, shown apart."""
    allowed: set[str | None] = {Confirmation.CONFIRMED.value}
    if settings.train_on_unconfirmed:
        allowed |= {None, Confirmation.UNCHECKED.value}
    kept, apart = [], []
    for region in regions:
        (kept if region.confirmation in allowed else apart).append(region)
    return kept, apart


def counts(settings: Settings) -> dict[str, int]:
    """Stored annotations with regions, by confirmation (`not yet asked` for those no fine-tune looked at)."""
    rows = Database.for_settings(settings).read().execute(
        "SELECT COALESCE(confirmation, 'not yet asked') AS state, COUNT(*) AS n FROM annotations "
        "WHERE annotation_id IN (SELECT annotation_id FROM samples) GROUP BY state").fetchall()
    return {row["state"]: int(row["n"]) for row in rows}


class _Asker:
    """Label Studio's answers during one confirmation, each asked for once."""

    def __init__(self, client: LabelStudioClient):
        self.client = client
        self._annotations: dict[int, dict[str, Any] | None] = {}
        self._tasks: dict[str, dict[str, Any] | None] = {}
        self._configs: dict[str, Any] = {}

    def annotation(self, annotation_id: int) -> dict[str, Any] | None:
        if annotation_id not in self._annotations:
            self._annotations[annotation_id] = self.client.annotation(annotation_id)
        return self._annotations[annotation_id]

    def task(self, task_id: str) -> dict[str, Any] | None:
        if task_id not in self._tasks:
            # As imported: Label Studio 1.23 otherwise rewrites storage URIs into its own routes.
            self._tasks[task_id] = self.client.request("GET", f"/api/tasks/{int(task_id)}/",
                                                       params={"resolve_uri": "false"}, missing_ok=True)
        return self._tasks[task_id]

    def label_config(self, project_id: str) -> Any:
        if project_id not in self._configs:
            self._configs[project_id] = (self.client.project(int(project_id)) or {}).get("label_config")
        return self._configs[project_id]


def _ask(asker: _Asker | None, annotation_id: int, regions: Sequence[CorrectedRegion],
         project: str | None) -> Confirmation:
    if asker is None:
        return Confirmation.UNCHECKED
    try:
        held = asker.annotation(annotation_id)
        verdict = judge(held, regions, project)
        if verdict is Confirmation.CONFIRMED:
            assert held is not None
            verdict = _judge_source(asker, held, regions)
    except (LabelStudioError, ValueError) as exc:
        log.warning("annotation %s not confirmed: %s", annotation_id, exc)
        return Confirmation.UNCHECKED
    return verdict


def _judge_source(asker: _Asker, held: Mapping[str, Any], regions: Sequence[CorrectedRegion]) -> Confirmation:
    """Whether the task's image and the project's labeling config, as Label Studio holds them, are those the
    regions were stored with."""
    first = regions[0]
    task = asker.task(str(held.get("task")))
    if task is None:
        return Confirmation.MISSING
    project = held.get("project") if held.get("project") is not None else task.get("project")
    if project is None:
        log.warning("annotation %s: Label Studio names no project for task %s", first.annotation_id, first.task_id)
        return Confirmation.CHANGED
    plan = plan_of(asker.label_config(str(project)))
    if _plan_key(plan) != _plan_key(first.plan):
        return Confirmation.CHANGED
    if _unresolved(image_reference(plan, task)) != _unresolved(first.image):
        return Confirmation.CHANGED
    return Confirmation.CONFIRMED


_STORAGE_ROUTE = re.compile(r"^/tasks/[0-9]+/(presign|resolve)/?$")


def _unresolved(reference: str | None) -> str | None:
    """A task's image reference as imported: `GET /api/tasks/{id}` without `resolve_uri=false` (which some
    versions ignore) gives a cloud storage URI (`s3://…`) as Label Studio's route that signs or proxies it
    (`/tasks/{id}/presign/?fileuri=<base64 URI>`, `/tasks/{id}/resolve/?fileuri=…`); webhooks give it as it
    is."""
    if not reference:
        return reference
    parts = urlsplit(reference)
    fileuri = parse_qs(parts.query).get("fileuri") if _STORAGE_ROUTE.match(parts.path) else None
    if not fileuri:
        return reference
    try:
        return base64.urlsafe_b64decode(fileuri[0] + "=" * (-len(fileuri[0]) % 4)).decode()
    except (ValueError, UnicodeDecodeError):
        return reference


def _plan_key(plan: FillPlan | None) -> str | None:
    return None if plan is None else json.dumps(plan.to_json(), sort_keys=True, default=str)


def _settle(database: Database, asker: _Asker | None, deletions: Sequence[int]) -> set[int]:
    """Ask Label Studio about the requested deletions and act on its answers; the ids it answered for."""
    if asker is None or not deletions:
        return set()
    confirmed, refused = [], []
    for annotation_id in deletions:
        try:
            held = asker.annotation(annotation_id)
        except LabelStudioError as exc:
            # Label Studio is away or refuses: the rest wait for the next fine-tune too.
            log.warning("%d requested deletion(s) not confirmed yet: %s", len(deletions) - len(confirmed)
                        - len(refused), exc)
            break
        if held is None:
            confirmed.append(annotation_id)
        else:
            log.warning("an event said annotation %s was deleted, but Label Studio still holds it: it is used "
                        "again", annotation_id)
            refused.append(annotation_id)
    settle_deletions(database, confirmed, refused)
    return {*confirmed, *refused}


def judge(held: Mapping[str, Any] | None, regions: Sequence[CorrectedRegion],
          project: str | None = None) -> Confirmation:
    """Compare what Label Studio holds for an annotation (`GET /api/annotations/{id}/`, None for a 404) with
    the regions stored for it and `project`, the project the webhook named (None when it named none)."""
    if held is None:
        return Confirmation.MISSING
    first = regions[0]
    if str(held.get("task")) != str(first.task_id):
        return Confirmation.FOREIGN
    # Label Studio numbers tasks across projects, so another project here means the webhook named the wrong
    # one, and with it the labeling config the correction was read with.
    if project is not None and held.get("project") is not None and str(held["project"]) != project:
        return Confirmation.FOREIGN
    if held.get("was_cancelled"):
        return Confirmation.CANCELLED
    try:
        truth = parse_annotation_regions(held.get("result") or [], first.plan)
    except AnnotationError:
        return Confirmation.CHANGED
    truth = {rid: entry for rid, entry in truth.items() if entry["region"] is not None}
    if set(truth) != {r.region_id for r in regions}:
        return Confirmation.CHANGED
    for region in regions:
        entry = truth[region.region_id]
        if (entry["caption"], entry["choices"], entry["label"]) != (region.caption, region.choices, region.label):
            return Confirmation.CHANGED
        if entry["region"].geometry() != region.region.geometry():
            return Confirmation.CHANGED
    return Confirmation.CONFIRMED


def _stored(database: Database, annotation_ids: Iterable[int]
            ) -> dict[int, tuple[Confirmation | None, str | None, int]]:
    """Annotation id → what Label Studio said of it before (None: not asked yet), the project its webhook
    named (None when it named none), and the event that stored what is there now."""
    ids = list(annotation_ids)
    found: dict[int, tuple[Confirmation | None, str | None, int]] = {}
    for start in range(0, len(ids), 500):
        chunk = ids[start:start + 500]
        marks = ", ".join("?" for _ in chunk)
        rows = database.read().execute(
            f"SELECT annotation_id, confirmation, project_id, event_seq FROM annotations "
            f"WHERE annotation_id IN ({marks})", chunk)
        found.update({int(row["annotation_id"]): (Confirmation(row["confirmation"]) if row["confirmation"] else None,
                                                  None if row["project_id"] is None else str(row["project_id"]),
                                                  int(row["event_seq"]))
                      for row in rows})
    return found


def _keep(database: Database, answers: Mapping[int, tuple[Confirmation, int]]) -> None:
    """Keep each answer with the content it was about: a row stored by a later event is left unasked."""
    now = time.time()
    rows = [(state.value, now, annotation_id, event_seq) for annotation_id, (state, event_seq) in answers.items()]
    if rows:
        database.write(lambda db: db.executemany(
            "UPDATE annotations SET confirmation = ?, confirmed_at = ? WHERE annotation_id = ? AND event_seq = ?",
            rows))


def requested_deletions(database: Database) -> list[int]:
    """Ids of the annotations whose deletion waits for Label Studio's word (`backend.corrections`)."""
    return [int(row[0]) for row in database.read().execute(
        "SELECT annotation_id FROM deletion_requests ORDER BY annotation_id")]


def settle_deletions(database: Database, confirmed: Sequence[int], refused: Sequence[int]) -> None:
    """What Label Studio said of requested deletions: `confirmed` ones (it answers 404) are removed and their
    ids refused for good; `refused` ones (it still holds the annotation) are forgotten, so the annotation is
    used again."""
    def settle(db: Any) -> None:
        now = time.time()
        database.serialize(db, *(f"annotation:{i}" for i in (*confirmed, *refused)))
        for annotation_id in confirmed:
            db.execute("DELETE FROM samples WHERE annotation_id = ?", (annotation_id,))
            db.execute("DELETE FROM annotations WHERE annotation_id = ?", (annotation_id,))
        db.executemany("INSERT INTO deleted_annotations (annotation_id, deleted_at) VALUES (?, ?) "
                       "ON CONFLICT (annotation_id) DO NOTHING", [(i, now) for i in confirmed])
        db.executemany("DELETE FROM deletion_requests WHERE annotation_id = ?",
                       [(i,) for i in (*confirmed, *refused)])

    if confirmed or refused:
        database.write(settle)
