"""A tiny random Qwen3-VL checkpoint built in code, saved like a hub model: nothing is downloaded.

The tokenizer is byte-level BPE over the 256 byte symbols (no merges) plus Qwen's special tokens, the chat
template a small Qwen-style one, the image processor sized so that an image gives 4 to 16 visual tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tokenizers import pre_tokenizers
from transformers import (
    GenerationConfig,
    Qwen2Tokenizer,
    Qwen2VLImageProcessor,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
)
from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")

# Qwen's template, reduced to what the engine sends: text and image items, a generation prompt.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

PATCH_SIZE = 8
MERGE_SIZE = 2


def make_tokenizer() -> Qwen2Tokenizer:
    """Byte-level BPE: every byte is a token (ids 0–255), the special tokens follow (256–263)."""
    vocab = {symbol: index for index, symbol in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for token in SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], unk_token="<|endoftext|>", eos_token="<|im_end|>",
                               pad_token="<|endoftext|>", additional_special_tokens=list(SPECIAL_TOKENS[1:]))
    tokenizer.padding_side = "left"
    return tokenizer


def make_processor(tokenizer: Qwen2Tokenizer | None = None, patch_size: int = PATCH_SIZE,
                   merge_size: int = MERGE_SIZE, min_pixels: int | None = None,
                   max_pixels: int | None = None) -> Qwen3VLProcessor:
    """A processor whose image processor resizes to at most `max_pixels` (16 visual tokens by default)."""
    factor = patch_size * merge_size
    sizes = {"patch_size": patch_size, "merge_size": merge_size, "temporal_patch_size": 2}
    image_processor = Qwen2VLImageProcessor(
        **sizes, min_pixels=min_pixels or factor * factor * 4, max_pixels=max_pixels or factor * factor * 16,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    video_processor = Qwen3VLVideoProcessor(**sizes, size={"shortest_edge": factor * factor * 4,
                                                           "longest_edge": factor * factor * 64})
    return Qwen3VLProcessor(image_processor=image_processor, tokenizer=tokenizer or make_tokenizer(),
                            video_processor=video_processor, chat_template=CHAT_TEMPLATE)


def token_ids(tokenizer: Qwen2Tokenizer) -> dict[str, int]:
    """The config's special token ids, read from the tokenizer."""
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    return {"image_token_id": ids["<|image_pad|>"], "video_token_id": ids["<|video_pad|>"],
            "vision_start_token_id": ids["<|vision_start|>"], "vision_end_token_id": ids["<|vision_end|>"]}


def tiny_config(tokenizer: Qwen2Tokenizer, **text: Any) -> Qwen3VLConfig:
    text_config = {
        "vocab_size": 272, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16, "max_position_embeddings": 1024,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2],
                            "mrope_interleaved": True},
        "eos_token_id": tokenizer.convert_tokens_to_ids("<|im_end|>"),
        "pad_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"), **text,
    }
    vision_config = {
        "depth": 2, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2, "patch_size": PATCH_SIZE,
        "spatial_merge_size": MERGE_SIZE, "temporal_patch_size": 2, "out_hidden_size": 32,
        "num_position_embeddings": 64, "deepstack_visual_indexes": [1],
    }
    return Qwen3VLConfig(text_config=text_config, vision_config=vision_config, **token_ids(tokenizer))


def generation_config(tokenizer: Qwen2Tokenizer) -> GenerationConfig:
    return GenerationConfig(eos_token_id=[tokenizer.convert_tokens_to_ids("<|im_end|>"),
                                          tokenizer.convert_tokens_to_ids("<|endoftext|>")],
                            pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"), do_sample=False)


def save_tiny_qwen3vl(folder: Path, seed: int = 0) -> Path:
    """Write a loadable tiny Qwen3-VL checkpoint (weights, config, tokenizer, processor) to `folder`."""
    folder = Path(folder)
    processor = make_processor()
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(tiny_config(processor.tokenizer)).eval()
    model.generation_config = generation_config(processor.tokenizer)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
