"""Batched generation and scoring behave exactly like one prompt at a time, on a real (tiny) GPT4RoI."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from model.generation import generation_prompt
from model.inference import RegionAnnotator, RegionQuery
from model.processing_gpt4roi import GPT4RoIProcessor
from model.prompts import attribute_question, caption_question, relation_question
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
    from model.prompts import parse_answer

    assert annotator.answer([query], max_new_tokens=5)[0] == parse_answer(expected)


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
