"""Region answering speed: one prompt at a time with the image re-encoded (how the original demo works)
against the batched path (image encoded once, prompts batched, the text before the image run once).

    python bench/model_bench.py [--preset tiny|demo] [--regions 16] [--repeats 3]
    python bench/model_bench.py --engine florence-2 [--size base|large] …   (bench/florence2_bench.py)
    python bench/model_bench.py --engine qwen3-vl [--size 2b|8b] [--region text|drawn] …   (bench/qwen3vl_bench.py)

Both paths produce the same greedy answers (checked); the figures are medians of `--repeats` runs in
this one process, and the ratio is what to compare across machines.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import time

import torch

from model.demo.synthetic import corpus_texts, make_image
from model.gpt4roi.configuration_gpt4roi import GPT4RoIConfig
from model.gpt4roi.generation import GenerationConfig, generate_answers, generation_prompt
from model.gpt4roi.inference import RegionAnnotator, RegionQuery
from model.gpt4roi.modeling_gpt4roi import GPT4RoIForCausalLM
from model.gpt4roi.processing_gpt4roi import GPT4RoIProcessor
from model.gpt4roi.prompts import caption_question
from model.gpt4roi.tokenization_gpt4roi import train_sentencepiece


def one_at_a_time(annotator: RegionAnnotator, queries: list[RegionQuery], max_new_tokens: int) -> list[str]:
    """The original demo's way: every question preprocesses and encodes its image again, batch size 1."""
    answers = []
    config = GenerationConfig(max_new_tokens=max_new_tokens)
    for query in queries:
        pixels = annotator.processor.preprocess_images([query.image]).to(annotator.device)
        with torch.no_grad():
            features = annotator.model.encode_images(pixels)
        ids = annotator.tokenizer.encode(annotator.processor.expand_image_tokens(generation_prompt(query.question)))
        boxes = [torch.tensor(query.boxes, dtype=torch.float32, device=annotator.device)]
        answers += [a.text for a in generate_answers(annotator.model, annotator.tokenizer, [ids], boxes, features,
                                                      [0], config)]
    return answers


def timed(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


ENGINE_BENCHES = {"florence-2": "bench.florence2_bench", "qwen3-vl": "bench.qwen3vl_bench"}


def main(argv: list[str] | None = None) -> int:
    chooser = argparse.ArgumentParser(add_help=False)
    chooser.add_argument("--engine", default="gpt4roi", choices=["gpt4roi", *ENGINE_BENCHES])
    chosen, rest = chooser.parse_known_args(argv)
    if chosen.engine != "gpt4roi":
        return importlib.import_module(ENGINE_BENCHES[chosen.engine]).main(rest)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], parents=[chooser])
    parser.add_argument("--preset", default="tiny", choices=["tiny", "demo"])
    parser.add_argument("--regions", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(rest)
    torch.manual_seed(0)
    tokenizer = train_sentencepiece(corpus_texts(), vocab_size=400)
    config = GPT4RoIConfig.from_preset(args.preset, vocab_size=len(tokenizer))
    model = GPT4RoIForCausalLM(config).eval()
    processor = GPT4RoIProcessor(tokenizer, config.image_size, config.num_image_tokens)
    annotator = RegionAnnotator(model, processor, max_batch_size=64)
    image, _ = make_image(seed=7, width=640, height=480)
    grid = int(args.regions**0.5 + 0.999)
    boxes = [((i % grid) / grid, (i // grid) / grid, (i % grid + 1) / grid, (i // grid + 1) / grid)
             for i in range(args.regions)]
    queries = [RegionQuery(image, (box,), caption_question()) for box in boxes]

    def batched() -> list[str]:
        annotator.forget_images()  # count the one image encoding in every run
        return annotator.answer(queries, max_new_tokens=args.max_new_tokens)

    one_at_a_time(annotator, queries[:2], args.max_new_tokens)  # warm-up
    t_single, single = timed(lambda: one_at_a_time(annotator, queries, args.max_new_tokens), args.repeats)
    t_batch, batch = timed(batched, args.repeats)
    if single != batch:
        raise SystemExit("the two paths gave different answers; the comparison would be meaningless")

    pixels = processor.preprocess_images([image])
    t_encode, _ = timed(lambda: model.encode_images(pixels), args.repeats)
    annotator.answer(queries[:1])  # cache the image
    t_region, _ = timed(lambda: annotator.answer(queries[:1], max_new_tokens=args.max_new_tokens), args.repeats)

    print(f"preset {args.preset}, {args.regions} regions of one 640x480 image, {args.max_new_tokens} new tokens, "
          f"{torch.get_num_threads()} CPU threads, median of {args.repeats}")
    print(f"  (a) one prompt at a time, image re-encoded : {t_single * 1000:8.1f} ms")
    print(f"  (b) batched, image encoded once            : {t_batch * 1000:8.1f} ms")
    print(f"  speed-up (a)/(b)                           : {t_single / t_batch:8.2f}x")
    print(f"  encode one image                           : {t_encode * 1000:8.1f} ms")
    print(f"  answer one region (image cached)           : {t_region * 1000:8.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
