"""What a fine-tune trains and evaluates on: corrected regions as training records, their images as local
files, and the held-out split.

- `local_images`: task images fetched once with the worker's rules (`backend.images`: tokens, limits, the
  fetch policy), decoded as the annotator saw them (EXIF orientation applied) and kept as PNG under
  `DATA_DIR/image-cache/<sha256 of the fetched bytes>.png`; the `images` table remembers which reference
  became which file. A copy is kept IMAGE_CACHE_RETENTION_DAYS after its last fetch: each call first forgets
  older rows and removes older files, and a fine-tune that still needs such an image fetches it again, under
  the fetch policy and permissions of that day.
- `training_examples`: one example per field the corrections answer (`model.engine.Example`).
- `split_held_out`: a fixed share of tasks, chosen by a hash of the task id, is kept for evaluation.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from backend.annotations import CorrectedRegion, int_or_none
from backend.images import ImageError, ImageLoader, decode_image
from backend.labelconfig import path_of
from backend.settings import Settings
from backend.store import Database
from model.engine import CAPTION, LABEL, Example

log = logging.getLogger(__name__)

IMAGE_CACHE_DIR = "image-cache"
LocalImage = tuple[Path, int, int]
_DAY_S = 86_400


def local_images(settings: Settings, references: Iterable[tuple[str, str | None]],
                 loader: ImageLoader | None = None) -> tuple[dict[str, LocalImage], dict[str, str]]:
    """Local copies of task images: reference → (path, width, height), and reference → error for those
    that could not be fetched (see the module docstring)."""
    database = Database.for_settings(settings)
    cache = Path(settings.data_dir) / IMAGE_CACHE_DIR
    cache.mkdir(parents=True, exist_ok=True)
    _prune(database, cache, time.time() - settings.image_cache_retention_days * _DAY_S)
    found: dict[str, LocalImage] = {}
    failed: dict[str, str] = {}
    owned = loader is None
    loader = loader or ImageLoader(settings)
    try:
        for reference, task_id in references:
            if reference in found or reference in failed:
                continue
            known = _cached(database, reference)
            if known is not None:
                found[reference] = known
                continue
            try:
                found[reference] = _fetch(settings, database, loader, cache, reference, int_or_none(task_id))
            except ImageError as exc:
                failed[reference] = str(exc)
    finally:
        if owned:
            loader.close()
    return found, failed


def _fetch(settings: Settings, database: Database, loader: ImageLoader, cache: Path, reference: str,
           task_id: int | None) -> LocalImage:
    data = loader.fetch(reference, task_id)
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
        # Another reference with the same bytes wrote it earlier; its age must count from this fetch too.
        os.utime(path)
    database.write(lambda db: db.execute(
        "INSERT INTO images (reference, sha256, path, width, height, fetched_at) VALUES (?, ?, ?, ?, ?, ?) "
        "ON CONFLICT (reference) DO UPDATE SET sha256 = excluded.sha256, path = excluded.path, "
        "width = excluded.width, height = excluded.height, fetched_at = excluded.fetched_at",
        (reference, digest, str(path), size[0], size[1], time.time())))
    return path, size[0], size[1]


def _prune(database: Database, cache: Path, cutoff: float) -> None:
    """Forget images fetched before `cutoff`: their rows, and the files of this machine's cache that no fetch
    has touched since (a file's modification time is its last fetch; files another machine's rows name are
    pruned by that machine)."""
    forgotten = database.write(lambda db: db.execute("DELETE FROM images WHERE fetched_at < ?", (cutoff,)).rowcount)
    removed = 0
    for path in cache.iterdir():
        try:
            if path.is_file() and path.stat().st_mtime < cutoff:
                path.unlink()
                removed += 1
        except FileNotFoundError:
            continue  # removed meanwhile by another process
    if forgotten or removed:
        log.info("image cache: forgot %d reference(s) and removed %d file(s) past IMAGE_CACHE_RETENTION_DAYS",
                 forgotten, removed)


def _cached(database: Database, reference: str) -> LocalImage | None:
    row = database.read().execute("SELECT path, width, height FROM images WHERE reference = ?",
                                  (reference,)).fetchone()
    if row is None or not Path(row["path"]).is_file():
        return None
    return Path(row["path"]), int(row["width"]), int(row["height"])


def training_examples(regions: Sequence[CorrectedRegion], images: Mapping[str, LocalImage]) -> list[Example]:
    """The regions as training examples (`model.engine.Example`), one per field the corrections answer: the
    caption, each Choices control's chosen values (one example per value; a Taxonomy's per level of its
    path), the label (attribute `LABEL`).
    Regions whose image is missing from `images` are left out."""
    examples: list[Example] = []
    for item in regions:
        local = images.get(item.image)
        if local is None:
            continue
        path, width, height = local
        x1, y1, x2, y2 = item.box
        box = (x1 * width, y1 * height, x2 * width, y2 * height)
        meta = {"source": "correction", "annotation_id": item.annotation_id, "task_id": item.task_id,
                "region_id": item.region_id, "seq": item.seq}
        fields: list[tuple[str, str | None, str]] = []
        text_kind = item.plan.text_kind(item.region) if item.plan else CAPTION
        if item.caption:
            fields.append((text_kind, None, item.caption))
        for control, values in sorted(item.choices.items()):
            fields += _choice_fields(item, control, values)
        if item.label:
            fields.append((LABEL, LABEL, item.label))
        for key, attribute, answer in fields:
            examples.append(Example(id=f"ann{item.annotation_id}-{item.region_id}-{key}", image=str(path),
                                    width=width, height=height, box=box, attribute=attribute, answer=answer,
                                    meta=meta, kind=text_kind))
    return examples


def _choice_fields(item: CorrectedRegion, control: str, values: Sequence[str]) -> list[tuple[str, str, str]]:
    """(key, attribute, answer) per chosen value; a Taxonomy path gives one per level, the question its walk
    asks there (`backend.describe`)."""
    definition = item.plan.control(control) if item.plan else None
    if definition is None or not definition.tree:
        return [(f"{control}-{value}", control, value) for value in values]
    levels = dict.fromkeys((depth, level) for value in values for depth, level in enumerate(path_of(value)))
    return [(f"{control}-{depth}-{level}", control, level) for depth, level in levels]


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
