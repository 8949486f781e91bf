"""bf16 weights that keep every update: stochastic rounding (recipes/core/per_tensor/stochastic_rounding.py), for every recipe.

The rounding is unbiased and reproducible; stepping one tensor at a time changes no optimizer's math; with bf16
weights the updates that rounding to nearest loses are kept; resume stays bit-exact and DDP replicas identical.
"""

from __future__ import annotations

import pytest
import torch
from optimizer_recipes.core.fused_backward.recipe import FusedBackwardRecipe
from optimizer_recipes.core.models.sources import load_model, load_model_config
from optimizer_recipes.core.optimizers.protocol import all_recipes
from optimizer_recipes.core.per_tensor.steps import StepsEachTensor
from optimizer_recipes.core.per_tensor.stochastic_rounding import RoundingNoise
from optimizer_recipes.core.run.config import parse_config
from safetensors.torch import load_file

from tests.conftest import (
    assert_shared_launch_ran,
    read_metrics,
    results,
    run_flags,
    run_here,
    train_losses,
    two_process_run,
)

RECIPES = {r.name: r for r in all_recipes()}
ORDINARY = [name for name, r in RECIPES.items() if not isinstance(r, FusedBackwardRecipe)]
BF16 = ["--dtype", "bfloat16"]


def test_rounding_is_unbiased_and_lands_on_a_neighbour():
    low = torch.full((200_000,), 1.0, dtype=torch.bfloat16)
    spacing = 2.0 ** -7  # bf16's spacing just above 1.0
    value = torch.full((200_000,), 1.0 + 0.3 * spacing)  # 0.3 of the way to the next bf16 number
    RoundingNoise(0, 0, torch.device("cpu")).round_into(low, value.clone())
    assert set(low.float().unique().tolist()) == {1.0, 1.0 + spacing}  # only the two neighbours
    assert low.float().mean().item() == pytest.approx(value[0].item(), abs=spacing * 0.01)  # the value, on average
    assert low.to(torch.bfloat16).float().mean() != 1.0  # round to nearest would give 1.0 everywhere
    exact = torch.tensor([0.5, -3.0, 1.0 + spacing])  # bf16 numbers stay what they are
    out = torch.empty(3, dtype=torch.bfloat16)
    RoundingNoise(0, 0, torch.device("cpu")).round_into(out, exact.clone())
    assert out.float().tolist() == exact.tolist()


def test_the_noise_is_reproducible_from_the_step_count_its_state_carries():
    value = torch.rand(1000) + 1.0
    a, b = RoundingNoise(7, 0, torch.device("cpu")), RoundingNoise(7, 0, torch.device("cpu"))
    out_a, out_b = torch.empty(1000, dtype=torch.bfloat16), torch.empty(1000, dtype=torch.bfloat16)
    a.begin_step()
    a.round_into(out_a, value.clone())
    b.load_state_dict(a.state_dict())  # b continues where a is: the next step draws the same
    a.begin_step()
    a.round_into(out_a, value.clone())
    b.begin_step()
    b.round_into(out_b, value.clone())
    assert torch.equal(out_a, out_b)
    other_shard = RoundingNoise(7, 1, torch.device("cpu"))  # a process rounding a shard of its own draws its own
    other_shard.load_state_dict(a.state_dict())
    other_shard.steps -= 1
    other_shard.begin_step()
    other_shard.round_into(out_b, value.clone())
    assert not torch.equal(out_a, out_b)


class Unrounded(RoundingNoise):
    """Writes the fp32 result back as it is: stepping one tensor at a time alone, on fp32 weights."""

    def round_into(self, target, value):
        target.copy_(value)


@pytest.mark.parametrize("recipe", ORDINARY)
def test_stepping_one_tensor_at_a_time_is_the_optimizers_own_step(recipe, tmp_path, fresh_accelerate_state):
    """Each ordinary recipe's optimizer, stepped on one tensor at a time (its position given to GrokAdamW, the
    counters of schedule-free advanced once), ends at the weights of its own step over all tensors: 3 steps of
    the same gradients on the embedded model, in fp32, the rounding left out."""
    config = parse_config(RECIPES[recipe], ["--output_dir", str(tmp_path)])
    weights = []
    for one_at_a_time in (False, True):
        torch.manual_seed(0)
        model = load_model(config, load_model_config(config))
        optimizer = RECIPES[recipe].build(model, config)
        if one_at_a_time:
            optimizer = StepsEachTensor(optimizer, Unrounded(0, 0, torch.device("cpu")))
        RECIPES[recipe].train_mode(optimizer)
        generator = torch.Generator().manual_seed(1)
        for _ in range(3):
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=generator) * 1e-2
            optimizer.step()
            optimizer.zero_grad()
        RECIPES[recipe].eval_mode(optimizer)
        weights.append([p.detach().clone() for p in model.parameters()])
    for whole, each in zip(*weights):
        assert torch.equal(whole, each), recipe


@pytest.mark.parametrize("recipe", ["adamw", "adalomo"])
def test_bf16_weights_keep_the_updates_that_rounding_to_nearest_loses(recipe, tmp_path):
    """A learning rate whose updates are mostly below half of bf16's spacing: how far the weights moved along the
    fp32 run's displacement (1: all of it). Rounded to nearest, most of it is lost; rounded stochastically, all of
    it is kept on average (the rounding noise is across the displacement, and averages out over 156k weights)."""
    lr = {"adamw": ["--learning_rate", "3e-6"], "adalomo": ["--learning_rate", "1e-4"]}[recipe]
    flags = ["--max_steps", "10", "--save_steps", "0", "--lr_scheduler_type", "constant", *lr]
    torch.manual_seed(42)  # the recipes' seed: the embedded model's initial weights
    config = parse_config(RECIPES[recipe], ["--output_dir", str(tmp_path / "unused")])
    initial = load_model(config, load_model_config(config)).state_dict()
    moved = {}
    for name, extra in (("fp32", []), ("stochastic", BF16), ("nearest", [*BF16, "--stochastic_rounding", "false"])):
        out = tmp_path / name
        proc = run_here(recipe, *flags, *extra, "--output_dir", str(out))
        if name != "fp32":
            assert ("each update rounded stochastically" if name == "stochastic" else "rounded to nearest") in proc.stdout
        final = load_file(out / "model.safetensors")
        moved[name] = torch.cat([(final[k].float() - initial[k].float().to(final[k].dtype).float()).flatten()
                                 for k in final])
    kept = {name: (moved[name] @ moved["fp32"] / (moved["fp32"] @ moved["fp32"])).item() for name in moved}
    assert kept["nearest"] < 0.5, kept
    assert kept["stochastic"] == pytest.approx(1.0, abs=0.15), kept


@pytest.mark.parametrize("recipe", ["adamw", "adalomo", "schedule_free_adamw", "grokadamw", "galore", "apollo_mini"])
def test_resume_with_stochastic_rounding_is_bit_exact(recipe, tmp_path):
    """The rounding noise's generator is in the checkpoint, the state in fp32 (GaLore's and APOLLO's projectors too,
    which torch's load would cast to the bf16 weights' dtype): the resumed run continues exactly."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_here(recipe, *run_flags(recipe), *BF16, "--output_dir", str(straight))
    run_here(recipe, *run_flags(recipe), *BF16, "--output_dir", str(resumed), "--resume_from_checkpoint",
             str(straight / "checkpoint-7"))
    full = {r["step"]: r["loss"] for r in read_metrics(straight) if "loss" in r}
    rest = {r["step"]: r["loss"] for r in read_metrics(resumed) if "loss" in r}
    assert sorted(rest) == list(range(8, 15)) and all(rest[s] == full[s] for s in rest)
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a) and a[next(iter(a))].dtype == torch.bfloat16


# 2 processes, bf16 weights: DDP replicas draw the same noise (AdamW one tensor at a time, AdaLomo in its hooks);
# under ZeRO-3 each rank rounds its own partition; each resumed from step 7 too (tests/conftest.py's shared launches)
TWO_PROCESS_BF16 = [("multi_gpu.yaml", "adamw"), ("multi_gpu.yaml", "adalomo"), ("zero3.yaml", "adalomo")]
for _config, _recipe in TWO_PROCESS_BF16:
    two_process_run(_config, f"bf16-{_recipe}", _recipe, lambda data, r=_recipe: [*run_flags(r, 2), *BF16],
                    resumed=True)


@pytest.mark.parametrize("config, recipe", TWO_PROCESS_BF16)
def test_two_processes_with_stochastic_rounding_stay_identical_and_resume_exactly(config, recipe, two_process_runs):
    runs = two_process_runs(config)
    assert_shared_launch_ran(runs, "straight")
    assert_shared_launch_ran(runs, "resumed")
    straight, resumed = runs[f"bf16-{recipe}"]
    assert results(straight)["num_processes"] == 2 and results(straight)["replicas_identical"] is True
    losses = train_losses(straight)
    assert sum(losses[-3:]) < sum(losses[:3])
    full = {r["step"]: r["loss"] for r in read_metrics(straight) if "loss" in r}
    rest = {r["step"]: r["loss"] for r in read_metrics(resumed) if "loss" in r}
    assert sorted(rest) == list(range(8, 15)) and all(rest[s] == full[s] for s in rest)
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a) and results(resumed)["replicas_identical"] is True


@pytest.mark.parametrize("recipe", ["adamw", "adalomo"])
def test_the_estimator_counts_what_stochastic_rounding_holds(recipe, tmp_path):
    """bf16 weights rounded stochastically (the estimator's "bf16"): AdamW's state is fp32 (8 bytes a parameter)
    and one tensor's fp32 stand-in, gradient and noise join the step; measured with MemTracker, within 10%."""
    import json

    from optimizer_recipes.core.memory.estimate import estimate, meta_model

    out = tmp_path / "out"
    run_here(recipe, *BF16, "--max_steps", "3", "--save_steps", "0", "--profile_memory", "true", "--output_dir",
             str(out))
    measured = json.loads((out / "memory_profile.json").read_text())
    estimated = estimate(RECIPES[recipe], meta_model(None), "bf16", 8, 64, eval_batch=8)
    parameters = estimated.parameters
    assert measured["breakdown"]["optimizer_state"] == pytest.approx(estimated.optimizer_state, rel=0.10, abs=256)
    if recipe == "adamw":
        assert estimated.optimizer_state >= 3.9 * parameters  # fp32 moments of bf16 weights: 2 x 4 bytes over 2
    assert estimated.training == pytest.approx(measured["peak_bytes"], rel=0.10)
