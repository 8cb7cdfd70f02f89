"""GPT4RoI behind the engine interface: region questions in the project's Vicuna-v0 templates
(`prompts.caption_question`, `prompts.attribute_question`), answered by a resident `RegionAnnotator`, and LoRA
fine-tunes with `training.train`."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from PIL import Image

from model.data_format import RegionSample
from model.engine import (
    TRANSCRIPTION,
    Answer,
    CaptionRequest,
    ChoiceRequest,
    Engine,
    Example,
    FinetuneConfig,
    FinetuneResult,
    check_options,
)
from model.loading import open_rgb, runtime_dtype, stored_dtype

from .inference import RegionAnnotator, RegionQuery
from .processing_gpt4roi import normalize_boxes
from .prompts import attribute_question, caption_question, transcription_question
from .training import LORA_TARGETS, TrainingConfig, has_lora, merge_lora, save_adapter, save_checkpoint, train

# Above this size, a fine-tune on CUDA trades compute for memory (gradient checkpointing): GPT4RoI-7B.
LARGE_MODEL_PARAMETERS = 1_000_000_000
ADAPTER_FOLDER = "lora"


class GPT4RoIEngine(Engine):
    name = "gpt4roi"

    def __init__(self, annotator: RegionAnnotator, stored_dtype: torch.dtype | None = None) -> None:
        self.annotator = annotator
        self.stored_dtype = stored_dtype or annotator.model.dtype

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str = "cpu", dtype: str | None = None,
                        options: Mapping[str, str] | None = None) -> GPT4RoIEngine:
        check_options(cls.name, options, {})
        annotator = RegionAnnotator.from_pretrained(path, device=str(device), dtype=runtime_dtype(dtype, device))
        return cls(annotator, stored_dtype=stored_dtype(path))

    # ----------------------------------------------------------------- answers
    def caption(self, requests: Sequence[CaptionRequest], max_new_tokens: int = 32) -> list[Answer]:
        queries = [RegionQuery(r.image, (r.box,), _text_question(r.kind)) for r in requests]
        return self.annotator.answer_with_confidence(queries, max_new_tokens=max_new_tokens)

    def choose(self, requests: Sequence[ChoiceRequest]) -> list[dict[str, float]]:
        queries = [RegionQuery(r.image, (r.box,), attribute_question(r.attribute)) for r in requests]
        return self.annotator.score(queries, [r.candidates for r in requests])

    def generate(self, records: Sequence[RegionSample], max_new_tokens: int = 32) -> list[str]:
        images: dict[str, Image.Image] = {}
        queries = []
        for record in records:
            if record.image not in images:
                images[record.image] = open_rgb(record.image)
            boxes = tuple(map(tuple, normalize_boxes(record.boxes, record.width, record.height).tolist()))
            queries.append(RegionQuery(images[record.image], boxes, record.conversations[0]["value"]))
        return self.annotator.answer(queries, max_new_tokens=max_new_tokens)

    def forget_images(self) -> None:
        self.annotator.forget_images()

    # ---------------------------------------------------------------- training
    def finetune(self, examples: Sequence[Example], config: FinetuneConfig,
                 records: Sequence[RegionSample] = ()) -> FinetuneResult:
        model = self.annotator.model
        large = sum(p.numel() for p in model.parameters()) > LARGE_MODEL_PARAMETERS
        training = TrainingConfig(
            trainable="lora", learning_rate=config.learning_rate, epochs=config.epochs, max_steps=config.max_steps,
            min_epochs=1.0, lora_rank=config.lora_rank, lora_alpha=2 * config.lora_rank, seed=config.seed,
            region_lr_scale=config.region_lr_scale,
            # The output layer too: a concept new to the model brings words it was never trained to say.
            lora_targets=(*LORA_TARGETS, "lm_head"),
            gradient_checkpointing=large and model.device.type == "cuda", progress=config.progress)
        result = train(model, self.annotator.processor, [*map(region_sample, examples), *records], training)
        model.eval()
        self.forget_images()
        return FinetuneResult(steps=result.steps, seconds=result.seconds, first_loss=result.first_loss,
                              last_loss=result.last_loss, settings=dataclasses.asdict(training))

    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        model = self.annotator.model
        if has_lora(model):
            save_adapter(model, path / ADAPTER_FOLDER)
            merge_lora(model)
        # Trained in fp32 (mixed precision); stored as the parent was, so a version keeps its size.
        save_checkpoint(model.to(self.stored_dtype), self.annotator.processor, path)


def region_sample(example: Example) -> RegionSample:
    """An example as a dataset record: its question in GPT4RoI's templates, its box in pixels."""
    question = _text_question(example.kind) if example.attribute is None else attribute_question(example.attribute)
    task = ({"task": example.kind} if example.attribute is None
            else {"task": "attribute", "attribute": example.attribute})
    return RegionSample(id=example.id, image=example.image, width=example.width, height=example.height,
                        boxes=[list(example.box)],
                        conversations=[{"from": "human", "value": question}, {"from": "gpt", "value": example.answer}],
                        meta={**example.meta, **task})


def _text_question(kind: str) -> str:
    return transcription_question() if kind == TRANSCRIPTION else caption_question()
