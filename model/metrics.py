"""Evaluation metrics: COCO caption scores, closed-set accuracy, confusion tables.

Caption scores come from ``pycocoevalcap`` (the COCO caption evaluation code): BLEU-1..4, METEOR 1.5,
ROUGE-L and CIDEr (CIDEr-D as implemented there), after the same PTB tokenization and punctuation removal
COCO uses. METEOR and the tokenizer are Java programs shipped inside ``pycocoevalcap``: ``java`` must be
on ``PATH``; nothing is downloaded. METEOR spends some 10-20 s loading its paraphrase table, so it can be
switched off; it is then missing from the result rather than reported as a number it is not. SPICE is not
computed (it needs Stanford CoreNLP models that are downloaded on first use).

Closed-set answers (attributes, yes/no, region names) are compared after case folding and whitespace and
end-punctuation normalization, so ``"Red."`` counts as ``"red"``.
"""

from __future__ import annotations

import contextlib
import io
import math
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "CAPTION_METRICS",
    "ConfusionTable",
    "caption_metrics",
    "closed_set_accuracy",
    "confusion_table",
    "format_table",
    "normalize_answer",
    "ptb_tokenize",
]

#: Keys of :func:`caption_metrics`, in report order.
CAPTION_METRICS: tuple[str, ...] = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")

_OTHER = "(other)"


# ------------------------------------------------------------ caption scores
def caption_metrics(
    references: Mapping[str, Sequence[str]],
    predictions: Mapping[str, str],
    *,
    meteor: bool = True,
) -> dict[str, float]:
    """COCO caption scores of ``predictions`` against ``references`` (both keyed by region id).

    Every id needs at least one non-empty reference and exactly one prediction (an empty prediction is
    allowed and scores zero). Returns the keys of :data:`CAPTION_METRICS` (without ``METEOR`` when
    ``meteor`` is false). CIDEr weighs n-grams by their rarity across the references given, so it is only
    meaningful over many regions; a single region always scores 0. Raises ``ValueError`` for mismatched or
    empty inputs and ``RuntimeError`` when Java or a scorer fails.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    ids = _check_caption_inputs(references, predictions)
    flat = [text for key in ids for text in references[key]] + [predictions[key] for key in ids]
    tokens = iter(ptb_tokenize(flat))
    gts = {key: [next(tokens) for _ in references[key]] for key in ids}
    res = {key: [next(tokens)] for key in ids}

    scores: dict[str, float] = {}
    # pycocoevalcap's BLEU prints its n-gram statistics to stdout; keep the caller's output clean.
    with contextlib.redirect_stdout(io.StringIO()):
        bleu, _ = Bleu(4).compute_score(gts, res)
    for n, value in enumerate(bleu, start=1):
        scores[f"BLEU-{n}"] = float(value)
    if meteor:
        scores["METEOR"] = _meteor(gts, res)
    scores["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
    scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    return {name: scores[name] for name in CAPTION_METRICS if name in scores}


def _check_caption_inputs(references: Mapping[str, Sequence[str]], predictions: Mapping[str, str]) -> list[str]:
    if not references:
        raise ValueError("no references: caption metrics need at least one region")
    missing = sorted(set(references) - set(predictions))
    extra = sorted(set(predictions) - set(references))
    if missing or extra:
        raise ValueError(
            "references and predictions must have the same ids; "
            f"without prediction: {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"without reference: {extra[:5]}{'...' if len(extra) > 5 else ''}"
        )
    for key in references:
        refs = references[key]
        if isinstance(refs, str) or not isinstance(refs, Sequence) or not refs:
            raise ValueError(f"references[{key!r}] must be a non-empty list of strings, got {refs!r}")
        if not all(isinstance(text, str) and text.strip() for text in refs):
            raise ValueError(f"references[{key!r}] contains an empty or non-string reference: {refs!r}")
        if not isinstance(predictions[key], str):
            raise ValueError(f"predictions[{key!r}] must be a string, got {type(predictions[key]).__name__}")
    return list(references)


def ptb_tokenize(texts: Sequence[str]) -> list[str]:
    """Tokenize like the COCO evaluation: Stanford PTBTokenizer, lower case, punctuation tokens removed.

    Same command and punctuation list as ``pycocoevalcap.tokenizer.PTBTokenizer``, but the text goes through
    stdin instead of a temporary file written inside the installed package (which fails where site-packages
    is read-only). Returns one space-joined token string per input text.
    """
    from pycocoevalcap.tokenizer import ptbtokenizer

    if not texts:
        return []
    jar = Path(ptbtokenizer.__file__).with_name(ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR)
    command = [_java(), "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase"]
    lines = "".join(text.replace("\r", " ").replace("\n", " ") + "\n" for text in texts)
    result = subprocess.run(command, input=lines.encode("utf-8"), capture_output=True, check=False, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"PTB tokenizer failed (exit {result.returncode}): {result.stderr.decode()[-2000:]}")
    output = result.stdout.decode("utf-8").split("\n")
    if len(output) < len(texts):
        raise RuntimeError(f"PTB tokenizer returned {len(output)} lines for {len(texts)} texts")
    punctuation = set(ptbtokenizer.PUNCTUATIONS)
    return [" ".join(token for token in line.split() if token not in punctuation) for line in output[: len(texts)]]


def _meteor(gts: Mapping[str, list[str]], res: Mapping[str, list[str]]) -> float:
    from pycocoevalcap.meteor.meteor import Meteor

    _java()
    scorer = Meteor()
    try:
        return float(scorer.compute_score(gts, res)[0])
    except (ValueError, BrokenPipeError) as error:
        process = scorer.meteor_p
        process.kill()
        stderr = process.stderr.read().decode(errors="replace")[-2000:] if process.stderr else ""
        raise RuntimeError(f"METEOR failed ({error}); java said: {stderr or 'nothing'}") from error
    finally:
        # A failed compute_score leaves its lock held, and the scorer's __del__ would wait on it forever.
        if scorer.lock.locked():
            scorer.lock.release()
        # The scorer keeps a JVM with a 2 GB heap alive until garbage collection; end it now.
        process = scorer.meteor_p
        if process.poll() is None:
            process.stdin.close()
            process.kill()
        process.wait()


def _java() -> str:
    java = shutil.which("java")
    if java is None:
        raise RuntimeError("caption metrics need Java: METEOR and the PTB tokenizer are Java programs (install a JRE)")
    return java


# ------------------------------------------------------- closed-set answers
def normalize_answer(text: str) -> str:
    """Case-folded, single-spaced, without surrounding punctuation: ``" Red. "`` → ``"red"``."""
    return " ".join(text.casefold().split()).strip(".,;:!?\"' ")


def closed_set_accuracy(truth: Sequence[str], predicted: Sequence[str]) -> float:
    """Share of answers equal to the truth after :func:`normalize_answer` (a number in [0, 1])."""
    _check_pairs(truth, predicted)
    hits = sum(normalize_answer(t) == normalize_answer(p) for t, p in zip(truth, predicted, strict=True))
    return hits / len(truth)


def _check_pairs(truth: Sequence[str], predicted: Sequence[str]) -> None:
    if len(truth) != len(predicted):
        raise ValueError(f"truth has {len(truth)} answers but predicted has {len(predicted)}")
    if not truth:
        raise ValueError("no answers to score")
    for name, values in (("truth", truth), ("predicted", predicted)):
        for position, value in enumerate(values):
            if not isinstance(value, str):
                raise ValueError(f"{name} must hold strings, found {type(value).__name__} at {position}: {value!r}")


@dataclass(frozen=True)
class ConfusionTable:
    """Counts of (true label, predicted label) pairs.

    Rows follow ``labels`` (true labels); columns follow ``labels`` plus a last ``(other)`` column for
    predictions outside the label set (a generated answer can be anything).
    """

    labels: tuple[str, ...]
    counts: tuple[tuple[int, ...], ...]

    def count(self, truth: str, predicted: str) -> int:
        """How often ``truth`` was answered ``predicted`` (``"(other)"`` for outside the label set)."""
        row = self.labels.index(truth)
        column = len(self.labels) if predicted == _OTHER else self.labels.index(predicted)
        return self.counts[row][column]

    def recall(self) -> dict[str, float]:
        """Per true label, the share answered correctly (NaN for a label that never occurs)."""
        return {
            label: (row[i] / sum(row)) if sum(row) else math.nan
            for i, (label, row) in enumerate(zip(self.labels, self.counts, strict=True))
        }

    def to_text(self) -> str:
        """The table as aligned plain text, true labels down, predictions across."""
        header = ["truth \\ predicted", *self.labels, _OTHER]
        return format_table(header, [[label, *row] for label, row in zip(self.labels, self.counts, strict=True)])


def confusion_table(truth: Sequence[str], predicted: Sequence[str], labels: Sequence[str]) -> ConfusionTable:
    """Count answers per (true, predicted) label after :func:`normalize_answer`.

    ``labels`` is the closed set; every true answer must be one of them (``ValueError`` otherwise), while
    predictions outside it are counted in the ``(other)`` column.
    """
    _check_pairs(truth, predicted)
    names = tuple(normalize_answer(label) for label in labels)
    if not names or len(set(names)) != len(names):
        raise ValueError(f"labels must be a non-empty list of distinct names, got {list(labels)}")
    if _OTHER in names:
        raise ValueError(f"{_OTHER!r} is reserved for predictions outside the label set")
    index = {name: i for i, name in enumerate(names)}
    counts = [[0] * (len(names) + 1) for _ in names]
    for t, p in zip(truth, predicted, strict=True):
        row = index.get(normalize_answer(t))
        if row is None:
            raise ValueError(f"true answer {t!r} is not one of the labels {list(names)}")
        counts[row][index.get(normalize_answer(p), len(names))] += 1
    return ConfusionTable(labels=names, counts=tuple(tuple(row) for row in counts))


# ------------------------------------------------------------------ tables
def format_table(header: Sequence[str], rows: Sequence[Sequence[object]], float_format: str = ".3f") -> str:
    """Render rows as an aligned plain-text table: text left-aligned, numbers right-aligned.

    Floats use ``float_format``; NaN prints as ``-``. Every row must have as many cells as the header.
    """
    for number, row in enumerate(rows):
        if len(row) != len(header):
            raise ValueError(f"row {number} has {len(row)} cells but the header has {len(header)}")

    def cell(value: object) -> str:
        if isinstance(value, float):
            return "-" if math.isnan(value) else format(value, float_format)
        return str(value)

    text_rows = [[cell(value) for value in row] for row in rows]
    numeric = [
        all(isinstance(row[i], int | float) and not isinstance(row[i], bool) for row in rows) and bool(rows)
        for i in range(len(header))
    ]
    widths = [max([len(str(header[i]))] + [len(row[i]) for row in text_rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        parts = [c.rjust(w) if num else c.ljust(w) for c, w, num in zip(cells, widths, numeric, strict=True)]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line([str(h) for h in header]), rule, *(line(row) for row in text_rows)])
