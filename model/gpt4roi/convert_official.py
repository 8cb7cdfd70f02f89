"""Convert the released GPT4RoI delta (`shilongz/GPT4RoI-7B-delta-V0`) into this project's format.

    python -m model.gpt4roi.convert_official --delta DIR --llama DIR --clip DIR --out DIR [--dtype float16]

`--delta` is the release as published (`pytorch_model-0000N-of-00002.bin` + `pytorch_model.bin.index.json`
+ tokenizer files + `config.json`), `--llama` an HF-format LLaMA-1-7B (`.bin` or `.safetensors`, sharded or
not), `--clip` an HF-format `openai/clip-vit-large-patch14` (a full `CLIPModel` or vision weights only).

The delta is applied in fp32, one delta shard at a time, reading base tensors lazily, so no two full
copies of the 7B weights are ever in memory: LLaMA keys are `base + delta` (the six added vocabulary rows
are raw values), `mm_projector` / `spi_module` are copied, `rotary_emb.inv_freq` buffers are dropped.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .configuration_gpt4roi import GPT4RoIConfig

TOKENIZER_FILES = ("tokenizer.model", "added_tokens.json", "special_tokens_map.json", "tokenizer_config.json")
LLAMA_VOCAB = 32000


class ConversionError(RuntimeError):
    """The inputs are not what the converter needs; the message says which file and why."""


def official_to_local(key: str) -> str | None:
    """Map an official checkpoint key to this model's key; `None` for keys that are dropped."""
    if key.endswith("rotary_emb.inv_freq"):
        return None
    if key.startswith(("model.mm_projector.", "model.spi_module.")):
        return key.removeprefix("model.")
    if key.startswith("model."):
        return "language_model." + key
    if key == "lm_head.weight":
        return "language_model.lm_head.weight"
    if key.startswith("vision_model."):
        return "vision_tower." + key.removeprefix("vision_model.")
    raise ConversionError(f"unexpected key in checkpoint: {key}")


def is_delta_key(key: str) -> bool:
    """Keys stored as `target - base` in the release (LLaMA weights); the rest are stored raw."""
    return not key.startswith(("model.mm_projector.", "model.spi_module.")) and not key.endswith("inv_freq")


class LazyCheckpoint:
    """Tensors of an HF checkpoint directory read one at a time (safetensors or `.bin`, sharded or not)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._stack = ExitStack()
        self._where: dict[str, Path] = {}
        self._bins: dict[Path, dict[str, torch.Tensor]] = {}
        files = sorted(directory.glob("*.safetensors")) or sorted(directory.glob("*.bin"))
        if not files:
            raise ConversionError(f"{directory}: no *.safetensors or *.bin weight files")
        for file in files:
            for key in self._keys(file):
                self._where[key] = file

    def _keys(self, file: Path) -> list[str]:
        if file.suffix == ".safetensors":
            with safe_open(file, "pt") as f:
                return list(f.keys())
        return list(self._load_bin(file))

    def _load_bin(self, file: Path) -> dict[str, torch.Tensor]:
        if file not in self._bins:
            # mmap keeps a 10 GB shard out of RAM until its tensors are touched.
            self._bins[file] = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        return self._bins[file]

    def tensor_names(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def get(self, key: str) -> torch.Tensor:
        file = self._where[key]
        if file.suffix == ".safetensors":
            with safe_open(file, "pt") as f:
                return f.get_tensor(key)
        return self._load_bin(file)[key]


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise ConversionError(f"missing {path}")
    return json.loads(path.read_text())


def check_llama_base(llama_dir: Path, base: LazyCheckpoint) -> dict:
    """Refuse bases that are not LLaMA-1-7B-shaped (Llama-2 has the same tensor shapes, not the same config)."""
    config = _read_json(llama_dir / "config.json")
    problems = []
    if config.get("max_position_embeddings") != 2048:
        problems.append(f"max_position_embeddings={config.get('max_position_embeddings')} (LLaMA-1: 2048)")
    if abs(float(config.get("rms_norm_eps", 0)) - 1e-6) > 1e-9:
        problems.append(f"rms_norm_eps={config.get('rms_norm_eps')} (LLaMA-1: 1e-06)")
    rows = base.get("model.embed_tokens.weight").shape[0]
    if rows != LLAMA_VOCAB:
        problems.append(f"embed_tokens has {rows} rows (LLaMA-1: {LLAMA_VOCAB})")
    if problems:
        raise ConversionError(
            f"{llama_dir} is not an original LLaMA-1-7B in HF format: " + "; ".join(problems)
            + ". GPT4RoI's delta was made against LLaMA-1 (not Vicuna, not Llama-2)."
        )
    return config


def _merged(key: str, delta: torch.Tensor, base: LazyCheckpoint) -> torch.Tensor:
    if not is_delta_key(key):
        return delta.float()
    if key not in base:
        raise ConversionError(f"the LLaMA base has no tensor {key}")
    base_tensor = base.get(key).float()
    target = delta.float().clone()
    rows = min(base_tensor.shape[0], target.shape[0])
    if base_tensor.shape[1:] != target.shape[1:]:
        raise ConversionError(f"{key}: base shape {tuple(base_tensor.shape)} vs delta {tuple(target.shape)}")
    # Rows past the base vocabulary (the six added tokens) are stored raw in the delta.
    target[:rows] += base_tensor[:rows]
    return target


def _delta_shards(delta_dir: Path) -> list[Path]:
    index = delta_dir / "pytorch_model.bin.index.json"
    if index.is_file():
        return sorted({delta_dir / name for name in _read_json(index)["weight_map"].values()})
    single = delta_dir / "pytorch_model.bin"
    if single.is_file():
        return [single]
    raise ConversionError(f"{delta_dir}: no pytorch_model.bin.index.json or pytorch_model.bin")


def _clip_tensors(clip: LazyCheckpoint) -> Iterator[tuple[str, torch.Tensor]]:
    found = False
    for key in clip.tensor_names():
        if key.startswith("vision_model.") and not key.endswith("position_ids"):
            found = True
            yield official_to_local(key), clip.get(key).float()
    if not found:
        raise ConversionError(f"{clip.directory}: no vision_model.* tensors (expected a CLIP checkpoint)")


def _vision_config(clip_dir: Path) -> dict:
    config = _read_json(clip_dir / "config.json")
    vision = config.get("vision_config", config)
    keep = (
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
        "patch_size", "hidden_act", "layer_norm_eps", "projection_dim", "num_channels",
    )
    return {k: vision[k] for k in keep if k in vision}


def build_config(delta_dir: Path, llama_config: dict, clip_dir: Path) -> GPT4RoIConfig:
    """Our config from the three inputs: LLaMA dims from the base, vocabulary from the delta, CLIP dims."""
    delta_config = _read_json(delta_dir / "config.json")
    text = GPT4RoIConfig.from_preset("gpt4roi-7b").text_config.to_dict()
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "max_position_embeddings", "rms_norm_eps", "hidden_act"):
        if key in llama_config:
            text[key] = llama_config[key]
    text["num_key_value_heads"] = llama_config.get("num_key_value_heads", text["num_attention_heads"])
    text["vocab_size"] = delta_config.get("vocab_size", 32006)
    vision = _vision_config(clip_dir)
    return GPT4RoIConfig.from_preset(
        "gpt4roi-7b", text_config=text, vision_config=vision,
        image_feature_layer=delta_config.get("mm_vision_select_layer", -2),
        region_dim=vision.get("hidden_size", 1024),
    )


def convert(delta_dir: Path, llama_dir: Path, clip_dir: Path, out_dir: Path, dtype: torch.dtype) -> Path:
    """Write a `GPT4RoIForCausalLM.from_pretrained`-loadable directory; returns `out_dir`."""
    from tqdm import tqdm

    base = LazyCheckpoint(llama_dir)
    llama_config = check_llama_base(llama_dir, base)
    config = build_config(delta_dir, llama_config, clip_dir)
    clip = LazyCheckpoint(clip_dir)
    shards = _delta_shards(delta_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    n_files = len(shards) + 1
    weight_map: dict[str, str] = {}
    total_size = 0

    def write(tensors: dict[str, torch.Tensor], index: int) -> None:
        nonlocal total_size
        name = f"model-{index:05d}-of-{n_files:05d}.safetensors"
        tensors = {k: v.to(dtype).contiguous() for k, v in tensors.items()}
        save_file(tensors, out_dir / name, metadata={"format": "pt"})
        for key, tensor in tensors.items():
            weight_map[key] = name
            total_size += tensor.numel() * tensor.element_size()

    for i, shard in enumerate(tqdm(shards, desc="delta shards", unit="shard"), start=1):
        delta = torch.load(shard, map_location="cpu", weights_only=True, mmap=True)
        merged = {}
        for key, tensor in delta.items():
            local = official_to_local(key)
            if local is not None:
                merged[local] = _merged(key, tensor, base)
        write(merged, i)
        del delta, merged
        gc.collect()
    write(dict(_clip_tensors(clip)), n_files)

    validate_merge(out_dir, weight_map)
    (out_dir / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total_size}, "weight_map": weight_map}, indent=2)
    )
    config.torch_dtype = str(dtype).removeprefix("torch.")
    config.save_pretrained(out_dir)
    for name in TOKENIZER_FILES:
        if (delta_dir / name).is_file():
            shutil.copy2(delta_dir / name, out_dir / name)
    return out_dir


def validate_merge(out_dir: Path, weight_map: dict[str, str]) -> None:
    """Norm weights of a good merge are O(1): ≈0 means the delta was not applied, ≈2 that it was twice."""
    key = "language_model.model.norm.weight"
    if key not in weight_map:
        raise ConversionError("merged checkpoint has no final norm weight")
    with safe_open(out_dir / weight_map[key], "pt") as f:
        mean = f.get_tensor(key).float().abs().mean().item()
    if not 0.05 < mean < 1.8:
        raise ConversionError(
            f"merged final norm weight has mean |w| = {mean:.3f}: the delta was not applied to the base "
            "it was made from (wrong LLaMA base, or the base is already merged)"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.gpt4roi.convert_official",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--delta", type=Path, required=True, help="released delta directory")
    parser.add_argument("--llama", type=Path, required=True, help="HF-format LLaMA-1-7B directory")
    parser.add_argument("--clip", type=Path, required=True, help="HF-format CLIP ViT-L/14 directory")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    args = parser.parse_args(argv)
    for flag in ("delta", "llama", "clip"):
        if not getattr(args, flag).is_dir():
            parser.error(f"--{flag} {getattr(args, flag)} is not a directory")
    try:
        out = convert(args.delta, args.llama, args.clip, args.out, getattr(torch, args.dtype))
    except ConversionError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
