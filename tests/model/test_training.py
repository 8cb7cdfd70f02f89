"""Spatial instruction tuning on real (tiny) models: the loss goes down, the right parts train, and LoRA
adapters save, load and merge without changing the model's outputs."""

from __future__ import annotations

import copy

import pytest
import torch

from model.data_format import read_jsonl
from model.demo.synthetic import generate_dataset
from model.gpt4roi.processing_gpt4roi import GPT4RoIProcessor
from model.gpt4roi.training import (
    LORA_TARGETS,
    PixelCache,
    TrainingConfig,
    batch_loss,
    collate,
    configure_trainable,
    has_lora,
    load_adapter,
    merge_lora,
    save_adapter,
    train,
)
from tests.support.model_factory import make_tiny_model, make_tokenizer


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    return read_jsonl(generate_dataset(root, 6, seed=11, split_name="train", workers=1))


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def processor_for(model, tokenizer) -> GPT4RoIProcessor:
    return GPT4RoIProcessor(tokenizer, model.config.image_size, model.config.num_image_tokens)


def quiet(**overrides) -> TrainingConfig:
    return TrainingConfig(progress=False, images_per_batch=2, max_records_per_image=8, **overrides)


def test_training_a_tiny_model_lowers_the_loss(samples, tokenizer):
    model = make_tiny_model(tokenizer, seed=0)
    result = train(model, processor_for(model, tokenizer), samples,
                   quiet(trainable="all", learning_rate=2e-3, max_steps=40, warmup_ratio=0.0))
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert last < first


@pytest.mark.parametrize(
    ("mode", "trains", "frozen"),
    [
        ("region", ["spi_module."], ["vision_tower.", "language_model.", "mm_projector."]),
        ("all_but_vision", ["spi_module.", "language_model.", "mm_projector."], ["vision_tower."]),
        ("all", ["spi_module.", "language_model.", "vision_tower."], []),
        ("lora", ["spi_module.", "mm_projector.", "lora_"], ["vision_tower.", "base_layer.weight"]),
    ],
)
def test_each_mode_trains_exactly_its_parts(tokenizer, mode, trains, frozen):
    model = configure_trainable(make_tiny_model(tokenizer), quiet(trainable=mode))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    for part in trains:
        assert any(part in name for name in trainable), f"{mode}: nothing of {part} trains"
    for part in frozen:
        assert not any(name.startswith(part) or part in name for name in trainable), f"{mode}: {part} trains"


def test_the_shared_image_prefix_gives_the_same_loss_as_the_plain_forward(samples, tokenizer):
    model = make_tiny_model(tokenizer, seed=1)
    processor = processor_for(model, tokenizer)
    batch = collate(samples[:5], processor, PixelCache(processor))
    with torch.no_grad():
        shared = batch_loss(model, batch)
        prefix = batch["prefix_ids"].expand(len(batch["input_ids"]), -1)
        plain = model(
            input_ids=torch.cat([prefix, batch["input_ids"]], 1),
            attention_mask=torch.cat([torch.ones_like(prefix), batch["attention_mask"]], 1),
            labels=torch.cat([torch.full_like(prefix, -100), batch["labels"]], 1),
            pixel_values=batch["pixel_values"], image_index=batch["image_index"], boxes=batch["boxes"],
        ).loss
    assert shared.item() == pytest.approx(plain.item(), rel=1e-5)


@pytest.mark.parametrize("targets", [LORA_TARGETS, (*LORA_TARGETS, "lm_head")], ids=["llm", "llm+lm_head"])
def test_lora_adapters_save_load_and_merge(samples, tokenizer, tmp_path, targets):
    base = make_tiny_model(tokenizer, seed=2)
    pristine = copy.deepcopy(base)
    processor = processor_for(base, tokenizer)
    train(base, processor, samples, quiet(trainable="lora", learning_rate=5e-3, max_steps=5, lora_rank=4,
                                          lora_targets=targets))
    assert has_lora(base)
    batch = collate(samples[:4], processor, PixelCache(processor))
    with torch.no_grad():
        trained = batch_loss(base, batch)
        untouched = batch_loss(pristine, batch)
    assert trained.item() != pytest.approx(untouched.item(), rel=1e-4)

    save_adapter(base, tmp_path / "adapter")
    reloaded = load_adapter(copy.deepcopy(pristine), tmp_path / "adapter")
    with torch.no_grad():
        assert batch_loss(reloaded.eval(), batch).item() == pytest.approx(trained.item(), rel=1e-5)
        merged = merge_lora(reloaded)
        assert not has_lora(merged)
        assert not any("lora_" in name for name, _ in merged.named_parameters())
        assert batch_loss(merged, batch).item() == pytest.approx(trained.item(), rel=1e-4)


def test_a_step_budget_never_stops_short_of_the_passes_asked_for(samples, tokenizer):
    # A fine-tune's fixed budget over a large backlog of corrections must still show the model all of it.
    model = make_tiny_model(tokenizer, seed=0)
    images = len({str(s.image) for s in samples})
    batches = -(-images // 2)
    result = train(model, processor_for(model, tokenizer), samples, quiet(max_steps=1, min_epochs=1.0))
    assert result.steps == batches
    result = train(model, processor_for(model, tokenizer), samples,
                   quiet(max_steps=batches + 2, min_epochs=1.0))
    assert result.steps == batches + 2
