"""Small GPT4RoI checkpoints built in code for tests: a tokenizer trained on the project's prompts and
random weights. Nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

import torch

from model.gpt4roi.configuration_gpt4roi import GPT4RoIConfig
from model.gpt4roi.modeling_gpt4roi import GPT4RoIForCausalLM
from model.gpt4roi.processing_gpt4roi import GPT4RoIProcessor
from model.gpt4roi.prompts import SYSTEM_PROMPT, attribute_question, build_prompt, caption_question
from model.gpt4roi.tokenization_gpt4roi import GPT4RoITokenizer, train_sentencepiece

# The version name under which the session registers its tiny checkpoint.
MODEL_VERSION = "tiny-1"
WORDS = ("red green blue yellow orange purple white black circle square triangle star cross small medium large "
         "solid striped dotted yes no region1 region2 left above larger color shape category size texture a an the")


def corpus() -> list[str]:
    """Text the tiny tokenizer is trained on: the prompt template, the questions and some answers."""
    texts = [SYSTEM_PROMPT, build_prompt([(caption_question(), "a small red solid circle")]), WORDS]
    texts += [build_prompt([(attribute_question(a), w)]) for a in ("color", "shape", "category") for w in WORDS.split()]
    return texts


def make_tokenizer(vocab_size: int = 320) -> GPT4RoITokenizer:
    return train_sentencepiece(corpus(), vocab_size=vocab_size)


def make_tiny_model(tokenizer: GPT4RoITokenizer, seed: int = 0, preset: str = "tiny") -> GPT4RoIForCausalLM:
    torch.manual_seed(seed)
    config = GPT4RoIConfig.from_preset(preset, vocab_size=len(tokenizer))
    return GPT4RoIForCausalLM(config).eval()


def make_tiny_checkpoint(path: str | Path, seed: int = 0) -> Path:
    """Write a loadable tiny checkpoint (weights, config, tokenizer, processor config) to `path`."""
    path = Path(path)
    tokenizer = make_tokenizer()
    model = make_tiny_model(tokenizer, seed)
    model.save_pretrained(path)
    processor = GPT4RoIProcessor(tokenizer, model.config.image_size, model.config.num_image_tokens)
    processor.save_pretrained(path)
    return path
