"""Our GPT4RoI reproduces the original code's numbers.

`tests/fixtures/gpt4roi_official_reference/` holds inputs and outputs of the official GPT4RoI forward pass
on a dimension-faithful model with recipe weights. This test rebuilds those weights under the official key
names, writes them the way the release is published (a LLaMA base + a `.bin` delta + a CLIP directory),
converts them with `model.gpt4roi.convert_official`, and compares our forward pass with the stored tensors.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from model.gpt4roi.configuration_gpt4roi import GPT4RoIConfig
from model.gpt4roi.convert_official import main as convert_main
from model.gpt4roi.modeling_gpt4roi import GPT4RoIForCausalLM
from tests.support import FIXTURES

FIXTURE = FIXTURES / "gpt4roi_official_reference"
pytestmark = pytest.mark.slow

NORM_WEIGHT_PARTS = ("layernorm", "layer_norm", "norm.weight", ".gn.weight", "pos_embedd.2.weight",
                     "pos_embedd.5.weight", "pre_layrnorm", "post_layernorm")


def recipe(key: str, shape: list[int]) -> torch.Tensor:
    """The fixture's weight recipe (its README §3)."""
    generator = torch.Generator().manual_seed(zlib.crc32(key.encode("utf-8")))
    weight = 0.02 * torch.randn(shape, generator=generator, dtype=torch.float32)
    is_norm_weight = key.endswith("weight") and any(part in key for part in NORM_WEIGHT_PARTS)
    return weight + 1.0 if is_norm_weight else weight


def base_weight(key: str, shape: list[int]) -> torch.Tensor:
    """A stand-in LLaMA base, different from the target so the delta path is really exercised."""
    generator = torch.Generator().manual_seed(zlib.crc32(key.encode("utf-8")) ^ 0x5EED)
    return 0.01 * torch.randn(shape, generator=generator, dtype=torch.float32)


@pytest.fixture(scope="module")
def manifest() -> list[dict]:
    return json.loads((FIXTURE / "weights_manifest.json").read_text())


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    return load_file(FIXTURE / "reference.safetensors")


@pytest.fixture(scope="module")
def converted(tmp_path_factory, manifest) -> Path:
    """The fixture weights published in the official layout, then converted."""
    fixture_config = json.loads((FIXTURE / "config.json").read_text())
    root = tmp_path_factory.mktemp("official")
    delta_dir, llama_dir, clip_dir, out_dir = (root / name for name in ("delta", "llama", "clip", "out"))
    for directory in (delta_dir, llama_dir, clip_dir):
        directory.mkdir()

    llm = [e for e in manifest if not e["key"].startswith("vision_model.")]
    vision = [e for e in manifest if e["key"].startswith("vision_model.")]
    delta, base = {}, {}
    for entry in llm:
        key, shape = entry["key"], entry["shape"]
        target = recipe(key, shape)
        if key.startswith(("model.mm_projector.", "model.spi_module.")):
            delta[key] = target
            continue
        base_shape = [min(shape[0], 32000), *shape[1:]]
        base[key] = base_weight(key, base_shape)
        delta[key] = target.clone()
        delta[key][: base_shape[0]] -= base[key]
    head_dim = fixture_config["llama"]["hidden_size"] // fixture_config["llama"]["num_attention_heads"]
    inv_freq = 1.0 / 10000 ** (torch.arange(0, head_dim, 2).float() / head_dim)
    for layer in range(fixture_config["llama"]["num_hidden_layers"]):
        # The release carries these buffers (as deltas ≈ 0); the converter must drop them.
        delta[f"model.layers.{layer}.self_attn.rotary_emb.inv_freq"] = inv_freq * 0

    # Delta: two pickled shards + index, like the release.
    keys = list(delta)
    shards = {"pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2],
              "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2:]}
    for name, shard_keys in shards.items():
        torch.save({k: delta[k] for k in shard_keys}, delta_dir / name)
    weight_map = {k: name for name, shard_keys in shards.items() for k in shard_keys}
    (delta_dir / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (delta_dir / "config.json").write_text(json.dumps(fixture_config["hf_config_llama_full_transformers_4_29_2"]))
    del delta

    # LLaMA base: two safetensors shards, 32000-row vocabulary.
    base_keys = list(base)
    for i, part in enumerate((base_keys[::2], base_keys[1::2]), start=1):
        save_file({k: base[k].contiguous() for k in part}, llama_dir / f"model-0000{i}-of-00002.safetensors")
    llama_config = dict(fixture_config["hf_config_llama_full_transformers_4_29_2"], vocab_size=32000)
    (llama_dir / "config.json").write_text(json.dumps(llama_config))
    del base

    save_file({e["key"]: recipe(e["key"], e["shape"]) for e in vision}, clip_dir / "model.safetensors")
    (clip_dir / "config.json").write_text(json.dumps(fixture_config["hf_config_clip_vision_full_transformers_4_29_2"]))

    code = convert_main(["--delta", str(delta_dir), "--llama", str(llama_dir), "--clip", str(clip_dir),
                         "--out", str(out_dir), "--dtype", "float32"])
    assert code == 0
    return out_dir


@pytest.fixture(scope="module")
def model(converted) -> GPT4RoIForCausalLM:
    return GPT4RoIForCausalLM.from_pretrained(converted, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def outputs(model, reference):
    ids, mask = reference["input.input_ids"], reference["input.attention_mask"]
    boxes = list(reference["input.boxes"].split(reference["input.n_boxes"].tolist()))
    with torch.no_grad():
        features = model.encode_images(reference["input.pixel_values"])
        regions = model.encode_regions(boxes=boxes, image_features=features)
        embeds = model.embed_inputs(ids, features, boxes)
        logits = model(inputs_embeds=embeds, attention_mask=mask).logits
    return {"features": features, "regions": torch.cat(regions), "embeds": embeds, "logits": logits}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """The fixture's suggested check for an fp32 re-implementation: max|diff| <= 1e-4 * max|ref|."""
    scale = expected.abs().max().item()
    diff = (actual.double() - expected.double()).abs().max().item()
    assert diff <= 1e-4 * scale, f"{what}: max|diff| {diff:.3e} > 1e-4 * max|ref| ({scale:.3e})"


def test_recipe_matches_the_manifest(manifest):
    for entry in manifest[:: max(1, len(manifest) // 40)]:
        if entry["shape"][0] > 10_000 and len(entry["shape"]) > 1:
            continue  # first3 of the huge matrices is checked through the outputs instead
        weight = recipe(entry["key"], entry["shape"]).flatten()[:3]
        assert torch.allclose(weight, torch.tensor(entry["first3"]), atol=1e-7), entry["key"]


def test_converted_checkpoint_uses_our_module_names(converted):
    index = json.loads((converted / "model.safetensors.index.json").read_text())["weight_map"]
    assert "spi_module.roi_align.flatten_linear.weight" in index
    assert "language_model.lm_head.weight" in index
    assert "vision_tower.encoder.layers.23.mlp.fc2.weight" in index
    assert not any("inv_freq" in key for key in index)
    config = GPT4RoIConfig.from_pretrained(converted)
    assert config.text_config.vocab_size == 32006 and config.num_image_tokens == 256


def test_region_embeddings_match(outputs, reference):
    assert_close(outputs["regions"], reference["out.spi_features"], "region embeddings")


def test_image_features_match(outputs, reference):
    tokens = outputs["features"].tokens
    assert_close(tokens[:, :8], reference["out.image_features.first8"], "image features")
    stats = torch.stack([tokens.double().flatten(1).mean(1), tokens.double().flatten(1).std(1)], dim=1)
    assert_close(stats.float(), reference["out.image_features.mean_std"], "image feature stats")


def test_spliced_embeddings_match(outputs, reference):
    positions = reference["out.bbox_positions"]
    assert_close(outputs["embeds"][positions[:, 0], positions[:, 1]],
                 reference["out.inputs_embeds.bbox_positions"], "embeddings at <bbox>")
    starts = (reference["input.input_ids"] == 32004).nonzero()
    after_start = torch.stack([outputs["embeds"][b, p + 1: p + 9] for b, p in starts.tolist()])
    assert_close(after_start, reference["out.inputs_embeds.image_start_plus1_first8"], "embeddings after <im_start>")


def test_logits_match(outputs, reference):
    logits = outputs["logits"]
    positions = reference["out.bbox_positions"]
    assert_close(logits[positions[:, 0], positions[:, 1]], reference["out.logits.bbox_positions"], "logits at <bbox>")
    for b, length in enumerate(reference["input.seq_lens"].tolist()):
        assert_close(logits[b, length - 3: length], reference["out.logits.last3"][b], f"last-3 logits of sample {b}")
        assert_close(logits[b, :length].logsumexp(-1), reference["out.logits.logsumexp_all"][b, :length],
                     f"logsumexp of sample {b}")


def test_region_embeddings_depend_on_the_box(model, reference):
    pixels = reference["input.pixel_values"][:1]
    boxes = [torch.tensor([[0.1, 0.2, 0.5, 0.6], [0.55, 0.0, 1.0, 0.45]])]
    with torch.no_grad():
        first, second = model.encode_regions(pixels, boxes)[0]
    assert (first - second).abs().max() > 1e-2 * first.abs().max()


def test_precomputed_regions_splice_like_boxes(model, outputs, reference):
    ids = reference["input.input_ids"]
    boxes = list(reference["input.boxes"].split(reference["input.n_boxes"].tolist()))
    regions = list(outputs["regions"].split(reference["input.n_boxes"].tolist()))
    with torch.no_grad():
        embeds = model.embed_inputs(ids, outputs["features"], None, regions=regions)
    torch.testing.assert_close(embeds, outputs["embeds"], rtol=0, atol=0)
    with pytest.raises(ValueError, match="not both"):
        model.embed_inputs(ids, outputs["features"], boxes, regions=regions)
    with pytest.raises(ValueError, match="<bbox> tokens but"):
        model.embed_inputs(ids, outputs["features"], None, regions=[r[:0] for r in regions])
