"""Qwen3-VL engine speed at the real model's shape, with random weights (nothing is downloaded).

    python bench/qwen3vl_bench.py [--size 2b|8b] [--region text|drawn] [--device cpu|cuda] [--dtype float32|bfloat16]

Prints the time of: the first box on a 512 px image (its image encoding included), a further box on the same
image (in text mode its features are reused; drawn, the outlined copy is encoded again), and 8 candidates
scored for that box. The dimensions are those of Qwen/Qwen3-VL-{2B,8B}-Instruct's config.json, written here
from the published configs; the image processor is Qwen3-VL's (16 px patches, 2x2 merge, so a 512 px square
gives 256 visual tokens). The tokenizer is the test's byte-level one, so the question is about 3x as many
tokens as Qwen's own tokenizer makes of it. Random weights never stop early: every caption is
`--max-new-tokens` tokens.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch
from PIL import Image, ImageDraw
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

from model.engine import LABEL, CaptionRequest, ChoiceRequest
from model.qwen3vl.engine import Qwen3VLEngine
from tests.support.qwen3vl_factory import generation_config, make_processor, make_tokenizer, token_ids

# Qwen/Qwen3-VL-{2B,8B}-Instruct: the language model (Qwen3-1.7B / Qwen3-8B shapes) and the vision tower.
SIZES: dict[str, dict[str, Any]] = {
    "2b": {
        "text": {"hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 28, "num_attention_heads": 16,
                 "num_key_value_heads": 8},
        "vision": {"depth": 24, "hidden_size": 1024, "intermediate_size": 4096, "num_heads": 16,
                   "out_hidden_size": 2048, "deepstack_visual_indexes": [5, 11, 17]},
        "tie_word_embeddings": True,
    },
    "8b": {
        "text": {"hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36, "num_attention_heads": 32,
                 "num_key_value_heads": 8},
        "vision": {"depth": 27, "hidden_size": 1152, "intermediate_size": 4304, "num_heads": 16,
                   "out_hidden_size": 4096, "deepstack_visual_indexes": [8, 16, 24]},
        "tie_word_embeddings": False,
    },
}
COMMON_TEXT = {"vocab_size": 151936, "head_dim": 128, "max_position_embeddings": 262144, "rms_norm_eps": 1e-6,
               "rope_parameters": {"rope_type": "default", "rope_theta": 5_000_000.0, "mrope_section": [24, 20, 20],
                                   "mrope_interleaved": True}}
COMMON_VISION = {"patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2, "num_position_embeddings": 2304,
                 "hidden_act": "gelu_pytorch_tanh"}
LABELS = ("person", "car", "bicycle", "dog", "cat", "traffic light", "bench", "potted plant")


def build_engine(size: str, region: str, device: str, dtype: torch.dtype) -> Qwen3VLEngine:
    tokenizer = make_tokenizer()
    # Qwen3-VL's image processor: shortest_edge 256x256, longest_edge 4096x4096 pixels.
    processor = make_processor(tokenizer, patch_size=16, merge_size=2, min_pixels=256 * 256,
                               max_pixels=4096 * 4096)
    shape = SIZES[size]
    config = Qwen3VLConfig(text_config={**COMMON_TEXT, **shape["text"]}, vision_config={**COMMON_VISION,
                           **shape["vision"]}, tie_word_embeddings=shape["tie_word_embeddings"], **token_ids(tokenizer))
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in the working dtype: an 8B model in float32 would need twice the memory
    try:
        with torch.device(device):
            model = Qwen3VLForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    model.generation_config = generation_config(tokenizer)
    return Qwen3VLEngine(model.eval(), processor, region=region)


def scene() -> Image.Image:
    image = Image.new("RGB", (512, 512), (235, 235, 225))
    draw = ImageDraw.Draw(image)
    draw.rectangle((40, 60, 220, 300), fill=(200, 40, 40))
    draw.ellipse((260, 200, 480, 460), fill=(40, 90, 200))
    return image


def timed(what: str, fn: Callable[[], Any]) -> Any:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    print(f"{what:<52} {time.perf_counter() - start:8.2f} s", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="2b", choices=sorted(SIZES))
    parser.add_argument("--region", default="text", choices=["text", "drawn"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="float32 on the CPU, bfloat16 on CUDA unless given")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2, help="torch threads on the CPU")
    args = parser.parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype or ("float32" if args.device == "cpu" else "bfloat16"))
    engine = timed(f"build Qwen3-VL-{args.size.upper()} (random weights, {dtype})",
                   lambda: build_engine(args.size, args.region, args.device, dtype))
    parameters = sum(p.numel() for p in engine.model.parameters())
    print(f"{parameters / 1e9:.2f} B parameters; region mode {args.region}; device {args.device}")
    warm = Image.new("RGB", (64, 64), (128, 128, 128))
    timed("warm-up (64 px image, 1 token)", lambda: engine.caption([CaptionRequest(warm, (0, 0, 1, 1))], 1))
    engine.forget_images()
    image = scene()
    first, further = (0.08, 0.12, 0.43, 0.59), (0.51, 0.39, 0.94, 0.9)
    tokens = args.max_new_tokens
    timed(f"first box, 512 px image encoded, {tokens} tokens",
          lambda: engine.caption([CaptionRequest(image, first)], tokens))
    timed(f"further box on the same image ({args.region}), {tokens} tokens",
          lambda: engine.caption([CaptionRequest(image, further)], tokens))
    distribution = timed(f"{len(LABELS)} candidates scored (label of that box)",
                         lambda: engine.choose([ChoiceRequest(image, further, LABEL, LABELS)]))
    print("label distribution sums to", round(sum(distribution[0].values()), 6))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
