"""Florence-2 as an engine: region captions and closed-set attributes from the native transformers classes.

Prompts. Florence-2 names a region by four location tokens `<loc_x1><loc_y1><loc_x2><loc_y2>`, each a bin of
1000 across the image, quantized with the processor's own `post_processor.quantize`. One region per prompt:

- a caption is always asked with `<REGION_TO_DESCRIPTION>` (the processor's sentence "What does the region
  … describe?"), greedy unless the engine was built with `num_beams > 1`;
- before any fine-tune an attribute is asked in words the pretrained model was trained to produce: the label
  (`LABEL`) as the category name under `<REGION_TO_CATEGORY>`, any other attribute as the value phrase
  under `<REGION_TO_DESCRIPTION>` (a "red" region is one described as "red");
- a fine-tune trains attributes on a prompt of the engine's own, `LEARNT_ATTRIBUTE_PROMPT` ("What is the
  color of the region <loc_…>…?", which the processor passes through unchanged), and from then on asks the
  attributes it was trained on with it. The prompt and those attributes are written to `florence2_engine.json`
  in the checkpoint folder, so a reload asks the same way; attributes never trained keep the zero-shot prompts.

Answers. The pretrained model repeats the region's location tokens after the phrase; they are removed
(`answer_text`). "No object detected." becomes the empty text: there is nothing to pre-annotate, and the
confidence still says how sure the model was that the region holds nothing. A caption's confidence is the
geometric mean of the probabilities of its tokens, the end token included (with beams: the exponential of the
beam's length-normalised score).

Scoring. `choose` runs the encoder once per (image, region prompt) and one decoder pass over all candidates of
all regions; a candidate's log-likelihood is the sum of its target tokens' log-probabilities (`<s>`, the value,
the zero-shot prompts' location tokens, `</s>`: the sequence the model would generate), and a request's
distribution is the softmax over its candidates.

Images are encoded once: features are kept in a small LRU cache keyed by the image's content, and the key is
remembered for as long as the image object lives.

Proposals (`propose`). Regions are found with the pretrained tasks: boxes for label names by phrase grounding
(`<CAPTION_TO_PHRASE_GROUNDING>`, the names joined as "car. dog. person", `labels_per_prompt` of them per
prompt; each grounded phrase is matched back to the label it names, and a phrase naming none is dropped),
objects in the model's own words by `<OD>` when there are no label names, and polygons by
`<REFERRING_EXPRESSION_SEGMENTATION>` (one label per prompt: its answer is the outline of that label). The
generated text is parsed by the processor's own `post_process_generation`, so boxes and points are exactly
what it decodes. A region's score is the geometric mean of the probabilities of the tokens that made it (the
model's own probabilities, from one teacher-forced pass over the generated answer, whatever the decoding):
the tokens generated after the previous region was complete, up to the one that completes it (its phrase and
its four location tokens; for a phrase grounded to several boxes, the later boxes' location tokens alone; for
a polygon all its points). A region is "complete" once the parse of the answer so far holds it as the whole
answer does.

Fine-tuning trains a LoRA adapter on the language model's attention and MLP projections only (the vision tower
and the projector stay frozen, so image features are computed once per image), merges it into the weights and
keeps the adapter alone for `save_pretrained`'s `lora/`.
"""

from __future__ import annotations

import json
import math
import random
import re
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoConfig, Florence2ForConditionalGeneration, Florence2Processor, GenerationConfig
from transformers.modeling_outputs import BaseModelOutput

from model.engine import (
    CAPTION,
    LABEL,
    TRANSCRIPTION,
    Answer,
    Box,
    CaptionRequest,
    ChoiceRequest,
    Engine,
    EngineError,
    Example,
    FinetuneConfig,
    FinetuneResult,
    Proposal,
    ProposalRequest,
    check_options,
)
from model.image_keys import ImageKeys
from model.loading import open_rgb, runtime_dtype, stored_dtype

CAPTION_TASK = "<REGION_TO_DESCRIPTION>"
CATEGORY_TASK = "<REGION_TO_CATEGORY>"
OCR_TASK = "<REGION_TO_OCR>"
NO_OBJECT = "No object detected."
GROUNDING_TASK = "<CAPTION_TO_PHRASE_GROUNDING>"
DETECTION_TASK = "<OD>"
SEGMENTATION_TASK = "<REFERRING_EXPRESSION_SEGMENTATION>"
LABEL_SEPARATOR = ". "
LEARNT_ATTRIBUTE_PROMPT = "What is the {attribute} of the region {region}?"
ENGINE_FILE = "florence2_engine.json"
LORA_FOLDER = "lora"
# The language model's attention and MLP projections; the vision tower has `fc1`/`fc2` too, hence a full
# regex (peft matches a string target against the whole module name).
LORA_TARGETS = (r"model\.language_model\.(?:encoder|decoder)\.layers\.\d+\."
                r"(?:(?:self_attn|encoder_attn)\.(?:q_proj|k_proj|v_proj|out_proj)|fc1|fc2)")
_LOCATION = re.compile(r"<loc_\d+>")


def answer_text(parsed: str) -> str:
    """The answer in a parsed generation: location tokens removed, whitespace collapsed, and the empty text
    for "No object detected."."""
    text = " ".join(_LOCATION.sub(" ", parsed).split())
    return "" if text.rstrip(".").lower() == NO_OBJECT.rstrip(".").lower() else text


def _words(text: str) -> tuple[str, ...]:
    return tuple(re.sub(r"[^0-9a-z]+", " ", text.lower()).split())


def match_label(phrase: str, labels: Sequence[str]) -> str | None:
    """The label a grounded phrase names: the one it equals (ignoring case and punctuation), else the longest
    one whose words appear together in it ("red car" names "car"); None when it names none."""
    words = _words(phrase)
    for label in labels:
        if _words(label) == words:
            return label
    found = [label for label in labels if _words(label) and any(
        words[i: i + len(_words(label))] == _words(label) for i in range(len(words)))]
    return max(found, key=lambda label: len(_words(label)), default=None)


@dataclass(frozen=True)
class _Search:
    """One proposal prompt: its text, its task, and the labels its answer may name."""

    text: str
    task: str
    labels: tuple[str, ...]


@dataclass(frozen=True)
class _Prompt:
    """One question about one region: the prompt text (task tokens expanded), the task its answer is parsed
    as, and what follows the value in a target sequence (the region's location tokens for the zero-shot
    prompts, whose answers repeat them)."""

    text: str
    task: str
    suffix: str


class Florence2Engine(Engine):
    """Florence-2 (`florence-community/Florence-2-*`) answering region requests; see the module docstring."""

    name = "florence-2"
    can_propose = True

    def __init__(self, model: Florence2ForConditionalGeneration, processor: Florence2Processor, *,
                 stored_dtype: torch.dtype | None = None, attribute_prompt: str = LEARNT_ATTRIBUTE_PROMPT,
                 learnt_attributes: Sequence[str] = (), num_beams: int = 1, no_repeat_ngram_size: int = 0,
                 max_batch_size: int = 16, image_cache_size: int = 32, train_batch_size: int = 8,
                 labels_per_prompt: int = 8) -> None:
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.stored_dtype = stored_dtype or model.dtype
        self.attribute_prompt = attribute_prompt
        self.learnt_attributes = set(learnt_attributes)
        self.num_beams = num_beams
        self.no_repeat_ngram_size = no_repeat_ngram_size
        self.max_batch_size = max_batch_size
        self.train_batch_size = train_batch_size
        if labels_per_prompt < 1:
            raise EngineError(f"labels_per_prompt must be at least 1, got {labels_per_prompt}")
        self.labels_per_prompt = labels_per_prompt
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._cache_size = image_cache_size
        self.image_key = ImageKeys()
        self._adapter: tuple[Any, dict[str, torch.Tensor]] | None = None
        self._prompt_ids = lru_cache(maxsize=4096)(self._encode_prompt)
        self._target_ids = lru_cache(maxsize=8192)(self._encode_target)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str = "cpu", dtype: str | None = None,
                        options: Mapping[str, str] | None = None) -> Florence2Engine:
        """Load a checkpoint folder or hub id. Options: `num_beams` (1, greedy, by default; the hub's
        generation config asks for 3), `no_repeat_ngram_size` (0 by default) and `labels_per_prompt` (label
        names grounded in one proposal prompt, 8 by default)."""
        chosen = check_options(cls.name, options,
                               {"num_beams": (), "no_repeat_ngram_size": (), "labels_per_prompt": ()})
        try:
            kwargs: dict[str, Any] = {name: int(value) for name, value in chosen.items()}
        except ValueError:
            raise EngineError(f"the {cls.name} engine's options take whole numbers, got {chosen}") from None
        config = AutoConfig.from_pretrained(path)
        if config.model_type != "florence2":
            raise EngineError(f"{path} is a {config.model_type!r} checkpoint, not Florence-2")
        stored = stored_dtype(path) or torch.float32
        model = Florence2ForConditionalGeneration.from_pretrained(path, dtype=runtime_dtype(dtype, device)).to(device)
        processor = Florence2Processor.from_pretrained(path)
        # A processor config without parsing rules cannot parse even plain text; plain text is all this
        # engine asks of it.
        processor.post_processor.parse_task_config.setdefault("pure_text", {})
        settings_file = Path(path) / ENGINE_FILE
        if settings_file.is_file():
            settings = json.loads(settings_file.read_text(encoding="utf-8"))
            kwargs.setdefault("attribute_prompt", settings.get("attribute_prompt", LEARNT_ATTRIBUTE_PROMPT))
            kwargs.setdefault("learnt_attributes", settings.get("learnt_attributes", ()))
        return cls(model, processor, stored_dtype=stored, **kwargs)

    @property
    def device(self) -> torch.device:
        return self.model.device

    # ------------------------------------------------------------------ prompts
    def locations(self, box: Box, size: tuple[int, int], normalized: bool = True) -> str:
        """The region's location tokens: `box` (normalized, or pixels of an image of `size` = (W, H))
        quantized by the processor."""
        width, height = size
        scale = (width, height, width, height) if normalized else (1, 1, 1, 1)
        pixels = torch.tensor([[c * s for c, s in zip(box, scale, strict=True)]], dtype=torch.float64)
        bins = self.processor.post_processor.quantize(pixels, size=(width, height))[0].tolist()
        return "".join(f"<loc_{b}>" for b in bins)

    def caption_prompt(self, region: str, kind: str = CAPTION) -> _Prompt:
        """A region's description, or (`TRANSCRIPTION`) its text, which the OCR task answers without repeating
        the region's location."""
        if kind == TRANSCRIPTION:
            return _Prompt(self._task_sentence(OCR_TASK, region), OCR_TASK, "")
        return _Prompt(self._task_sentence(CAPTION_TASK, region), CAPTION_TASK, region)

    def attribute_prompt_for(self, attribute: str, region: str) -> _Prompt:
        """The prompt `attribute` is asked with now: the learnt one once trained on, else zero-shot."""
        if attribute in self.learnt_attributes:
            return _Prompt(self.attribute_prompt.format(attribute=attribute, region=region), CAPTION_TASK, "")
        task = CATEGORY_TASK if attribute == LABEL else CAPTION_TASK
        return _Prompt(self._task_sentence(task, region), task, region)

    def _task_sentence(self, task: str, region: str) -> str:
        return self.processor.task_prompts_with_input[task].format(input=region)

    def _encode_prompt(self, text: str) -> tuple[int, ...]:
        # What the processor feeds the encoder after the image tokens.
        tokens = self.tokenizer.bos_token + text + self.tokenizer.eos_token
        return tuple(self.tokenizer(tokens, add_special_tokens=False)["input_ids"])

    def _encode_target(self, text: str) -> tuple[int, ...]:
        return tuple(self.tokenizer(text)["input_ids"])  # <s> text </s>

    # ------------------------------------------------------------------ images
    def forget_images(self) -> None:
        self._cache.clear()
        self.image_key.clear()

    @torch.no_grad()
    def _features(self, images: Sequence[Image.Image]) -> list[torch.Tensor]:
        """Projected image features `(tokens, d_model)` per image, encoding only those not cached."""
        keys = [self.image_key(image) for image in images]
        missing = list(dict.fromkeys(key for key in keys if key not in self._cache))
        first = {key: image for key, image in zip(keys, images, strict=True)}
        for start in range(0, len(missing), self.max_batch_size):
            chunk = missing[start: start + self.max_batch_size]
            pixels = self.processor.image_processor([first[key] for key in chunk], return_tensors="pt")
            pixels = pixels["pixel_values"].to(self.device, self.model.dtype)
            features = self.model.get_image_features(pixels).pooler_output
            for key, row in zip(chunk, features, strict=True):
                self._cache[key] = row
        found = {key: self._cache[key] for key in keys}  # before eviction: a call may hold more than the cache
        for key in keys:
            self._cache.move_to_end(key)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return [found[key] for key in keys]

    def _inputs(self, features: Sequence[torch.Tensor], prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder input embeddings (image features, then the prompt's tokens; right-padded) and their mask."""
        embed = self.model.get_input_embeddings()
        rows = [torch.cat([feature.to(embed.weight.dtype),
                           embed(torch.tensor(self._prompt_ids(text), device=self.device))])
                for feature, text in zip(features, prompts, strict=True)]
        length = max(row.shape[0] for row in rows)
        embeds = rows[0].new_zeros(len(rows), length, rows[0].shape[-1])
        mask = torch.zeros(len(rows), length, dtype=torch.long, device=self.device)
        for i, row in enumerate(rows):
            embeds[i, : row.shape[0]] = row
            mask[i, : row.shape[0]] = 1
        return embeds, mask

    @torch.no_grad()
    def _encode(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder states and mask for each (image, prompt) pair."""
        features = self._features(images)
        states, masks = [], []
        encoder = self.model.get_encoder()
        for start in range(0, len(prompts), self.max_batch_size):
            embeds, mask = self._inputs(features[start: start + self.max_batch_size],
                                        prompts[start: start + self.max_batch_size])
            states.append(encoder(inputs_embeds=embeds, attention_mask=mask).last_hidden_state)
            masks.append(mask)
        length = max(mask.shape[1] for mask in masks)
        return (torch.cat([F.pad(s, (0, 0, 0, length - s.shape[1])) for s in states]),
                torch.cat([F.pad(m, (0, length - m.shape[1])) for m in masks]))

    # ------------------------------------------------------------------ answers
    def caption(self, requests: Sequence[CaptionRequest], max_new_tokens: int = 32) -> list[Answer]:
        prompts = [self.caption_prompt(self.locations(r.box, r.image.size), r.kind) for r in requests]
        return self._answer([r.image for r in requests], prompts, max_new_tokens)

    def generation_config(self, max_new_tokens: int) -> GenerationConfig:
        """The checkpoint's generation config, decoding greedily (or with the engine's beams), no sampling."""
        config = GenerationConfig.from_dict(self.model.generation_config.to_dict())
        config.update(num_beams=self.num_beams, do_sample=False, no_repeat_ngram_size=self.no_repeat_ngram_size,
                      max_new_tokens=max_new_tokens, max_length=None, return_dict_in_generate=True,
                      output_logits=self.num_beams == 1, output_scores=self.num_beams > 1)
        return config

    @torch.no_grad()
    def _answer(self, images: Sequence[Image.Image], prompts: Sequence[_Prompt],
                max_new_tokens: int) -> list[Answer]:
        if not prompts:
            return []
        states, mask = self._encode(images, [p.text for p in prompts])
        config = self.generation_config(max_new_tokens)
        eos = self.tokenizer.eos_token_id
        # The forced first token (`<s>`) is no choice of the model's: it does not count in the confidence.
        skip = 1 if config.forced_bos_token_id is not None else 0
        answers = []
        for start in range(0, len(prompts), self.max_batch_size):
            rows = slice(start, start + self.max_batch_size)
            out = self.model.generate(encoder_outputs=BaseModelOutput(last_hidden_state=states[rows]),
                                      attention_mask=mask[rows], generation_config=config)
            generated = out.sequences[:, 1:]  # after the decoder start token
            for row, ids in enumerate(generated.tolist()):
                end = ids.index(eos) + 1 if eos in ids else len(ids)
                if self.num_beams == 1:
                    picked = [F.log_softmax(out.logits[step][row].float(), dim=-1)[ids[step]].item()
                              for step in range(skip, end)]
                    confidence = math.exp(sum(picked) / len(picked)) if picked else 0.0
                else:
                    confidence = math.exp(out.sequences_scores[row].item())
                prompt, image = prompts[start + row], images[start + row]
                decoded = self.processor.batch_decode([ids[:end]], skip_special_tokens=False)[0]
                parsed = self.processor.post_process_generation(decoded, task=prompt.task, image_size=image.size)
                answers.append(Answer(answer_text(parsed[prompt.task]), confidence))
        return answers

    # ------------------------------------------------------------------ proposals
    def proposal_searches(self, request: ProposalRequest) -> list[_Search]:
        """The prompts a request is answered with (see the module docstring)."""
        with_input = self.processor.task_prompts_with_input
        if not request.labels:
            return [_Search(self.processor.task_prompts_without_inputs[DETECTION_TASK], DETECTION_TASK, ())]
        if request.shape == "polygon":
            return [_Search(with_input[SEGMENTATION_TASK].format(input=label), SEGMENTATION_TASK, (label,))
                    for label in request.labels]
        groups = [request.labels[i: i + self.labels_per_prompt]
                  for i in range(0, len(request.labels), self.labels_per_prompt)]
        return [_Search(with_input[GROUNDING_TASK].format(input=LABEL_SEPARATOR.join(group)), GROUNDING_TASK, group)
                for group in groups]

    @torch.no_grad()
    def propose(self, requests: Sequence[ProposalRequest]) -> list[list[Proposal]]:
        searches = [(index, search) for index, request in enumerate(requests)
                    for search in self.proposal_searches(request)]
        found: list[list[Proposal]] = [[] for _ in requests]
        by_length: dict[int, list[tuple[int, _Search]]] = {}
        for index, search in searches:
            by_length.setdefault(requests[index].max_new_tokens, []).append((index, search))
        for max_new_tokens, group in by_length.items():
            images = [requests[index].image for index, _ in group]
            states, mask = self._encode(images, [search.text for _, search in group])
            config = self.generation_config(max_new_tokens)
            config.update(output_logits=False, output_scores=False)
            for start in range(0, len(group), self.max_batch_size):
                rows = slice(start, start + self.max_batch_size)
                out = self.model.generate(encoder_outputs=BaseModelOutput(last_hidden_state=states[rows]),
                                          attention_mask=mask[rows], generation_config=config)
                log_probs = self._sequence_log_probs(states[rows], mask[rows], out.sequences)
                for row, ids in enumerate(out.sequences[:, 1:].tolist()):
                    index, search = group[start + row]
                    found[index] += self._regions_of(ids, log_probs[row], search, requests[index])
        result = []
        for request, proposals in zip(requests, found, strict=True):
            proposals.sort(key=lambda p: p.score, reverse=True)
            result.append(proposals[: request.max_regions] if request.max_regions is not None else proposals)
        return result

    def _sequence_log_probs(self, states: torch.Tensor, mask: torch.Tensor,
                            sequences: torch.Tensor) -> list[list[float]]:
        """Per row, the model's log-probability of each generated token (after the decoder start), from one
        teacher-forced pass."""
        logits = self.model(encoder_outputs=BaseModelOutput(last_hidden_state=states), attention_mask=mask,
                            decoder_input_ids=sequences[:, :-1]).logits
        picked = F.log_softmax(logits.float(), dim=-1).gather(-1, sequences[:, 1:, None])[..., 0]
        return picked.tolist()

    def parse_answer(self, ids: Sequence[int], task: str, size: tuple[int, int]) -> list[tuple[Any, str]]:
        """The regions of generated ids as the processor's `post_process_generation` parses them: (box in
        pixels, phrase) for boxes, (list of flat polygons in pixels, phrase) for segmentation."""
        text = self.processor.batch_decode([list(ids)], skip_special_tokens=False)[0]
        parsed = self.processor.post_process_generation(text, task=task, image_size=size)[task]
        shapes = parsed["polygons"] if task == SEGMENTATION_TASK else parsed["bboxes"]
        return list(zip(shapes, parsed["labels"], strict=True))

    def _regions_of(self, ids: list[int], log_probs: list[float], search: _Search,
                    request: ProposalRequest) -> list[Proposal]:
        eos = self.tokenizer.eos_token_id
        end = ids.index(eos) if eos in ids else len(ids)
        ids = ids[:end]
        size = request.image.size
        regions = self.parse_answer(ids, search.task, size)
        # The forced first token (`<s>`) is no choice of the model's.
        first = 1 if ids and ids[0] == self.tokenizer.bos_token_id else 0
        ends = _completion_points(lambda n: self.parse_answer(ids[:n], search.task, size), regions, first, len(ids))
        proposals = []
        for k, (shape, phrase) in enumerate(regions):
            span = log_probs[(ends[k - 1] if k else first): ends[k]]
            score = math.exp(sum(span) / len(span)) if span else 0.0
            if search.task == DETECTION_TASK:
                label = phrase
            elif len(search.labels) == 1:
                label = search.labels[0]
            else:
                label = match_label(phrase, search.labels)
            if not label:
                continue
            if search.task == SEGMENTATION_TASK:
                for flat in shape:
                    points = tuple((float(x), float(y)) for x, y in zip(flat[0::2], flat[1::2], strict=False))
                    if len(points) < 3:
                        continue
                    xs, ys = [p[0] for p in points], [p[1] for p in points]
                    proposals.append(Proposal(label, (min(xs), min(ys), max(xs), max(ys)), score, points))
            else:
                proposals.append(Proposal(label, tuple(float(c) for c in shape), score))
        return proposals

    @torch.no_grad()
    def choose(self, requests: Sequence[ChoiceRequest]) -> list[dict[str, float]]:
        if not requests:
            return []
        prompts = [self.attribute_prompt_for(r.attribute, self.locations(r.box, r.image.size)) for r in requests]
        # One encoder pass per distinct (image, prompt).
        pairs: dict[tuple[str, str], int] = {}
        images, texts, which = [], [], []
        for request, prompt in zip(requests, prompts, strict=True):
            key = (self.image_key(request.image), prompt.text)
            if key not in pairs:
                pairs[key] = len(images)
                images.append(request.image)
                texts.append(prompt.text)
            which.append(pairs[key])
        states, mask = self._encode(images, texts)
        rows = [(which[i], self._target_ids(candidate + prompt.suffix))
                for i, (request, prompt) in enumerate(zip(requests, prompts, strict=True))
                for candidate in request.candidates]
        scores = self._log_likelihoods(states, mask, rows)
        result, at = [], 0
        for request in requests:
            values = torch.tensor(scores[at: at + len(request.candidates)], dtype=torch.float64)
            at += len(request.candidates)
            result.append(dict(zip(request.candidates, torch.softmax(values, 0).tolist(), strict=True)))
        return result

    def _log_likelihoods(self, states: torch.Tensor, mask: torch.Tensor,
                         rows: Sequence[tuple[int, Sequence[int]]]) -> list[float]:
        """Sum of the target tokens' log-probabilities, per (encoder row, target ids)."""
        config = self.model.config.text_config
        scores: list[float] = []
        chunk = 4 * self.max_batch_size
        for start in range(0, len(rows), chunk):
            part = rows[start: start + chunk]
            index = torch.tensor([row for row, _ in part], device=self.device)
            length = max(len(ids) for _, ids in part)
            labels = torch.full((len(part), length), -100, dtype=torch.long, device=self.device)
            for i, (_, ids) in enumerate(part):
                labels[i, : len(ids)] = torch.tensor(ids)
            decoder_ids = labels.roll(1, dims=1)
            decoder_ids[:, 0] = config.decoder_start_token_id
            decoder_ids = decoder_ids.masked_fill(decoder_ids == -100, config.pad_token_id)
            logits = self.model(encoder_outputs=BaseModelOutput(last_hidden_state=states[index]),
                                attention_mask=mask[index], decoder_input_ids=decoder_ids).logits
            picked = F.log_softmax(logits.float(), dim=-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
            scores += (picked * (labels != -100)).sum(-1).tolist()
        return scores

    def generate(self, records: Sequence[Any], max_new_tokens: int = 32) -> list[str]:
        """Free answers to single-region caption and attribute records (their question text is not read: the
        meta says what is asked, and the engine asks it its own way)."""
        images: dict[str, Image.Image] = {}
        pictures, prompts = [], []
        for record in records:
            if len(record.boxes) != 1:
                raise EngineError(f"record {record.id}: Florence-2 answers about one region at a time")
            if record.image not in images:
                images[record.image] = open_rgb(record.image)
            region = self.locations(record.boxes[0], (record.width, record.height), normalized=False)
            attribute = _attribute_of(record.meta)
            prompt = self.caption_prompt(region) if attribute is None else self.attribute_prompt_for(attribute, region)
            pictures.append(images[record.image])
            prompts.append(prompt)
        return [answer.text for answer in self._answer(pictures, prompts, max_new_tokens)]

    # ------------------------------------------------------------------ training
    def finetune(self, examples: Sequence[Example], config: FinetuneConfig,
                 records: Sequence[Any] = ()) -> FinetuneResult:
        from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

        examples = [*examples, *(e for e in map(example_of_record, records) if e is not None)]
        if not examples:
            raise EngineError("nothing to fine-tune on: no caption or single-region attribute examples")
        started = time.monotonic()
        learnt = self.learnt_attributes | {e.attribute for e in examples if e.attribute is not None}
        previous, self.learnt_attributes = self.learnt_attributes, learnt
        try:
            images: dict[str, Image.Image] = {}
            for example in examples:
                images.setdefault(example.image, open_rgb(example.image))
            features = dict(zip(images, self._features(list(images.values())), strict=True))
            items = []
            for example in examples:
                region = self.locations(example.box, (example.width, example.height), normalized=False)
                prompt = (self.caption_prompt(region, example.kind) if example.attribute is None
                          else self.attribute_prompt_for(example.attribute, region))
                items.append((features[example.image], prompt.text, self._target_ids(example.answer + prompt.suffix)))
        except BaseException:
            self.learnt_attributes = previous
            raise

        torch.manual_seed(config.seed)
        order = random.Random(config.seed)
        lora = LoraConfig(r=config.lora_rank, lora_alpha=2 * config.lora_rank, lora_dropout=0.05,
                          target_modules=LORA_TARGETS, bias="none")
        peft_model = get_peft_model(self.model, lora)
        parameters = [p for p in peft_model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=0.0)
        batch = min(self.train_batch_size, len(items))
        per_epoch = math.ceil(len(items) / batch)
        steps = config.max_steps if config.max_steps is not None else max(1, math.ceil(config.epochs * per_epoch))
        losses: list[float] = []
        queue: list[int] = []
        self.model.train()
        try:
            for _ in _progress(range(steps), config.progress):
                if len(queue) < batch:
                    epoch = list(range(len(items)))
                    order.shuffle(epoch)
                    queue += epoch
                chosen, queue = [items[i] for i in queue[:batch]], queue[batch:]
                with torch.no_grad():
                    embeds, mask = self._inputs([c[0] for c in chosen], [c[1] for c in chosen])
                labels = torch.full((len(chosen), max(len(c[2]) for c in chosen)), -100, device=self.device)
                for i, (_, _, target) in enumerate(chosen):
                    labels[i, : len(target)] = torch.tensor(target)
                loss = self.model(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss.item())
        finally:
            self.model.eval()
        state = {k: v.detach().to("cpu", copy=True) for k, v in get_peft_model_state_dict(peft_model).items()}
        self._adapter = (lora, state)
        self.model = peft_model.merge_and_unload().eval()
        self.forget_images()  # features do not change (the vision tower is frozen) but keep the rule simple
        return FinetuneResult(
            steps=steps, seconds=time.monotonic() - started, first_loss=losses[0], last_loss=losses[-1],
            settings={"targets": LORA_TARGETS, "rank": config.lora_rank, "alpha": lora.lora_alpha,
                      "dropout": lora.lora_dropout, "batch_size": batch, "learning_rate": config.learning_rate,
                      "examples": len(items), "attribute_prompt": self.attribute_prompt,
                      "learnt_attributes": sorted(self.learnt_attributes)},
        )

    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = None
        if self.model.dtype != self.stored_dtype:
            state = {k: v.to(self.stored_dtype) if v.is_floating_point() else v
                     for k, v in self.model.state_dict().items()}
        self.model.save_pretrained(path, state_dict=state)
        if state is not None:  # the config records the dtype the weights are in, not the one they ran in
            config_file = path / "config.json"
            config = json.loads(config_file.read_text(encoding="utf-8"))
            config["dtype"] = str(self.stored_dtype).removeprefix("torch.")
            config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        self.processor.save_pretrained(path)
        settings = {"attribute_prompt": self.attribute_prompt, "learnt_attributes": sorted(self.learnt_attributes)}
        (path / ENGINE_FILE).write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
        if self._adapter is not None:
            from safetensors.torch import save_file

            lora, adapter = self._adapter
            (path / LORA_FOLDER).mkdir(exist_ok=True)
            lora.save_pretrained(path / LORA_FOLDER)
            save_file(adapter, path / LORA_FOLDER / "adapter_model.safetensors", metadata={"format": "pt"})


def _completion_points(parse: Any, regions: Sequence[Any], first: int, length: int) -> list[int]:
    """For each region of a whole answer, the shortest prefix (in tokens) whose parse holds the regions up to
    it as the whole answer's parse does (a binary search: appending tokens never changes a complete region)."""
    ends: list[int] = []
    low = first
    for k in range(len(regions)):
        lo, hi = low + 1, length
        while lo < hi:
            mid = (lo + hi) // 2
            if parse(mid)[: k + 1] == list(regions[: k + 1]):
                hi = mid
            else:
                lo = mid + 1
        ends.append(lo)
        low = lo
    return ends


def example_of_record(record: Any) -> Example | None:
    """A dataset record (`model.data_format.RegionSample`) as an `Example`, when it is one question about one
    region (a caption or an attribute); None for the others."""
    if len(record.boxes) != 1 or len(record.conversations) != 2:
        return None
    if record.meta.get("task") not in ("caption", "attribute"):
        return None
    attribute = _attribute_of(record.meta)
    if record.meta.get("task") == "attribute" and not attribute:
        return None
    return Example(id=record.id, image=record.image, width=record.width, height=record.height,
                   box=tuple(record.boxes[0]), attribute=attribute, answer=record.conversations[1]["value"],
                   meta=record.meta)


def _attribute_of(meta: dict[str, Any]) -> str | None:
    return meta.get("attribute") if meta.get("task") == "attribute" else None


def _progress(steps: range, show: bool) -> Any:
    if not show:
        return steps
    from tqdm import tqdm

    return tqdm(steps, desc="fine-tune", unit="step")
