"""Content keys for images, shared by the engines' image-feature caches."""

from __future__ import annotations

import hashlib
import weakref

from PIL import Image


class ImageKeys:
    """A key per image content: two decodes of the same file share it, an edited image does not.

    Hashing a photo's pixels costs about as much as answering a box, so the key is remembered for as long as
    the image object lives: a caller that passes the same object again (the backend's image cache does) skips
    the hash. PIL images are not mutated in place by the engines; a derived image is a new object, hashed anew.
    """

    def __init__(self) -> None:
        self._remembered: dict[int, tuple[weakref.ref, str]] = {}

    def __call__(self, image: Image.Image) -> str:
        ident = id(image)
        remembered = self._remembered.get(ident)
        if remembered is not None and remembered[0]() is image:
            return remembered[1]
        digest = hashlib.blake2b(image.tobytes(), digest_size=16)
        digest.update(f"{image.mode}{image.size}".encode())
        key = digest.hexdigest()
        self._remembered[ident] = (weakref.ref(image, lambda _: self._remembered.pop(ident, None)), key)
        return key

    def clear(self) -> None:
        self._remembered.clear()
