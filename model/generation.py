"""Batched greedy generation and candidate scoring on top of [`GPT4RoIForCausalLM`].

Both take prompts that may share images: image features are computed by the caller once per distinct
image and every prompt points at its image through `image_index`.

Prompts end with `"\\n### Assistant:"`, i.e. exactly the tokens that precede an answer in training, so
the model continues with ` <answer>\\n###`. (The original demo stopped the prompt at `"\\n### "` and let
the model write `Assistant:` itself; with SentencePiece that leaves a lone `▁` token the model never saw
in training.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from .modeling_gpt4roi import GPT4RoIForCausalLM, ImageFeatures
from .prompts import ASSISTANT_ROLE, STOP_STRING, build_prompt, parse_answer
from .tokenization_gpt4roi import GPT4RoITokenizer

ANSWER_PREFIX = f"{ASSISTANT_ROLE}:"
IGNORE_INDEX = -100


def generation_prompt(question: str) -> str:
    """The full single-turn prompt for `question` (which holds one `region{k} <bbox>` per box)."""
    return build_prompt([(question, None)]) + ANSWER_PREFIX


def left_pad(
    sequences: Sequence[Sequence[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, length - len(seq):] = torch.as_tensor(seq, dtype=torch.long)
        mask[row, length - len(seq):] = 1
    return ids.to(device), mask.to(device)


@dataclass
class GenerationConfig:
    """max_new_tokens bounds each answer; temperature 0 is greedy (reproducible pre-annotations)."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0


@torch.no_grad()
def generate(
    model: GPT4RoIForCausalLM,
    tokenizer: GPT4RoITokenizer,
    prompt_ids: Sequence[Sequence[int]],
    boxes: Sequence[torch.Tensor],
    image_features: ImageFeatures,
    image_index: Sequence[int],
    config: GenerationConfig | None = None,
) -> list[str]:
    """Answers for a batch of tokenized prompts, each stopped on its own at `###` or EOS.

    `prompt_ids[i]` uses image `image_index[i]` of `image_features` and `boxes[i]` (normalized xyxy).
    Returns parsed answers (`Assistant:` and the stop string removed).
    """
    config = config or GenerationConfig()
    device = image_features.tokens.device
    input_ids, mask = left_pad(prompt_ids, tokenizer.pad_token_id, device)
    embeds = model.embed_inputs(input_ids, image_features, boxes, image_index)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config.text_config)
    out = model.language_model(
        inputs_embeds=embeds, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
        logits_to_keep=1,
    )
    batch = input_ids.shape[0]
    generated: list[list[int]] = [[] for _ in range(batch)]
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    next_position = positions[:, -1:] + 1
    for _ in range(config.max_new_tokens):
        next_ids = _pick(out.logits[:, -1].float(), config)
        next_ids = torch.where(done, torch.full_like(next_ids, tokenizer.pad_token_id), next_ids)
        for row in (~done).nonzero().flatten().tolist():
            token = next_ids[row].item()
            if token == tokenizer.eos_token_id:
                done[row] = True
                continue
            generated[row].append(token)
            if STOP_STRING in tokenizer.decode(generated[row][-4:]):
                done[row] = True
        if done.all():
            break
        mask = torch.cat([mask, (~done).long()[:, None]], dim=1)
        out = model.language_model(
            input_ids=next_ids[:, None], attention_mask=mask, position_ids=next_position, cache=cache,
            use_cache=True,
        )
        next_position = next_position + 1
    return [parse_answer(tokenizer.decode(ids)) for ids in generated]


def _pick(logits: torch.Tensor, config: GenerationConfig) -> torch.Tensor:
    if config.temperature <= 0:
        return logits.argmax(-1)
    probs = F.softmax(logits / config.temperature, dim=-1)
    if config.top_p < 1.0:
        sorted_probs, order = probs.sort(-1, descending=True)
        keep = sorted_probs.cumsum(-1) - sorted_probs < config.top_p
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs * keep)
    return torch.multinomial(probs, 1).squeeze(-1)


def answer_ids(tokenizer: GPT4RoITokenizer, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """Token ids of `prompt` (from `generation_prompt`, image tokens expanded) + `answer`, and their labels
    (the answer tokens and the stop string; the prompt is ignored)."""
    prompt_ids = tokenizer.encode(prompt)
    full_ids = tokenizer.encode(f"{prompt} {answer}\n{STOP_STRING}")
    if full_ids[: len(prompt_ids)] != prompt_ids:
        raise ValueError(f"answer {answer!r} changes the tokenization of its prompt")
    labels = [IGNORE_INDEX] * len(prompt_ids) + full_ids[len(prompt_ids):]
    return full_ids, labels


@torch.no_grad()
def sequence_log_likelihood(
    model: GPT4RoIForCausalLM,
    tokenizer: GPT4RoITokenizer,
    sequences: Sequence[tuple[list[int], list[int]]],
    boxes: Sequence[torch.Tensor],
    image_features: ImageFeatures,
    image_index: Sequence[int],
) -> torch.Tensor:
    """Sum of log-probabilities of the labelled tokens of each `(ids, labels)` sequence → `[n]`."""
    device = image_features.tokens.device
    ids, mask = left_pad([s[0] for s in sequences], tokenizer.pad_token_id, device)
    labels, _ = left_pad([s[1] for s in sequences], IGNORE_INDEX, device)
    logits = model(
        input_ids=ids, attention_mask=mask, boxes=boxes, image_index=image_index, image_features=image_features
    ).logits.float()
    log_probs = F.log_softmax(logits[:, :-1], dim=-1)
    targets = labels[:, 1:]
    picked = log_probs.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    return (picked * (targets != IGNORE_INDEX)).sum(-1)
