"""How a region and a question reach Qwen3-VL: the box as text or drawn on the image, and the questions in words.

Qwen3-VL reads boxes as `[x1, y1, x2, y2]` in integer coordinates relative to the image, 0–1000 on each axis.
"""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image, ImageDraw

from model.engine import LABEL

Box = tuple[float, float, float, float]

REGION_MODES = ("drawn", "text")
OUTLINE = (255, 0, 0)
DRAWN_REGION = "the region outlined in red"


def box_text(box: Box) -> str:
    """A normalized xyxy box as Qwen's `[x1, y1, x2, y2]`, each rounded to 0–1000 and clamped there."""
    return "[" + ", ".join(str(min(1000, max(0, round(value * 1000)))) for value in box) + "]"


def outline_width(size: tuple[int, int]) -> int:
    """The outline's width: about 0.6 % of the longer side, so it survives the resize to the vision grid."""
    return max(2, round(0.006 * max(size)))


def pixel_box(box: Box, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """The inclusive pixel rectangle of a normalized box on an image of `size` (width, height)."""
    width, height = size
    x1 = min(width - 1, max(0, round(box[0] * width)))
    y1 = min(height - 1, max(0, round(box[1] * height)))
    x2 = min(width - 1, max(x1, round(box[2] * width) - 1))
    y2 = min(height - 1, max(y1, round(box[3] * height) - 1))
    return x1, y1, x2, y2


def draw_region(image: Image.Image, box: Box) -> Image.Image:
    """A copy of `image` with the box outlined in red, the outline inside the box."""
    drawn = image.convert("RGB") if image.mode != "RGB" else image.copy()
    ImageDraw.Draw(drawn).rectangle(pixel_box(box, drawn.size), outline=OUTLINE, width=outline_width(drawn.size))
    return drawn


def region_phrase(box: Box, region: str) -> str:
    return DRAWN_REGION if region == "drawn" else f"region {box_text(box)}"


def caption_question(box: Box, region: str) -> str:
    return f"Describe the object in {region_phrase(box, region)} in one short sentence."


def transcription_question(box: Box, region: str) -> str:
    return f"Read the text written in {region_phrase(box, region)}. Answer with that text only."


def attribute_question(box: Box, region: str, attribute: str, candidates: Sequence[str] = ()) -> str:
    """The question for an attribute (the label when `attribute` is `LABEL`); without candidates,
    a free short answer is asked for."""
    where = region_phrase(box, region)
    if attribute == LABEL:
        if not candidates:
            return f"What is the object in {where}? Answer in a word or two."
        return f"Which of these is the object in {where}: {', '.join(candidates)}? Answer with one of them."
    if not candidates:
        return f"What is the {attribute} of the object in {where}? Answer in a word or two."
    return f"What is the {attribute} of the object in {where}? Answer with one of: {', '.join(candidates)}"
