"""The per-optimizer protocols, checked on the weights themselves: LOMO's fused lr and schedule-free's saved x."""

from __future__ import annotations

import pytest
import schedulefree
import torch
from optimizer_recipes.core.run.config import parse_config
from optimizer_recipes.core.run.loop import train
from optimizer_recipes.core.schedule_free.deepspeed_fixes import GROUP_COUNTERS
from optimizer_recipes.lomo import LomoRecipe
from optimizer_recipes.schedule_free_adamw import AdamWScheduleFree, ScheduleFreeAdamWRecipe
from optimizer_recipes.schedule_free_sgd import SGDScheduleFree
from safetensors.torch import load_file

from tests.conftest import read_metrics, run_here, train_losses


class LomoMeasuringItsUpdate(LomoRecipe):
    """LOMO whose every backward also measures the lr the fused update really applied to lm_head.weight."""

    def __init__(self):
        self.applied_lr: list[float] = []

    def backward(self, accelerator, model, optimizer, loss, lr):
        weight = optimizer.optimizer.model.lm_head.weight
        (grad,) = torch.autograd.grad(loss, weight, retain_graph=True)  # no .grad is set, so the hooks do nothing
        before = weight.detach().clone()
        super().backward(accelerator, model, optimizer, loss, lr)
        change = before - weight.detach()
        large = grad.abs() > 0.1 * grad.abs().max()
        self.applied_lr.append((change[large] / grad[large]).median().item())


def test_lomo_fused_update_uses_the_scheduled_lr_of_each_step(tmp_path, fresh_accelerate_state):
    recipe, steps, base_lr = LomoMeasuringItsUpdate(), 6, 0.5
    config = parse_config(recipe, ["--max_steps", str(steps), "--learning_rate", str(base_lr),
                                   "--lr_scheduler_type", "linear", "--output_dir", str(tmp_path)])
    train(recipe, config)
    expected = [base_lr * (steps - k) / steps for k in range(steps)]  # linear decay, no warmup, lr before each step
    assert recipe.applied_lr == pytest.approx(expected, rel=1e-3)


class ScheduleFreeKeepingItsOptimizer(ScheduleFreeAdamWRecipe):
    def build(self, model, config):
        self.optimizer = super().build(model, config)
        self.model = model
        return self.optimizer


def test_schedule_free_saves_the_averaged_x_weights(tmp_path, fresh_accelerate_state):
    recipe = ScheduleFreeKeepingItsOptimizer()
    config = parse_config(recipe, ["--max_steps", "15", "--output_dir", str(tmp_path)])
    train(recipe, config)
    saved = load_file(tmp_path / "model.safetensors")
    beta1 = recipe.optimizer.param_groups[0]["betas"][0]
    assert recipe.optimizer.param_groups[0]["train_mode"]  # back in train mode after the save
    checked = 0
    for name, y in recipe.model.named_parameters():
        z = recipe.optimizer.state[y]["z"]
        x = y.detach() + (1 - 1 / beta1) * (z - y.detach())  # schedulefree's eval(): lerp(y, z, 1 - 1/beta1)
        assert torch.allclose(saved[name], x, atol=1e-6), name
        if not torch.allclose(saved[name], y.detach(), atol=1e-4):
            checked += 1
    assert checked > 0, "x and y coincide everywhere: the test could not tell them apart"


@pytest.mark.parametrize("recipe", ["schedule_free_adamw", "schedule_free_sgd"])
def test_schedule_free_training_goes_on_correctly_after_switching_to_x_and_back(recipe, tmp_path):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    args = ["--max_steps", "12", "--logging_steps", "1"]
    run_here(recipe, *args, "--output_dir", str(straight))
    run_here(recipe, *args, "--eval_steps", "4", "--output_dir", str(interrupted))
    evals = [r for r in read_metrics(interrupted) if "eval_loss" in r and "perplexity" not in r]
    assert [r["step"] for r in evals] == [4, 8]
    # eval() then train() is y -> x -> y: the run continues as if never interrupted, up to float rounding
    assert train_losses(interrupted) == pytest.approx(train_losses(straight), rel=1e-5)


@pytest.mark.parametrize("optimizer_class, upstream_class", [(AdamWScheduleFree, schedulefree.AdamWScheduleFree),
                                                             (SGDScheduleFree, schedulefree.SGDScheduleFree)])
def test_schedule_free_stepped_per_sub_group_as_zero3_does_equals_one_step(optimizer_class, upstream_class):
    """ZeRO-3 calls step() once per sub-group (several per group for large models) with the other groups' lists
    emptied. Driven that way, the mixed-in optimizer must end with the same weights and counters as plain steps."""
    torch.manual_seed(0)
    flats = [torch.randn(5), torch.randn(7), torch.randn(3)]  # sub-groups: two in group 0, one in group 1
    group_of = [0, 0, 1]

    def build(cls, params):
        groups = [{"params": [p for p, g in zip(params, group_of) if g == i], "weight_decay": wd}
                  for i, wd in enumerate((0.1, 0.0))]
        optimizer = cls(groups, lr=0.1, warmup_steps=3)
        optimizer.train()
        return optimizer

    plain_params = [f.clone().requires_grad_() for f in flats]
    zero_params = [f.clone().requires_grad_() for f in flats]
    plain, zero = build(upstream_class, plain_params), build(optimizer_class, zero_params)
    for step in range(5):
        grads = [torch.randn_like(f) for f in flats]
        for p, q, g in zip(plain_params, zero_params, grads):
            p.grad, q.grad = g.clone(), g.clone()
        plain.step()
        for group in zero.param_groups:  # DeepSpeed keeps the lists empty between steps ...
            group["params"] = []
        for tensor, group in zip(zero_params, group_of):  # ... and fills one sub-group per call
            zero.param_groups[group]["params"] = [tensor]
            zero.step()
            zero.param_groups[group]["params"] = []
    for group, expected in zip(zero.param_groups, plain.param_groups):
        assert {k: group[k] for k in GROUP_COUNTERS} == {k: expected[k] for k in GROUP_COUNTERS}
    for p, q in zip(plain_params, zero_params):
        torch.testing.assert_close(q, p, rtol=0, atol=0)


def test_a_stateless_schedule_free_optimizer_takes_the_checkpoint_loaders_zero_step():
    """torch's distributed checkpoint (FSDP2 resume) steps an empty optimizer once with zero gradients at lr 0 before
    loading into it. Upstream schedule-free refuses it in eval mode, where a fresh optimizer is; the fix lets a
    stateless optimizer take it (weights unchanged, mode kept), and applies upstream's check once there is state."""
    from torch.distributed.checkpoint.state_dict import _init_optim_state

    def fresh(optimizer_class):
        torch.manual_seed(0)
        weight = torch.nn.Parameter(torch.randn(4, 3))
        return weight, optimizer_class([weight], lr=1e-2)

    weight, upstream = fresh(schedulefree.AdamWScheduleFree)
    with pytest.raises(Exception, match="not in train mode"):
        _init_optim_state(upstream)
    weight, fixed = fresh(AdamWScheduleFree)
    before = weight.detach().clone()
    _init_optim_state(fixed)
    assert torch.equal(weight, before) and fixed.state and not fixed.param_groups[0]["train_mode"]
    weight.grad = torch.ones_like(weight)
    with pytest.raises(Exception, match="not in train mode"):  # with state, stepping in eval mode is still refused
        fixed.step()
