"""How much the demo model's confidences mean: reliability on held-out scenes, raw and calibrated.

    python bench/calibration_bench.py [--scenes 200] [--seed 7] [--plot reliability.png]

Draws synthetic scenes (`tests.support.hitl.make_tasks`: every other one holds a `cross`, the shape the demo
model never saw, so some answers are wrong for a reason an annotator would meet), describes every object's
box with the demo checkpoint exactly as the worker does (`backend.describe.describe`: caption, colour, size,
texture and label), and judges each proposed field against the ground truth as the acceptance statistics
do (`backend.acceptance.compare_fields`). Half the scenes fit the calibration (`backend.calibration.fit`,
what a fine-tune does on its held-out corrections); the other half measure it:

- per field kind (caption, choice, label): the expected calibration error (ECE) and AUROC of "kept
  unchanged" against the confidence, raw and calibrated;
- per region: the AUROC of "accepted unchanged" (every field kept) against the region's score (the product
  of its fields' calibrated confidences, as in a prediction's task score).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from backend.acceptance import compare_fields
from backend.calibration import Observation, calibration_report, fit, observe
from backend.describe import describe
from backend.labelconfig import FillPlan, Region, predicted_fields
from model.demo.recipe import ensure_demo_checkpoint
from model.gpt4roi.engine import GPT4RoIEngine
from tests.support.hitl import CHOICE_CONTROLS, DEMO_CONFIG, SceneTask, make_tasks


def judged(engine: Any, plan: FillPlan, task: SceneTask, root: Path) -> list[tuple[list[Observation], bool]]:
    """Per object of a scene: its fields' observations (raw confidence, kept) and whether all were kept."""
    with Image.open(task.image_path(root)) as opened:
        image = opened.convert("RGB")
    regions = []
    for index, obj in enumerate(task.objects):
        x1, y1, x2, y2 = obj.box
        regions.append(Region(task.region_id(index), 100 * x1 / task.width, 100 * y1 / task.height,
                              100 * (x2 - x1) / task.width, 100 * (y2 - y1) / task.height,
                              original_width=task.width, original_height=task.height))
    answers = describe(engine, image, plan, regions, keep_drawn_label=False, max_new_tokens=32)
    out = []
    for obj, region, answer in zip(task.objects, regions, answers, strict=True):
        final = {"caption": obj.caption, "label": obj.shape,
                 "choices": {name: [getattr(obj, name)] for name in CHOICE_CONTROLS}}
        kept = compare_fields(predicted_fields(plan, region, answer, keep_drawn_label=False), final)
        out.append((observe(kept, answer["confidence"]), bool(kept) and all(kept.values())))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=200, help="held-out scenes (half fit, half measure)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--plot", type=Path, help="also draw the reliability diagram here (PNG)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    checkpoint = ensure_demo_checkpoint()
    engine = GPT4RoIEngine.from_pretrained(checkpoint)
    plan = FillPlan.from_label_config(DEMO_CONFIG)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
        root = Path(workdir)
        tasks = make_tasks(root, "held-out", 1, args.scenes, seed=args.seed)
        judged_tasks = [judged(engine, plan, task, root) for task in tasks]
    seconds = time.perf_counter() - started
    # Scenes come in pairs (one sure to hold a cross, one drawn freely), so each half takes whole pairs and
    # both halves see the same mix: alternate scenes would fit on crosses and measure on fewer of them.
    fitting = [region for i, task in enumerate(judged_tasks) if i % 4 < 2 for region in task]
    measuring = [region for i, task in enumerate(judged_tasks) if i % 4 >= 2 for region in task]
    calibration = fit(o for observations, _ in fitting for o in observations)
    figures = {**calibration_report(calibration, measuring), "regions_fit": len(fitting), "seconds": round(seconds, 1)}

    print(f"demo checkpoint {checkpoint}; {args.scenes} scenes ({len(fitting)} regions fit the calibration, "
          f"{len(measuring)} measure it) in {seconds:.0f} s")
    print(f"{'kind':<9}{'fields':>7}{'kept':>7}{'ECE raw':>9}{'ECE cal':>9}{'AUROC raw':>11}{'AUROC cal':>11}")
    for kind in ("caption", "choice", "label", "all"):
        raw, cal = figures["raw"].get(kind), figures["calibrated"].get(kind)
        if raw is None:
            continue
        print(f"{kind:<9}{raw['fields']:>7}{raw['kept']:>7.3f}{raw['ece']:>9.3f}{cal['ece']:>9.3f}"
              f"{_fmt(raw['auroc']):>11}{_fmt(cal['auroc']):>11}")
    print(f"region score vs accepted unchanged: AUROC {_fmt(figures['region_auroc']['raw'])} raw, "
          f"{_fmt(figures['region_auroc']['calibrated'])} calibrated (target >= 0.8); ECE target <= 0.05 for "
          "choices and labels")
    if args.plot:
        from backend.report import plot_reliability

        plot_reliability({"raw": figures["raw"]["all"]["bins"], "calibrated": figures["calibrated"]["all"]["bins"]},
                         args.plot)
        print(f"reliability diagram: {args.plot}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


if __name__ == "__main__":
    raise SystemExit(main())
