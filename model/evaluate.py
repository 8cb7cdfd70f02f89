"""Evaluate a checkpoint of any engine on a region dataset (the JSONL format of `model.data_format`).

    python -m model.evaluate --checkpoint DIR --data FILE.jsonl [--engine NAME] [--option K=V] [--out FILE]

Every record is answered by greedy generation (`Engine.generate`), as the backend's captions are. Caption
records get BLEU-4, METEOR, ROUGE-L and CIDEr. Other records get exact-match accuracy per attribute or relation (after
`model.metrics.normalize_answer`), and a confusion table per attribute. A dataset that knows more about its
captions (the demo's synthetic shapes) adds its own figures with `caption_figures`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

from tqdm.auto import tqdm

from .data_format import RegionSample, read_jsonl
from .engine import ENGINES, Engine, EngineError, load_engine
from .metrics import caption_metrics, closed_set_accuracy, confusion_table, format_table


def record_kind(sample: RegionSample) -> str:
    """`caption`, an attribute name (`color`, …) or a relation (`left_of`, …)."""
    meta = sample.meta or {}
    if meta.get("task") == "caption":
        return "caption"
    return str(meta.get("attribute") or meta.get("relation") or meta.get("task") or "other")


def predict(engine: Engine, samples: Sequence[RegionSample], batch_images: int = 8,
            progress: bool = True) -> list[str]:
    """Greedy answers to each record's (single) question, the records of a few images per call."""
    order: dict[str, list[int]] = defaultdict(list)
    for i, sample in enumerate(samples):
        order[str(sample.image)].append(i)
    answers: list[str] = [""] * len(samples)
    paths = list(order)
    bar = tqdm(total=len(samples), desc="evaluate", unit="question", disable=not progress)
    for start in range(0, len(paths), batch_images):
        rows = [i for path in paths[start: start + batch_images] for i in order[path]]
        for row, answer in zip(rows, engine.generate([samples[i] for i in rows]), strict=True):
            answers[row] = answer
        bar.update(len(rows))
    bar.close()
    return answers


CaptionFigures = Callable[[Sequence[RegionSample], Sequence[str]], dict]


def report(samples: Sequence[RegionSample], answers: Sequence[str],
           caption_figures: CaptionFigures | None = None) -> dict:
    """Metrics of `answers` against the records' reference answers, grouped by kind. `caption_figures`, when
    given, adds its figures (computed from the caption records and their answers) to the caption metrics."""
    by_kind: dict[str, list[tuple[RegionSample, str]]] = defaultdict(list)
    for sample, answer in zip(samples, answers, strict=True):
        by_kind[record_kind(sample)].append((sample, answer))
    result: dict = {"n_records": len(samples), "accuracy": {}, "confusion": {}}
    for kind, items in sorted(by_kind.items()):
        truth = [s.conversations[1]["value"] for s, _ in items]
        predicted = [a for _, a in items]
        if kind == "caption":
            refs = {s.id: [t] for s, t in zip([s for s, _ in items], truth, strict=True)}
            hyps = {s.id: a for s, a in items}
            result["caption"] = caption_metrics(refs, hyps)
            if caption_figures is not None:
                result["caption"].update(caption_figures([s for s, _ in items], predicted))
            continue
        result["accuracy"][kind] = closed_set_accuracy(truth, predicted)
        result["confusion"][kind] = confusion_table(truth, predicted, sorted(set(truth)))
    return result


def print_report(result: dict, file=sys.stdout) -> None:
    rows = [(kind, f"{acc:.3f}") for kind, acc in result["accuracy"].items()]
    if "caption" in result:
        rows += [(f"caption {k}", f"{v:.3f}") for k, v in result["caption"].items() if isinstance(v, float)]
        for name, acc in result["caption"].get("attribute_accuracy", {}).items():
            rows.append((f"caption {name}", f"{acc:.3f}"))
    print(format_table(["metric", "value"], rows), file=file)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True,
                        help="model directory (save_pretrained), or a hub id with --engine")
    parser.add_argument("--data", type=Path, required=True, help="JSONL dataset")
    parser.add_argument("--out", type=Path, help="write the report as JSON here")
    parser.add_argument("--limit", type=int, help="evaluate only the first N records")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--option", action="append", default=[], metavar="NAME=VALUE",
                        help="an engine option (as in ENGINE_OPTIONS); repeat for several")
    parser.add_argument("--engine", help=f"engine to load the checkpoint with ({', '.join(sorted(ENGINES))}); "
                                         "default: the one its config.json names")
    args = parser.parse_args(argv)
    if not (args.checkpoint / "config.json").is_file() and not args.engine:
        parser.error(f"--checkpoint {args.checkpoint} has no config.json: not a model directory (a hub id needs "
                     "--engine)")
    if not args.data.is_file():
        parser.error(f"--data {args.data} does not exist")
    samples = read_jsonl(args.data)[: args.limit]
    try:
        if any("=" not in option for option in args.option):
            raise EngineError(f"--option takes NAME=VALUE, got {args.option}")
        options = dict(option.split("=", 1) for option in args.option)
        engine = load_engine(args.checkpoint, device=args.device, engine=args.engine, options=options)
    except EngineError as exc:
        parser.error(str(exc))
    started = time.perf_counter()
    result = report(samples, predict(engine, samples))
    result["seconds"] = round(time.perf_counter() - started, 1)
    print_report(result)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
