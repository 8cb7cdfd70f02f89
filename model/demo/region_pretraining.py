"""Region pretraining: teach a vision tower and region module to see objects before the LLM reads them.

GPT4RoI starts from a CLIP tower pretrained on image-text pairs. A model built from scratch (the demo) has
no such tower, and an LLM trained from scratch on random region features learns to read only the most
salient of them (colour) in a CPU budget. This stage stands in for CLIP pretraining: small heads on each
region embedding (the `<bbox>` embedding the LLM will receive) learn, from ground-truth objects,

* every attribute (colour, shape, size, texture) with a cosine classifier: the logit is a fixed scale times
  the cosine between the normalized embedding and a class direction, so each attribute has to claim a
  share of the embedding's direction instead of hiding in a small, rescaled component the LLM barely sees;
* where the object is relative to another one in the same image (left of, above, larger) with
  antisymmetric pair heads, `cos(r_a - r_b, w)`, which pushes position and area into directions that a
  comparison can read linearly.

The heads are dropped afterwards; only the vision tower and region module keep what they learned.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from model.data_format import RegionSample
from model.gpt4roi.modeling_gpt4roi import GPT4RoIForCausalLM
from model.gpt4roi.processing_gpt4roi import GPT4RoIProcessor, normalize_boxes
from model.gpt4roi.training import CosineAdamW, PixelCache

RELATIONS = ("left_of", "above", "larger")


@dataclass
class RegionPretrainingConfig:
    steps: int = 800
    learning_rate: float = 1e-3
    images_per_batch: int = 8
    # Cosine logits lie in [-1, 1]; the scale sets how confident a well-separated class can get.
    logit_scale: float = 16.0
    # Pairs closer than this are not asked about: centres (in image fractions) or areas (as a ratio).
    min_centre_gap: float = 0.05
    min_area_ratio: float = 1.25
    seed: int = 0
    progress: bool = True


@dataclass(frozen=True)
class LabelledObject:
    image: str
    box: tuple[float, float, float, float]  # normalized xyxy
    labels: dict[str, int]  # attribute → class index


def labelled_objects(samples: Sequence[RegionSample],
                     classes: Mapping[str, Sequence[str]]) -> dict[str, list[LabelledObject]]:
    """The objects of each image, from records whose `meta["attributes"]` give the ground truth of their
    single box (the synthetic caption records do); an object asked about several times counts once."""
    by_image: dict[str, dict[tuple[float, ...], LabelledObject]] = {}
    for sample in samples:
        attributes = sample.meta.get("attributes")
        if not attributes or len(sample.boxes) != 1:
            continue
        box = tuple(normalize_boxes(sample.boxes, sample.width, sample.height)[0].tolist())
        labels = {name: list(values).index(attributes[name]) for name, values in classes.items()}
        by_image.setdefault(str(sample.image), {})[box] = LabelledObject(str(sample.image), box, labels)
    return {image: list(objects.values()) for image, objects in by_image.items()}


class RegionHeads(nn.Module):
    """Cosine attribute classifiers and antisymmetric relation heads on region embeddings."""

    def __init__(self, hidden: int, classes: Mapping[str, Sequence[str]], logit_scale: float) -> None:
        super().__init__()
        self.attributes = nn.ParameterDict(
            {name: nn.Parameter(torch.randn(len(values), hidden)) for name, values in classes.items()}
        )
        self.relations = nn.Parameter(torch.randn(len(RELATIONS), hidden))
        self.logit_scale = logit_scale

    def loss(self, regions: torch.Tensor, objects: Sequence[LabelledObject], owners: torch.Tensor,
             config: RegionPretrainingConfig) -> torch.Tensor:
        """regions `[N, H]`, one per object; owners `[N]`: which image each object is in."""
        unit = F.normalize(regions, dim=-1)
        loss = regions.new_zeros(())
        for name, weight in self.attributes.items():
            target = torch.tensor([o.labels[name] for o in objects], device=regions.device)
            logits = self.logit_scale * unit @ F.normalize(weight, dim=-1).T
            loss = loss + F.cross_entropy(logits, target)

        a, b = torch.triu_indices(len(objects), len(objects), offset=1, device=regions.device)
        same_image = owners[a] == owners[b]
        a, b = a[same_image], b[same_image]
        if len(a) == 0:
            return loss
        boxes = torch.tensor([o.box for o in objects], device=regions.device)
        centre = (boxes[:, :2] + boxes[:, 2:]) / 2
        log_area = torch.log((boxes[:, 2:] - boxes[:, :2]).prod(-1))
        # Positive means "a is left of / above / larger than b".
        differences = torch.stack(
            [centre[b, 0] - centre[a, 0], centre[b, 1] - centre[a, 1], log_area[a] - log_area[b]], dim=1
        )  # [P, 3]
        gaps = torch.tensor([config.min_centre_gap, config.min_centre_gap, math.log(config.min_area_ratio)],
                            device=regions.device)
        clear = differences.abs() >= gaps
        logits = self.logit_scale * F.normalize(unit[a] - unit[b], dim=-1) @ F.normalize(self.relations, dim=-1).T
        if clear.any():
            loss = loss + F.binary_cross_entropy_with_logits(logits[clear], (differences[clear] > 0).float())
        return loss


def pretrain_regions(
    model: GPT4RoIForCausalLM,
    processor: GPT4RoIProcessor,
    samples: Sequence[RegionSample],
    classes: Mapping[str, Sequence[str]],
    config: RegionPretrainingConfig | None = None,
) -> list[float]:
    """Train `model.vision_tower` and `model.spi_module` in place on labelled objects; returns the losses."""
    config = config or RegionPretrainingConfig()
    objects = labelled_objects(samples, classes)
    if not objects:
        raise ValueError("no records with ground-truth attributes of a single box to pretrain on")
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    heads = RegionHeads(model.config.text_config.hidden_size, classes, config.logit_scale).to(model.device)
    params = [*model.vision_tower.parameters(), *model.spi_module.parameters(), *heads.parameters()]
    for param in params:
        param.requires_grad_(True)
    optimizer = CosineAdamW([{"params": params, "lr": config.learning_rate}], config.steps, int(0.05 * config.steps))
    cache = PixelCache(processor)
    images = sorted(objects)
    losses: list[float] = []
    model.train()
    bar = tqdm(range(config.steps), desc="pretrain regions", disable=not config.progress, unit="step")
    for _ in bar:
        picked = rng.sample(images, min(config.images_per_batch, len(images)))
        pixels = torch.stack([cache.pixels(image) for image in picked]).to(model.device)
        boxes = [torch.tensor([o.box for o in objects[image]]) for image in picked]
        regions = torch.cat(model.encode_regions(boxes=boxes, image_features=model.encode_images(pixels)))
        owners = torch.repeat_interleave(torch.arange(len(picked)), torch.tensor([len(b) for b in boxes]))
        loss = heads.loss(regions, [o for image in picked for o in objects[image]], owners.to(model.device),
                          config)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses
