"""Region-reading warm-up: the language model trains on each record's question turn alone (no system prompt,
no image tokens), with the region embeddings the vision side gives the record's boxes."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from model.data_format import read_jsonl
from model.demo.region_warmup import RegionWarmupConfig, question_turns, warm_up_region_reading
from model.demo.synthetic import generate_dataset
from model.gpt4roi.processing_gpt4roi import GPT4RoIProcessor, normalize_boxes
from tests.support.model_factory import make_tiny_model, make_tokenizer


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    return read_jsonl(generate_dataset(root, 6, seed=7, split_name="train", workers=1))


@pytest.fixture
def model_and_processor():
    tokenizer = make_tokenizer()
    model = make_tiny_model(tokenizer, seed=0)
    return model, GPT4RoIProcessor(tokenizer, model.config.image_size, model.config.num_image_tokens)


def test_a_question_turn_is_the_conversation_after_the_image_with_its_regions(samples, model_and_processor):
    model, processor = model_and_processor
    tokenizer = processor.tokenizer
    relation = next(s for s in samples if s.meta["task"] == "relation")

    [turn] = question_turns(model, processor, [relation], progress=False)

    ids, labels = processor.encode_conversation(relation.conversations)
    assert turn.ids == ids[-len(turn.ids):].tolist()
    assert turn.labels == labels[-len(turn.ids):].tolist()
    assert ids[-len(turn.ids) - 1] == tokenizer.im_end_token_id
    assert tokenizer.image_patch_token_id not in turn.ids
    assert turn.ids.count(tokenizer.bbox_token_id) == 2
    assert turn.kind == "relation"
    with Image.open(relation.image) as image:
        pixels = processor.preprocess_images([image])
    with torch.no_grad():
        expected = model.encode_regions(pixels, [normalize_boxes(relation.boxes, relation.width, relation.height)])
    torch.testing.assert_close(turn.regions, expected[0])


def test_each_record_gets_the_regions_of_its_own_boxes(samples, model_and_processor):
    model, processor = model_and_processor
    single = [s for s in samples if s.meta["task"] == "caption"]

    turns = question_turns(model, processor, single, images_per_encoding=2, progress=False)

    assert len(turns) == len(single)
    distinct = {tuple(t.regions[0].tolist()) for t in turns}
    assert len(distinct) == len({(str(s.image), tuple(s.boxes[0])) for s in single})


def test_warm_up_lowers_the_loss_and_trains_only_the_language_model(samples, model_and_processor):
    model, processor = model_and_processor
    vision = {k: v.clone() for k, v in model.vision_tower.state_dict().items()}
    region = {k: v.clone() for k, v in model.spi_module.state_dict().items()}
    llm = {k: v.clone() for k, v in model.language_model.state_dict().items()}

    losses = warm_up_region_reading(model, processor, samples,
                                    RegionWarmupConfig(steps=30, records_per_batch=8, progress=False))

    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    assert all(torch.equal(v, model.vision_tower.state_dict()[k]) for k, v in vision.items())
    assert all(torch.equal(v, model.spi_module.state_dict()[k]) for k, v in region.items())
    assert any(not torch.equal(v, model.language_model.state_dict()[k]) for k, v in llm.items())
    assert not model.training


def test_warm_up_can_keep_to_some_record_kinds(samples, model_and_processor, monkeypatch):
    import model.demo.region_warmup as region_warmup

    model, processor = model_and_processor
    seen = []
    real = region_warmup.question_turns

    def recording(model, processor, records, *args):
        seen.extend(records)
        return real(model, processor, records, *args)

    monkeypatch.setattr(region_warmup, "question_turns", recording)

    config = RegionWarmupConfig(steps=2, records_per_batch=4, task_weights={"relation": 1.0}, progress=False)
    warm_up_region_reading(model, processor, samples, config)

    assert seen and {s.meta["task"] for s in seen} == {"relation"}
    assert len(seen) == sum(s.meta["task"] == "relation" for s in samples)


def test_no_records_is_a_clear_error(samples, model_and_processor):
    model, processor = model_and_processor
    with pytest.raises(ValueError, match="no records"):
        warm_up_region_reading(model, processor, [], RegionWarmupConfig(steps=1, progress=False))
    with pytest.raises(ValueError, match=r"no records to warm up on \(tasks: nothing\)"):
        config = RegionWarmupConfig(steps=1, task_weights={"nothing": 1.0}, progress=False)
        warm_up_region_reading(model, processor, samples, config)
