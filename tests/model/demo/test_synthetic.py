"""The synthetic shapes data (model/synthetic.py): deterministic, faithful to its pixels, unambiguous."""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from itertools import product
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model.data_format import read_jsonl
from model.demo import synthetic
from model.demo.synthetic import (
    COLORS,
    MIN_LARGER_RATIO,
    PALETTE,
    QUESTION_ATTRIBUTES,
    SHAPES,
    SIZE_FRACTIONS,
    SIZES,
    TEXTURES,
    ObjectSpec,
    caption_mentions,
    corpus_texts,
    generate_dataset,
    image_seed,
    make_caption,
    make_image,
    parse_caption,
)
from model.gpt4roi.prompts import RELATIONS, attribute_question, caption_question, relation_question

SCENES = range(150)


def folder_digest(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="module")
def train_split(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_dataset(tmp_path_factory.mktemp("shapes"), 60, seed=7, split_name="train", workers=1)


@pytest.fixture(scope="module")
def scenes() -> list[tuple[Image.Image, list[ObjectSpec]]]:
    return [make_image(seed) for seed in SCENES]


def hues(rgb: np.ndarray) -> np.ndarray:
    """HSV hue in [0, 1) of each (..., 3) RGB value."""
    rgb = np.asarray(rgb, dtype=np.float64)
    high, low = rgb.max(axis=-1), rgb.min(axis=-1)
    span = np.maximum(high - low, 1e-9)
    r, g, b = np.moveaxis(rgb, -1, 0)
    hue = np.where(high == r, (g - b) / span, np.where(high == g, 2 + (b - r) / span, 4 + (r - g) / span))
    return (hue / 6) % 1.0


PALETTE_HUES = hues(np.array([PALETTE[name] for name in COLORS]))


def nearest_hue_colors(rgb: np.ndarray) -> np.ndarray:
    """Per RGB value, the palette colour of closest hue: textures darken a colour but keep its hue."""
    distance = np.abs(hues(rgb)[..., None] - PALETTE_HUES)
    return np.asarray(COLORS)[np.minimum(distance, 1 - distance).argmin(axis=-1)]


# ------------------------------------------------------------- determinism
def test_the_same_seed_writes_byte_identical_splits(tmp_path: Path) -> None:
    first = generate_dataset(tmp_path / "a", 12, seed=3, split_name="train", workers=1)
    second = generate_dataset(tmp_path / "b", 12, seed=3, split_name="train", workers=1)
    assert folder_digest(first.parent) == folder_digest(second.parent)
    assert len(folder_digest(first.parent)) == 13  # 12 PNGs and the JSONL


def test_worker_processes_write_the_same_bytes_as_one_process(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(synthetic, "_IMAGES_PER_WORKER_START", 1)  # let a small split use two processes
    serial = generate_dataset(tmp_path / "serial", 10, seed=5, split_name="heldout", workers=1)
    parallel = generate_dataset(tmp_path / "parallel", 10, seed=5, split_name="heldout", workers=2)
    assert folder_digest(serial.parent) == folder_digest(parallel.parent)


def test_different_seeds_draw_different_scenes(tmp_path: Path) -> None:
    train = generate_dataset(tmp_path, 10, seed=0, split_name="train", workers=1)
    heldout = generate_dataset(tmp_path, 10, seed=1, split_name="heldout", workers=1)

    def digests(split: str) -> set[str]:
        return {hashlib.sha256(p.read_bytes()).hexdigest() for p in (train.parent / "images" / split).iterdir()}

    assert len(digests("train")) == 10
    assert not digests("train") & digests("heldout")
    assert heldout.name == "heldout.jsonl"


def test_make_image_is_a_pure_function_of_its_seed() -> None:
    image_a, objects_a = make_image(42)
    image_b, objects_b = make_image(42)
    image_c, _ = make_image(43)
    assert image_a.tobytes() == image_b.tobytes() and objects_a == objects_b
    assert image_a.tobytes() != image_c.tobytes()


# ------------------------------------------------------------ ground truth
def test_scenes_have_two_to_five_objects_of_the_documented_vocabulary(scenes) -> None:
    for image, objects in scenes:
        assert image.mode == "RGB" and 96 <= image.width <= 128 and 96 <= image.height <= 128
        assert 2 <= len(objects) <= 5
        for obj in objects:
            assert (obj.shape, obj.color, obj.size, obj.texture) in set(product(SHAPES, COLORS, SIZES, TEXTURES))
    counts = Counter(len(objects) for _, objects in scenes)
    assert set(counts) == {2, 3, 4, 5}


def test_every_attribute_value_occurs_often(scenes) -> None:
    objects = [obj for _, objs in scenes for obj in objs]
    for attribute, values in (("shape", SHAPES), ("color", COLORS), ("size", SIZES), ("texture", TEXTURES)):
        counts = Counter(getattr(obj, attribute) for obj in objects)
        share = {value: counts[value] / len(objects) for value in values}
        assert min(share.values()) > 0.5 / len(values), (attribute, share)


def test_boxes_are_inside_the_image_and_sized_by_their_class(scenes) -> None:
    for image, objects in scenes:
        scale = math.sqrt(image.width * image.height)
        for obj in objects:
            x1, y1, x2, y2 = obj.box
            assert 0 <= x1 < x2 <= image.width and 0 <= y1 < y2 <= image.height
            low, high = SIZE_FRACTIONS[obj.size]
            assert low - 0.01 <= (x2 - x1) / scale <= high + 0.01, obj
            assert x2 - x1 == pytest.approx(y2 - y1, abs=0.01)


def test_the_pixel_at_an_objects_centre_has_its_colour_unless_something_lies_on_top(scenes) -> None:
    checked = 0
    for image, objects in scenes:
        pixels = np.asarray(image, dtype=np.float64)
        for index, obj in enumerate(objects):
            cx, cy = obj.center
            covered = any(
                above.box[0] <= cx <= above.box[2] and above.box[1] <= cy <= above.box[3]
                for above in objects[index + 1 :]
            )
            if covered:
                continue
            assert nearest_hue_colors(pixels[int(cy), int(cx)]) == obj.color, (obj, pixels[int(cy), int(cx)])
            checked += 1
    assert checked > 300


def test_texture_is_the_share_of_darkened_pixels_and_every_painted_pixel_keeps_the_hue(scenes) -> None:
    dark_share: dict[str, list[float]] = {texture: [] for texture in TEXTURES}
    for image, objects in scenes:
        pixels = np.asarray(image, dtype=np.float64)
        for obj in objects:
            if any(synthetic._boxes_overlap(obj.box, other.box) for other in objects if other is not obj):
                continue  # alone in its box: every saturated pixel there is this object's
            x1, y1, x2, y2 = obj.box
            window = pixels[math.floor(y1) : math.ceil(y2), math.floor(x1) : math.ceil(x2)].reshape(-1, 3)
            saturation = (window.max(axis=1) - window.min(axis=1)) / np.maximum(window.max(axis=1), 1)
            painted = window[saturation > 0.4]  # backgrounds are desaturated (at most 0.15)
            assert len(painted) > 0.3 * (x2 - x1) * (y2 - y1)
            named = Counter(nearest_hue_colors(painted).tolist())
            assert named[obj.color] >= 0.97 * len(painted), (obj, named)
            brightness = painted.sum(axis=1) / np.sum(PALETTE[obj.color])
            dark_share[obj.texture].append(float(np.mean(brightness < 0.6)))
    assert all(len(shares) >= 30 for shares in dark_share.values())
    assert max(dark_share["solid"]) < 0.02
    assert 0.08 < min(dark_share["dotted"]) <= max(dark_share["dotted"]) < 0.35
    assert 0.35 < min(dark_share["striped"]) <= max(dark_share["striped"]) < 0.65


def test_no_object_is_hidden_by_more_than_30_percent_as_measured_on_the_pixels(scenes) -> None:
    measured_against_reported = []
    for image, objects in scenes:
        pixels = np.asarray(image, dtype=np.float64)
        for obj in objects:
            assert obj.visible_fraction >= 0.7, obj
            if any(o.color == obj.color and synthetic._boxes_overlap(obj.box, o.box) for o in objects if o is not obj):
                continue  # same-coloured neighbours would be counted as this object's pixels
            x1, y1, x2, y2 = obj.box
            window = pixels[math.floor(y1) : math.ceil(y2), math.floor(x1) : math.ceil(x2)].reshape(-1, 3)
            saturation = (window.max(axis=1) - window.min(axis=1)) / np.maximum(window.max(axis=1), 1)
            shown = np.sum((saturation > 0.4) & (nearest_hue_colors(window) == obj.color))
            expected = synthetic._UNIT_AREA[obj.shape] * (x2 - x1) * (y2 - y1)
            measured_against_reported.append((shown / expected, obj.visible_fraction))
    measured, reported = np.array(measured_against_reported).T
    # Counting whole pixels overestimates small shapes (their antialiased rims count fully), never much less.
    assert (reported - measured).max() < 0.1
    assert measured.min() > 0.7 - 0.1
    assert np.sum(reported < 1) >= 10  # objects do touch and overlap


def test_each_box_shows_mostly_its_own_object(scenes) -> None:
    worst = 0.0
    for image, objects in scenes:
        pixels = np.asarray(image, dtype=np.float64)
        for obj in objects:
            neighbours = [o for o in objects if o is not obj and synthetic._boxes_overlap(obj.box, o.box)]
            if not neighbours or any(o.color == obj.color for o in neighbours):
                continue
            x1, y1, x2, y2 = obj.box
            window = pixels[math.floor(y1) : math.ceil(y2), math.floor(x1) : math.ceil(x2)].reshape(-1, 3)
            saturation = (window.max(axis=1) - window.min(axis=1)) / np.maximum(window.max(axis=1), 1)
            names = nearest_hue_colors(window[saturation > 0.4])
            worst = max(worst, float(np.mean(names != obj.color)))
    assert 0 < worst <= 0.3


# ----------------------------------------------------------------- records
def test_each_object_gets_a_caption_and_every_attribute_question(train_split: Path) -> None:
    samples = read_jsonl(train_split)
    by_object = Counter(
        (s.image, s.meta["object"], s.meta.get("attribute", "caption")) for s in samples if s.meta["task"] != "relation"
    )
    objects = {(image, obj) for image, obj, _ in by_object}
    assert set(by_object) == {(i, o, q) for i, o in objects for q in ("caption", *QUESTION_ATTRIBUTES)}
    assert set(by_object.values()) == {1}


def test_records_agree_with_the_scene_make_image_draws_from_their_seed(train_split: Path) -> None:
    samples = read_jsonl(train_split)
    scenes: dict[int, list[ObjectSpec]] = {}
    for sample in samples:
        seed = sample.meta["image_seed"]
        if seed not in scenes:
            image, scenes[seed] = make_image(seed)
            assert np.array_equal(np.asarray(image), np.asarray(Image.open(sample.image).convert("RGB")))
        objects = scenes[seed]
        question, answer = (turn["value"] for turn in sample.conversations)
        if sample.meta["task"] == "relation":
            first, second = sample.meta["objects"]
            assert sample.boxes == [objects[first].box, objects[second].box]
            assert question == relation_question(sample.meta["relation"], 1, 2)
            continue
        obj = objects[sample.meta["object"]]
        assert sample.boxes == [obj.box]
        assert sample.meta["attributes"] == obj.attributes
        if sample.meta["task"] == "caption":
            assert question == caption_question(1)
            assert answer == f"a {obj.size} {obj.color} {obj.texture} {obj.shape}"
        else:
            attribute = sample.meta["attribute"]
            assert question == attribute_question(attribute, 1)
            assert answer == (obj.shape if attribute == "category" else getattr(obj, attribute))


def test_two_region_questions_are_asked_only_where_the_answer_is_clear(train_split: Path) -> None:
    samples = read_jsonl(train_split)
    attributes = {(s.image, s.meta["object"]): s.meta["attributes"] for s in samples if s.meta["task"] == "caption"}
    answers: dict[str, Counter[str]] = {relation: Counter() for relation in RELATIONS}
    for sample in (s for s in samples if s.meta["task"] == "relation"):
        (ax1, ay1, ax2, ay2), (bx1, by1, bx2, by2) = sample.boxes
        relation, answer = sample.meta["relation"], sample.conversations[1]["value"]
        answers[relation][answer] += 1
        if relation == "left_of":
            assert ax2 <= bx1 or bx2 <= ax1, "boxes overlap horizontally"
            assert answer == ("yes" if ax2 <= bx1 else "no")
        elif relation == "above":
            assert ay2 <= by1 or by2 <= ay1, "boxes overlap vertically"
            assert answer == ("yes" if ay2 <= by1 else "no")
        else:
            area_a, area_b = (ax2 - ax1) * (ay2 - ay1), (bx2 - bx1) * (by2 - by1)
            assert max(area_a, area_b) / min(area_a, area_b) >= MIN_LARGER_RATIO
            assert answer == ("region1" if area_a > area_b else "region2")
            first, second = (attributes[(sample.image, i)] for i in sample.meta["objects"])
            assert first["size"] != second["size"]
            assert (SIZES.index(first["size"]) > SIZES.index(second["size"])) == (answer == "region1")
    for relation, counts in answers.items():
        assert sum(counts.values()) >= 20, (relation, counts)
        assert max(counts.values()) / sum(counts.values()) < 0.7, (relation, counts)


def test_every_question_and_answer_of_a_split_is_in_the_tokenizer_corpus(train_split: Path) -> None:
    corpus = set(corpus_texts())
    for sample in read_jsonl(train_split):
        for turn in sample.conversations:
            assert turn["value"] in corpus


def test_the_corpus_covers_the_full_vocabulary_and_the_conversation_scaffolding() -> None:
    text = "\n".join(corpus_texts())
    for word in (*SHAPES, *COLORS, *SIZES, *TEXTURES, "yes", "no", "region1", "region2"):
        assert word in text
    assert "### Human: The <image> provides an overview of the picture." in text
    assert "### Assistant:" in text


# ---------------------------------------------------------------- hold-back
def test_excluded_shapes_and_colours_never_appear(tmp_path: Path) -> None:
    path = generate_dataset(
        tmp_path, 30, seed=11, split_name="train", exclude_shapes=["cross"], exclude_colors=("purple",), workers=1
    )
    samples = read_jsonl(path)
    attributes = [s.meta["attributes"] for s in samples if s.meta["task"] == "caption"]
    assert len(attributes) >= 60
    assert {a["shape"] for a in attributes} == set(SHAPES) - {"cross"}
    assert {a["color"] for a in attributes} == set(COLORS) - {"purple"}
    assert not any("cross" in t["value"] or "purple" in t["value"] for s in samples for t in s.conversations)


def test_only_shapes_draws_nothing_but_the_held_back_concept() -> None:
    for seed in range(20):
        _, objects = make_image(seed, only_shapes=["star"])
        assert {obj.shape for obj in objects} == {"star"}


def test_unknown_or_empty_vocabularies_are_refused_with_the_known_names() -> None:
    with pytest.raises(ValueError, match=r"exclude_shapes: unknown shapes \['hexagon'\]; known shapes: \['circle'"):
        make_image(0, exclude_shapes=["hexagon"])
    with pytest.raises(ValueError, match="no colors left to draw"):
        make_image(0, exclude_colors=COLORS)
    with pytest.raises(TypeError, match="collection of names, not the string 'star'"):
        make_image(0, only_shapes="star")


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        ({"n_images": 0}, "n_images must be a positive integer"),
        ({"split_name": "../escape"}, "split_name must be a plain file name"),
        ({"tasks": ["captions"]}, r"tasks must be some of \['caption', 'attribute', 'relation'\]"),
        ({"image_size": 20}, "width must be an integer between 48 and 4096"),
        ({"image_size": (200, 60)}, "aspect ratio above 2"),
        ({"seed": -1}, "seed must be a non-negative integer"),
        ({"min_objects": 3, "max_objects": 2}, "need 1 <= min_objects <= max_objects"),
    ],
)
def test_bad_generation_settings_fail_before_writing_anything(tmp_path: Path, kwargs: dict, problem: str) -> None:
    settings = {"n_images": 2, "seed": 0, "split_name": "train"} | kwargs
    with pytest.raises(ValueError, match=problem):
        generate_dataset(tmp_path / "out", workers=1, **settings)
    assert not (tmp_path / "out").exists()


def test_a_fixed_image_size_is_respected(tmp_path: Path) -> None:
    path = generate_dataset(tmp_path, 3, seed=0, split_name="square", image_size=100, workers=1)
    assert {(s.width, s.height) for s in read_jsonl(path)} == {(100, 100)}
    assert all(Image.open(p).size == (100, 100) for p in (tmp_path / "images" / "square").iterdir())


def test_image_seeds_fit_a_json_number_exactly_and_differ_per_index_and_split() -> None:
    seeds = {image_seed(split, index) for split in range(3) for index in range(1000)}
    assert len(seeds) == 3000
    assert max(seeds) < 2**53


# ----------------------------------------------------------------- captions
def test_parse_caption_round_trips_every_caption() -> None:
    for size, color, texture, shape in product(SIZES, COLORS, TEXTURES, SHAPES):
        truth = {"size": size, "color": color, "texture": texture, "shape": shape}
        assert parse_caption(make_caption(truth)) == truth


def test_parse_caption_ignores_case_punctuation_and_other_words() -> None:
    assert parse_caption("A LARGE, red striped circle.") == {
        "size": "large",
        "color": "red",
        "texture": "striped",
        "shape": "circle",
    }
    assert parse_caption("it is a green thing") == {"color": "green"}
    assert parse_caption("nothing here") == {}


def test_an_attribute_named_twice_with_different_values_is_not_parsed() -> None:
    assert caption_mentions("a red blue circle") == {"color": ["red", "blue"], "shape": ["circle"]}
    assert parse_caption("a red blue circle") == {"shape": "circle"}
    assert parse_caption("a red circle, a red one") == {"color": "red", "shape": "circle"}


def test_make_caption_refuses_unknown_values() -> None:
    with pytest.raises(ValueError, match=r"unknown color 'teal'"):
        make_caption({"size": "small", "color": "teal", "texture": "solid", "shape": "circle"})
    with pytest.raises(ValueError, match="missing texture"):
        make_caption({"size": "small", "color": "red", "shape": "circle"})
