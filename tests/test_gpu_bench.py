"""The GPU bench runs end to end on a CPU with the tiny preset, so it is ready the day a GPU is lent."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.support import REPO

pytestmark = pytest.mark.slow


def test_the_gpu_bench_runs_every_measurement_on_the_tiny_preset(tmp_path):
    figures = tmp_path / "gpu.json"
    done = subprocess.run(
        [sys.executable, "bench/gpu_bench.py", "--preset", "tiny", "--device", "cpu", "--batches", "1,4",
         "--new-tokens", "5", "--jobs", "3", "--bandwidth-mb", "8", "--json", str(figures)],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    results = json.loads(figures.read_text())

    assert [row["batch"] for row in results["throughput"]] == [1, 4]
    for row in results["throughput"]:
        assert row["caption_regions_per_s"] > 0 and row["score_regions_per_s"] > 0
        # Random weights never end a caption early: every one runs the asked-for steps.
        assert row["tokens_generated"] == 5
    assert results["interactive"]["first_box_ms"] > 0 and results["interactive"]["second_box_ms"] > 0
    assert results["bandwidth"]["decode_step_ms"] > 0 and results["bandwidth"]["bound_step_ms"] > 0
    assert results["across_jobs"]["jobs"] == 3 and results["across_jobs"]["speedup"] > 0
    assert results["finetune"]["steps"] == 3 and results["finetune"]["step_s"] > 0
    assert "LoRA fine-tune step" in done.stdout and "single-box jobs" in done.stdout


@pytest.mark.parametrize("engine", ["florence-2", "qwen3-vl"])
def test_the_gpu_bench_measures_the_other_engines_at_their_tiny_size(engine, tmp_path):
    figures = tmp_path / "gpu.json"
    done = subprocess.run(
        [sys.executable, "bench/gpu_bench.py", "--engine", engine, "--size", "tiny", "--device", "cpu",
         "--batches", "1,4", "--new-tokens", "3", "--json", str(figures)],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    [result] = json.loads(figures.read_text())
    assert (result["engine"], result["size"]) == (engine, "tiny")
    assert [row["batch"] for row in result["throughput"]] == [1, 4]
    assert all(row["caption_regions_per_s"] > 0 and row["score_regions_per_s"] > 0 for row in result["throughput"])
    assert result["first_box_ms"] > 0 and result["further_box_ms"] > 0
    assert result["finetune"]["steps"] == 1 and result["finetune"]["step_s"] > 0
    assert "LoRA fine-tune step" in done.stdout
