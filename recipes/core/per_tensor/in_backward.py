"""`--optimizer_in_backward true`: any recipe whose update is per tensor steps each parameter inside backward.

An ordinary recipe keeps every gradient until its step: at LLaMA-7B's shape in bf16 that is 12.6 GiB, more than
the whole optimizer state of GaLore, APOLLO or Adafactor. Stepping each parameter as soon as its gradient is
complete, and freeing the gradient, keeps one gradient alive at a time: LOMO's idea, for any optimizer (PyTorch's
"optimizer step in backward" tutorial, torchtune's `optimizer_in_bwd`, the GaLore and APOLLO authors' per-layer
updates). The name is torchtune's, spelled out.

`UpdatesInBackward(recipe)` is the recipe as the run sees it: the same optimizer, built by the recipe, wrapped in
`StepsEachTensor(in_backward=True)` (recipes/core/per_tensor/steps.py), whose hooks step each parameter at the
group's scheduled learning rate. What changes, and why:
- no gradient accumulation (a gradient is consumed as soon as it is complete) and no clipping by global norm (there
  is no moment at which all gradients exist); `--max_grad_norm` defaults to 0 here, and a value is refused;
  `--max_grad_norm_per_tensor` clips each gradient alone (`torch.nn.utils.clip_grad_norm_` on that one parameter:
  under FSDP2 the norm is the whole tensor's, its shards' norms reduced across processes) just before its update;
- under DDP each gradient is averaged across processes by a hook before its update, and DDP's own reducer is kept
  out (`no_sync`), as for LOMO (recipes/core/fused_backward/lomo_fixes.py); under FSDP2 each gradient is reduce-scattered by FSDP2,
  which then calls the hook itself with this rank's shard (torch 2.13 `_fsdp_collectives.py`), so each rank steps
  its shard;
- refused under DeepSpeed (its engine owns the gradients: they are reduced and partitioned in its own hooks and
  step), under FSDP1, and with fp16 autocast (the update would run on scaled gradients before the scaler unscales);
- LOMO and AdaLomo update in backward already.
The checkpoint is the optimizer's own state_dict, as in the ordinary run, so resume is exact.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import TYPE_CHECKING, Optional

import torch
from optimizer_recipes.core.fused_backward.lomo_fixes import average_gradients_across_processes
from optimizer_recipes.core.per_tensor.steps import StepsEachTensor
from optimizer_recipes.core.per_tensor.stochastic_rounding import rounding_noise
from optimizer_recipes.core.run.config import ConfigError
from optimizer_recipes.core.run.launch_setup import LaunchSetup

if TYPE_CHECKING:
    from accelerate import Accelerator
    from optimizer_recipes.core.run.config import Config

NO_GLOBAL_NORM = ("in backward each gradient is freed as soon as its parameter is updated, so no global norm exists "
                  "to clip by")


class UpdatesInBackward:
    """A recipe, with its optimizer stepped per parameter inside backward. Everything not defined here is the
    recipe's own (its name, optimizer, defaults, refusals, schedule-free's modes)."""

    def __init__(self, recipe):
        self.recipe = recipe

    def __getattr__(self, name):
        return getattr(self.recipe, name)

    def fill_defaults(self, config: Config) -> None:
        clipping_given = config.train.max_grad_norm is not None
        self.recipe.fill_defaults(config)
        if not clipping_given:
            config.train.max_grad_norm = 0.0
            config.defaults_used["max_grad_norm"] = f"0 (no clipping): {NO_GLOBAL_NORM}"

    def refuse(self, config: Config) -> Optional[str]:
        t, launch = config.train, config.launch
        reason = None
        if self.recipe.updates_in_backward:
            reason = f"{self.name} updates in backward already; drop --optimizer_in_backward"
        elif t.gradient_accumulation_steps > 1:
            reason = (f"--optimizer_in_backward updates each parameter as soon as its gradient is complete, so "
                      f"gradients cannot be accumulated (--gradient_accumulation_steps {t.gradient_accumulation_steps}); "
                      "use --gradient_accumulation_steps 1 with a larger --per_device_train_batch_size")
        elif t.max_grad_norm > 0:
            reason = (f"--optimizer_in_backward with --max_grad_norm {t.max_grad_norm}: {NO_GLOBAL_NORM}; use "
                      f"--max_grad_norm 0 (--max_grad_norm_per_tensor {t.max_grad_norm} clips each gradient alone), "
                      "or drop --optimizer_in_backward")
        elif launch.kind == "deepspeed":
            reason = (f"--optimizer_in_backward under {launch.describe()} is not supported: DeepSpeed's engine reduces "
                      "and partitions the gradients in its own hooks and steps the optimizer itself; use "
                      f"{self._sharded_or_replicated(config)}, or drop --optimizer_in_backward")
        elif launch.mixed_precision == "fp16":
            reason = ("--optimizer_in_backward with fp16 mixed precision: the update would run on the loss-scaled "
                      "gradients before the scaler unscales them; use --bf16 true")
        return reason or self.recipe.refuse(config)

    def _sharded_or_replicated(self, config: Config) -> str:
        """The launch to use instead of DeepSpeed: FSDP2 (weights, gradients and state sharded, as under ZeRO-3)
        where this recipe runs there in backward, else DDP."""
        under_fsdp2 = dataclasses.replace(config, launch=LaunchSetup("fsdp", mixed_precision=config.launch.mixed_precision))
        if self.refuse(under_fsdp2) is None:
            return "accelerate_configs/fsdp2.yaml (it shards weights, gradients and state as ZeRO-3 does)"
        return "accelerate_configs/multi_gpu.yaml"

    def gradient_bytes(self, shapes: list[tuple[int, ...]], element_bytes: int) -> int:
        return max(torch.Size(s).numel() for s in shapes) * element_bytes  # one parameter's gradient at a time

    def build_for_run(self, model: torch.nn.Module, config: Config) -> torch.optim.Optimizer:
        optimizer = self.recipe.build(model, config)
        if config.launch.kind != "fsdp":  # FSDP2 averages each gradient in its reduce-scatter before the hook
            average_gradients_across_processes(model)  # DDP: each gradient the mean over processes, then stepped
        return StepsEachTensor(optimizer, rounding_noise(config, model), in_backward=True,
                               max_norm_per_tensor=config.train.max_grad_norm_per_tensor)

    def prepare(self, accelerator: Accelerator, model, optimizer, train_loader, eval_loader, scheduler) -> tuple:
        if accelerator.distributed_type == "FSDP" and not accelerator.is_fsdp2:
            raise ConfigError("--optimizer_in_backward under FSDP1 (fsdp_version: 1) is not supported: its flat "
                              "parameters hold many tensors; use accelerate_configs/fsdp2.yaml")
        prepared = self.recipe.prepare(accelerator, model, optimizer, train_loader, eval_loader, scheduler)
        in_backward = prepared[1]
        while not isinstance(in_backward, StepsEachTensor):
            in_backward = in_backward.optimizer
        in_backward.attach()  # the hooks go on the parameters the optimizer holds now
        return prepared

    def micro_step_context(self, accelerator: Accelerator, model):
        if accelerator.is_fsdp2:  # FSDP2 reduce-scatters each gradient, then calls the hooks with this rank's shard
            return contextlib.nullcontext()
        return accelerator.no_sync(model)  # DDP's reducer would write averaged gradients after they were consumed

    def step(self, accelerator: Accelerator, model, optimizer, max_grad_norm: float) -> Optional[float]:
        optimizer.step()  # the updates ran in backward: this ends the step
        return None

    updates_in_backward = True
    update_note = ("updates: in backward, each parameter stepped as its gradient completes, its gradient then freed "
                   "(--optimizer_in_backward)")

    def for_run(self, config: Config):
        return self
