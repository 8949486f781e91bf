"""The LOMO family's protocol: the update runs inside backward, at the scheduled lr; no step, no gradient kept."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Optional

import torch
from optimizer_recipes.core.fused_backward import engine_free_zero3
from optimizer_recipes.core.fused_backward.lomo_fixes import average_gradients_across_processes
from optimizer_recipes.core.optimizers.protocol import OptimizerRecipe, largest_numel, refuse_sharded_tensors
from optimizer_recipes.core.optimizers.wrappers import unwrap_optimizer
from optimizer_recipes.core.per_tensor.stochastic_rounding import CHUNK as ROUNDING_CHUNK
from optimizer_recipes.core.per_tensor.stochastic_rounding import rounding_noise

if TYPE_CHECKING:
    from accelerate import Accelerator
    from optimizer_recipes.core.run.config import Config


class FusedBackwardRecipe(OptimizerRecipe):
    """LOMO-family: each parameter is updated by a hook as its gradient arrives, so no gradient is kept.

    Under DDP and FSDP accelerate prepares the model as usual and each gradient is averaged across processes before
    the update (`lomo_fixes.average_gradients_across_processes`). Under ZeRO-3 there is no DeepSpeed engine: the
    parameters are partitioned and gathered per layer (`engine_free_zero3`), and lomo-optim's own ZeRO-3 path
    all-reduces each gradient and updates this rank's partition.
    """

    family_notes = (
        "Works under DDP (gradients averaged per parameter before each fused update) and DeepSpeed ZeRO-3\n"
        "(accelerate_configs/zero3.yaml: parameters partitioned and gathered per layer, each rank updating its "
        "partition in\nthe hooks, no DeepSpeed engine; see recipes/core/fused_backward/engine_free_zero3.py).\n"
        "Refuses: --gradient_accumulation_steps > 1 (gradients are consumed in backward; raise the batch size "
        "instead),\nZeRO-1/2 (DeepSpeed reduces gradients in its own hooks), ZeRO-3 with parameters offloaded to "
        "CPU, FSDP (its\nsharded parameters never reach the fused update's hooks), fp16 mixed precision (use bf16).\n")

    keeps_master_weights = False  # updates the weights in their own dtype, in backward
    updates_in_backward = True
    update_note = "updates: in backward, fused into each parameter's gradient hook (no gradient is kept)"
    gradients_partitioned_by_zero = False  # one parameter's whole gradient at a time, all-reduced under ZeRO-3
    default_max_grad_norm = 0.0  # clipping by global norm costs a second backward pass
    default_lr_scheduler_type = "linear"

    def build_fused(self, model: torch.nn.Module, config: Config):
        """The upstream Lomo/AdaLomo over this model (its hooks are registered here)."""
        raise NotImplementedError

    def build(self, model, config):
        if engine_free_zero3.runs_engine_free(config.launch.kind, config.launch.zero_stage):
            from accelerate.state import AcceleratorState

            state = AcceleratorState()
            rank = engine_free_zero3.partition(model, state.deepspeed_plugin.deepspeed_config,
                                               config.train.per_device_train_batch_size, state.mixed_precision,
                                               state.device)
            optimizer = self.build_fused(model, config)
            optimizer.dp_rank = rank  # read by AdaLomo's ZeRO-3 update, never set by lomo-optim 0.1.1
            return optimizer
        average_gradients_across_processes(model)  # before the optimizer: its hooks must see averaged gradients
        # on its training device first: AdaLomo allocates its state beside the weights (measured on an H200: built
        # before accelerate moved the model, the state stayed on the CPU and the first update failed)
        from accelerate.state import PartialState

        return self.build_fused(model.to(PartialState().device), config)

    def build_for_run(self, model, config):
        optimizer = self.build(model, config)
        optimizer.rounding = rounding_noise(config, model)  # the fused update rounds each parameter's fp32 result
        return optimizer

    def rounding_bytes(self, shapes):
        return min(largest_numel(shapes), ROUNDING_CHUNK) * 4  # the noise: the fp32 result is the update's own

    def gradient_bytes(self, shapes: list[tuple[int, ...]], element_bytes: int) -> int:
        return largest_numel(shapes) * element_bytes  # one parameter's gradient at a time

    def refuse(self, config: Config) -> Optional[str]:
        launch = config.launch
        if config.train.gradient_accumulation_steps > 1:
            return (f"{self.name} updates the weights inside backward, so gradients cannot be accumulated "
                    f"(--gradient_accumulation_steps {config.train.gradient_accumulation_steps}); use "
                    "--gradient_accumulation_steps 1 with a larger --per_device_train_batch_size, or the adamw recipe")
        if launch.kind == "deepspeed" and launch.zero_stage != 3:
            return (f"{self.name} under {launch.describe()} is not supported: ZeRO-1/2 reduce and partition "
                    "gradients in DeepSpeed's own hooks and step, and a fused update consumes each gradient inside "
                    "backward; use accelerate_configs/zero3.yaml (partitioned parameters, LOMO's own setting) or "
                    "multi_gpu.yaml")
        if launch.kind == "deepspeed" and launch.offload_param:
            return (f"{self.name} with ZeRO-3 parameter offload (offload_param_device) is not supported: "
                    "lomo-optim updates each partition on its gradient's device; it keeps no optimizer state to "
                    "offload, so use accelerate_configs/zero3.yaml")
        if launch.kind == "deepspeed" and config.train.max_grad_norm > 0:
            return (f"{self.name} cannot clip by global norm (--max_grad_norm {config.train.max_grad_norm}) under "
                    f"{launch.describe()}: its norm pass frees each layer's gathered parameters, which the update "
                    "pass needs again; use --max_grad_norm 0 with --clip_grad_value, or multi_gpu.yaml")
        sharded = refuse_sharded_tensors(
            self, config, "FSDP replaces each parameter with its shard when it wraps the model and reduce-scatters "
            "gradients in its own post-backward hooks, so the fused update's per-parameter gradient hooks never run "
            "(the weights would not change)", instead="zero3.yaml (partitioned parameters, LOMO's own setting) or "
            "multi_gpu.yaml")
        if sharded:
            return sharded
        if launch.mixed_precision == "fp16":
            return (f"{self.name} cannot run with fp16 mixed precision: accelerate's GradScaler backward does not "
                    "pass the learning rate to the fused update; use bf16 (--bf16 true) or no mixed precision")
        return None

    def prepare(self, accelerator: Accelerator, model, optimizer, train_loader, eval_loader, scheduler) -> tuple:
        if not engine_free_zero3.is_partitioned(model):
            return accelerator.prepare(model, optimizer, train_loader, eval_loader, scheduler)
        # ZeRO-3 without an engine: accelerate shards the loaders; checkpoints hold whole parameters
        train_loader, eval_loader = accelerator.prepare(train_loader, eval_loader)
        accelerator.register_for_checkpointing(engine_free_zero3.FullParameters(model), optimizer, scheduler)
        return model, optimizer, train_loader, eval_loader, scheduler

    def full_state_dict(self, accelerator: Accelerator, model) -> dict:
        if engine_free_zero3.is_partitioned(model):
            return engine_free_zero3.gathered_state_dict(model)
        return accelerator.get_state_dict(model)

    def micro_step_context(self, accelerator: Accelerator, model):
        # Gradients are averaged per parameter by average_gradients_across_processes. DDP must not reduce them as
        # well: it decides in forward, and would write reduced .grad back after LOMO consumed it (a second update).
        if engine_free_zero3.is_partitioned(model):  # no DDP wrapper (and accelerate's no_sync wants an engine)
            return contextlib.nullcontext()
        return accelerator.no_sync(model)

    def backward(self, accelerator: Accelerator, model, optimizer, loss: torch.Tensor, lr: float) -> None:
        fused = unwrap_optimizer(optimizer)
        if fused.clip_grad_norm:
            fused.grad_norm(loss)  # first pass: global norm only, graph retained for the update pass
        # What accelerator.backward(loss, learning_rate=lr) runs for Lomo/AdaLomo (its DeepSpeed branch would hand
        # the loss to an engine instead; the ZeRO-3 path has none).
        if getattr(fused, "rounding", None) is not None:  # lomo-optim's own classes have none
            fused.rounding.begin_step()  # this step's rounding noise
        fused.fused_backward(loss, lr)
        if engine_free_zero3.is_partitioned(model):
            engine_free_zero3.release_gathered(model)

    def step(self, accelerator: Accelerator, model, optimizer, max_grad_norm: float) -> Optional[float]:
        fused = unwrap_optimizer(optimizer)
        fused._opt_called = True  # the update ran in backward; tells the LR scheduler so (it warns otherwise)
        if fused.clip_grad_norm and isinstance(fused.grad_norms, torch.Tensor):
            return float(torch.norm(fused.grad_norms, 2.0))
        return None
