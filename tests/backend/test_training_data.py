"""The fine-tune's image cache keeps a copy of a task image IMAGE_CACHE_RETENTION_DAYS after its last fetch,
then forgets it (file and row); an image still needed is fetched again. On SQLite and on PostgreSQL."""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from pathlib import Path

import pytest

from backend.settings import Settings, SettingsError
from backend.store import Database
from backend.training_data import IMAGE_CACHE_DIR, local_images
from tests.support import free_port
from tests.support.hitl import make_tasks
from tests.support.redis_server import KEY_PREFIX

DAY_S = 86_400


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    """Settings with their own database, DATA_DIR and local images (30 days of retention, the default)."""
    return Settings.from_env({}, data_dir=tmp_path / "data", model_dir=tmp_path / "models",
                             database_url=database_url, local_files_document_root=str(tmp_path / "images"),
                             redis_url=f"redis://127.0.0.1:{free_port()}/0", key_prefix=KEY_PREFIX)


def fetched_long_ago(settings: Settings, reference: str, path: Path, days: float) -> None:
    """Make the cache look as if `reference` (stored as `path`) was last fetched `days` ago."""
    moment = time.time() - days * DAY_S
    Database.for_settings(settings).write(lambda db: db.execute(
        "UPDATE images SET fetched_at = ? WHERE reference = ?", (moment, reference)))
    os.utime(path, (moment, moment))


def cached_references(settings: Settings) -> set[str]:
    return {row[0] for row in Database.for_settings(settings).read().execute("SELECT reference FROM images")}


def test_images_past_the_retention_are_forgotten_and_fetched_again_when_needed(settings, tmp_path):
    old, recent = make_tasks(tmp_path / "images", "b", 1, 2, seed=41)
    images, _ = local_images(settings, [(old.reference, "1"), (recent.reference, "2")])
    old_path, recent_path = images[old.reference][0], images[recent.reference][0]
    fetched_long_ago(settings, old.reference, old_path, days=31)
    leftover = Path(settings.data_dir) / IMAGE_CACHE_DIR / "interrupted.png.123.tmp"
    leftover.write_bytes(b"half a png")
    os.utime(leftover, (time.time() - 31 * DAY_S,) * 2)

    again, failed = local_images(settings, [(recent.reference, "2")])

    assert failed == {} and again == {recent.reference: images[recent.reference]}
    assert cached_references(settings) == {recent.reference}
    assert not old_path.exists() and not leftover.exists() and recent_path.exists()

    # Still needed by a later fine-tune: fetched again, and kept another IMAGE_CACHE_RETENTION_DAYS.
    refetched, failed = local_images(settings, [(old.reference, "1")])
    assert failed == {} and refetched[old.reference] == images[old.reference]
    assert old_path.exists() and cached_references(settings) == {old.reference, recent.reference}


def test_a_file_shared_by_references_lives_as_long_as_its_latest_fetch(settings, tmp_path):
    [task] = make_tasks(tmp_path / "images", "b", 1, 1, seed=42)
    source = task.image_path(tmp_path / "images")
    shutil.copy(source, source.with_name("copy.png"))
    copy_reference = "/data/local-files/?d=b/copy.png"
    images, _ = local_images(settings, [(task.reference, "1")])
    path = images[task.reference][0]
    fetched_long_ago(settings, task.reference, path, days=20)
    shared, _ = local_images(settings, [(copy_reference, "2")])  # the same bytes: the same file
    assert shared[copy_reference][0] == path

    shorter = dataclasses.replace(settings, image_cache_retention_days=10)
    kept, failed = local_images(shorter, [(copy_reference, "2")])

    assert failed == {} and kept == shared and path.exists()
    assert cached_references(settings) == {copy_reference}


def test_the_retention_must_be_positive():
    with pytest.raises(SettingsError, match="IMAGE_CACHE_RETENTION_DAYS must be positive"):
        Settings.from_env({"IMAGE_CACHE_RETENTION_DAYS": "0"})
