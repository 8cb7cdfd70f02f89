"""Label Studio's own computer-vision templates, as installed with Label Studio (in the venv that
`scripts/ensure_labelstudio.sh` installs), and tasks for them: the template's sample data with an image of
ours, and a region drawn with one of its tools as Label Studio writes it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import yaml
from label_studio_sdk.converter.brush import mask2rle
from label_studio_sdk.label_interface import LabelInterface

from backend.labelconfig import FillPlan, Tool
from tests.e2e.labelstudio import default_venv_path

# The size of the images the template tasks show (`tests.support.images.scene`).
IMAGE_SIZE = (96, 64)


def templates_folder() -> Path | None:
    """The installed Label Studio's `computer-vision` templates folder, None without the venv."""
    found = sorted(default_venv_path().glob(
        "lib/python3*/site-packages/label_studio/annotation_templates/computer-vision"))
    return found[-1] if found else None


def find_templates() -> list[Path]:
    folder = templates_folder()
    return sorted(p for p in folder.iterdir() if (p / "config.yml").is_file()) if folder else []


def template_config(folder: Path) -> str:
    return yaml.safe_load((folder / "config.yml").read_text())["config"]


def template_data(config: str, plan: FillPlan, image: str) -> dict[str, Any]:
    """The template's own sample task data (labels listed in it, for one) showing `image`."""
    sample, _, _ = LabelInterface.get_task_from_labeling_config(config)
    return {**(sample or {}), plan.image_key or "image": image}


def region_items(plan: FillPlan, tool: Tool, region_id: str) -> list[dict[str, Any]]:
    """A region drawn with `tool` as Label Studio writes it (and its label, where the tool has labels)."""
    shape_values = {
        "rectangle": {"x": 10.0, "y": 15.0, "width": 40.0, "height": 50.0, "rotation": 0},
        "polygon": {"points": [[10.0, 15.0], [50.0, 20.0], [30.0, 70.0]], "closed": True},
        "ellipse": {"x": 40.0, "y": 45.0, "radiusX": 20.0, "radiusY": 25.0, "rotation": 0},
        "keypoint": {"x": 30.0, "y": 40.0, "width": 0.6},
    }
    if tool.shape == "brush":
        mask = np.zeros((IMAGE_SIZE[1], IMAGE_SIZE[0]), dtype=np.uint8)
        mask[10:40, 12:50] = 255
        geometry: dict[str, Any] = {"format": "rle", "rle": mask2rle(mask)}
    else:
        geometry = shape_values[tool.shape]
    common = {"id": region_id, "to_name": plan.image, "original_width": IMAGE_SIZE[0],
              "original_height": IMAGE_SIZE[1], "image_rotation": 0}
    value = dict(geometry)
    if tool.labels and tool.labels_control is None:
        value[tool.type] = [tool.labels[0]]
    items = [{**common, "from_name": tool.name, "type": tool.type, "value": value}]
    if tool.labels and tool.labels_control is not None:
        items.append({**common, "from_name": tool.labels_control, "type": "labels",
                      "value": {**geometry, "labels": [tool.labels[0]]}})
    return items
