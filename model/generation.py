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

from .modeling_gpt4roi import GPT4RoIForCausalLM, ImageFeatures
from .processing_gpt4roi import IGNORE_INDEX, pad_sequences
from .prompts import ASSISTANT_ROLE, STOP_STRING, build_prompt, parse_answer
from .tokenization_gpt4roi import GPT4RoITokenizer

ANSWER_PREFIX = f"{ASSISTANT_ROLE}:"


def generation_prompt(question: str) -> str:
    """The full single-turn prompt for `question` (which holds one `region{k} <bbox>` per box)."""
    return build_prompt([(question, None)]) + ANSWER_PREFIX


def left_pad(
    sequences: Sequence[Sequence[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    ids, mask = pad_sequences(sequences, pad_id, left=True)
    return ids.to(device), mask.to(device)


@dataclass
class GenerationConfig:
    """max_new_tokens bounds each answer; temperature 0 is greedy (reproducible pre-annotations)."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0


def split_prefix(sequences: Sequence[Sequence[int]], im_end_id: int) -> tuple[list[int], list[list[int]]]:
    """Split prompts after their `<im_end>`: the shared prefix (identical for all) and each prompt's rest."""
    prefix: list[int] | None = None
    rests = []
    for seq in sequences:
        seq = list(seq)
        if im_end_id not in seq:
            raise ValueError("every prompt needs an image block (<image> in the first human message)")
        split = len(seq) - seq[::-1].index(im_end_id)
        if prefix is None:
            prefix = seq[:split]
        elif seq[:split] != prefix:
            raise ValueError("prompts in one batch must share the text before the image")
        rests.append(seq[split:])
    return prefix or [], rests


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
    The prompt text up to the image runs once per image; each prompt's rest is left-padded.
    Returns parsed answers (`Assistant:` and the stop string removed).
    """
    config = config or GenerationConfig()
    device = image_features.tokens.device
    prefix, rests = split_prefix(prompt_ids, tokenizer.im_end_token_id)
    cache = model.image_prefix_cache(torch.tensor(prefix, device=device), image_features, image_index)
    rest_ids, rest_mask = left_pad(rests, tokenizer.pad_token_id, device)
    out = model.forward_after_prefix(
        cache, rest_ids, rest_mask, image_features, boxes, image_index, logits_to_keep=1
    )
    batch = rest_ids.shape[0]
    mask = torch.cat([rest_mask.new_ones(batch, len(prefix)), rest_mask], dim=1)
    next_position = mask.sum(-1, keepdim=True)
    generated: list[list[int]] = [[] for _ in range(batch)]
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    for step in range(config.max_new_tokens):
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
        if done.all() or step == config.max_new_tokens - 1:  # no forward pass for a token nobody reads
            break
        mask = torch.cat([mask, (~done).long()[:, None]], dim=1)
        out = model.language_model(
            input_ids=next_ids[:, None], attention_mask=mask, position_ids=next_position, cache=cache,
            use_cache=True,
        )
        next_position = next_position + 1
    return [parse_answer(tokenizer.decode(tokenizer.drop_partial_character(ids))) for ids in generated]


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
    prefix, rests = split_prefix([ids for ids, _ in sequences], tokenizer.im_end_token_id)
    rest_labels = [labels[len(prefix):] for _, labels in sequences]
    if any(label != IGNORE_INDEX for _, labels in sequences for label in labels[: len(prefix)]):
        raise ValueError("scored tokens must come after the image block")
    cache = model.image_prefix_cache(torch.tensor(prefix, device=device), image_features, image_index)
    ids, mask = left_pad(rests, tokenizer.pad_token_id, device)
    labels, _ = left_pad(rest_labels, IGNORE_INDEX, device)
    logits = model.forward_after_prefix(cache, ids, mask, image_features, boxes, image_index).logits.float()
    log_probs = F.log_softmax(logits[:, :-1], dim=-1)
    targets = labels[:, 1:]
    picked = log_probs.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    return (picked * (targets != IGNORE_INDEX)).sum(-1)
