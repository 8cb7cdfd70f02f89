"""The engine interface: the registry finds an engine by name or by checkpoint, and GPT4RoI behind it answers
exactly as the model's own API does, trains, saves and reloads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from model.engine import (
    ENGINES,
    LABEL,
    CaptionRequest,
    ChoiceRequest,
    Engine,
    EngineError,
    Example,
    FinetuneConfig,
    ProposalRequest,
    engine_class,
    engine_of_checkpoint,
    load_engine,
)
from model.gpt4roi.engine import GPT4RoIEngine
from model.gpt4roi.inference import RegionQuery
from model.gpt4roi.prompts import attribute_question, caption_question
from tests.support import REPO
from tests.support.model_factory import make_tiny_checkpoint

BOXES = [(0.1, 0.1, 0.5, 0.6), (0.4, 0.3, 0.9, 0.95), (0.0, 0.0, 1.0, 1.0)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-gpt4roi"), seed=3)


def picture(seed: int, size: tuple[int, int] = (64, 48)) -> Image.Image:
    image = Image.new("RGB", size, (seed * 40 % 256, 90, 160))
    image.paste((250, 30 * seed % 256, 20), (5 + seed, 6, 30, 40))
    return image


# ---------------------------------------------------------------------- the registry
def test_a_registered_name_or_a_checkpoint_names_its_engine(checkpoint):
    assert set(ENGINES) >= {"gpt4roi", "florence-2"}
    assert engine_class("gpt4roi") is GPT4RoIEngine
    assert engine_class("model.gpt4roi.engine.GPT4RoIEngine") is GPT4RoIEngine
    assert engine_of_checkpoint(checkpoint) == "gpt4roi"
    assert isinstance(load_engine(checkpoint), GPT4RoIEngine)


def test_unknown_engines_and_folders_that_are_no_checkpoint_are_explained(tmp_path):
    with pytest.raises(EngineError, match="unknown engine 'llava': ENGINE must be one of florence-2, gpt4roi"):
        engine_class("llava")
    with pytest.raises(EngineError, match="cannot be imported"):
        engine_class("model.nowhere.Engine")
    with pytest.raises(EngineError, match="not an Engine subclass"):
        engine_class("model.engine.Answer")
    with pytest.raises(EngineError, match="not a model checkpoint"):
        engine_of_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(EngineError, match="no engine is registered for model_type 'llama'"):
        engine_of_checkpoint(tmp_path)


def test_the_interface_imports_no_torch():
    code = "import sys, model.engine; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO, timeout=60).returncode == 0


def test_the_earlier_module_names_are_the_moved_modules():
    import model.gpt4roi.modeling_gpt4roi
    import model.modeling_gpt4roi

    assert model.modeling_gpt4roi is model.gpt4roi.modeling_gpt4roi
    done = subprocess.run([sys.executable, "-m", "model.convert_official", "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and "--delta" in done.stdout, done.stderr


# ---------------------------------------------------------------------- GPT4RoI behind it
def test_gpt4roi_answers_through_the_engine_as_its_own_api_does(checkpoint):
    engine = load_engine(checkpoint)
    assert isinstance(engine, Engine)
    images = [picture(1), picture(2)]
    requests = [CaptionRequest(image, box) for image in images for box in BOXES]
    answers = engine.caption(requests, max_new_tokens=6)
    direct = engine.annotator.answer_with_confidence(
        [RegionQuery(r.image, (r.box,), caption_question()) for r in requests], max_new_tokens=6)
    assert answers == direct and all(0.0 < a.confidence <= 1.0 for a in answers)

    choices = [ChoiceRequest(images[0], BOXES[0], "color", ("red", "green", "blue")),
               ChoiceRequest(images[1], BOXES[1], LABEL, ("circle", "square"))]
    scored = engine.choose(choices)
    assert scored == engine.annotator.score(
        [RegionQuery(images[0], (BOXES[0],), attribute_question("color")),
         RegionQuery(images[1], (BOXES[1],), attribute_question("category"))],
        [("red", "green", "blue"), ("circle", "square")])
    assert [set(d) for d in scored] == [{"red", "green", "blue"}, {"circle", "square"}]
    assert all(sum(d.values()) == pytest.approx(1.0) for d in scored)


def test_gpt4roi_trains_on_examples_saves_its_adapter_and_reloads_as_trained(checkpoint, tmp_path):
    image = picture(4, (80, 60))
    image.save(tmp_path / "scene.png")
    examples = [Example(id=f"e{i}", image=str(tmp_path / "scene.png"), width=80, height=60, box=(8, 6, 48, 42),
                        attribute=attribute, answer=answer)
                for i, (attribute, answer) in enumerate([(None, "a red square"), ("color", "red"), (LABEL, "square")])]
    engine = load_engine(checkpoint, dtype="float32")
    before = engine.choose([ChoiceRequest(image, (0.1, 0.1, 0.6, 0.7), "color", ("red", "blue"))])[0]["red"]
    result = engine.finetune(examples, FinetuneConfig(learning_rate=5e-3, max_steps=8, epochs=8, lora_rank=4))
    assert result.steps >= 3 and result.last_loss < result.first_loss
    assert result.settings["trainable"] == "lora"
    after = engine.choose([ChoiceRequest(image, (0.1, 0.1, 0.6, 0.7), "color", ("red", "blue"))])[0]["red"]
    assert after > before

    engine.save_pretrained(tmp_path / "tuned")
    assert (tmp_path / "tuned" / "lora" / "adapter" / "adapter_config.json").is_file()
    reloaded = load_engine(tmp_path / "tuned")
    assert reloaded.choose([ChoiceRequest(image, (0.1, 0.1, 0.6, 0.7), "color", ("red", "blue"))])[0]["red"] == \
        pytest.approx(after, abs=1e-4)


def test_gpt4roi_answers_dataset_records_as_model_evaluate_asks(checkpoint, tmp_path):
    from model.data_format import RegionSample

    picture(5).save(tmp_path / "a.png")
    record = RegionSample(id="r1", image=str(tmp_path / "a.png"), width=64, height=48, boxes=[[4, 4, 40, 30]],
                          conversations=[{"from": "human", "value": caption_question()},
                                         {"from": "gpt", "value": "a circle"}], meta={"task": "caption"})
    engine = load_engine(checkpoint)
    [text] = engine.generate([record], max_new_tokens=5)
    with Image.open(tmp_path / "a.png") as opened:
        expected = engine.caption([CaptionRequest(opened.convert("RGB"), (4 / 64, 4 / 48, 40 / 64, 30 / 48))], 5)
    assert text == expected[0].text


def test_engines_that_cannot_propose_regions_say_so(checkpoint):
    engine = load_engine(checkpoint)
    assert not engine.can_propose
    with pytest.raises(EngineError, match="engine gpt4roi cannot propose regions"):
        engine.propose([ProposalRequest(picture(1), ("circle",))])
    # The registry knows which engines propose without importing them; their classes agree.
    assert [name for name, entry in ENGINES.items() if entry.proposes] == ["florence-2"]
    for name, entry in ENGINES.items():
        assert engine_class(name).can_propose is entry.proposes, name
