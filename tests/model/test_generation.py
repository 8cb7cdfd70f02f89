"""Batched generation and scoring behave exactly like one prompt at a time, on a real (tiny) GPT4RoI."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

from model.gpt4roi import generation
from model.gpt4roi.generation import answer_ids, answer_log_likelihood, answer_tokens, generation_prompt
from model.gpt4roi.inference import RegionAnnotator, RegionQuery
from model.gpt4roi.processing_gpt4roi import IGNORE_INDEX, GPT4RoIProcessor, sanitize_boxes
from model.gpt4roi.prompts import attribute_question, caption_question, relation_question
from tests.support.model_factory import make_tiny_model, make_tokenizer


@pytest.fixture(scope="module")
def annotator() -> RegionAnnotator:
    tokenizer = make_tokenizer()
    model = make_tiny_model(tokenizer, seed=3)
    processor = GPT4RoIProcessor(tokenizer, model.config.image_size, model.config.num_image_tokens)
    return RegionAnnotator(model, processor, max_batch_size=3)


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    generator = torch.Generator().manual_seed(0)
    pixels = [(torch.rand(48, 64, 3, generator=generator) * 255).to(torch.uint8).numpy() for _ in range(2)]
    return [Image.fromarray(p) for p in pixels]


def queries(images) -> list[RegionQuery]:
    a, b = images
    return [
        RegionQuery(a, ((0.1, 0.1, 0.5, 0.6),), caption_question()),
        RegionQuery(a, ((0.5, 0.3, 0.95, 0.9),), attribute_question("color")),
        RegionQuery(b, ((0.0, 0.0, 1.0, 1.0),), attribute_question("shape")),
        RegionQuery(b, ((0.2, 0.2, 0.4, 0.4), (0.6, 0.5, 0.9, 0.8)), relation_question("left_of")),
        RegionQuery(a, ((0.3, 0.3, 0.7, 0.7),), caption_question()),
    ]


def test_batched_answers_equal_one_at_a_time(annotator, images):
    batch = queries(images)
    together = annotator.answer(batch, max_new_tokens=6)
    alone = [annotator.answer([q], max_new_tokens=6)[0] for q in batch]
    assert together == alone


def test_greedy_generation_with_cache_matches_full_forward(annotator, images):
    query = queries(images)[0]
    tokenizer, model = annotator.tokenizer, annotator.model
    prompt_ids = tokenizer.encode(annotator.processor.expand_image_tokens(generation_prompt(query.question)))
    pixels = annotator.processor.preprocess_images([query.image])
    boxes = [torch.tensor(query.boxes)]
    ids = list(prompt_ids)
    with torch.no_grad():
        features = model.encode_images(pixels)
        for _ in range(5):
            logits = model(input_ids=torch.tensor([ids]), boxes=boxes, image_features=features).logits
            ids.append(int(logits[0, -1].argmax()))
    expected = tokenizer.decode(ids[len(prompt_ids):])
    from model.gpt4roi.prompts import parse_answer

    assert annotator.answer([query], max_new_tokens=5)[0] == parse_answer(expected)


def test_an_answers_confidence_is_the_geometric_mean_of_its_tokens_probabilities(annotator, images):
    query = queries(images)[0]
    tokenizer, model = annotator.tokenizer, annotator.model
    ids = tokenizer.encode(annotator.processor.expand_image_tokens(generation_prompt(query.question)))
    pixels = annotator.processor.preprocess_images([query.image])
    log_probs = []
    with torch.no_grad():
        features = model.encode_images(pixels)
        for _ in range(5):  # the random tiny model never says the stop string this soon
            logits = model(input_ids=torch.tensor([ids]), boxes=[torch.tensor(query.boxes)],
                           image_features=features).logits[0, -1].float()
            ids.append(int(logits.argmax()))
            log_probs.append(float(torch.log_softmax(logits, -1).max()))
    [answer] = annotator.answer_with_confidence([query], max_new_tokens=5)
    assert answer.text == annotator.answer([query], max_new_tokens=5)[0]
    assert answer.confidence == pytest.approx(math.exp(sum(log_probs) / len(log_probs)), rel=1e-4)
    assert 0.0 < answer.confidence <= 1.0
    together = annotator.answer_with_confidence(queries(images), max_new_tokens=5)
    assert together[0].confidence == pytest.approx(answer.confidence, rel=1e-4)


def test_scores_are_distributions_and_independent_of_batching(annotator, images):
    batch = queries(images)[:3]
    options = [["red", "blue"], ["red", "green", "blue"], ["circle", "square", "triangle", "star"]]
    together = annotator.score(batch, options)
    alone = [annotator.score([q], [o])[0] for q, o in zip(batch, options, strict=True)]
    for scores, single, opts in zip(together, alone, options, strict=True):
        assert list(scores) == opts
        assert sum(scores.values()) == pytest.approx(1.0, abs=1e-5)
        for option in opts:
            assert scores[option] == pytest.approx(single[option], abs=1e-4)


def test_the_same_region_can_be_referenced_twice(annotator, images):
    box = (0.2, 0.2, 0.6, 0.7)
    query = RegionQuery(images[0], (box, box), relation_question("left_of"))
    assert isinstance(annotator.answer([query], max_new_tokens=3)[0], str)


def test_a_box_count_that_does_not_match_the_prompt_is_a_clear_error(annotator, images):
    query = RegionQuery(images[0], ((0.1, 0.1, 0.5, 0.5), (0.5, 0.5, 0.9, 0.9)), caption_question())
    with pytest.raises(ValueError, match=r"1 <bbox> token\(s\) but 2 box\(es\)"):
        annotator.answer([query])


def test_each_image_is_encoded_once_and_then_served_from_the_cache(annotator, images):
    annotator._cache.clear()
    hits, misses = annotator.cache_hits, annotator.cache_misses
    annotator.answer(queries(images), max_new_tokens=2)
    assert annotator.cache_misses - misses == 2
    annotator.answer(queries(images)[:1], max_new_tokens=2)
    assert annotator.cache_misses - misses == 2 and annotator.cache_hits > hits


def test_an_image_is_hashed_once_while_a_derived_or_equal_copy_gets_its_own_lookup(annotator, images, monkeypatch):
    image = images[0].copy()
    key = annotator.image_key(image)
    monkeypatch.setattr(type(image), "tobytes", lambda *_: pytest.fail("the same object was hashed again"))
    assert annotator.image_key(image) == key
    monkeypatch.undo()
    assert annotator.image_key(image.copy()) == key  # equal pixels, same features
    assert annotator.image_key(image.resize((image.width // 2, image.height // 2))) != key


def test_region_embeddings_follow_the_box(annotator, images):
    pixels = annotator.processor.preprocess_images(images[:1])
    with torch.no_grad():
        left, right = annotator.model.encode_regions(pixels, [torch.tensor([[0, 0, 0.5, 1], [0.5, 0, 1, 1]])])[0]
    assert not torch.allclose(left, right)


# ---------------------------------------------------------------------------------------- packed scoring
def scoring_cases(images) -> tuple[list[RegionQuery], list[list[str]]]:
    """Several regions and questions, 2 to 7 candidates (more than the fixture's max_batch_size of 3, so a
    question's candidates span rows), multi-token candidates and candidates that are prefixes of others."""
    a, b = images
    left, right, small = (0.1, 0.1, 0.5, 0.6), (0.5, 0.3, 0.95, 0.9), (0.6, 0.1, 0.75, 0.3)
    colors = ["red", "red circle", "red striped circle", "green", "blue", "yellow", "purple"]
    cases = [
        (RegionQuery(a, (left,), attribute_question("color")), colors),
        (RegionQuery(a, (left,), attribute_question("size")), ["small", "medium", "large"]),
        (RegionQuery(a, (right,), attribute_question("texture")), ["solid", "striped", "dotted"]),
        (RegionQuery(b, (small,), attribute_question("category")), ["circle", "square", "triangle", "star", "cross"]),
        (RegionQuery(b, (small,), attribute_question("color")), colors[:4]),
        (RegionQuery(b, (left, small), relation_question("left_of")), ["yes", "no"]),
        (RegionQuery(a, (right,), caption_question()), ["a large red circle", "a large red", "a small blue star"]),
    ]
    return [q for q, _ in cases], [c for _, c in cases]


def full_sequence_log_likelihood(annotator: RegionAnnotator, query: RegionQuery, candidate: str) -> float:
    """The reference: the whole prompt + ` {candidate}\\n###` through the model, no cache, no packing."""
    model, processor = annotator.model, annotator.processor
    ids, labels = answer_ids(annotator.tokenizer, processor.expand_image_tokens(generation_prompt(query.question)),
                             candidate)
    with torch.no_grad():
        features = model.encode_images(processor.preprocess_images([query.image]))
        logits = model(input_ids=torch.tensor([ids]), boxes=[sanitize_boxes(query.boxes)],
                       image_features=features).logits[0].float()
    targets = torch.tensor(labels[1:])
    scored = targets != IGNORE_INDEX
    return float(logits[:-1][scored].log_softmax(-1).gather(-1, targets[scored][:, None]).sum())


def test_packed_scoring_matches_full_sequences_without_cache(annotator, images):
    queries, candidates = scoring_cases(images)
    cases = list(zip(queries, candidates, strict=True))
    features, image_index, boxes = annotator._prepare(queries)
    assert features.prefix_kv is not None  # the image prefix comes from the per-image cache
    packed = answer_log_likelihood(
        annotator.model, annotator.tokenizer, [annotator._prompt_ids(q.question) for q in queries],
        [[annotator._answer_ids(q.question, c) for c in options] for q, options in cases],
        boxes, features, image_index,
    )
    reference = [full_sequence_log_likelihood(annotator, q, c) for q, options in cases for c in options]
    assert packed.tolist() == pytest.approx(reference, abs=1e-4)
    # A candidate that is a prefix of another is scored as itself, not as the longer one's start.
    assert len({round(x, 3) for x in packed[:3].tolist()}) == 3


def test_score_distributions_are_softmaxes_of_the_full_sequence_log_likelihoods(annotator, images):
    queries, candidates = scoring_cases(images)
    distributions = annotator.score(queries, candidates)
    for query, options, scores in zip(queries, candidates, distributions, strict=True):
        reference = torch.tensor([full_sequence_log_likelihood(annotator, query, c) for c in options])
        expected = torch.softmax(reference, dim=0).tolist()
        assert list(scores) == options
        assert list(scores.values()) == pytest.approx(expected, abs=1e-5)
        assert max(scores, key=scores.get) == options[int(reference.argmax())]


def test_each_answer_in_a_packed_row_sees_only_the_prompt_and_itself(annotator, images):
    query = scoring_cases(images)[0][0]
    features, image_index, boxes = annotator._prepare([query])
    prompt = [annotator._prompt_ids(query.question)]

    def scores(options: list[str]) -> list[float]:
        answers = [[annotator._answer_ids(query.question, c) for c in options]]
        return answer_log_likelihood(annotator.model, annotator.tokenizer, prompt, answers, boxes, features,
                                     image_index).tolist()

    alone = [scores([c])[0] for c in ("red", "red circle", "blue")]
    assert scores(["red", "red circle", "blue"]) == pytest.approx(alone, abs=1e-5)
    assert scores(["blue", "red circle", "red"]) == pytest.approx(alone[::-1], abs=1e-5)


# ------------------------------------------------------------------------------- broken characters
BROKEN_ENDINGS = {
    # pieces generated after "▁a ▁ r e d" → the caption
    "broken bytes, then the stop string split over two tokens": (["<0xE2>", "<0x98>", "\n##", "#"], "a red"),
    "broken bytes, a newline token, then the stop string": (["<0xE2>", "<0x98>", "\n", "##", "#"], "a red"),
    "a broken byte, a byte-fallback newline, then # # #": (["<0xE2>", "<0x0A>", "#", "#", "#"], "a red"),
    "broken bytes, then EOS": (["<0xE2>", "<0x98>", "</s>"], "a red"),
    "broken bytes at the token budget": (["<0xE2>", "<0x98>"], "a red"),
    "a whole character is kept": (["<0xE2>", "<0x98>", "<0x95>", "\n##", "#"], "a red☕"),
    "a '#' that is not the stop string is kept": (["▁", "#", "\n##", "#"], "a red #"),
}


@pytest.mark.parametrize("ending", list(BROKEN_ENDINGS))
def test_a_caption_never_ends_in_a_broken_character(annotator, images, monkeypatch, ending):
    pieces, expected = BROKEN_ENDINGS[ending]
    script = annotator.tokenizer.convert_tokens_to_ids(["▁a", "▁", "r", "e", "d", *pieces])
    assert annotator.tokenizer.unk_token_id not in script
    steps = iter(script)
    monkeypatch.setattr(generation, "_pick", lambda logits, config: torch.tensor([next(steps)]))
    query = RegionQuery(images[0], ((0.1, 0.1, 0.5, 0.6),), caption_question())
    caption = annotator.answer([query], max_new_tokens=len(script))[0]
    assert caption == expected and "\ufffd" not in caption


def test_answer_tokens_are_those_before_the_stop_string(annotator):
    tokenizer = annotator.tokenizer
    answer = tokenizer.encode("a red", add_bos=False)
    for stop in (["\n##", "#"], ["\n", "##", "#"], ["#", "#", "#"]):
        assert answer_tokens(tokenizer, answer + tokenizer.convert_tokens_to_ids(stop)) == answer
