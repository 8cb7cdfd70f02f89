"""Evaluation metrics (model/metrics.py): real pycocoevalcap scores, closed-set accuracy, confusion, tables."""

from __future__ import annotations

import math

import pytest

from model.metrics import (
    CAPTION_METRICS,
    caption_metrics,
    closed_set_accuracy,
    confusion_table,
    format_table,
    normalize_answer,
    ptb_tokenize,
)

REFERENCES = {
    "r1": ["a large red striped circle"],
    "r2": ["a small blue solid square"],
    "r3": ["a medium green dotted star"],
    "r4": ["a small yellow striped triangle"],
    "r5": ["a large purple solid cross"],
    "r6": ["a medium orange dotted circle"],
}
WRONG = {
    "r1": "a small red striped circle",
    "r2": "a blue square",
    "r3": "a medium green dotted cross",
    "r4": "something yellow",
    "r5": "a large purple solid cross",
    "r6": "an orange dotted circle of medium size",
}


@pytest.fixture(scope="module")
def perfect_scores() -> dict[str, float]:
    return caption_metrics(REFERENCES, {key: refs[0] for key, refs in REFERENCES.items()})


@pytest.fixture(scope="module")
def wrong_scores() -> dict[str, float]:
    return caption_metrics(REFERENCES, WRONG)


@pytest.mark.slow
def test_identical_captions_get_the_maximal_score_on_every_metric(perfect_scores: dict[str, float]) -> None:
    assert list(perfect_scores) == list(CAPTION_METRICS)
    for name in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L"):
        assert perfect_scores[name] == pytest.approx(1.0, abs=1e-6), name
    # CIDEr-D is scaled by 10: identical captions with distinct references score 10.
    assert perfect_scores["CIDEr"] == pytest.approx(10.0, abs=1e-6)


@pytest.mark.slow
def test_wrong_captions_score_lower_on_every_metric(
    perfect_scores: dict[str, float], wrong_scores: dict[str, float]
) -> None:
    assert list(wrong_scores) == list(CAPTION_METRICS)
    for name in CAPTION_METRICS:
        assert 0 < wrong_scores[name] < perfect_scores[name] - 0.05, (name, wrong_scores[name])


def test_without_meteor_the_key_is_absent_not_faked() -> None:
    scores = caption_metrics(REFERENCES, WRONG, meteor=False)
    assert list(scores) == [name for name in CAPTION_METRICS if name != "METEOR"]
    assert all(math.isfinite(value) for value in scores.values())


def test_an_empty_prediction_scores_zero_and_does_not_shift_the_others() -> None:
    predictions = {key: refs[0] for key, refs in REFERENCES.items()}
    predictions["r6"] = ""
    scores = caption_metrics(REFERENCES, predictions, meteor=False)
    assert scores["ROUGE-L"] == pytest.approx(5 / 6)


def test_tokenization_lowercases_drops_punctuation_and_keeps_one_line_per_text() -> None:
    assert ptb_tokenize(["A Large, red circle.", "", "two\nlines", "it's"]) == [
        "a large red circle",
        "",
        "two lines",
        "it 's",
    ]


@pytest.mark.parametrize(
    ("references", "predictions", "problem"),
    [
        ({}, {}, "no references"),
        ({"a": ["x"]}, {"b": "x"}, r"same ids; without prediction: \['a'\], without reference: \['b'\]"),
        ({"a": []}, {"a": "x"}, r"references\['a'\] must be a non-empty list"),
        ({"a": "a red circle"}, {"a": "x"}, r"references\['a'\] must be a non-empty list"),
        ({"a": ["x", " "]}, {"a": "x"}, r"references\['a'\] contains an empty"),
        ({"a": ["x"]}, {"a": None}, r"predictions\['a'\] must be a string"),
    ],
)
def test_caption_inputs_are_checked(references, predictions, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        caption_metrics(references, predictions, meteor=False)


def test_without_java_the_error_says_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "")
    with pytest.raises(RuntimeError, match="need Java"):
        caption_metrics(REFERENCES, WRONG, meteor=False)


# ----------------------------------------------------------------- closed set
def test_closed_set_accuracy_compares_normalized_answers() -> None:
    assert normalize_answer("  Red. ") == "red"
    truth = ["red", "circle", "yes", "region2"]
    assert closed_set_accuracy(truth, ["Red.", "square", "yes", "region2"]) == 0.75
    assert closed_set_accuracy(truth, truth) == 1.0
    assert closed_set_accuracy(truth, ["", "", "", ""]) == 0.0


def test_closed_set_accuracy_refuses_mismatched_or_empty_inputs() -> None:
    with pytest.raises(ValueError, match="truth has 2 answers but predicted has 1"):
        closed_set_accuracy(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no answers"):
        closed_set_accuracy([], [])
    with pytest.raises(ValueError, match="predicted must hold strings"):
        closed_set_accuracy(["a"], [None])  # type: ignore[list-item]


def test_confusion_table_counts_each_pair_and_collects_unknown_answers() -> None:
    truth = ["red", "red", "red", "blue", "blue", "green"]
    predicted = ["red", "blue", "Red", "blue", "teal", "green"]
    table = confusion_table(truth, predicted, ["red", "green", "blue"])

    assert table.labels == ("red", "green", "blue")
    assert table.counts == ((2, 0, 1, 0), (0, 1, 0, 0), (0, 0, 1, 1))
    assert table.count("red", "blue") == 1
    assert table.count("blue", "(other)") == 1
    assert table.recall() == {"red": 2 / 3, "green": 1.0, "blue": 0.5}
    assert sum(map(sum, table.counts)) == len(truth)


def test_confusion_table_text_lists_truth_down_and_predictions_across() -> None:
    text = confusion_table(["yes", "no", "no"], ["yes", "yes", "no"], ["yes", "no"]).to_text()
    assert text.splitlines() == [
        "truth \\ predicted  yes  no  (other)",
        "-----------------  ---  --  -------",
        "yes                  1   0        0",
        "no                   1   1        0",
    ]


def test_confusion_table_refuses_truth_outside_the_labels() -> None:
    with pytest.raises(ValueError, match=r"true answer 'pink' is not one of the labels \['red'\]"):
        confusion_table(["pink"], ["red"], ["red"])
    with pytest.raises(ValueError, match="distinct"):
        confusion_table(["red"], ["red"], ["red", "Red"])


# --------------------------------------------------------------------- tables
def test_format_table_aligns_text_left_and_numbers_right() -> None:
    text = format_table(
        ["metric", "value", "n"], [["BLEU-4", 0.51234, 120], ["CIDEr", 10.0, 7], ["METEOR", math.nan, 0]]
    )
    assert text.splitlines() == [
        "metric   value    n",
        "------  ------  ---",
        "BLEU-4   0.512  120",
        "CIDEr   10.000    7",
        "METEOR       -    0",
    ]


def test_format_table_refuses_ragged_rows() -> None:
    with pytest.raises(ValueError, match="row 1 has 1 cells but the header has 2"):
        format_table(["a", "b"], [[1, 2], [3]])
