"""The Qwen3-VL engine: regions as text or drawn, answers exactly as transformers' own Qwen3-VL gives them
(generation and plain forward passes), shared work where it is shared, LoRA fine-tunes that save and reload."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, Qwen3VLConfig, Qwen3VLForConditionalGeneration

from model.data_format import RegionSample
from model.engine import (
    ENGINES,
    LABEL,
    CaptionRequest,
    ChoiceRequest,
    EngineError,
    Example,
    FinetuneConfig,
    engine_of_checkpoint,
    load_engine,
)
from model.qwen3vl.engine import Qwen3VLEngine
from model.qwen3vl.prompts import (
    attribute_question,
    box_text,
    caption_question,
    draw_region,
    outline_width,
    pixel_box,
)
from tests.support.qwen3vl_factory import save_tiny_qwen3vl

BOXES = [(0.1, 0.1, 0.5, 0.6), (0.4, 0.3, 0.9, 0.95), (0.0, 0.0, 1.0, 1.0)]
COLORS = ("red", "dark green", "blue")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_qwen3vl(tmp_path_factory.mktemp("tiny-qwen3vl"), seed=1)


@pytest.fixture(scope="module")
def reference(checkpoint: Path):
    """transformers' own model and processor, loaded from the same folder."""
    return Qwen3VLForConditionalGeneration.from_pretrained(checkpoint).eval(), AutoProcessor.from_pretrained(checkpoint)


@pytest.fixture(scope="module", params=["text", "drawn"])
def engine(request: pytest.FixtureRequest, checkpoint: Path) -> Qwen3VLEngine:
    return Qwen3VLEngine.from_pretrained(checkpoint, options={"region": request.param})


def picture(seed: int, size: tuple[int, int] = (64, 48)) -> Image.Image:
    image = Image.new("RGB", size, (seed * 40 % 256, 90, 160))
    image.paste((250, 30 * seed % 256, 20), (5 + seed, 6, 30, 40))
    return image


def shown(image: Image.Image, box, region: str) -> Image.Image:
    return draw_region(image, box) if region == "drawn" else image


def chat(image: Image.Image, question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]


# ---------------------------------------------------------------- regions
def test_a_box_is_written_in_relative_thousandths_rounded_and_clamped():
    assert box_text((0.0, 0.0, 1.0, 1.0)) == "[0, 0, 1000, 1000]"
    assert box_text((0.12345, 0.5555, 0.9996, 0.0004)) == "[123, 556, 1000, 0]"
    assert box_text((-0.2, 1.3, 0.5, 0.25)) == "[0, 1000, 500, 250]"
    assert "region [100, 100, 500, 600]" in caption_question(BOXES[0], "text")


def test_the_drawn_mode_outlines_the_box_in_red_with_a_width_scaled_to_the_image():
    image = Image.new("RGB", (1000, 500), (255, 255, 255))
    box = (0.1, 0.2, 0.5, 0.8)
    drawn = draw_region(image, box)
    width = outline_width(image.size)
    assert width == 6 and outline_width((64, 48)) == 2
    x1, y1, x2, y2 = pixel_box(box, image.size)
    assert (x1, y1, x2, y2) == (100, 100, 499, 399)
    middle = (y1 + y2) // 2
    red, white = (255, 0, 0), (255, 255, 255)
    assert [drawn.getpixel((x, middle)) for x in (x1, x1 + width - 1, x2 - width + 1, x2)] == [red] * 4
    assert [drawn.getpixel((x, middle)) for x in (x1 - 1, x1 + width, x2 - width, x2 + 1)] == [white] * 4
    assert drawn.getpixel(((x1 + x2) // 2, y1)) == red and drawn.getpixel(((x1 + x2) // 2, y1 + width)) == white
    assert image.getpixel((x1, middle)) == white, "the caller's image is left as it was"
    assert "the region outlined in red" in attribute_question(box, "drawn", "color", COLORS)


def test_the_questions_name_the_attribute_and_the_candidates():
    assert attribute_question(BOXES[0], "text", "color", COLORS) == (
        "What is the color of the object in region [100, 100, 500, 600]? Answer with one of: red, dark green, blue")
    assert attribute_question(BOXES[0], "drawn", LABEL, ("cat", "dog")) == (
        "Which of these is the object in the region outlined in red: cat, dog? Answer with one of them.")


# --------------------------------------------------------------- settings
def test_the_registry_finds_the_engine_by_name_and_by_checkpoint(checkpoint):
    assert ENGINES["qwen3-vl"].model_type == Qwen3VLConfig.model_type == "qwen3_vl"
    assert engine_of_checkpoint(checkpoint) == "qwen3-vl"
    engine = load_engine(checkpoint)
    assert isinstance(engine, Qwen3VLEngine) and engine.region == "drawn"
    assert load_engine(checkpoint, options={"region": "text"}).region == "text"


def test_unknown_options_and_bad_values_are_refused(checkpoint):
    with pytest.raises(EngineError, match="no option 'regoin'"):
        Qwen3VLEngine.from_pretrained(checkpoint, options={"regoin": "text"})
    with pytest.raises(EngineError, match="region must be one of drawn, text, got 'circle'"):
        load_engine(checkpoint, options={"region": "circle"})
    with pytest.raises(EngineError, match="unknown dtype"):
        Qwen3VLEngine.from_pretrained(checkpoint, dtype="float33")


# --------------------------------------------------------------- fidelity
def test_a_caption_is_transformers_own_greedy_generation(engine, reference):
    model, processor = reference
    image, box = picture(2), BOXES[1]
    [answer] = engine.caption([CaptionRequest(image, box)], max_new_tokens=6)
    inputs = processor.apply_chat_template(chat(shown(image, box, engine.region), caption_question(box, engine.region)),
                                           tokenize=True, add_generation_prompt=True, return_dict=True,
                                           return_tensors="pt")
    prompt_length = inputs["input_ids"].shape[1]
    with torch.no_grad():
        sequence = model.generate(**inputs, max_new_tokens=6, do_sample=False)[0]
        new = sequence[prompt_length:].tolist()
        assert answer.text == processor.tokenizer.decode(new, skip_special_tokens=True).strip()
        # The confidence: the geometric mean of the generated tokens' probabilities, from one plain forward.
        full = {**inputs, "input_ids": sequence[None], "attention_mask": torch.ones_like(sequence)[None],
                "mm_token_type_ids": torch.nn.functional.pad(inputs["mm_token_type_ids"], (0, len(new)))}
        log_probs = model(**full).logits[0, prompt_length - 1:-1].log_softmax(-1)
    picked = log_probs.gather(-1, torch.tensor(new)[:, None])[:, 0]
    assert answer.confidence == pytest.approx(math.exp(picked.mean().item()), rel=1e-4)


def test_a_choice_is_the_softmax_of_each_candidates_full_sequence_likelihood(engine, reference):
    model, processor = reference
    image, box = picture(1), BOXES[0]
    [distribution] = engine.choose([ChoiceRequest(image, box, "color", COLORS)])
    seen = shown(image, box, engine.region)
    prefix = processor.apply_chat_template(chat(seen, attribute_question(box, engine.region, "color", COLORS)),
                                           tokenize=False, add_generation_prompt=True)
    prefix_length = processor(text=[prefix], images=[seen], return_tensors="pt")["input_ids"].shape[1]
    totals = []
    for candidate in COLORS:
        inputs = processor(text=[prefix + candidate + "<|im_end|>"], images=[seen], return_tensors="pt")
        with torch.no_grad():
            log_probs = model(**inputs).logits[0].log_softmax(-1)
        ids = inputs["input_ids"][0]
        totals.append(sum(log_probs[t - 1, ids[t]].item() for t in range(prefix_length, len(ids))))
    expected = torch.tensor(totals, dtype=torch.float64).softmax(0).tolist()
    assert list(distribution) == list(COLORS)
    assert list(distribution.values()) == pytest.approx(expected, abs=1e-5)


def test_many_requests_over_two_images_answer_as_one_at_a_time(engine):
    images = [picture(1), picture(3, size=(80, 40))]
    pairs = [(images[i % 2], box) for i, box in enumerate([*BOXES, BOXES[0]])]
    captions = [CaptionRequest(image, box) for image, box in pairs]
    choices = [ChoiceRequest(image, box, attribute, values) for (image, box), (attribute, values)
               in zip(pairs, [("color", COLORS), (LABEL, ("circle", "square")), ("size", ("small", "large")),
                              ("color", COLORS[:2])], strict=True)]
    batched, single = engine.caption(captions, max_new_tokens=4), []
    for request in captions:
        engine.forget_images()
        single += engine.caption([request], max_new_tokens=4)
    assert [a.text for a in batched] == [a.text for a in single]
    assert [a.confidence for a in batched] == pytest.approx([a.confidence for a in single], rel=1e-4)
    together = engine.choose(choices)
    for request, distribution in zip(choices, together, strict=True):
        engine.forget_images()
        [alone] = engine.choose([request])
        assert list(distribution) == list(alone)
        assert list(distribution.values()) == pytest.approx(list(alone.values()), abs=1e-5)


@pytest.mark.parametrize(("region", "expected"), [("text", 1), ("drawn", len(BOXES))])
def test_the_text_mode_encodes_an_image_and_runs_its_tokens_once_for_all_its_regions(checkpoint, region, expected):
    engine = Qwen3VLEngine.from_pretrained(checkpoint, options={"region": region})
    encoded: list[int] = []  # images through the vision tower
    prefixes: list[int] = []  # rows holding image tokens through the language model
    hooks = [
        engine.model.model.visual.register_forward_hook(
            lambda module, args, kwargs, out: encoded.append(len(kwargs["grid_thw"])), with_kwargs=True),
        engine.model.model.language_model.register_forward_hook(
            lambda module, args, kwargs, out: prefixes.append(
                0 if kwargs.get("visual_pos_masks") is None else kwargs["visual_pos_masks"].any(-1).sum().item()),
            with_kwargs=True),
    ]
    image = picture(4)
    engine.caption([CaptionRequest(image, box) for box in BOXES], max_new_tokens=2)
    engine.choose([ChoiceRequest(image, box, "color", COLORS) for box in BOXES])
    engine.caption([CaptionRequest(picture(4), BOXES[0])], max_new_tokens=2)  # the same pixels, a new object
    for hook in hooks:
        hook.remove()
    assert (sum(encoded), sum(prefixes)) == (expected, expected)


def test_dataset_records_are_asked_their_own_question(engine, tmp_path):
    picture(5).save(tmp_path / "a.png")
    image = Image.open(tmp_path / "a.png").convert("RGB")
    pixels = [6.4, 4.8, 32.0, 28.8]
    common = {"image": str(tmp_path / "a.png"), "width": 64, "height": 48}
    records = [
        RegionSample(id="c", boxes=[pixels], conversations=[{"from": "human", "value": "Describe region1 <bbox>."},
                                                            {"from": "gpt", "value": "a red square"}],
                     meta={"task": "caption"}, **common),
        RegionSample(id="r", boxes=[pixels, [1, 1, 9, 9]],
                     conversations=[{"from": "human", "value": "Is region1 <bbox> left of region2 <bbox>?"},
                                    {"from": "gpt", "value": "yes"}],
                     meta={"task": "relation", "relation": "left_of"}, **common),
    ]
    [caption] = engine.caption([CaptionRequest(image, (0.1, 0.1, 0.5, 0.6))], max_new_tokens=5)
    assert engine.generate(records, max_new_tokens=5) == [caption.text, ""]


# ---------------------------------------------------------------- training
def test_a_finetune_lowers_the_loss_saves_the_adapter_and_reloads_as_trained(checkpoint, tmp_path):
    engine = Qwen3VLEngine.from_pretrained(checkpoint, options={"region": "text"})
    paths = []
    for seed in (1, 3):
        paths.append(tmp_path / f"{seed}.png")
        picture(seed).save(paths[-1])
    examples = [
        Example("a", str(paths[0]), 64, 48, (6.0, 5.0, 32.0, 29.0), None, "a red square"),
        Example("b", str(paths[0]), 64, 48, (6.0, 5.0, 32.0, 29.0), "color", "red"),
        Example("c", str(paths[1]), 64, 48, (20.0, 10.0, 60.0, 40.0), "color", "blue"),
        Example("d", str(paths[1]), 64, 48, (20.0, 10.0, 60.0, 40.0), LABEL, "square"),
    ]
    question = ChoiceRequest(Image.open(paths[0]).convert("RGB"), (6 / 64, 5 / 48, 32 / 64, 29 / 48), "color",
                             ("blue", "red"))
    [before] = engine.choose([question])
    records = [  # dataset records train too, where they ask one question about one region
        RegionSample(id="e", image=str(paths[1]), width=64, height=48, boxes=[[20.0, 10.0, 60.0, 40.0]],
                     conversations=[{"from": "human", "value": "What is the size of region1 <bbox>?"},
                                    {"from": "gpt", "value": "large"}],
                     meta={"task": "attribute", "attribute": "size"}),
        RegionSample(id="f", image=str(paths[1]), width=64, height=48, boxes=[[1, 1, 9, 9], [20, 10, 60, 40]],
                     conversations=[{"from": "human", "value": "Is region1 <bbox> left of region2 <bbox>?"},
                                    {"from": "gpt", "value": "yes"}], meta={"task": "relation"}),
    ]
    result = engine.finetune(examples, FinetuneConfig(learning_rate=5e-3, max_steps=10, lora_rank=4, seed=0),
                             records=records)
    assert result.steps == 10 and result.last_loss < result.first_loss
    assert result.settings["examples"] == len(examples) + 1
    trained = {name for name, p in engine.model.named_parameters() if p.requires_grad}
    assert trained and all(".language_model." in name and "lora_" in name for name in trained)
    [after] = engine.choose([question])
    assert after["red"] > before["red"]

    folder = tmp_path / "v2"
    engine.save_pretrained(folder)
    assert (folder / "lora" / "adapter_config.json").is_file()
    assert json.loads((folder / "config.json").read_text())["model_type"] == "qwen3_vl"
    [saved] = engine.choose([question])
    assert saved == pytest.approx(after, abs=1e-5)
    reloaded = load_engine(folder, options={"region": "text"})
    assert isinstance(reloaded, Qwen3VLEngine)
    assert reloaded.choose([question])[0] == pytest.approx(after, abs=1e-5)
    caption = CaptionRequest(question.image, question.box)
    assert reloaded.caption([caption], max_new_tokens=4) == engine.caption([caption], max_new_tokens=4)


def test_a_checkpoint_is_saved_in_the_dtype_it_was_stored_in(checkpoint, tmp_path):
    engine = Qwen3VLEngine.from_pretrained(checkpoint, dtype="bfloat16")
    assert engine.model.dtype == torch.bfloat16 and engine.stored_dtype == torch.float32
    engine.save_pretrained(tmp_path / "copy")
    assert engine.model.dtype == torch.bfloat16, "the engine goes on in its working dtype"
    assert json.loads((tmp_path / "copy" / "config.json").read_text())["dtype"] == "float32"
    assert Qwen3VLForConditionalGeneration.from_pretrained(tmp_path / "copy").dtype == torch.float32
    assert not (tmp_path / "copy" / "lora").exists(), "no fine-tune, no adapter"
