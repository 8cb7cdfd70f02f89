"""GPT4RoI processor: images to pixel tensors, boxes to normalized ``xyxy``, prompts to token ids.

Images follow the reference demo's inference path (spec §2.3): the CLIP image processor with centre crop
disabled (shortest edge to S, bicubic, rescale, CLIP mean/std), then a bilinear resize of the normalized
tensor to S×S. The net effect is a stretch to a square without padding or cropping, which is why boxes are
normalized by the original width and height and need no further adjustment.

Boxes given to the model are ``xyxy`` in [0, 1]. Every box goes through :func:`sanitize_boxes`: non-finite,
inverted and zero-area boxes are rejected with a ``ValueError``; coordinates are clamped to the image;
boxes smaller than :data:`MIN_BOX_SIZE` (2 px at 224 px, the smallest size seen in training) are enlarged
symmetrically to that size rather than rejected, because annotators do draw such boxes and a slightly
larger box is a better answer than an error.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from .prompts import IMAGE_TOKEN, check_bbox_count, conversation_segments
from .tokenization_gpt4roi import (
    BBOX_TOKEN,
    IM_END_TOKEN,
    IM_START_TOKEN,
    IMAGE_PATCH_TOKEN,
    GPT4RoITokenizer,
)

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "IGNORE_INDEX",
    "MIN_BOX_SIZE",
    "GPT4RoIProcessor",
    "clip_preprocess",
    "normalize_boxes",
    "pad_sequences",
    "sanitize_boxes",
    "to_rgb",
]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
#: Label value that the loss ignores.
IGNORE_INDEX = -100
#: Smallest box side, normalized: 2 px at the 224-px scale the model was trained at (mmdet
#: ``FilterAnnotations(min_gt_bbox_wh=(2, 2))``).
MIN_BOX_SIZE = 2.0 / 224.0

PROCESSOR_CONFIG_FILE = "processor_config.json"

BoxLike = Sequence[float]


# -------------------------------------------------------------------- boxes
def sanitize_boxes(boxes: torch.Tensor | Sequence[BoxLike], min_size: float = MIN_BOX_SIZE) -> torch.Tensor:
    """Validate normalized ``xyxy`` boxes and make them safe for the model; returns ``float32 [n, 4]``.

    Raises ``ValueError`` for a wrong shape, a NaN/inf coordinate, an inverted box (x2 < x1 or y2 < y1), a
    zero-area box, or a box entirely outside the image. Coordinates are clamped to [0, 1], and a side
    shorter than ``min_size`` is widened symmetrically about its centre (shifted back inside the image
    where it touches an edge).
    """
    tensor = _as_box_tensor(boxes)
    result = tensor.clone()
    for index, (x1, y1, x2, y2) in enumerate(tensor.tolist()):
        if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
            raise ValueError(f"box {index} has a non-finite coordinate: {[x1, y1, x2, y2]}")
        if x2 < x1 or y2 < y1:
            raise ValueError(
                f"box {index} is inverted (need x1 <= x2 and y1 <= y2 in xyxy): {[x1, y1, x2, y2]}"
            )
        if x2 == x1 or y2 == y1:
            raise ValueError(f"box {index} has zero area: {[x1, y1, x2, y2]}")
        x1, x2 = _fit_interval(x1, x2, min_size, index, [x1, y1, x2, y2])
        y1, y2 = _fit_interval(y1, y2, min_size, index, [x1, y1, x2, y2])
        result[index] = torch.tensor([x1, y1, x2, y2], dtype=torch.float32)
    return result


def _fit_interval(
    low: float, high: float, min_size: float, index: int, box: list[float]
) -> tuple[float, float]:
    low, high = min(max(low, 0.0), 1.0), min(max(high, 0.0), 1.0)
    if high <= low:
        raise ValueError(f"box {index} lies outside the image: {box}")
    if high - low < min_size:
        centre = (low + high) / 2.0
        low = min(max(centre - min_size / 2.0, 0.0), 1.0 - min_size)
        high = low + min_size
    return low, high


def _as_box_tensor(boxes: torch.Tensor | Sequence[BoxLike]) -> torch.Tensor:
    if isinstance(boxes, torch.Tensor):
        tensor = boxes.detach().to(dtype=torch.float32, device="cpu")
    else:
        rows = [list(box) for box in boxes]
        if any(len(row) != 4 for row in rows):
            raise ValueError(f"every box needs 4 numbers (x1, y1, x2, y2), got {rows}")
        try:
            tensor = torch.tensor(rows, dtype=torch.float32).reshape(len(rows), 4)
        except (TypeError, ValueError) as err:
            raise ValueError(f"boxes must be numbers: {err}") from err
    if tensor.ndim != 2 or tensor.shape[1] != 4:
        raise ValueError(f"boxes must have shape [n, 4], got {tuple(tensor.shape)}")
    return tensor


def normalize_boxes(
    boxes_px: torch.Tensor | Sequence[BoxLike], width: float, height: float, min_size: float = MIN_BOX_SIZE
) -> torch.Tensor:
    """Pixel ``xyxy`` boxes of a ``width`` × ``height`` image → sanitized normalized ``xyxy`` ``[n, 4]``.

    Normalization uses the original image size, as GPT4RoI did (the image is stretched, not cropped).
    """
    _check_image_size(width, height)
    tensor = _as_box_tensor(boxes_px)
    scale = torch.tensor([width, height, width, height], dtype=torch.float32)
    return sanitize_boxes(tensor / scale, min_size=min_size)


def _check_image_size(width: float, height: float) -> None:
    for name, value in (("width", width), ("height", height)):
        if not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"image {name} must be a positive number of pixels, got {value!r}")


# ------------------------------------------------------------------- images
def to_rgb(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation and convert to 8-bit RGB (alpha dropped, grayscale expanded)."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL.Image.Image, got {type(image).__name__}")
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I", "I;16", "I;16B", "I;16L"):
        # 16-bit grayscale (e.g. some PNGs): PIL's own conversion would clip at 255 instead of scaling.
        array = np.asarray(image, dtype=np.float64) / 257.0
        image = Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8), mode="L")
    elif image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8), mode="L")
    elif image.mode == "P":
        image = image.convert("RGBA")
    return image.convert("RGB") if image.mode != "RGB" else image


def clip_preprocess(image: Image.Image, size: int, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """CLIPImageProcessor (transformers 4.28/4.29) without centre crop: float32 ``[3, h, w]``.

    The shortest edge becomes ``size`` (the longer one ``int(size * long / short)``), resized with PIL's
    bicubic filter, then rescaled by 1/255 and normalized with ``mean``/``std``.
    """
    image = to_rgb(image)
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    if short != size:
        new_short, new_long = size, int(size * long / short)
        new_size = (new_short, new_long) if width <= height else (new_long, new_short)
        image = image.resize(new_size, resample=Image.Resampling.BICUBIC)
    array = np.asarray(image, dtype=np.float64) / 255.0
    array = (array - np.asarray(mean, dtype=np.float64)) / np.asarray(std, dtype=np.float64)
    return np.ascontiguousarray(array.transpose(2, 0, 1), dtype=np.float32)


# ---------------------------------------------------------------- processor
class GPT4RoIProcessor:
    """Turns (prompt, image, boxes) into model inputs, and conversations into training examples."""

    def __init__(
        self,
        tokenizer: GPT4RoITokenizer,
        image_size: int = 224,
        num_image_tokens: int = 256,
        image_mean: Sequence[float] = CLIP_MEAN,
        image_std: Sequence[float] = CLIP_STD,
    ) -> None:
        """``image_size`` is the side S of the square model input; ``num_image_tokens`` is
        ``(S // patch_size) ** 2`` (256 for the 7B's 224 px and 14-px patches)."""
        if not isinstance(tokenizer, GPT4RoITokenizer):
            raise TypeError(f"tokenizer must be a GPT4RoITokenizer, got {type(tokenizer).__name__}")
        if int(image_size) <= 0 or int(num_image_tokens) <= 0:
            raise ValueError(
                f"image_size and num_image_tokens must be positive: {image_size}, {num_image_tokens}"
            )
        if len(image_mean) != 3 or len(image_std) != 3 or min(image_std) <= 0:
            raise ValueError("image_mean and image_std need 3 values each, std positive")
        self.tokenizer = tokenizer
        self.image_size = int(image_size)
        self.num_image_tokens = int(num_image_tokens)
        self.image_mean = tuple(float(v) for v in image_mean)
        self.image_std = tuple(float(v) for v in image_std)
        self.image_block = IM_START_TOKEN + IMAGE_PATCH_TOKEN * self.num_image_tokens + IM_END_TOKEN

    # ------------------------------------------------------------ images
    def preprocess_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Images → ``float32 [B, 3, S, S]``: CLIP preprocessing, then a bilinear stretch to S×S."""
        if isinstance(images, Image.Image):
            images = [images]
        if len(images) == 0:
            raise ValueError("preprocess_images needs at least one image")
        tensors = []
        for image in images:
            array = clip_preprocess(image, self.image_size, self.image_mean, self.image_std)
            tensor = torch.from_numpy(array).unsqueeze(0)
            tensor = F.interpolate(
                tensor, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False
            )
            tensors.append(tensor)
        return torch.cat(tensors, dim=0)

    # ------------------------------------------------------------- text
    def expand_image_tokens(self, text: str) -> str:
        """Replace each ``<image>`` with ``<im_start>`` + N × ``<im_patch>`` + ``<im_end>``."""
        return text.replace(IMAGE_TOKEN, self.image_block)

    def __call__(
        self,
        prompts: Sequence[str],
        images: Sequence[Image.Image],
        boxes: Sequence[torch.Tensor | Sequence[BoxLike]],
        image_index: Sequence[int] | None = None,
    ) -> dict[str, Any]:
        """Build a left-padded generation batch.

        ``prompts`` are full prompts (e.g. from :func:`model.gpt4roi.prompts.build_prompt`), each with exactly one
        ``<image>``; ``boxes[i]`` are prompt i's normalized ``xyxy`` boxes, one per ``<bbox>`` in order.
        ``image_index[i]`` says which of ``images`` prompt i shows; it may be omitted when there is one image
        per prompt or a single image for all. Each distinct image is preprocessed once.

        Returns ``input_ids`` and ``attention_mask`` ``[B, T]`` (left padding with ``pad_token_id``),
        ``pixel_values`` ``[n_images, 3, S, S]``, ``image_index`` ``[B]`` and ``boxes`` (a list of
        ``[n_i, 4]`` tensors).
        """
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings, not a single string")
        if len(prompts) == 0:
            raise ValueError("at least one prompt is needed")
        if len(boxes) != len(prompts):
            raise ValueError(
                f"got {len(prompts)} prompts but {len(boxes)} box lists; give one list per prompt"
            )
        index = self._image_index(len(prompts), len(images), image_index)
        sequences: list[list[int]] = []
        clean_boxes: list[torch.Tensor] = []
        for i, (prompt, prompt_boxes) in enumerate(zip(prompts, boxes, strict=True)):
            if prompt.count(IMAGE_TOKEN) != 1:
                raise ValueError(
                    f"prompt {i} must contain exactly one {IMAGE_TOKEN}, found {prompt.count(IMAGE_TOKEN)}"
                )
            sanitized = sanitize_boxes(prompt_boxes)
            try:
                check_bbox_count(prompt, len(sanitized))
            except ValueError as err:
                raise ValueError(f"prompt {i}: {err}") from None
            ids = self.tokenizer.encode(self.expand_image_tokens(prompt))
            if len(ids) > self.tokenizer.model_max_length:
                raise ValueError(
                    f"prompt {i} is {len(ids)} tokens long, more than the model's "
                    f"{self.tokenizer.model_max_length}"
                )
            sequences.append(ids)
            clean_boxes.append(sanitized)
        input_ids, attention_mask = pad_sequences(sequences, self.tokenizer.pad_token_id, left=True)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "pixel_values": self.preprocess_images(images),
            "image_index": torch.tensor(index, dtype=torch.long),
            "boxes": clean_boxes,
        }

    @staticmethod
    def _image_index(n_prompts: int, n_images: int, image_index: Sequence[int] | None) -> list[int]:
        if n_images == 0:
            raise ValueError("at least one image is needed")
        if image_index is None:
            if n_images == n_prompts:
                return list(range(n_prompts))
            if n_images == 1:
                return [0] * n_prompts
            raise ValueError(
                f"{n_prompts} prompts and {n_images} images: pass image_index to say which image each "
                "prompt uses"
            )
        index = [int(i) for i in image_index]
        if len(index) != n_prompts:
            raise ValueError(f"image_index has {len(index)} entries for {n_prompts} prompts")
        if any(not 0 <= i < n_images for i in index):
            raise ValueError(f"image_index {index} refers to images outside 0..{n_images - 1}")
        return index

    # --------------------------------------------------------- training
    def encode_conversation(
        self, turns: Sequence[Mapping[str, str]], max_length: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenize a training conversation and mark what the loss sees; returns ``(input_ids, labels)``.

        ``turns`` are ``{"from": "human"|"gpt", "value": ...}`` items without the image prefix (added
        here). Labels equal the ids on the tokens of every ``"Assistant: {answer}\\n###"`` and are
        ``IGNORE_INDEX`` elsewhere.

        The whole conversation is tokenized at once (so ids are exactly what the model sees at inference)
        and a token is a target when its characters overlap a target span. This deliberately differs from
        GPT4RoI's ``_mask_targets``, whose per-sentence token counts drift by one token per turn and which
        also trained on the human turns' ``###``. Sequences longer than ``max_length`` (default: the
        tokenizer's ``model_max_length``) are cut on the right.
        """
        segments = conversation_segments(turns)
        text = ""
        targets: list[tuple[int, int]] = []
        for piece, is_target in segments:
            piece = self.expand_image_tokens(piece)
            if is_target:
                targets.append((len(text), len(text) + len(piece)))
            text += piece
        encoded = self.tokenizer.encode_with_offsets(text)
        ids = [token_id for token_id, _, _ in encoded]
        labels = [IGNORE_INDEX] * len(ids)
        for position, (token_id, start, end) in enumerate(encoded):
            if any(start < t_end and end > t_start for t_start, t_end in targets):
                labels[position] = token_id
        limit = self.tokenizer.model_max_length if max_length is None else int(max_length)
        if limit < 1:
            raise ValueError(f"max_length must be positive, got {max_length}")
        ids, labels = ids[:limit], labels[:limit]
        if self.tokenizer.im_start_token_id in ids and self.tokenizer.im_end_token_id not in ids:
            raise ValueError(
                f"max_length={limit} cuts through the image block; it must be well above "
                f"{self.num_image_tokens + 2} tokens"
            )
        return torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long)

    def training_sample(
        self,
        turns: Sequence[Mapping[str, str]],
        image: Image.Image,
        boxes: torch.Tensor | Sequence[BoxLike],
        max_length: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """One training example: ids and labels, pixel values and the boxes its ``<bbox>`` tokens use.

        ``boxes`` are normalized ``xyxy``, one per ``<bbox>`` in the whole conversation. When truncation
        drops trailing ``<bbox>`` tokens, their boxes are dropped too, so counts always agree.
        """
        sanitized = sanitize_boxes(boxes)
        text = "".join(str(turn.get("value", "")) for turn in turns)
        check_bbox_count(text, len(sanitized))
        input_ids, labels = self.encode_conversation(turns, max_length=max_length)
        kept = int((input_ids == self.tokenizer.bbox_token_id).sum())
        return {
            "input_ids": input_ids,
            "labels": labels,
            "pixel_values": self.preprocess_images([image])[0],
            "boxes": sanitized[:kept],
        }

    def collate_for_training(self, samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """Batch :meth:`training_sample` outputs with RIGHT padding (labels padded with ``IGNORE_INDEX``).

        Returns ``input_ids``, ``attention_mask``, ``labels`` ``[B, T]``, ``pixel_values`` ``[B, 3, S, S]``,
        ``image_index`` (``0 .. B-1``) and ``boxes`` (a list of ``[n_i, 4]`` tensors).
        """
        if len(samples) == 0:
            raise ValueError("cannot collate an empty list of samples")
        for i, sample in enumerate(samples):
            missing = {"input_ids", "labels", "pixel_values", "boxes"} - set(sample)
            if missing:
                raise ValueError(f"sample {i} lacks {sorted(missing)}")
            if len(sample["input_ids"]) != len(sample["labels"]):
                raise ValueError(f"sample {i}: input_ids and labels differ in length")
            found = int((torch.as_tensor(sample["input_ids"]) == self.tokenizer.bbox_token_id).sum())
            if found != len(sample["boxes"]):
                raise ValueError(
                    f"sample {i} has {found} {BBOX_TOKEN} tokens but {len(sample['boxes'])} boxes"
                )
        input_ids, attention_mask = pad_sequences(
            [s["input_ids"].tolist() for s in samples], self.tokenizer.pad_token_id
        )
        labels, _ = pad_sequences([s["labels"].tolist() for s in samples], IGNORE_INDEX)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "pixel_values": torch.stack([s["pixel_values"] for s in samples]),
            "image_index": torch.arange(len(samples), dtype=torch.long),
            "boxes": [torch.as_tensor(s["boxes"], dtype=torch.float32).reshape(-1, 4) for s in samples],
        }

    # ------------------------------------------------------- persistence
    def save_pretrained(self, save_directory: str | Path) -> list[Path]:
        """Write ``processor_config.json`` and the tokenizer files into ``save_directory``."""
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = {
            "processor_class": type(self).__name__,
            "image_size": self.image_size,
            "num_image_tokens": self.num_image_tokens,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
        }
        path = directory / PROCESSOR_CONFIG_FILE
        path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        return [path, *self.tokenizer.save_pretrained(directory)]

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> GPT4RoIProcessor:
        """Load a directory written by :meth:`save_pretrained`."""
        directory = Path(directory)
        path = directory / PROCESSOR_CONFIG_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: not a GPT4RoI processor directory")
        config = json.loads(path.read_text(encoding="utf-8"))
        return cls(
            GPT4RoITokenizer.from_pretrained(directory),
            image_size=config["image_size"],
            num_image_tokens=config["num_image_tokens"],
            image_mean=config.get("image_mean", CLIP_MEAN),
            image_std=config.get("image_std", CLIP_STD),
        )


def pad_sequences(
    sequences: Sequence[Sequence[int]], value: int, left: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad to the longest sequence; returns the padded ids and the 0/1 mask of real tokens."""
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), value, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        if not sequence:
            continue
        span = slice(length - len(sequence), length) if left else slice(0, len(sequence))
        ids[row, span] = torch.tensor(list(sequence), dtype=torch.long)
        mask[row, span] = 1
    return ids, mask
