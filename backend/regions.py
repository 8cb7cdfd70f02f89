"""The enclosing box of every region shape Label Studio draws on an image, in its own percent coordinates.

The model looks at boxes; annotators draw rectangles (possibly rotated), polygons, ellipses, keypoints and
brush masks. `enclosing_box` turns the `value` of any of them into the axis-aligned box around it, as
`(x, y, width, height)` in percent of the image (top-left corner), the way Label Studio writes rectangles.
A keypoint has no extent: its box is a square around the point whose side is a share of the image's
shorter side (the KEYPOINT_BOX_SIZE setting), so the model sees the point with some context.

Label Studio measures rotations in pixel space (y down); without the image size the image is treated as
square. Brush masks are decoded with the label-studio-sdk's own RLE decoder, imported only when a mask is
met (it pulls in numpy and Pillow).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

# Tool tag → the shape it draws; a result item's `type` is the tag in lower case.
SHAPE_OF_TAG = {
    "Rectangle": "rectangle", "RectangleLabels": "rectangle",
    "Polygon": "polygon", "PolygonLabels": "polygon",
    "Ellipse": "ellipse", "EllipseLabels": "ellipse",
    "KeyPoint": "keypoint", "KeyPointLabels": "keypoint",
    "Brush": "brush", "BrushLabels": "brush",
}
SHAPE_OF_TYPE = {tag.lower(): shape for tag, shape in SHAPE_OF_TAG.items()}
# The value keys that are a shape's geometry (the rest of a value is labels, text, choices).
GEOMETRY_KEYS = {
    "rectangle": ("x", "y", "width", "height", "rotation"),
    "polygon": ("points", "closed"),
    "ellipse": ("x", "y", "radiusX", "radiusY", "rotation"),
    "keypoint": ("x", "y", "width"),
    "brush": ("format", "rle"),
}
DEFAULT_KEYPOINT_BOX = 10.0


class ShapeError(ValueError):
    """A region value that does not describe a shape of its type."""


Box = tuple[float, float, float, float]


def geometry(shape: str, value: Mapping[str, Any]) -> dict[str, Any]:
    """The geometry keys of a region value, as drawn."""
    return {k: value[k] for k in GEOMETRY_KEYS[shape] if k in value}


def enclosing_box(shape: str, value: Mapping[str, Any], size: tuple[int, int] | None = None,
                  keypoint_box: float = DEFAULT_KEYPOINT_BOX) -> Box:
    """`(x, y, width, height)` in percent: the axis-aligned box around a region `value` of `shape`, before
    clamping to the image. `size` is the image's (width, height) in pixels, where known."""
    if shape == "polygon":
        return _polygon(value)
    if shape == "ellipse":
        return _ellipse(value, size)
    if shape == "keypoint":
        return _keypoint(value, size, keypoint_box)
    if shape == "brush":
        return _brush(value, size)
    raise ShapeError(f"no enclosing box for a {shape!r} region")


def _number(value: Any, what: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ShapeError(f"{what} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ShapeError(f"{what} must be finite, got {value!r}")
    return number


def _polygon(value: Mapping[str, Any]) -> Box:
    points = value.get("points")
    if not isinstance(points, list) or len(points) < 2:
        raise ShapeError("a polygon needs 'points', a list of at least two [x, y] pairs (percent)")
    xs, ys = [], []
    for point in points:
        if not isinstance(point, (list, tuple)) or len(point) != 2:
            raise ShapeError(f"polygon point {point!r} is not an [x, y] pair")
        xs.append(_number(point[0], "a polygon's x"))
        ys.append(_number(point[1], "a polygon's y"))
    return (min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys))


def _ellipse(value: Mapping[str, Any], size: tuple[int, int] | None) -> Box:
    try:
        cx, cy, rx, ry = (_number(value[k], f"an ellipse's {k}") for k in ("x", "y", "radiusX", "radiusY"))
    except KeyError:
        raise ShapeError("an ellipse needs x, y, radiusX and radiusY (percent)") from None
    rotation = _number(value.get("rotation") or 0.0, "an ellipse's rotation")
    if rx <= 0 or ry <= 0:
        raise ShapeError(f"an ellipse's radii must be positive, got {rx} x {ry}")
    sx, sy = size or (1, 1)
    # The half-extents of an ellipse rotated about its centre, computed in pixels where rotation is defined.
    a, b = rx * sx, ry * sy
    theta = math.radians(rotation)
    half_w = math.hypot(a * math.cos(theta), b * math.sin(theta)) / sx
    half_h = math.hypot(a * math.sin(theta), b * math.cos(theta)) / sy
    return (cx - half_w, cy - half_h, 2 * half_w, 2 * half_h)


def _keypoint(value: Mapping[str, Any], size: tuple[int, int] | None, side: float) -> Box:
    try:
        x, y = _number(value["x"], "a keypoint's x"), _number(value["y"], "a keypoint's y")
    except KeyError:
        raise ShapeError("a keypoint needs x and y (percent)") from None
    if size:
        shorter = min(size)
        w, h = side * shorter / size[0], side * shorter / size[1]
    else:
        w = h = side
    return (x - w / 2, y - h / 2, w, h)


def _brush(value: Mapping[str, Any], size: tuple[int, int] | None) -> Box:
    rle = value.get("rle")
    if value.get("format", "rle") != "rle" or not isinstance(rle, list) or not rle:
        raise ShapeError("a brush region needs 'rle', Label Studio's run-length encoded mask")
    if not size:
        raise ShapeError("a brush region needs original_width and original_height to decode its mask")
    from label_studio_sdk.converter.brush import decode_rle

    width, height = size
    try:
        pixels = decode_rle(rle)
    except Exception as exc:  # the decoder raises whatever a truncated bit stream makes it raise
        raise ShapeError(f"the brush mask cannot be decoded: {exc}") from None
    if pixels.size != width * height * 4:
        raise ShapeError(f"the brush mask has {pixels.size // 4} pixels, the image {width} x {height}")
    # RGBA per pixel; Label Studio paints the mask into every channel, the alpha channel is the mask.
    rows, cols = pixels.reshape(height, width, 4)[:, :, 3].nonzero()
    if rows.size == 0:
        raise ShapeError("the brush mask is empty")
    x1, x2, y1, y2 = int(cols.min()), int(cols.max()) + 1, int(rows.min()), int(rows.max()) + 1
    return (100 * x1 / width, 100 * y1 / height, 100 * (x2 - x1) / width, 100 * (y2 - y1) / height)
