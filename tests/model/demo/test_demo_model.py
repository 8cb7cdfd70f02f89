"""The demo GPT4RoI (trained by `python -m model.demo` on synthetic shapes) answers about the box it is
given: real learned behaviour, checked on scenes it never saw."""

from __future__ import annotations

import pytest

from model.demo import HELD_OUT_SHAPE, ensure_demo_checkpoint
from model.demo.synthetic import COLORS, make_image, parse_caption
from model.gpt4roi.inference import RegionAnnotator, RegionQuery
from model.gpt4roi.prompts import attribute_question, caption_question

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def annotator() -> RegionAnnotator:
    return RegionAnnotator.from_pretrained(ensure_demo_checkpoint())


def scenes_with_two_colours(count: int, start_seed: int = 9000):
    """Unseen scenes (seeds far from the training split's) whose first two objects differ in colour."""
    seed = start_seed
    while count:
        image, objects = make_image(seed, exclude_shapes=[HELD_OUT_SHAPE])
        seed += 1
        if objects[0].color != objects[1].color:
            count -= 1
            yield image, objects


def normalized(box, image):
    x1, y1, x2, y2 = box
    return (x1 / image.width, y1 / image.height, x2 / image.width, y2 / image.height)


def test_two_objects_in_one_image_get_their_own_colours(annotator):
    right = total = 0
    for image, objects in scenes_with_two_colours(10):
        queries = [RegionQuery(image, (normalized(o.box, image),), attribute_question("color")) for o in objects[:2]]
        answers = annotator.answer(queries)
        right += sum(a == o.color for a, o in zip(answers, objects[:2], strict=True))
        total += 2
    assert right / total >= 0.9, f"{right}/{total} colours right"


def test_answers_follow_the_boxes_when_they_are_shuffled(annotator):
    followed = total = 0
    for image, objects in scenes_with_two_colours(8, start_seed=9500):
        a, b = (normalized(o.box, image) for o in objects[:2])
        question = attribute_question("color")
        straight = annotator.answer([RegionQuery(image, (a,), question), RegionQuery(image, (b,), question)])
        swapped = annotator.answer([RegionQuery(image, (b,), question), RegionQuery(image, (a,), question)])
        followed += swapped == straight[::-1] and straight[0] != straight[1]
        total += 1
    assert followed / total >= 0.75, f"answers followed the boxes in {followed}/{total} scenes"


def test_colour_scores_put_the_true_colour_first(annotator):
    right = total = 0
    for image, objects in scenes_with_two_colours(6, start_seed=9800):
        queries = [RegionQuery(image, (normalized(o.box, image),), attribute_question("color")) for o in objects[:2]]
        for scores, obj in zip(annotator.score(queries, [list(COLORS)] * 2), objects[:2], strict=True):
            right += max(scores, key=scores.get) == obj.color
            total += 1
    assert right / total >= 0.9


def test_captions_name_the_colour_of_the_object_in_the_box(annotator):
    right = total = 0
    for image, objects in scenes_with_two_colours(20, start_seed=9900):
        queries = [RegionQuery(image, (normalized(o.box, image),), caption_question()) for o in objects[:2]]
        for caption, obj in zip(annotator.answer(queries), objects[:2], strict=True):
            right += parse_caption(caption).get("color") == obj.color
            total += 1
    assert right / total >= 0.85, f"{right}/{total} captions named the right colour"
