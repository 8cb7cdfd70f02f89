"""The demo GPT4RoI: a small model trained by the project itself on synthetic shapes, on a CPU.

    python -m model.demo [--out DIR] [--force]

It generates the synthetic region data (with the shape `cross` held back entirely, so that a later
fine-tune on annotators' corrections has something new to learn), trains a SentencePiece tokenizer on
the project's prompts, builds the `demo` preset from scratch in three stages, evaluates it on a held-out
split and saves the checkpoint with its report:

1. region pretraining (`model.demo.region_pretraining`), the stand-in for the CLIP weights GPT4RoI
   starts from: vision tower and region module learn to tell the objects' attributes and layout;
2. a region-reading warm-up (`model.demo.region_warmup`): the language model learns the region
   questions on their question turns alone, where two-region comparisons are learnable in a CPU budget;
3. spatial instruction tuning (`model.gpt4roi.training`) of everything but the vision tower on the region
   conversations, as GPT4RoI's stage 2.

The repository ships the checkpoint this recipe trains (`model/demo/checkpoint/`), so a first start needs
no training. A checkpoint is identified by `recipe_key`: a hash of the recipe's fields and of
`FORMAT_VERSION`. Edit the recipe, or bump `FORMAT_VERSION` after a change to the library that changes
what the recipe trains (the model's forward pass, the tokenizer, the training loop), and the shipped
checkpoint no longer matches: `ensure_demo_checkpoint` then trains the new one once into
`~/.cache/gpt4roi-ls/demo-<key>` (`python -m model.demo --out model/demo/checkpoint` ships it).
Documentation and refactoring leave the key alone. `python -m model.demo --verify` retrains the recipe
(about half an hour on one core) and checks that the shipped figures still come out; the tests train a
miniature of it and compare with what it trained when the checkpoint was shipped.
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

from model.demo.synthetic import HELD_OUT_SHAPE

CACHE_ENV = "GPT4ROI_CACHE"
# One thread wherever the recipe runs: the same numbers on every machine (a thread count changes the order
# of float sums), and a training that a second busy process slows by a few percent instead of several
# times (two threads on two cores spin-wait for each other whenever another process takes a core).
TRAINING_THREADS = 1
# Largest difference, in points of accuracy, between the shipped figures and a retrained model's (CPU
# kernels order float sums differently from one processor to another, so the weights may differ).
TOLERANCE = 0.05
# Bump on purpose when a library change alters what the recipe trains (see the module docstring).
FORMAT_VERSION = 2
SHIPPED_CHECKPOINT = Path(__file__).resolve().parent / "checkpoint"
REPORT_FILE = "demo_report.json"


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
    """Where checkpoints of recipes other than the shipped one are trained (`GPT4ROI_CACHE` overrides)."""
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "gpt4roi-ls"))


def recipe_key(recipe: DemoRecipe | None = None) -> str:
    """The identity of what a recipe trains: its fields and `FORMAT_VERSION`."""
    fields = {"format_version": FORMAT_VERSION, **asdict(recipe or DemoRecipe())}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]


def demo_version_name(recipe: DemoRecipe | None = None) -> str:
    """The model version the backend registers the demo checkpoint under: `demo-<recipe key>`."""
    return f"demo-{recipe_key(recipe)}"


def default_checkpoint_dir(recipe: DemoRecipe | None = None) -> Path:
    """The shipped checkpoint when it was trained by `recipe`, else its place in the cache."""
    key = recipe_key(recipe)
    if checkpoint_key(SHIPPED_CHECKPOINT) == key:
        return SHIPPED_CHECKPOINT
    return cache_root() / f"demo-{key}"


def checkpoint_key(directory: Path) -> str | None:
    """The recipe key a finished demo checkpoint was trained with (None when there is none)."""
    try:
        return json.loads((directory / REPORT_FILE).read_text(encoding="utf-8")).get("recipe_key")
    except (OSError, ValueError):
        return None


def ensure_demo_checkpoint(directory: Path | None = None, recipe: DemoRecipe | None = None,
                           progress: bool = True) -> Path:
    """The demo checkpoint of `recipe` (the shipped one when it matches), trained first if needed."""
    recipe = recipe or DemoRecipe()
    directory = directory or default_checkpoint_dir(recipe)
    if checkpoint_key(directory) == recipe_key(recipe):
        return directory
    return build_demo(directory, recipe, progress=progress)


def build_demo(out_dir: Path, recipe: DemoRecipe | None = None, progress: bool = True) -> Path:
    """Generate data, train tokenizer and model, evaluate, and write everything to `out_dir`."""
    from model.data_format import read_jsonl
    from model.evaluate import predict, print_report, report
    from model.gpt4roi.configuration_gpt4roi import GPT4RoIConfig
    from model.gpt4roi.engine import GPT4RoIEngine
    from model.gpt4roi.inference import RegionAnnotator
    from model.gpt4roi.modeling_gpt4roi import GPT4RoIForCausalLM
    from model.gpt4roi.processing_gpt4roi import GPT4RoIProcessor
    from model.gpt4roi.tokenization_gpt4roi import train_sentencepiece
    from model.gpt4roi.training import TrainingConfig, save_checkpoint, train

    from .region_pretraining import RegionPretrainingConfig, pretrain_regions
    from .region_warmup import RegionWarmupConfig, warm_up_region_reading
    from .report import caption_figures
    from .synthetic import ATTRIBUTE_VALUES, corpus_texts, generate_dataset

    recipe = recipe or DemoRecipe()
    started = time.perf_counter()
    torch.manual_seed(recipe.seed)
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
        engine = GPT4RoIEngine(RegionAnnotator(model, processor))
        evaluation = report(heldout, predict(engine, heldout, progress=progress), caption_figures)
        evaluation["confusion"] = {k: v.to_text() for k, v in evaluation["confusion"].items()}
        print_report(evaluation, file=sys.stdout if progress else open(os.devnull, "w"))  # noqa: SIM115

        staging = out_dir.with_name(out_dir.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        save_checkpoint(model, processor, staging, metadata={"training": training, "recipe": recipe})
        summary = {
            "recipe_key": recipe_key(recipe),
            "format_version": FORMAT_VERSION,
            "recipe": asdict(recipe),
            "held_out_shape": HELD_OUT_SHAPE,
            "train_loss_first": result.first_loss,
            "train_loss_last": result.last_loss,
            "train_seconds": round(result.seconds, 1),
            "wall_seconds": round(time.perf_counter() - started, 1),
            "heldout": evaluation,
        }
        (staging / REPORT_FILE).write_text(json.dumps(summary, indent=2) + "\n")
        shutil.rmtree(out_dir, ignore_errors=True)
        staging.rename(out_dir)
        log(f"[demo] wrote {out_dir} in {summary['wall_seconds']:.0f} s wall time")
        return out_dir
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(work, ignore_errors=True)


def compare_with_shipped(report: dict, shipped: dict | None = None) -> dict[str, tuple[float, float]]:
    """The held-out figures of `report` (a `demo_report.json`) against the shipped checkpoint's:
    name → (shipped, other), accuracies and the captions' exact attribute match."""
    shipped = shipped or json.loads((SHIPPED_CHECKPOINT / REPORT_FILE).read_text(encoding="utf-8"))
    mine, theirs = report["heldout"], shipped["heldout"]
    figures = {k: (v, mine["accuracy"][k]) for k, v in theirs["accuracy"].items()}
    figures["caption exact_attribute_match"] = (theirs["caption"]["exact_attribute_match"],
                                                mine["caption"]["exact_attribute_match"])
    return figures


def main(argv: list[str] | None = None) -> int:
    """`python -m model.demo`: train the demo checkpoint unless the one for the recipe exists."""
    parser = argparse.ArgumentParser(prog="python -m model.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="checkpoint directory (default: the shipped one, or the cache)")
    parser.add_argument("--force", action="store_true", help="train again even if a checkpoint exists")
    parser.add_argument("--verify", action="store_true",
                        help=f"train the recipe from scratch in a temporary folder and check that every held-out "
                             f"figure is within {TOLERANCE} of the shipped checkpoint's (exit 1 if not)")
    args = parser.parse_args(argv)
    if args.verify:
        with tempfile.TemporaryDirectory(prefix="gpt4roi-demo-verify-") as folder:
            out = build_demo(Path(folder) / "demo")
            report = json.loads((out / REPORT_FILE).read_text(encoding="utf-8"))
        figures = compare_with_shipped(report)
        for name, (shipped, fresh) in figures.items():
            mark = "" if abs(shipped - fresh) <= TOLERANCE else f"  <- off by more than {TOLERANCE}"
            print(f"  {name:<32} shipped {shipped:.3f}  retrained {fresh:.3f}{mark}")
        off = [name for name, (shipped, fresh) in figures.items() if abs(shipped - fresh) > TOLERANCE]
        print("[demo] the recipe reproduces the shipped figures" if not off
              else f"[demo] the recipe no longer reproduces the shipped figures: {', '.join(off)}")
        return 1 if off else 0
    out = args.out or default_checkpoint_dir()
    if args.force or checkpoint_key(out) != recipe_key():
        build_demo(out)
    else:
        print(f"[demo] {out} holds the checkpoint of this recipe (--force trains again)")
    print(out)
    return 0
