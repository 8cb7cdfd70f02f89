"""The model registry: immutable versions, the current pointer, its history, rollback and the CLI views."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

import pytest

from backend import registry
from backend.registry import RegistryError
from backend.runs import FinetuneRuns, RunStatus
from backend.settings import Settings
from tests.support import REPO


def fake_checkpoint(path: Path, marker: str = "x") -> Path:
    """A folder the registry accepts as a checkpoint (it only looks for config.json)."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"marker": marker}))
    (path / "model.safetensors").write_bytes(marker.encode())
    return path


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    """A registry whose first version is `base`, its pointer in SQLite or in PostgreSQL."""
    root = tmp_path / "models"
    fake_checkpoint(root / "base")
    (root / "current").write_text("base\n")
    return Settings.from_env({}, model_dir=root, data_dir=tmp_path / "data", database_url=database_url)


def publish(settings: Settings, parent: str, when: dt.datetime, engine: str | None = None,
            **metadata: object) -> str:
    name = registry.next_version_name(settings, when, engine)
    staging = registry.staging_dir(settings, name)
    (staging / "config.json").write_text("{}")
    registry.publish(settings, staging, name, {"parent": parent, **metadata})
    return name


def test_version_names_are_numbered_sortable_and_unique(settings):
    first = registry.next_version_name(settings, dt.datetime(2026, 11, 26, 4, 15, tzinfo=dt.UTC))
    assert first == "v0001-20261126T041500"
    one = publish(settings, "base", dt.datetime(2026, 11, 26, 4, 15, tzinfo=dt.UTC))
    # Same second, and even an earlier clock: the number still grows.
    two = publish(settings, one, dt.datetime(2026, 11, 26, 4, 15, tzinfo=dt.UTC))
    staged = registry.next_version_name(settings, dt.datetime(2025, 1, 1, tzinfo=dt.UTC))
    registry.staging_dir(settings, staged)
    assert (one, two, staged) == ("v0001-20261126T041500", "v0002-20261126T041500", "v0003-20250101T000000")
    assert registry.next_version_name(settings).startswith("v0004-")
    assert sorted([two, one]) == [one, two]
    # The engine that made a version ends its name, and takes part in the numbering like any other.
    three = publish(settings, two, dt.datetime(2026, 11, 27, tzinfo=dt.UTC), engine="florence-2")
    assert three == "v0004-20261127T000000-florence-2"
    assert registry.next_version_name(settings, dt.datetime(2026, 11, 28, tzinfo=dt.UTC)) == "v0005-20261128T000000"
    assert registry.list_versions(settings)[-2:] == [two, three]


def test_a_published_version_is_complete_read_only_and_never_overwritten(settings):
    name = publish(settings, "base", dt.datetime.now(dt.UTC), data={"new_regions": 3})
    folder = Path(settings.model_dir) / name
    metadata = json.loads((folder / registry.METADATA_FILE).read_text())
    assert metadata["name"] == name and metadata["parent"] == "base" and metadata["data"] == {"new_regions": 3}
    assert dt.datetime.fromisoformat(metadata["created_at"]).tzinfo is not None
    assert all(not (p.stat().st_mode & 0o222) for p in folder.iterdir())
    assert registry.read_metadata(settings, name)["parent"] == "base"

    staging = registry.staging_dir(settings, name)
    (staging / "config.json").write_text("{}")
    with pytest.raises(RegistryError, match="exists already; versions are never overwritten"):
        registry.publish(settings, staging, name, {})
    empty = registry.staging_dir(settings, "v9999-20260101T000000")
    with pytest.raises(RegistryError, match="not a checkpoint"):
        registry.publish(settings, empty, "v9999-20260101T000000", {})


def test_staging_folders_are_invisible_and_discarded(settings):
    registry.staging_dir(settings, "v0001-20260101T000000")
    assert registry.list_versions(settings) == ["base"]
    assert registry.discard_staging(settings) == [".staging-v0001-20260101T000000"]
    assert not any(p.name.startswith(".staging-") for p in Path(settings.model_dir).iterdir())


def test_the_pointer_moves_atomically_with_history_and_rolls_back(settings):
    one = publish(settings, "base", dt.datetime(2026, 11, 26, 5, tzinfo=dt.UTC))
    two = publish(settings, one, dt.datetime(2026, 11, 26, 6, tzinfo=dt.UTC))
    assert registry.set_current(settings, one, reason="promoted") == "base"
    assert registry.set_current(settings, two, reason="promoted") == one
    assert registry.current_version(settings) == two
    assert registry.rollback(settings, "base") == two
    assert registry.current_version(settings) == "base"
    assert [(h["previous"], h["version"], h["reason"]) for h in registry.history(settings)] == [
        ("base", one, "promoted"), (one, two, "promoted"), (two, "base", "rollback")]
    assert registry.list_versions(settings) == ["base", one, two]
    with pytest.raises(RegistryError, match="has no checkpoint"):
        registry.rollback(settings, "v0042-20260101T000000")
    assert registry.current_version(settings) == "base"


def test_a_single_checkpoint_model_dir_is_served_but_cannot_take_new_versions(tmp_path):
    single = Settings.from_env({}, model_dir=fake_checkpoint(tmp_path / "demo-7"), data_dir=tmp_path / "data")
    assert registry.current_version(single) == "demo-7"
    assert registry.list_versions(single) == ["demo-7"]
    with pytest.raises(RegistryError, match="single checkpoint, not a registry"):
        registry.staging_dir(single, "v0001-20260101T000000")


def test_an_existing_checkpoint_can_be_imported_as_a_version(tmp_path):
    source = fake_checkpoint(tmp_path / "trained-elsewhere", marker="m")
    settings = Settings.from_env({}, model_dir=tmp_path / "registry", data_dir=tmp_path / "data")
    registry.import_checkpoint(settings, source, "demo", symlink=True)
    assert registry.current_version(settings) == "demo"
    assert registry.checkpoint_path(settings, "demo").resolve() == source
    with pytest.raises(RegistryError, match="exists already"):
        registry.import_checkpoint(settings, source, "demo")


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", ".staging-v1"])
def test_bad_version_names_are_refused(settings, name):
    with pytest.raises(RegistryError, match="invalid model version name"):
        registry.checkpoint_path(settings, name)


def cli(settings: Settings, *args: str) -> subprocess.CompletedProcess:
    env = {"MODEL_DIR": str(settings.model_dir), "DATA_DIR": str(settings.data_dir), "PATH": "/usr/bin:/bin",
           "PYTHONPATH": str(REPO), "DATABASE_URL": settings.database_url}
    return subprocess.run([sys.executable, "-m", "backend", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)


def test_versions_and_rollback_on_the_command_line(settings):
    one = publish(settings, "base", dt.datetime(2026, 11, 26, 5, tzinfo=dt.UTC), promoted=True,
                  metrics={"candidate": {"field_accuracy_overall": 0.9}, "parent": {"field_accuracy_overall": 0.5}},
                  data={"new_regions": 40, "replay_regions": 10, "eval_regions": 12})
    registry.set_current(settings, one, reason="promoted")
    runs = FinetuneRuns.for_settings(settings)
    run = runs.start("START_TRAINING", one)
    runs.finish(run, RunStatus.FAILED, "no usable training record among 3 new corrected regions: HTTP 404")

    listed = cli(settings, "versions")
    assert listed.returncode == 0, listed.stderr
    rows = {line.split()[1] if line.startswith("*") else line.split()[0]: line for line in listed.stdout.splitlines()
            if line.startswith(("*", "  "))}
    assert rows[one].startswith("* ") and "0.900 vs 0.500" in rows[one] and "40 new, 10 replay" in rows[one]
    assert rows["base"].startswith("  base")
    assert "last fine-tune: run 1 failed" in listed.stdout and "HTTP 404" in listed.stdout

    back = cli(settings, "rollback", "base")
    assert back.returncode == 0 and f"current version: base (was {one})" in back.stdout
    assert registry.current_version(settings) == "base"
    unknown = cli(settings, "rollback", "nope")
    assert unknown.returncode == 2 and "unknown version 'nope'" in unknown.stderr


def test_a_move_based_on_a_version_fails_once_someone_else_moved_the_pointer(settings):
    one = publish(settings, "base", dt.datetime(2026, 11, 26, 5, tzinfo=dt.UTC))
    registry.set_current(settings, "base", reason="start")
    registry.set_current(settings, one, reason="promoted", expected="base")
    with pytest.raises(registry.PointerMoved, match=f"became {one}"):
        registry.set_current(settings, "base", reason="late promotion", expected="base")
    assert registry.current_version(settings) == one
