"""Spatial instruction tuning: one loop for the demo model, stage-1/2-style training and LoRA fine-tuning.

Data are [`RegionSample`] records (see `model.data_format`). Batches are built per image: a batch takes a
few images and every record about them, so each image is encoded once however many questions it has.
The loss is the usual next-token cross-entropy on the assistant answers and their `###` stop string
(`GPT4RoIProcessor.encode_conversation` marks them).

What trains is chosen by `TrainingConfig.trainable`:
    "region"          the region module only (the paper's stage 1)
    "all_but_vision"  everything except the CLIP tower (stage 2)
    "all"             everything (a model trained from scratch, such as the demo)
    "lora"            LoRA adapters on the LLM (through `peft`) + the full region module and projector
                      (incremental fine-tuning on annotator corrections)
"""

from __future__ import annotations

import json
import math
import random
import time
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from model.data_format import RegionSample

from .modeling_gpt4roi import GPT4RoIForCausalLM
from .processing_gpt4roi import IGNORE_INDEX, GPT4RoIProcessor, normalize_boxes, pad_sequences

Trainable = Literal["region", "all_but_vision", "all", "lora"]
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_DIR = "adapter"
REGION_WEIGHTS = "region_module.safetensors"


@dataclass
class TrainingConfig:
    """Hyper-parameters of one training run. Defaults suit LoRA fine-tuning of a converted model."""

    trainable: Trainable = "lora"
    learning_rate: float = 2e-4
    # The region module's learning rate relative to `learning_rate`: its flatten_linear sums
    # C × R × R inputs, so at a language model's rate its output scale runs away.
    region_lr_scale: float = 1.0
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    epochs: float = 1.0
    max_steps: int | None = None
    # Passes over the data that `max_steps` may not cut short (a fixed step budget over a large backlog
    # would otherwise never show the model most of it).
    min_epochs: float = 0.0
    images_per_batch: int = 4
    max_records_per_image: int = 16
    gradient_accumulation: int = 1
    max_grad_norm: float = 1.0
    seed: int = 0
    bf16: bool | None = None  # None: bf16 autocast on CUDA, fp32 elsewhere
    gradient_checkpointing: bool = False
    lora_rank: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] = LORA_TARGETS
    max_length: int | None = None
    log_every: int = 10
    progress: bool = True


@dataclass
class TrainingResult:
    steps: int
    seconds: float
    losses: list[float] = field(default_factory=list)

    @property
    def first_loss(self) -> float:
        return self.losses[0] if self.losses else math.nan

    @property
    def last_loss(self) -> float:
        tail = self.losses[-max(1, len(self.losses) // 10):]
        return sum(tail) / len(tail) if tail else math.nan


# ---------------------------------------------------------------- trainable parts
def configure_trainable(model: GPT4RoIForCausalLM, config: TrainingConfig) -> GPT4RoIForCausalLM:
    """Freeze and unfreeze parameters for `config.trainable`; for "lora" also inject the adapters."""
    mode = config.trainable
    if mode not in ("region", "all_but_vision", "all", "lora"):
        raise ValueError(f"trainable must be region, all_but_vision, all or lora; got {mode!r}")
    model.requires_grad_(mode == "all")
    if mode in ("region", "all_but_vision", "lora"):
        model.spi_module.requires_grad_(True)
        model.mm_projector.requires_grad_(mode != "region")
    if mode == "all_but_vision":
        model.language_model.requires_grad_(True)
    if mode == "lora":
        add_lora(model, config)
    return model


def add_lora(model: GPT4RoIForCausalLM, config: TrainingConfig) -> None:
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
        target_modules=list(config.lora_targets), task_type="CAUSAL_LM",
    )
    model.language_model = get_peft_model(model.language_model, lora)


def has_lora(model: GPT4RoIForCausalLM) -> bool:
    from peft import PeftModel

    return isinstance(model.language_model, PeftModel)


def merge_lora(model: GPT4RoIForCausalLM) -> GPT4RoIForCausalLM:
    """Fold the adapters into the LLM weights, leaving a plain model that `save_pretrained` writes whole."""
    if has_lora(model):
        model.language_model = model.language_model.merge_and_unload()
    return model


def save_adapter(model: GPT4RoIForCausalLM, directory: str | Path) -> Path:
    """Save the LoRA adapter and the (fully trained) region module and projector, without the base."""
    directory = Path(directory)
    if not has_lora(model):
        raise ValueError("the model has no LoRA adapter to save")
    # LoRA on lm_head makes peft save the whole base embedding layers too; the base is not trained, so
    # the adapter stays small without them.
    model.language_model.save_pretrained(directory / ADAPTER_DIR, save_embedding_layers=False)
    region = {f"spi_module.{k}": v for k, v in model.spi_module.state_dict().items()}
    region |= {f"mm_projector.{k}": v for k, v in model.mm_projector.state_dict().items()}
    save_file({k: v.contiguous() for k, v in region.items()}, directory / REGION_WEIGHTS)
    return directory


def load_adapter(model: GPT4RoIForCausalLM, directory: str | Path) -> GPT4RoIForCausalLM:
    """Attach an adapter written by [`save_adapter`] to a base model (unmerged)."""
    from peft import PeftModel

    directory = Path(directory)
    if not (directory / ADAPTER_DIR).is_dir():
        raise FileNotFoundError(f"{directory / ADAPTER_DIR} not found: not an adapter directory")
    model.language_model = PeftModel.from_pretrained(model.language_model, directory / ADAPTER_DIR)
    _, unexpected = model.load_state_dict(load_file(directory / REGION_WEIGHTS), strict=False)
    if unexpected:
        raise ValueError(f"{directory / REGION_WEIGHTS} has unknown keys: {unexpected[:5]}")
    return model


# ---------------------------------------------------------------------- data
class PixelCache:
    """Decoded, preprocessed images by path, least recently used dropped first."""

    def __init__(self, processor: GPT4RoIProcessor, size: int = 4096) -> None:
        self.processor = processor
        self.size = size
        self._items: OrderedDict[str, torch.Tensor] = OrderedDict()

    def pixels(self, path: str) -> torch.Tensor:
        if path not in self._items:
            with Image.open(path) as image:
                self._items[path] = self.processor.preprocess_images([image])[0]
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        self._items.move_to_end(path)
        return self._items[path]


def image_batches(
    samples: Sequence[RegionSample], images_per_batch: int, max_records_per_image: int, rng: random.Random
) -> Iterator[list[RegionSample]]:
    """One epoch of batches: shuffled images, each with (up to a cap of) its records."""
    by_image: dict[str, list[RegionSample]] = defaultdict(list)
    for sample in samples:
        by_image[str(sample.image)].append(sample)
    keys = list(by_image)
    rng.shuffle(keys)
    for start in range(0, len(keys), images_per_batch):
        batch: list[RegionSample] = []
        for key in keys[start: start + images_per_batch]:
            records = by_image[key]
            batch += rng.sample(records, min(len(records), max_records_per_image))
        yield batch


def collate(
    samples: Sequence[RegionSample], processor: GPT4RoIProcessor, cache: PixelCache, max_length: int | None = None
) -> dict:
    """A batch split where its records stop agreeing: the prefix every record shares (ids only; the image
    features are spliced per image; at least through `<im_end>`, never past a `<bbox>` or a target), each
    record's right-padded rest with labels, one pixel row per distinct image, and each record's image index
    and normalized boxes."""
    paths: dict[str, int] = {}
    encoded = [processor.encode_conversation(s.conversations, max_length=max_length) for s in samples]
    tokenizer = processor.tokenizer
    split = _shared_prefix_length([ids for ids, _ in encoded], [labels for _, labels in encoded],
                                  tokenizer.bbox_token_id)
    prefix = encoded[0][0][:split]
    # The prefix is the same for every record, so one look at it covers the batch.
    if tokenizer.im_end_token_id not in prefix.tolist():
        raise ValueError(f"record {samples[0].id} does not start with the shared image prefix")
    rests, boxes, image_index = [], [], []
    for sample, (ids, labels) in zip(samples, encoded, strict=True):
        rests.append((ids[split:], labels[split:]))
        kept = int((ids == tokenizer.bbox_token_id).sum())
        boxes.append(normalize_boxes(sample.boxes, sample.width, sample.height)[:kept])
        image_index.append(paths.setdefault(str(sample.image), len(paths)))
    input_ids, mask = pad_sequences([ids.tolist() for ids, _ in rests], tokenizer.pad_token_id)
    labels, _ = pad_sequences([lab.tolist() for _, lab in rests], IGNORE_INDEX)
    return {
        "prefix_ids": prefix,
        "input_ids": input_ids,
        "attention_mask": mask,
        "labels": labels,
        "pixel_values": torch.stack([cache.pixels(path) for path in paths]),
        "image_index": torch.tensor(image_index),
        "boxes": boxes,
    }


def _shared_prefix_length(ids: Sequence[torch.Tensor], labels: Sequence[torch.Tensor], bbox_id: int) -> int:
    """Length of the longest prefix all records share, cut before the first `<bbox>` or target of any."""
    first = ids[0]
    length = min(len(seq) for seq in ids)
    for seq, lab in zip(ids, labels, strict=True):
        differs = (seq[:length] != first[:length]) | (seq[:length] == bbox_id) | (lab[:length] != IGNORE_INDEX)
        if differs.any():
            length = int(differs.nonzero()[0])
    return length


def batch_loss(model: GPT4RoIForCausalLM, batch: dict) -> torch.Tensor:
    """Mean next-token loss of a [`collate`]d batch; each image and the shared prefix run once."""
    features = model.encode_images(batch["pixel_values"])
    cache = model.image_prefix_cache(batch["prefix_ids"], features, batch["image_index"])
    return model.forward_after_prefix(
        cache, batch["input_ids"], batch["attention_mask"], features, batch["boxes"], batch["image_index"],
        labels=batch["labels"],
    ).loss


# ---------------------------------------------------------------------- loop
class CosineAdamW:
    """AdamW over parameter groups (each with its own `lr`), a linear warm-up then cosine decay, and
    gradients clipped to `max_grad_norm` before every step: the optimizer of every loop in `model`."""

    def __init__(self, groups: Sequence[dict], steps: int, warmup_steps: int, max_grad_norm: float = 1.0,
                 weight_decay: float = 0.0) -> None:
        groups = [group for group in groups if group["params"]]
        self.params = [param for group in groups for param in group["params"]]
        self.optimizer = torch.optim.AdamW(groups, weight_decay=weight_decay)
        self.scheduler = get_cosine_schedule_with_warmup(self.optimizer, warmup_steps, steps)
        self.max_grad_norm = max_grad_norm

    def step(self) -> None:
        """Clip, update, advance the schedule and clear the gradients."""
        torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)


def train(
    model: GPT4RoIForCausalLM,
    processor: GPT4RoIProcessor,
    samples: Sequence[RegionSample],
    config: TrainingConfig,
    on_log: Callable[[int, float], None] | None = None,
) -> TrainingResult:
    """Train `model` in place on `samples`; returns the loss curve. The caller saves the result."""
    if not samples:
        raise ValueError("no training samples")
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    configure_trainable(model, config)
    device = model.device
    use_bf16 = device.type == "cuda" if config.bf16 is None else config.bf16
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"nothing to train with trainable={config.trainable!r}")
    region = {id(p) for p in model.spi_module.parameters()}
    groups = [
        {"params": [p for p in params if id(p) not in region], "lr": config.learning_rate},
        {"params": [p for p in params if id(p) in region], "lr": config.learning_rate * config.region_lr_scale},
    ]

    n_images = len({str(s.image) for s in samples})
    batches_per_epoch = math.ceil(n_images / config.images_per_batch)
    steps = config.max_steps or max(1, math.ceil(config.epochs * batches_per_epoch / config.gradient_accumulation))
    steps = max(steps, math.ceil(config.min_epochs * batches_per_epoch / config.gradient_accumulation))
    optimizer = CosineAdamW(groups, steps, int(config.warmup_ratio * steps), config.max_grad_norm,
                            config.weight_decay)
    cache = PixelCache(processor)

    def batches() -> Iterator[list[RegionSample]]:
        while True:
            yield from image_batches(samples, config.images_per_batch, config.max_records_per_image, rng)

    model.train()
    result = TrainingResult(steps=steps, seconds=0.0)
    started = time.perf_counter()
    stream = batches()
    bar = tqdm(range(steps), desc=f"train ({config.trainable})", disable=not config.progress, unit="step")
    for step in bar:
        total = 0.0
        for _ in range(config.gradient_accumulation):
            batch = collate(next(stream), processor, cache, config.max_length)
            batch = {k: _to(v, device) for k, v in batch.items()}
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                loss = batch_loss(model, batch) / config.gradient_accumulation
            loss.backward()
            total += loss.item()
        optimizer.step()
        if not math.isfinite(total):
            raise FloatingPointError(f"loss became {total} at step {step}; lower the learning rate")
        result.losses.append(total)
        bar.set_postfix(loss=f"{total:.4f}")
        if on_log and (step % config.log_every == 0 or step == steps - 1):
            on_log(step, total)
    model.eval()
    if config.gradient_checkpointing:
        model.gradient_checkpointing_disable()
    result.seconds = time.perf_counter() - started
    return result


def _to(value, device: torch.device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, list):
        return [_to(v, device) for v in value]
    return value


def save_checkpoint(
    model: GPT4RoIForCausalLM, processor: GPT4RoIProcessor, directory: str | Path, metadata: dict | None = None
) -> Path:
    """`save_pretrained` of the (merged) model and the processor, plus an optional `training.json`."""
    directory = Path(directory)
    merge_lora(model).save_pretrained(directory)
    processor.save_pretrained(directory)
    if metadata is not None:
        (directory / "training.json").write_text(json.dumps(metadata, indent=2, default=_jsonable))
    return directory


def _jsonable(value):
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    return str(value)
