"""Region questions in, answers or candidate distributions out: the model-side API the worker uses.

A [`RegionAnnotator`] keeps a model resident, encodes each distinct image once per call (and keeps recent
images' features in a small cache, since an annotator draws several boxes on the same image), and
answers many region questions per forward pass.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from model.image_keys import ImageKeys

from .generation import (
    Answer,
    GenerationConfig,
    answer_ids,
    answer_log_likelihood,
    generate_answers,
    generation_prompt,
    split_prefix,
)
from .modeling_gpt4roi import GPT4RoIForCausalLM, ImageFeatures
from .processing_gpt4roi import GPT4RoIProcessor, sanitize_boxes
from .prompts import caption_question, check_bbox_count

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class RegionQuery:
    """One question about one or more regions of an image.

    image: queries on images with the same pixels share one image encoding.
    boxes: normalized xyxy in [0, 1], one per `<bbox>` in `question`, in order.
    question: e.g. `prompts.attribute_question("color")` → "What is the color of region1 <bbox>?".
    """

    image: Image.Image
    boxes: tuple[Box, ...]
    question: str


class RegionAnnotator:
    """A resident GPT4RoI with batched `answer` (generation) and `score` (closed-set choice)."""

    def __init__(
        self,
        model: GPT4RoIForCausalLM,
        processor: GPT4RoIProcessor,
        max_batch_size: int = 32,
        image_cache_size: int = 16,
    ) -> None:
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.max_batch_size = max_batch_size
        self._cache: OrderedDict[str, ImageFeatures] = OrderedDict()
        self._cache_size = image_cache_size
        self.image_key = ImageKeys()
        self.cache_hits = 0
        self.cache_misses = 0
        # A question's tokens, and each candidate answer's after it, are the same for every region and
        # image; tokenizing the long image-token prompt costs as much as scoring it.
        self._prompt_ids = functools.lru_cache(maxsize=1024)(self._encode_prompt)
        self._answer_ids = functools.lru_cache(maxsize=8192)(self._encode_answer)
        # Every prompt starts with the same tokens up to the image block; they are run once per image.
        probe = self.tokenizer.encode(processor.expand_image_tokens(generation_prompt(caption_question())))
        self._prefix_ids, _ = split_prefix([probe], self.tokenizer.im_end_token_id)

    @classmethod
    def from_pretrained(
        cls, path: str | Path, device: str = "cpu", dtype: torch.dtype | None = None, **kwargs
    ) -> RegionAnnotator:
        """Load a model directory (weights + tokenizer + processor config) onto `device`."""
        dtype = dtype or (torch.bfloat16 if str(device).startswith("cuda") else torch.float32)
        model = GPT4RoIForCausalLM.from_pretrained(path, dtype=dtype).to(device)
        return cls(model, GPT4RoIProcessor.from_pretrained(path), **kwargs)

    @property
    def device(self) -> torch.device:
        return self.model.device

    # ------------------------------------------------------------------ images
    def forget_images(self) -> None:
        """Drop every cached image encoding (new weights are about to answer)."""
        self._cache.clear()

    def _features(self, images: Sequence[Image.Image]) -> ImageFeatures:
        """Features of `images` (stacked in order), encoding only those not in the cache."""
        keys = [self.image_key(image) for image in images]
        missing = [i for i, key in enumerate(keys) if key not in self._cache]
        self.cache_hits += len(keys) - len(missing)
        self.cache_misses += len(missing)
        for start in range(0, len(missing), self.max_batch_size):
            chunk = missing[start: start + self.max_batch_size]
            pixels = self.processor.preprocess_images([images[i] for i in chunk]).to(self.device)
            with torch.no_grad():
                features = self.model.with_prefix_cache(self._prefix_ids, self.model.encode_images(pixels))
            for row, i in enumerate(chunk):
                self._cache[keys[i]] = features.select([row])
        for key in keys:
            self._cache.move_to_end(key)
        stacked = ImageFeatures.concat([self._cache[key] for key in keys])
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return stacked

    def _prepare(self, queries: Sequence[RegionQuery]) -> tuple[ImageFeatures, list[int], list[torch.Tensor]]:
        images: list[Image.Image] = []
        index_of: dict[int, int] = {}
        image_index = []
        boxes = []
        for query in queries:
            check_bbox_count(query.question, len(query.boxes))
            if id(query.image) not in index_of:
                index_of[id(query.image)] = len(images)
                images.append(query.image)
            image_index.append(index_of[id(query.image)])
            boxes.append(sanitize_boxes(query.boxes).to(self.device))
        return self._features(images), image_index, boxes

    # ----------------------------------------------------------------- answers
    def _prompt(self, question: str) -> str:
        return self.processor.expand_image_tokens(generation_prompt(question))

    def _encode_prompt(self, question: str) -> list[int]:
        return self.tokenizer.encode(self._prompt(question))

    def _encode_answer(self, question: str, answer: str) -> tuple[int, ...]:
        """The tokens of `" {answer}\\n###"` as they follow the question's prompt."""
        ids, _ = answer_ids(self.tokenizer, self._prompt(question), answer)
        return tuple(ids[len(self._prompt_ids(question)):])

    def answer(self, queries: Sequence[RegionQuery], max_new_tokens: int = 32) -> list[str]:
        """Greedy answers, one per query, batched `max_batch_size` prompts at a time."""
        return [answer.text for answer in self.answer_with_confidence(queries, max_new_tokens)]

    def answer_with_confidence(self, queries: Sequence[RegionQuery], max_new_tokens: int = 32) -> list[Answer]:
        """`answer`, each with the model's confidence in it (`generation.Answer`)."""
        answers: list[Answer] = []
        config = GenerationConfig(max_new_tokens=max_new_tokens)
        for start in range(0, len(queries), self.max_batch_size):
            chunk = queries[start: start + self.max_batch_size]
            features, image_index, boxes = self._prepare(chunk)
            prompt_ids = [self._prompt_ids(q.question) for q in chunk]
            answers += generate_answers(self.model, self.tokenizer, prompt_ids, boxes, features, image_index,
                                        config)
        return answers

    def score(
        self, queries: Sequence[RegionQuery], candidates: Sequence[Sequence[str]]
    ) -> list[dict[str, float]]:
        """For each query, a probability distribution over its candidate answers.

        Each candidate is scored by the log-likelihood of `" {candidate}\\n###"` after the prompt (the stop
        string included, so "red" does not win over "red circle" merely by being a prefix), then the
        scores of one query are normalized with a softmax.
        """
        if len(queries) != len(candidates):
            raise ValueError(f"{len(queries)} queries but {len(candidates)} candidate lists")
        for query, options in zip(queries, candidates, strict=True):
            if not options:
                raise ValueError(f"no candidates for question {query.question!r}")
        # One row per query and up to max_batch_size of its candidates: the question runs once for all of
        # them (`answer_log_likelihood` packs them after it), and a row's length stays bounded.
        rows = [
            (query, options[start: start + self.max_batch_size])
            for query, options in zip(queries, candidates, strict=True)
            for start in range(0, len(options), self.max_batch_size)
        ]
        totals = []
        for start in range(0, len(rows), self.max_batch_size):
            chunk = rows[start: start + self.max_batch_size]
            features, image_index, boxes = self._prepare([q for q, _ in chunk])
            prompt_ids = [self._prompt_ids(q.question) for q, _ in chunk]
            answers = [[self._answer_ids(q.question, c) for c in options] for q, options in chunk]
            totals.append(answer_log_likelihood(
                self.model, self.tokenizer, prompt_ids, answers, boxes, features, image_index
            ).cpu())
        totals = torch.cat(totals)
        results: list[dict[str, float]] = []
        position = 0
        for options in candidates:
            probs = torch.softmax(totals[position: position + len(options)], dim=0)
            results.append({option: float(p) for option, p in zip(options, probs, strict=True)})
            position += len(options)
        return results
