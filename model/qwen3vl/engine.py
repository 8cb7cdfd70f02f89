"""Qwen3-VL behind the engine interface: region captions, closed-set choices by likelihood, LoRA fine-tunes.

Regions. Qwen3-VL has no region encoder; a region reaches it in one of two ways, the option `region`
(`ENGINE_OPTIONS=qwen3-vl.region=drawn|text`):

- `drawn` (the default): the box is outlined in red on a copy of the image (`prompts.draw_region`) and the
  question names "the region outlined in red". Qwen's maintainers say that describing a region given by its
  coordinates was not trained directly and "may not be very stable", whereas something marked on the picture
  is what the model sees; so drawing is the default. Its cost: every region is an image of its own, so its
  features cannot be shared with the image's other regions; the vision tower and the language model's pass over
  the image tokens run once per region (the questions about one region still share them).
- `text`: the box goes into the question as `[x1, y1, x2, y2]` in Qwen's relative 0–1000 coordinates. The image
  is the same for every region, so its features and the language model's keys and values for everything up to
  the image's end are computed once per image and reused by all its regions; a further box costs only its
  question's tokens.

Prompts are Qwen's chat template: the image, then the question (`prompts`: "Describe the object in region [..]
in one short sentence."; "What is the {attribute} of the object in region [..]? Answer with one of: v1, v2";
for the label "Which of these is the object in region [..]: l1, l2? Answer with one of them."), then the
assistant prefix.

How a prompt runs. The vision tower runs apart (`get_image_features`, cached by image content, or content and
box when drawn) and its output goes to `forward` as `mm_encoder_outputs`, with the image placeholder expanded
to the number of visual tokens and `mm_token_type_ids` marking them, as the processor would. The tokens up to
the image's end (the "image prefix") run once per image (per region when drawn) and their key/value cache is
kept; a batch of prompts gathers its prefixes into one left-padded cache and runs the rests (question and
assistant prefix, left-padded so every row ends at the last column) on top.

Positions. With multimodal RoPE a token's position is not its index: `get_rope_index` gives the image tokens
3-D positions and reports a per-row `rope_delta` (largest position + 1 minus the row's real length); every text
token after the image sits at `text_position + rope_delta` on all three axes, `text_position` counting the real
tokens before it (what `generate` does with `rope_deltas` after the first step). The engine keeps, per image
prefix, the rope position of the first token after it, and passes every later token's positions explicitly as
`position_ids` of shape (4, rows, length): the text positions (which the attention mask uses), then the three
equal rope axes. GPT4RoI's packing trick (one shared prefix through its own model code) does not carry over as
is, since Qwen's positions depend on each image's grid; rebuilding them this way gives the same numbers as one
pass over the whole sequence (the specifications compare with `generate` and plain forward passes).

Captions: greedy decoding on that cache, each row stopping at its end-of-turn (or EOS) token; the confidence is
the geometric mean of the generated tokens' probabilities, the stop token included.

Choices: a candidate's score is the log-likelihood of its tokens followed by `<|im_end|>` after the assistant
prefix. The prompt runs once per request; its cache rows are repeated to one row per candidate
(`Cache.reorder_cache`) and only the candidates' tokens run on top; a softmax over a request's candidates gives
the distribution.

Fine-tunes train LoRA adapters on the language model's attention and MLP projections (`LORA_TARGETS`, a regex
anchored at the language model, so the vision tower's modules are left out), everything else frozen, with the
loss on the answer tokens (and the end-of-turn token) only. The vision tower does not change, so image features
stay valid while training; the cached image prefixes do not, and are dropped afterwards.
"""

from __future__ import annotations

import math
import random
import time
from collections import OrderedDict, defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from PIL import Image
from transformers import AutoProcessor, DynamicCache, Qwen3VLForConditionalGeneration
from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

from model.engine import (
    TRANSCRIPTION,
    Answer,
    CaptionRequest,
    ChoiceRequest,
    Engine,
    EngineError,
    Example,
    FinetuneConfig,
    FinetuneResult,
    check_options,
)
from model.image_keys import ImageKeys
from model.loading import open_rgb, runtime_dtype, stored_dtype

from .prompts import REGION_MODES, Box, attribute_question, caption_question, draw_region, transcription_question

ADAPTER_FOLDER = "lora"
DEFAULT_REGION = "drawn"
OPTIONS: Mapping[str, Sequence[str]] = {"region": REGION_MODES}
# The language model's projections only: the vision tower's modules are named differently but live under
# `model.visual`, so the path is anchored at `model.language_model`.
LORA_TARGETS = r"model\.language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
END_OF_TURN = "<|im_end|>"
IMAGE_CACHE_SIZE = 16
# Requests per forward pass, and candidate rows per scoring pass (each row holds a copy of its prefix's cache).
MAX_PREFIXES = 8
MAX_ROWS = 64
TRAIN_BATCH = 4


@dataclass(frozen=True)
class _Prompt:
    """What the model is shown for one question: the image (with the outline in drawn mode), the key its
    features are cached under, and the question."""

    image: Image.Image
    key: tuple[Any, ...]
    question: str


@dataclass(frozen=True)
class _Features:
    """The vision tower's output for one image: the merged tokens, the deepstack layers', the patch grid."""

    embeds: torch.Tensor
    deepstack: tuple[torch.Tensor, ...]
    grid: torch.Tensor


@dataclass(frozen=True)
class _Prefix:
    """The language model's keys and values (per layer, `(kv heads, length, head dim)`) for a prompt's tokens up
    to the end of its image, the rope position of the first token after them (on all three axes), and the
    number of visual tokens the image takes."""

    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]
    next_position: int
    visual_tokens: int

    @property
    def length(self) -> int:
        return self.keys[0].shape[1]


class _Prefilled(NamedTuple):
    """Prompts run: their cache, attention mask, last logits, and the text and rope positions of the next token."""

    cache: DynamicCache
    mask: torch.Tensor
    logits: torch.Tensor
    text_next: torch.Tensor
    rope_next: torch.Tensor


class Qwen3VLEngine(Engine):
    name = "qwen3-vl"

    def __init__(self, model: Qwen3VLForConditionalGeneration, processor: Any, region: str = DEFAULT_REGION,
                 stored_dtype: torch.dtype | None = None) -> None:
        if region not in REGION_MODES:
            raise EngineError(f"the {self.name} engine's region must be one of {', '.join(REGION_MODES)}")
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.region = region
        self.stored_dtype = stored_dtype or model.dtype
        self.end_of_turn = self.tokenizer.convert_tokens_to_ids(END_OF_TURN)
        pad = self.tokenizer.pad_token_id
        self.pad_id = self.end_of_turn if pad is None else pad
        self.image_token = processor.image_token
        self.image_token_id = model.config.image_token_id
        self.vision_end_id = model.config.vision_end_token_id
        self.merge_size = processor.image_processor.merge_size
        self._peft: Any = None
        self._features: OrderedDict[tuple[Any, ...], _Features] = OrderedDict()
        self._prefixes_cache: OrderedDict[tuple[Any, ...], _Prefix] = OrderedDict()
        self._image_key = ImageKeys()

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str = "cpu", dtype: str | None = None,
                        options: Mapping[str, str] | None = None) -> Qwen3VLEngine:
        settings = check_options(cls.name, options, OPTIONS)
        model = Qwen3VLForConditionalGeneration.from_pretrained(path, dtype=runtime_dtype(dtype, device)).to(device)
        return cls(model, AutoProcessor.from_pretrained(path), region=settings.get("region", DEFAULT_REGION),
                   stored_dtype=stored_dtype(path))

    @property
    def device(self) -> torch.device:
        return self.model.device

    # ----------------------------------------------------------------- answers
    def caption(self, requests: Sequence[CaptionRequest], max_new_tokens: int = 32) -> list[Answer]:
        prompts = [self._prompt(r.image, r.box, text_question(r.box, self.region, r.kind)) for r in requests]
        return [answer for chunk in _chunks(prompts, MAX_PREFIXES) for answer in self._generate(chunk, max_new_tokens)]

    def choose(self, requests: Sequence[ChoiceRequest]) -> list[dict[str, float]]:
        results: list[dict[str, float]] = []
        for chunk in _score_chunks(requests):
            prompts = [self._prompt(r.image, r.box, attribute_question(r.box, self.region, r.attribute, r.candidates))
                       for r in chunk]
            results += self._score(prompts, [r.candidates for r in chunk])
        return results

    def generate(self, records: Sequence[Any], max_new_tokens: int = 32) -> list[str]:
        """Records with one box and `meta["task"] == "caption"` or a `meta["attribute"]` (its values, when the
        record lists them in `meta["candidates"]`, go into the question); others get an empty answer."""
        images: dict[str, Image.Image] = {}
        rows: list[int] = []
        prompts: list[_Prompt] = []
        for row, record in enumerate(records):
            asked = _record_question(record)
            if asked is None:
                continue
            box, attribute, candidates = asked
            if record.image not in images:
                images[record.image] = open_rgb(record.image)
            question = (caption_question(box, self.region) if attribute is None
                        else attribute_question(box, self.region, attribute, candidates))
            prompts.append(self._prompt(images[record.image], box, question))
            rows.append(row)
        answers = [""] * len(records)
        generated = [a for chunk in _chunks(prompts, MAX_PREFIXES) for a in self._generate(chunk, max_new_tokens)]
        for row, answer in zip(rows, generated, strict=True):
            answers[row] = answer.text
        return answers

    def forget_images(self) -> None:
        self._features.clear()
        self._prefixes_cache.clear()

    # ---------------------------------------------------------------- training
    def finetune(self, examples: Sequence[Example], config: FinetuneConfig,
                 records: Sequence[Any] = ()) -> FinetuneResult:
        data = [*examples, *(e for e in map(example_of_record, records) if e is not None)]
        if not data:
            raise EngineError("nothing to fine-tune on: no examples, and no dataset record with one box and a "
                              "caption or attribute question")
        values = candidate_values(data)
        torch.manual_seed(config.seed)
        order = random.Random(config.seed)
        self._add_lora(config)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate)
        steps = config.max_steps or max(1, math.ceil(config.epochs * len(data) / TRAIN_BATCH))
        images: dict[str, Image.Image] = {}
        losses: list[float] = []
        start = time.perf_counter()
        self.model.train()
        try:
            for batch in _batches(len(data), TRAIN_BATCH, steps, order):
                prompts, answers = [], []
                for example in (data[i] for i in batch):
                    if example.image not in images:
                        images[example.image] = open_rgb(example.image)
                    prompts.append(self._prompt(images[example.image], normalized(example), training_question(
                        example, self.region, values)))
                    answers.append(example.answer)
                loss = self.model(**self._inputs(prompts, answers)).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss.item())
                if config.progress:
                    print(f"step {len(losses)}/{steps} loss {losses[-1]:.4f}", flush=True)
        finally:
            self.model.eval()
        self.forget_images()
        settings = {"lora_targets": LORA_TARGETS, "lora_rank": config.lora_rank, "lora_alpha": 2 * config.lora_rank,
                    "learning_rate": config.learning_rate, "batch_size": TRAIN_BATCH, "steps": steps,
                    "seed": config.seed, "region": self.region, "examples": len(data)}
        return FinetuneResult(steps=len(losses), seconds=time.perf_counter() - start, first_loss=losses[0],
                              last_loss=losses[-1], settings=settings)

    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        if self._peft is not None:
            self._peft.save_pretrained(path / ADAPTER_FOLDER)
            self.model = self._peft.merge_and_unload()
            self._peft = None
        working = self.model.dtype
        # Stored as the parent was, so a version keeps its size; the engine goes on in its working dtype.
        self.model.to(self.stored_dtype).save_pretrained(path)
        self.model.to(working)
        self.processor.save_pretrained(path)
        self.forget_images()  # the weights went through the stored dtype and the merge: recompute the prefixes

    def _add_lora(self, config: FinetuneConfig) -> None:
        from peft import LoraConfig, get_peft_model

        if self._peft is not None:  # a second fine-tune before saving trains the same adapter on
            return
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        lora = LoraConfig(r=config.lora_rank, lora_alpha=2 * config.lora_rank, lora_dropout=0.05,
                          target_modules=LORA_TARGETS, bias="none")
        # The adapter layers are injected into `self.model` in place; the wrapper is kept to save and merge.
        self._peft = get_peft_model(self.model, lora)

    # ------------------------------------------------------------------ inputs
    def _prompt(self, image: Image.Image, box: Box, question: str) -> _Prompt:
        key = self._image_key(image)
        if self.region == "drawn":
            return _Prompt(draw_region(image, box), (key, tuple(box)), question)
        return _Prompt(image, (key,), question)

    @torch.no_grad()
    def _encode_images(self, prompts: Sequence[_Prompt]) -> list[_Features]:
        """The vision tower's output for each prompt's image, running it only on images not in the cache."""
        missing: dict[tuple[Any, ...], Image.Image] = {}
        for prompt in prompts:
            if prompt.key not in self._features:
                missing.setdefault(prompt.key, prompt.image)
        if missing:
            pixels = self.processor.image_processor(images=list(missing.values()), return_tensors="pt")
            grid = pixels["image_grid_thw"]
            encoded = self.model.model.get_image_features(pixels["pixel_values"].to(self.device), grid.to(self.device))
            for i, key in enumerate(missing):
                self._features[key] = _Features(encoded.pooler_output[i],
                                                tuple(layer[i] for layer in encoded.deepstack_features), grid[i])
        features = []
        for prompt in prompts:
            self._features.move_to_end(prompt.key)
            features.append(self._features[prompt.key])
        while len(self._features) > IMAGE_CACHE_SIZE:
            self._features.popitem(last=False)
        return features

    def _prompt_text(self, question: str, visual_tokens: int) -> str:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return text.replace(self.image_token, self.image_token * visual_tokens, 1)

    def _prompt_ids(self, prompts: Sequence[_Prompt], visual_tokens: Sequence[int]) -> list[list[int]]:
        texts = [self._prompt_text(p.question, n) for p, n in zip(prompts, visual_tokens, strict=True)]
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def _visual_tokens(self, features: _Features) -> int:
        return int(features.grid.prod()) // self.merge_size ** 2

    def _answer_ids(self, answer: str) -> list[int]:
        return [*self.tokenizer(answer, add_special_tokens=False)["input_ids"], self.end_of_turn]

    def _inputs(self, prompts: Sequence[_Prompt], answers: Sequence[str]) -> dict[str, Any]:
        """Training inputs: prompt + answer + end of turn (right-padded), `labels` on the answer tokens only."""
        features = self._encode_images(prompts)
        sequences, labels = [], []
        prompts_ids = self._prompt_ids(prompts, [self._visual_tokens(f) for f in features])
        for prompt_ids, answer in zip(prompts_ids, answers, strict=True):
            answer_ids = self._answer_ids(answer)
            sequences.append(prompt_ids + answer_ids)
            labels.append([-100] * len(prompt_ids) + answer_ids)
        ids, mask = _pad(sequences, self.pad_id, left=False)
        return {**self._visual_inputs(ids, mask, features), "labels": _pad(labels, -100, left=False)[0].to(self.device)}

    def _visual_inputs(self, ids: torch.Tensor, mask: torch.Tensor, features: Sequence[_Features]) -> dict[str, Any]:
        """`forward`'s inputs for token rows holding one image each, its features computed beforehand."""
        return {
            "input_ids": ids.to(self.device),
            "attention_mask": mask.to(self.device),
            "mm_token_type_ids": (ids == self.image_token_id).long().to(self.device),
            "image_grid_thw": torch.stack([f.grid for f in features]).to(self.device),
            "mm_encoder_outputs": {"image": BaseModelOutputWithDeepstackFeatures(
                pooler_output=tuple(f.embeds for f in features),
                deepstack_features=[tuple(f.deepstack[k] for f in features)
                                    for k in range(len(features[0].deepstack))])},
        }

    # ------------------------------------------------------------- the passes
    @torch.no_grad()
    def _prefixes(self, prompts: Sequence[_Prompt]) -> tuple[list[_Prefix], list[list[int]]]:
        """Each prompt's image prefix (run through the language model only when not in the cache) and the token
        ids of its rest (the question and the assistant prefix)."""
        missing: dict[tuple[Any, ...], int] = {}
        for row, prompt in enumerate(prompts):
            if prompt.key not in self._prefixes_cache:
                missing.setdefault(prompt.key, row)
        rows = list(missing.values())
        features = dict(zip(rows, self._encode_images([prompts[row] for row in rows]), strict=True))
        visual = [self._prefixes_cache[p.key].visual_tokens if p.key in self._prefixes_cache
                  else self._visual_tokens(features[missing[p.key]]) for p in prompts]
        ids = self._prompt_ids(prompts, visual)
        cut = [row.index(self.vision_end_id) + 1 for row in ids]
        if missing:
            prefix_ids, mask = _pad([ids[row][:cut[row]] for row in rows], self.pad_id, left=True)
            inputs = self._visual_inputs(prefix_ids, mask, [features[row] for row in rows])
            cache = self.model(**inputs, use_cache=True, logits_to_keep=1).cache
            _, rope_deltas = self.model.model.get_rope_index(
                inputs["input_ids"], inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"],
                attention_mask=inputs["attention_mask"])
            for i, (key, row) in enumerate(missing.items()):
                length = cut[row]
                self._prefixes_cache[key] = _Prefix(
                    tuple(layer.keys[i, :, -length:].clone() for layer in cache.layers),
                    tuple(layer.values[i, :, -length:].clone() for layer in cache.layers),
                    next_position=int(rope_deltas[i]) + length, visual_tokens=visual[row])
        prefixes = []
        for prompt in prompts:
            self._prefixes_cache.move_to_end(prompt.key)
            prefixes.append(self._prefixes_cache[prompt.key])
        while len(self._prefixes_cache) > IMAGE_CACHE_SIZE:
            self._prefixes_cache.popitem(last=False)
        return prefixes, [row[end:] for row, end in zip(ids, cut, strict=True)]

    @torch.no_grad()
    def _prefill(self, prompts: Sequence[_Prompt]) -> _Prefilled:
        """The prompts' image prefixes gathered into one cache (left-padded) and their rests run on top
        (left-padded too, so that every row ends at the last column)."""
        prefixes, rests = self._prefixes(prompts)
        width = max(p.length for p in prefixes)
        layers = []
        for layer in range(len(prefixes[0].keys)):
            keys = prefixes[0].keys[layer].new_zeros((len(prefixes), *prefixes[0].keys[layer].shape[:1], width,
                                                      prefixes[0].keys[layer].shape[-1]))
            values = torch.zeros_like(keys)
            for row, prefix in enumerate(prefixes):
                keys[row, :, width - prefix.length:] = prefix.keys[layer]
                values[row, :, width - prefix.length:] = prefix.values[layer]
            layers.append((keys, values))
        cache = DynamicCache(layers, config=self.model.config.text_config)
        prefix_mask = torch.zeros((len(prefixes), width), dtype=torch.long)
        for row, prefix in enumerate(prefixes):
            prefix_mask[row, width - prefix.length:] = 1
        rest_ids, rest_mask = _pad(rests, self.pad_id, left=True)
        mask = torch.cat([prefix_mask, rest_mask], dim=1).to(self.device)
        # The text after the image: the k-th real token sits at text position `prefix length + k` (what the
        # attention mask counts) and at rope position `next_position + k` on all three axes.
        rest_mask = rest_mask.to(self.device)
        before = (rest_mask.cumsum(-1) - 1).clamp(min=0)
        lengths = torch.tensor([p.length for p in prefixes], device=self.device)
        starts = torch.tensor([p.next_position for p in prefixes], device=self.device)
        logits = self.model(input_ids=rest_ids.to(self.device), attention_mask=mask,
                            position_ids=_positions(lengths[:, None] + before, starts[:, None] + before),
                            cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
        taken = rest_mask.sum(-1)
        return _Prefilled(cache, mask, logits, lengths + taken, starts + taken)

    @torch.no_grad()
    def _generate(self, prompts: Sequence[_Prompt], max_new_tokens: int) -> list[Answer]:
        """Greedy decoding on the prefilled cache, each row stopping at its first end-of-turn (or EOS) token."""
        state = self._prefill(prompts)
        cache, mask, logits, text_next, rope_next = state
        eos = self.model.generation_config.eos_token_id
        stops = set(eos if isinstance(eos, list) else [] if eos is None else [eos]) | {self.end_of_turn}
        generated: list[list[int]] = [[] for _ in prompts]
        log_probs: list[list[float]] = [[] for _ in prompts]
        done = [False] * len(prompts)
        for step in range(max_new_tokens):
            scores = logits.float().log_softmax(-1)
            picked = scores.argmax(-1)
            chosen = scores.gather(-1, picked[:, None])[:, 0].tolist()
            for row, token in enumerate(picked.tolist()):
                if not done[row]:
                    generated[row].append(token)
                    log_probs[row].append(chosen[row])
                    done[row] = token in stops
            if all(done) or step == max_new_tokens - 1:  # no forward pass for a token nobody reads
                break
            mask = torch.cat([mask, mask.new_ones((len(prompts), 1))], dim=1)
            logits = self.model(input_ids=picked[:, None], attention_mask=mask,
                                position_ids=_positions(text_next[:, None], rope_next[:, None]), cache=cache,
                                use_cache=True).logits[:, -1]
            text_next, rope_next = text_next + 1, rope_next + 1
        return [Answer(self.tokenizer.decode(tokens, skip_special_tokens=True).strip(),
                       math.exp(sum(row) / len(row)) if row else None)
                for tokens, row in zip(generated, log_probs, strict=True)]

    @torch.no_grad()
    def _score(self, prompts: Sequence[_Prompt], candidates: Sequence[Sequence[str]]) -> list[dict[str, float]]:
        """Per prompt, the softmax over its candidates of log P(candidate + end of turn | prompt): the prompts
        run once, their cache rows repeated to one row per candidate, the candidates' tokens run on top."""
        rows = [(request, self._answer_ids(c)) for request, values in enumerate(candidates) for c in values]
        if not rows:
            return [{} for _ in candidates]
        cache, mask, logits, text_next, rope_next = self._prefill(prompts)
        first = logits.float().log_softmax(-1)
        index = torch.tensor([request for request, _ in rows], device=self.device)
        tokens, token_mask = _pad([ids for _, ids in rows], self.pad_id, left=False)
        tokens, token_mask = tokens.to(self.device), token_mask.to(self.device)
        cache.reorder_cache(index)
        steps = torch.arange(tokens.shape[1], device=self.device)
        rest = self.model(input_ids=tokens, attention_mask=torch.cat([mask[index], token_mask], dim=1),
                          position_ids=_positions(text_next[index, None] + steps, rope_next[index, None] + steps),
                          cache=cache, use_cache=True).logits
        # Token j of a candidate is predicted by the prompt's last position (j = 0) or by candidate token j - 1.
        log_probs = first[index, tokens[:, 0]]
        if tokens.shape[1] > 1:
            later = rest[:, :-1].float()
            later = later.gather(-1, tokens[:, 1:, None])[..., 0] - later.logsumexp(-1)
            log_probs = log_probs + (later * token_mask[:, 1:]).sum(-1)
        totals = log_probs.tolist()
        results: list[dict[str, float]] = []
        start = 0
        for values in candidates:
            scores = torch.tensor(totals[start:start + len(values)], dtype=torch.float64)
            start += len(values)
            results.append(dict(zip(values, scores.softmax(0).tolist(), strict=True)) if len(values) else {})
        return results


# ------------------------------------------------------------------ helpers
def normalized(example: Example) -> Box:
    x1, y1, x2, y2 = example.box
    return (x1 / example.width, y1 / example.height, x2 / example.width, y2 / example.height)


def candidate_values(examples: Sequence[Example]) -> dict[str, list[str]]:
    """Per attribute, the values a fine-tune's questions list: the answers seen for it, sorted (training data
    carries no Choices lists, and the question should have the form it has when answers are scored)."""
    values: dict[str, set[str]] = defaultdict(set)
    for example in examples:
        if example.attribute is not None:
            values[example.attribute].add(example.answer)
    return {attribute: sorted(seen) for attribute, seen in values.items()}


def training_question(example: Example, region: str, values: Mapping[str, Sequence[str]]) -> str:
    box = normalized(example)
    if example.attribute is None:
        return text_question(box, region, example.kind)
    listed = example.meta.get("candidates") or values.get(example.attribute, ())
    return attribute_question(box, region, example.attribute, tuple(listed))


def text_question(box: Box, region: str, kind: str) -> str:
    """The question for a region's description, or (`TRANSCRIPTION`) for the text written in it."""
    return transcription_question(box, region) if kind == TRANSCRIPTION else caption_question(box, region)


def example_of_record(record: Any) -> Example | None:
    """A dataset record (`model.data_format.RegionSample`) as an example, when it asks one question about one
    region (a caption or an attribute)."""
    asked = _record_question(record)
    answers = [turn["value"] for turn in record.conversations if turn.get("from") == "gpt"]
    if asked is None or not answers:
        return None
    return Example(id=record.id, image=str(record.image), width=record.width, height=record.height,
                   box=tuple(record.boxes[0]), attribute=asked[1], answer=answers[0], meta=dict(record.meta or {}))


def _record_question(record: Any) -> tuple[Box, str | None, tuple[str, ...]] | None:
    meta = record.meta or {}
    if len(record.boxes) != 1:
        return None
    x1, y1, x2, y2 = record.boxes[0]
    box = (x1 / record.width, y1 / record.height, x2 / record.width, y2 / record.height)
    if meta.get("task") == "caption":
        return box, None, ()
    if meta.get("attribute"):
        return box, str(meta["attribute"]), tuple(meta.get("candidates") or ())
    return None


def _positions(text: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """`position_ids` for text tokens: the text positions (which the attention mask uses), then the three rope
    axes, which text tokens share."""
    return torch.stack([text, rope, rope, rope])


def _pad(sequences: Sequence[Sequence[int]], value: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), value, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        span = slice(length - len(sequence), length) if left else slice(0, len(sequence))
        ids[row, span] = torch.tensor(sequence, dtype=torch.long)
        mask[row, span] = 1
    return ids, mask


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _score_chunks(requests: Sequence[ChoiceRequest]) -> Iterator[list[ChoiceRequest]]:
    """Consecutive requests, at most `MAX_PREFIXES` and (unless one alone has more) `MAX_ROWS` candidates."""
    chunk: list[ChoiceRequest] = []
    rows = 0
    for request in requests:
        if chunk and (len(chunk) == MAX_PREFIXES or rows + len(request.candidates) > MAX_ROWS):
            yield chunk
            chunk, rows = [], 0
        chunk.append(request)
        rows += len(request.candidates)
    if chunk:
        yield chunk


def _batches(count: int, size: int, steps: int, rng: random.Random) -> Iterator[list[int]]:
    """`steps` batches of `size` indices, each epoch a fresh shuffle."""
    order: list[int] = []
    for _ in range(steps):
        batch = []
        while len(batch) < min(size, count):
            if not order:
                order = list(range(count))
                rng.shuffle(order)
            batch.append(order.pop())
        yield batch
