"""Thin fixes for schedule-free under DeepSpeed ZeRO (written for deepspeed 0.19.8), tested in test_distributed.py.

Under ZeRO the optimizer steps DeepSpeed's fp32 master partitions, and the module weights (what forward, evaluation
and saving use, in 16 bits under mixed precision) are refreshed from them only at the end of `step()`. Two things
break schedule-free there:

- Its `eval()` / `train()` move the master copy between y and x outside any step, so the module would keep
  evaluating and saving y. `switch_mode` runs the switch on the master partitions (under ZeRO-3 they sit outside
  the optimizer's param groups between steps, so they are put back in for the switch) and then copies them into
  the module weights, as DeepSpeed's own step does.
- ZeRO-3 calls `optimizer.step()` once per sub-group, with every other group's parameter list emptied. Schedule-free
  advances each group's step counter and averaging weights on every call, for every group, so they would advance
  once per sub-group. `CountersAdvanceOncePerStep` keeps each group's counters to one advance per optimizer step.
"""

from __future__ import annotations

from optimizer_recipes.core.optimizers.wrappers import unwrap_optimizer

# the per-group values schedule-free's step() advances (schedulefree 1.4: AdamWScheduleFree, SGDScheduleFree)
GROUP_COUNTERS = ("k", "lr_max", "weight_sum", "scheduled_lr")


class CountersAdvanceOncePerStep:
    """Mixin before a schedule-free optimizer class: a group's counters advance once per optimizer step, however
    many calls DeepSpeed ZeRO-3 splits the step into (one per sub-group, the others' parameter lists emptied).

    A call that steps a parameter tensor already stepped since the last reset starts a new optimizer step. Without
    ZeRO-3 every call steps every tensor, so every call is a step of its own and nothing changes.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._stepped_tensors: set[int] = set()
        self._counters_before_step: dict[int, dict] = {}

    def step(self, closure=None):
        groups = self.param_groups
        # a tensor is known by its state (a stand-in stepping one tensor in fp32 carries that tensor's state:
        # recipes/core/per_tensor/stochastic_rounding.py), before its first step by itself
        tensors = {id(self.state[p]) if p in self.state else id(p) for group in groups for p in group["params"]}
        if tensors & self._stepped_tensors:  # a new optimizer step
            self._stepped_tensors, self._counters_before_step = set(), {}
        self._stepped_tensors |= tensors
        for index, group in enumerate(groups):  # a later sub-group of a group: the counters its first one saw
            if group["params"] and index in self._counters_before_step:
                group.update(self._counters_before_step[index])
        before = [{key: group[key] for key in GROUP_COUNTERS} for group in groups]
        loss = super().step(closure)
        for index, group in enumerate(groups):
            if not group["params"]:  # emptied for this call: it did not step
                group.update(before[index])
            else:
                self._counters_before_step.setdefault(index, before[index])
        return loss

    def load_state_dict(self, state_dict):
        """Loaded counters are the next step's starting point (FSDP2's loader steps an empty optimizer once
        before loading: what that step saw is forgotten)."""
        super().load_state_dict(state_dict)
        self._stepped_tensors, self._counters_before_step = set(), {}


def _zero_optimizer(optimizer):
    """DeepSpeed's ZeRO optimizer between accelerate's wrapper and the user's optimizer, or None."""
    while optimizer is not None:
        if hasattr(optimizer, "update_lp_params") or hasattr(optimizer, "fp32_partitioned_groups_flat"):
            return optimizer
        optimizer = getattr(optimizer, "optimizer", None)
    return None


def _stepped_each_tensor(optimizer):
    """The StepsEachTensor among the wrappers, or None."""
    from optimizer_recipes.core.per_tensor.steps import StepsEachTensor

    while optimizer is not None and not isinstance(optimizer, StepsEachTensor):
        optimizer = getattr(optimizer, "optimizer", None)
    return optimizer


def switch_mode(optimizer, mode: str) -> None:
    """Call the schedule-free optimizer's train() or eval(), and make the module weights follow (mode: train|eval)."""
    zero = _zero_optimizer(optimizer)
    rounded = _stepped_each_tensor(optimizer)
    if rounded is not None:  # one tensor at a time: in fp32 and rounded into bf16 weights, or in backward
        rounded.switch_mode(mode)
    elif zero is None:  # no DeepSpeed: the module's parameters are the optimizer's
        getattr(unwrap_optimizer(optimizer), mode)()
    elif hasattr(zero, "update_lp_params"):  # ZeRO-1/2: switch the master partitions, then copy and all-gather
        getattr(unwrap_optimizer(optimizer), mode)()
        zero.update_lp_params()
    else:  # ZeRO-3: the fp32 partitions rejoin their groups for the switch, then go to the partitioned parameters
        zero._partition_all_parameters()  # as ZeRO-3's step() begins: nothing stays gathered at the old values
        zero._set_fp32_optimizer_param_groups()
        try:
            getattr(zero.optimizer, mode)()
        finally:
            zero._clear_fp32_optimizer_param_groups()
        for sub_group in range(len(zero.fp16_groups)):  # as ZeRO-3's step() ends: partitions, then the
            zero._reassign_or_swap_out_partitioned_parameters(sub_group)  # small parameters it keeps whole
        if zero.persistent_parameters:
            zero.persistent_parameters[0].all_gather(zero.persistent_parameters)
        zero.invalidate_secondary_tensor()
