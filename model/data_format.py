"""The project's region dataset format: JSON Lines, one region conversation per line.

Every training, evaluation and correction file the project reads or writes uses this format: the synthetic
shapes generator writes it, the trainer and the evaluator read it, and the Label Studio backend appends
annotator corrections to it. One line is one JSON object::

    {"id": "train-000123-q4", "image": "images/train/000123.png", "width": 96, "height": 96,
     "boxes": [[12.0, 30.0, 50.0, 70.0]],
     "conversations": [{"from": "human", "value": "What is the color of region1 <bbox>?"},
                       {"from": "gpt", "value": "red"}],
     "meta": {"task": "attribute", "attribute": "color"}}

Fields:

``id``
    Non-empty string, unique within the file.
``image``
    Path of the image file. A relative path is relative to the folder holding the JSONL file, so a dataset
    folder can be moved or copied as a whole; an absolute path is kept as is.
``width``, ``height``
    The image's own size in pixels (positive integers).
``boxes``
    Regions as pixel ``[x1, y1, x2, y2]`` in the image's own size, with ``0 <= x1 < x2 <= width`` and
    ``0 <= y1 < y2 <= height``. The k-th ``<bbox>`` token of the whole conversation (counted over all
    human turns in order) refers to ``boxes[k-1]``; the number of ``<bbox>`` tokens equals ``len(boxes)``.
``conversations``
    Turns ``{"from": "human" | "gpt", "value": text}``, alternating, starting with a human turn and ending
    with a gpt turn. Regions are mentioned as ``region{k} <bbox>`` (see :mod:`model.gpt4roi.prompts`). Answers are
    non-empty and contain no ``<bbox>``. No turn contains ``<image>`` or the stop string ``###``: the
    processor adds the ``The <image> provides an overview of the picture.`` prefix to the first human turn
    and the ``###`` separators itself.
``meta``
    Optional JSON object, free-form (task name, attribute, ground truth, source annotation id, ...). Any
    information beyond the fields above goes here; other top-level keys are rejected so that a misspelt
    field fails loudly instead of being ignored.

Reading validates every line and reports the file, the line number and the problem. This module imports
neither torch nor PIL, so light processes (the backend's API) can use it.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from model.gpt4roi.prompts import BBOX_TOKEN, IMAGE_TOKEN, STOP_STRING, build_conversation, count_bbox_tokens

__all__ = [
    "DatasetFormatError",
    "RegionSample",
    "append_jsonl",
    "read_jsonl",
    "write_jsonl",
]

_REQUIRED_KEYS = ("id", "image", "width", "height", "boxes", "conversations")
_ALLOWED_KEYS = frozenset((*_REQUIRED_KEYS, "meta"))

Box = tuple[float, float, float, float]


class DatasetFormatError(ValueError):
    """A record that does not follow the dataset format; names the file and line when they are known."""

    def __init__(self, problem: str, path: str | os.PathLike[str] | None = None, line: int | None = None):
        self.problem = problem
        self.path = None if path is None else str(path)
        self.line = line
        where = ""
        if self.path is not None:
            where = f"{self.path}:{line}: " if line is not None else f"{self.path}: "
        elif line is not None:
            where = f"line {line}: "
        super().__init__(f"{where}{problem}")


@dataclass
class RegionSample:
    """One record of the dataset: an image, its regions and one conversation about them."""

    id: str
    image: str
    width: int
    height: int
    boxes: list[Box]
    conversations: list[dict[str, str]]
    meta: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        """Raise :class:`DatasetFormatError` (without a location) if the record breaks the format."""
        _check_record(self.to_dict())

    def to_dict(self) -> dict[str, Any]:
        """The record as a JSON-ready dict, fields in the documented order."""
        return {
            "id": self.id,
            "image": self.image,
            "width": self.width,
            "height": self.height,
            "boxes": [list(box) for box in self.boxes],
            "conversations": [dict(turn) for turn in self.conversations],
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> RegionSample:
        """Build a sample from a parsed JSON object, validating it first."""
        _check_record(record)
        return cls(
            id=record["id"],
            image=record["image"],
            width=int(record["width"]),
            height=int(record["height"]),
            boxes=[_as_box(box) for box in record["boxes"]],
            conversations=[{"from": t["from"], "value": t["value"]} for t in record["conversations"]],
            meta=dict(record.get("meta") or {}),
        )


def read_jsonl(path: str | os.PathLike[str], check_images: bool = True) -> list[RegionSample]:
    """Read and validate a dataset file.

    Relative ``image`` paths are resolved against the file's folder, so the returned samples hold absolute
    paths. With ``check_images`` every image file must exist. Blank lines are skipped. Raises
    :class:`DatasetFormatError` naming the file, the line and the problem at the first bad line, and
    ``FileNotFoundError`` if ``path`` does not exist.
    """
    path = Path(path)
    base = path.resolve().parent
    samples: list[RegionSample] = []
    first_line_of: dict[str, int] = {}
    with path.open("r", encoding="utf-8") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except json.JSONDecodeError as error:
                raise DatasetFormatError(
                    f"not valid JSON ({error.msg} at column {error.colno})", path, number
                ) from None
            try:
                sample = RegionSample.from_dict(record)
            except DatasetFormatError as error:
                raise DatasetFormatError(error.problem, path, number) from None
            if sample.id in first_line_of:
                raise DatasetFormatError(
                    f"duplicate id {sample.id!r} (first used on line {first_line_of[sample.id]})",
                    path,
                    number,
                )
            first_line_of[sample.id] = number
            image = Path(sample.image)
            if not image.is_absolute():
                image = base / image
            if check_images and not image.is_file():
                raise DatasetFormatError(f"image file not found: {image}", path, number)
            sample.image = str(image)
            samples.append(sample)
    return samples


def write_jsonl(samples: Iterable[RegionSample], path: str | os.PathLike[str]) -> Path:
    """Validate ``samples`` and write them to ``path``, replacing it atomically.

    Image paths under the file's folder are stored relative to it (so the dataset folder stays movable);
    other paths are stored as given. Ids must be unique. Returns ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = _encode(samples, path.resolve().parent)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.writelines(lines)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


def append_jsonl(samples: Iterable[RegionSample], path: str | os.PathLike[str]) -> Path:
    """Validate ``samples`` and append them to ``path`` (created if missing) in a single write.

    Ids are checked for uniqueness among the appended samples only; :func:`read_jsonl` checks the whole
    file. Returns ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = _encode(samples, path.resolve().parent)
    # One write of the whole batch: a reader never sees a batch half appended in the common case, and a
    # crash mid-write leaves at most one torn last line, which read_jsonl reports by line number.
    with path.open("a", encoding="utf-8") as handle:
        handle.write("".join(lines))
        handle.flush()
        os.fsync(handle.fileno())
    return path


def _encode(samples: Iterable[RegionSample], base: Path) -> list[str]:
    lines: list[str] = []
    seen: set[str] = set()
    for index, sample in enumerate(samples):
        if not isinstance(sample, RegionSample):
            raise TypeError(f"sample {index} is a {type(sample).__name__}, expected RegionSample")
        record = sample.to_dict()
        try:
            _check_record(record)
        except DatasetFormatError as error:
            raise DatasetFormatError(f"sample {index} (id {sample.id!r}): {error.problem}") from None
        if sample.id in seen:
            raise DatasetFormatError(f"sample {index}: duplicate id {sample.id!r}")
        seen.add(sample.id)
        record["image"] = _relative_if_inside(sample.image, base)
        lines.append(json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n")
    return lines


def _relative_if_inside(image: str, base: Path) -> str:
    image_path = Path(image)
    if not image_path.is_absolute():
        return image
    try:
        return image_path.resolve().relative_to(base).as_posix()
    except ValueError:
        return image


# --------------------------------------------------------------- validation
def _check_record(record: Any) -> None:
    if not isinstance(record, Mapping):
        raise DatasetFormatError(f"a record must be a JSON object, got {type(record).__name__}")
    missing = [key for key in _REQUIRED_KEYS if key not in record]
    if missing:
        raise DatasetFormatError(f"missing field(s) {', '.join(missing)}")
    unknown = sorted(set(record) - _ALLOWED_KEYS)
    if unknown:
        raise DatasetFormatError(f"unknown field(s) {', '.join(unknown)}; put extra information under 'meta'")
    if not isinstance(record["id"], str) or not record["id"].strip():
        raise DatasetFormatError(f"'id' must be a non-empty string, got {record['id']!r}")
    if not isinstance(record["image"], str) or not record["image"].strip():
        raise DatasetFormatError(f"'image' must be a non-empty path string, got {record['image']!r}")
    for key in ("width", "height"):
        value = record[key]
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise DatasetFormatError(f"'{key}' must be a positive integer, got {value!r}")
    meta = record.get("meta")
    if meta is not None and not isinstance(meta, Mapping):
        raise DatasetFormatError(f"'meta' must be a JSON object, got {type(meta).__name__}")
    _check_boxes(record["boxes"], record["width"], record["height"])
    _check_conversations(record["conversations"], len(record["boxes"]))


def _check_boxes(boxes: Any, width: int, height: int) -> None:
    if not isinstance(boxes, Sequence) or isinstance(boxes, str):
        raise DatasetFormatError(f"'boxes' must be a list of [x1, y1, x2, y2], got {type(boxes).__name__}")
    for index, box in enumerate(boxes):
        if (
            not isinstance(box, Sequence)
            or isinstance(box, str)
            or len(box) != 4
            or not all(_is_number(v) for v in box)
        ):
            raise DatasetFormatError(f"box {index} must be four numbers [x1, y1, x2, y2], got {box!r}")
        x1, y1, x2, y2 = (float(v) for v in box)
        if not (x2 > x1 and y2 > y1):
            raise DatasetFormatError(f"box {index} {list(box)} is empty or inverted: need x2 > x1 and y2 > y1")
        if x1 < 0 or y1 < 0 or x2 > width or y2 > height:
            raise DatasetFormatError(
                f"box {index} {list(box)} lies outside the {width}x{height} image "
                "(boxes are pixel xyxy in the image's own size)"
            )


def _as_box(box: Sequence[float]) -> Box:
    x1, y1, x2, y2 = (float(v) for v in box)
    return (x1, y1, x2, y2)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_conversations(turns: Any, n_boxes: int) -> None:
    if not isinstance(turns, Sequence) or isinstance(turns, str) or not turns:
        raise DatasetFormatError("'conversations' must be a non-empty list of turns")
    for index, turn in enumerate(turns):
        if not isinstance(turn, Mapping) or set(turn) != {"from", "value"}:
            raise DatasetFormatError(f"turn {index} must be an object with exactly 'from' and 'value', got {turn!r}")
        speaker, value = turn["from"], turn["value"]
        expected = "human" if index % 2 == 0 else "gpt"
        if speaker != expected:
            raise DatasetFormatError(
                f"turn {index} is from {speaker!r} but should be from {expected!r}: turns alternate "
                "human/gpt, starting with human"
            )
        if not isinstance(value, str) or not value.strip():
            kind = "answer" if speaker == "gpt" else "question"
            raise DatasetFormatError(f"turn {index} ({speaker}) has an empty {kind}")
        if IMAGE_TOKEN in value:
            raise DatasetFormatError(
                f"turn {index} contains {IMAGE_TOKEN}; leave it out, the processor adds the image prefix "
                "to the first human turn"
            )
        if STOP_STRING in value:
            raise DatasetFormatError(f"turn {index} contains the stop string {STOP_STRING!r}, which ends a turn")
        if speaker == "gpt" and BBOX_TOKEN in value:
            raise DatasetFormatError(f"turn {index} (gpt) contains {BBOX_TOKEN}; regions are only given in questions")
    if len(turns) % 2:
        raise DatasetFormatError("the conversation ends with a human turn; every question needs an answer")
    found = sum(count_bbox_tokens(turn["value"]) for turn in turns)
    if found != n_boxes:
        raise DatasetFormatError(
            f"the conversation has {found} {BBOX_TOKEN} token(s) but there are {n_boxes} box(es); "
            f"each box needs exactly one {BBOX_TOKEN}"
        )
    try:
        # The prompt builder has the last word: whatever it cannot render is not a valid record.
        build_conversation(turns)
    except ValueError as error:
        raise DatasetFormatError(str(error)) from None
