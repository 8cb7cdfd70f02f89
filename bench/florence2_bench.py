"""Florence-2 engine speed on the CPU at the real base or large shapes (random weights, nothing downloaded).

    python bench/florence2_bench.py [--size base|large] [--threads 2] [--regions 16] [--caption-tokens 20]

Prints: the first box on an image (its encoding included) and a further box on the same image, each with a
caption of `--caption-tokens` tokens; one region's `--candidates` candidates scored; `--regions` regions of
one image in one call against one at a time with the image encoded again for each (`forget_images` between),
and the ratio. Captions are held to exactly `--caption-tokens` tokens (`min_new_tokens`), since a random model
may otherwise stop at once.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image

from model.engine import CaptionRequest, ChoiceRequest
from model.florence2.engine import Florence2Engine
from tests.support.florence2_factory import build_florence2

VOCAB_SIZE = 51289  # the hub checkpoints' text vocabulary
CANDIDATES = ("person", "car", "dog", "cat", "tree", "building", "table", "road", "sky", "circle", "square",
              "triangle", "red", "green", "blue", "yellow")


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="base", choices=["base", "large"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--regions", type=int, default=16)
    parser.add_argument("--candidates", type=int, default=8)
    parser.add_argument("--caption-tokens", type=int, default=20)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    seconds, (model, processor) = timed(lambda: build_florence2(args.size, seed=0, vocab_size=VOCAB_SIZE))
    parameters = sum(p.numel() for p in model.parameters()) / 1e6
    engine = Florence2Engine(model, processor, max_batch_size=args.regions)
    print(f"Florence-2-{args.size}: {parameters:.0f}M parameters, {processor.num_image_tokens} image tokens, "
          f"{args.threads} threads, built in {seconds:.1f} s")

    rng = np.random.RandomState(0)
    image = Image.fromarray(rng.randint(0, 255, (480, 640, 3), dtype=np.uint8))
    boxes = [(x, y, x + 0.2, y + 0.3) for x in np.linspace(0.0, 0.75, 4) for y in np.linspace(0.0, 0.6, 4)]
    boxes = [tuple(float(c) for c in box) for box in boxes][: args.regions]
    tokens = args.caption_tokens
    candidates = CANDIDATES[: args.candidates]

    engine.caption([CaptionRequest(image.copy(), boxes[0])], max_new_tokens=2)  # first-call overheads
    engine.forget_images()
    model.generation_config.min_new_tokens = args.caption_tokens
    first, [answer] = timed(lambda: engine.caption([CaptionRequest(image, boxes[0])], max_new_tokens=tokens))
    further, _ = timed(lambda: engine.caption([CaptionRequest(image, boxes[1])], max_new_tokens=tokens))
    print(f"first box on an image (encoding included), {tokens}-token caption: {first:.2f} s")
    print(f"a further box on the same image, {tokens}-token caption:          {further:.2f} s")
    scored, _ = timed(lambda: engine.choose([ChoiceRequest(image, boxes[-1], "category", candidates)]))
    print(f"{len(candidates)} candidates scored for one region (image cached):        {scored:.2f} s")

    requests = [CaptionRequest(image, box) for box in boxes]
    engine.forget_images()
    batched, together = timed(lambda: engine.caption(requests, max_new_tokens=tokens))

    def one_at_a_time() -> list[str]:
        texts = []
        for request in requests:
            engine.forget_images()
            texts += [a.text for a in engine.caption([request], max_new_tokens=tokens)]
        return texts

    alone, texts = timed(one_at_a_time)
    same = texts == [a.text for a in together]
    count = len(requests)
    print(f"{count} regions of one image in one call:         {batched:.2f} s ({batched / count:.2f} s a region)")
    print(f"{count} regions one at a time, image re-encoded: {alone:.2f} s ({alone / count:.2f} s a region)")
    print(f"ratio: {alone / batched:.1f}x; same captions both ways: {same}; first caption: {answer.text[:60]!r}")
    # Other processes on the machine slow every figure alike; the load says how far to trust them.
    print("load average (1, 5, 15 min): " + ", ".join(f"{load:.2f}" for load in os.getloadavg()))
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
