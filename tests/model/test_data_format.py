"""The region dataset format (model/data_format.py): what a valid file is, and how a bad line is reported."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from model.data_format import DatasetFormatError, RegionSample, append_jsonl, read_jsonl, write_jsonl
from tests.support import REPO


def record(**changes: Any) -> dict[str, Any]:
    """A valid record (one region, one question), with some fields replaced."""
    base: dict[str, Any] = {
        "id": "shapes-000123-q4",
        "image": "images/000123.png",
        "width": 96,
        "height": 80,
        "boxes": [[12.0, 30.0, 50.0, 70.0]],
        "conversations": [
            {"from": "human", "value": "What is the color of region1 <bbox>?"},
            {"from": "gpt", "value": "red"},
        ],
        "meta": {"task": "attribute", "attribute": "color"},
    }
    base.update(changes)
    return base


@pytest.fixture
def dataset_dir(tmp_path: Path) -> Path:
    (tmp_path / "images").mkdir()
    for name in ("000123.png", "000124.png"):
        (tmp_path / "images" / name).write_bytes(b"not read by the format layer")
    return tmp_path


def write_lines(path: Path, records: list[dict[str, Any] | str]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


def test_a_valid_file_reads_back_with_image_paths_resolved_against_its_folder(dataset_dir: Path) -> None:
    two_regions = record(
        id="shapes-000124-q0",
        image="images/000124.png",
        boxes=[[0, 0, 10, 10], [40.5, 20, 96, 80]],
        conversations=[
            {"from": "human", "value": "Is region1 <bbox> left of region2 <bbox>?"},
            {"from": "gpt", "value": "yes"},
        ],
    )
    path = write_lines(dataset_dir / "data.jsonl", [record(), "", two_regions])

    samples = read_jsonl(path)

    assert [s.id for s in samples] == ["shapes-000123-q4", "shapes-000124-q0"]
    assert samples[0].image == str(dataset_dir / "images" / "000123.png")
    assert samples[0].boxes == [(12.0, 30.0, 50.0, 70.0)]
    assert samples[1].boxes == [(0.0, 0.0, 10.0, 10.0), (40.5, 20.0, 96.0, 80.0)]
    assert samples[0].conversations[1] == {"from": "gpt", "value": "red"}
    assert samples[0].meta == {"task": "attribute", "attribute": "color"}
    assert (samples[0].width, samples[0].height) == (96, 80)


def test_multi_turn_conversations_count_bbox_tokens_over_all_turns(dataset_dir: Path) -> None:
    turns = [
        {"from": "human", "value": "What is the color of region1 <bbox>?"},
        {"from": "gpt", "value": "red"},
        {"from": "human", "value": "And the shape of region2 <bbox>?"},
        {"from": "gpt", "value": "circle"},
    ]
    path = write_lines(dataset_dir / "data.jsonl", [record(boxes=[[1, 1, 5, 5], [6, 6, 9, 9]], conversations=turns)])
    assert len(read_jsonl(path)[0].conversations) == 4


def test_write_then_read_round_trips_and_stores_image_paths_relative_to_the_file(dataset_dir: Path) -> None:
    original = RegionSample.from_dict(record(image=str(dataset_dir / "images" / "000123.png")))
    path = write_jsonl([original], dataset_dir / "out.jsonl")

    stored = json.loads(path.read_text(encoding="utf-8"))
    assert stored["image"] == "images/000123.png"
    assert read_jsonl(path)[0] == original


def test_an_image_outside_the_dataset_folder_keeps_its_absolute_path(dataset_dir: Path, tmp_path_factory) -> None:
    elsewhere = tmp_path_factory.mktemp("elsewhere") / "photo.png"
    elsewhere.write_bytes(b"x")
    path = write_jsonl([RegionSample.from_dict(record(image=str(elsewhere)))], dataset_dir / "out.jsonl")
    assert json.loads(path.read_text(encoding="utf-8"))["image"] == str(elsewhere)
    assert read_jsonl(path)[0].image == str(elsewhere)


def test_append_adds_records_after_the_existing_ones(dataset_dir: Path) -> None:
    path = dataset_dir / "corrections" / "corrections.jsonl"
    append_jsonl([RegionSample.from_dict(record(id="a", image=str(dataset_dir / "images/000123.png")))], path)
    append_jsonl(
        [
            RegionSample.from_dict(record(id="b", image=str(dataset_dir / "images/000123.png"))),
            RegionSample.from_dict(record(id="c", image=str(dataset_dir / "images/000124.png"))),
        ],
        path,
    )
    assert [s.id for s in read_jsonl(path)] == ["a", "b", "c"]


def test_writing_an_invalid_sample_fails_and_leaves_the_existing_file_untouched(dataset_dir: Path) -> None:
    path = write_jsonl([RegionSample.from_dict(record())], dataset_dir / "data.jsonl")
    before = path.read_bytes()
    broken = RegionSample.from_dict(record(id="broken"))
    broken.boxes = [(60.0, 30.0, 50.0, 70.0)]

    with pytest.raises(DatasetFormatError, match=r"sample 1 \(id 'broken'\): box 0 .* empty or inverted"):
        write_jsonl([RegionSample.from_dict(record(id="fine")), broken], path)
    with pytest.raises(DatasetFormatError, match="empty or inverted"):
        append_jsonl([broken], path)

    assert path.read_bytes() == before
    assert sorted(p.name for p in dataset_dir.iterdir()) == ["data.jsonl", "images"]


def test_writing_duplicate_ids_fails(dataset_dir: Path) -> None:
    with pytest.raises(DatasetFormatError, match="duplicate id 'same'"):
        write_jsonl([RegionSample.from_dict(record(id="same"))] * 2, dataset_dir / "data.jsonl")


BAD_RECORDS = [
    pytest.param(record(boxes=[[12, 30, 97, 70]]), r"box 0 .* outside the 96x80 image", id="box-right-of-image"),
    pytest.param(record(boxes=[[-1, 30, 50, 70]]), r"box 0 .* outside", id="box-negative"),
    pytest.param(record(boxes=[[50, 30, 50, 70]]), r"box 0 .* empty or inverted", id="box-zero-width"),
    pytest.param(record(boxes=[[12, 70, 50, 30]]), r"box 0 .* empty or inverted", id="box-inverted"),
    pytest.param(record(boxes=[[12, 30, 50]]), r"box 0 must be four numbers", id="box-three-numbers"),
    pytest.param(record(boxes=[[12, 30, "50", 70]]), r"box 0 must be four numbers", id="box-string"),
    pytest.param(
        record(boxes=[]), r"the conversation has 1 <bbox> token\(s\) but there are 0 box\(es\)", id="fewer-boxes"
    ),
    pytest.param(
        record(boxes=[[1, 1, 5, 5], [6, 6, 9, 9]]),
        r"the conversation has 1 <bbox> token\(s\) but there are 2 box",
        id="more-boxes",
    ),
    pytest.param(
        record(conversations=[{"from": "gpt", "value": "red"}, {"from": "human", "value": "region1 <bbox>?"}]),
        r"turn 0 is from 'gpt' but should be from 'human'",
        id="starts-with-gpt",
    ),
    pytest.param(
        record(
            conversations=[
                {"from": "human", "value": "What is region1 <bbox>?"},
                {"from": "human", "value": "Well?"},
            ]
        ),
        r"turn 1 is from 'human' but should be from 'gpt'",
        id="not-alternating",
    ),
    pytest.param(
        record(conversations=[{"from": "human", "value": "What is region1 <bbox>?"}]),
        r"the conversation ends with a human turn",
        id="unanswered",
    ),
    pytest.param(
        record(conversations=[{"from": "human", "value": "What is region1 <bbox>?"}, {"from": "gpt", "value": "  "}]),
        r"turn 1 \(gpt\) has an empty answer",
        id="empty-answer",
    ),
    pytest.param(
        record(
            conversations=[
                {"from": "human", "value": "The <image> provides an overview of the picture.\nregion1 <bbox>?"},
                {"from": "gpt", "value": "red"},
            ]
        ),
        r"turn 0 contains <image>; leave it out",
        id="image-prefix-included",
    ),
    pytest.param(
        record(
            boxes=[[1, 1, 5, 5], [6, 6, 9, 9]],
            conversations=[{"from": "human", "value": "What is region1 <bbox>?"}, {"from": "gpt", "value": "<bbox>"}],
        ),
        r"turn 1 \(gpt\) contains <bbox>",
        id="bbox-in-answer",
    ),
    pytest.param(
        record(
            conversations=[{"from": "human", "value": "What is region1 <bbox>?"}, {"from": "gpt", "value": "a###b"}]
        ),
        r"turn 1 contains the stop string '###'",
        id="stop-string-in-answer",
    ),
    pytest.param(
        record(conversations=[{"from": "human", "value": "region1 <bbox>", "speaker": "x"}, {"from": "gpt"}]),
        r"turn 0 must be an object with exactly 'from' and 'value'",
        id="malformed-turn",
    ),
    pytest.param(record(width=0), r"'width' must be a positive integer", id="zero-width"),
    pytest.param(record(height=80.5), r"'height' must be a positive integer", id="fractional-height"),
    pytest.param(record(id=""), r"'id' must be a non-empty string", id="empty-id"),
    pytest.param(record(meta=["task"]), r"'meta' must be a JSON object", id="meta-list"),
    pytest.param(record(captions="x"), r"unknown field\(s\) captions; put extra information under 'meta'", id="extra"),
    pytest.param(
        {"id": "x", "image": "a.png"}, r"missing field\(s\) width, height, boxes, conversations", id="missing"
    ),
    pytest.param([1, 2], r"a record must be a JSON object, got list", id="not-an-object"),
]


@pytest.mark.parametrize(("bad", "problem"), BAD_RECORDS)
def test_a_bad_record_is_reported_with_file_line_and_problem(dataset_dir: Path, bad: Any, problem: str) -> None:
    path = write_lines(dataset_dir / "data.jsonl", [record(id="first"), "", bad])
    with pytest.raises(DatasetFormatError, match=rf"^{path}:3: {problem}") as caught:
        read_jsonl(path)
    assert (caught.value.path, caught.value.line) == (str(path), 3)


def test_invalid_json_is_reported_with_its_line_and_column(dataset_dir: Path) -> None:
    path = write_lines(dataset_dir / "data.jsonl", [record(), '{"id": "x", "image": '])
    with pytest.raises(DatasetFormatError, match=rf"^{path}:2: not valid JSON \(.* at column \d+\)"):
        read_jsonl(path)


def test_a_duplicate_id_names_the_line_it_was_first_used_on(dataset_dir: Path) -> None:
    path = write_lines(dataset_dir / "data.jsonl", [record(), record(image="images/000124.png")])
    with pytest.raises(
        DatasetFormatError, match=rf"^{path}:2: duplicate id 'shapes-000123-q4' \(first used on line 1\)"
    ):
        read_jsonl(path)


def test_a_missing_image_is_reported_unless_image_checks_are_off(dataset_dir: Path) -> None:
    path = write_lines(dataset_dir / "data.jsonl", [record(image="images/missing.png")])
    with pytest.raises(DatasetFormatError, match=rf"^{path}:1: image file not found: .*images/missing.png"):
        read_jsonl(path)
    assert read_jsonl(path, check_images=False)[0].image == str(dataset_dir / "images" / "missing.png")


def test_importing_the_format_pulls_in_neither_torch_nor_pil() -> None:
    probe = "import sys, model.data_format; print(sorted({'torch', 'PIL'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
