"""The demo: a synthetic shapes world and a small GPT4RoI trained on it on a CPU, so that everything runs,
and is tested, without a GPU or downloaded weights.

It builds on the `model` library and is never imported by it:

- `synthetic`: scenes of shapes with per-object ground truth, and region records about them;
- `region_pretraining`, `region_warmup`: the training stages a model built from scratch needs before
  spatial instruction tuning (`model.gpt4roi.training`);
- `recipe`: the recipe (`DemoRecipe`), its checkpoint (shipped in `checkpoint/`, or trained into the cache)
  and `python -m model.demo`;
- `report`: what the held-out report says about captions beyond the COCO scores.

Names are imported lazily, so `from model.demo.synthetic import make_image` does not load torch.
"""

from model.lazy import lazy_attributes

_EXPORTS = {
    "DemoRecipe": "recipe",
    "HELD_OUT_SHAPE": "synthetic",
    "build_demo": "recipe",
    "default_checkpoint_dir": "recipe",
    "demo_version_name": "recipe",
    "ensure_demo_checkpoint": "recipe",
    "recipe_key": "recipe",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_attributes(__name__, _EXPORTS)
