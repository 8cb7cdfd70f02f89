"""The demo report's caption figures: does a caption name the synthetic object's attributes exactly?"""

from __future__ import annotations

import pytest

from model.data_format import RegionSample
from model.demo.report import attribute_match, attribute_match_rate, caption_attribute_accuracy, caption_figures

TRUTH = {"size": "large", "color": "red", "texture": "striped", "shape": "circle"}


@pytest.mark.parametrize(
    ("caption", "matches"),
    [
        ("a large red striped circle", True),
        ("A large, red, striped circle.", True),
        ("a striped red circle that is large", True),
        ("a large blue striped circle", False),
        ("a large red red blue striped circle", False),
        ("a large red circle", False),
        ("", False),
    ],
)
def test_attribute_match_needs_every_attribute_and_no_wrong_one(caption: str, matches: bool) -> None:
    assert attribute_match(TRUTH, caption) is matches


def test_attribute_match_can_accept_captions_that_leave_attributes_out() -> None:
    assert attribute_match(TRUTH, "a red circle", require_all=False)
    assert not attribute_match(TRUTH, "a blue circle", require_all=False)
    with pytest.raises(ValueError, match=r"unknown attribute\(s\) \['material'\]"):
        attribute_match({"material": "wood"}, "a wooden circle")


def test_attribute_match_rate_and_per_attribute_accuracy() -> None:
    truths = [TRUTH, {"size": "small", "color": "blue", "texture": "solid", "shape": "square"}]
    captions = ["a large red striped circle", "a small green solid square"]
    assert attribute_match_rate(truths, captions) == 0.5
    assert caption_attribute_accuracy(truths, captions) == {"size": 1.0, "color": 0.5, "texture": 1.0, "shape": 1.0}
    with pytest.raises(ValueError, match="2 ground truths but 1 captions"):
        attribute_match_rate(truths, captions[:1])


def test_caption_figures_use_the_records_that_carry_ground_truth(tmp_path) -> None:
    def record(index: int, attributes: dict[str, str] | None) -> RegionSample:
        meta = {"task": "caption", **({"attributes": attributes} if attributes else {})}
        return RegionSample(id=f"r{index}", image=str(tmp_path / "x.png"), width=10, height=10, boxes=[(1, 1, 5, 5)],
                            conversations=[{"from": "human", "value": "q <bbox>"}, {"from": "gpt", "value": "a"}],
                            meta=meta)

    truth = {"size": "large", "color": "red", "texture": "striped", "shape": "circle"}
    figures = caption_figures([record(1, truth), record(2, truth), record(3, None)],
                              ["a large red striped circle", "a small red striped circle", "anything"])
    assert figures["exact_attribute_match"] == 0.5
    assert figures["attribute_accuracy"] == {"size": 0.5, "color": 1.0, "texture": 1.0, "shape": 1.0}
    assert caption_figures([record(3, None)], ["anything"]) == {}
