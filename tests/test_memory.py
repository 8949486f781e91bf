"""Memory: what LOMO and AdaLomo save, measured per category; the estimator agrees with the measurement."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from optimizer_recipes.core.data.embedded import write_scaled_model
from optimizer_recipes.core.fused_backward.recipe import FusedBackwardRecipe
from optimizer_recipes.core.optimizers.protocol import all_recipes, recipe_names
from PIL import Image
from safetensors.torch import load_file

from tests.conftest import REAL_MODEL_BLOCK, REPO, offline_env, read_metrics, run_here, shared_output

# A second size where hidden >= 256, so factored moments are small next to the matrices they describe.
MEDIUM = {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2}
ESTIMATED = ("parameters", "gradients", "optimizer_state", "activations")
MEDIUM_RECIPES = ("adamw", "lomo", "adalomo")
FUSED = {r.name for r in all_recipes() if isinstance(r, FusedBackwardRecipe)}


def memory_report(out, *args: str) -> dict:
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "memory_report.py"), "--output_dir", str(out), *args],
                          cwd=REPO, env=offline_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((out / "report.json").read_text())


def profiled_in_process(out: Path) -> None:
    """What launch/memory_report.py measures on the embedded model (its corpus, flags and estimate), for every recipe,
    each run in-process (`run_here`, MemTracker's tensor breakdown: the same as in a launch of its own); the rows go
    to out/report.json as the tool writes them. The tool itself is run on the medium model."""
    from optimizer_recipes.core.memory.estimate import estimate, meta_model
    from optimizer_recipes.measure import memory_report as tool

    settings = argparse.Namespace(model_name_or_path=None, max_steps=3, per_device_train_batch_size=8,
                                  per_device_eval_batch_size=8, block_size=64)
    validation = tool.write_corpus(out / "corpus.jsonl", settings)
    model, rows = meta_model(None), {}
    for recipe in all_recipes():
        run = out / "runs" / recipe.name
        run_here(recipe.name, "--profile_memory", "true", "--max_steps", "3", "--save_steps", "0", "--dataset_name",
                 str(out / "corpus.jsonl"), "--validation_split_percentage", str(validation), "--output_dir", str(run))
        done = json.loads((run / "results.json").read_text())
        rows[recipe.name] = {"recipe": recipe.name, "measured": json.loads((run / "memory_profile.json").read_text()),
                             "run": {k: v for k, v in done.items() if k.startswith("run_peak")},
                             "estimate": estimate(recipe, model, "fp32", 8, 64, eval_batch=8).as_dict()}
    (out / "report.json").write_text(json.dumps({"recipes": rows}, indent=2) + "\n")


@pytest.fixture(scope="module")
def medium_model(tmp_path_factory):
    made = shared_output(tmp_path_factory, "medium-model", lambda out: write_scaled_model(out / "model", **MEDIUM))
    return made / "model"


@pytest.fixture(scope="module")
def reports(tmp_path_factory, medium_model):
    """Measured once per test session: every recipe on the tiny model (in-process), and at the medium size the three
    whose memory the breakdown test compares (launch/memory_report.py, as a user runs it)."""
    tiny = shared_output(tmp_path_factory, "profiles-tiny", profiled_in_process)
    medium = shared_output(tmp_path_factory, "report-medium", lambda out: memory_report(  # the three compared
        out, "--model_name_or_path", str(medium_model), "--per_device_train_batch_size", "2",
        "--recipes", ",".join(MEDIUM_RECIPES)))
    return {name: (out, json.loads((out / "report.json").read_text())) for name, out in
            (("tiny", tiny), ("medium", medium))}


def test_measured_breakdown_shows_what_lomo_and_adalomo_save(reports, medium_model):
    rows = reports["medium"][1]["recipes"]
    adamw, lomo, adalomo = (rows[n]["measured"] for n in ("adamw", "lomo", "adalomo"))
    param_bytes = adamw["breakdown"]["parameters"]
    assert adamw["breakdown"]["optimizer_state"] == pytest.approx(2 * param_bytes, rel=0.01)  # exp_avg + exp_avg_sq
    assert lomo["breakdown"]["optimizer_state"] == 0
    assert adalomo["breakdown"]["optimizer_state"] <= 0.01 * param_bytes  # factored rows and columns
    largest_parameter = max(t.numel() * t.element_size() for t in load_file(medium_model / "model.safetensors").values())
    # one parameter's gradient at a time, applied and freed by the hook that sees it accumulated (LOMO's lives
    # only inside that hook, between MemTracker's samples; AdaLomo's is still there while its update runs)
    assert lomo["breakdown"]["gradients"] <= largest_parameter
    assert 0 < adalomo["breakdown"]["gradients"] <= largest_parameter
    assert adamw["breakdown"]["gradients"] == pytest.approx(param_bytes, rel=0.01)
    assert lomo["peak_bytes"] < adamw["peak_bytes"]
    assert adalomo["peak_bytes"] < adamw["peak_bytes"]


@pytest.mark.parametrize("size", ["tiny", "medium"])
def test_estimate_agrees_with_measurement_within_10_percent(reports, size):
    folder, report = reports[size]
    assert set(report["recipes"]) == set(recipe_names() if size == "tiny" else MEDIUM_RECIPES)
    for name, row in report["recipes"].items():
        for category in ESTIMATED:
            measured, estimated = row["measured"]["breakdown"][category], row["estimate"][category]
            if category == "gradients" and name in FUSED:
                assert measured <= estimated, name  # one gradient, briefly: seen only if a sample falls inside
                continue
            assert estimated == pytest.approx(measured, rel=0.10, abs=256), f"{name} {category}"
        # the step's and the evaluation's tensor peaks, and the run's (the larger: what a device must hold)
        measured = row["measured"]
        assert row["estimate"]["training"] == pytest.approx(measured["peak_bytes"], rel=0.10), name
        assert row["estimate"]["evaluation"] == pytest.approx(measured["evaluation"]["peak_bytes"], rel=0.10), name
        assert row["estimate"]["total"] == pytest.approx(measured["run_peak_bytes"], rel=0.10), name
        assert row["run"]["run_peak_phase"] in ("loading", "training", "evaluation", "saving")
    if size == "medium":  # the command's report: the table and the plot
        table = (folder / "report.md").read_text()
        assert all(f"`{name}`" in table for name in report["recipes"]) and "vs adamw" in table
        with Image.open(folder / "memory.png") as image:
            image.verify()
            assert image.size[0] > 300 and image.size[1] > 200


def test_every_log_line_carries_the_peak_memory_since_the_last(tmp_path):
    out = tmp_path / "out"
    run_here("adamw", "--max_steps", "4", "--logging_steps", "2", "--output_dir", str(out))
    logged = [r for r in read_metrics(out) if "loss" in r]
    key = "peak_allocated_gib" if torch.cuda.is_available() else "peak_rss_gib"
    assert len(logged) == 2 and all(0 < r[key] < 64 for r in logged)


def test_memory_snapshot_steps_needs_cuda_and_says_so(tmp_path):
    out = tmp_path / "out"
    proc = run_here("adamw", "--max_steps", "3", "--memory_snapshot_steps", "1-2", "--output_dir", str(out),
                  check=torch.cuda.is_available())
    if torch.cuda.is_available():
        assert (out / "memory_snapshot.pickle").stat().st_size > 0
    else:
        assert proc.returncode != 0
        assert "--memory_snapshot_steps records CUDA allocations, and there is no CUDA device here" in proc.stderr


def test_estimate_command_prints_every_recipe_side_by_side():
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "estimate_memory.py"), "--bf16", "true",
                           "--gradient_checkpointing", "true", "--world_size", "4", "--zero_stage", "3", "--device", "cpu"],
                          cwd=REPO, env=offline_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    header = next(line for line in proc.stdout.splitlines() if line.startswith("| per device"))
    assert all(f"`{name}`" in header for name in recipe_names())
    assert "| total vs adamw | 1.00x" in proc.stdout
    assert "bf16-mixed" in proc.stdout and "gradient checkpointing on" in proc.stdout  # the recipes' spellings
    totals, with_baseline = ([cell.strip() for cell in line.split("|")[2:-1]] for line in proc.stdout.splitlines()
                             if line.startswith(("| total |", "| with baseline (cpu) |")))
    assert all(float(b.split()[0]) - float(t.split()[0]) == pytest.approx(512, abs=0.02)  # MiB: the CPU baseline
               for t, b in zip(totals, with_baseline) if t.endswith("MiB") and b.endswith("MiB"))


@pytest.mark.parametrize("loss", ["chunked", "whole"])
def test_estimate_agrees_with_the_real_models_whole_run_peak(real_model_runs, real_model, loss):
    """SmolLM2-135M-Instruct, LOMO, 1 x 512 tokens: the run's tensor peak (a training step's or
    the evaluation's) as the estimator computes it from the config alone."""
    from optimizer_recipes.core.memory.estimate import estimate, meta_model

    measured = json.loads((real_model_runs[loss] / "memory_profile.json").read_text())
    validation_rows = yaml.safe_load((real_model_runs[loss] / "run_config.yaml").read_text())["data_summary"][
        "splits"]["validation"]["rows"]  # the first evaluation batch: min(8, rows)
    lomo = next(r for r in all_recipes() if r.name == "lomo")
    estimated = estimate(lomo, meta_model(str(real_model)), "fp32", 1, REAL_MODEL_BLOCK,
                         eval_batch=min(8, validation_rows), chunked_loss=loss == "chunked")
    assert estimated.total == pytest.approx(measured["run_peak_bytes"], rel=0.10)
    assert estimated.evaluation == pytest.approx(measured["evaluation"]["peak_bytes"], rel=0.10)
