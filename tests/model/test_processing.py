"""Prompt templates, image preprocessing, box conversion and batch building for GPT4RoI."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from model.gpt4roi.processing_gpt4roi import (
    CLIP_MEAN,
    CLIP_STD,
    IGNORE_INDEX,
    MIN_BOX_SIZE,
    GPT4RoIProcessor,
    clip_preprocess,
    normalize_boxes,
    sanitize_boxes,
)
from model.gpt4roi.prompts import (
    IMAGE_PREFIX,
    STOP_STRING,
    SYSTEM_PROMPT,
    attribute_question,
    build_conversation,
    build_prompt,
    caption_question,
    check_bbox_count,
    conversation_segments,
    count_bbox_tokens,
    parse_answer,
    region_refs,
    relation_answer,
    relation_candidates,
    relation_question,
)
from model.gpt4roi.tokenization_gpt4roi import GPT4RoITokenizer
from tests.support import FIXTURES

TOKENIZER_FIXTURES = FIXTURES / "tokenizer"
SIZE = 32


@pytest.fixture(scope="module")
def tokenizer() -> GPT4RoITokenizer:
    return GPT4RoITokenizer((TOKENIZER_FIXTURES / "tokenizer.model").read_bytes())


@pytest.fixture(scope="module")
def processor(tokenizer) -> GPT4RoIProcessor:
    return GPT4RoIProcessor(tokenizer, image_size=SIZE, num_image_tokens=4)


def solid(width: int, height: int, color=(255, 0, 0), mode: str = "RGB") -> Image.Image:
    return Image.new(mode, (width, height), color)


# ------------------------------------------------------------------ prompts
SPEC_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the human's questions."
)


def test_single_region_prompt_is_byte_exact_with_the_spec_example(tokenizer):
    processor = GPT4RoIProcessor(tokenizer, image_size=224, num_image_tokens=256)
    prompt = processor.expand_image_tokens(build_prompt([("What is region1 <bbox> doing?", None)]))
    expected = (
        SPEC_SYSTEM + "\n\n### Human: The <im_start>" + "<im_patch>" * 256 + "<im_end> provides an overview of "
        "the picture.\nWhat is region1 <bbox> doing?\n### "
    )
    assert prompt == expected


def test_multi_turn_prompt_follows_the_v0_template():
    prompt = build_prompt([(caption_question(1), "a red circle"), (attribute_question("shape", 1), None)])
    assert prompt == (
        f"{SYSTEM_PROMPT}\n\n"
        "### Human: The <image> provides an overview of the picture.\n"
        "Can you give a description of the region mentioned by region1 <bbox>?\n"
        "### Assistant: a red circle\n"
        "### Human: What is the shape of region1 <bbox>?\n"
        "### "
    )
    assert IMAGE_PREFIX == "The <image> provides an overview of the picture.\n"
    assert STOP_STRING == "###"
    assert SYSTEM_PROMPT == SPEC_SYSTEM


def test_question_templates_are_the_project_wide_strings():
    assert caption_question() == "Can you give a description of the region mentioned by region1 <bbox>?"
    assert caption_question(3) == "Can you give a description of the region mentioned by region3 <bbox>?"
    assert attribute_question("color") == "What is the color of region1 <bbox>?"
    assert attribute_question("material", 2) == "What is the material of region2 <bbox>?"
    assert relation_question("left_of") == "Is region1 <bbox> left of region2 <bbox>?"
    assert relation_question("above") == "Is region1 <bbox> above region2 <bbox>?"
    assert relation_question("larger") == "Which is larger, region1 <bbox> or region2 <bbox>?"
    assert relation_candidates("left_of") == ("yes", "no")
    assert relation_candidates("larger", 2, 1) == ("region2", "region1")
    assert region_refs(2) == "region1 <bbox>,region2 <bbox>,"


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: caption_question(0), "starting at 1"),
        (lambda: attribute_question(""), "non-empty"),
        (lambda: attribute_question(" color"), "plain text"),
        (lambda: relation_question("below"), "unknown relation"),
        (lambda: relation_question("left_of", 1, 1), "two different regions"),
        (lambda: region_refs(0), "n >= 1"),
        (lambda: build_prompt([("q", None), ("q2", None)]), "only the last turn"),
        (lambda: build_prompt([]), "at least one message"),
    ],
)
def test_bad_template_arguments_get_clear_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_relation_answers_follow_box_geometry():
    left, right = (0.0, 0.4, 0.2, 0.6), (0.6, 0.0, 0.9, 0.2)
    assert relation_answer("left_of", left, right) == "yes"
    assert relation_answer("left_of", right, left) == "no"
    assert relation_answer("above", right, left) == "yes"
    assert relation_answer("larger", left, right) == "region2"  # 0.2*0.2 < 0.3*0.2
    assert relation_answer("larger", right, left, a=2, b=1) == "region2"
    with pytest.raises(ValueError, match="equal area"):
        relation_answer("larger", left, (0.5, 0.5, 0.7, 0.7))


@pytest.mark.parametrize(
    "generated, answer",
    [
        ("Assistant: a red circle\n###", "a red circle"),
        ("  Assistant:red###", "red"),
        ("blue square ### Human: more", "blue square"),
        ("yes", "yes"),
        ("Assistant: \n###", ""),
        ("", ""),
    ],
)
def test_parse_answer_strips_role_and_stop_string(generated, answer):
    assert parse_answer(generated) == answer


def test_bbox_count_check_explains_the_mismatch():
    prompt = build_prompt([(relation_question("left_of"), None)])
    assert count_bbox_tokens(prompt) == 2
    check_bbox_count(prompt, 2)
    with pytest.raises(ValueError, match=r"2 <bbox> token\(s\) but 1 box"):
        check_bbox_count(prompt, 1)


@pytest.mark.parametrize(
    "messages, message",
    [
        ([{"from": "gpt", "value": "x"}], "start with a human"),
        ([{"from": "human", "value": "a"}, {"from": "human", "value": "b"}], "alternate"),
        ([{"from": "human", "value": "<image> hi"}], "image prefix is added"),
        ([{"from": "human", "value": "q"}, {"from": "gpt", "value": "a ### b"}], "stop string"),
        ([{"from": "system", "value": "q"}], "'human' or 'gpt'"),
        ([{"from": "human", "value": 3}], "must be a string"),
    ],
)
def test_malformed_conversations_are_rejected(messages, message):
    with pytest.raises(ValueError, match=message):
        build_conversation(messages)


def test_conversation_segments_mark_answers_and_their_stop_strings():
    messages = [
        {"from": "human", "value": attribute_question("color")},
        {"from": "gpt", "value": "red"},
        {"from": "human", "value": "And its shape?"},
        {"from": "gpt", "value": "circle"},
    ]
    segments = conversation_segments(messages)
    assert [text for text, target in segments if target] == ["Assistant: red\n###", "Assistant: circle\n###"]
    assert "".join(text for text, _ in segments) == build_conversation(messages)
    assert build_conversation(messages).endswith("### Assistant: circle\n### ")


# ------------------------------------------------------------------- images
def test_clip_preprocessing_matches_transformers_4_29():
    golden = np.load(TOKENIZER_FIXTURES / "clip_preprocess_golden.npz")
    for index in range(4):
        image = Image.fromarray(golden[f"image_{index}"], mode="RGB")
        ours = clip_preprocess(image, int(golden[f"size_{index}"]), CLIP_MEAN, CLIP_STD)
        np.testing.assert_allclose(ours, golden[f"pixel_values_{index}"], atol=1e-5)


def test_preprocess_stretches_to_a_square_after_clip_preprocessing(processor):
    golden = np.load(TOKENIZER_FIXTURES / "clip_preprocess_golden.npz")
    image = Image.fromarray(golden["image_3"], mode="RGB")  # 40×24, CLIP size 32 → 32×53
    expected = F.interpolate(
        torch.from_numpy(golden["pixel_values_3"])[None], size=(SIZE, SIZE), mode="bilinear", align_corners=False
    )
    out = processor.preprocess_images([image])
    assert out.shape == (1, 3, SIZE, SIZE) and out.dtype == torch.float32
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_preprocess_normalizes_with_clip_mean_and_std(processor):
    mean_color = tuple(round(m * 255) for m in CLIP_MEAN)
    out = processor.preprocess_images([solid(50, 40, mean_color), solid(20, 30, (255, 255, 255))])
    assert out.shape == (2, 3, SIZE, SIZE)
    assert out[0].abs().max() < 0.01
    white = torch.tensor([(1 - m) / s for m, s in zip(CLIP_MEAN, CLIP_STD, strict=True)])
    torch.testing.assert_close(out[1].mean(dim=(1, 2)), white, atol=1e-4, rtol=0)


def test_wide_image_is_stretched_not_cropped(processor):
    image = solid(200, 50, (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 50, 50))  # left quarter red
    out = processor.preprocess_images([image])[0]
    red_channel = out[0]
    # A centre crop would have cut the red quarter away, and letterboxing would have shrunk it in height.
    assert red_channel[:, : SIZE // 4 - 1].min() > 1.5
    assert red_channel[:, SIZE // 4 + 1 :].max() < -1.5


def test_images_are_converted_to_rgb(processor):
    reference = processor.preprocess_images([solid(30, 30, (128, 128, 128))])
    rgba = solid(30, 30, (128, 128, 128, 0), mode="RGBA")
    gray = solid(30, 30, 128, mode="L")
    gray16 = Image.fromarray(np.full((30, 30), 128 * 257, dtype=np.uint16))
    palette = solid(30, 30, (128, 128, 128)).quantize(colors=2)
    for image in (rgba, gray, gray16, palette):
        torch.testing.assert_close(processor.preprocess_images([image]), reference, atol=1e-5, rtol=0)


def test_exif_orientation_is_applied(processor):
    image = solid(60, 20, (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 30, 20))  # left half red as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif, quality=95)
    shown = processor.preprocess_images([Image.open(io.BytesIO(buffer.getvalue()))])[0]
    # Displayed upright, the stored left half becomes the top half.
    assert shown[0, : SIZE // 2 - 2].min() > 1.0
    assert shown[0, SIZE // 2 + 2 :].max() < -1.0


def test_preprocess_rejects_what_is_not_an_image(processor):
    with pytest.raises(TypeError, match=r"PIL\.Image\.Image"):
        processor.preprocess_images([np.zeros((4, 4, 3))])
    with pytest.raises(ValueError, match="at least one image"):
        processor.preprocess_images([])


# -------------------------------------------------------------------- boxes
def test_pixel_boxes_are_normalized_by_the_original_size():
    boxes = normalize_boxes([[12.0, 30.0, 50.0, 70.0]], width=96, height=80)
    torch.testing.assert_close(boxes, torch.tensor([[12 / 96, 30 / 80, 50 / 96, 70 / 80]]))


@pytest.mark.parametrize(
    "box, message",
    [
        ([0.1, float("nan"), 0.3, 0.4], "non-finite"),
        ([0.1, 0.2, float("inf"), 0.4], "non-finite"),
        ([0.5, 0.2, 0.3, 0.4], "inverted"),
        ([0.1, 0.2, 0.1, 0.4], "zero area"),
        ([1.2, 0.2, 1.5, 0.4], "outside the image"),
        ([-0.5, -0.5, -0.1, 0.4], "outside the image"),
    ],
)
def test_invalid_boxes_get_clear_errors(box, message):
    with pytest.raises(ValueError, match=message):
        sanitize_boxes([box])


def test_malformed_box_lists_get_clear_errors():
    with pytest.raises(ValueError, match="4 numbers"):
        sanitize_boxes([[0.1, 0.2, 0.3]])
    with pytest.raises(ValueError, match=r"shape \[n, 4\]"):
        sanitize_boxes(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="positive number of pixels"):
        normalize_boxes([[0, 0, 1, 1]], width=0, height=10)


def test_boxes_are_clamped_to_the_image():
    torch.testing.assert_close(sanitize_boxes([[-0.2, 0.5, 1.3, 1.0]]), torch.tensor([[0.0, 0.5, 1.0, 1.0]]))


def test_tiny_boxes_are_enlarged_symmetrically_to_the_minimum_size():
    box = sanitize_boxes([[0.5, 0.5, 0.501, 0.6]])[0].tolist()
    assert box[2] - box[0] == pytest.approx(MIN_BOX_SIZE, abs=1e-6)
    assert (box[0] + box[2]) / 2 == pytest.approx(0.5005, abs=1e-6)
    assert box[1:4:2] == pytest.approx([0.5, 0.6])
    at_edge = sanitize_boxes([[0.999, 0.0, 1.0, 0.001]])[0].tolist()
    assert at_edge == pytest.approx([1.0 - MIN_BOX_SIZE, 0.0, 1.0, MIN_BOX_SIZE], abs=1e-6)
    assert pytest.approx(2 / 224, abs=1e-7) == MIN_BOX_SIZE


# ------------------------------------------------------------------ batches
def test_batch_is_left_padded_and_shares_images(processor, tokenizer):
    prompts = [
        build_prompt([(attribute_question("color"), None)]),
        build_prompt([(relation_question("larger"), None)]),
        build_prompt([(caption_question(), None)]),
    ]
    images = [solid(40, 30), solid(30, 60, (0, 255, 0))]
    boxes = [[[0.1, 0.1, 0.5, 0.5]], [[0.0, 0.0, 0.2, 0.2], [0.5, 0.5, 1.0, 1.0]], torch.tensor([[0.2, 0.2, 0.9, 0.9]])]
    batch = processor(prompts, images, boxes, image_index=[0, 0, 1])
    assert batch["pixel_values"].shape == (2, 3, SIZE, SIZE)
    assert batch["image_index"].tolist() == [0, 0, 1]
    assert [b.shape for b in batch["boxes"]] == [(1, 4), (2, 4), (1, 4)]
    ids, mask = batch["input_ids"], batch["attention_mask"]
    for row, prompt in enumerate(prompts):
        expected = tokenizer.encode(processor.expand_image_tokens(prompt))
        n = len(expected)
        assert ids[row, -n:].tolist() == expected  # real tokens are flush right
        assert mask[row, -n:].all() and not mask[row, :-n].any()
        assert (ids[row, :-n] == tokenizer.pad_token_id).all()
        assert int((ids[row] == tokenizer.bbox_token_id).sum()) == len(batch["boxes"][row])
        assert int((ids[row] == tokenizer.image_patch_token_id).sum()) == processor.num_image_tokens
    assert mask[:, -1].all()


def test_one_image_for_all_prompts_needs_no_index(processor):
    prompt = build_prompt([(attribute_question("color"), None)])
    batch = processor([prompt, prompt], [solid(20, 20)], [[[0, 0, 1, 1]], [[0, 0, 0.5, 0.5]]])
    assert batch["image_index"].tolist() == [0, 0]
    assert batch["pixel_values"].shape[0] == 1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"boxes": [[]]}, r"1 <bbox> token\(s\) but 0 box"),
        ({"boxes": [[[0, 0, 1, 1], [0, 0, 1, 1]]]}, r"1 <bbox> token\(s\) but 2 box"),
        ({"prompts": ["What is region1 <bbox>?"]}, "exactly one <image>"),
        ({"images": [solid(8, 8), solid(8, 8)]}, "pass image_index"),
        ({"image_index": [3]}, "outside"),
        ({"boxes": [[[0.5, 0, 0.2, 1]]]}, "inverted"),
        ({"boxes": []}, "one list per prompt"),
    ],
)
def test_bad_batches_are_refused_before_any_forward_pass(processor, kwargs, message):
    call = {
        "prompts": [build_prompt([(attribute_question("color"), None)])],
        "images": [solid(8, 8)],
        "boxes": [[[0.1, 0.1, 0.4, 0.4]]],
    }
    call.update(kwargs)
    with pytest.raises(ValueError, match=message):
        processor(**call)


def test_prompt_longer_than_the_context_is_refused(tokenizer):
    short = GPT4RoITokenizer((TOKENIZER_FIXTURES / "tokenizer.model").read_bytes(), model_max_length=50)
    processor = GPT4RoIProcessor(short, image_size=SIZE, num_image_tokens=4)
    with pytest.raises(ValueError, match="more than the model's 50"):
        processor([build_prompt([(caption_question(), None)])], [solid(8, 8)], [[[0, 0, 1, 1]]])


# ----------------------------------------------------------------- training
CONVERSATION = [
    {"from": "human", "value": attribute_question("color")},
    {"from": "gpt", "value": "red"},
    {"from": "human", "value": relation_question("left_of", 2, 3)},
    {"from": "gpt", "value": "yes"},
    {"from": "human", "value": "Describe region1 again."},
    {"from": "gpt", "value": "a small red circle, 12 px wide"},
]

THREE_BOXES = [[0.1, 0.1, 0.3, 0.3], [0.5, 0.5, 0.9, 0.9], [0.0, 0.6, 0.2, 1.0]]


def target_runs(ids: torch.Tensor, labels: torch.Tensor) -> list[list[int]]:
    runs: list[list[int]] = []
    previous = False
    for token, label in zip(ids.tolist(), labels.tolist(), strict=True):
        if label != IGNORE_INDEX:
            assert label == token
            if not previous:
                runs.append([])
            runs[-1].append(token)
        previous = label != IGNORE_INDEX
    return runs


def test_loss_sees_exactly_the_answers_and_their_stop_strings(processor, tokenizer):
    ids, labels = processor.encode_conversation(CONVERSATION)
    answers = [m["value"] for m in CONVERSATION if m["from"] == "gpt"]
    assert [tokenizer.decode(run) for run in target_runs(ids, labels)] == [f"Assistant: {a}\n###" for a in answers]
    assert labels[0] == IGNORE_INDEX  # BOS


def test_training_ids_are_the_ids_of_the_whole_rendered_conversation(processor, tokenizer):
    ids, _ = processor.encode_conversation(CONVERSATION)
    text = processor.expand_image_tokens(build_conversation(CONVERSATION))
    assert ids.tolist() == tokenizer.encode(text)
    # An inference prompt for the same first question is a prefix of the training sequence.
    prompt = processor.expand_image_tokens(build_prompt([(CONVERSATION[0]["value"], None)]))
    assert ids.tolist()[: len(tokenizer.encode(prompt))] == tokenizer.encode(prompt)


def test_training_sequences_are_cut_on_the_right(processor):
    full_ids, full_labels = processor.encode_conversation(CONVERSATION)
    ids, labels = processor.encode_conversation(CONVERSATION, max_length=60)
    assert ids.tolist() == full_ids[:60].tolist() and labels.tolist() == full_labels[:60].tolist()
    with pytest.raises(ValueError, match="cuts through the image block"):
        processor.encode_conversation(
            CONVERSATION, max_length=full_ids.tolist().index(processor.tokenizer.im_start_token_id) + 2
        )


def test_truncation_drops_the_boxes_of_cut_bbox_tokens(processor, tokenizer):
    full = processor.training_sample(CONVERSATION, solid(30, 20), THREE_BOXES)
    first_bbox = full["input_ids"].tolist().index(tokenizer.bbox_token_id)
    cut = processor.training_sample(CONVERSATION, solid(30, 20), THREE_BOXES, max_length=first_bbox + 5)
    assert full["boxes"].shape == (3, 4) and cut["boxes"].shape == (1, 4)
    torch.testing.assert_close(cut["boxes"], full["boxes"][:1])
    with pytest.raises(ValueError, match=r"3 <bbox> token\(s\) but 2 box"):
        processor.training_sample(CONVERSATION, solid(30, 20), THREE_BOXES[:2])


def test_collate_pads_on_the_right_and_ignores_padding_in_the_loss(processor, tokenizer):
    short = [{"from": "human", "value": caption_question()}, {"from": "gpt", "value": "red"}]
    samples = [
        processor.training_sample(CONVERSATION, solid(30, 20), THREE_BOXES),
        processor.training_sample(short, solid(20, 30), [[0.2, 0.2, 0.4, 0.4]]),
    ]
    batch = processor.collate_for_training(samples)
    n_long, n_short = len(samples[0]["input_ids"]), len(samples[1]["input_ids"])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, n_long)
    assert batch["input_ids"][1, :n_short].tolist() == samples[1]["input_ids"].tolist()
    assert (batch["input_ids"][1, n_short:] == tokenizer.pad_token_id).all()
    assert (batch["labels"][1, n_short:] == IGNORE_INDEX).all()
    assert batch["attention_mask"][1].tolist() == [1] * n_short + [0] * (n_long - n_short)
    assert batch["pixel_values"].shape == (2, 3, SIZE, SIZE)
    assert batch["image_index"].tolist() == [0, 1]
    assert [b.shape for b in batch["boxes"]] == [(3, 4), (1, 4)]
    samples[1]["boxes"] = torch.zeros(0, 4)
    with pytest.raises(ValueError, match="sample 1 has 1 <bbox> tokens but 0 boxes"):
        processor.collate_for_training(samples)


# -------------------------------------------------------------- persistence
def test_processor_round_trips_through_a_directory(processor, tmp_path):
    written = processor.save_pretrained(tmp_path)
    assert {p.name for p in written} >= {"processor_config.json", "tokenizer.model", "added_tokens.json"}
    loaded = GPT4RoIProcessor.from_pretrained(tmp_path)
    assert (loaded.image_size, loaded.num_image_tokens) == (processor.image_size, processor.num_image_tokens)
    prompt = build_prompt([(caption_question(), None)])
    args = ([prompt], [solid(10, 10)], [[[0, 0, 1, 1]]])
    assert loaded(*args)["input_ids"].tolist() == processor(*args)["input_ids"].tolist()
    with pytest.raises(FileNotFoundError, match=r"processor_config\.json"):
        GPT4RoIProcessor.from_pretrained(tmp_path / "missing")
