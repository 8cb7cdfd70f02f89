"""The GPU bench for Florence-2 and Qwen3-VL, through the engine interface (the worker's own calls):
`python bench/gpu_bench.py --engine florence-2|qwen3-vl --size …` (see `bench/gpu_bench.py`).

Each size is built with random weights at the real shape directly on the device, in the working dtype, and
measured: captions and choice scoring (5 candidates) in regions/s at each batch size (four regions per image,
images encoded within the timing), the first box on an image against a further box on it, one LoRA fine-tune
step on 8 examples, and peak memory. `--size tiny` builds the tests' tiny checkpoints instead (CI runs those
on a CPU, so the bench cannot rot). The figures measure time, not quality.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

from model.engine import LABEL, CaptionRequest, ChoiceRequest, Engine, Example, FinetuneConfig

SIZES = {"florence-2": ("tiny", "base", "large"), "qwen3-vl": ("tiny", "2b", "8b")}
CANDIDATES = ("person", "car", "dog", "bicycle", "bench")
REGIONS_PER_IMAGE = 4


def build(engine: str, size: str, device: torch.device, dtype: torch.dtype, workdir: Path) -> Engine:
    """A random engine of `size` on `device`."""
    if engine == "florence-2":
        from bench.florence2_bench import VOCAB_SIZE
        from model.florence2.engine import Florence2Engine
        from tests.support.florence2_factory import build_florence2, save_tiny_florence2

        if size == "tiny":
            return Florence2Engine.from_pretrained(save_tiny_florence2(workdir / "tiny"), str(device), _name(dtype))
        model, processor = build_florence2(size, seed=0, vocab_size=VOCAB_SIZE)
        return Florence2Engine(model.to(device, dtype), processor, max_batch_size=64)
    from bench.qwen3vl_bench import build_engine
    from model.qwen3vl.engine import Qwen3VLEngine
    from tests.support.qwen3vl_factory import save_tiny_qwen3vl

    if size == "tiny":
        return Qwen3VLEngine.from_pretrained(save_tiny_qwen3vl(workdir / "tiny"), str(device), _name(dtype))
    return build_engine(size, "text", str(device), dtype)


def figures(engine_name: str, size: str, device: torch.device, batches: list[int], new_tokens: int,
            synchronize: Callable[[], None]) -> dict[str, Any]:
    """Every measurement of one engine at one size."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with tempfile.TemporaryDirectory() as workdir:
        started = time.perf_counter()
        engine = build(engine_name, size, device, dtype, Path(workdir))
        synchronize()
        model = engine.model  # every engine here keeps its transformers model as `model`
        if engine_name == "florence-2":
            # Random weights would end a caption at a random early step; every caption runs its full length.
            model.generation_config.min_new_tokens = new_tokens
        result: dict[str, Any] = {
            "engine": engine_name, "size": size, "dtype": str(dtype),
            "parameters_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
            "build_s": round(time.perf_counter() - started, 1), "throughput": []}

        def timed(fn: Callable[[], Any], repeats: int = 3) -> float:
            fn()
            times = []
            for _ in range(repeats):
                engine.forget_images()
                synchronize()
                begun = time.perf_counter()
                fn()
                synchronize()
                times.append(time.perf_counter() - begun)
            return statistics.median(times)

        for batch in batches:
            images = [scene(i) for i in range(max(1, -(-batch // REGIONS_PER_IMAGE)))]
            regions = [(images[i // REGIONS_PER_IMAGE], box(i)) for i in range(batch)]
            caption_s = timed(lambda r=regions: engine.caption([CaptionRequest(i, b) for i, b in r], new_tokens))
            choose_s = timed(lambda r=regions: engine.choose([ChoiceRequest(i, b, LABEL, CANDIDATES) for i, b in r]))
            result["throughput"].append({"batch": batch, "caption_regions_per_s": round(batch / caption_s, 2),
                                         "score_regions_per_s": round(batch / choose_s, 2)})
        image = scene(99)
        engine.forget_images()
        synchronize()
        begun = time.perf_counter()
        engine.caption([CaptionRequest(image, box(0))], new_tokens)
        synchronize()
        first = time.perf_counter() - begun
        begun = time.perf_counter()
        engine.caption([CaptionRequest(image, box(1))], new_tokens)
        synchronize()
        result["first_box_ms"], result["further_box_ms"] = round(first * 1000, 1), round(
            (time.perf_counter() - begun) * 1000, 1)
        result["inference_peak_memory_gib"] = _peak(device)

        examples = []
        for i in range(2):
            path = Path(workdir) / f"train-{i}.png"
            scene(i).save(path)
            for j, (attribute, answer) in enumerate([(None, "a red box"), (LABEL, "car"), ("color", "red"),
                                                     (None, "a blue ball")]):
                x1, y1, x2, y2 = box(j)
                examples.append(Example(f"e{i}-{j}", str(path), 512, 384, (x1 * 512, y1 * 384, x2 * 512, y2 * 384),
                                        attribute, answer))
        synchronize()
        begun = time.perf_counter()
        tuned = engine.finetune(examples, FinetuneConfig(max_steps=1, epochs=1, lora_rank=16))
        synchronize()
        result["finetune"] = {"steps": tuned.steps, "step_s": round(time.perf_counter() - begun, 2),
                              "examples": len(examples), "peak_memory_gib": _peak(device)}
    return result


def report(result: dict[str, Any]) -> None:
    print(f"\n{result['engine']} {result['size']} ({result['parameters_m']} M parameters, {result['dtype']}, built "
          f"in {result['build_s']} s)")
    print(f"  {'batch':>5} {'captions/s':>11} {'choices/s':>10}")
    for row in result["throughput"]:
        print(f"  {row['batch']:>5} {row['caption_regions_per_s']:>11.2f} {row['score_regions_per_s']:>10.2f}")
    print(f"  first box on an image {result['first_box_ms']} ms, a further box {result['further_box_ms']} ms")
    tune = result["finetune"]
    print(f"  LoRA fine-tune step on {tune['examples']} examples: {tune['step_s']} s, peak {tune['peak_memory_gib']} "
          f"GiB; inference peak {result['inference_peak_memory_gib']} GiB")


def scene(seed: int) -> Image.Image:
    image = Image.new("RGB", (512, 384), (230, 230, 220))
    draw = ImageDraw.Draw(image)
    draw.rectangle((20 + seed % 40, 30, 200, 220), fill=(200, 40, 40))
    draw.ellipse((260, 120, 480, 360), fill=(40, 90, 200))
    return image


def box(index: int) -> tuple[float, float, float, float]:
    x, y = (index % 4) * 0.22, ((index // 4) % 3) * 0.3
    return (x, y, x + 0.3, y + 0.35)


def _peak(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
