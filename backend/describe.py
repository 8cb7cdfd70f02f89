"""Describing regions with a resident engine: what the worker answers and what a fine-tune evaluates.

`describe` asks the engine (`model.engine`), for every region of one image, the caption and each closed-set
question the labeling config needs (its Choices controls, the region's label), in one `caption` and
one `choose` call; `describe_many` does the same for the regions of several images (a worker's batch of
jobs). `load_engine` loads a checkpoint with its own engine; `resolve_device` and `release_memory` are the
device handling both callers share.

Only workers and fine-tunes import this module (the API never does: it holds no model); torch is imported
inside the functions all the same, so that importing it is cheap.
"""

from __future__ import annotations

import dataclasses
import gc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backend.calibration import Calibration, confidences
from backend.labelconfig import FillPlan, Region, TaxonomyTree, path_key, wants_label
from model.engine import LABEL, CaptionRequest, ChoiceRequest, Engine, engine_of_checkpoint
from model.engine import load_engine as load_checkpoint


@dataclass(frozen=True)
class Description:
    """What to describe on one image: its regions, with the labeling config's fill plan."""

    image: Any
    plan: FillPlan
    regions: Sequence[Region]
    keep_drawn_label: bool


def describe(engine: Engine, image: Any, plan: FillPlan, regions: Sequence[Region], keep_drawn_label: bool,
             max_new_tokens: int, calibration: Calibration | None = None) -> list[dict[str, Any]]:
    """Per region `{"id", "caption", "caption_confidence", "choices": {control: distribution},
    "label": distribution | None, "confidence"}`: `confidence` holds each field's confidence
    (`backend.calibration.confidences`), calibrated by `calibration` (raw without one)."""
    return describe_many(engine, [Description(image, plan, regions, keep_drawn_label)], max_new_tokens,
                         calibration)[0]


def describe_many(engine: Engine, items: Sequence[Description], max_new_tokens: int,
                  calibration: Calibration | None = None) -> list[list[dict[str, Any]]]:
    """`describe` for several images (several jobs) at once: every caption of every item goes into one
    `caption` call and every closed-set question into one `choose` call. Returns one answer list per item."""
    answers = [[{"id": r.id, "caption": None, "caption_confidence": None, "choices": {}, "label": None}
                for r in item.regions] for item in items]
    captions: list[tuple[CaptionRequest, dict[str, Any]]] = []
    choices: list[tuple[ChoiceRequest, dict[str, Any], str | None]] = []
    taxonomies: list[_TaxonomyStep] = []
    for item, item_answers in zip(items, answers, strict=True):
        plan = item.plan
        for region, answer in zip(item.regions, item_answers, strict=True):
            box = region.box()
            if wants_label(plan, region, item.keep_drawn_label):
                # The label is not known yet: every control it could make visible is asked.
                caption_controls, choice_controls = plan.captions_for(region), plan.choices_for(region)
                choices.append((ChoiceRequest(item.image, box, LABEL, plan.labels_for(region)), answer, None))
            else:
                label = region.labels[0] if region.labels else None
                caption_controls = plan.shown_captions(region, label)
                choice_controls = plan.shown_choices(region, label)
            if caption_controls:
                captions.append((CaptionRequest(item.image, box, plan.text_kind(region)), answer))
            for control in choice_controls:
                if control.tree:
                    taxonomies.append(_TaxonomyStep(item.image, box, control.name, control.tree, (), 1.0, answer))
                else:
                    choices.append((ChoiceRequest(item.image, box, control.name, tuple(control.candidates)),
                                    answer, control.name))
    if captions:
        generated = engine.caption([request for request, _ in captions], max_new_tokens=max_new_tokens)
        for (_, answer), result in zip(captions, generated, strict=True):
            answer["caption"], answer["caption_confidence"] = result.text, result.confidence
    if choices:
        distributions = engine.choose([request for request, _, _ in choices])
        for (_, answer, control), distribution in zip(choices, distributions, strict=True):
            clean = {str(k): float(v) for k, v in distribution.items()}
            if control is None:
                answer["label"] = clean
            else:
                answer["choices"][control] = clean
    _walk_taxonomies(engine, taxonomies)
    for item_answers in answers:
        for answer in item_answers:
            answer["confidence"] = confidences(answer, calibration)
    return answers


@dataclass(frozen=True)
class _TaxonomyStep:
    """One region's walk down a Taxonomy: the level below `path` is asked next; `probability` is that of
    `path`."""

    image: Any
    box: tuple[float, float, float, float]
    control: str
    children: TaxonomyTree
    path: tuple[str, ...]
    probability: float
    answer: dict[str, Any]


def _walk_taxonomies(engine: Engine, steps: list[_TaxonomyStep]) -> None:
    """Score Taxonomies level by level, one `choose` call per level for every region at once: the most
    likely value of a level decides which children are asked next. The answer is a distribution over the
    last level's paths (`path_key`), each weighted by the probability of the path above it, so the most
    likely one carries the probability of the whole path."""
    while steps:
        requests = [ChoiceRequest(s.image, s.box, s.control, tuple(value for value, _ in s.children)) for s in steps]
        deeper: list[_TaxonomyStep] = []
        for step, distribution in zip(steps, engine.choose(requests), strict=True):
            clean = {str(k): float(v) for k, v in distribution.items()}
            best = max(clean, key=clean.__getitem__)
            children = dict(step.children)[best]
            if children:
                deeper.append(dataclasses.replace(step, children=children, path=(*step.path, best),
                                                  probability=step.probability * clean[best]))
            else:
                step.answer["choices"][step.control] = {path_key((*step.path, value)): step.probability * p
                                                        for value, p in clean.items()}
        steps = deeper


def resolve_device(name: str) -> Any:
    """A torch device from a DEVICE / FINETUNE_DEVICE value (`auto`: CUDA when present)."""
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {name} was asked for, but CUDA is not available on this machine")
    return torch.device(name)


def load_engine(path: Path, device: Any, dtype: str = "auto", engine: str | None = None,
                options: Mapping[str, str] | None = None) -> Engine:
    """A checkpoint folder loaded by the engine that made it (its config.json says which), or by `engine`, a
    registered name or the dotted path of an Engine of one's own. `options` (ENGINE_OPTIONS) are named
    `<engine>.<option>`: the engine gets its own, so versions of several engines can share one setting.
    `dtype` `auto` lets the engine choose (bf16 on CUDA, fp32 on the CPU)."""
    name = engine or engine_of_checkpoint(path)
    own = {key.split(".", 1)[1]: value for key, value in (options or {}).items() if key.split(".", 1)[0] == name}
    return load_checkpoint(path, device=str(device), dtype=None if dtype == "auto" else dtype, engine=engine,
                           options=own)


def release_memory() -> None:
    """Give freed tensors' memory back (the CUDA cache too) before the next model is loaded."""
    gc.collect()
    try:
        import torch
    except ImportError:
        return
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
