"""Corrections confirmed with Label Studio before they become training data.

A webhook says that an annotation exists and what it holds, and anyone who reaches `/webhook` with the
secret (or a leaked one) could say so. Before a fine-tune trains on an annotation it asks Label Studio's API
for it, with the backend's own token, and trains on it only when Label Studio has it, on the same task (and
the same project, when the webhook named one), not cancelled, with the regions, captions, choices and labels
the store holds. The outcome is kept
with the annotation (a new delivery of the annotation clears it), so each one is asked about once.

Without Label Studio credentials nothing can be confirmed: such corrections are counted as unchecked,
visibly (`versions`, `report`, `/metrics`, the fine-tune's log), and trained on only with
TRAIN_ON_UNCONFIRMED.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from backend.annotations import AnnotationError, CorrectedRegion, parse_annotation_regions
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


def confirm(settings: Settings, regions: Sequence[CorrectedRegion],
            client: LabelStudioClient | None = None) -> dict[int, Confirmation]:
    """Annotation id → what Label Studio says of it, for every annotation the regions come from; asks Label
    Studio about those not confirmed before, and keeps the answers."""
    database = Database.for_settings(settings)
    by_annotation: dict[int, list[CorrectedRegion]] = {}
    for region in regions:
        by_annotation.setdefault(region.annotation_id, []).append(region)
    stored = _stored(database, by_annotation)
    known = {a: state for a, (state, _) in stored.items() if state is not None}
    projects = {a: project for a, (_, project) in stored.items() if project is not None}
    pending = [a for a in by_annotation if known.get(a) in (None, Confirmation.UNCHECKED)]
    if pending:
        owned = client is None
        try:
            if client is None and settings.label_studio_url and settings.label_studio_api_key:
                client = LabelStudioClient(settings)
            answers = {a: _ask(client, a, by_annotation[a], projects.get(a)) for a in pending}
        finally:
            if owned and client is not None:
                client.close()
        _keep(database, answers)
        known.update(answers)
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


def counts(settings: Settings) -> dict[str, int]:
    """Stored annotations with regions, by confirmation (`not yet asked` for those no fine-tune looked at)."""
    rows = Database.for_settings(settings).read().execute(
        "SELECT COALESCE(confirmation, 'not yet asked') AS state, COUNT(*) AS n FROM annotations "
        "WHERE annotation_id IN (SELECT annotation_id FROM samples) GROUP BY state").fetchall()
    return {row["state"]: int(row["n"]) for row in rows}


def _ask(client: LabelStudioClient | None, annotation_id: int, regions: Sequence[CorrectedRegion],
         project: str | None) -> Confirmation:
    if client is None:
        return Confirmation.UNCHECKED
    try:
        held = client.annotation(annotation_id)
    except LabelStudioError as exc:
        log.warning("annotation %s not confirmed: %s", annotation_id, exc)
        return Confirmation.UNCHECKED
    return judge(held, regions, project)


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


def _stored(database: Database, annotation_ids: Iterable[int]) -> dict[int, tuple[Confirmation | None, str | None]]:
    """Annotation id → what Label Studio said of it before (None: not asked yet), and the project its webhook
    named (None when it named none)."""
    ids = list(annotation_ids)
    found: dict[int, tuple[Confirmation | None, str | None]] = {}
    for start in range(0, len(ids), 500):
        chunk = ids[start:start + 500]
        marks = ", ".join("?" for _ in chunk)
        rows = database.read().execute(
            f"SELECT annotation_id, confirmation, project_id FROM annotations WHERE annotation_id IN ({marks})",
            chunk)
        found.update({int(row["annotation_id"]): (Confirmation(row["confirmation"]) if row["confirmation"] else None,
                                                  None if row["project_id"] is None else str(row["project_id"]))
                      for row in rows})
    return found


def _keep(database: Database, answers: Mapping[int, Confirmation]) -> None:
    now = time.time()
    rows = [(state.value, now, annotation_id) for annotation_id, state in answers.items()]
    database.write(lambda db: db.executemany(
        "UPDATE annotations SET confirmation = ?, confirmed_at = ? WHERE annotation_id = ?", rows))
