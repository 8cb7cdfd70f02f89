"""The Florence-2 engine answers as the native transformers model does: its region prompts, captions and
candidate scores are checked against the model and processor used directly, on a tiny random checkpoint.

It proposes regions as the processor decodes them: made to say known answers (and left to say what it likes
among location tokens and label words), every proposed box and polygon is the processor's own
`post_process_generation` of the same generated text, and every score is the geometric mean of the model's
probabilities of that region's tokens."""

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
    EngineError,
    Example,
    FinetuneConfig,
    Proposal,
    ProposalRequest,
    engine_of_checkpoint,
    load_engine,
)
from model.florence2.engine import (
    DETECTION_TASK,
    ENGINE_FILE,
    GROUNDING_TASK,
    LEARNT_ATTRIBUTE_PROMPT,
    SEGMENTATION_TASK,
    Florence2Engine,
    answer_text,
    match_label,
)
from tests.support.florence2_factory import NUM_LOCATIONS, save_tiny_florence2

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


# ---------------------------------------------------------------------- proposals
PROPOSAL_IMAGE = (80, 60)


class Recorder:
    """Wraps the model's `generate`: keeps what it generated, and optionally restricts each step's tokens."""

    def __init__(self, engine: Florence2Engine, allowed=None):
        self.sequences: list[torch.Tensor] = []
        generate = engine.model.generate

        def recording(**kwargs):
            if allowed is not None:
                kwargs["prefix_allowed_tokens_fn"] = allowed
            out = generate(**kwargs)
            self.sequences.append(out.sequences)
            return out

        self.generate = recording


def saying(engine: Florence2Engine, said: str):
    """Each step may pick only the next token of `said` (then the end)."""
    ids = engine.tokenizer(said)["input_ids"]

    def only_next(_row, sofar):
        return [ids[min(len(sofar) - 1, len(ids) - 1)]]

    return ids, only_next


def direct_log_probs(model, processor, image, prompt: str, generated: list[int]) -> list[float]:
    """The model's log-probability of each generated token (after the decoder start), through the processor."""
    inputs = processor(text=[prompt], images=[image], return_tensors="pt")
    labels = torch.tensor([generated])
    with torch.no_grad():
        logits = model(**inputs, labels=labels).logits
    return F.log_softmax(logits[0].double(), -1).gather(-1, labels[0][:, None])[:, 0].tolist()


def score_of(log_probs: list[float]) -> float:
    return math.exp(sum(log_probs) / len(log_probs))


def test_grounded_boxes_are_the_processors_and_scored_by_their_own_tokens(engine, direct, monkeypatch):
    model, processor = direct
    image = noise(0, PROPOSAL_IMAGE)
    said = ("car<loc_100><loc_200><loc_300><loc_400>dog<loc_500><loc_10><loc_900><loc_600>"
            "<loc_50><loc_60><loc_70><loc_80>")
    ids, only_next = saying(engine, said)
    recorder = Recorder(engine, only_next)
    monkeypatch.setattr(engine.model, "generate", recorder.generate)

    [proposals] = engine.propose([ProposalRequest(image, ("car", "dog"), max_new_tokens=40)])

    [sequence] = recorder.sequences
    generated = sequence[0, 1:].tolist()
    assert generated[: len(ids)] == ids
    text = processor.batch_decode(sequence, skip_special_tokens=False)[0]
    expected = processor.post_process_generation(text, task=GROUNDING_TASK, image_size=image.size)[GROUNDING_TASK]
    assert len(expected["bboxes"]) == 3
    # The prompt holds both labels, as the processor writes a grounding prompt.
    prompt = processor._construct_prompts([GROUNDING_TASK + "car. dog"])[0]
    assert [s.text for s in engine.proposal_searches(ProposalRequest(image, ("car", "dog")))] == [prompt]

    log_probs = direct_log_probs(model, processor, image, prompt, generated[: len(ids) - 1])
    car = len(engine.tokenizer("car", add_special_tokens=False)["input_ids"])
    dog = len(engine.tokenizer("dog", add_special_tokens=False)["input_ids"])
    spans = [(1, 1 + car + 4), (1 + car + 4, 1 + car + 4 + dog + 4), (1 + car + 4 + dog + 4, 1 + car + dog + 12)]
    wanted = sorted(
        (Proposal(label, tuple(box), pytest.approx(score_of(log_probs[a:b]), rel=1e-4))
         for box, label, (a, b) in zip(expected["bboxes"], expected["labels"], spans, strict=True)),
        key=lambda p: p.score.expected, reverse=True)
    assert proposals == wanted
    assert [p.label for p in proposals if p.box == tuple(expected["bboxes"][0])] == ["car"]


def test_free_answers_decode_as_the_processor_does(engine, direct, monkeypatch):
    """The random model says what it likes in a phrase-then-box grammar: which word, which locations (left
    free, it would end at once or say words only)."""
    _, processor = direct
    words = [i for word in ("car", " car", "dog", " dog", " red")
             for i in engine.tokenizer(word, add_special_tokens=False)["input_ids"]]
    locations = engine.tokenizer.convert_tokens_to_ids([f"<loc_{i}>" for i in range(NUM_LOCATIONS)])

    def allowed(_row, sofar):
        if len(sofar) == 1:
            return [engine.tokenizer.bos_token_id]
        return words if (len(sofar) - 2) % 5 == 0 else locations

    recorder = Recorder(engine, allowed)
    monkeypatch.setattr(engine.model, "generate", recorder.generate)
    images = [noise(seed, (64 + 8 * seed, 48)) for seed in range(4)]
    requests = [ProposalRequest(image, ("car", "dog"), max_new_tokens=60) for image in images]
    answers = engine.propose(requests)
    [sequences] = recorder.sequences
    regions = 0
    for image, proposals, sequence in zip(images, answers, sequences, strict=True):
        text = processor.batch_decode([sequence], skip_special_tokens=False)[0]
        parsed = processor.post_process_generation(text, task=GROUNDING_TASK, image_size=image.size)[GROUNDING_TASK]
        expected = sorted((tuple(box), label) for box, label in zip(parsed["bboxes"], parsed["labels"], strict=True)
                          if match_label(label, ("car", "dog")))
        assert sorted((p.box, p.label) for p in proposals) == [(box, match_label(label, ("car", "dog")))
                                                               for box, label in expected]
        assert all(0.0 < p.score <= 1.0 for p in proposals)
        assert [p.score for p in proposals] == sorted((p.score for p in proposals), reverse=True)
        regions += len(proposals)
    assert regions >= 2, "the tiny model should ground some regions"


def test_detection_without_labels_names_objects_in_the_models_words(engine, direct, monkeypatch):
    _, processor = direct
    image = noise(3, PROPOSAL_IMAGE)
    _, only_next = saying(engine, "red circle<loc_1><loc_2><loc_300><loc_400>tree<loc_5><loc_6><loc_7><loc_8>")
    monkeypatch.setattr(engine.model, "generate", Recorder(engine, only_next).generate)
    assert [s.task for s in engine.proposal_searches(ProposalRequest(image))] == [DETECTION_TASK]
    [proposals] = engine.propose([ProposalRequest(image, max_new_tokens=30, max_regions=1)])
    text = "<s>red circle<loc_1><loc_2><loc_300><loc_400>tree<loc_5><loc_6><loc_7><loc_8></s>"
    parsed = processor.post_process_generation(text, task=DETECTION_TASK, image_size=image.size)[DETECTION_TASK]
    assert len(proposals) == 1, "max_regions keeps the best scored"
    assert (proposals[0].box, proposals[0].label) in {(tuple(box), label) for box, label in zip(
        parsed["bboxes"], parsed["labels"], strict=True)}


def test_polygons_come_from_referring_segmentation_one_label_per_prompt(engine, direct, monkeypatch):
    _, processor = direct
    image = noise(4, PROPOSAL_IMAGE)
    said = "<loc_100><loc_100><loc_500><loc_120><loc_450><loc_600><loc_120><loc_580>"
    _, only_next = saying(engine, said)
    recorder = Recorder(engine, only_next)
    monkeypatch.setattr(engine.model, "generate", recorder.generate)
    request = ProposalRequest(image, ("car", "dog"), shape="polygon", max_new_tokens=20)
    assert [(s.task, s.labels) for s in engine.proposal_searches(request)] == [
        (SEGMENTATION_TASK, ("car",)), (SEGMENTATION_TASK, ("dog",))]
    [proposals] = engine.propose([request])
    [sequences] = recorder.sequences
    text = processor.batch_decode(sequences[:1], skip_special_tokens=False)[0]
    parsed = processor.post_process_generation(text, task=SEGMENTATION_TASK, image_size=image.size)
    [[flat]] = parsed[SEGMENTATION_TASK]["polygons"]
    points = tuple(zip(flat[0::2], flat[1::2], strict=True))
    assert sorted(p.label for p in proposals) == ["car", "dog"]
    for proposal in proposals:
        assert proposal.polygon == points
        xs, ys = [x for x, _ in points], [y for _, y in points]
        assert proposal.box == (min(xs), min(ys), max(xs), max(ys))


def test_labels_are_grouped_per_prompt_and_phrases_matched_back():
    assert match_label("car", ("car", "dog")) == "car"
    assert match_label("A red Car", ("car", "red car", "dog")) == "red car"
    assert match_label("traffic-light", ("traffic light",)) == "traffic light"
    assert match_label("cart", ("car",)) is None
    assert match_label("", ("car",)) is None


def test_labels_per_prompt_is_an_engine_option(checkpoint):
    engine = Florence2Engine.from_pretrained(checkpoint, options={"labels_per_prompt": "2"})
    searches = engine.proposal_searches(ProposalRequest(noise(0, PROPOSAL_IMAGE), ("a", "b", "c")))
    assert [s.labels for s in searches] == [("a", "b"), ("c",)]
    with pytest.raises(EngineError, match="shape"):
        ProposalRequest(noise(0, PROPOSAL_IMAGE), ("a",), shape="ellipse")
