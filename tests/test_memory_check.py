"""The pre-flight memory check: a run that cannot fit stops before any weight loads, in one line naming what would
fit; a run within the estimator's margin starts; a 7B model's folder on this 24 GiB machine is refused for every
recipe but LOMO and AdaLomo."""

from __future__ import annotations

import shutil

import pytest
from optimizer_recipes.core.memory import check as memory_check
from optimizer_recipes.core.memory.check import ALLOCATOR_SLACK, ESTIMATE_ERROR, GIB, PROCESS_BASELINE
from optimizer_recipes.core.memory.estimate import estimate, meta_model
from optimizer_recipes.core.optimizers.protocol import all_recipes
from optimizer_recipes.core.run.config import parse_config

from tests.conftest import REPO, launch, results, run_here, shared_output

RECIPES = {r.name: r for r in all_recipes()}
# 19M parameters: parameters and optimizer state set the peak, so AdamW and LOMO need clearly different memory
MID_SIZES = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                 num_key_value_heads=4)


@pytest.fixture(scope="module")
def mid_model(tmp_path_factory):
    from optimizer_recipes.core.data.embedded import write_scaled_model

    return shared_output(tmp_path_factory, "llama-19m", lambda out: write_scaled_model(out / "model", **MID_SIZES)) \
        / "model"


def needs(recipe: str, model) -> int:
    """The estimate the check uses for a recipe's run at its default batch (8 x 64, fp32); it adds the baseline."""
    return estimate(RECIPES[recipe], meta_model(str(model)), "fp32", 8, 64, eval_batch=8).total


def test_a_run_that_cannot_fit_is_refused_before_loading_naming_what_fits(mid_model, tmp_path):
    adamw, lomo = needs("adamw", mid_model), needs("lomo", mid_model)
    assert lomo < adamw * (1 - ESTIMATE_ERROR)
    budget = PROCESS_BASELINE["cpu"] + (lomo + adamw * (1 - ESTIMATE_ERROR)) / 2  # lomo fits, adamw cannot
    out = tmp_path / "out"
    proc = run_here("adamw", "--model_name_or_path", str(mid_model), "--output_dir", str(out),
                    "--memory_budget_gib", str(budget / GIB), check=False)
    assert proc.returncode == 2
    line, = proc.stderr.strip().splitlines()
    assert line.startswith(f"adamw: error: this run needs about {(adamw + PROCESS_BASELINE['cpu']) / GIB:.1f} GiB "
                           "per device (estimate: fp32, 8 x 64 tokens, no gradient checkpointing) and "
                           f"--memory_budget_gib allows {budget / GIB:.1f} GiB; ")
    assert f"lomo ({(lomo + PROCESS_BASELINE['cpu']) / GIB:.1f} GiB)" in line and "fit" in line
    assert "adamw (" not in line and line.endswith("--memory_check warn starts it anyway")
    assert "tokenizing" not in proc.stdout + proc.stderr  # stopped before the data, let alone the weights
    assert not out.exists()

    warned = run_here("adamw", "--model_name_or_path", str(mid_model), "--output_dir", str(tmp_path / "warned"),
                      "--memory_budget_gib", str(budget / GIB), "--memory_check", "warn", "--max_steps", "1")
    assert "adamw: warning: this run needs about" in warned.stderr and "starting it anyway" in warned.stderr
    assert (tmp_path / "warned" / "results.json").is_file()


def test_a_run_within_the_estimators_margin_starts_and_peaks_within_it(mid_model, tmp_path):
    """The other side: a budget at the estimate itself (its error could put the peak either side) is not refused,
    and the run's measured peak stays inside the margin the check allows for."""
    adamw = needs("adamw", mid_model)
    budget = PROCESS_BASELINE["cpu"] + adamw
    out = tmp_path / "out"
    proc = launch("adamw", "--model_name_or_path", str(mid_model), "--output_dir", str(out), "--max_steps", "3",
                  "--memory_budget_gib", str(budget / GIB))
    assert f"memory: this run needs about {budget / GIB:.1f} GiB per device" in proc.stdout
    assert "it may not fit" in proc.stdout
    high = PROCESS_BASELINE["cpu"] + adamw * (1 + ESTIMATE_ERROR) + ALLOCATOR_SLACK["cpu"]
    assert f"(estimate, up to {high / GIB:.1f})" in proc.stdout
    assert results(out)["run_peak_rss_gib"] * GIB <= high

    quiet = run_here("lomo", "--model_name_or_path", str(mid_model), "--output_dir", str(tmp_path / "off"),
                     "--max_steps", "1", "--memory_check", "off", "--memory_budget_gib", "0.01")
    assert "memory:" not in quiet.stdout  # off: no check, and no refusal


@pytest.fixture(scope="module")
def llama_7b_config_only(tmp_path_factory):
    """LLaMA-7B's shape as a model folder with its config and a tokenizer, and no weights: what the check reads."""
    def write(out):
        folder = out / "llama-7b"
        folder.mkdir()
        shutil.copy(REPO / "launch" / "shapes" / "llama-7b.json", folder / "config.json")
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(REPO / "recipes" / "embedded_default" / name, folder / name)
    return shared_output(tmp_path_factory, "llama-7b-config", write) / "llama-7b"


@pytest.mark.parametrize("recipe", ["adamw", "adafactor", "grokadamw", "schedule_free_adamw", "schedule_free_sgd",
                                    "galore", "apollo", "apollo_mini", "adamw_8bit", "stable_adamw"])
def test_a_7b_model_on_this_machine_is_refused_for_all_but_lomo_and_adalomo(recipe, llama_7b_config_only, tmp_path):
    """The LOMO paper's setting on a 24 GiB machine (22.9 GiB available, stated): of the ordinary steps none fits
    (the memory savers keep every gradient: 12.6 GiB in bf16 beside the 12.6 GiB of weights); the fused updates do,
    and so do adafactor, galore, apollo and apollo_mini stepped in backward (one gradient at a time). Sharding is offered
    through a config file the recipe accepts: FSDP2 for StableAdamW and GrokAdamW, none for GaLore, APOLLO and 8-bit AdamW
    (they refuse both)."""
    proc = run_here(recipe, "--model_name_or_path", str(llama_7b_config_only), "--dtype", "bfloat16",
                    "--gradient_checkpointing", "true", "--per_device_train_batch_size", "1", "--block_size", "256",
                    "--memory_budget_gib", "22.9", "--output_dir", str(tmp_path / "out"), check=False)
    assert proc.returncode == 2
    line, = proc.stderr.strip().splitlines()
    assert line.startswith(f"{recipe}: error: this run needs about ")
    assert "lomo (" in line and "adalomo (" in line and "fit" in line
    in_backward = line.split("; or ")[1].split(";")[0]
    assert in_backward.endswith("fit with --optimizer_in_backward true")
    assert all(f"{name} (" in in_backward for name in ("adafactor", "galore", "apollo", "apollo_mini"))
    assert not any(f"{name} (" in in_backward for name in ("adamw", "adamw_8bit", "stable_adamw", "grokadamw"))
    sharding = {"galore": None, "stable_adamw": "fsdp2.yaml", "grokadamw": "fsdp2.yaml", "adafactor": None,
                "apollo": None, "apollo_mini": None, "adamw_8bit": None}.get(recipe, "zero3.yaml")
    assert (f"shard it: accelerate_configs/{sharding} over" in line) if sharding else ("shard it" not in line)


@pytest.mark.parametrize("recipe, flags", [("lomo", []), ("adalomo", []),
                                           *[(name, ["--optimizer_in_backward", "true"])
                                             for name in ("adafactor", "galore", "apollo", "apollo_mini")]])
def test_lomo_and_adalomo_pass_the_check_at_7b(recipe, flags, llama_7b_config_only):
    """And the memory savers stepped in backward."""
    config = parse_config(RECIPES[recipe], ["--model_name_or_path", str(llama_7b_config_only), "--dtype", "bfloat16",
                                            "--gradient_checkpointing", "true", "--per_device_train_batch_size",
                                            "1", "--block_size", "256", "--memory_budget_gib", "22.9", *flags])
    from transformers import AutoConfig

    note = memory_check.check_memory(RECIPES[recipe].for_run(config), config,
                                     AutoConfig.from_pretrained(llama_7b_config_only))
    assert note.startswith("memory: about ") and "may not fit" not in note


def test_processes_on_one_machine_share_its_memory(monkeypatch):
    monkeypatch.setattr(memory_check, "cpu_available_bytes", lambda: 20 * GIB)
    monkeypatch.setattr(memory_check.torch.cuda, "is_available", lambda: False)
    config = parse_config(RECIPES["adamw"], [])
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    available, where = memory_check._budget(config, "cpu")
    assert available == 10 * GIB and "shared by 2 processes" in where


@pytest.mark.parametrize("dtype,deepspeed_bf16,expected", [("float32", False, "fp32"), ("bfloat16", False, "bf16"),
                                                           ("float16", False, "bf16-nearest"),
                                                           ("float32", True, "bf16-mixed")])
def test_the_estimate_uses_the_runs_precision(dtype, deepspeed_bf16, expected, monkeypatch):
    if deepspeed_bf16:
        monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
        monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    config = parse_config(RECIPES["schedule_free_adamw"], ["--dtype", dtype])
    assert memory_check.run_precision(config, None) == expected
    nearest = parse_config(RECIPES["schedule_free_adamw"], ["--dtype", dtype, "--stochastic_rounding", "false"])
    assert memory_check.run_precision(nearest, None) == expected.replace("bf16", "bf16-nearest", expected == "bf16")
