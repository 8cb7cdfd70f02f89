"""What the loop has done so far, for the terminal: versions, the last fine-tune, acceptance per version.

- `python -m backend versions`: every registered version (the current one marked `*`), its parent, whether
  it was promoted, its held-out accuracy against its parent's, and the last fine-tune run with its reason.
- `python -m backend rollback VERSION`: make `VERSION` current again (workers load it before their next job).
- `python -m backend promote VERSION`: make a candidate kept for review current.
  Both take turns with a fine-tune's promotion (`backend.jobs.pointer_lock`, in Redis): while one moves the
  pointer they wait up to two minutes, then give up saying who holds the lock.
- `python -m backend report [--png FILE]`: acceptance statistics per model version (`backend.acceptance`) as a
  table, over the corrections a fine-tune may train on (confirmed by Label Studio,
  `backend.confirmation.counted`; the others in a table of their own), and a PNG plot of them over the
  versions (matplotlib, Agg backend; default
  `DATA_DIR/acceptance.png`); then how reliable each fine-tuned version's confidences are (ECE, AUROC;
  `backend.calibration`), with its reliability diagram beside the plot (`acceptance-reliability.png`); and,
  where regions were proposed, how the proposals fared per version (`backend.proposal_stats`).

Nothing here imports torch.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

import redis

from backend import registry
from backend.acceptance import AcceptanceStats, acceptance_by_version, label_text
from backend.confirmation import counted
from backend.confirmation import counts as confirmation_counts
from backend.connect import follow_version
from backend.corrections import CorrectionsStore
from backend.jobs import POINTER_LOCK_WAIT_S, PointerBusy, QueueUnavailable, connect, pointer_lock, redacted
from backend.proposal_stats import ProposalStats, proposal_stats_by_version
from backend.runs import FinetuneRun, FinetuneRuns, RunStatus
from backend.settings import Settings
from model.metrics import format_table

DEFAULT_PLOT = "acceptance.png"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def describe_run(run: FinetuneRun, stale_after: float) -> str:
    """One line about a fine-tune run; a running one without a recent heartbeat is called out."""
    text = run.describe()
    if run.status is RunStatus.RUNNING and time.time() - (run.heartbeat_at or run.started_at) > stale_after:
        text += "; no heartbeat recently: probably interrupted (the next run records it)"
    return text


def versions_table(settings: Settings) -> str:
    """The `versions` table."""
    rows = []
    for info in registry.version_infos(settings):
        meta = info.metadata
        metrics = meta.get("metrics") or {}
        candidate = (metrics.get("candidate") or {}).get("field_accuracy_overall")
        parent = (metrics.get("parent") or {}).get("field_accuracy_overall")
        data = meta.get("data") or {}
        created = (info.created_at or "-").replace("+00:00", "")
        promoted = meta.get("promoted")
        rows.append([
            ("* " if info.current else "  ") + info.name,
            info.engine,
            created,
            info.parent or "-",
            "-" if promoted is None else ("yes" if promoted else "no"),
            "-" if candidate is None else f"{_number(candidate)} vs {_number(parent)}",
            "-" if not data else f"{data.get('new_regions', 0)} new, {data.get('replay_regions', 0)} replay, "
                                 f"{data.get('eval_regions', 0)} held out",
        ])
    return format_table(["version", "engine", "created (UTC)", "parent", "promoted", "held-out accuracy", "data"], rows)


def print_versions(settings: Settings, out: TextIO = sys.stdout) -> int:
    """`python -m backend versions`."""
    infos = registry.version_infos(settings)
    if not infos:
        print(f"no model version in MODEL_DIR={settings.model_dir}", file=out)
        return 1
    print(versions_table(settings), file=out)
    last = FinetuneRuns.for_settings(settings).last()
    print("", file=out)
    print("last fine-tune: " + (describe_run(last, settings.finetune_lock_ttl) if last else "none yet"), file=out)
    print(f"annotations by confirmation with Label Studio: {_confirmations(settings)}", file=out)
    moves = registry.history(settings)[-3:]
    for move in moves:
        print(f"  pointer {move.get('time')}: {move.get('previous')} -> {move.get('version')} "
              f"({move.get('reason') or 'set'})", file=out)
    return 0


def make_current(settings: Settings, version: str, reason: str, out: TextIO = sys.stdout,
                 wait: float = POINTER_LOCK_WAIT_S) -> int:
    """`python -m backend rollback VERSION` and `python -m backend promote VERSION`: make a registered
    version current, and the prelabeling version of the connected Label Studio projects. Takes turns with a
    fine-tune's promotion: waits up to `wait` seconds for one in progress, then gives up (exit code 1)."""
    known = registry.list_versions(settings)
    if version not in known:
        print(f"unknown version {version!r}; registered: {', '.join(known) or 'none'}", file=sys.stderr)
        return 2
    connection = connect(settings.effective_redis_url, settings)
    try:
        with _turn(connection, settings, f"a {reason} to {version} by a person", wait, out):
            previous = registry.set_current(settings, version, reason=reason)
            print(f"current version: {version} (was {previous}); workers load it before their next job", file=out)
            for step in follow_version(settings, version):
                print(f"  {step.describe()}", file=out)
    except (PointerBusy, QueueUnavailable) as exc:
        print(f"{version} was not made current: {exc}", file=sys.stderr)
        return 1
    finally:
        connection.close()
    return 0


@contextlib.contextmanager
def _turn(connection: redis.Redis, settings: Settings, who: str, wait: float, out: TextIO) -> Iterator[None]:
    """The pointer lock, saying so when it has to wait for it. Without a reachable Redis a person's move goes
    ahead with a warning: a rollback must work while the queue is down, and from a shell that does not know
    the all-in-one server's embedded Redis."""
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(pointer_lock(connection, settings, who, wait=0))
        except PointerBusy as busy:
            print(f"{busy.holder} is moving the current version; waiting up to {wait:g}s for it to finish",
                  file=out)
            held.enter_context(pointer_lock(connection, settings, who, wait))
        except QueueUnavailable:
            print(f"warning: Redis at {redacted(settings.effective_redis_url)} is unreachable, so this move does "
                  "not wait for a fine-tune that may be promoting right now; set REDIS_URL to the backend's Redis "
                  "to have them take turns", file=sys.stderr)
        yield


def _confirmations(settings: Settings) -> str:
    found = confirmation_counts(settings)
    if not found:
        return "none stored"
    text = ", ".join(f"{state} {n}" for state, n in sorted(found.items()))
    unconfirmed = sum(n for state, n in found.items() if state != "confirmed")
    if unconfirmed and not settings.train_on_unconfirmed:
        text += f" (fine-tunes train on confirmed ones only; {unconfirmed} left out)"
    return text


def acceptance_table(stats: dict[str, AcceptanceStats], order: Sequence[str]) -> str:
    """Acceptance per version, in `order` (then any other version seen)."""
    versions = [v for v in order if v in stats] + [v for v in stats if v not in order]
    fields = sorted({name for item in stats.values() for name in item.field_accuracy})
    rows = []
    for version in versions:
        item = stats[version]
        accuracy = item.field_accuracy
        rows.append([label_text(version), str(item.regions), _percent(item.acceptance_rate),
                     _number(item.caption_edit_distance), *[_percent(accuracy.get(name)) for name in fields]])
    return format_table(["version", "regions", "accepted unchanged", "caption edit distance",
                         *[f"{label_text(name)} kept" for name in fields]], rows)


def proposals_table(stats: Mapping[str, ProposalStats], order: Sequence[str]) -> str:
    """Per version, how its proposed regions fared (`backend.proposal_stats`)."""
    rows = [[version, s.tasks, s.proposed, s.kept, s.moved, s.deleted, s.added, _number(s.precision),
             _number(s.recall), _percent(s.drawn_share)]
            for version in sorted(stats, key=lambda v: order.index(v) if v in order else len(order))
            for s in [stats[version]]]
    return format_table(["version", "tasks", "proposed", "kept", "moved", "deleted", "added by hand",
                         "precision@0.5", "recall@0.5", "drawn by hand"], rows)


def plot_acceptance(stats: dict[str, AcceptanceStats], order: Sequence[str], path: Path) -> Path:
    """A PNG of acceptance, caption edit distance and per-field accuracy over the versions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    versions = [v for v in order if v in stats] + [v for v in stats if v not in order]
    fields = sorted({name for item in stats.values() for name in item.field_accuracy})
    x = list(range(len(versions)))
    figure, axis = plt.subplots(figsize=(max(6.0, 1.2 * len(versions) + 3), 4.5))
    series = {"accepted unchanged": [stats[v].acceptance_rate for v in versions],
              "caption edit distance": [stats[v].caption_edit_distance for v in versions]}
    for name in fields:
        series[f"{_plain(name)} kept"] = [stats[v].field_accuracy.get(name) for v in versions]
    for label, values in series.items():
        points = [(i, v) for i, v in zip(x, values, strict=True) if v is not None]
        if points:
            style = {"linewidth": 2.5} if label == "accepted unchanged" else {"linestyle": "--", "alpha": 0.8}
            axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label, **style)
    axis.set_xticks(x, [_plain(v) for v in versions], rotation=20, ha="right")
    axis.set_ylabel("share (edit distance: 0 = unchanged)")
    return _save(figure, axis, "What annotators kept, per model version", "best", path)


def reliability_table(settings: Settings) -> tuple[str, dict[str, list[list[float]]]]:
    """How much each version's confidences mean, on the held-out corrections its fine-tune calibrated them on,
    each half measured with curves fitted on the other (`backend.calibration`): the table, and per version its
    reliability diagram's bins."""
    rows, diagrams = [], {}
    for info in registry.version_infos(settings):
        report = info.metadata.get("calibration")
        if not report:
            continue
        raw, calibrated = report["raw"].get("all") or {}, report["calibrated"].get("all") or {}
        fields = {kind: report["calibrated"][kind]["ece"] for kind in ("caption", "choice", "label")
                  if kind in report["calibrated"]}
        rows.append([info.name, str(calibrated.get("fields", 0)), _percent(calibrated.get("kept")),
                     f"{_number(raw.get('ece'))} -> {_number(calibrated.get('ece'))}",
                     ", ".join(f"{kind} {_number(ece)}" for kind, ece in fields.items()) or "-",
                     _number(report["region_auroc"].get("calibrated"))])
        diagrams[info.name] = calibrated.get("bins") or []
    table = format_table(["version", "held-out fields", "kept", "ECE raw -> calibrated", "ECE per kind",
                          "AUROC region score"], rows) if rows else ""
    return table, diagrams


def plot_reliability(diagrams: Mapping[str, Sequence[Sequence[float]]], path: Path) -> Path:
    """A PNG reliability diagram: per series, share kept against mean confidence in each bin (a point's size
    grows with its fields); the diagonal is perfect calibration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5.5, 5))
    axis.plot([0, 1], [0, 1], color="grey", linestyle=":", label="calibrated perfectly")
    for name, bins in diagrams.items():
        if bins:
            total = sum(count for count, _, _ in bins)
            axis.plot([mean for _, mean, _ in bins], [share for _, _, share in bins], marker="o", label=name)
            axis.scatter([mean for _, mean, _ in bins], [share for _, _, share in bins],
                         s=[20 + 400 * count / total for count, _, _ in bins], alpha=0.3)
    axis.set_xlim(0, 1.02)
    axis.set_xlabel("confidence of the proposed field")
    axis.set_ylabel("share kept unchanged by annotators")
    return _save(figure, axis, "Reliability of the confidences", "upper left", path)


def _plain(text: str, limit: int = 40) -> str:
    """A string that came with a webhook (a version, a control name), as plot text: `$` shown as itself
    rather than opening math, which matplotlib fails on when malformed; clipped to `limit` characters."""
    return label_text(text, limit).replace("$", r"\$")


def _save(figure: Any, axis: Any, title: str, legend: str, path: Path) -> Path:
    """Shares on the y axis, a title, a grid and a legend; the figure written to `path` as PNG and closed."""
    import matplotlib.pyplot as plt

    axis.set_ylim(-0.02, 1.02)
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8, loc=legend)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def print_report(settings: Settings, png: Path | None = None, out: TextIO = sys.stdout) -> int:
    """`python -m backend report`."""
    store = CorrectionsStore.for_settings(settings)
    runs = FinetuneRuns.for_settings(settings)
    kept, apart = counted(settings, store.regions())
    stats, unconfirmed = acceptance_by_version(kept), acceptance_by_version(apart)
    order = registry.list_versions(settings)
    proposals = proposal_stats_by_version(kept, store.recorded_proposals())
    print(f"corrected regions stored: {store.count_regions()} ({runs.new_regions()} since the last fine-tune)",
          file=out)
    print(f"annotations by confirmation with Label Studio: {_confirmations(settings)}", file=out)
    if proposals:
        print("proposed regions per version (annotated tasks whose regions were proposed, confirmed):", file=out)
        print(proposals_table(proposals, order), file=out)
    if unconfirmed:
        print(f"not confirmed by Label Studio, so not counted below ({len(apart)} regions):", file=out)
        print(acceptance_table(unconfirmed, order), file=out)
    if not stats:
        print("no confirmed corrected region with a known prediction yet: nothing to compare", file=out)
        return 0
    if unconfirmed:
        print("confirmed corrections:", file=out)
    print(acceptance_table(stats, order), file=out)
    last = runs.last()
    if last is not None:
        print(f"last fine-tune: {describe_run(last, settings.finetune_lock_ttl)}", file=out)
    path = plot_acceptance(stats, order, png or Path(settings.data_dir) / DEFAULT_PLOT)
    print(f"plot: {path} ({dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC)", file=out)
    table, diagrams = reliability_table(settings)
    if table:
        print("confidence reliability per version (held-out corrections of its fine-tune):", file=out)
        print(table, file=out)
        reliability = plot_reliability(diagrams, path.with_name(f"{path.stem}-reliability{path.suffix}"))
        print(f"reliability plot: {reliability}", file=out)
    return 0
