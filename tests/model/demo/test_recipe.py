"""The shipped demo checkpoint is what its recipe trains: identified by the recipe's key, loadable without
training, and trained by a library that still computes what it computed then.

Retraining the whole recipe takes about half an hour (`python -m model.demo --verify` does it and
compares every held-out figure with the shipped one); here a miniature of the recipe (same data
generator, tokenizer, three stages and evaluation, a few dozen steps each) is trained and compared with
the figures it gave when the checkpoint was shipped (`tests/fixtures/demo_miniature.json`). Any change to
what the recipe computes, from the synthetic scenes to the optimizer, moves them."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

import model.demo.recipe as recipe_module
from model.demo.recipe import (
    FORMAT_VERSION,
    REPORT_FILE,
    SHIPPED_CHECKPOINT,
    TOLERANCE,
    DemoRecipe,
    build_demo,
    compare_with_shipped,
    default_checkpoint_dir,
    ensure_demo_checkpoint,
    recipe_key,
)
from tests.support import FIXTURES

MINIATURE = DemoRecipe(train_images=48, heldout_images=12, pretrain_steps=40, warmup_steps=40, steps=40)
MINIATURE_FIGURES = FIXTURES / "demo_miniature.json"


def shipped_report() -> dict:
    return json.loads((SHIPPED_CHECKPOINT / REPORT_FILE).read_text(encoding="utf-8"))


def test_the_shipped_checkpoint_belongs_to_the_current_recipe():
    report = shipped_report()
    assert report["recipe_key"] == recipe_key() and report["format_version"] == FORMAT_VERSION
    assert report["recipe"] == json.loads(json.dumps(dataclasses.asdict(DemoRecipe())))
    assert default_checkpoint_dir() == SHIPPED_CHECKPOINT


def test_the_key_follows_the_recipe_and_the_format_version_not_the_source(monkeypatch):
    assert recipe_key(DemoRecipe(steps=1299)) != recipe_key()
    key = recipe_key()
    monkeypatch.setattr(recipe_module, "FORMAT_VERSION", FORMAT_VERSION + 1)
    assert recipe_key() != key


def test_the_shipped_checkpoint_is_used_without_training(monkeypatch):
    monkeypatch.setattr(recipe_module, "build_demo", lambda *a, **k: pytest.fail("the demo was trained again"))
    assert ensure_demo_checkpoint() == SHIPPED_CHECKPOINT


def test_another_recipe_is_trained_into_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv(recipe_module.CACHE_ENV, str(tmp_path))
    trained: list[Path] = []

    def fake_build(directory: Path, recipe: DemoRecipe, progress: bool = True) -> Path:
        trained.append(directory)
        return directory

    monkeypatch.setattr(recipe_module, "build_demo", fake_build)
    other = DemoRecipe(steps=10)
    assert ensure_demo_checkpoint(recipe=other) == tmp_path / f"demo-{recipe_key(other)}"
    assert trained == [tmp_path / f"demo-{recipe_key(other)}"]


def test_the_shipped_figures_compare_equal_to_themselves_and_a_drift_shows():
    report = shipped_report()
    assert all(a == b for a, b in compare_with_shipped(report).values())
    drifted = json.loads(json.dumps(report))
    drifted["heldout"]["accuracy"]["shape"] -= 2 * TOLERANCE
    figures = compare_with_shipped(drifted)
    assert [name for name, (a, b) in figures.items() if abs(a - b) > TOLERANCE] == ["shape"]


def miniature_figures(report: dict) -> dict[str, float]:
    """What the miniature is compared on: its losses and its held-out figures."""
    heldout = report["heldout"]
    return {"train_loss_first": report["train_loss_first"], "train_loss_last": report["train_loss_last"],
            **{f"accuracy {k}": v for k, v in heldout["accuracy"].items()},
            "caption exact_attribute_match": heldout["caption"]["exact_attribute_match"]}


@pytest.mark.slow
def test_a_miniature_of_the_recipe_trains_what_it_trained_when_the_checkpoint_was_shipped(tmp_path):
    out = build_demo(tmp_path / "miniature", MINIATURE, progress=False)
    fresh = miniature_figures(json.loads((out / REPORT_FILE).read_text(encoding="utf-8")))
    recorded = json.loads(MINIATURE_FIGURES.read_text(encoding="utf-8"))
    assert recorded["recipe_key"] == recipe_key(), "the recipe changed: retrain the demo and record the miniature"
    print("recorded vs now:", {k: f"{v:.4f} vs {fresh[k]:.4f}" for k, v in recorded["figures"].items()})
    # Losses to 2 % (float sums differ between processors); the accuracies of a model this small, on 12
    # scenes, to a few records.
    off = {k: (v, fresh[k]) for k, v in recorded["figures"].items()
           if abs(v - fresh[k]) > (0.02 * abs(v) if k.startswith("train_loss") else 0.1)}
    assert not off, f"the library no longer trains what it trained for the shipped checkpoint: {off}"
