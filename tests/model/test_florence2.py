"""The Florence-2 engine answers as the native transformers model does: its region prompts, captions and
candidate scores are checked against the model and processor used directly, on a tiny random checkpoint."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from transformers import Florence2ForConditionalGeneration, Florence2Processor

from model.data_format import RegionSample
from model.engine import (
    LABEL,
    TRANSCRIPTION,
    CaptionRequest,
    ChoiceRequest,
    Example,
    FinetuneConfig,
    engine_of_checkpoint,
    load_engine,
)
from model.florence2.engine import ENGINE_FILE, LEARNT_ATTRIBUTE_PROMPT, Florence2Engine, answer_text
from tests.support.florence2_factory import save_tiny_florence2

MAX_NEW_TOKENS = 10
BOXES = [(0.1, 0.2, 0.5, 0.6), (0.0, 0.0, 1.0, 1.0), (0.3, 0.3, 0.31, 0.32), (0.55, 0.05, 0.95, 0.7)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_tiny_florence2(tmp_path_factory.mktemp("florence2") / "tiny")


@pytest.fixture(scope="module")
def direct(checkpoint):
    """The checkpoint through transformers alone: what the engine must agree with."""
    return (Florence2ForConditionalGeneration.from_pretrained(checkpoint).eval(),
            Florence2Processor.from_pretrained(checkpoint))


@pytest.fixture
def engine(checkpoint) -> Florence2Engine:
    return Florence2Engine.from_pretrained(checkpoint)


def noise(seed: int, size: tuple[int, int] = (70, 50)) -> Image.Image:
    width, height = size
    return Image.fromarray(np.random.RandomState(seed).randint(0, 255, (height, width, 3), dtype=np.uint8))


IMAGES = [noise(0), noise(1, (40, 90)), noise(2, (64, 64))]


def region(processor, box, size) -> str:
    """The location tokens of a normalized box, quantized by the processor from pixel coordinates."""
    width, height = size
    pixels = torch.tensor([[box[0] * width, box[1] * height, box[2] * width, box[3] * height]], dtype=torch.float64)
    return "".join(f"<loc_{b}>" for b in processor.post_processor.quantize(pixels, size=size)[0].tolist())


def direct_answer(model, processor, image, prompt: str, task: str) -> tuple[str, float]:
    """Greedy generation and parsing as a user of transformers writes it, and the geometric mean of the
    probabilities of the generated tokens after the forced `<s>`, the end included."""
    inputs = processor(text=[prompt], images=[image], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, num_beams=1, do_sample=False,
                             no_repeat_ngram_size=0, return_dict_in_generate=True, output_logits=True)
    text = processor.batch_decode(out.sequences, skip_special_tokens=False)[0]
    parsed = processor.post_process_generation(text, task=task, image_size=image.size)[task]
    ids = out.sequences[0, 1:].tolist()
    end = ids.index(2) + 1 if 2 in ids else len(ids)
    picked = [F.log_softmax(out.logits[step][0], -1)[ids[step]].item() for step in range(1, end)]
    words = " ".join(re.sub(r"<loc_\d+>", " ", parsed).split())
    return ("" if words == "No object detected." else words), math.exp(sum(picked) / len(picked))


def direct_distribution(model, processor, image, prompt: str, targets: list[str]) -> list[float]:
    """Softmax over the targets' summed token log-likelihoods, one plain forward per target."""
    inputs = processor(text=[prompt], images=[image], return_tensors="pt")
    scores = []
    for target in targets:
        labels = processor.tokenizer(target, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logits = model(**inputs, labels=labels).logits
        scores.append(F.log_softmax(logits[0].double(), -1).gather(-1, labels[0][:, None]).sum().item())
    return torch.softmax(torch.tensor(scores), 0).tolist()


def test_boxes_are_quantized_as_the_processor_does(engine, direct):
    _, processor = direct
    boxes = [*BOXES, (0.0, 0.0, 0.001, 0.001), (0.999, 0.999, 1.0, 1.0), (0.1, 0.1, 0.1000001, 0.3),
             (1 / 3, 2 / 3, 0.7, 0.9)]
    for size in [(70, 50), (1000, 1000), (1, 1), (333, 777)]:
        for box in boxes:
            assert engine.locations(box, size) == region(processor, box, size), (box, size)
    assert engine.locations((0.0, 0.0, 1.0, 1.0), (640, 480)) == "<loc_0><loc_0><loc_999><loc_999>"
    pixels = (12.0, 7.5, 69.9, 50.0)
    expected = processor.post_processor.quantize(torch.tensor([pixels], dtype=torch.float64), size=(70, 50))
    assert engine.locations(pixels, (70, 50), normalized=False) == "".join(f"<loc_{b}>" for b in expected[0].tolist())


def test_prompts_are_those_the_processor_builds(engine, direct):
    _, processor = direct
    image, locations = IMAGES[0], "<loc_1><loc_20><loc_300><loc_999>"
    learnt = LEARNT_ATTRIBUTE_PROMPT.format(attribute="color", region=locations)
    describe, category = "<REGION_TO_DESCRIPTION>" + locations, "<REGION_TO_CATEGORY>" + locations
    for asked, expected in [(describe, engine.caption_prompt(locations).text),
                            (category, engine.attribute_prompt_for(LABEL, locations).text),
                            (describe, engine.attribute_prompt_for("color", locations).text),
                            (learnt, learnt)]:  # the learnt prompt goes through unchanged
        ids = processor(text=[asked], images=[image], return_tensors="pt")["input_ids"][0].tolist()
        assert ids[processor.num_image_tokens:] == list(engine._prompt_ids(expected))
    assert engine.caption_prompt(locations).text == f"What does the region {locations} describe?"
    assert engine.attribute_prompt_for(LABEL, locations).text == f"What is the region {locations}?"


def test_captions_are_the_models_greedy_answers(engine, direct):
    model, processor = direct
    requests = [CaptionRequest(image, box) for image in IMAGES for box in BOXES]
    answers = engine.caption(requests, max_new_tokens=MAX_NEW_TOKENS)
    texts = []
    for request, answer in zip(requests, answers, strict=True):
        prompt = "<REGION_TO_DESCRIPTION>" + region(processor, request.box, request.image.size)
        text, confidence = direct_answer(model, processor, request.image, prompt, "<REGION_TO_DESCRIPTION>")
        assert answer.text == text
        assert answer.confidence == pytest.approx(confidence, rel=1e-4)
        texts.append(text)
    assert len(set(texts)) > 3 and any(texts), "the tiny model should say different things about different regions"


def test_text_in_a_region_is_read_with_the_ocr_task(engine, direct):
    model, processor = direct
    requests = [CaptionRequest(image, box, TRANSCRIPTION) for image in IMAGES[:2] for box in BOXES[:2]]
    for request, answer in zip(requests, engine.caption(requests, max_new_tokens=MAX_NEW_TOKENS), strict=True):
        prompt = "<REGION_TO_OCR>" + region(processor, request.box, request.image.size)
        text, confidence = direct_answer(model, processor, request.image, prompt, "<REGION_TO_OCR>")
        assert answer.text == text
        assert answer.confidence == pytest.approx(confidence, rel=1e-4)
    locations = region(processor, BOXES[0], IMAGES[0].size)
    assert engine.caption_prompt(locations, TRANSCRIPTION).text == f"What text is in the region {locations}?"


@pytest.mark.parametrize("attribute", [LABEL, "color"])
def test_zero_shot_scores_are_the_models_likelihoods(engine, direct, attribute):
    model, processor = direct
    task = "<REGION_TO_CATEGORY>" if attribute == LABEL else "<REGION_TO_DESCRIPTION>"
    candidates = ("car", "dog", "red circle", "a")
    requests = [ChoiceRequest(image, box, attribute, candidates) for image in IMAGES[:2] for box in BOXES[:2]]
    for request, answer in zip(requests, engine.choose(requests), strict=True):
        locations = region(processor, request.box, request.image.size)
        # The pretrained answer repeats the region after the phrase: that is the sequence scored.
        expected = direct_distribution(model, processor, request.image, task + locations,
                                       [c + locations for c in candidates])
        assert list(answer) == list(candidates)
        assert list(answer.values()) == pytest.approx(expected, abs=1e-5)
        assert sum(answer.values()) == pytest.approx(1.0)


def test_many_regions_in_one_call_answer_as_one_at_a_time_and_encode_each_image_once(engine):
    encoded = []
    engine.model.model.vision_tower.register_forward_hook(lambda _m, args, _o: encoded.append(args[0].shape[0]))
    images = IMAGES[:2]
    boxes = [(x, y, x + 0.3, y + 0.4) for x in (0.0, 0.2, 0.4, 0.6) for y in (0.0, 0.3)]
    captions = [CaptionRequest(image, box) for image in images for box in boxes]
    choices = [ChoiceRequest(r.image, r.box, a, ("red", "blue", "car"))
               for r, a in zip(captions, [LABEL, "color"] * 8, strict=True)]

    together = engine.caption(captions, max_new_tokens=MAX_NEW_TOKENS)
    assert sum(encoded) == 2
    scored = engine.choose(choices)
    assert sum(encoded) == 2, "cached features are reused across calls"
    engine.caption([CaptionRequest(images[0], (0.05, 0.05, 0.2, 0.2))], max_new_tokens=2)
    assert sum(encoded) == 2, "a further box on the same image does not encode it again"
    engine.caption([CaptionRequest(images[0].copy(), (0.05, 0.05, 0.2, 0.2))], max_new_tokens=2)
    assert sum(encoded) == 2, "the cache is keyed by content, not by object"

    for request, caption, choice_request, choice in zip(captions, together, choices, scored, strict=True):
        engine.forget_images()
        [alone] = engine.caption([request], max_new_tokens=MAX_NEW_TOKENS)
        assert alone.text == caption.text
        assert alone.confidence == pytest.approx(caption.confidence, rel=1e-4)
        [alone_choice] = engine.choose([choice_request])
        assert list(alone_choice.values()) == pytest.approx(list(choice.values()), abs=1e-5)
    assert sum(encoded) == 2 + len(captions)  # once per forget_images


def attribute_examples(folder: Path) -> list[Example]:
    examples = []
    for seed in range(4):
        path = folder / f"image-{seed}.png"
        noise(seed + 10, (64, 48)).save(path)
        examples += [
            Example(f"c{seed}", str(path), 64, 48, (4.0, 4.0, 40.0, 30.0), None, "a red circle"),
            Example(f"a{seed}", str(path), 64, 48, (10.0, 5.0, 60.0, 40.0), "color", ("red", "blue")[seed % 2]),
        ]
    return examples


def test_fine_tuning_trains_the_learnt_prompt_merges_and_saves(engine, direct, tmp_path):
    _, processor = direct
    examples = attribute_examples(tmp_path)
    result = engine.finetune(examples, FinetuneConfig(learning_rate=5e-3, epochs=8, seed=0, lora_rank=4))
    assert result.steps == 8 and result.last_loss < result.first_loss
    assert result.settings["rank"] == 4 and "language_model" in result.settings["targets"]
    assert not any("lora" in name for name in engine.model.state_dict()), "the adapter is merged"

    image = Image.open(examples[1].image).convert("RGB")
    box = (10 / 64, 5 / 48, 60 / 64, 40 / 48)
    locations = region(processor, box, image.size)
    learnt = LEARNT_ATTRIBUTE_PROMPT.format(attribute="color", region=locations)
    assert engine.attribute_prompt_for("color", locations).text == learnt
    assert engine.attribute_prompt_for(LABEL, locations).text == f"What is the region {locations}?", \
        "an attribute never trained keeps its zero-shot prompt"
    requests = [ChoiceRequest(image, box, "color", ("red", "blue")), ChoiceRequest(image, box, LABEL, ("car", "dog")),
                ChoiceRequest(noise(3), BOXES[0], "color", ("red", "blue"))]
    captions = [CaptionRequest(image, (4 / 64, 4 / 48, 40 / 64, 30 / 48)), CaptionRequest(noise(3), BOXES[2])]
    scored, captioned = engine.choose(requests), engine.caption(captions, max_new_tokens=MAX_NEW_TOKENS)

    folder = tmp_path / "version-2"
    engine.save_pretrained(folder)
    assert engine_of_checkpoint(folder) == "florence-2"
    assert json.loads((folder / ENGINE_FILE).read_text())["learnt_attributes"] == ["color"]
    assert json.loads((folder / "lora" / "adapter_config.json").read_text())["r"] == 4
    with safe_open(folder / "lora" / "adapter_model.safetensors", "pt") as adapter:
        names = list(adapter.keys())
    assert names and all(".language_model." in name and "lora_" in name for name in names)

    reloaded = load_engine(folder)
    assert isinstance(reloaded, Florence2Engine) and reloaded.learnt_attributes == {"color"}
    again = reloaded.choose(requests)
    for first, second in zip(scored, again, strict=True):
        assert list(first.values()) == pytest.approx(list(second.values()), abs=1e-5)
    recaptioned = reloaded.caption(captions, max_new_tokens=MAX_NEW_TOKENS)
    assert [a.text for a in recaptioned] == [a.text for a in captioned]
    # Merged weights round-trip through fp32 files: the same up to float summation order.
    assert [a.confidence for a in recaptioned] == pytest.approx([a.confidence for a in captioned], rel=1e-4)

    # The trained attribute is asked with the learnt prompt; its answer is the bare value.
    trained = Florence2ForConditionalGeneration.from_pretrained(folder).eval()
    expected = direct_distribution(trained, processor, image, learnt, ["red", "blue"])
    assert list(scored[0].values()) == pytest.approx(expected, abs=1e-5)


def test_dataset_records_train_and_answer_by_their_meta(engine, tmp_path):
    path = tmp_path / "scene.png"
    noise(7, (64, 48)).save(path)

    def record(ident, meta, answer, boxes=((4.0, 4.0, 40.0, 30.0),)):
        return RegionSample(ident, str(path), 64, 48, [tuple(b) for b in boxes],
                            [{"from": "human", "value": "What is in region1 <bbox>? (ignored)"},
                             {"from": "gpt", "value": answer}], meta)

    records = [record("c", {"task": "caption"}, "a small red circle"),
               record("a", {"task": "attribute", "attribute": "color"}, "red"),
               record("l", {"task": "attribute", "attribute": LABEL}, "car"),
               record("two", {"task": "caption"}, "two boxes", ((1, 1, 5, 5), (6, 6, 9, 9))),
               record("other", {"task": "relation"}, "left")]
    result = engine.finetune([], FinetuneConfig(max_steps=2, seed=1), records=records)
    assert result.settings["examples"] == 3
    assert engine.learnt_attributes == {"color", LABEL}

    image = Image.open(path).convert("RGB")
    box = (4 / 64, 4 / 48, 40 / 64, 30 / 48)
    answers = engine.generate(records[:3], max_new_tokens=MAX_NEW_TOKENS)
    assert answers[0] == engine.caption([CaptionRequest(image, box)], max_new_tokens=MAX_NEW_TOKENS)[0].text
    assert all(isinstance(a, str) for a in answers)


def test_no_object_detected_is_an_empty_caption(engine, monkeypatch):
    assert answer_text("No object detected.") == ""
    assert answer_text("No object detected.<loc_1><loc_2><loc_3><loc_4>") == ""
    assert answer_text("a dog<loc_1><loc_2><loc_3><loc_4>") == "a dog"
    assert answer_text("a <loc_1> dog ") == "a dog"

    # The random model is made to say it (each step may pick only the next token of the answer), so the
    # whole path from generated ids to the answer is the engine's own.
    box, image = BOXES[0], IMAGES[0]
    generate = engine.model.generate
    for said, expected in [("a red circle", "a red circle"), ("No object detected.", "")]:
        ids = engine.tokenizer(said + engine.locations(box, image.size))["input_ids"]

        def saying(ids=ids, **kwargs):
            def only_next(_row, sofar):
                return [ids[min(len(sofar) - 1, len(ids) - 1)]]

            return generate(**kwargs, prefix_allowed_tokens_fn=only_next)

        monkeypatch.setattr(engine.model, "generate", saying)
        [answer] = engine.caption([CaptionRequest(image, box)], max_new_tokens=16)
        assert answer.text == expected
        assert 0.0 < answer.confidence < 1.0


def test_weights_are_saved_in_the_dtype_they_were_stored_in(checkpoint, tmp_path):
    engine = Florence2Engine.from_pretrained(checkpoint, dtype="bfloat16")
    assert engine.model.dtype == torch.bfloat16
    engine.save_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["dtype"] == "float32"
    with safe_open(tmp_path / "saved" / "model.safetensors", "pt") as weights:
        assert all(weights.get_slice(name).get_dtype() == "F32" for name in weights.keys())  # noqa: SIM118
    assert Florence2Engine.from_pretrained(tmp_path / "saved").stored_dtype == torch.float32
