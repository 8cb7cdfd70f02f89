"""Region-reading warm-up: the language model first learns to read `<bbox>` tokens in short contexts.

A GPT4RoI prompt puts the question after a system prompt and the image's patch tokens, so a language model
trained from scratch (the demo) sees two `<bbox>` tokens among a hundred others. It learns single-region
questions there, but a two-region comparison ("Is region1 left of region2?") needs heads that pick out
each `<bbox>` by its place in the question, and in a CPU budget that never forms in the long context: the
answers stay at the majority class. Trained on the question turns alone (`region{k} <bbox>` questions and
their answers, no system prompt, no image tokens), the same model learns those heads in a few hundred
steps; spatial instruction tuning on the full prompts then carries them over.

Region embeddings come from the (frozen) vision tower and region module, computed once, so a step costs
only the language model on ~25 tokens per record. Batches draw the record kinds (`meta["task"]`) in set
proportions (equally by default), so rare two-region questions are not drowned by captions.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from model.data_format import RegionSample
from model.gpt4roi.modeling_gpt4roi import GPT4RoIForCausalLM
from model.gpt4roi.processing_gpt4roi import IGNORE_INDEX, GPT4RoIProcessor, normalize_boxes, pad_sequences
from model.gpt4roi.training import CosineAdamW, PixelCache


@dataclass
class RegionWarmupConfig:
    steps: int = 600
    learning_rate: float = 1e-3
    records_per_batch: int = 32
    images_per_encoding: int = 32
    # How often batches draw each record kind (`meta["task"]`); kinds left out are not trained on.
    # Empty: every kind, equally often.
    task_weights: dict[str, float] = field(default_factory=dict)
    seed: int = 0
    progress: bool = True


@dataclass(frozen=True)
class QuestionTurn:
    """One record reduced to its question turn: ids and labels after `<im_end>`, regions `[n, H]`."""

    ids: list[int]
    labels: list[int]
    regions: torch.Tensor
    kind: str


@torch.no_grad()
def question_turns(model: GPT4RoIForCausalLM, processor: GPT4RoIProcessor, samples: Sequence[RegionSample],
                   images_per_encoding: int = 32, progress: bool = True) -> list[QuestionTurn]:
    """Each record's tokens after the image, with its region embeddings; every image is encoded once."""
    by_image: dict[str, list[RegionSample]] = defaultdict(list)
    for sample in samples:
        by_image[str(sample.image)].append(sample)
    cache = PixelCache(processor, size=images_per_encoding)
    im_end = processor.tokenizer.im_end_token_id
    paths = list(by_image)
    # Synthetic data repeats a few hundred conversations many times; each is tokenized once.
    encoded: dict[tuple[tuple[str, str], ...], tuple[list[int], list[int]]] = {}
    turns: list[QuestionTurn] = []
    model.eval()
    for start in tqdm(range(0, len(paths), images_per_encoding), desc="encode regions", disable=not progress):
        chunk = paths[start: start + images_per_encoding]
        features = model.encode_images(torch.stack([cache.pixels(p) for p in chunk]).to(model.device))
        records = [(i, s) for i, path in enumerate(chunk) for s in by_image[path]]
        boxes = [normalize_boxes(s.boxes, s.width, s.height).to(model.device) for _, s in records]
        regions = model.encode_regions(boxes=boxes, image_index=[i for i, _ in records], image_features=features)
        for (_, sample), embedded in zip(records, regions, strict=True):
            key = tuple((turn["from"], turn["value"]) for turn in sample.conversations)
            if key not in encoded:
                ids, labels = (t.tolist() for t in processor.encode_conversation(sample.conversations))
                cut = len(ids) - ids[::-1].index(im_end)
                encoded[key] = ids[cut:], labels[cut:]
            ids, labels = encoded[key]
            turns.append(QuestionTurn(ids, labels, embedded.cpu(), str((sample.meta or {}).get("task", "other"))))
    return turns


def warm_up_region_reading(
    model: GPT4RoIForCausalLM,
    processor: GPT4RoIProcessor,
    samples: Sequence[RegionSample],
    config: RegionWarmupConfig | None = None,
) -> list[float]:
    """Train `model.language_model` in place on the records' question turns; returns the losses."""
    config = config or RegionWarmupConfig()
    if config.task_weights:
        samples = [s for s in samples if config.task_weights.get((s.meta or {}).get("task"), 0) > 0]
    turns = question_turns(model, processor, samples, config.images_per_encoding, config.progress)
    if not turns:
        raise ValueError(f"no records to warm up on (tasks: {', '.join(config.task_weights) or 'all'})")
    by_kind: dict[str, list[QuestionTurn]] = defaultdict(list)
    for turn in turns:
        by_kind[turn.kind].append(turn)
    kinds = sorted(by_kind)
    weights = [config.task_weights.get(kind, 1.0) for kind in kinds]
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    language_model = model.language_model
    for param in model.parameters():
        param.requires_grad_(False)
    params = list(language_model.parameters())
    for param in params:
        param.requires_grad_(True)
    optimizer = CosineAdamW([{"params": params, "lr": config.learning_rate}], config.steps, int(0.05 * config.steps))
    pad = processor.tokenizer.pad_token_id
    losses: list[float] = []
    language_model.train()
    bar = tqdm(range(config.steps), desc="warm up region reading", disable=not config.progress, unit="step")
    for _ in bar:
        batch = [rng.choice(by_kind[kind]) for kind in rng.choices(kinds, weights, k=config.records_per_batch)]
        ids, mask = pad_sequences([t.ids for t in batch], pad)
        labels, _ = pad_sequences([t.labels for t in batch], IGNORE_INDEX)
        ids, mask, labels = ids.to(model.device), mask.to(model.device), labels.to(model.device)
        embeds = model.embed_inputs(ids, None, None, regions=[t.regions.to(model.device) for t in batch])
        loss = language_model(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses
