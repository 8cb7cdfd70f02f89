"""Florence-2 checkpoints built in code for tests and benches: random weights, a byte-level BART tokenizer
from an in-code vocabulary, and the processor files a hub checkpoint has. Nothing is downloaded.

`save_tiny_florence2` writes a small model that loads in well under a second; `florence2_config` builds the
real base/large shapes for benches (the tokenizer's vocabulary is smaller than the model's: ids beyond it
never appear).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    BartConfig,
    BartTokenizer,
    CLIPImageProcessor,
    Florence2Config,
    Florence2ForConditionalGeneration,
    Florence2Processor,
    Florence2VisionConfig,
    GenerationConfig,
)

NUM_LOCATIONS = 1000
# Whole-word tokens (with merges) so that prompts and answers have realistic lengths; any other text falls
# back to one token per byte.
WORDS = (
    "What does the region describe is of a an in on with and red green blue yellow white black small large "
    "circle square triangle person car dog cat tree sky road building table color shape category size "
    "texture solid striped dotted No object detected"
)
# What the hub checkpoints' processor config holds; without a "pure_text" entry the processor cannot parse
# even plain answers.
POST_PROCESSOR_CONFIG = {
    "ocr": {"PATTERN": r"(.+?)<loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)>",
            "AREA_THRESHOLD": 0.0},
    "phrase_grounding": {"banned_grounding_tokens": ["the image"]},
    "pure_text": {},
    "description_with_bboxes": {},
    "description_with_polygons": {},
    "polygons": {},
    "bboxes": {},
    "description_with_bboxes_or_polygons": {},
}


def make_tokenizer(words: str = WORDS) -> BartTokenizer:
    """A byte-level BART tokenizer with `<loc_0>`…`<loc_999>` and `<image>`, ids laid out like Florence-2's
    (`<s>` 0, `<pad>` 1, `</s>` 2, `<unk>` 3); its merges are learnt from `words` so that each is one token,
    bare or after a space."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=4096, min_frequency=1, show_progress=False,
                                  special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([words, " " + words], trainer=trainer)
    state = json.loads(bpe.to_str())["model"]
    vocab = dict(state["vocab"])
    vocab["<mask>"] = len(vocab)
    merges = [tuple(merge.split(" ")) if isinstance(merge, str) else tuple(merge) for merge in state["merges"]]
    tokenizer = BartTokenizer(vocab=vocab, merges=merges, extra_special_tokens={"image_token": "<image>"})
    tokenizer.add_tokens([f"<loc_{i}>" for i in range(NUM_LOCATIONS)], special_tokens=True)
    return tokenizer


def make_processor(tokenizer: BartTokenizer, image_size: int, image_seq_length: int) -> Florence2Processor:
    image_processor = CLIPImageProcessor(
        size={"height": image_size, "width": image_size}, crop_size={"height": image_size, "width": image_size},
        do_center_crop=False, resample=3, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
        image_seq_length=image_seq_length,
    )
    return Florence2Processor(image_processor=image_processor, tokenizer=tokenizer,
                              post_processor_config=POST_PROCESSOR_CONFIG)


def image_tokens(image_size: int, vision: Florence2VisionConfig) -> int:
    """Tokens the vision tower gives for a square image: one per cell of the last stage, plus their mean."""
    side = image_size
    for size, stride, padding in zip(vision.patch_size, vision.patch_stride, vision.patch_padding, strict=True):
        side = (side + 2 * padding - size) // stride + 1
    return side * side + 1


def florence2_config(size: str, vocab_size: int) -> tuple[Florence2Config, int]:
    """Configuration of Florence-2 `tiny`, `base` or `large` (the hub's -ft checkpoints' shapes) and its
    input image side in pixels."""
    if size == "tiny":
        vision = Florence2VisionConfig(
            depths=(1, 1, 1, 1), embed_dim=(8, 16, 16, 32), num_heads=(1, 2, 2, 4), num_groups=(1, 2, 2, 4),
            window_size=2, projection_dim=32, drop_path_rate=0.0,
        )
        text = dict(d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                    decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=256)
        image_size = 64
    elif size == "base":
        vision = Florence2VisionConfig(
            depths=(1, 1, 9, 1), embed_dim=(128, 256, 512, 1024), num_heads=(4, 8, 16, 32),
            num_groups=(4, 8, 16, 32), window_size=12, projection_dim=768, drop_path_rate=0.0,
        )
        text = dict(d_model=768, encoder_layers=6, decoder_layers=6, encoder_attention_heads=12,
                    decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072,
                    max_position_embeddings=1024)
        image_size = 768
    elif size == "large":
        vision = Florence2VisionConfig(
            depths=(1, 1, 9, 1), embed_dim=(256, 512, 1024, 2048), num_heads=(8, 16, 32, 64),
            num_groups=(8, 16, 32, 64), window_size=12, projection_dim=1024, drop_path_rate=0.0,
        )
        text = dict(d_model=1024, encoder_layers=12, decoder_layers=12, encoder_attention_heads=16,
                    decoder_attention_heads=16, encoder_ffn_dim=4096, decoder_ffn_dim=4096,
                    max_position_embeddings=1024)
        image_size = 768
    else:
        raise ValueError(f"unknown Florence-2 size {size!r}: tiny, base or large")
    text_config = BartConfig(
        vocab_size=vocab_size, dropout=0.1, attention_dropout=0.1, activation_dropout=0.1, scale_embedding=False,
        bos_token_id=0, pad_token_id=1, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=2, **text,
    )
    config = Florence2Config(text_config=text_config, vision_config=vision, image_token_id=vocab_size - 1)
    return config, image_size


def build_florence2(size: str = "tiny", seed: int = 0, vocab_size: int | None = None
                    ) -> tuple[Florence2ForConditionalGeneration, Florence2Processor]:
    """A random Florence-2 of `size` and its processor; `vocab_size` (at least the tokenizer's) pads the
    embedding table to the real model's."""
    tokenizer = make_tokenizer()
    vocab_size = max(vocab_size or 0, len(tokenizer))
    config, image_size = florence2_config(size, vocab_size)
    config.image_token_id = tokenizer.image_token_id
    torch.manual_seed(seed)
    model = Florence2ForConditionalGeneration(config).eval()
    if size == "tiny":
        # At the default init scale a tiny random model says the same token forever; wider weights make its
        # answers depend on the image and the box, which is what the tests compare.
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, torch.nn.Linear | torch.nn.Embedding):
                    module.weight.normal_(std=0.3)
            # A thousand location tokens would otherwise win most steps; answers should hold words too.
            locations = tokenizer.convert_tokens_to_ids([f"<loc_{i}>" for i in range(NUM_LOCATIONS)])
            model.get_input_embeddings().weight[locations] *= 0.2
    model.generation_config = GenerationConfig(
        bos_token_id=0, pad_token_id=1, eos_token_id=2, decoder_start_token_id=2, forced_bos_token_id=0,
        forced_eos_token_id=2, num_beams=3, no_repeat_ngram_size=3,
    )
    processor = make_processor(tokenizer, image_size, image_tokens(image_size, config.vision_config))
    return model, processor


def save_tiny_florence2(folder: Path, seed: int = 0) -> Path:
    """Write a tiny random Florence-2 checkpoint to `folder` (weights, config, generation config, tokenizer,
    processor), loadable offline like a hub model."""
    folder = Path(folder)
    model, processor = build_florence2("tiny", seed)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
