"""GPT4RoI-7B-shaped inference and fine-tuning on one GPU: one command, a few minutes.

    python bench/gpu_bench.py [--preset gpt4roi-7b] [--device cuda] [--batches 1,8,32,64] [--new-tokens 32]
                              [--jobs 64] [--json results.json]
    python bench/gpu_bench.py --engine florence-2 [--size base,large] …   (bench/engine_gpu.py)
    python bench/gpu_bench.py --engine qwen3-vl [--size 2b,8b] …

Builds a model of `--preset`'s shape with random weights directly on the device (bf16 on CUDA; no 7B
initialisation on the CPU) and prints:

1. captions (`--new-tokens` new tokens each) and choice scoring (5 candidates) in regions/s at each batch
   size, through `RegionAnnotator.answer` / `.score`, the worker's own calls;
2. a drawn box as the worker answers it (`backend.describe.describe`: caption + the interactive config's
   choices): the first box on a new image against a second box on the same image, in ms;
3. one decode step at batch 1 against the memory-bandwidth bound (every weight read once per step, at the
   copy bandwidth measured on this device) and that bound's tokens/s;
4. `--jobs` queued single-box jobs on as many images, answered as the worker's batches do
   (`describe_many`) against one job at a time (`describe`);
5. one LoRA fine-tune step at the fine-tune's batch (4 images, up to 16 records each), gradient
   checkpointing on CUDA: time and peak memory;

and the peak memory of inference. Random weights would stop a caption at a random early token, so the
output rows of the end-of-sequence token, of the stop string's pieces and of ids the bench tokenizer does
not have are zeroed: every caption runs the full `--new-tokens` steps (the compute is unchanged). The
figures measure time, not quality. On a CPU with `--preset tiny` the same code runs in seconds (CI does,
so the bench cannot rot).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from backend.describe import Description, describe, describe_many
from backend.labelconfig import FillPlan, Region
from bench import engine_gpu
from model.demo.synthetic import corpus_texts, generate_dataset, make_image
from model.gpt4roi.configuration_gpt4roi import GPT4RoIConfig
from model.gpt4roi.engine import GPT4RoIEngine
from model.gpt4roi.inference import RegionAnnotator, RegionQuery
from model.gpt4roi.modeling_gpt4roi import GPT4RoIForCausalLM
from model.gpt4roi.processing_gpt4roi import GPT4RoIProcessor
from model.gpt4roi.prompts import attribute_question, caption_question
from model.gpt4roi.tokenization_gpt4roi import train_sentencepiece

REPO = Path(__file__).resolve().parents[1]
INTERACTIVE_CONFIG = REPO / "labelstudio_config" / "interactive.xml"
CANDIDATES = ("red", "green", "blue", "yellow", "purple")


# ---------------------------------------------------------------------- the model
@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build(preset: str, device: torch.device, dtype: torch.dtype) -> RegionAnnotator:
    """A random-weights model of `preset` made on `device` in `dtype`, with a tokenizer whose added tokens
    are the model's (the vocabulary of the 7B shape stays 32006 rows; the bench tokenizer uses the first)."""
    tokenizer = train_sentencepiece(corpus_texts(), vocab_size=400)
    if preset == "gpt4roi-7b":
        ids = {"image_patch_token_id": tokenizer.image_patch_token_id, "bbox_token_id": tokenizer.bbox_token_id,
               "point_token_id": tokenizer.point_token_id, "im_start_token_id": tokenizer.im_start_token_id,
               "im_end_token_id": tokenizer.im_end_token_id}
        config = GPT4RoIConfig.from_preset(preset, **ids)
    else:
        config = GPT4RoIConfig.from_preset(preset, vocab_size=len(tokenizer))
    torch.manual_seed(0)
    with default_dtype(dtype), device:
        model = GPT4RoIForCausalLM(config).eval()
    never = [tokenizer.eos_token_id, *(i for i in range(len(tokenizer))
                                       if "#" in str(tokenizer.convert_ids_to_tokens(i)))]
    with torch.no_grad():
        head = model.language_model.get_output_embeddings().weight
        head[len(tokenizer):] = 0
        head[never] = 0
    processor = GPT4RoIProcessor(tokenizer, config.image_size, config.num_image_tokens)
    return RegionAnnotator(model, processor, max_batch_size=64, image_cache_size=256)


# ---------------------------------------------------------------------- timing
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn: Callable[[], Any], repeats: int = 3) -> tuple[float, Any]:
    """Median seconds of `repeats` calls (after one warm-up call) and the last result."""
    result = fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        started = time.perf_counter()
        result = fn()
        synchronize(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def copy_bandwidth(device: torch.device, megabytes: int) -> float:
    """Bytes/s of a device-to-device copy (read + write), the ceiling of weight streaming."""
    source = torch.empty(megabytes * 2**20, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    seconds, _ = timed(device, lambda: target.copy_(source), repeats=5)
    return 2 * source.numel() / seconds


def peak_memory_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


# ---------------------------------------------------------------------- measurements
def boxes(count: int) -> list[tuple[float, float, float, float]]:
    grid = max(1, int(count**0.5 + 0.999))
    return [((i % grid) / grid, (i // grid) / grid, (i % grid + 1) / grid, (i // grid + 1) / grid)
            for i in range(count)]


@contextlib.contextmanager
def counting_decode_steps(annotator: RegionAnnotator) -> Iterator[list[int]]:
    """Counts the language model's one-token forwards (decode steps) while the block runs."""
    steps = [0]

    def count(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids")
        if ids is not None and ids.shape[-1] == 1:
            steps[0] += 1

    handle = annotator.model.language_model.register_forward_pre_hook(count, with_kwargs=True)
    try:
        yield steps
    finally:
        handle.remove()


def throughput(annotator: RegionAnnotator, device: torch.device, batches: list[int],
               new_tokens: int) -> list[dict[str, Any]]:
    image, _ = make_image(seed=7, width=640, height=480)
    rows = []
    for batch in batches:
        captions = [RegionQuery(image, (b,), caption_question()) for b in boxes(batch)]
        seconds, _ = timed(device, lambda q=captions: annotator.answer(q, max_new_tokens=new_tokens))
        with counting_decode_steps(annotator) as steps:
            annotator.answer(captions, max_new_tokens=new_tokens)
        choices = [RegionQuery(image, (b,), attribute_question("color")) for b in boxes(batch)]
        score_seconds, _ = timed(device, lambda q=choices: annotator.score(q, [CANDIDATES] * len(q)))
        rows.append({"batch": batch, "caption_regions_per_s": round(batch / seconds, 2),
                     "caption_ms": round(seconds * 1000, 1),
                     # The first token comes out of the prompt's forward pass, each further one of a step.
                     "tokens_generated": steps[0] + 1,
                     "score_regions_per_s": round(batch / score_seconds, 2),
                     "score_ms": round(score_seconds * 1000, 1)})
    return rows


def interactive(annotator: RegionAnnotator, device: torch.device, new_tokens: int) -> dict[str, float]:
    """A drawn box answered as the worker does, on a new image and then on the same image again."""
    plan = FillPlan.from_label_config(INTERACTIVE_CONFIG.read_text())
    region = Region("drawn", 20.0, 25.0, 30.0, 35.0, original_width=640, original_height=480, labels=("circle",))
    first, second = [], []
    for seed in range(100, 104):
        image, _ = make_image(seed=seed, width=640, height=480)
        for sink in (first, second):
            synchronize(device)
            started = time.perf_counter()
            describe(GPT4RoIEngine(annotator), image, plan, [region], True, new_tokens)
            synchronize(device)
            sink.append((time.perf_counter() - started) * 1000)
    # The first image also pays for warm-up; the medians leave it out.
    return {"first_box_ms": round(statistics.median(first[1:]), 1),
            "second_box_ms": round(statistics.median(second[1:]), 1)}


def decode_bound(annotator: RegionAnnotator, device: torch.device, new_tokens: int,
                 bandwidth: float) -> dict[str, float]:
    image, _ = make_image(seed=7, width=640, height=480)
    query = [RegionQuery(image, (boxes(1)[0],), caption_question())]
    short, _ = timed(device, lambda: annotator.answer(query, max_new_tokens=1))
    full, _ = timed(device, lambda: annotator.answer(query, max_new_tokens=new_tokens + 1))
    step = (full - short) / new_tokens
    weight_bytes = sum(p.numel() * p.element_size() for p in annotator.model.language_model.parameters())
    bound = weight_bytes / bandwidth
    return {"decode_step_ms": round(step * 1000, 3), "bound_step_ms": round(bound * 1000, 3),
            "step_over_bound": round(step / bound, 2), "bound_tokens_per_s": round(1 / bound, 1),
            "language_model_gb": round(weight_bytes / 1e9, 2), "copy_bandwidth_gb_s": round(bandwidth / 1e9, 1)}


def across_jobs(annotator: RegionAnnotator, device: torch.device, jobs: int, new_tokens: int) -> dict[str, float]:
    """`jobs` single-box jobs, each on its own image: one batch (`describe_many`) vs one at a time."""
    engine = GPT4RoIEngine(annotator)
    plan = FillPlan.from_label_config(INTERACTIVE_CONFIG.read_text())
    items = [Description(make_image(seed=500 + i, width=640, height=480)[0], plan,
                         [Region(f"r{i}", 10.0 + i % 5 * 10, 15.0, 30.0, 35.0, labels=("circle",))], True)
             for i in range(jobs)]

    def together() -> Any:
        engine.forget_images()  # every run encodes its images, as a worker meeting new images does
        return describe_many(engine, items, new_tokens)

    def alone() -> Any:
        engine.forget_images()
        return [describe(engine, item.image, item.plan, item.regions, True, new_tokens) for item in items]

    batched_s, _ = timed(device, together, repeats=2)
    single_s, _ = timed(device, alone, repeats=1)
    return {"jobs": jobs, "batched_jobs_per_s": round(jobs / batched_s, 2),
            "one_at_a_time_jobs_per_s": round(jobs / single_s, 2), "speedup": round(single_s / batched_s, 2)}


def finetune_step(annotator: RegionAnnotator, device: torch.device, steps: int = 3) -> dict[str, Any]:
    """LoRA fine-tune steps as `backend/finetune.py` configures them (this changes the model: run it last)."""
    from model.data_format import read_jsonl
    from model.gpt4roi.training import LORA_TARGETS, TrainingConfig, train

    with tempfile.TemporaryDirectory(prefix="gpu-bench-") as folder:
        samples = read_jsonl(generate_dataset(folder, n_images=4 * steps, seed=3, split_name="bench",
                                              image_size=(640, 480), workers=1))
        config = TrainingConfig(trainable="lora", max_steps=steps, images_per_batch=4, max_records_per_image=16,
                                lora_targets=(*LORA_TARGETS, "lm_head"), progress=False,
                                gradient_checkpointing=device.type == "cuda")
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        result = train(annotator.model, annotator.processor, samples, config)
    return {"steps": steps, "step_s": round(result.seconds / steps, 3),
            "records_per_step": 4 * 16, "gradient_checkpointing": config.gradient_checkpointing,
            "peak_memory_gib": peak_memory_gib(device)}


# ---------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="gpt4roi-7b", choices=["gpt4roi-7b", "demo", "tiny"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batches", default="1,8,32,64", help="comma-separated batch sizes")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--jobs", type=int, default=64, help="single-box jobs for the across-job comparison")
    parser.add_argument("--bandwidth-mb", type=int, default=2048, help="size of the bandwidth probe copy")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--engine", default="gpt4roi", choices=["gpt4roi", *engine_gpu.SIZES],
                        help="the engine to measure (the options above are GPT4RoI's, but --device, --batches, "
                             "--new-tokens and --json)")
    parser.add_argument("--size", help="the other engines' sizes, comma-separated (default: all but tiny)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here; pass --device cpu (with --preset or --size tiny)")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    batches = [int(b) for b in args.batches.split(",")]
    if args.engine != "gpt4roi":
        sizes = args.size.split(",") if args.size else [s for s in engine_gpu.SIZES[args.engine] if s != "tiny"]
        unknown = set(sizes) - set(engine_gpu.SIZES[args.engine])
        if unknown:
            parser.error(f"--size {','.join(sorted(unknown))}: {args.engine} has "
                         f"{', '.join(engine_gpu.SIZES[args.engine])}")
        measured = []
        for size in sizes:
            measured.append(engine_gpu.figures(args.engine, size, device, batches, args.new_tokens,
                                               lambda: synchronize(device)))
            engine_gpu.report(measured[-1])
        if args.json:
            args.json.write_text(json.dumps(measured, indent=2) + "\n")
        return 0

    started = time.perf_counter()
    annotator = build(args.preset, device, dtype)
    synchronize(device)
    results: dict[str, Any] = {
        "setup": {"preset": args.preset, "device": torch.cuda.get_device_name(device) if device.type == "cuda"
                  else f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)", "dtype": str(dtype),
                  "attention": annotator.model.language_model.config._attn_implementation,
                  "parameters_m": round(sum(p.numel() for p in annotator.model.parameters()) / 1e6, 2),
                  "build_s": round(time.perf_counter() - started, 1), "new_tokens": args.new_tokens,
                  "torch": torch.__version__},
    }
    print(f"built {args.preset} ({results['setup']['parameters_m']} M parameters, {dtype}, attention "
          f"{results['setup']['attention']}) on {results['setup']['device']} in {results['setup']['build_s']} s",
          flush=True)
    results["throughput"] = throughput(annotator, device, batches, args.new_tokens)
    results["interactive"] = interactive(annotator, device, args.new_tokens)
    results["bandwidth"] = decode_bound(annotator, device, args.new_tokens,
                                        copy_bandwidth(device, args.bandwidth_mb))
    results["across_jobs"] = across_jobs(annotator, device, args.jobs, args.new_tokens)
    results["inference_peak_memory_gib"] = peak_memory_gib(device)
    results["finetune"] = finetune_step(annotator, device)
    results["total_s"] = round(time.perf_counter() - started, 1)
    report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


def report(results: dict[str, Any]) -> None:
    setup = results["setup"]
    print(f"\n{setup['preset']} on {setup['device']}, {setup['dtype']}, attention {setup['attention']}, "
          f"torch {setup['torch']}")
    print(f"  {'batch':>5} {'captions/s':>11} {'ms':>9} {'tokens':>7} {'choices/s':>10} {'ms':>9}")
    for row in results["throughput"]:
        print(f"  {row['batch']:>5} {row['caption_regions_per_s']:>11.1f} {row['caption_ms']:>9.1f} "
              f"{row['tokens_generated']:>7} {row['score_regions_per_s']:>10.1f} {row['score_ms']:>9.1f}")
    drawn = results["interactive"]
    print(f"  drawn box (caption + choices): first on an image {drawn['first_box_ms']} ms, second "
          f"{drawn['second_box_ms']} ms")
    bound = results["bandwidth"]
    print(f"  decode step at batch 1: {bound['decode_step_ms']} ms; bandwidth bound {bound['bound_step_ms']} ms "
          f"({bound['language_model_gb']} GB of weights at {bound['copy_bandwidth_gb_s']} GB/s, "
          f"{bound['bound_tokens_per_s']} tokens/s): {bound['step_over_bound']}x the bound")
    jobs = results["across_jobs"]
    print(f"  {jobs['jobs']} single-box jobs: batched {jobs['batched_jobs_per_s']} jobs/s, one at a time "
          f"{jobs['one_at_a_time_jobs_per_s']} jobs/s ({jobs['speedup']}x)")
    tune = results["finetune"]
    print(f"  LoRA fine-tune step ({tune['records_per_step']} records at most, gradient checkpointing "
          f"{tune['gradient_checkpointing']}): {tune['step_s']} s, peak {tune['peak_memory_gib']} GiB")
    print(f"  inference peak memory {results['inference_peak_memory_gib']} GiB; whole bench {results['total_s']} s")


if __name__ == "__main__":
    raise SystemExit(main())
