"""Model versions on disk: immutable checkpoint folders, a `current` pointer, and its history.

Layout of MODEL_DIR (a local folder on one machine; on several, a volume every worker and fine-tune mounts):

    MODEL_DIR/
        current              # one line: the first current version, until the pointer is first moved
        <version>/           # a `save_pretrained` checkpoint, never modified once published
            version.json     # fine-tuned versions: parent, data counts, metrics, training config
        .staging-<version>/  # a version being written (never read by workers; removed if abandoned)

The current version is a row of the backend's database (`backend.store`: the SQLite file, or PostgreSQL
shared by every machine), moved by compare-and-swap, with every move recorded. Until a promotion, rollback
or `promote` first moves it, it is what the `current` file names, or, for a MODEL_DIR that is itself a
checkpoint (it has `config.json`), the folder's name. Reading it is one small query, so the API answers
`/setup` from it without touching the model, and workers read it before every job: a move made on any
machine reaches every worker before its next job.

Fine-tuned versions are named `v<NNNN>-<UTC time>-<engine>` (for example `v0003-20261126T041500-florence-2`,
so the version Label Studio shows says which model made it): the number grows by one per published version,
so names sort in creation order and never repeat. A version is published by renaming its finished staging
folder, so a worker never sees half a checkpoint.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from backend.settings import Settings
from backend.store import Connection, Database
from model.engine import EngineError, engine_of_checkpoint

CURRENT_FILE = "current"
# Moves of the pointer recorded by earlier releases, which kept it in a file; read, never written.
HISTORY_FILE = "history.jsonl"
POINTER = "current"
METADATA_FILE = "version.json"
STAGING_PREFIX = ".staging-"
VERSION_NAME = re.compile(r"^v(\d{4,})-(\d{8}T\d{6})(?:-[a-z0-9][a-z0-9.-]*)?$")


class RegistryError(LookupError):
    """No model is registered, or a version does not exist."""


class PointerMoved(RegistryError):
    """The current version is no longer the one a move was based on (someone else moved it first)."""


@dataclass(frozen=True)
class VersionInfo:
    """One registered version and what its `version.json` says (empty for versions made elsewhere)."""

    name: str
    path: Path
    current: bool
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def parent(self) -> str | None:
        """The version it was fine-tuned from."""
        return self.metadata.get("parent")

    @property
    def engine(self) -> str:
        """The engine that serves it: as its `version.json` says, else as its `config.json` implies."""
        named = self.metadata.get("engine")
        if named:
            return str(named)
        try:
            return engine_of_checkpoint(self.path)
        except EngineError:
            return "unknown"

    @property
    def created_at(self) -> str | None:
        """ISO time it was published, when known."""
        return self.metadata.get("created_at")


def current_version(settings: Settings) -> str:
    """The version every prediction is made and labelled with."""
    root = Path(settings.model_dir)
    if (root / "config.json").is_file():  # a single checkpoint: no registry, no pointer
        return root.resolve().name
    row = Database.for_settings(settings).read().execute(
        "SELECT version FROM model_pointer WHERE name = ?", (POINTER,)).fetchone()
    return row[0] if row else _initial_version(settings)


def _initial_version(settings: Settings) -> str:
    """The version before the pointer was first moved: the `current` file, or a single checkpoint's name."""
    root = Path(settings.model_dir)
    pointer = root / CURRENT_FILE
    try:
        version = pointer.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        if (root / "config.json").is_file():
            return root.resolve().name
        raise RegistryError(
            f"no model in MODEL_DIR={root}: expected a '{CURRENT_FILE}' file naming a version folder, "
            "or a checkpoint folder (with config.json)") from None
    if not version:
        raise RegistryError(f"{pointer} is empty; it should name the current version")
    return version


def checkpoint_path(settings: Settings, version: str) -> Path:
    """The checkpoint folder of `version`."""
    root = Path(settings.model_dir)
    _check_name(version)
    candidate = root / version
    if (candidate / "config.json").is_file():
        return candidate
    if (root / "config.json").is_file() and root.resolve().name == version:
        return root
    raise RegistryError(f"model version {version!r} has no checkpoint in MODEL_DIR={root}")


def list_versions(settings: Settings) -> list[str]:
    """Every version with a checkpoint: checkpoints registered by hand (by folder time), then fine-tuned
    versions by number, that is oldest first."""
    return [info.name for info in version_infos(settings)]


def version_infos(settings: Settings) -> list[VersionInfo]:
    """Every version with its metadata, in the order of `list_versions`."""
    root = Path(settings.model_dir)
    try:
        current: str | None = current_version(settings)
    except RegistryError:
        current = None
    if (root / "config.json").is_file():
        return [VersionInfo(root.resolve().name, root, True, _read_metadata(root))]
    if not root.is_dir():
        return []
    infos = []
    for folder in root.iterdir():
        if folder.name.startswith(".") or not (folder / "config.json").is_file():
            continue
        infos.append(VersionInfo(folder.name, folder, folder.name == current, _read_metadata(folder)))
    return sorted(infos, key=_age_key)


def read_metadata(settings: Settings, version: str) -> dict[str, Any]:
    """The `version.json` of a version (`{}` when it has none)."""
    return _read_metadata(checkpoint_path(settings, version))


def set_current(settings: Settings, version: str, reason: str = "", expected: str | None = None) -> str | None:
    """Point the current version at an existing version and record the move; returns the previous current
    version. With `expected`, the move happens only while the current version is still that one
    (`PointerMoved` otherwise): moves take turns in the database, so a fine-tune finishing after a rollback
    cannot undo it, whichever machines they ran on."""
    checkpoint_path(settings, version)
    root = Path(settings.model_dir)
    if (root / "config.json").is_file():
        raise RegistryError(f"MODEL_DIR={root} is a single checkpoint, not a registry; it has no pointer to move")
    database = Database.for_settings(settings)

    def move(db: Connection) -> str | None:
        database.serialize(db, "model-pointer")
        row = db.execute("SELECT version FROM model_pointer WHERE name = ?", (POINTER,)).fetchone()
        previous: str | None = row[0] if row else None
        if previous is None:
            try:
                previous = _initial_version(settings)
            except RegistryError:
                previous = None
        if expected is not None and previous != expected:
            raise PointerMoved(f"the current version became {previous} while this was based on {expected}")
        now = time.time()
        db.execute("INSERT INTO model_pointer (name, version, moved_at) VALUES (?, ?, ?) ON CONFLICT (name) "
                   "DO UPDATE SET version = excluded.version, moved_at = excluded.moved_at", (POINTER, version, now))
        db.execute("INSERT INTO pointer_moves (moved_at, version, previous, reason) VALUES (?, ?, ?, ?)",
                   (now, version, previous, reason))
        return previous

    return database.write(move)


def rollback(settings: Settings, version: str) -> str | None:
    """Move the pointer back to an earlier `version` (any registered version is allowed); returns the
    version that was current. Workers load it before their next job."""
    return set_current(settings, version, reason="rollback")


def history(settings: Settings) -> list[dict[str, Any]]:
    """Every recorded move of the pointer, oldest first."""
    moves = []
    legacy = Path(settings.model_dir) / HISTORY_FILE
    if legacy.is_file():
        with open(legacy, encoding="utf-8") as handle:
            moves += [json.loads(line) for line in handle if line.strip()]
    rows = Database.for_settings(settings).read().execute(
        "SELECT moved_at, version, previous, reason FROM pointer_moves ORDER BY seq").fetchall()
    moves += [{"time": _iso(row["moved_at"]), "version": row["version"], "previous": row["previous"],
               "reason": row["reason"]} for row in rows]
    return moves


def next_version_name(settings: Settings, now: dt.datetime | None = None, engine: str | None = None) -> str:
    """A new name `v<NNNN>-<UTC time>[-<engine>]`, numbered after every existing (or staged) version."""
    root = Path(settings.model_dir)
    highest = 0
    if root.is_dir():
        for entry in root.iterdir():
            match = VERSION_NAME.match(entry.name.removeprefix(STAGING_PREFIX))
            if match:
                highest = max(highest, int(match.group(1)))
    stamp = (now or dt.datetime.now(dt.UTC)).astimezone(dt.UTC).strftime("%Y%m%dT%H%M%S")
    suffix = re.sub(r"[^a-z0-9.-]+", "-", (engine or "").lower()).strip("-.")
    return f"v{highest + 1:04d}-{stamp}" + (f"-{suffix}" if suffix else "")


def staging_dir(settings: Settings, version: str) -> Path:
    """Where a version is written before `publish` (created empty)."""
    _check_name(version)
    root = Path(settings.model_dir)
    _require_registry(root)
    path = root / f"{STAGING_PREFIX}{version}"
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def publish(settings: Settings, staging: Path, version: str, metadata: dict[str, Any]) -> Path:
    """Write `version.json` into a finished staging folder, make its files read-only and rename it to
    `MODEL_DIR/<version>`. The pointer is not moved (see `set_current`)."""
    root = Path(settings.model_dir)
    _check_name(version)
    target = root / version
    if target.exists():
        raise RegistryError(f"model version {version!r} exists already; versions are never overwritten")
    if not (staging / "config.json").is_file():
        raise RegistryError(f"{staging} is not a checkpoint (no config.json); nothing published")
    metadata = {"name": version, "created_at": _iso(time.time()), **metadata}
    (staging / METADATA_FILE).write_text(json.dumps(metadata, indent=2, default=str) + "\n", encoding="utf-8")
    for path in staging.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
            path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    staging.rename(target)
    _fsync_dir(root)
    return target


def discard_staging(settings: Settings) -> list[str]:
    """Remove staging folders left by interrupted fine-tunes (call only while holding the fine-tune lock)."""
    root = Path(settings.model_dir)
    removed = []
    if root.is_dir():
        for entry in root.iterdir():
            if entry.is_dir() and entry.name.startswith(STAGING_PREFIX):
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry.name)
    return removed


def import_checkpoint(settings: Settings, source: Path, version: str, *, symlink: bool = False,
                      make_current: bool = True, metadata: dict[str, Any] | None = None) -> Path:
    """Register an existing checkpoint folder as `version` (copied, or linked with `symlink`), for example
    the first model of a new registry; a copy gets `metadata` (its engine, its base model) as `version.json`."""
    _check_name(version)
    source = Path(source).resolve()
    if not (source / "config.json").is_file():
        raise RegistryError(f"{source} is not a checkpoint (no config.json)")
    root = Path(settings.model_dir)
    root.mkdir(parents=True, exist_ok=True)
    _require_registry(root)
    target = root / version
    if target.exists() or target.is_symlink():
        raise RegistryError(f"model version {version!r} exists already in MODEL_DIR={root}")
    if symlink:
        target.symlink_to(source, target_is_directory=True)
    else:
        staging = staging_dir(settings, version)
        shutil.rmtree(staging)
        shutil.copytree(source, staging, ignore=shutil.ignore_patterns(".cache", METADATA_FILE))
        publish(settings, staging, version, {"imported_from": str(source), **(metadata or {})})
    if make_current:
        set_current(settings, version, reason="import")
    return target


def _check_name(version: str) -> None:
    if not version or "/" in version or version in {".", ".."} or version.startswith("."):
        raise RegistryError(f"invalid model version name {version!r}")


def _require_registry(root: Path) -> None:
    if (root / "config.json").is_file():
        raise RegistryError(
            f"MODEL_DIR={root} is a single checkpoint, not a registry: move it into MODEL_DIR/<name>/ and "
            f"write <name> into MODEL_DIR/{CURRENT_FILE} to let fine-tunes add versions")


def _read_metadata(folder: Path) -> dict[str, Any]:
    path = folder / METADATA_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _age_key(info: VersionInfo) -> tuple[int, float, str]:
    # Numbered versions sort by their number (it grows with every publication, whatever the clock says);
    # checkpoints registered by hand come first, by folder time.
    match = VERSION_NAME.match(info.name)
    if match:
        return (1, float(match.group(1)), info.name)
    return (0, info.path.stat().st_mtime, info.name)


def _iso(timestamp: float) -> str:
    return dt.datetime.fromtimestamp(timestamp, dt.UTC).isoformat(timespec="seconds")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
