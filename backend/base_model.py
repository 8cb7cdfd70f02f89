"""The first version of an empty MODEL_DIR: the base model ENGINE and BASE_MODEL name.

- `gpt4roi` without BASE_MODEL: the CPU demo model (shipped with the repository, or trained once into the
  cache when its recipe changed);
- otherwise BASE_MODEL, a local checkpoint folder or a hub id (default: the engine's registered base, e.g.
  florence-community/Florence-2-base-ft), downloaded into the Hugging Face cache with visible progress.

Either is copied into `MODEL_DIR/<name>/` with a `version.json` naming its engine and base model, and made
current. Torch is not needed here: the worker loads the model.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from backend import registry
from backend.settings import Settings
from model.engine import ENGINES, EngineError, engine_of_checkpoint

log = logging.getLogger(__name__)


class BaseModelUnavailable(RuntimeError):
    """The base model can be neither found nor downloaded; the message says how to provide it."""


def ensure_first_version(settings: Settings) -> str:
    """The current version, registering the base model first when MODEL_DIR holds none."""
    try:
        return registry.current_version(settings)
    except registry.RegistryError:
        pass
    engine = settings.engine if settings.engine in ENGINES else "gpt4roi"
    if engine == "gpt4roi" and not settings.base_model:
        from model.demo import demo_version_name, ensure_demo_checkpoint

        name = demo_version_name()
        if not _adopt(settings, name):
            log.info("no model in MODEL_DIR=%s: registering the demo model", settings.model_dir)
            registry.import_checkpoint(settings, ensure_demo_checkpoint(), name,
                                       metadata={"engine": engine, "base_model": name})
        return name
    base = settings.base_model or ENGINES[engine].default_base_model
    name = version_name(base)
    if _adopt(settings, name):
        return name
    folder = _local_copy(base)
    try:
        made_by = engine_of_checkpoint(folder)
    except EngineError as exc:
        raise BaseModelUnavailable(f"BASE_MODEL={base}: {exc}") from None
    if made_by != engine:
        raise BaseModelUnavailable(f"BASE_MODEL={base} is a {made_by} checkpoint, but ENGINE={settings.engine}: "
                                   f"set ENGINE={made_by}, or a BASE_MODEL of the {engine} engine")
    log.info("registering %s (%s) as version %s in MODEL_DIR=%s", base, engine, name, settings.model_dir)
    registry.import_checkpoint(settings, folder, name, metadata={"engine": engine, "base_model": base})
    return name


def version_name(base: str) -> str:
    """The version a base model is registered under: the last part of its hub id or folder."""
    tail = re.sub(r"[^A-Za-z0-9._-]+", "-", base.rstrip("/").rsplit("/", 1)[-1]).strip(".-")
    return tail or "base"


def _adopt(settings: Settings, name: str) -> bool:
    # The folder without a pointer: a MODEL_DIR kept from an earlier DATA_DIR, whose database held the pointer.
    # Versions are immutable once written, so the folder is that version as registered then.
    if (Path(settings.model_dir) / name / "config.json").is_file():
        log.info("MODEL_DIR=%s holds %s without a current version: making it current", settings.model_dir, name)
        registry.set_current(settings, name, reason="adopt")
        return True
    return False


def _local_copy(base: str) -> Path:
    """A folder holding `base`: itself when it is one, else its snapshot in the Hugging Face cache."""
    folder = Path(base).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise BaseModelUnavailable(f"BASE_MODEL={base} is a folder without config.json: not a checkpoint")
        return folder
    if base.startswith((".", "/", "~")) or base.count("/") != 1:
        raise BaseModelUnavailable(f"BASE_MODEL={base} is neither a checkpoint folder nor a hub id (owner/name)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    log.info("downloading %s from the Hugging Face hub (once; later starts use the cache)", base)
    try:
        path = Path(snapshot_download(base))
    except LocalEntryNotFoundError:
        raise BaseModelUnavailable(
            f"BASE_MODEL={base} is not in the Hugging Face cache and cannot be downloaded (offline, or no "
            f"network): run `huggingface-cli download {base}` where the hub is reachable and copy the cache "
            "(HF_HOME), or set BASE_MODEL to a local checkpoint folder") from None
    except (HfHubHTTPError, OSError) as exc:
        raise BaseModelUnavailable(f"BASE_MODEL={base} cannot be downloaded ({type(exc).__name__}: "
                                   f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}); check the id, or "
                                   "set BASE_MODEL to a local checkpoint folder") from None
    log.info("%s downloaded to %s", base, path)
    return path
