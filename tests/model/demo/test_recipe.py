"""The shipped demo checkpoint is what its recipe trains: identified by the recipe's key, loadable without
training, and reproduced by training the recipe from scratch (figures within a few points: CPU kernels
order float sums differently from one processor to another, so the weights themselves may differ)."""

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
    DemoRecipe,
    build_demo,
    checkpoint_key,
    default_checkpoint_dir,
    ensure_demo_checkpoint,
    recipe_key,
)

# Largest difference, in points of accuracy, between the shipped figures and a retrained model's.
TOLERANCE = 0.05


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


@pytest.mark.slow
def test_training_the_recipe_reproduces_the_shipped_figures(tmp_path):
    """Trains the whole demo (about 10 minutes on two idle cores)."""
    out = build_demo(tmp_path / "demo", progress=False)
    assert checkpoint_key(out) == recipe_key()
    fresh = json.loads((out / REPORT_FILE).read_text(encoding="utf-8"))["heldout"]
    shipped = shipped_report()["heldout"]
    figures = {**{k: (v, fresh["accuracy"][k]) for k, v in shipped["accuracy"].items()},
               "caption exact_attribute_match": (shipped["caption"]["exact_attribute_match"],
                                                 fresh["caption"]["exact_attribute_match"])}
    print("shipped vs retrained:", {k: f"{a:.3f} vs {b:.3f}" for k, (a, b) in figures.items()})
    off = {k: (a, b) for k, (a, b) in figures.items() if abs(a - b) > TOLERANCE}
    assert not off, f"the retrained demo differs from the shipped one by more than {TOLERANCE}: {off}"
