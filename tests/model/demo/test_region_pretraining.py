"""Region pretraining (the demo's stand-in for CLIP): on a tiny model it lowers its loss, trains only the
vision tower and region module, and reads ground truth from the synthetic caption records."""

from __future__ import annotations

import pytest
import torch

from model.data_format import read_jsonl
from model.demo.region_pretraining import RegionPretrainingConfig, labelled_objects, pretrain_regions
from model.demo.synthetic import ATTRIBUTE_VALUES, generate_dataset
from model.gpt4roi.processing_gpt4roi import GPT4RoIProcessor
from tests.support.model_factory import make_tiny_model, make_tokenizer


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    return read_jsonl(generate_dataset(root, 12, seed=5, split_name="train", workers=1))


def test_every_object_is_labelled_once_with_its_attributes(samples):
    objects = labelled_objects(samples, ATTRIBUTE_VALUES)
    captions = [s for s in samples if s.meta["task"] == "caption"]
    assert sum(len(v) for v in objects.values()) == len(captions)
    for sample in captions:
        [match] = [o for o in objects[str(sample.image)] if o.box == pytest.approx(
            (sample.boxes[0][0] / sample.width, sample.boxes[0][1] / sample.height,
             sample.boxes[0][2] / sample.width, sample.boxes[0][3] / sample.height), abs=1e-6)]
        for name, values in ATTRIBUTE_VALUES.items():
            assert values[match.labels[name]] == sample.meta["attributes"][name]


def test_pretraining_lowers_its_loss_and_trains_only_the_vision_side(samples):
    tokenizer = make_tokenizer()
    model = make_tiny_model(tokenizer, seed=0)
    processor = GPT4RoIProcessor(tokenizer, model.config.image_size, model.config.num_image_tokens)
    llm_before = {k: v.clone() for k, v in model.language_model.state_dict().items()}
    spi_before = {k: v.clone() for k, v in model.spi_module.state_dict().items()}

    losses = pretrain_regions(model, processor, samples, ATTRIBUTE_VALUES,
                              RegionPretrainingConfig(steps=40, images_per_batch=4, progress=False))

    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    assert all(torch.equal(v, model.language_model.state_dict()[k]) for k, v in llm_before.items())
    assert any(not torch.equal(v, model.spi_module.state_dict()[k]) for k, v in spi_before.items())
    assert not model.training


def test_records_without_ground_truth_are_refused(samples):
    tokenizer = make_tokenizer()
    model = make_tiny_model(tokenizer, seed=0)
    processor = GPT4RoIProcessor(tokenizer, model.config.image_size, model.config.num_image_tokens)
    relations = [s for s in samples if s.meta["task"] == "relation"]
    with pytest.raises(ValueError, match="ground-truth attributes"):
        pretrain_regions(model, processor, relations, ATTRIBUTE_VALUES,
                         RegionPretrainingConfig(steps=1, progress=False))
