"""Describing regions with a resident model: what the worker answers and what a fine-tune evaluates.

`describe` asks the model, for every region of one image, the caption and each closed-set question the
labeling config needs (its Choices controls, the RectangleLabels label), in one `answer` and one `score`
call; `describe_many` does the same for the regions of several images (a worker's batch of jobs).
`load_annotator` loads a checkpoint onto a device; `resolve_device` and `release_memory` are the device
handling both callers share.

Only workers and fine-tunes import this module (the API never does: it holds no model); torch is imported
inside the functions all the same, so that importing it is cheap.
"""

from __future__ import annotations

import gc
import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backend.calibration import Calibration, confidences
from backend.labelconfig import FillPlan, Region, wants_label

DEFAULT_ANNOTATOR = "model.inference.RegionAnnotator"


@dataclass(frozen=True)
class Description:
    """What to describe on one image: its regions, with the labeling config's fill plan."""

    image: Any
    plan: FillPlan
    regions: Sequence[Region]
    keep_drawn_label: bool


def describe(annotator: Any, image: Any, plan: FillPlan, regions: Sequence[Region], keep_drawn_label: bool,
             max_new_tokens: int, calibration: Calibration | None = None) -> list[dict[str, Any]]:
    """Per region `{"id", "caption", "caption_confidence", "choices": {control: distribution},
    "label": distribution | None, "confidence"}`: `confidence` holds each field's confidence
    (`backend.calibration.confidences`), calibrated by `calibration` (raw without one)."""
    return describe_many(annotator, [Description(image, plan, regions, keep_drawn_label)], max_new_tokens,
                         calibration)[0]


def describe_many(annotator: Any, items: Sequence[Description], max_new_tokens: int,
                  calibration: Calibration | None = None) -> list[list[dict[str, Any]]]:
    """`describe` for several images (several jobs) at once: every caption of every item goes into one
    `answer` call and every closed-set question into one `score` call. Returns one answer list per item."""
    from model import prompts
    from model.inference import RegionQuery

    answers = [[{"id": r.id, "caption": None, "caption_confidence": None, "choices": {}, "label": None}
                for r in item.regions] for item in items]
    captions: list[tuple[Any, dict[str, Any]]] = []
    scored: list[tuple[Any, tuple[str, ...], dict[str, Any], str | None]] = []
    for item, item_answers in zip(items, answers, strict=True):
        plan = item.plan
        for region, answer in zip(item.regions, item_answers, strict=True):
            boxes = (region.box(),)
            if plan.captions:
                captions.append((RegionQuery(image=item.image, boxes=boxes, question=prompts.caption_question()),
                                 answer))
            for control in plan.choices:
                query = RegionQuery(image=item.image, boxes=boxes, question=prompts.attribute_question(control.name))
                scored.append((query, control.candidates, answer, control.name))
            if wants_label(plan, region, item.keep_drawn_label):
                query = RegionQuery(image=item.image, boxes=boxes, question=prompts.attribute_question("category"))
                scored.append((query, plan.labels, answer, None))
    if captions:
        queries = [query for query, _ in captions]
        if hasattr(annotator, "answer_with_confidence"):
            generated = annotator.answer_with_confidence(queries, max_new_tokens=max_new_tokens)
            texts, sureness = [g.text for g in generated], [g.confidence for g in generated]
        else:  # an ANNOTATOR_CLASS of its own that gives text alone: the caption goes unscored
            texts = annotator.answer(queries, max_new_tokens=max_new_tokens)
            sureness = [None] * len(texts)
        for (_, answer), text, confidence in zip(captions, texts, sureness, strict=True):
            answer["caption"], answer["caption_confidence"] = text, confidence
    if scored:
        distributions = annotator.score([s[0] for s in scored], [s[1] for s in scored])
        for (_, _, answer, control), distribution in zip(scored, distributions, strict=True):
            clean = {str(k): float(v) for k, v in distribution.items()}
            if control is None:
                answer["label"] = clean
            else:
                answer["choices"][control] = clean
    for item_answers in answers:
        for answer in item_answers:
            answer["confidence"] = confidences(answer, calibration)
    return answers


def resolve_device(name: str) -> Any:
    """A torch device from a DEVICE / FINETUNE_DEVICE value (`auto`: CUDA when present)."""
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {name} was asked for, but CUDA is not available on this machine")
    return torch.device(name)


def load_annotator(path: Path, device: Any, dtype: str = "auto", annotator_class: str = DEFAULT_ANNOTATOR) -> Any:
    """The annotator class (a dotted path with `from_pretrained(path, device=…, dtype=…)`) loaded from a
    checkpoint folder; `dtype` `auto` lets the class choose (bf16 on CUDA, fp32 on the CPU)."""
    import torch

    module_name, _, class_name = annotator_class.rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls.from_pretrained(path, device=str(device), dtype=None if dtype == "auto" else getattr(torch, dtype))


def release_memory() -> None:
    """Give freed tensors' memory back (the CUDA cache too) before the next model is loaded."""
    gc.collect()
    try:
        import torch
    except ImportError:
        return
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
