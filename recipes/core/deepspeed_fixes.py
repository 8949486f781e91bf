"""A thin fix for schedule-free under DeepSpeed ZeRO-2 (written for deepspeed 0.19.8), tested in test_distributed.py.

Under ZeRO the optimizer steps DeepSpeed's fp32 master partitions; the module weights (what forward, evaluation and
saving use, in 16 bits under mixed precision) are refreshed from them only at the end of `step()`. Schedule-free's
`eval()` / `train()` move the master copy between y and x outside any step, so the module would keep evaluating and
saving y. This copies the master partitions into the module weights, as DeepSpeed's own step does.
"""

from __future__ import annotations

from recipes.core.optimizer_recipe import unwrap_optimizer


def _zero_optimizer(optimizer):
    """DeepSpeed's ZeRO optimizer between accelerate's wrapper and the user's optimizer, or None."""
    while optimizer is not None:
        if hasattr(optimizer, "update_lp_params") or hasattr(optimizer, "fp32_partitioned_groups_flat"):
            return optimizer
        optimizer = getattr(optimizer, "optimizer", None)
    return None


def copy_master_weights_to_module(optimizer) -> None:
    zero = _zero_optimizer(optimizer)
    if zero is None or zero is unwrap_optimizer(optimizer):
        return
    if hasattr(zero, "update_lp_params"):  # ZeRO-1/2: copy own partition, then all-gather the 16-bit groups
        zero.update_lp_params()
    else:  # ZeRO-3: copy each sub-group's fp32 partition into the partitioned module parameters (as step() does)
        for sub_group in range(len(zero.fp16_groups)):
            zero._reassign_or_swap_out_partitioned_parameters(sub_group)
