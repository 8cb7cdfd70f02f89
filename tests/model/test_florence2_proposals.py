"""Florence-2 proposes regions as the processor decodes them: on a tiny random checkpoint made to say known
answers (and left to say what it likes among location tokens and label words), every proposed box and polygon
is the processor's own `post_process_generation` of the same generated text, and every score is the geometric
mean of the model's probabilities of that region's tokens."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import Florence2ForConditionalGeneration, Florence2Processor

from model.engine import EngineError, Proposal, ProposalRequest
from model.florence2.engine import (
    DETECTION_TASK,
    GROUNDING_TASK,
    SEGMENTATION_TASK,
    Florence2Engine,
    match_label,
)
from tests.support.florence2_factory import NUM_LOCATIONS, save_tiny_florence2


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_tiny_florence2(tmp_path_factory.mktemp("florence2-proposals") / "tiny")


@pytest.fixture(scope="module")
def direct(checkpoint):
    return (Florence2ForConditionalGeneration.from_pretrained(checkpoint).eval(),
            Florence2Processor.from_pretrained(checkpoint))


@pytest.fixture
def engine(checkpoint) -> Florence2Engine:
    return Florence2Engine.from_pretrained(checkpoint)


def noise(seed: int, size: tuple[int, int] = (80, 60)) -> Image.Image:
    width, height = size
    return Image.fromarray(np.random.RandomState(seed).randint(0, 255, (height, width, 3), dtype=np.uint8))


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
    image = noise(0)
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
    image = noise(3)
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
    image = noise(4)
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
    searches = engine.proposal_searches(ProposalRequest(noise(0), ("a", "b", "c")))
    assert [s.labels for s in searches] == [("a", "b"), ("c",)]
    with pytest.raises(EngineError, match="shape"):
        ProposalRequest(noise(0), ("a",), shape="ellipse")
