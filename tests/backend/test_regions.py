"""Enclosing boxes of every region shape, checked in pixels against the label-studio-sdk's own conversions."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
from label_studio_sdk.converter.brush import mask2rle
from label_studio_sdk.converter.utils import convert_annotation_to_yolo_obb, get_polygon_bounding_box

from backend.labelconfig import FillPlan, TaskError, regions_from_context
from backend.regions import DEFAULT_KEYPOINT_BOX, ShapeError, enclosing_box
from backend.settings import Settings

SIZES = [(640, 480), (100, 300), (1920, 1080), (37, 53)]
ALL_TOOLS = (
    '<View><Image name="image" value="$image"/>'
    '<RectangleLabels name="rect" toName="image"><Label value="a"/><Label value="b"/></RectangleLabels>'
    '<PolygonLabels name="poly" toName="image"><Label value="a"/><Label value="b"/></PolygonLabels>'
    '<EllipseLabels name="ell" toName="image"><Label value="a"/><Label value="b"/></EllipseLabels>'
    '<KeyPointLabels name="kp" toName="image"><Label value="a"/><Label value="b"/></KeyPointLabels>'
    '<BrushLabels name="brush" toName="image"><Label value="a"/><Label value="b"/></BrushLabels>'
    '<TextArea name="caption" toName="image" perRegion="true"/></View>')


def pixels(box: tuple[float, float, float, float], size: tuple[int, int]) -> tuple[float, float, float, float]:
    """A percent `(x, y, width, height)` as pixel xyxy."""
    x, y, w, h = box
    return (x * size[0] / 100, y * size[1] / 100, (x + w) * size[0] / 100, (y + h) * size[1] / 100)


def close(a: tuple[float, ...], b: tuple[float, ...], tolerance: float = 1.0) -> bool:
    return all(abs(p - q) <= tolerance for p, q in zip(a, b, strict=True))


@pytest.mark.parametrize("size", SIZES)
def test_polygon_box_is_the_sdk_bounding_box(size):
    rng = random.Random(size[0])
    for _ in range(20):
        xs = [rng.uniform(0, size[0]) for _ in range(rng.randint(3, 9))]
        ys = [rng.uniform(0, size[1]) for _ in xs]
        value = {"points": [[100 * x / size[0], 100 * y / size[1]] for x, y in zip(xs, ys, strict=True)]}
        x, y, w, h = get_polygon_bounding_box(xs, ys)
        assert close(pixels(enclosing_box("polygon", value, size), size), (x, y, x + w, y + h))


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("rotation", [0, 30, 90, 137, -45])
def test_ellipse_box_holds_the_ellipse_in_pixels(size, rotation):
    cx, cy, rx, ry = 0.4 * size[0], 0.55 * size[1], 0.2 * size[0], 0.1 * size[1]
    value = {"x": 100 * cx / size[0], "y": 100 * cy / size[1], "radiusX": 100 * rx / size[0],
             "radiusY": 100 * ry / size[1], "rotation": rotation}
    theta = math.radians(rotation)
    # The outline, sampled in pixels: Label Studio rotates the ellipse about its centre, y pointing down.
    outline = [(cx + rx * math.cos(t) * math.cos(theta) - ry * math.sin(t) * math.sin(theta),
                cy + rx * math.cos(t) * math.sin(theta) + ry * math.sin(t) * math.cos(theta))
               for t in np.linspace(0, 2 * math.pi, 4000)]
    expected = (min(p[0] for p in outline), min(p[1] for p in outline),
                max(p[0] for p in outline), max(p[1] for p in outline))
    assert close(pixels(enclosing_box("ellipse", value, size), size), expected)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("side", [DEFAULT_KEYPOINT_BOX, 4.0])
def test_keypoint_box_is_a_square_of_the_shorter_side(size, side):
    value = {"x": 50.0, "y": 25.0, "width": 0.5}
    x1, y1, x2, y2 = pixels(enclosing_box("keypoint", value, size, side), size)
    edge = side / 100 * min(size)
    assert close((x2 - x1, y2 - y1), (edge, edge))
    assert close(((x1 + x2) / 2, (y1 + y2) / 2), (size[0] / 2, size[1] / 4))


def test_the_keypoint_default_is_the_settings_default():
    assert Settings().keypoint_box_size == DEFAULT_KEYPOINT_BOX


@pytest.mark.parametrize("size", SIZES)
def test_brush_box_is_the_mask_extent(size):
    width, height = size
    mask = np.zeros((height, width), dtype=np.uint8)
    top, left = height // 5, width // 3
    mask[top:top + height // 3, left:left + width // 4] = 255
    mask[height - 2, width - 3] = 255
    value = {"format": "rle", "rle": mask2rle(mask)}
    rows, cols = mask.nonzero()
    expected = (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)
    assert close(pixels(enclosing_box("brush", value, size), size), expected)


def test_a_brush_mask_needs_the_image_size_and_pixels():
    value = {"format": "rle", "rle": mask2rle(np.zeros((4, 4), dtype=np.uint8))}
    with pytest.raises(ShapeError, match="original_width"):
        enclosing_box("brush", value, None)
    with pytest.raises(ShapeError, match="empty"):
        enclosing_box("brush", value, (4, 4))
    with pytest.raises(ShapeError, match="pixels"):
        enclosing_box("brush", value, (5, 4))


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("rotation", [0, 20, 75, 160])
def test_rotated_rectangle_box_is_the_sdk_oriented_box_hull(size, rotation):
    value = {"x": 30.0, "y": 20.0, "width": 25.0, "height": 15.0, "rotation": rotation}
    item = {"id": "r", "type": "rectanglelabels", "from_name": "rect", "to_name": "image",
            "original_width": size[0], "original_height": size[1], "value": value}
    (region,) = regions_from_context(FillPlan.from_label_config(ALL_TOOLS), {"result": [item]})
    corners = convert_annotation_to_yolo_obb({**value, "original_width": size[0], "original_height": size[1]},
                                             normalize=False)
    xs, ys = [c[0] for c in corners], [c[1] for c in corners]
    x1, y1, x2, y2 = region.box()
    hull = (min(xs), min(ys), max(xs), max(ys))
    # box() clamps to the image; the SDK's corners are not clamped.
    clamped = (max(hull[0], 0), max(hull[1], 0), min(hull[2], size[0]), min(hull[3], size[1]))
    assert close((x1 * size[0], y1 * size[1], x2 * size[0], y2 * size[1]), clamped)


@pytest.mark.parametrize("value, message", [
    ({"points": [[1, 2]]}, "at least two"),
    ({"points": [[1, "a"], [3, 4]]}, "number"),
    ({"points": [[1, 2, 3], [3, 4]]}, "pair"),
])
def test_malformed_polygons_are_refused(value, message):
    with pytest.raises(ShapeError, match=message):
        enclosing_box("polygon", value)
    item = {"id": "p", "type": "polygon", "from_name": "poly", "to_name": "image", "value": value}
    with pytest.raises(TaskError, match=message):
        regions_from_context(FillPlan.from_label_config(ALL_TOOLS), {"result": [item]})


def test_malformed_ellipses_and_keypoints_are_refused():
    with pytest.raises(ShapeError, match="radiusX"):
        enclosing_box("ellipse", {"x": 1, "y": 1})
    with pytest.raises(ShapeError, match="positive"):
        enclosing_box("ellipse", {"x": 1, "y": 1, "radiusX": 0, "radiusY": 2})
    with pytest.raises(ShapeError, match="finite"):
        enclosing_box("keypoint", {"x": float("nan"), "y": 1})
