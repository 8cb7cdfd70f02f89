"""The engine interface: what the backend asks of a region model, whatever the model is.

An engine is one model family (GPT4RoI, Florence-2, …) behind the same semantic requests:

- `caption`: a short description of each region, or the text written in it (`TRANSCRIPTION`);
- `choose`: a probability distribution over closed-set values (a Choices control's values, the label names)
  for an attribute of each region; the region's label is the attribute `LABEL`;
- `propose` (an engine whose `can_propose` is true): the regions of an image for a set of label names, each
  with its label and a score (`ProposalRequest`, `Proposal`);
- `finetune` on `Example`s (an annotator's final answer to one such request) and `save_pretrained`.

Each engine builds its own prompts, encodes each distinct image once per call and answers many regions (of
many images) per call. Boxes are normalized `(x1, y1, x2, y2)` in [0, 1] of the image the engine is given.

This module imports no torch: the registry is read by processes that hold no model. An engine is added by
its folder under `model/` and one line in `ENGINES`.
"""

from __future__ import annotations

import abc
import importlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

Box = tuple[float, float, float, float]

LABEL = "category"
"""The attribute name under which a region's label (RectangleLabels and its kin) is asked and trained."""

CAPTION = "caption"
TRANSCRIPTION = "transcription"
"""What a `CaptionRequest` (and an `Example` without an attribute) is about: a description of the region, or
the text written in it (OCR)."""
TEXT_KINDS = (CAPTION, TRANSCRIPTION)


class EngineError(RuntimeError):
    """An engine cannot be found, loaded or asked what it was asked; the message says what to do."""


@dataclass(frozen=True)
class CaptionRequest:
    """Describe the region `box` of `image` (a PIL image; requests on the same object share one encoding), or,
    when `kind` is `TRANSCRIPTION`, read the text written in it."""

    image: Any
    box: Box
    kind: str = CAPTION


@dataclass(frozen=True)
class ChoiceRequest:
    """Which of `candidates` is the value of `attribute` (a Choices control's name, or `LABEL`) for the region."""

    image: Any
    box: Box
    attribute: str
    candidates: tuple[str, ...]


@dataclass(frozen=True)
class Answer:
    """Generated text with the model's confidence in it (e.g. the geometric mean of its token probabilities),
    or None where the engine has no such figure."""

    text: str
    confidence: float | None = None


SHAPES = ("box", "polygon")


@dataclass(frozen=True)
class ProposalRequest:
    """Find the regions of `image` (a PIL image) that show one of `labels` (a region tool's label names; none:
    whatever objects the model finds, named in its own words), as boxes or as polygons (`shape`).

    `max_regions`: keep at most this many (the best scored); `max_new_tokens`: the longest answer the model
    may generate for one prompt (each region costs a few tokens, a polygon many)."""

    image: Any
    labels: tuple[str, ...] = ()
    shape: str = "box"
    max_regions: int | None = None
    max_new_tokens: int = 1024

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise EngineError(f"a proposal's shape is one of {', '.join(SHAPES)}, got {self.shape!r}")


@dataclass(frozen=True)
class Proposal:
    """One region an engine found: its label (one of the request's labels, or the model's own words when the
    request named none), its box in pixels `(x1, y1, x2, y2)` of the image it was given, its outline as pixel
    `(x, y)` points for a polygon request (None for boxes), and the model's score for it in [0, 1] (how each
    engine scores is in its docstring)."""

    label: str
    box: Box
    score: float
    polygon: tuple[tuple[float, float], ...] | None = None


@dataclass(frozen=True)
class Example:
    """One training example: the answer an annotator kept for one question about one region.

    image: path of the image file; width, height: its size in pixels; box: pixel `(x1, y1, x2, y2)`;
    attribute: None for the caption (or, `kind` `TRANSCRIPTION`, the text in the region), else the attribute's
    name (`LABEL` for the label); answer: the text.
    """

    id: str
    image: str
    width: int
    height: int
    box: Box
    attribute: str | None
    answer: str
    meta: Mapping[str, Any] = field(default_factory=dict)
    kind: str = CAPTION


@dataclass(frozen=True)
class FinetuneConfig:
    """How long and how hard a fine-tune trains; engines choose what trains (their LoRA targets)."""

    learning_rate: float = 2e-4
    epochs: float = 3.0
    max_steps: int | None = None
    lora_rank: int = 16
    seed: int = 0
    # Engines with a learnt region encoder (GPT4RoI) scale its learning rate by this; others ignore it.
    region_lr_scale: float = 1.0
    progress: bool = False


@dataclass(frozen=True)
class FinetuneResult:
    steps: int
    seconds: float
    first_loss: float
    last_loss: float
    settings: Mapping[str, Any] = field(default_factory=dict)


class Engine(abc.ABC):
    """A region model kept resident by a worker or a fine-tune (see the module docstring)."""

    name: ClassVar[str]
    can_propose: ClassVar[bool] = False
    """Whether `propose` finds regions; an engine that cannot says so when asked."""

    @classmethod
    @abc.abstractmethod
    def from_pretrained(cls, path: str | Path, device: str = "cpu", dtype: str | None = None,
                        options: Mapping[str, str] | None = None) -> Engine:
        """Load a checkpoint folder or hub id onto `device`; `dtype` a torch dtype name, None for the engine's
        default on that device (bf16 on CUDA, fp32 on the CPU); `options` the engine's own settings
        (ENGINE_OPTIONS), an unknown one raising `EngineError`."""

    @abc.abstractmethod
    def caption(self, requests: Sequence[CaptionRequest], max_new_tokens: int = 32) -> list[Answer]:
        """One caption per request, greedy."""

    @abc.abstractmethod
    def choose(self, requests: Sequence[ChoiceRequest]) -> list[dict[str, float]]:
        """Per request, a probability distribution over its candidates (by the model's likelihood of each)."""

    @abc.abstractmethod
    def generate(self, records: Sequence[Any], max_new_tokens: int = 32) -> list[str]:
        """Free answers to dataset records' questions (`model.data_format.RegionSample`), for evaluation."""

    @abc.abstractmethod
    def finetune(self, examples: Sequence[Example], config: FinetuneConfig,
                 records: Sequence[Any] = ()) -> FinetuneResult:
        """Train on `examples` (plus dataset `records`, e.g. replayed base data) with LoRA; the engine answers
        as the trained model afterwards."""

    @abc.abstractmethod
    def save_pretrained(self, path: str | Path) -> None:
        """Write a checkpoint folder `from_pretrained` loads, in the dtype the checkpoint was stored in: after a
        fine-tune, the adapter merged into the weights, and the adapter alone under `lora/`."""

    def propose(self, requests: Sequence[ProposalRequest]) -> list[list[Proposal]]:
        """Per request, the regions found (best scored first). An engine that cannot find regions raises
        `EngineError` saying so (`can_propose` is false)."""
        raise EngineError(f"engine {self.name} cannot propose regions: it describes regions it is given; set "
                          "PROPOSER to an engine that can (florence-2)")

    def forget_images(self) -> None:  # noqa: B027 - an engine without an image cache has nothing to forget
        """Drop cached image features (a new version is about to answer)."""


@dataclass(frozen=True)
class Registration:
    """An engine's name in settings, the class that implements it, the `model_type` of its checkpoints'
    `config.json`, the base model used when no version exists yet, and whether its engine can propose
    regions (its class's `can_propose`, known here without importing it)."""

    name: str
    implementation: str
    model_type: str
    default_base_model: str
    proposes: bool = False


ENGINES: dict[str, Registration] = {
    registration.name: registration for registration in (
        Registration("gpt4roi", "model.gpt4roi.engine.GPT4RoIEngine", "gpt4roi", "demo"),
        Registration("florence-2", "model.florence2.engine.Florence2Engine", "florence2",
                     "florence-community/Florence-2-base-ft", proposes=True),
        Registration("qwen3-vl", "model.qwen3vl.engine.Qwen3VLEngine", "qwen3_vl", "Qwen/Qwen3-VL-2B-Instruct"),
    )
}


def registration(name: str) -> Registration:
    try:
        return ENGINES[name]
    except KeyError:
        raise EngineError(f"unknown engine {name!r}: ENGINE must be one of {', '.join(sorted(ENGINES))}, or the "
                          "dotted path of an Engine subclass") from None


def engine_class(name: str) -> type[Engine]:
    """The class of a registered engine, or of a dotted path `package.module.Class`."""
    dotted = ENGINES[name].implementation if name in ENGINES else name
    if "." not in dotted:
        registration(name)  # raises with the list of names
    module_name, _, class_name = dotted.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        raise EngineError(f"engine {name!r} cannot be imported ({exc})") from None
    if not (isinstance(cls, type) and issubclass(cls, Engine)):
        raise EngineError(f"engine {name!r} is not an Engine subclass")
    return cls


def engine_of_checkpoint(path: str | Path) -> str:
    """The registered engine a checkpoint folder belongs to, from its `config.json` `model_type`."""
    config = Path(path) / "config.json"
    try:
        model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError) as exc:
        raise EngineError(f"{config} cannot be read ({exc}): not a model checkpoint") from None
    for candidate in ENGINES.values():
        if candidate.model_type == model_type:
            return candidate.name
    raise EngineError(f"{config}: no engine is registered for model_type {model_type!r} "
                      f"(known: {', '.join(sorted(e.model_type for e in ENGINES.values()))})")


def load_engine(path: str | Path, device: str = "cpu", dtype: str | None = None,
                engine: str | None = None, options: Mapping[str, str] | None = None) -> Engine:
    """Load a checkpoint with its own engine (or `engine`, a name or dotted path, when given)."""
    cls = engine_class(engine or engine_of_checkpoint(path))
    return cls.from_pretrained(path, device=device, dtype=dtype, options=options)


def check_options(engine: str, options: Mapping[str, str] | None, known: Mapping[str, Sequence[str]]) -> dict[str, str]:
    """`options` validated against `known` (name → allowed values, empty for any value)."""
    checked = dict(options or {})
    for name, value in checked.items():
        if name not in known:
            raise EngineError(f"the {engine} engine has no option {name!r} (ENGINE_OPTIONS); it has "
                              f"{', '.join(sorted(known)) or 'none'}")
        if known[name] and value not in known[name]:
            raise EngineError(f"the {engine} engine's option {name} must be one of {', '.join(known[name])}, "
                              f"got {value!r}")
    return checked
