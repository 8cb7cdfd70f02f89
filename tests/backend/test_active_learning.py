"""Least certain first: sorting tasks by the prediction score (as Label Studio's Data Manager does) puts first
the scenes the model gets wrong. The demo model never saw a `cross`; in a pool where one scene in six holds
one, the lowest third of the task scores must hold nearly all of those scenes, where a random third holds a
third of them. (Not all: the model names some crosses `star` with confidence, as a model does with what it
never saw.)

This runs the worker's own path in one process (`describe_many`, then the prediction a job returns) on the
shipped demo model; `bench/hitl_bench.py` measures what picking them this way does for the fine-tune.
"""

from __future__ import annotations

import pytest
from PIL import Image

from backend.describe import Description, describe_many, load_engine
from backend.labelconfig import FillPlan, build_prediction, regions_from_task
from tests.support.hitl import DEMO_CONFIG, NEW_SHAPE, choose_scenes, make_tasks, task_json

pytestmark = pytest.mark.slow

POOL, EVERY = 36, 6


def test_the_lowest_task_scores_are_the_scenes_holding_a_shape_the_model_never_saw(tmp_path):
    import torch

    from model.demo import ensure_demo_checkpoint

    engine = load_engine(ensure_demo_checkpoint(progress=False), torch.device("cpu"))
    plan = FillPlan.from_label_config(DEMO_CONFIG)
    tasks = make_tasks(tmp_path, "pool", 1, POOL, seed=61, cross_every=EVERY)
    items = [Description(Image.open(t.image_path(tmp_path)).convert("RGB"), plan,
                         regions_from_task(plan, task_json(t)), True) for t in tasks]
    predictions = [build_prediction(item.plan, item.regions, answers, "demo")
                   for item, answers in zip(items, describe_many(engine, items, 24), strict=True)]
    holds_cross = [any(o.shape == NEW_SHAPE for o in t.objects) for t in tasks]
    assert sum(holds_cross) == POOL // EVERY

    lowest_third = choose_scenes(predictions, POOL // 3, "uncertain", seed=0)
    found = sum(holds_cross[i] for i in lowest_third)
    ranked = sorted((p["score"], cross) for p, cross in zip(predictions, holds_cross, strict=True))
    assert found >= POOL // EVERY - 1, ranked
    assert all(0.0 <= p["score"] <= 1.0 for p in predictions)
