"""Small test images."""

from __future__ import annotations

import io

from PIL import Image, ImageDraw


def scene(size: tuple[int, int] = (96, 64), box: tuple[int, int, int, int] = (10, 12, 50, 44),
          colour: tuple[int, int, int] = (220, 30, 30)) -> Image.Image:
    """A white image with one filled rectangle."""
    image = Image.new("RGB", size, (255, 255, 255))
    ImageDraw.Draw(image).rectangle(box, fill=colour)
    return image


def png_bytes(image: Image.Image) -> bytes:
    """PNG encoding of an image."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
