"""What every engine does the same way when it loads: the dtype it runs in, the dtype a checkpoint is stored
in (so a fine-tuned version keeps its parent's size), and a dataset record's image as RGB."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import PretrainedConfig

from model.engine import EngineError


def runtime_dtype(name: str | None, device: Any) -> torch.dtype:
    """The dtype to run in: `name` (a torch dtype name such as `bfloat16`), or by default bf16 on CUDA and
    fp32 elsewhere."""
    if name is None:
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise EngineError(f"unknown dtype {name!r}: a torch dtype name such as bfloat16 or float32")
    return dtype


def stored_dtype(path: str | Path) -> torch.dtype | None:
    """The dtype a checkpoint's weights are stored in, from its config (float32 when it names none); None
    when the config cannot be read."""
    try:
        config, _ = PretrainedConfig.get_config_dict(str(path))
    except (OSError, ValueError):
        return None
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    return dtype if isinstance(dtype, torch.dtype) else None


def open_rgb(path: str | Path) -> Image.Image:
    """An image file, decoded as RGB (the file closed again)."""
    with Image.open(path) as image:
        return image.convert("RGB")
