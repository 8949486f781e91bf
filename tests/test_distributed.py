"""Every recipe under every distributed accelerate config, as 2 real processes on CPU (gloo).

A cell that works must: run with world size 2, lower the loss, end with bit-identical replicas (full parameters,
gathered under ZeRO-3/FSDP), match a 1-process run with the same global batch, and save a full checkpoint that
from_pretrained loads. A refused cell must stop at start-up with its one-line reason. The README's compatibility
table is generated from the same refusals and checked here.
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from recipes.core.compatibility import DISTRIBUTED_CONFIGS, launch_setup, markdown_table, refusal
from recipes.core.optimizer_recipe import all_recipes
from tests.conftest import REPO, launch, read_metrics, results, train_losses

RECIPES = {r.name: r for r in all_recipes()}
CELLS = [(name, config) for name in RECIPES for config in DISTRIBUTED_CONFIGS]
WORKING = [cell for cell in CELLS if refusal(RECIPES[cell[0]], cell[1]) is None]
REFUSED = [cell for cell in CELLS if cell not in WORKING]
STEPS = ["--max_steps", "8", "--logging_steps", "1"]
# Same global batch: 2 processes x 4 sequences vs 1 process x 8. Summing 8 per-sequence losses in another order
# (two means of 4, then their mean) changes float rounding at ~1e-7 per step; over 8 steps we allow 1e-5.
TOLERANCE = 1e-5


def launch_two_processes(recipe: str, config: str, *args: str, check: bool = True):
    # On a CPU-only machine DDP and FSDP need ACCELERATE_USE_CPU=1 to start real processes over gloo (DeepSpeed
    # picks its CPU accelerator itself; the loop names gloo for it).
    env = {"ACCELERATE_USE_CPU": "1"} if launch_setup(config).kind in ("ddp", "fsdp") else {}
    return launch(recipe, *args, config=config, env=env, check=check)


@pytest.fixture(scope="module")
def one_process_runs(tmp_path_factory):
    done = {}

    def run(recipe: str):
        if recipe not in done:
            out = tmp_path_factory.mktemp(f"one-{recipe}")
            launch(recipe, *STEPS, "--per_device_train_batch_size", "8", "--output_dir", str(out))
            done[recipe] = out
        return done[recipe]

    return run


@pytest.mark.parametrize("recipe, config", WORKING)
def test_working_cell(recipe, config, tmp_path, one_process_runs):
    out = tmp_path / "out"
    launch_two_processes(recipe, config, *STEPS, "--per_device_train_batch_size", "4", "--output_dir", str(out))
    reference = one_process_runs(recipe)

    resolved = yaml.safe_load((out / "run_config.yaml").read_text())
    assert resolved["num_processes"] == 2, resolved["distributed_type"]
    losses = train_losses(out)
    assert sum(losses[-3:]) < sum(losses[:3])
    assert results(out)["replicas_identical"] is True
    # Matching the 1-process losses also proves each rank trained on its own half of the batch: had both ranks
    # seen the same 4 sequences, the mean loss would be that of 4 sequences, not of the 8.
    assert losses == pytest.approx(train_losses(reference), rel=TOLERANCE)
    assert results(out)["eval_loss"] == pytest.approx(results(reference)["eval_loss"], rel=TOLERANCE)

    # The saved model is a full checkpoint (gathered from ZeRO-3 / FSDP shards), equal to the 1-process one.
    saved = AutoModelForCausalLM.from_pretrained(out).state_dict()
    expected = AutoModelForCausalLM.from_pretrained(reference).state_dict()
    assert saved.keys() == expected.keys()
    for name, tensor in expected.items():
        assert saved[name].shape == tensor.shape
        # per tensor, not per element: Adam-type steps amplify rounding on entries whose second moment is ~0
        assert (saved[name] - tensor).norm() <= 1e-4 * tensor.norm(), name


@pytest.mark.parametrize("recipe, config", REFUSED)
def test_refused_cell_says_why_at_start_up(recipe, config, tmp_path):
    out = tmp_path / "out"
    proc = launch_two_processes(recipe, config, *STEPS, "--output_dir", str(out), check=False)
    assert proc.returncode != 0
    assert f"{recipe}: error: {refusal(RECIPES[recipe], config)}" in proc.stderr
    assert "parameters" not in proc.stdout and not (out / "model.safetensors").exists()


def test_readme_holds_the_generated_compatibility_table():
    assert markdown_table() in (REPO / "README.md").read_text()


@pytest.mark.parametrize("config", ["zero2.yaml", "zero3.yaml"])
def test_deepspeed_follows_the_accumulation_and_clipping_flags(config, tmp_path):
    """The DeepSpeed files pin neither value, so the run's flags reach DeepSpeed's engine (it clips in its step)."""
    flags = ["--max_steps", "6", "--logging_steps", "1", "--max_grad_norm", "0.05"]
    two, one = tmp_path / "two", tmp_path / "one"
    launch_two_processes("adamw", config, *flags, "--per_device_train_batch_size", "2",
                         "--gradient_accumulation_steps", "2", "--output_dir", str(two))
    launch("adamw", *flags, "--per_device_train_batch_size", "8", "--output_dir", str(one))
    assert yaml.safe_load((two / "run_config.yaml").read_text())["num_processes"] == 2
    assert train_losses(two) == pytest.approx(train_losses(one), rel=TOLERANCE)


def test_lomo_global_norm_clipping_under_zero3_is_refused_with_the_alternative(tmp_path):
    """ZeRO-3 frees each layer's gathered parameters after the norm pass; the refusal names the flags that work."""
    proc = launch_two_processes("lomo", "zero3.yaml", *STEPS, "--max_grad_norm", "1.0", "--output_dir",
                                str(tmp_path / "out"), check=False)
    assert proc.returncode != 0
    assert "lomo: error: lomo cannot clip by global norm (--max_grad_norm 1.0) under DeepSpeed ZeRO-3" in proc.stderr
    assert "--clip_grad_value" in proc.stderr and not (tmp_path / "out" / "model.safetensors").exists()


def test_schedule_free_evaluates_and_saves_x_in_the_16bit_weights_under_zero3(tmp_path):
    """With bf16, ZeRO-3 trains bf16 module weights from fp32 master partitions: after eval() the bf16 copy must be
    x too. Measured: 1-process vs ZeRO-3 eval losses differ by 3e-4 relative; evaluating y instead differs by 6e-3."""
    flags = [*STEPS, "--eval_steps", "4", "--bf16", "true"]
    two, one = tmp_path / "two", tmp_path / "one"
    launch_two_processes("schedule_free_adamw", "zero3.yaml", *flags, "--per_device_train_batch_size", "4",
                         "--output_dir", str(two))
    launch("schedule_free_adamw", *flags, "--per_device_train_batch_size", "8", "--output_dir", str(one))
    evals = [[r["eval_loss"] for r in read_metrics(run) if "eval_loss" in r] for run in (two, one)]
    assert len(evals[0]) == 2 and evals[0] == pytest.approx(evals[1], rel=2e-3)
    saved = AutoModelForCausalLM.from_pretrained(two, dtype="auto")
    assert saved.dtype == torch.bfloat16


def test_a_deepspeed_json_config_decides_the_setup(tmp_path, one_process_runs):
    """Users bring their own DeepSpeed JSON (`deepspeed_config_file`, HF-style "auto" values): the recipe reads the
    stage from it (accelerate passes no stage then), so LOMO takes its ZeRO-3 path and matches 1 process."""
    ds_json = tmp_path / "ds_zero3.json"
    ds_json.write_text(json.dumps({
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": "auto",
                              "stage3_prefetch_bucket_size": "auto", "reduce_bucket_size": "auto"},
        "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"}, "gradient_clipping": "auto",
        "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto"}))
    accelerate_config = tmp_path / "accelerate.yaml"
    accelerate_config.write_text(yaml.safe_dump({
        "compute_environment": "LOCAL_MACHINE", "distributed_type": "DEEPSPEED", "num_machines": 1,
        "num_processes": 2,  # no mixed_precision: with a JSON file, accelerate takes it (and the stage) from there
        "deepspeed_config": {"deepspeed_config_file": str(ds_json), "zero3_init_flag": True}}))
    assert launch_setup(str(accelerate_config)).describe() == "DeepSpeed ZeRO-3"
    out = tmp_path / "out"
    launch("lomo", *STEPS, "--per_device_train_batch_size", "4", "--output_dir", str(out),
           config=str(accelerate_config))
    resolved = yaml.safe_load((out / "run_config.yaml").read_text())
    assert resolved["num_processes"] == 2 and resolved["launch"] == "DeepSpeed ZeRO-3"
    assert train_losses(out) == pytest.approx(train_losses(one_process_runs("lomo")), rel=TOLERANCE)
    proc = launch("lomo", *STEPS, "--max_grad_norm", "1.0", "--output_dir", str(tmp_path / "refused"),
                  config=str(accelerate_config), check=False)
    assert "lomo cannot clip by global norm (--max_grad_norm 1.0) under DeepSpeed ZeRO-3" in proc.stderr
