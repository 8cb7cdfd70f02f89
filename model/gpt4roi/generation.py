"""Batched greedy generation and candidate scoring on top of [`GPT4RoIForCausalLM`].

Both take prompts that may share images: image features are computed by the caller once per distinct
image and every prompt points at its image through `image_index`.

Prompts end with `"\\n### Assistant:"`, i.e. exactly the tokens that precede an answer in training, so
the model continues with ` <answer>\\n###`. (The original demo stopped the prompt at `"\\n### "` and let
the model write `Assistant:` itself; with SentencePiece that leaves a lone `▁` token the model never saw
in training.)

Scoring packs each prompt's candidate answers into one row after the prompt (see [`pack_answers`]): the
question is run once however many candidates it has, instead of once per candidate.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from model.engine import Answer

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


def shared_prefix_cache(
    model: GPT4RoIForCausalLM,
    tokenizer: GPT4RoITokenizer,
    prompt_ids: Sequence[Sequence[int]],
    image_features: ImageFeatures,
    image_index: Sequence[int],
) -> tuple[DynamicCache, list[list[int]]]:
    """The keys/values of the tokens every prompt starts with, one row per prompt, and each prompt's rest.

    Those tokens are the text up to the image ([`GPT4RoIForCausalLM.image_prefix_cache`]) and the text after
    it that all prompts share up to their first `<bbox>` (` provides an overview of the picture.\\n`, and
    `What is the` when all ask for an attribute): both depend on the image only, so they run once per image.
    The cache is then spread to the rows last, since building a cache copies what it is given.
    """
    device = image_features.tokens.device
    prefix, rests = split_prefix(prompt_ids, tokenizer.im_end_token_id)
    n_images = image_features.tokens.shape[0]
    cache = model.image_prefix_cache(torch.tensor(prefix, device=device), image_features, range(n_images))
    shared = _common_text_prefix(rests, (model.config.bbox_token_id, model.config.image_patch_token_id))
    if shared:
        ids = torch.tensor(shared, device=device).expand(n_images, -1)
        positions = torch.arange(len(prefix), len(prefix) + len(shared), device=device).expand(n_images, -1)
        model.language_model(
            inputs_embeds=model.embed_inputs(ids, None, None), position_ids=positions, cache=cache,
            use_cache=True, logits_to_keep=1,
        )
    cache.reorder_cache(torch.as_tensor(list(image_index), dtype=torch.long, device=device))
    return cache, [rest[len(shared):] for rest in rests]


def _common_text_prefix(rests: Sequence[Sequence[int]], special_ids: Sequence[int]) -> list[int]:
    """The longest token prefix of all `rests` before any of `special_ids` (their embeddings depend on the
    prompt's boxes), leaving every rest at least one token (its last one predicts the answer)."""
    shortest = min(len(rest) for rest in rests) - 1
    length = 0
    while (
        length < shortest
        and rests[0][length] not in special_ids
        and all(rest[length] == rests[0][length] for rest in rests)
    ):
        length += 1
    return list(rests[0][:length])


@torch.no_grad()
def generate_answers(
    model: GPT4RoIForCausalLM,
    tokenizer: GPT4RoITokenizer,
    prompt_ids: Sequence[Sequence[int]],
    boxes: Sequence[torch.Tensor],
    image_features: ImageFeatures,
    image_index: Sequence[int],
    config: GenerationConfig | None = None,
) -> list[Answer]:
    """Answers for a batch of tokenized prompts, each stopped on its own at `###` or EOS.

    `prompt_ids[i]` uses image `image_index[i]` of `image_features` and `boxes[i]` (normalized xyxy).
    What all prompts start with runs once per image ([`shared_prefix_cache`]); each prompt's rest is
    left-padded.
    Returns parsed answers (`Assistant:` and the stop string removed) with their confidence.
    """
    config = config or GenerationConfig()
    device = image_features.tokens.device
    cache, rests = shared_prefix_cache(model, tokenizer, prompt_ids, image_features, image_index)
    prefix_length = cache.get_seq_length()
    rest_ids, rest_mask = left_pad(rests, tokenizer.pad_token_id, device)
    out = model.forward_after_prefix(
        cache, rest_ids, rest_mask, image_features, boxes, image_index, logits_to_keep=1
    )
    batch = rest_ids.shape[0]
    mask = torch.cat([rest_mask.new_ones(batch, prefix_length), rest_mask], dim=1)
    next_position = mask.sum(-1, keepdim=True)
    generated: list[list[int]] = [[] for _ in range(batch)]
    log_probs: list[list[float]] = [[] for _ in range(batch)]
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    for step in range(config.max_new_tokens):
        logits = out.logits[:, -1].float()
        next_ids = _pick(logits, config)
        picked = F.log_softmax(logits, dim=-1).gather(-1, next_ids[:, None]).squeeze(-1).tolist()
        next_ids = torch.where(done, torch.full_like(next_ids, tokenizer.pad_token_id), next_ids)
        for row in (~done).nonzero().flatten().tolist():
            token = next_ids[row].item()
            log_probs[row].append(picked[row])
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
    return [Answer(parse_answer(tokenizer.decode(answer_tokens(tokenizer, ids))),
                   math.exp(sum(row) / len(row)) if row else 0.0)
            for ids, row in zip(generated, log_probs, strict=True)]


def answer_tokens(tokenizer: GPT4RoITokenizer, ids: Sequence[int]) -> list[int]:
    """The generated `ids` that hold the answer: those before the stop string, without trailing whitespace
    tokens and without a trailing incomplete UTF-8 character.

    The trimming has to happen on these tokens rather than on the whole generation: in
    `[▁red, <0xE2>, <0x82>, \\n###]` the broken bytes are not at the end of the generation, and decoded they
    would leave a replacement character at the end of the answer. Whitespace before the stop string
    (`<0x0A>` in LLaMA's vocabulary) is dropped first for the same reason; `parse_answer` strips it anyway.
    """
    ids = [int(i) for i in ids]
    end = next((k for k in range(1, len(ids) + 1) if STOP_STRING in tokenizer.decode(ids[:k])), None)
    if end is not None:
        # The stop string may span tokens (`#`, `##`): cut where it starts, unless that token also holds
        # answer text (then it ends the answer, which cannot end in a broken byte, and parse_answer cuts).
        start = max(j for j in range(end) if STOP_STRING in tokenizer.decode(ids[j:end]))
        if tokenizer.decode(ids[start:end]).split(STOP_STRING, 1)[0].strip():
            return ids[:end]
        ids = ids[:start]
    while ids and not tokenizer.decode(ids[-1:]).strip():
        ids.pop()
    return tokenizer.drop_partial_character(ids)


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


@dataclass
class PackedAnswers:
    """Prompts' rests with their candidate answers packed after them, one row per prompt (right-padded).

    Row i is `rest_i a_1[:-1] a_2[:-1] …`: an answer's last token is only predicted, never attended to.
    `segment` tells the parts apart (0: the prompt's rest, k: the row's k-th answer, -1: padding); every
    answer attends to the image prefix, the prompt's rest and its own earlier tokens only, and its
    positions continue the prompt's as if it were the only answer, so each answer's log-probabilities are
    those of `rest_i a_k` run alone. Token t of answer k is predicted at `target_row[t]`,
    `target_position[t]` (the rest's last token for an answer's first token).
    """

    input_ids: torch.Tensor  # [B, S]
    position_ids: torch.Tensor  # [B, S]
    segment: torch.Tensor  # [B, S]
    target_row: torch.Tensor  # [T], T = the answers' tokens in all
    target_position: torch.Tensor  # [T]
    target_token: torch.Tensor  # [T]
    target_answer: torch.Tensor  # [T], index into all answers, prompt by prompt
    num_answers: int

    def attention_mask(self, prefix_length: int, dtype: torch.dtype) -> torch.Tensor:
        """Additive mask `[B, 1, S, prefix_length + S]` over the prefix cache and the packed tokens."""
        batch, length = self.segment.shape
        query, key = self.segment[:, :, None], self.segment[:, None, :]  # [B, S, 1], [B, 1, S]
        causal = torch.ones(length, length, dtype=torch.bool, device=self.segment.device).tril()
        # Padding sees the prefix, the rest and other padding (never an empty row); its outputs are unread.
        packed = causal & ((key == 0) | (key == query))  # [B, S, S]
        allowed = torch.cat([packed.new_ones(batch, length, prefix_length), packed], dim=-1)
        # Additive rather than boolean: eager attention adds the mask, SDPA takes either.
        mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def pack_answers(
    rests: Sequence[Sequence[int]], answers: Sequence[Sequence[Sequence[int]]], prefix_length: int, pad_id: int
) -> PackedAnswers:
    """Pack `answers[i]` (token ids that follow prompt i) after `rests[i]` (prompt i after the image
    prefix of `prefix_length` tokens); see [`PackedAnswers`]."""
    rows, positions, segments = [], [], []
    target_row, target_position, target_token = [], [], []
    for row, (rest, options) in enumerate(zip(rests, answers, strict=True)):
        if not rest:
            raise ValueError("a scored prompt needs tokens after the image block")
        tokens, segment = list(rest), [0] * len(rest)
        position = list(range(prefix_length, prefix_length + len(rest)))
        for k, answer in enumerate(options, start=1):
            if not answer:
                raise ValueError("an answer to score needs at least one token")
            start = len(tokens)
            tokens += answer[:-1]
            segment += [k] * (len(answer) - 1)
            position += range(prefix_length + len(rest), prefix_length + len(rest) + len(answer) - 1)
            target_row += [row] * len(answer)
            target_position += [len(rest) - 1, *range(start, start + len(answer) - 1)]
            target_token += answer
        rows.append(tokens)
        positions.append(position)
        segments.append(segment)
    counts = torch.tensor([len(answer) for options in answers for answer in options], dtype=torch.long)
    length = max(len(tokens) for tokens in rows)

    def right_pad(values: list[list[int]], fill: int) -> torch.Tensor:
        return torch.tensor([v + [fill] * (length - len(v)) for v in values], dtype=torch.long)

    return PackedAnswers(
        input_ids=right_pad(rows, pad_id),
        position_ids=right_pad(positions, 0),
        segment=right_pad(segments, -1),
        target_row=torch.tensor(target_row, dtype=torch.long),
        target_position=torch.tensor(target_position, dtype=torch.long),
        target_token=torch.tensor(target_token, dtype=torch.long),
        target_answer=torch.repeat_interleave(torch.arange(len(counts)), counts),
        num_answers=len(counts),
    )


@torch.no_grad()
def answer_log_likelihood(
    model: GPT4RoIForCausalLM,
    tokenizer: GPT4RoITokenizer,
    prompt_ids: Sequence[Sequence[int]],
    answers: Sequence[Sequence[Sequence[int]]],
    boxes: Sequence[torch.Tensor],
    image_features: ImageFeatures,
    image_index: Sequence[int],
) -> torch.Tensor:
    """Sum of log-probabilities of each answer's tokens after its prompt → `[sum_i len(answers[i])]`,
    prompt by prompt.

    `answers[i]` are token ids that follow prompt `prompt_ids[i]` (` red\\n###`, see [`answer_ids`]); prompt
    i uses image `image_index[i]` and `boxes[i]`. What all prompts start with runs once per image
    ([`shared_prefix_cache`]), each prompt's rest once with all its answers packed after it ([`pack_answers`]),
    and logits are computed only where an answer token is predicted. The packed rows take a 4D mask: SDPA or
    eager attention, not FlashAttention.
    """
    device = image_features.tokens.device
    cache, rests = shared_prefix_cache(model, tokenizer, prompt_ids, image_features, image_index)
    prefix_length = cache.get_seq_length()
    packed = pack_answers(rests, answers, prefix_length, tokenizer.pad_token_id)
    embeds = model.embed_inputs(packed.input_ids.to(device), image_features, boxes, image_index)
    hidden = model.language_model.get_decoder()(
        inputs_embeds=embeds,
        attention_mask=packed.attention_mask(prefix_length, embeds.dtype).to(device),
        position_ids=packed.position_ids.to(device),
        cache=cache,
        use_cache=True,
    ).last_hidden_state  # [B, S, H]
    predicting = hidden[packed.target_row.to(device), packed.target_position.to(device)]  # [T, H]
    logits = model.language_model.get_output_embeddings()(predicting).float()  # [T, V], not [B, S, V]
    picked = logits.log_softmax(-1).gather(-1, packed.target_token.to(device)[:, None]).squeeze(-1)
    totals = torch.zeros(packed.num_answers, device=device)
    return totals.index_add_(0, packed.target_answer.to(device), picked)
