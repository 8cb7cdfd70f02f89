"""Synthetic shapes: images with a few objects, their ground truth, and region questions about them.

The project trains its demo GPT4RoI on this data, so everything here aims at questions with exactly one
right answer that a small model can read off a ~96 px image:

* every object has four attributes: a :data:`SIZES` class, a :data:`COLORS` colour, a :data:`TEXTURES`
  texture and a :data:`SHAPES` shape. Its box is the tight pixel box of the shape, always square in pixels
  and always inside the image.
* sizes are defined on the box side relative to the image scale ``sqrt(width * height)``, with gaps between
  the classes (:data:`SIZE_FRACTIONS`), so the class can be read from the normalized box alone.
* colours are saturated and well apart; backgrounds are desaturated (plain, gradient or lightly noisy), so
  no background is ever one of the colours. Textures darken the object's own colour (same hue), so a
  striped or dotted object keeps its colour name.
* objects may touch and overlap, but every object keeps at least ``1 - MAX_OCCLUSION`` of its pixels, its
  box shows mostly itself (other objects fill at most ``MAX_BOX_CLUTTER`` of what is visible in it) and no
  box lies more than half inside another.

Each image yields single-turn records in the format of :mod:`model.data_format`, with the question
templates of :mod:`model.gpt4roi.prompts`; region numbering starts at ``region1`` in every record:

* ``caption``: ``"a {size} {color} {texture} {shape}"``, e.g. ``"a large red striped circle"``;
* ``attribute``: color, shape, size, texture and category (the category is the shape's name);
* ``relation`` (two regions): ``left_of`` / ``above`` (yes/no) and ``larger`` (region1/region2), only
  where the answer is clear: boxes apart along the axis asked about, or size classes apart with both the
  box areas and the painted areas differing by at least :data:`MIN_LARGER_RATIO`.

Everything is deterministic in the seed (no global random state): the same seed gives the same bytes.
Splits for hold-back experiments leave shapes or colours out (``exclude_shapes``/``exclude_colors``) or
draw only some (``only_shapes``/``only_colors``). :func:`make_image` draws one scene with per-object
ground truth (for Label Studio tasks and simulated annotators); :func:`generate_dataset` writes a split::

    python -m model.demo.synthetic data/shapes --images 3000 --seed 0 --split train --exclude-shapes cross
"""

from __future__ import annotations

import colorsys
import math
import multiprocessing
import os
import re
import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from model.data_format import RegionSample, write_jsonl
from model.gpt4roi.prompts import (
    IMAGE_PREFIX,
    RELATIONS,
    SYSTEM_PROMPT,
    attribute_question,
    build_conversation,
    caption_question,
    relation_answer,
    relation_candidates,
    relation_question,
)

__all__ = [
    "ATTRIBUTES",
    "ATTRIBUTE_VALUES",
    "COLORS",
    "HELD_OUT_SHAPE",
    "MAX_BOX_CLUTTER",
    "MAX_OCCLUSION",
    "MIN_CENTRE_GAP",
    "MIN_LARGER_RATIO",
    "PALETTE",
    "QUESTION_ATTRIBUTES",
    "SHAPES",
    "SIZES",
    "SIZE_FRACTIONS",
    "TASKS",
    "TEXTURES",
    "ObjectSpec",
    "RegionQuestion",
    "caption_mentions",
    "corpus_texts",
    "generate_dataset",
    "image_seed",
    "make_caption",
    "make_image",
    "parse_caption",
    "region_records",
]

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
#: The shape the demo model never sees, so that a fine-tune on corrections has something new to learn.
HELD_OUT_SHAPE = "cross"
#: Saturated, far apart in RGB; the demo Label Studio configs offer exactly these names.
PALETTE: Mapping[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (35, 75, 220),
    "yellow": (240, 215, 30),
    "orange": (245, 135, 20),
    "purple": (135, 50, 185),
}
COLORS: tuple[str, ...] = tuple(PALETTE)
SIZES: tuple[str, ...] = ("small", "medium", "large")
TEXTURES: tuple[str, ...] = ("solid", "striped", "dotted")
#: Attributes of every object, in caption order.
ATTRIBUTES: tuple[str, ...] = ("size", "color", "texture", "shape")
#: What ``attribute_question`` asks about; ``category`` is answered with the shape's name, because that is
#: what a Label Studio RectangleLabels control holds.
QUESTION_ATTRIBUTES: tuple[str, ...] = ("color", "shape", "size", "texture", "category")
TASKS: tuple[str, ...] = ("caption", "attribute", "relation")

#: Box side / sqrt(image width * height) for each size class; the gaps keep neighbours apart by a side
#: ratio of at least 1.2 (an area ratio of at least 1.5).
SIZE_FRACTIONS: Mapping[str, tuple[float, float]] = {
    "small": (0.17, 0.22),
    "medium": (0.28, 0.35),
    "large": (0.43, 0.52),
}
#: Largest share of an object's pixels that objects drawn on top of it may cover.
MAX_OCCLUSION = 0.25
#: Largest share of the visible pixels inside an object's box that may belong to other objects.
MAX_BOX_CLUTTER = 0.25
#: "Which is larger" is asked only when box areas and painted areas both differ at least this much.
MIN_LARGER_RATIO = 1.5
#: "left of" / "above" is asked only when the boxes are apart along that axis and their centres are at
#: least this share of the image width/height apart.
MIN_CENTRE_GAP = 0.1

_DEFAULT_SIZE_RANGE = (96, 128)
_SUPERSAMPLE = 3
_STAR_INNER_RATIO = 0.5
_CROSS_ARM = 0.36
_DARK_FACTOR = 0.35
_COLOR_JITTER = 12
# Texture period (stripe period, dot spacing): a share of the object's side, kept within bounds relative to
# sqrt(width * height). About 7-10 px in a 112 px image, so still several pixels after the demo model's
# resize to 96 px, while small objects get a finer period and still show several stripes or dots.
_TEXTURE_PERIOD_SHARE = 0.28
_TEXTURE_PERIOD_RANGE = (0.065, 0.09)
_DOT_RADIUS_SHARE = 0.28
_PLACEMENT_TRIES = 40
# A worker process costs about a second to start; below this many images per worker it does not pay.
_IMAGES_PER_WORKER_START = 200

ATTRIBUTE_VALUES: Mapping[str, tuple[str, ...]] = {
    "size": SIZES,
    "color": COLORS,
    "texture": TEXTURES,
    "shape": SHAPES,
}
_ATTRIBUTE_OF_WORD: Mapping[str, str] = {
    word: attribute for attribute, words in ATTRIBUTE_VALUES.items() for word in words
}


# ------------------------------------------------------------------ objects
@dataclass(frozen=True)
class ObjectSpec:
    """Ground truth of one drawn object.

    ``box`` is the tight pixel ``(x1, y1, x2, y2)`` of the whole shape (also where it is partly covered),
    in continuous pixel coordinates: pixel column ``i`` spans ``[i, i + 1)``. ``visible_fraction`` is the
    share of the shape's pixels not covered by objects drawn after it. Objects are listed bottom to top.
    """

    shape: str
    color: str
    size: str
    texture: str
    box: tuple[float, float, float, float]
    visible_fraction: float

    @property
    def attributes(self) -> dict[str, str]:
        """The four attributes in caption order: size, color, texture, shape."""
        return {name: getattr(self, name) for name in ATTRIBUTES}

    @property
    def caption(self) -> str:
        """The reference caption, e.g. ``"a large red striped circle"``."""
        return make_caption(self.attributes)

    @property
    def center(self) -> tuple[float, float]:
        """Centre of the box in pixels."""
        x1, y1, x2, y2 = self.box
        return ((x1 + x2) / 2, (y1 + y2) / 2)

    def answer(self, attribute: str) -> str:
        """The answer to ``attribute_question(attribute)``; ``category`` is the shape."""
        if attribute == "category":
            return self.shape
        if attribute not in ATTRIBUTES:
            raise ValueError(f"unknown attribute {attribute!r}; expected one of {QUESTION_ATTRIBUTES}")
        return getattr(self, attribute)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (the box as a list)."""
        record = asdict(self)
        record["box"] = list(self.box)
        return record


def make_caption(attributes: Mapping[str, str]) -> str:
    """The caption for ``attributes`` (keys size, color, texture, shape): ``"a {size} {color} {texture} {shape}"``."""
    missing = [name for name in ATTRIBUTES if name not in attributes]
    if missing:
        raise ValueError(f"a caption needs {', '.join(ATTRIBUTES)}; missing {', '.join(missing)}")
    for name in ATTRIBUTES:
        if attributes[name] not in ATTRIBUTE_VALUES[name]:
            raise ValueError(f"unknown {name} {attributes[name]!r}; expected one of {ATTRIBUTE_VALUES[name]}")
    return "a {size} {color} {texture} {shape}".format(**attributes)


def caption_mentions(text: str) -> dict[str, list[str]]:
    """Every attribute value named in ``text``, per attribute, in order of first mention (case-insensitive).

    Words outside the vocabularies are ignored, so ``"A large red striped circle."`` and ``"large, red,
    striped circle"`` read the same. An attribute named with two different values lists both.
    """
    if not isinstance(text, str):
        raise TypeError(f"a caption must be a string, got {type(text).__name__}")
    mentions: dict[str, list[str]] = {}
    for word in re.findall(r"[a-z]+", text.lower()):
        attribute = _ATTRIBUTE_OF_WORD.get(word)
        if attribute is not None and word not in mentions.setdefault(attribute, []):
            mentions[attribute].append(word)
    return mentions


def parse_caption(text: str) -> dict[str, str]:
    """Read attributes back from a caption: ``{"size": ..., "color": ..., "texture": ..., "shape": ...}``.

    Only attributes named with exactly one value are returned; an attribute that is missing or named with
    conflicting values (``"a red blue circle"``) is left out. :func:`make_caption` round-trips.
    """
    return {name: values[0] for name, values in caption_mentions(text).items() if len(values) == 1}


# ------------------------------------------------------------- vocabularies
@dataclass(frozen=True)
class _Vocabulary:
    shapes: tuple[str, ...]
    colors: tuple[str, ...]


def _restrict(
    kind: str,
    universe: tuple[str, ...],
    only: Collection[str] | None,
    exclude: Collection[str],
) -> tuple[str, ...]:
    for label, names in (("only", only or ()), ("exclude", exclude)):
        if isinstance(names, str):
            raise TypeError(f"{label}_{kind} must be a collection of names, not the string {names!r}")
        unknown = sorted(set(names) - set(universe))
        if unknown:
            raise ValueError(f"{label}_{kind}: unknown {kind} {unknown}; known {kind}: {list(universe)}")
    kept = tuple(name for name in universe if (only is None or name in only) and name not in exclude)
    if not kept:
        raise ValueError(f"no {kind} left to draw (only={only}, exclude={sorted(exclude)})")
    return kept


def _vocabulary(
    only_shapes: Collection[str] | None,
    exclude_shapes: Collection[str],
    only_colors: Collection[str] | None,
    exclude_colors: Collection[str],
) -> _Vocabulary:
    return _Vocabulary(
        shapes=_restrict("shapes", SHAPES, only_shapes, exclude_shapes),
        colors=_restrict("colors", COLORS, only_colors, exclude_colors),
    )


# ---------------------------------------------------------------- rendering
def _inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Which points of the unit box the shape covers; ``u`` (1, W) grows right, ``v`` (H, 1) grows down.

    Coordinates are separable on the sample grid, so every test broadcasts to (H, W) instead of working
    on two full meshgrids.
    """
    if shape == "circle":
        return (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25
    if shape == "square":
        return ((u >= 0) & (u <= 1)) & ((v >= 0) & (v <= 1))
    if shape == "triangle":
        return (np.abs(u - 0.5) <= v / 2) & (v <= 1)
    if shape == "cross":
        half = _CROSS_ARM / 2
        return (np.abs(u - 0.5) <= half) | (np.abs(v - 0.5) <= half)
    if shape == "star":
        return _inside_polygon(_STAR_POLYGON, u, v)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _star_polygon() -> np.ndarray:
    angles = -np.pi / 2 + np.arange(10) * np.pi / 5
    radii = np.where(np.arange(10) % 2 == 0, 1.0, _STAR_INNER_RATIO)
    points = np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
    # Stretch to touch all four sides of the unit box, so the box is tight like every other shape's.
    low, high = points.min(axis=0), points.max(axis=0)
    return (points - low) / (high - low)


_STAR_POLYGON = _star_polygon()


def _inside_polygon(polygon: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Even-odd rule, one scanline crossing per edge and row (``u`` is (1, W), ``v`` is (H, 1))."""
    inside = np.zeros(np.broadcast_shapes(u.shape, v.shape), dtype=bool)
    # Python floats keep float32 inputs float32 (NumPy scalars would promote them to float64).
    for (ua, va), (ub, vb) in zip(polygon.tolist(), np.roll(polygon, -1, axis=0).tolist(), strict=True):
        if va == vb:
            continue
        crosses = (va > v) != (vb > v)
        u_at = ua + (v - va) * ((ub - ua) / (vb - va))
        inside ^= crosses & (u < u_at)
    return inside


def _unit_area(shape: str) -> float:
    """Share of its box a shape paints (numerically, once)."""
    grid = (np.arange(400) + 0.5) / 400
    return float(_inside(shape, grid[None, :], grid[:, None]).mean())


_UNIT_AREA: Mapping[str, float] = {shape: _unit_area(shape) for shape in SHAPES}


@dataclass
class _Sprite:
    """One object rendered once, placed by integer offsets (its sub-pixel offset is baked in)."""

    shape: str
    color: str
    size: str
    texture: str
    side: float
    frac_x: float
    frac_y: float
    coverage: np.ndarray  # (h, w) in [0, 1]
    premultiplied: np.ndarray  # (h, w, 3): colour * coverage

    @property
    def area(self) -> float:
        """Painted pixels (coverage summed)."""
        return float(self.coverage.sum())

    @property
    def height(self) -> int:
        return self.coverage.shape[0]

    @property
    def width(self) -> int:
        return self.coverage.shape[1]

    def box(self, left: int, top: int) -> tuple[float, float, float, float]:
        x1, y1 = left + self.frac_x, top + self.frac_y
        return (x1, y1, x1 + self.side, y1 + self.side)


def _render_sprite(rng: np.random.Generator, shape: str, color: str, size: str, texture: str, scale: float) -> _Sprite:
    low, high = SIZE_FRACTIONS[size]
    side = float(rng.uniform(low, high)) * scale
    frac_x, frac_y = (float(f) for f in rng.uniform(0.0, 1.0, size=2))
    width, height = math.ceil(frac_x + side), math.ceil(frac_y + side)
    # Sample points (patch pixels) on a supersampled grid, kept separable: x is (1, W), y is (H, 1).
    # float32 throughout, since rendering dominates generation time.
    steps = (np.arange(_SUPERSAMPLE, dtype=np.float32) + 0.5) / _SUPERSAMPLE
    x = (np.arange(width, dtype=np.float32)[:, None] + steps[None, :]).reshape(1, -1)
    y = (np.arange(height, dtype=np.float32)[:, None] + steps[None, :]).reshape(-1, 1)
    inside = _inside(shape, (x - frac_x) / side, (y - frac_y) / side)

    jitter = rng.integers(-_COLOR_JITTER, _COLOR_JITTER + 1, 3)
    base = np.clip(np.asarray(PALETTE[color]) + jitter, 0, 255).astype(np.float32)
    low_period, high_period = (bound * scale for bound in _TEXTURE_PERIOD_RANGE)
    period = min(max(_TEXTURE_PERIOD_SHARE * side, low_period), high_period)
    dark = _texture_mask(rng, texture, x, y, period) & inside
    coverage, dark_coverage = _pool(inside), _pool(dark)
    # Texture pixels are the same hue darkened, so colour * coverage loses their missing brightness.
    premultiplied = (coverage - (1 - _DARK_FACTOR) * dark_coverage)[..., None] * base
    return _Sprite(
        shape=shape,
        color=color,
        size=size,
        texture=texture,
        side=side,
        frac_x=frac_x,
        frac_y=frac_y,
        coverage=coverage,
        premultiplied=premultiplied,
    )


def _pool(mask: np.ndarray) -> np.ndarray:
    """Share of each pixel's supersamples that are set (adding strided slices: ~20x faster than a reshape
    and sum over two axes)."""
    counts = mask.view(np.uint8)
    rows = sum(counts[i::_SUPERSAMPLE] for i in range(_SUPERSAMPLE))
    cells = sum(rows[:, j::_SUPERSAMPLE] for j in range(_SUPERSAMPLE))
    return cells.astype(np.float32) / _SUPERSAMPLE**2


def _texture_mask(rng: np.random.Generator, texture: str, x: np.ndarray, y: np.ndarray, period: float) -> np.ndarray:
    """Where the texture darkens the object, laid out in the object's own coordinates (x is (1, W), y (H, 1))."""
    shape = np.broadcast_shapes(x.shape, y.shape)
    if texture == "solid":
        return np.zeros(shape, dtype=bool)
    if texture == "striped":
        angle = float(rng.choice([0.0, 45.0, 90.0, 135.0])) * math.pi / 180
        phase = float(rng.uniform(0, 1))
        position = x * (math.cos(angle) / period) + (y * (math.sin(angle) / period) + phase)
        return (position % 1.0) < 0.5
    if texture == "dotted":
        radius = _DOT_RADIUS_SHARE * period
        offset_x, offset_y = (float(o) for o in rng.uniform(0, period, size=2))
        dx = (x - offset_x) % period - period / 2
        dy = (y - offset_y) % period - period / 2
        return dx * dx + dy * dy <= radius * radius
    raise ValueError(f"unknown texture {texture!r}; expected one of {TEXTURES}")


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A desaturated plain, gradient or lightly noisy background (never one of the palette colours)."""

    def muted() -> np.ndarray:
        hue = rng.uniform(0, 1)
        saturation = rng.uniform(0.0, 0.15)
        value = rng.uniform(0.6, 0.95)
        return np.asarray(colorsys.hsv_to_rgb(hue, saturation, value), dtype=np.float32) * 255

    kind = rng.choice(["plain", "gradient", "noise"], p=[0.35, 0.4, 0.25])
    canvas = np.empty((height, width, 3), dtype=np.float32)
    canvas[:] = muted()
    if kind == "gradient":
        angle = rng.uniform(0, 2 * math.pi)
        xx = (np.arange(width, dtype=np.float32) / width - 0.5) * math.cos(angle)
        yy = (np.arange(height, dtype=np.float32) / height - 0.5) * math.sin(angle)
        t = xx[None, :] + yy[:, None]
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        canvas += (muted() - canvas[0, 0]) * t[..., None]
    elif kind == "noise":
        sigma = np.float32(rng.uniform(3.0, 8.0))
        canvas += rng.standard_normal((height, width, 1), dtype=np.float32) * sigma
    return canvas


# ------------------------------------------------------------------ scenes
@dataclass
class _Placed:
    sprite: _Sprite
    left: int
    top: int
    coverage: np.ndarray  # full-image coverage

    @property
    def box(self) -> tuple[float, float, float, float]:
        return self.sprite.box(self.left, self.top)

    def window(self) -> tuple[slice, slice]:
        return (slice(self.top, self.top + self.sprite.height), slice(self.left, self.left + self.sprite.width))


def _visible(coverages: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Per layer (bottom to top), how much of each pixel it still shows under the layers above it."""
    visible = []
    above = np.ones_like(coverages[-1])
    for coverage in reversed(coverages):
        visible.append(coverage * above)
        above = above * (1 - coverage)
    return visible[::-1]


def _acceptable(placed: Sequence[_Placed], candidate: _Placed) -> bool:
    """Whether drawing ``candidate`` on top keeps every object visible enough and its box uncluttered."""
    layers = [*placed, candidate]
    # Only objects whose boxes meet the candidate's can change, and only inside their joint window.
    affected = [i for i, item in enumerate(layers) if _boxes_overlap(item.box, candidate.box)]
    if affected == [len(placed)]:
        return True
    # No box may lie more than half inside another: its region would show two objects. Cheap, so first.
    for i in affected[:-1]:
        if _intersection(layers[i].box, candidate.box) > 0.5 * min(_box_area(layers[i].box), _box_area(candidate.box)):
            return False
    top = min(layers[i].top for i in affected)
    left = min(layers[i].left for i in affected)
    bottom = max(layers[i].top + layers[i].sprite.height for i in affected)
    right = max(layers[i].left + layers[i].sprite.width for i in affected)
    visible = _visible([item.coverage[top:bottom, left:right] for item in layers])
    total = sum(visible)
    for i in affected:
        item, shown = layers[i], visible[i]
        if shown.sum() < (1 - MAX_OCCLUSION) * item.sprite.area:
            return False
        rows = slice(item.top - top, item.top - top + item.sprite.height)
        cols = slice(item.left - left, item.left - left + item.sprite.width)
        own = shown[rows, cols].sum()
        others = total[rows, cols].sum() - own
        if others > MAX_BOX_CLUTTER * (own + others):
            return False
    return True


def _intersection(a: Sequence[float], b: Sequence[float]) -> float:
    return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))


def _boxes_overlap(a: Sequence[float], b: Sequence[float]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _place(rng: np.random.Generator, sprites: Sequence[_Sprite], width: int, height: int) -> list[_Placed]:
    placed: list[_Placed] = []
    for sprite in sprites:
        max_left, max_top = width - 1 - sprite.width, height - 1 - sprite.height
        if max_left < 1 or max_top < 1:
            continue
        for _ in range(_PLACEMENT_TRIES):
            left, top = int(rng.integers(1, max_left + 1)), int(rng.integers(1, max_top + 1))
            coverage = np.zeros((height, width), dtype=np.float32)
            coverage[top : top + sprite.height, left : left + sprite.width] = sprite.coverage
            candidate = _Placed(sprite, left, top, coverage)
            if _acceptable(placed, candidate):
                placed.append(candidate)
                break
    return placed


def _compose(
    rng: np.random.Generator,
    width: int,
    height: int,
    vocabulary: _Vocabulary,
    n_objects: int,
) -> tuple[np.ndarray, list[ObjectSpec]]:
    scale = math.sqrt(width * height)
    canvas = _background(rng, width, height)
    sprites = [
        _render_sprite(
            rng,
            shape=str(rng.choice(vocabulary.shapes)),
            color=str(rng.choice(vocabulary.colors)),
            size=str(rng.choice(SIZES)),
            texture=str(rng.choice(TEXTURES)),
            scale=scale,
        )
        for _ in range(n_objects)
    ]
    placed = _place(rng, sprites, width, height)
    for item in placed:
        rows, cols = item.window()
        coverage = item.sprite.coverage[..., None]
        canvas[rows, cols] = item.sprite.premultiplied + (1 - coverage) * canvas[rows, cols]
    canvas += rng.standard_normal(canvas.shape, dtype=np.float32) * np.float32(rng.uniform(0.0, 2.5))
    pixels = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)

    visible = _visible([item.coverage for item in placed]) if placed else []
    objects = [
        ObjectSpec(
            shape=item.sprite.shape,
            color=item.sprite.color,
            size=item.sprite.size,
            texture=item.sprite.texture,
            box=_rounded(item.box),
            visible_fraction=round(float(shown.sum()) / item.sprite.area, 4),
        )
        for item, shown in zip(placed, visible, strict=True)
    ]
    return pixels, objects


def _rounded(box: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
    """Box to a thousandth of a pixel: exact enough, and short in JSON."""
    x1, y1, x2, y2 = (round(v, 3) for v in box)
    return (x1, y1, x2, y2)


def make_image(
    seed: int,
    width: int | None = None,
    height: int | None = None,
    *,
    min_objects: int = 2,
    max_objects: int = 5,
    only_shapes: Collection[str] | None = None,
    exclude_shapes: Collection[str] = (),
    only_colors: Collection[str] | None = None,
    exclude_colors: Collection[str] = (),
) -> tuple[Image.Image, list[ObjectSpec]]:
    """Draw one scene and return it with the ground truth of every object (bottom to top).

    ``width``/``height`` default to random sizes in 96–128 px. The scene has between ``min_objects`` and
    ``max_objects`` objects; an object that cannot be placed without breaking the occlusion rules is
    dropped, and the scene is redrawn if fewer than ``min_objects`` remain. ``only_*``/``exclude_*`` restrict
    the shapes and colours drawn (unknown names raise ``ValueError``).
    """
    vocabulary = _vocabulary(only_shapes, exclude_shapes, only_colors, exclude_colors)
    rng = np.random.default_rng(_check_seed(seed))
    return _make_image(rng, width, height, min_objects, max_objects, vocabulary)


def _make_image(
    rng: np.random.Generator,
    width: int | None,
    height: int | None,
    min_objects: int,
    max_objects: int,
    vocabulary: _Vocabulary,
) -> tuple[Image.Image, list[ObjectSpec]]:
    _check_scene_settings(width, height, min_objects, max_objects)
    low, high = _DEFAULT_SIZE_RANGE
    width = int(rng.integers(low, high + 1)) if width is None else width
    height = int(rng.integers(low, high + 1)) if height is None else height
    _check_scene_settings(width, height, min_objects, max_objects)
    for _ in range(20):
        n_objects = int(rng.integers(min_objects, max_objects + 1))
        pixels, objects = _compose(rng, width, height, vocabulary, n_objects)
        if len(objects) >= min_objects:
            return Image.fromarray(pixels), objects
    raise RuntimeError(f"could not place {min_objects} objects in a {width}x{height} image")


def _check_scene_settings(width: int | None, height: int | None, min_objects: int, max_objects: int) -> None:
    """Refuse sizes and object counts the placement rules cannot satisfy (``None`` sizes are drawn later)."""
    for name, count in (("min_objects", min_objects), ("max_objects", max_objects)):
        if isinstance(count, bool) or not isinstance(count, int):
            raise ValueError(f"{name} must be an integer, got {count!r}")
    if not 1 <= min_objects <= max_objects:
        raise ValueError(f"need 1 <= min_objects <= max_objects, got {min_objects} and {max_objects}")
    if max_objects > 8:
        raise ValueError(f"at most 8 objects fit the occlusion rules reliably, got max_objects={max_objects}")
    for name, value in (("width", width), ("height", height)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 48 <= value <= 4096):
            raise ValueError(f"{name} must be an integer between 48 and 4096 pixels, got {value!r}")
    if width is not None and height is not None and max(width, height) > 2 * min(width, height):
        raise ValueError(f"aspect ratio above 2 leaves no room for large objects: {width}x{height}")


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def image_seed(seed: int, index: int) -> int:
    """The seed of image ``index`` of a split generated with ``seed`` (pass it to :func:`make_image`)."""
    state = np.random.SeedSequence([_check_seed(seed), _check_seed(index)]).generate_state(1, dtype=np.uint64)
    # 53 bits: exact as a JSON number in every reader (JavaScript included), collisions still negligible.
    return int(state[0]) >> 11


# ---------------------------------------------------------------- questions
@dataclass(frozen=True)
class RegionQuestion:
    """One single-turn question about a scene; ``objects[k]`` is the object shown as region ``k + 1``."""

    question: str
    answer: str
    objects: tuple[int, ...]
    meta: dict[str, Any]


def region_records(
    objects: Sequence[ObjectSpec],
    width: int,
    height: int,
    rng: np.random.Generator,
    tasks: Collection[str] = TASKS,
    pairs_per_relation: int = 1,
) -> list[RegionQuestion]:
    """The questions about one scene.

    Per object: a caption question and one question per attribute of :data:`QUESTION_ATTRIBUTES`
    (``tasks`` containing ``"caption"``/``"attribute"``). Per relation of :data:`model.gpt4roi.prompts.RELATIONS`:
    up to ``pairs_per_relation`` pairs with a clear answer, each asked in a random order, so that yes/no and
    region1/region2 answers are balanced. The object indices name region1, region2, ... in order.
    """
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; expected some of {list(TASKS)}")
    records: list[RegionQuestion] = []
    for index, obj in enumerate(objects):
        truth = {"attributes": obj.attributes, "object": index}
        if "caption" in tasks:
            records.append(RegionQuestion(caption_question(1), obj.caption, (index,), {"task": "caption", **truth}))
        if "attribute" in tasks:
            for attribute in QUESTION_ATTRIBUTES:
                records.append(
                    RegionQuestion(
                        attribute_question(attribute, 1),
                        obj.answer(attribute),
                        (index,),
                        {"task": "attribute", "attribute": attribute, **truth},
                    )
                )
    if "relation" in tasks:
        for relation in RELATIONS:
            pairs = [
                (i, j)
                for i in range(len(objects))
                for j in range(i + 1, len(objects))
                if _clear_relation(relation, objects[i], objects[j], width, height)
            ]
            order = rng.permutation(len(pairs))[:pairs_per_relation] if pairs else []
            for pick in order:
                first, second = pairs[int(pick)]
                if rng.random() < 0.5:
                    first, second = second, first
                answer = relation_answer(relation, objects[first].box, objects[second].box)
                records.append(
                    RegionQuestion(
                        relation_question(relation, 1, 2),
                        answer,
                        (first, second),
                        {"task": "relation", "relation": relation, "objects": [first, second]},
                    )
                )
    return records


def _clear_relation(relation: str, a: ObjectSpec, b: ObjectSpec, width: int, height: int) -> bool:
    """Whether ``relation`` between two objects has an answer nobody would dispute."""
    if relation == "left_of":
        apart = a.box[2] <= b.box[0] or b.box[2] <= a.box[0]
        return apart and abs(a.center[0] - b.center[0]) >= MIN_CENTRE_GAP * width
    if relation == "above":
        apart = a.box[3] <= b.box[1] or b.box[3] <= a.box[1]
        return apart and abs(a.center[1] - b.center[1]) >= MIN_CENTRE_GAP * height
    if relation == "larger":
        if a.size == b.size:
            return False
        big, small = (a, b) if SIZES.index(a.size) > SIZES.index(b.size) else (b, a)
        box_ratio = _box_area(big.box) / _box_area(small.box)
        painted_ratio = box_ratio * _UNIT_AREA[big.shape] / _UNIT_AREA[small.shape]
        return box_ratio >= MIN_LARGER_RATIO and painted_ratio >= MIN_LARGER_RATIO
    raise ValueError(f"unknown relation {relation!r}; expected one of {sorted(RELATIONS)}")


def _box_area(box: Sequence[float]) -> float:
    return (box[2] - box[0]) * (box[3] - box[1])


# ----------------------------------------------------------------- datasets
@dataclass(frozen=True)
class _SceneJob:
    """Everything one worker needs to write image ``index`` of a split (plain data, cheap to send)."""

    out_dir: str
    split_name: str
    index: int
    seed: int
    width: int | None
    height: int | None
    min_objects: int
    max_objects: int
    vocabulary: _Vocabulary
    tasks: tuple[str, ...]
    pairs_per_relation: int


def _write_scene(job: _SceneJob) -> list[RegionSample]:
    scene_seed = image_seed(job.seed, job.index)
    image, objects = _make_image(
        np.random.default_rng(scene_seed), job.width, job.height, job.min_objects, job.max_objects, job.vocabulary
    )
    relative = f"images/{job.split_name}/{job.index:06d}.png"
    # Fast zlib level: the PNGs are lossless either way and encoding is a third of the time at level 6.
    image.save(Path(job.out_dir) / relative, format="PNG", compress_level=1)
    question_rng = np.random.default_rng([scene_seed, 1])
    questions = region_records(objects, image.width, image.height, question_rng, job.tasks, job.pairs_per_relation)
    return [
        RegionSample(
            id=f"{job.split_name}-{job.index:06d}-q{k}",
            image=relative,
            width=image.width,
            height=image.height,
            boxes=[objects[i].box for i in q.objects],
            conversations=[{"from": "human", "value": q.question}, {"from": "gpt", "value": q.answer}],
            meta={**q.meta, "image_seed": scene_seed},
        )
        for k, q in enumerate(questions)
    ]


def generate_dataset(
    out_dir: str | Path,
    n_images: int,
    seed: int,
    split_name: str,
    *,
    tasks: Collection[str] = TASKS,
    pairs_per_relation: int = 1,
    image_size: int | tuple[int, int] | None = None,
    min_objects: int = 2,
    max_objects: int = 5,
    only_shapes: Collection[str] | None = None,
    exclude_shapes: Collection[str] = (),
    only_colors: Collection[str] | None = None,
    exclude_colors: Collection[str] = (),
    workers: int | None = None,
) -> Path:
    """Write ``n_images`` scenes and their region questions; return the path of the JSONL file.

    Files: ``{out_dir}/{split_name}.jsonl`` and ``{out_dir}/images/{split_name}/{index:06d}.png`` (image
    paths in the JSONL are relative to ``out_dir``). Image ``index`` is drawn with
    ``image_seed(seed, index)``, so splits with different seeds share no scenes and a split is the same
    bytes every time, whatever ``workers`` is. ``image_size`` fixes ``(width, height)`` (an int means
    square); by default each image gets a random size in 96–128 px. The hold-back options are those of
    :func:`make_image`. Record ids are ``{split_name}-{index:06d}-q{k}``; ``meta`` holds the task, the
    attribute or relation, the objects' indices, the ground-truth attributes and ``image_seed``.
    ``workers`` processes draw the images (default: one per CPU, at most 8; small splits use one).
    """
    if isinstance(n_images, bool) or not isinstance(n_images, int) or n_images < 1:
        raise ValueError(f"n_images must be a positive integer, got {n_images!r}")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", split_name or ""):
        raise ValueError(f"split_name must be a plain file name (letters, digits, _ . -), got {split_name!r}")
    if isinstance(pairs_per_relation, bool) or not isinstance(pairs_per_relation, int) or pairs_per_relation < 0:
        raise ValueError(f"pairs_per_relation must be a non-negative integer, got {pairs_per_relation!r}")
    unknown = sorted(set(tasks) - set(TASKS))
    if not tasks or unknown:
        raise ValueError(f"tasks must be some of {list(TASKS)}, got {sorted(tasks)}")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    _check_seed(seed)
    width, height = (image_size, image_size) if isinstance(image_size, int) else (image_size or (None, None))
    vocabulary = _vocabulary(only_shapes, exclude_shapes, only_colors, exclude_colors)
    _check_scene_settings(width, height, min_objects, max_objects)

    out_dir = Path(out_dir)
    (out_dir / "images" / split_name).mkdir(parents=True, exist_ok=True)
    jobs = [
        _SceneJob(
            str(out_dir),
            split_name,
            index,
            seed,
            width,
            height,
            min_objects,
            max_objects,
            vocabulary,
            tuple(tasks),
            pairs_per_relation,
        )
        for index in range(n_images)
    ]
    if workers is None:
        workers = min(os.cpu_count() or 1, 8)
    workers = min(workers, max(1, n_images // _IMAGES_PER_WORKER_START))
    if workers == 1:
        per_scene = [_write_scene(job) for job in jobs]
    else:
        # "spawn": the caller may hold torch or other threads, which a forked child could deadlock on.
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            per_scene = list(pool.map(_write_scene, jobs, chunksize=32))
    samples = [sample for scene in per_scene for sample in scene]
    return write_jsonl(samples, out_dir / f"{split_name}.jsonl")


def corpus_texts() -> list[str]:
    """Every text the demo model reads or writes, for training its tokenizer.

    The system prompt and image prefix, each question template, every answer word, every caption over the
    full vocabularies (held-back shapes and colours included, so a later fine-tune on them needs no new
    tokens) and one rendered conversation per question kind, which carries the ``### Human:`` /
    ``### Assistant:`` scaffolding.
    """
    questions = [caption_question(1)]
    questions += [attribute_question(attribute, 1) for attribute in QUESTION_ATTRIBUTES]
    questions += [relation_question(relation, 1, 2) for relation in RELATIONS]
    answers = [*SHAPES, *COLORS, *SIZES, *TEXTURES]
    for relation in RELATIONS:
        answers += relation_candidates(relation)
    captions = [
        make_caption({"size": size, "color": color, "texture": texture, "shape": shape})
        for size in SIZES
        for color in COLORS
        for texture in TEXTURES
        for shape in SHAPES
    ]
    examples = [
        build_conversation([{"from": "human", "value": question}, {"from": "gpt", "value": answer}])
        for question, answer in zip(questions, [captions[0], *answers], strict=False)
    ]
    texts = [SYSTEM_PROMPT, IMAGE_PREFIX, *questions, *answers, *captions, *examples]
    return list(dict.fromkeys(texts))


def _main(argv: Iterable[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Write a synthetic shapes split (PNGs + JSONL).")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--images", type=int, required=True, help="number of images")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--split", required=True, help="split name, e.g. train or heldout")
    parser.add_argument("--exclude-shapes", nargs="*", default=[])
    parser.add_argument("--only-shapes", nargs="*", default=None)
    parser.add_argument("--exclude-colors", nargs="*", default=[])
    args = parser.parse_args(None if argv is None else list(argv))
    start = time.perf_counter()
    path = generate_dataset(
        args.out_dir,
        args.images,
        args.seed,
        args.split,
        exclude_shapes=args.exclude_shapes,
        only_shapes=args.only_shapes,
        exclude_colors=args.exclude_colors,
    )
    print(f"wrote {path} ({args.images} images) in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    _main()
