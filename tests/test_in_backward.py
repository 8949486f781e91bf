"""--optimizer_in_backward: each parameter stepped inside backward ends where the ordinary step ends, keeps one
gradient at a time, resumes exactly, and runs as 2 DDP processes as it runs as one."""

from __future__ import annotations

import json
import re

import pytest
import torch
from optimizer_recipes.core.optimizers.compatibility import DISTRIBUTED_CONFIGS, refusal
from optimizer_recipes.core.optimizers.protocol import all_recipes
from optimizer_recipes.core.run.loop import main
from safetensors.torch import load_file

from tests.conftest import (
    assert_same_weights,
    assert_shared_launch_ran,
    read_metrics,
    results,
    run_flags,
    run_here,
    shared_output,
    two_process_run,
)
from tests.test_distributed import environment_of

RECIPES = {r.name: r for r in all_recipes()}
PER_TENSOR = [r.name for r in all_recipes() if not r.updates_in_backward]  # every recipe but LOMO's family


def schedule(recipe: str) -> list[str]:
    """The lr must reach every parameter's update: a warmup, then linear decay (schedule-free: its own warmup, in
    the optimizer's numbers); no clipping (refused in backward)."""
    decay = "constant" if RECIPES[recipe].default_lr_scheduler_type == "constant" else "linear"
    # schedule-free SGD at its embedded default (lr 1.0) without clipping amplifies the order in which 2 processes
    # sum a gradient: its ordinary step too ends 2% from one process's on the embedding (measured); at 0.2, 1e-7
    calmer = ["--learning_rate", "0.2"] if recipe == "schedule_free_sgd" else []
    return ["--max_grad_norm", "0", "--warmup_steps", "3", "--lr_scheduler_type", decay, *calmer]


IN_BACKWARD = ["--optimizer_in_backward", "true"]
RESUMED = ["adamw", "adafactor", "grokadamw", "schedule_free_adamw", "galore", "apollo_mini", "adamw_8bit",
           "stable_adamw"]  # each kind of state: moments, factored, grokking EMA, averages, projectors, 8-bit, optimi


def losses(out) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(out) if "loss" in r}


def weights(out) -> dict[str, torch.Tensor]:
    return load_file(out / "model.safetensors")


@pytest.fixture(scope="module")
def in_backward_runs(tmp_path_factory):
    """`runs(recipe)`: (ordinary run, in-backward run, in-backward run resumed from its step 7 or None), one process."""
    def runs(recipe: str):
        def produce(out):
            run_here(recipe, *run_flags(recipe), *schedule(recipe), "--output_dir", str(out / "ordinary"))
            run_here(recipe, *run_flags(recipe), *schedule(recipe), *IN_BACKWARD, "--profile_memory", "true",
                     "--output_dir", str(out / "in_backward"))
            if recipe in RESUMED:
                run_here(recipe, *run_flags(recipe), *schedule(recipe), *IN_BACKWARD, "--output_dir", str(out / "resumed"),
                         "--resume_from_checkpoint", str(out / "in_backward" / "checkpoint-7"))

        out = shared_output(tmp_path_factory, f"in-backward-{recipe}", produce)
        return out / "ordinary", out / "in_backward", out / "resumed" if recipe in RESUMED else None

    return runs


@pytest.mark.parametrize("recipe", PER_TENSOR)
def test_updates_in_backward_end_at_the_ordinary_runs_weights_and_resume_exactly(recipe, in_backward_runs):
    """Same flags, no accumulation, no clipping: the run that steps each parameter in backward has the ordinary
    run's losses and ends at its weights, bit for bit (the per-tensor step changes no arithmetic, and the lr of
    every step, warming up then decaying, reached every parameter's update); resumed from step 7 it ends there too."""
    ordinary, in_backward, resumed = in_backward_runs(recipe)
    assert losses(in_backward) == losses(ordinary)
    a, b = weights(ordinary), weights(in_backward)
    assert all(torch.equal(a[k], b[k]) for k in a), recipe
    if resumed is not None:
        assert {s: v for s, v in losses(resumed).items()} == {s: v for s, v in losses(in_backward).items() if s > 7}
        c = weights(resumed)
        assert all(torch.equal(b[k], c[k]) for k in b), f"{recipe}: resumed in backward"


@pytest.mark.parametrize("recipe", ["adamw", "galore"])
def test_in_backward_one_gradient_is_alive_at_a_time(recipe, in_backward_runs):
    """The profiled step's gradients: all of them in the ordinary run's estimate, the largest parameter's alone in
    backward (measured with --profile_memory); the start-up line says how the run updates."""
    _, in_backward, _ = in_backward_runs(recipe)
    profile = json.loads((in_backward / "memory_profile.json").read_text())
    model = weights(in_backward)
    largest = max(t.numel() * t.element_size() for t in model.values())
    everything = sum(t.numel() * t.element_size() for t in model.values())
    assert profile["largest"]["gradients"] <= largest < everything / 4


def test_the_start_up_line_says_updates_run_in_backward(tmp_path):
    proc = run_here("stable_adamw", "--max_steps", "1", *IN_BACKWARD, "--output_dir", str(tmp_path / "out"))
    assert "updates: in backward, each parameter stepped as its gradient completes" in proc.stdout
    assert "--max_grad_norm 0 (no clipping): in backward each gradient is freed" in proc.stdout


def test_per_tensor_clipping_clips_each_gradient_alone_before_its_update(tmp_path, monkeypatch):
    """--max_grad_norm_per_tensor in backward ends where the ordinary step ends when each gradient is clipped alone
    (torch's clip_grad_norm_ on one parameter at a time) before it, bit for bit, and not where the unclipped run
    ends; without --optimizer_in_backward it is refused with the way out."""
    flags = ["--max_steps", "4", "--logging_steps", "1", "--max_grad_norm", "0", "--learning_rate", "1e-2"]
    run_here("adamw", *flags, *IN_BACKWARD, "--output_dir", str(tmp_path / "unclipped"))
    run_here("adamw", *flags, *IN_BACKWARD, "--max_grad_norm_per_tensor", "0.05", "--output_dir",
             str(tmp_path / "clipped"))
    recipe_type = type(RECIPES["adamw"])
    ordinary_step = recipe_type.step

    def each_tensor_clipped_then_step(self, accelerator, model, optimizer, max_grad_norm):
        for p in model.parameters():
            torch.nn.utils.clip_grad_norm_([p], 0.05)
        return ordinary_step(self, accelerator, model, optimizer, max_grad_norm)

    monkeypatch.setattr(recipe_type, "step", each_tensor_clipped_then_step)
    run_here("adamw", *flags, "--output_dir", str(tmp_path / "reference"))
    clipped, reference, unclipped = (weights(tmp_path / n) for n in ("clipped", "reference", "unclipped"))
    assert all(torch.equal(clipped[k], reference[k]) for k in clipped)
    assert not all(torch.equal(clipped[k], unclipped[k]) for k in clipped)
    proc = run_here("adamw", "--max_grad_norm_per_tensor", "1", "--output_dir", str(tmp_path / "x"), check=False)
    assert proc.returncode == 2 and "add --optimizer_in_backward true" in proc.stderr, proc.stderr


REFUSED = {
    "accumulation": (["--gradient_accumulation_steps", "2"], "gradients cannot be accumulated "
                     "(--gradient_accumulation_steps 2); use --gradient_accumulation_steps 1 with a larger "
                     "--per_device_train_batch_size"),
    "clipping": (["--max_grad_norm", "1.0"], "--optimizer_in_backward with --max_grad_norm 1.0: in backward each "
                 "gradient is freed as soon as its parameter is updated"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_what_cannot_hold_in_backward_is_refused_with_the_way_out(case, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args, expected = REFUSED[case]
    with pytest.raises(SystemExit) as stopped:
        main(RECIPES["apollo"], ["--max_steps", "2", *IN_BACKWARD, *args, "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and err.startswith("apollo: error: --optimizer_in_backward ") and expected in err, err
    with pytest.raises(SystemExit):
        main(RECIPES["lomo"], ["--max_steps", "2", *IN_BACKWARD, "--output_dir", str(tmp_path / "lomo")])
    assert "lomo updates in backward already; drop --optimizer_in_backward" in capsys.readouterr().err


# The README's in-backward table: every working cell as 2 processes against one (a few resumed from step 7 too), every
# refused cell refused at start-up. DDP: each gradient averaged across processes by a hook, then stepped. FSDP2: each
# gradient reduce-scattered by FSDP2, which then calls the hook with this rank's shard.
CELLS = [(config, recipe) for config in DISTRIBUTED_CONFIGS for recipe in PER_TENSOR]
TWO_PROCESS = [cell for cell in CELLS if refusal(RECIPES[cell[1]], cell[0], in_backward=True) is None]
REFUSED_CELLS = [cell for cell in CELLS if cell not in TWO_PROCESS]
RESUMED_CELLS = {("multi_gpu.yaml", "adamw"), ("multi_gpu.yaml", "schedule_free_adamw"),
                 ("multi_gpu.yaml", "apollo_mini"), ("fsdp2.yaml", "adamw"), ("fsdp2.yaml", "schedule_free_adamw")}
for _config, _recipe in TWO_PROCESS:
    two_process_run(_config, f"in-backward-{_recipe}", _recipe,
                    lambda data, r=_recipe: [*run_flags(r, 2), *schedule(r), *IN_BACKWARD],
                    resumed=(_config, _recipe) in RESUMED_CELLS)


def test_the_in_backward_cells_are_those_the_mechanism_carries():
    """DDP for every per-tensor recipe; FSDP2 where the recipe's own step takes a shard; never DeepSpeed."""
    assert {r for c, r in TWO_PROCESS if c == "multi_gpu.yaml"} == set(PER_TENSOR)
    assert {r for c, r in TWO_PROCESS if c == "fsdp2.yaml"} == {r for r in PER_TENSOR if refusal(RECIPES[r], "fsdp2.yaml") is None}
    assert not any(c.startswith("zero") for c, _ in TWO_PROCESS)


@pytest.mark.parametrize("config, recipe", REFUSED_CELLS)
def test_every_refused_in_backward_cell_says_why_at_start_up(config, recipe, tmp_path, capsys, monkeypatch):
    for name, value in environment_of(config).items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as stopped:
        main(RECIPES[recipe], [*run_flags(recipe, 2), *IN_BACKWARD, "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and len(err.strip().splitlines()) == 1, err
    way_out = re.search(r"use accelerate_configs/(\S+\.yaml)", err)
    assert way_out and (way_out.group(1), recipe) in TWO_PROCESS, err  # the launch it names runs this recipe in backward
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("config, recipe", TWO_PROCESS)
def test_two_processes_in_backward_match_one_and_resume_exactly(config, recipe, two_process_runs, in_backward_runs):
    runs = two_process_runs(config)
    assert_shared_launch_ran(runs)
    assert_shared_launch_ran(runs, "resumed")  # (a config with no resumed run writes an empty log saying exit 0)
    straight, resumed = runs[f"in-backward-{recipe}"]
    _, one_process, _ = in_backward_runs(recipe)
    assert (resumed is not None) == ((config, recipe) in RESUMED_CELLS)
    assert results(straight)["num_processes"] == 2 and results(straight)["replicas_identical"]
    two, one = losses(straight), losses(one_process)
    assert two.keys() == one.keys() and list(two.values()) == pytest.approx(list(one.values()), rel=1e-3)
    assert_same_weights(straight, one_process)  # the same updates from the same mean gradients, summed otherwise
    if resumed is not None:
        assert losses(resumed) == {s: v for s, v in two.items() if s > 7}
        a, c = weights(straight), weights(resumed)
        assert all(torch.equal(a[k], c[k]) for k in a)
