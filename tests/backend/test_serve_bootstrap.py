"""`python -m backend serve` on an empty MODEL_DIR registers the demo model and makes it current; one that
already holds it without a pointer (a fresh DATA_DIR beside it) adopts it."""

from __future__ import annotations

from pathlib import Path

import model.demo.recipe
from backend.__main__ import _ensure_model
from backend.registry import checkpoint_path, current_version
from backend.settings import Settings
from model.demo import demo_version_name
from tests.support.model_factory import make_tiny_checkpoint


def test_an_empty_model_dir_gets_the_shipped_demo_model_without_training(tmp_path, monkeypatch):
    monkeypatch.setattr(model.demo.recipe, "build_demo", lambda *a, **k: (_ for _ in ()).throw(AssertionError))
    settings = Settings.from_env({}, model_dir=tmp_path / "models", data_dir=tmp_path / "data")
    _ensure_model(settings)
    assert current_version(settings) == demo_version_name()
    assert (checkpoint_path(settings, demo_version_name()) / "config.json").is_file()


def test_a_registered_model_is_left_alone(tmp_path, monkeypatch):
    monkeypatch.setattr(model.demo.recipe, "ensure_demo_checkpoint", lambda: (_ for _ in ()).throw(AssertionError))
    settings = Settings.from_env({}, model_dir=tmp_path / "models", data_dir=tmp_path / "data")
    make_tiny_checkpoint(tmp_path / "models" / "v1")
    (tmp_path / "models" / "current").write_text("v1\n")
    _ensure_model(settings)
    assert current_version(settings) == "v1"


def test_model_dir_defaults_under_data_dir(tmp_path):
    assert Settings.from_env({"DATA_DIR": str(tmp_path / "d")}).model_dir == tmp_path / "d" / "models"
    assert Settings.from_env({}).model_dir == Path("data") / "models"
    explicit = Settings.from_env({"DATA_DIR": str(tmp_path / "d"), "MODEL_DIR": str(tmp_path / "m")})
    assert explicit.model_dir == tmp_path / "m"


def test_a_version_folder_without_a_pointer_is_adopted(tmp_path):
    # A MODEL_DIR shared with an earlier DATA_DIR (whose database held the pointer) already has the demo
    # version: it is made current as it is, neither copied again nor a crash.
    make_tiny_checkpoint(tmp_path / "models" / demo_version_name())
    settings = Settings.from_env({}, model_dir=tmp_path / "models", data_dir=tmp_path / "fresh-data")
    _ensure_model(settings)
    assert current_version(settings) == demo_version_name()
