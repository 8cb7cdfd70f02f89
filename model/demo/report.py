"""What the demo's held-out report says about captions beyond the COCO scores: whether they name the
synthetic object's attributes (`model.demo.synthetic`) exactly.

`caption_figures` plugs into `model.evaluate.report`: the share of captions naming every attribute right
(`exact_attribute_match`) and, per attribute, the share naming its true value (`attribute_accuracy`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from model.data_format import RegionSample
from model.demo.synthetic import ATTRIBUTES, caption_mentions


def caption_figures(samples: Sequence[RegionSample], captions: Sequence[str]) -> dict:
    """Attribute figures of the caption records that carry their object's ground truth (`meta.attributes`)."""
    pairs = [(s.meta["attributes"], c) for s, c in zip(samples, captions, strict=True)
             if "attributes" in (s.meta or {})]
    if not pairs:
        return {}
    truth = [t for t, _ in pairs]
    answered = [c for _, c in pairs]
    return {"exact_attribute_match": attribute_match_rate(truth, answered),
            "attribute_accuracy": caption_attribute_accuracy(truth, answered)}


def attribute_match(truth_attributes: Mapping[str, str], caption: str, require_all: bool = True) -> bool:
    """Whether a caption names the object's attributes exactly.

    Every attribute value the caption names (size, color, texture, shape of the synthetic vocabulary) must
    be the true one, and no attribute may be named with two values. With ``require_all`` every attribute
    in ``truth_attributes`` must also be named, so ``"a circle"`` does not match a large red striped circle.
    """
    unknown = sorted(set(truth_attributes) - set(ATTRIBUTES))
    if unknown:
        raise ValueError(f"unknown attribute(s) {unknown}; captions describe {list(ATTRIBUTES)}")
    mentions = caption_mentions(caption)
    for name, values in mentions.items():
        if name in truth_attributes and values != [truth_attributes[name]]:
            return False
    return not require_all or all(name in mentions for name in truth_attributes)


def attribute_match_rate(
    truth_attributes: Sequence[Mapping[str, str]], captions: Sequence[str], require_all: bool = True
) -> float:
    """Share of captions for which :func:`attribute_match` holds (the caption exact-attribute match)."""
    if len(truth_attributes) != len(captions):
        raise ValueError(f"{len(truth_attributes)} ground truths but {len(captions)} captions")
    if not captions:
        raise ValueError("no captions to score")
    hits = sum(attribute_match(t, c, require_all) for t, c in zip(truth_attributes, captions, strict=True))
    return hits / len(captions)


def caption_attribute_accuracy(
    truth_attributes: Sequence[Mapping[str, str]], captions: Sequence[str]
) -> dict[str, float]:
    """Per attribute, the share of captions that name exactly its true value (diagnoses what a model misses)."""
    if len(truth_attributes) != len(captions):
        raise ValueError(f"{len(truth_attributes)} ground truths but {len(captions)} captions")
    if not captions:
        raise ValueError("no captions to score")
    names = [name for name in ATTRIBUTES if any(name in truth for truth in truth_attributes)]
    hits = dict.fromkeys(names, 0)
    totals = dict.fromkeys(names, 0)
    for truth, caption in zip(truth_attributes, captions, strict=True):
        mentions = caption_mentions(caption)
        for name in names:
            if name in truth:
                totals[name] += 1
                hits[name] += mentions.get(name) == [truth[name]]
    return {name: hits[name] / totals[name] for name in names}
