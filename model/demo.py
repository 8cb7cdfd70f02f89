"""The demo GPT4RoI: a small model trained by the project itself on synthetic shapes, on a CPU.

    python -m model.demo [--out DIR] [--force]

It generates the synthetic region data (with the shape `cross` held back entirely, so that a later
fine-tune on annotators' corrections has something new to learn), trains a SentencePiece tokenizer on
the project's prompts, builds the `demo` preset from scratch in three stages, evaluates it on a held-out
split and saves the checkpoint with its report:

1. region pretraining (`model.region_pretraining`), the stand-in for the CLIP weights GPT4RoI starts
   from: vision tower and region module learn to tell the objects' attributes and layout;
2. a region-reading warm-up (`model.region_warmup`): the language model learns the region questions
   on their question turns alone, where two-region comparisons are learnable in a CPU budget;
3. spatial instruction tuning (`model.training`) of everything but the vision tower on the region
   conversations, as GPT4RoI's stage 2.

The result is cached under `~/.cache/gpt4roi-ls/demo-<key>`, keyed by the recipe and the code that
produces it, so it is trained once per change of either.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

HELD_OUT_SHAPE = "cross"
CACHE_ENV = "GPT4ROI_CACHE"
TRAINING_THREADS = 2


@dataclass(frozen=True)
class DemoRecipe:
    """Everything that decides the demo model; changing a field retrains it."""

    train_images: int = 1200
    heldout_images: int = 100
    train_seed: int = 1
    heldout_seed: int = 2
    tokenizer_vocab: int = 400
    pretrain_steps: int = 1200
    pretrain_images_per_batch: int = 8
    warmup_steps: int = 1600
    # Two-region comparisons need tens of thousands of examples before they are read reliably; the
    # single-region questions far fewer (instruction tuning teaches them too).
    warmup_task_weights: tuple[tuple[str, float], ...] = (("caption", 1.0), ("attribute", 1.0), ("relation", 3.0))
    steps: int = 1300
    learning_rate: float = 1e-3
    images_per_batch: int = 2
    records_per_image: int = 16
    pairs_per_relation: int = 1
    # After region pretraining (the demo's stand-in for CLIP) the vision tower stays frozen, as GPT4RoI
    # keeps CLIP frozen.
    trainable: str = "all_but_vision"
    # Low: the pretrained region features keep every attribute instead of drifting towards the first
    # ones the LLM learns to read.
    region_lr_scale: float = 0.02
    seed: int = 0


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "gpt4roi-ls"))


def recipe_key(recipe: DemoRecipe) -> str:
    """A hash of the recipe and of the model code, so a change to either trains a new demo model."""
    digest = hashlib.sha256(json.dumps(asdict(recipe), sort_keys=True).encode())
    for path in sorted(Path(__file__).parent.glob("*.py")):
        if path.name not in ("evaluate.py", "convert_official.py", "metrics.py"):
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def default_checkpoint_dir(recipe: DemoRecipe | None = None) -> Path:
    return cache_root() / f"demo-{recipe_key(recipe or DemoRecipe())}"


def ensure_demo_checkpoint(directory: Path | None = None, recipe: DemoRecipe | None = None,
                           progress: bool = True) -> Path:
    """The demo checkpoint directory, trained first if it is not there yet."""
    recipe = recipe or DemoRecipe()
    directory = directory or default_checkpoint_dir(recipe)
    if (directory / "demo_report.json").is_file():
        return directory
    return build_demo(directory, recipe, progress=progress)


def build_demo(out_dir: Path, recipe: DemoRecipe | None = None, progress: bool = True) -> Path:
    """Generate data, train tokenizer and model, evaluate, and write everything to `out_dir`."""
    from .configuration_gpt4roi import GPT4RoIConfig
    from .data_format import read_jsonl
    from .evaluate import predict, print_report, report
    from .inference import RegionAnnotator
    from .modeling_gpt4roi import GPT4RoIForCausalLM
    from .processing_gpt4roi import GPT4RoIProcessor
    from .region_pretraining import RegionPretrainingConfig, pretrain_regions
    from .region_warmup import RegionWarmupConfig, warm_up_region_reading
    from .synthetic import ATTRIBUTE_VALUES, corpus_texts, generate_dataset
    from .tokenization_gpt4roi import train_sentencepiece
    from .training import TrainingConfig, save_checkpoint, train

    recipe = recipe or DemoRecipe()
    started = time.perf_counter()
    torch.manual_seed(recipe.seed)
    # A fixed thread count wherever it is called from: the same numbers every time (the thread count
    # changes the order of float sums). Two threads: the machine this recipe is sized for has two cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(TRAINING_THREADS)
    work = Path(tempfile.mkdtemp(prefix="gpt4roi-demo-"))
    try:
        log = print if progress else (lambda *a, **k: None)
        log(f"[demo] generating {recipe.train_images} + {recipe.heldout_images} synthetic images "
            f"(shape '{HELD_OUT_SHAPE}' held back)")
        train_path = generate_dataset(work, recipe.train_images, recipe.train_seed, "train",
                                      exclude_shapes=[HELD_OUT_SHAPE], workers=1,
                                      pairs_per_relation=recipe.pairs_per_relation)
        heldout_path = generate_dataset(work, recipe.heldout_images, recipe.heldout_seed, "heldout",
                                        exclude_shapes=[HELD_OUT_SHAPE], workers=1)
        tokenizer = train_sentencepiece(corpus_texts(), vocab_size=recipe.tokenizer_vocab)
        config = GPT4RoIConfig.from_preset("demo", vocab_size=len(tokenizer))
        model = GPT4RoIForCausalLM(config)
        processor = GPT4RoIProcessor(tokenizer, config.image_size, config.num_image_tokens)
        train_samples = read_jsonl(train_path)
        pretrain_regions(model, processor, train_samples, ATTRIBUTE_VALUES, RegionPretrainingConfig(
            steps=recipe.pretrain_steps, learning_rate=recipe.learning_rate,
            images_per_batch=recipe.pretrain_images_per_batch, seed=recipe.seed, progress=progress,
        ))
        warm_up_region_reading(model, processor, train_samples, RegionWarmupConfig(
            steps=recipe.warmup_steps, learning_rate=recipe.learning_rate, seed=recipe.seed, progress=progress,
            task_weights=dict(recipe.warmup_task_weights),
        ))
        training = TrainingConfig(
            trainable=recipe.trainable, learning_rate=recipe.learning_rate,
            region_lr_scale=recipe.region_lr_scale, max_steps=recipe.steps, warmup_ratio=0.05,
            images_per_batch=recipe.images_per_batch, max_records_per_image=recipe.records_per_image,
            seed=recipe.seed, progress=progress,
        )
        result = train(model, processor, train_samples, training)
        log(f"[demo] trained {result.steps} steps in {result.seconds:.0f} s, "
            f"loss {result.first_loss:.3f} → {result.last_loss:.3f}")

        heldout = read_jsonl(heldout_path)
        annotator = RegionAnnotator(model, processor)
        evaluation = report(heldout, predict(annotator, heldout, progress=progress))
        evaluation["confusion"] = {k: v.to_text() for k, v in evaluation["confusion"].items()}
        print_report(evaluation, file=sys.stdout if progress else open(os.devnull, "w"))  # noqa: SIM115

        staging = out_dir.with_name(out_dir.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        save_checkpoint(model, processor, staging, metadata={"training": training, "recipe": recipe})
        shutil.copy2(heldout_path, staging / "heldout.jsonl")
        summary = {
            "recipe": asdict(recipe),
            "held_out_shape": HELD_OUT_SHAPE,
            "train_loss_first": result.first_loss,
            "train_loss_last": result.last_loss,
            "train_seconds": round(result.seconds, 1),
            "wall_seconds": round(time.perf_counter() - started, 1),
            "heldout": evaluation,
        }
        (staging / "demo_report.json").write_text(json.dumps(summary, indent=2))
        shutil.rmtree(out_dir, ignore_errors=True)
        staging.rename(out_dir)
        log(f"[demo] wrote {out_dir} in {summary['wall_seconds']:.0f} s wall time")
        return out_dir
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="checkpoint directory (default: the cache)")
    parser.add_argument("--force", action="store_true", help="train again even if a checkpoint exists")
    args = parser.parse_args(argv)
    out = args.out or default_checkpoint_dir()
    if args.force or not (out / "demo_report.json").is_file():
        build_demo(out)
    else:
        print(f"[demo] using cached {out} (--force trains again)")
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
