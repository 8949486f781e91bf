"""launch/benchmark.py, reduced (one round, a few steps, all three harnesses), so that it cannot rot. No timing is
asserted: the machine is shared; the README's figures come from the full command."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO, offline_env


def run_benchmark(out, *flags: str) -> dict:
    """launch/benchmark.py into `out` with these flags, as a user runs it; its benchmark.json."""
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "benchmark.py"), "--output_dir", str(out), *flags],
                          cwd=REPO, env=offline_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((out / "benchmark.json").read_text())


def test_reduced_benchmark_measures_every_harness_and_says_why_one_cannot_run(tmp_path):
    out = tmp_path / "bench"
    report = run_benchmark(out, "--optimizers", "lomo,adalomo", "--rounds", "1", "--steps", "3", "--warmup", "1")
    runs = {(run["harness"], run["optimizer"]): run for run in report["runs"][0]}
    trainer_runs_adalomo = torch.cuda.is_available()  # lomo-optim's AdaLomo allocates with .cuda()
    for (harness, name), run in runs.items():
        if harness == "trainer" and name == "adalomo" and not trainer_runs_adalomo:
            assert "CUDA" in run["error"] and run["step_seconds"] == []
            continue
        assert run["error"] is None and len(run["step_seconds"]) == 3 and all(s > 0 for s in run["step_seconds"])
        assert run["peak_bytes"] > 0 and run["tensor_peak"]["parameters"] > 0
    assert len(runs) == 6
    # the same model and batch: the recipe's tensors peak where the bare loop's do (MemTracker, step 2)
    for name in ("lomo", "adalomo"):
        bare, recipe = runs[("bare", name)]["tensor_peak"], runs[("recipe", name)]["tensor_peak"]
        assert recipe["total"] == pytest.approx(bare["total"], rel=0.05)
        assert recipe["optimizer_state"] == bare["optimizer_state"]

    table = (out / "benchmark.md").read_text()
    assert "| `lomo` |" in table and "| `adalomo` |" in table and "recipe/bare time" in table
    assert "one process; CPU" in table or "CUDA" in table  # the hardware is named
    if not trainer_runs_adalomo:
        assert "`adalomo`: the Trainer (optim=\"adalomo\") cannot run it here: AssertionError" in table
    assert "targets (recipe/bare <= 1.03 time" in table and report["targets"]


def test_reduced_benchmark_compiles_the_recipe_and_the_trainer(tmp_path):
    out = tmp_path / "bench"
    report = run_benchmark(out, "--optimizers", "adamw", "--harnesses", "recipe,recipe+compile,trainer+compile",
                           "--rounds", "1", "--steps", "2", "--warmup", "1")
    runs = {run["harness"]: run for run in report["runs"][0]}
    assert set(runs) == {"recipe", "recipe+compile", "trainer+compile"}
    assert all(run["error"] is None and len(run["step_seconds"]) == 2 and run["wall_seconds"] > 0
               for run in runs.values())
    # compiled vs eager: the step-time ratio, what compiling added to the run, when it pays (no timing asserted)
    assert len(report["compile"]) == 1 and report["compile"][0].startswith("- `adamw` recipe: compiled/eager step ")
    assert report["compile"][0] in (out / "benchmark.md").read_text()


def test_loss_cost_times_both_losses_on_both_batches(tmp_path):
    """launch/loss_cost.py, one round: both losses timed on the plain-text and the answers-only batch."""
    out = tmp_path / "loss_cost.json"
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "loss_cost.py"), "--rounds", "1", "--loss_rounds", "2",
                           "--warmup", "0", "--block_size", "32", "--output_json", str(out)],
                          cwd=REPO, env=offline_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.read_text())
    for measured, rounds in (("steps", 1), ("loss_alone", 2)):
        assert list(report[measured]) == ["every token trained", "answers only (25% trained)"]
        for by_loss in report[measured].values():
            assert set(by_loss) == {"chunked", "whole"}
            assert all(len(times) == rounds and min(times) > 0 for times in by_loss.values())
    assert "| answers only (25% trained) |" in proc.stdout and "CPU" in proc.stdout


def test_trainer_harness_builds_the_memory_savers_optimizer_as_the_recipe_does(tmp_path):
    # APOLLO-Mini needs the Trainer's target modules and its rank-1 preset (trainer_extra): without them the Trainer
    # refuses or builds a different optimizer, and the comparison would time something else.
    out = tmp_path / "bench"
    # Its step in backward is timed too (one tick per optimizer step: the step of the recipe as the run uses it).
    report = run_benchmark(out, "--optimizers", "apollo_mini", "--harnesses", "recipe,recipe+in_backward,trainer",
                           "--rounds", "1", "--steps", "2", "--warmup", "1")
    runs = {run["harness"]: run for run in report["runs"][0]}
    assert len(runs) == 3 and all(run["error"] is None and len(run["step_seconds"]) == 2 for run in runs.values())
    recipe, trainer = runs["recipe"]["tensor_peak"], runs["trainer"]["tensor_peak"]
    assert recipe["optimizer_state"] == trainer["optimizer_state"] > 0
    assert report["in_backward"][0].startswith("- `apollo_mini` in backward / ordinary: step time ")


def test_step_time_against_adamw_is_taken_within_each_round():
    # A slower round slows every recipe in it: the ratio is each round's, then their median (0.5 and 0.75 here),
    # not the ratio of the medians (2/3), which would let the drift between rounds in.
    from optimizer_recipes.measure.benchmark import against_reference

    def run(seconds):
        return {"step_seconds": [seconds], "error": None}

    rounds = [{("recipe", "adamw"): run(2.0), ("recipe", "lomo"): run(1.0)},
              {("recipe", "adamw"): run(4.0), ("recipe", "lomo"): run(3.0)}]
    assert against_reference(rounds, ["adamw", "lomo"], ["recipe"], "adamw") == [
        "- recipe step time vs `adamw` (median of the rounds' ratios; each round's): `lomo` 0.62 (0.50, 0.75)"]
    assert against_reference(rounds, ["lomo"], ["recipe"], "adamw") == []  # no AdamW run: nothing to compare against
