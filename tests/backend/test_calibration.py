"""Calibrated confidences: monotone in the model's probability, in [0, 1], fitted on what annotators kept,
and measured the way they are used (ECE, AUROC)."""

from __future__ import annotations

import random

import pytest

from backend.calibration import (
    Calibration,
    Curve,
    Observation,
    auroc,
    calibration_report,
    expected_calibration_error,
    fit,
    reliability,
    task_score,
)


def overconfident(count: int, seed: int = 0) -> list[Observation]:
    """Choices the model is sure of (raw 0.9–1.0) but annotators keep only ~70 % of, and unsure ones
    (raw 0.3–0.6) they keep ~20 % of."""
    rng = random.Random(seed)
    items = []
    for _ in range(count):
        if rng.random() < 0.5:
            items.append(Observation("choice", rng.uniform(0.9, 0.999), rng.random() < 0.7))
        else:
            items.append(Observation("choice", rng.uniform(0.3, 0.6), rng.random() < 0.2))
    return items


def test_a_fitted_curve_brings_confidence_to_the_share_kept():
    train, held = overconfident(2000, seed=1), overconfident(2000, seed=2)
    calibration = fit(train)
    assert set(calibration.curves) == {"choice"} and calibration.fitted_on == {"choice": 2000}
    sure = [i for i in held if i.confidence > 0.9]
    kept = sum(i.kept for i in sure) / len(sure)
    mean = sum(calibration.confidence("choice", i.confidence) for i in sure) / len(sure)
    assert abs(mean - kept) < 0.06
    raw = expected_calibration_error([i.confidence for i in held], [i.kept for i in held])
    fitted = reliability(calibration, held)["choice"]["ece"]
    assert fitted < 0.05 < raw


def test_confidences_are_monotone_in_the_raw_probability_and_stay_in_0_1():
    calibration = fit(overconfident(300))
    grid = [i / 100 for i in range(101)]
    values = [calibration.confidence("choice", p) for p in grid]
    assert all(0.0 <= v <= 1.0 for v in values)
    assert values == sorted(values)
    # Where the model is more often wrong the surer it is, the best monotone curve is flat, never reversed.
    reversed_data = [Observation("label", p, p < 0.5) for p in grid for _ in range(3)]
    curve = fit(reversed_data).curves["label"]
    assert list(curve.calibrated) == sorted(curve.calibrated)


def test_too_few_observations_or_a_single_outcome_keep_the_raw_probability():
    few = fit([Observation("caption", 0.9, True), Observation("caption", 0.2, False)])
    always = fit([Observation("label", 0.8, True)] * 50)
    assert few.curves == {} and always.curves == {}
    assert few.confidence("caption", 0.37) == pytest.approx(0.37)
    with pytest.raises(ValueError, match="unknown field kind"):
        few.confidence("colour", 0.5)


def test_a_calibration_travels_with_its_version_folder(tmp_path):
    calibration = Calibration({"label": Curve((0.2, 0.9), (0.1, 0.8))}, {"label": 120})
    calibration.save(tmp_path)
    loaded = Calibration.load(tmp_path)
    assert loaded == calibration and loaded.confidence("label", 0.55) == pytest.approx(0.45)
    assert Calibration.load(tmp_path / "no-such-version") == Calibration()
    (tmp_path / "calibration.json").write_text("{not json")
    assert Calibration.load(tmp_path) == Calibration()


def test_auroc_and_ece_by_their_definitions():
    assert auroc([0.9, 0.8, 0.2, 0.1], [True, True, False, False]) == 1.0
    assert auroc([0.1, 0.2, 0.8, 0.9], [True, True, False, False]) == 0.0
    assert auroc([0.5, 0.5], [True, False]) == 0.5
    assert auroc([0.5, 0.7], [True, True]) is None
    # Two bins: [0.9, 0.9] kept once (|0.9 - 0.5| = 0.4) and [0.1, 0.1] never kept (0.1): (2·0.4 + 2·0.1) / 4.
    assert expected_calibration_error([0.9, 0.9, 0.1, 0.1], [True, False, False, False]) == pytest.approx(0.25)


def test_a_task_scores_the_chance_that_every_field_is_kept():
    assert task_score([0.9, 0.5]) == pytest.approx(0.45)
    assert task_score([1.2, -0.1]) == 0.0
    assert task_score([0.8]) == pytest.approx(0.8)


def test_a_fine_tunes_report_measures_its_curves_on_corrections_they_were_not_fitted_on():
    # Confidence that says nothing: curves fitted on these very fields still look calibrated on them.
    rng = random.Random(3)
    noise = [([Observation("label", rng.random(), rng.random() < 0.5)], False) for _ in range(400)]
    noise = [(fields, fields[0].kept) for fields, _ in noise]
    calibration = fit(o for fields, _ in noise for o in fields)
    in_sample = calibration_report(calibration, noise)
    cross_fitted = calibration_report(calibration, noise, cross_fit=True)
    assert cross_fitted["measured_on"] != in_sample["measured_on"]
    assert in_sample["calibrated"]["label"]["ece"] < 0.05 < cross_fitted["calibrated"]["label"]["ece"]
    # A signal the curves do capture survives cross-fitting.
    signal = [([o], o.kept) for o in overconfident(800, seed=4)]
    report = calibration_report(fit(o for fields, _ in signal for o in fields), signal, cross_fit=True)
    assert report["calibrated"]["choice"]["ece"] < 0.05 < report["raw"]["choice"]["ece"]
