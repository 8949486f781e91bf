"""Every recipe under every distributed accelerate config, as 2 real processes on CPU (gloo).

A cell that works must: run with world size 2, lower the loss, end with bit-identical replicas (full parameters,
gathered under ZeRO-3/FSDP), match a 1-process run with the same global batch, and save a full checkpoint that
from_pretrained loads. A refused cell must stop at start-up with its one-line reason. The README's compatibility
table is generated from the same refusals and checked here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from optimizer_recipes.core.optimizers.compatibility import DISTRIBUTED_CONFIGS, launch_setup, refusal
from optimizer_recipes.core.optimizers.protocol import all_recipes
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tests.conftest import (
    CONFIGS,
    REPO,
    assert_same_weights,
    assert_shared_launch_ran,
    cpu_env,
    free_port,
    launch,
    offline_env,
    read_metrics,
    results,
    run_flags,
    run_here,
    train_losses,
    two_process_run,
)

RECIPES = {r.name: r for r in all_recipes()}
CELLS = [(name, config) for name in RECIPES for config in DISTRIBUTED_CONFIGS]
WORKING = [cell for cell in CELLS if refusal(RECIPES[cell[0]], cell[1]) is None]
REFUSED = [cell for cell in CELLS if cell not in WORKING]
# One launched refusal per config file that refuses anything, of different recipes and reasons, with the words a user
# needs: the setup, the reason, the way out. The other refused cells are checked in-process with the environment
# `accelerate launch` sets for their file (test_every_refused_cell_is_refused_at_start_up_with_a_way_out).
REFUSED_LAUNCHED = {
    ("lomo", "zero2.yaml"): ("lomo under DeepSpeed ZeRO-2 is not supported", "a fused update consumes each gradient",
                             "use accelerate_configs/zero3.yaml"),
    ("adafactor", "zero3.yaml"): ("adafactor under DeepSpeed ZeRO-3 would silently change its math",
                                  "one flat 1-D partition per parameter group", "use accelerate_configs/multi_gpu.yaml"),
    ("adalomo", "zero3_offload.yaml"): ("adalomo with ZeRO-3 parameter offload (offload_param_device) is not supported",
                                        "use accelerate_configs/zero3.yaml"),
    ("lomo", "fsdp2.yaml"): ("lomo under FSDP is not supported", "the fused update's per-parameter gradient hooks never "
                             "run", "use accelerate_configs/zero3.yaml"),
}
# Same global batch: 2 processes x 16 sequences vs 1 process x 32. Summing 32 per-sequence losses in another order
# (two means of 16, then their mean) changes float rounding at ~1e-7 per step; over 14 steps we allow 1e-5.
TOLERANCE = 1e-5
DISTRIBUTED_TYPE = {"ddp": "MULTI_CPU", "deepspeed": "DEEPSPEED", "fsdp": "FSDP"}
SETUP_WORDS = {"multi_gpu.yaml": ("DDP",), "zero2.yaml": ("DeepSpeed ZeRO-2",), "zero3.yaml": ("DeepSpeed ZeRO-3",),
               "zero3_offload.yaml": ("DeepSpeed ZeRO-3", "ZeRO-3 parameter offload"), "fsdp2.yaml": ("FSDP",)}


def launch_two_processes(recipe: str, config: str, *args: str, check: bool = True):
    return launch(recipe, *args, config=config, env=cpu_env(config), check=check)


# Every working cell runs in its config file's shared launch (tests/conftest.py: straight, a checkpoint at step 7),
# then resumed from that checkpoint in a second launch.
for _recipe, _config in WORKING:
    two_process_run(_config, _recipe, _recipe, lambda data, recipe=_recipe: run_flags(recipe, 2), resumed=True)


def cells(chosen_for_smoke: tuple) -> list:
    """The working cells as parameters, each config file's on one xdist worker (they share its two launches)."""
    return [pytest.param(*cell, marks=[pytest.mark.xdist_group(f"launches-{cell[1]}")]
                         + ([pytest.mark.smoke] if cell in chosen_for_smoke else [])) for cell in WORKING]


@pytest.mark.parametrize("recipe, config", cells((("lomo", "multi_gpu.yaml"), ("schedule_free_adamw", "multi_gpu.yaml"))))
def test_working_cell(recipe, config, two_process_runs, one_process_runs):
    """Two real processes of the config file's kind: loss falls, replicas identical, the same losses, evaluation and
    saved weights as one process with the same global batch."""
    runs = two_process_runs(config)
    assert_shared_launch_ran(runs)
    out, reference = runs[recipe][0], one_process_runs(recipe)

    resolved = yaml.safe_load((out / "run_config.yaml").read_text())
    assert resolved["num_processes"] == 2, resolved["distributed_type"]
    # the config file's kind really ran (on CPU, accelerate alone would have run fsdp2.yaml as DDP)
    assert resolved["distributed_type"] == DISTRIBUTED_TYPE[launch_setup(config).kind]
    assert resolved["launch"] == launch_setup(config).describe()  # what the refusals saw at start-up
    losses = train_losses(out)
    assert len(losses) == 14 and sum(losses[-3:]) < sum(losses[:3])
    assert results(out)["replicas_identical"] is True and results(out)["num_processes"] == 2
    # Matching the 1-process losses also proves each rank trained on its own half of the batch: had both ranks
    # seen the same 16 sequences, the mean loss would be that of 16 sequences, not of the 32.
    assert losses == pytest.approx(train_losses(reference), rel=TOLERANCE)
    assert results(out)["eval_loss"] == pytest.approx(results(reference)["eval_loss"], rel=TOLERANCE)

    assert_saved_model_matches(out, reference)


@pytest.mark.parametrize("recipe, config", cells((("lomo", "multi_gpu.yaml"),)))
def test_working_cell_resumes_bit_exactly(recipe, config, two_process_runs):
    """Resumed from the step-7 checkpoint in new processes, the 2-process run continues exactly as it went: every
    rank's RNG, data position (across the epoch boundary at step 9), partition and optimizer state come back
    (AdaLomo under ZeRO-3 without a DeepSpeed engine, GaLore's and APOLLO's projections and seeds too)."""
    runs = two_process_runs(config)
    assert_shared_launch_ran(runs, "straight")
    assert_shared_launch_ran(runs, "resumed")
    straight, resumed = runs[recipe]
    assert (straight / "checkpoint-7" / "random_states_1.pkl").is_file()  # one RNG state per rank
    full, rest = losses_by_step(straight), losses_by_step(resumed)
    assert sorted(rest) == list(range(8, 15))
    assert [rest[s] for s in rest] == [full[s] for s in rest]
    assert_bit_identical_weights(straight, resumed)
    assert results(resumed)["replicas_identical"] and results(resumed)["num_processes"] == 2


def losses_by_step(output_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(output_dir) if "loss" in r}


def assert_bit_identical_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), f"{name} differs after resume"


def assert_saved_model_matches(out, reference) -> None:
    """The saved model is a full checkpoint (gathered from ZeRO-3 / FSDP shards), equal to the 1-process one."""
    assert_same_weights(out, reference)


@pytest.mark.parametrize("recipe, config", list(REFUSED_LAUNCHED))
def test_refused_cell_says_why_at_start_up(recipe, config, tmp_path):
    """One refused cell per config file, launched as a user launches it: one line with the setup, the reason and the
    way out, before any model loads, nothing written."""
    out = tmp_path / "out"
    proc = launch_two_processes(recipe, config, *run_flags(recipe, 2), "--output_dir", str(out), check=False)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith(f"{recipe}: error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]  # said once, not once per process
    assert all(words in errors[0] for words in REFUSED_LAUNCHED[(recipe, config)]), proc.stderr[-3000:]
    assert "parameters" not in proc.stdout and not out.exists()


def environment_of(config: str) -> dict[str, str]:
    """What `accelerate launch --config_file <config>` tells a recipe's processes about the setup (2 processes)."""
    setup = launch_setup(config)
    env = {"WORLD_SIZE": "2", "ACCELERATE_MIXED_PRECISION": setup.mixed_precision}
    if setup.kind == "deepspeed":
        env.update(ACCELERATE_USE_DEEPSPEED="true", ACCELERATE_DEEPSPEED_ZERO_STAGE=str(setup.zero_stage),
                   ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE="cpu" if setup.offload_param else "none")
    if setup.kind == "fsdp":
        env["ACCELERATE_USE_FSDP"] = "true"
    return env


@pytest.mark.parametrize("recipe, config", REFUSED)
def test_every_refused_cell_is_refused_at_start_up_with_a_way_out(recipe, config, tmp_path, capsys, monkeypatch):
    """Each refused cell, in-process with the environment its config file's launch sets: exit 2 and one line that
    names the recipe, the setup and a config file this recipe works under (a working cell of the matrix)."""
    from optimizer_recipes.core.run.launch_setup import LaunchSetup
    from optimizer_recipes.core.run.loop import main

    for name, value in environment_of(config).items():
        monkeypatch.setenv(name, value)
    assert LaunchSetup.from_environment() == launch_setup(config)  # the environment stands for the file
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stopped:
        main(RECIPES[recipe], [*run_flags(recipe, 2), "--output_dir", str(out)])
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith(f"{recipe}: error: ")]
    assert stopped.value.code == 2 and len(errors) == 1, captured.err[-3000:]
    assert errors[0].startswith(f"{recipe}: error: {recipe} ") and any(w in errors[0] for w in SETUP_WORDS[config])
    ways_out = [c for r, c in WORKING if r == recipe]
    assert any(f"accelerate_configs/{c}" in errors[0] for c in ways_out), errors[0]
    assert "parameters" not in captured.out and not out.exists()


def test_launched_refusals_cover_every_config_that_refuses():
    assert set(REFUSED_LAUNCHED) <= set(REFUSED)
    assert {config for _, config in REFUSED_LAUNCHED} == {config for _, config in REFUSED}


ACCUMULATION_AND_CLIPPING = ["--max_steps", "6", "--logging_steps", "1", "--max_grad_norm", "0.05"]
for _config in ("zero2.yaml", "zero3.yaml"):
    two_process_run(_config, "accumulation-and-clipping", "adamw", lambda data: [
        *ACCUMULATION_AND_CLIPPING, "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2"])


@pytest.mark.parametrize("config", ["zero2.yaml", "zero3.yaml"])
def test_deepspeed_follows_the_accumulation_and_clipping_flags(config, tmp_path, two_process_runs):
    """The DeepSpeed files pin neither value, so the run's flags reach DeepSpeed's engine (it clips in its step)."""
    runs = two_process_runs(config)
    assert_shared_launch_ran(runs)
    two, one = runs["accumulation-and-clipping"][0], tmp_path / "one"
    run_here("adamw", *ACCUMULATION_AND_CLIPPING, "--per_device_train_batch_size", "8", "--output_dir", str(one))
    assert yaml.safe_load((two / "run_config.yaml").read_text())["num_processes"] == 2
    assert train_losses(two) == pytest.approx(train_losses(one), rel=TOLERANCE)


def test_lomo_global_norm_clipping_under_zero3_is_refused_with_the_alternative(tmp_path, capsys, monkeypatch):
    """ZeRO-3 frees each layer's gathered parameters after the norm pass; the refusal names the flags that work
    (in-process, with the environment a zero3.yaml launch sets)."""
    from optimizer_recipes.core.run.loop import main

    for name, value in environment_of("zero3.yaml").items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as stopped:
        main(RECIPES["lomo"], [*run_flags("lomo", 2), "--max_grad_norm", "1.0", "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert stopped.value.code == 2
    assert "lomo: error: lomo cannot clip by global norm (--max_grad_norm 1.0) under DeepSpeed ZeRO-3" in err
    assert "--clip_grad_value" in err and not (tmp_path / "out").exists()


SCHEDULE_FREE_BF16 = ["--max_steps", "8", "--logging_steps", "1", "--eval_steps", "4", "--bf16", "true"]
two_process_run("zero3.yaml", "schedule-free-bf16", "schedule_free_adamw",
                lambda data: [*SCHEDULE_FREE_BF16, "--per_device_train_batch_size", "4"])


def test_schedule_free_evaluates_and_saves_x_in_the_16bit_weights_under_zero3(tmp_path, two_process_runs):
    """With bf16, ZeRO-3 trains bf16 module weights from fp32 master partitions: after eval() the bf16 copy must be
    x too. Measured: 1-process vs ZeRO-3 eval losses differ by 3e-4 relative; evaluating y instead differs by 6e-3."""
    runs = two_process_runs("zero3.yaml")
    assert_shared_launch_ran(runs)
    two, one = runs["schedule-free-bf16"][0], tmp_path / "one"
    run_here("schedule_free_adamw", *SCHEDULE_FREE_BF16, "--per_device_train_batch_size", "8", "--output_dir", str(one))
    evals = [[r["eval_loss"] for r in read_metrics(run) if "eval_loss" in r] for run in (two, one)]
    assert len(evals[0]) == 2 and evals[0] == pytest.approx(evals[1], rel=1e-3)
    saved = AutoModelForCausalLM.from_pretrained(two, dtype="auto")
    assert saved.dtype == torch.bfloat16


def test_a_deepspeed_json_config_decides_the_setup(tmp_path, one_process_runs, capsys, monkeypatch):
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
    launch("lomo", *run_flags("lomo", 2), "--output_dir", str(out), config=str(accelerate_config))
    resolved = yaml.safe_load((out / "run_config.yaml").read_text())
    assert resolved["num_processes"] == 2 and resolved["launch"] == "DeepSpeed ZeRO-3"
    assert train_losses(out) == pytest.approx(train_losses(one_process_runs("lomo")), rel=TOLERANCE)
    # the refusals follow the JSON too (in-process, with what accelerate passes for such a file: the file, no stage)
    from optimizer_recipes.core.run.loop import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(ds_json))
    with pytest.raises(SystemExit):
        main(RECIPES["lomo"], [*run_flags("lomo", 2), "--max_grad_norm", "1.0", "--output_dir", str(tmp_path / "no")])
    assert "lomo cannot clip by global norm (--max_grad_norm 1.0) under DeepSpeed ZeRO-3" in capsys.readouterr().err


def test_fsdp1_on_a_cpu_is_refused_with_the_way_out(tmp_path):
    """torch's FSDP1 cannot compute on a CPU; rather than run fsdp.yaml as DDP, the run stops and names fsdp2.yaml."""
    proc = launch_two_processes("adamw", "fsdp.yaml", *run_flags("adamw", 2), "--output_dir", str(tmp_path / "out"),
                                check=False)
    assert proc.returncode != 0
    assert "adamw: error: FSDP1 (fsdp_version: 1) cannot compute on a CPU" in proc.stderr
    assert "accelerate_configs/fsdp2.yaml" in proc.stderr and not (tmp_path / "out" / "model.safetensors").exists()


def test_torchrun_starts_the_recipes_without_accelerate_launch(tmp_path, one_process_runs):
    """`torchrun --nproc_per_node 2 recipes/<name>.py`: world size from torchrun's environment, DDP (over gloo here,
    where a CPU-only machine needs ACCELERATE_USE_CPU=1; without it the run stops and says so)."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(REPO / "recipes" / "lomo.py"), *run_flags("lomo", 2), "--output_dir", str(out)]
    refused = subprocess.run(cmd, cwd=REPO, env=offline_env(), capture_output=True, text=True, timeout=300)
    assert "set ACCELERATE_USE_CPU=1 to train across CPU processes" in refused.stderr  # else 2 unconnected jobs
    proc = subprocess.run(cmd, cwd=REPO, env=offline_env(ACCELERATE_USE_CPU="1"), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    resolved = yaml.safe_load((out / "run_config.yaml").read_text())
    assert (resolved["num_processes"], resolved["distributed_type"]) == (2, "MULTI_CPU")
    assert results(out)["replicas_identical"] is True
    assert train_losses(out) == pytest.approx(train_losses(one_process_runs("lomo")), rel=TOLERANCE)


def assert_two_node_run(out, reference) -> None:
    """World size 2 over two machine ranks, the same training as 1 process with the same global batch, one full
    model saved (the nodes share output_dir here, as on a cluster's shared filesystem)."""
    resolved = yaml.safe_load((out / "run_config.yaml").read_text())
    assert resolved["num_processes"] == 2
    assert results(out)["replicas_identical"] is True
    assert train_losses(out) == pytest.approx(train_losses(reference), rel=TOLERANCE)
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    assert_saved_model_matches(out, reference)


# AdaLomo under ZeRO-3 on two nodes is the SLURM test's job (test_two_nodes_through_the_slurm_script)
@pytest.mark.parametrize("recipe, config", [("adamw", "multi_node.yaml"), ("adamw", "zero3.yaml")])
def test_two_nodes_on_loopback(recipe, config, tmp_path, one_process_runs):
    """Each node runs its own `accelerate launch` with its --machine_rank (one process per node here); ZeRO runs
    need the config's `deepspeed_multinode_launcher: standard`, or accelerate hands the job to pdsh."""
    out, port = tmp_path / "out", str(free_port())
    env = offline_env(**({"ACCELERATE_USE_CPU": "1"} if launch_setup(config).kind == "ddp" else {}))
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / config),
         "--num_machines", "2", "--num_processes", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
         "--main_process_port", port, "--rdzv_backend", "static", str(REPO / "recipes" / f"{recipe}.py"),
         *run_flags(recipe, 2), "--output_dir", str(out)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    logs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert_two_node_run(out, one_process_runs(recipe))


def test_two_nodes_through_the_slurm_script(tmp_path, one_process_runs):
    """launch/slurm.sh as sbatch runs it, with stand-ins for srun (each node's command, at once, locally) and
    scontrol; ZeRO-3 with AdaLomo, one process per node."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/usr/bin/env bash\nshift\nfor id in 0 1; do SLURM_NODEID=$id "$@" & done\n'
                                  'status=0; for job in $(jobs -p); do wait $job || status=1; done; exit $status\n')
    (bin_dir / "scontrol").write_text("#!/usr/bin/env bash\necho 127.0.0.1\necho 127.0.0.1\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    out = tmp_path / "out"
    env = offline_env(PATH=f"{bin_dir}:{os.path.dirname(sys.executable)}:{os.environ['PATH']}",
                      SLURM_JOB_NUM_NODES="2", SLURM_GPUS_ON_NODE="1", SLURM_JOB_NODELIST="node-[1-2]",
                      MAIN_PROCESS_PORT=str(free_port()))
    proc = subprocess.run(["bash", str(REPO / "launch" / "slurm.sh"), "accelerate_configs/zero3.yaml",
                           "recipes/adalomo.py", *run_flags("adalomo", 2), "--output_dir", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert_two_node_run(out, one_process_runs("adalomo"))
