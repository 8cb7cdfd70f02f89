"""Prompt templates of GPT4RoI: the Vicuna-v0 conversation format and the project's region questions.

This module is the single source of truth for every string the model is prompted or trained with: the
synthetic data generator, the inference code, the Label Studio backend and the answer scorer all build
their questions here, so a template changed in one place changes everywhere.

The conversation format is LLaVA-v0's (``_add_speaker_and_signal`` in GPT4RoI's ``train.py``)::

    {system}\\n\\n### Human: {msg}\\n### Assistant: {msg}\\n### Human: ...\\n###<space>

An inference prompt ends with ``"\\n### "``; the model continues with ``Assistant: <answer>\\n###``.
The first human message starts with :data:`IMAGE_PREFIX`. Each region is referenced as
``region{k} <bbox>`` and the k-th ``<bbox>`` of the whole conversation receives the k-th box.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from .tokenization_gpt4roi import BBOX_TOKEN

__all__ = [
    "ASSISTANT_ROLE",
    "BBOX_TOKEN",
    "HUMAN_ROLE",
    "IMAGE_PREFIX",
    "IMAGE_TOKEN",
    "RELATIONS",
    "STOP_STRING",
    "SYSTEM_PROMPT",
    "attribute_question",
    "build_conversation",
    "build_prompt",
    "caption_question",
    "check_bbox_count",
    "conversation_segments",
    "count_bbox_tokens",
    "parse_answer",
    "region_ref",
    "region_refs",
    "relation_answer",
    "relation_candidates",
    "relation_question",
    "transcription_question",
]

SYSTEM_PROMPT = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
#: Placeholder for the image block; the processor expands it to ``<im_start>`` + N × ``<im_patch>`` +
#: ``<im_end>``.
IMAGE_TOKEN = "<image>"
IMAGE_PREFIX = f"The {IMAGE_TOKEN} provides an overview of the picture.\n"
HUMAN_ROLE = "Human"
ASSISTANT_ROLE = "Assistant"
#: Opens every turn and ends every answer; generation stops when it appears.
STOP_STRING = "###"
_TURN_START = f"{STOP_STRING} "
_HEADER = f"{SYSTEM_PROMPT}\n\n"
_ASSISTANT_PREFIX = f"{ASSISTANT_ROLE}:"

_ROLE_BY_SPEAKER = {"human": HUMAN_ROLE, "gpt": ASSISTANT_ROLE}


# ------------------------------------------------------------------ regions
def region_ref(k: int) -> str:
    """First mention of region ``k`` (1-based): ``"region{k} <bbox>"``."""
    _check_region_index(k)
    return f"region{k} {BBOX_TOKEN}"


def region_refs(n: int, start: int = 1) -> str:
    """``n`` consecutive region mentions in GPT4RoI's multi-region form: ``"region1 <bbox>,region2 <bbox>,"``.

    The trailing comma is how the training data (Flickr30k, VCR) wrote the list.
    """
    if n < 1:
        raise ValueError(f"region_refs needs n >= 1, got {n}")
    return "".join(f"{region_ref(k)}," for k in range(start, start + n))


def _check_region_index(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"region numbers are integers starting at 1, got {k!r}")


# ---------------------------------------------------------------- questions
def caption_question(k: int = 1) -> str:
    """Ask for a description of region ``k``: the caption prompt of the paper's Table 5."""
    return f"Can you give a description of the region mentioned by {region_ref(k)}?"


def transcription_question(k: int = 1) -> str:
    """Ask for the text written in region ``k`` (OCR)."""
    return f"What text is written in the region mentioned by {region_ref(k)}?"


def attribute_question(attribute: str, k: int = 1) -> str:
    """Ask for one attribute of region ``k``, e.g. ``attribute_question("color")``.

    ``attribute`` is a plain noun phrase such as ``"color"``, ``"shape"``, ``"category"`` or ``"material"``.
    """
    if not isinstance(attribute, str) or not attribute.strip():
        raise ValueError(f"attribute must be a non-empty string, got {attribute!r}")
    if attribute != attribute.strip() or BBOX_TOKEN in attribute or IMAGE_TOKEN in attribute:
        raise ValueError(f"attribute must be plain text without surrounding spaces or tokens: {attribute!r}")
    return f"What is the {attribute} of {region_ref(k)}?"


#: Two-region relations: the question template and how the answer is read off two boxes.
RELATIONS: Mapping[str, str] = {
    "left_of": "Is {a} left of {b}?",
    "above": "Is {a} above {b}?",
    "larger": "Which is larger, {a} or {b}?",
}


def relation_question(relation: str, a: int = 1, b: int = 2) -> str:
    """Ask about two regions, e.g. ``"Is region1 <bbox> left of region2 <bbox>?"``.

    ``relation`` is one of :data:`RELATIONS`. ``left_of`` and ``above`` are answered ``yes``/``no``;
    ``larger`` is answered with the region's name (``region1``/``region2``).
    """
    template = _relation_template(relation)
    if a == b:
        raise ValueError(f"a relation needs two different regions, got region{a} twice")
    return template.format(a=region_ref(a), b=region_ref(b))


def relation_candidates(relation: str, a: int = 1, b: int = 2) -> tuple[str, str]:
    """The two possible answers to :func:`relation_question` (for candidate scoring)."""
    _relation_template(relation)
    if relation == "larger":
        return (f"region{a}", f"region{b}")
    return ("yes", "no")


def relation_answer(
    relation: str,
    box_a: Sequence[float],
    box_b: Sequence[float],
    a: int = 1,
    b: int = 2,
) -> str:
    """The correct answer to :func:`relation_question` for two ``xyxy`` boxes (any common unit).

    ``left_of``: the centre of ``box_a`` lies strictly left of the centre of ``box_b``. ``above``: its
    centre lies strictly higher (smaller y). ``larger``: the box with the larger area; equal areas have no
    answer and raise ``ValueError``, so callers generating data must avoid them.
    """
    _relation_template(relation)
    xa1, ya1, xa2, ya2 = (float(v) for v in box_a)
    xb1, yb1, xb2, yb2 = (float(v) for v in box_b)
    if relation == "left_of":
        return "yes" if xa1 + xa2 < xb1 + xb2 else "no"
    if relation == "above":
        return "yes" if ya1 + ya2 < yb1 + yb2 else "no"
    area_a = (xa2 - xa1) * (ya2 - ya1)
    area_b = (xb2 - xb1) * (yb2 - yb1)
    if math.isclose(area_a, area_b, rel_tol=1e-9, abs_tol=0.0):
        raise ValueError(f"regions of equal area ({area_a}) have no 'larger' answer")
    return f"region{a}" if area_a > area_b else f"region{b}"


def _relation_template(relation: str) -> str:
    try:
        return RELATIONS[relation]
    except KeyError:
        raise ValueError(f"unknown relation {relation!r}; expected one of {sorted(RELATIONS)}") from None


# ---------------------------------------------------------- <bbox> counting
def count_bbox_tokens(text: str) -> int:
    """Number of ``<bbox>`` tokens in ``text``: each one consumes one box."""
    return text.count(BBOX_TOKEN)


def check_bbox_count(text: str, n_boxes: int) -> None:
    """Raise ``ValueError`` unless ``text`` has exactly one ``<bbox>`` per box.

    The original model fails deep inside the forward pass with a shape error when these differ; checking
    before tokenization gives the caller a message it can act on.
    """
    found = count_bbox_tokens(text)
    if found != n_boxes:
        raise ValueError(
            f"the prompt has {found} {BBOX_TOKEN} token(s) but {n_boxes} box(es) were given; each box needs "
            f"exactly one '{region_ref(1)}'-style mention (mention a region again as plain 'region1')"
        )


# ------------------------------------------------------------ conversations
def build_prompt(turns: Sequence[tuple[str, str | None]]) -> str:
    """Render ``(human message, assistant answer)`` turns in the v0 template.

    :data:`IMAGE_PREFIX` is put in front of the first human message. Only the last turn may have no answer
    (``None``): that is an inference prompt, and like every v0 conversation it ends with ``"\\n### "``.
    """
    messages: list[dict[str, str]] = []
    for index, turn in enumerate(turns):
        if not isinstance(turn, tuple | list) or len(turn) != 2:
            raise ValueError(f"turn {index} must be a (human, assistant) pair, got {turn!r}")
        human, answer = turn
        if answer is None and index != len(turns) - 1:
            raise ValueError(f"only the last turn may be unanswered; turn {index} has no answer")
        messages.append({"from": "human", "value": human})
        if answer is not None:
            messages.append({"from": "gpt", "value": answer})
    return build_conversation(messages)


def build_conversation(messages: Sequence[Mapping[str, str]], add_image_prefix: bool = True) -> str:
    """Render a conversation in the training-data form (``{"from": "human"|"gpt", "value": ...}`` items)."""
    return "".join(text for text, _ in conversation_segments(messages, add_image_prefix=add_image_prefix))


def conversation_segments(
    messages: Sequence[Mapping[str, str]], add_image_prefix: bool = True
) -> list[tuple[str, bool]]:
    """Split a rendered conversation into ``(text, is_target)`` pieces whose concatenation is the prompt.

    Targets are the spans the model must learn to produce: ``"Assistant: {answer}\\n###"`` for every
    answer (the role name, the answer and the stop string that follows it). Everything else — system
    prompt, human turns, the ``"### "`` that opens a turn — is context. The first human message gets
    :data:`IMAGE_PREFIX` unless ``add_image_prefix`` is false; a message that already contains
    ``<image>`` is rejected, since the prefix is added here and only once.
    """
    if not messages:
        raise ValueError("a conversation needs at least one message")
    text = _HEADER
    targets: list[tuple[int, int]] = []
    for index in range(len(messages)):
        speaker, value = _checked_message(messages, index)
        text += _TURN_START
        if speaker == "human":
            prefix = IMAGE_PREFIX if index == 0 and add_image_prefix else ""
            text += f"{HUMAN_ROLE}: {prefix}{value}\n"
        else:
            # The "### " before "Assistant" is context (an inference prompt ends with it); the "###" that
            # opens the next turn is the answer's stop string and is what teaches the model to stop.
            start = len(text)
            text += f"{ASSISTANT_ROLE}: {value}\n"
            targets.append((start, len(text) + len(STOP_STRING)))
    text += _TURN_START
    segments: list[tuple[str, bool]] = []
    position = 0
    for start, stop in targets:
        segments.append((text[position:start], False))
        segments.append((text[start:stop], True))
        position = stop
    segments.append((text[position:], False))
    return [(piece, is_target) for piece, is_target in segments if piece]


def _checked_message(messages: Sequence[Mapping[str, str]], index: int) -> tuple[str, str]:
    message = messages[index]
    speaker = message.get("from") if isinstance(message, Mapping) else None
    value = message.get("value") if isinstance(message, Mapping) else None
    if speaker not in _ROLE_BY_SPEAKER:
        raise ValueError(f"message {index}: 'from' must be 'human' or 'gpt', got {speaker!r}")
    if not isinstance(value, str):
        raise ValueError(f"message {index}: 'value' must be a string, got {type(value).__name__}")
    if index == 0 and speaker != "human":
        raise ValueError("a conversation must start with a human message")
    if index > 0 and speaker == messages[index - 1].get("from"):
        raise ValueError(f"message {index}: human and gpt messages must alternate")
    if IMAGE_TOKEN in value:
        raise ValueError(
            f"message {index} contains {IMAGE_TOKEN}; the image prefix is added to the first message"
        )
    if STOP_STRING in value:
        raise ValueError(f"message {index} contains the stop string {STOP_STRING!r}: {value!r}")
    return speaker, value


def parse_answer(text: str) -> str:
    """Extract the answer from generated text (spec §4.5).

    Keeps what comes before the first ``###``, strips whitespace, then removes a leading ``Assistant:``.
    The result can be empty when the model produced nothing; callers treat that as a failed answer.
    """
    answer = text.split(STOP_STRING, 1)[0].strip()
    if answer.startswith(_ASSISTANT_PREFIX):
        answer = answer[len(_ASSISTANT_PREFIX) :].strip()
    return answer
